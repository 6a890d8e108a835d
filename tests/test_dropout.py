"""Dropout: evaluation semantics by default, whatever the model's mode, without touching the model.

* ``dropout="eval"`` (default): the Fisher of a train-mode model equals the Fisher of an eval-mode
  copy (float64, ≤ 1e-12 relative), for dropout modules, functional dropout, attention dropout
  inside ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``; every module's
  ``training`` flag, hooks and weights are the same afterwards.
* ``dropout="train"``: the model's own dropout with independent masks per sample — identical
  samples get different per-sample Fisher, the eval default gives them identical ones, and a seed
  reproduces a run.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc.testing import cases

TOL = 1e-12
PATHS = ("auto", "direct")


def _case(name: str) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """A float64 training-mode model with dropout and a batch.

    ``"mlp"``: Linear → Tanh → Dropout → Linear → Tanh → AlphaDropout → Linear (p = 0.5);
    ``"encoder"``: ``nn.TransformerEncoderLayer`` (``nn.MultiheadAttention`` inside, dropout 0.4) → head.
    """
    if name == "mlp":
        case = cases.case("mlp", features=6, hidden=(10, 10), classes=4, dropout=0.5, batch=7)
    elif name == "encoder":
        case = cases.case("attention_classifier", block="encoder", dropout=0.4, seq_len=4, batch=5)
    else:
        raise ValueError(name)
    return case.model.train(), case.batch


def _snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a Fisher computation must leave as it was."""
    return {
        "training": [m.training for m in model.modules()],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _assert_same_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["mlp", "encoder"])
def test_eval_semantics_equal_the_eval_mode_models_fisher(name: str, path: str) -> None:
    model, batch = _case(name)
    evaluated = copy.deepcopy(model).eval()
    before = _snapshot(model)
    params = dict(model.named_parameters())
    got = ff.fisher(ff.losses.classification(model), params, batch, path=path)
    want = ff.fisher(ff.losses.classification(evaluated), dict(evaluated.named_parameters()), batch, path=path)
    for k in want:
        assert _rel(got[k], want[k]) <= TOL, k
    _assert_same_snapshot(before, _snapshot(model))
    assert all(m.training for m in model.modules())  # still in training mode, as the user left it


@pytest.mark.parametrize("path", PATHS)
def test_eval_semantics_reach_functional_and_attention_dropout(path: str) -> None:
    # The p=0 network is what evaluation computes; hard-coded training=True calls are dropped too.
    # Functional dropout that ignores the module's mode (training=True hard-coded) and attention
    # dropout inside F.scaled_dot_product_attention; p=0 is the deterministic network.
    case = cases.case("functional_dropout", p=0.6, batch=6, seq_len=5)
    model, batch = case.model, case.batch
    plain = copy.deepcopy(model)
    plain.p = 0.0
    spec = ff.Channel(0)
    got = ff.fisher(ff.losses.classification(model), dict(model.named_parameters()), batch, spec=spec, path=path)
    want = ff.fisher(ff.losses.classification(plain), dict(plain.named_parameters()), batch, spec=spec, path=path)
    for k in want:
        assert _rel(got[k], want[k]) <= TOL, k


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["mlp", "encoder"])
def test_train_option_draws_independent_masks_per_sample(name: str, path: str) -> None:
    model, (x, y) = _case(name)
    same = (x[:1].expand(6, *x.shape[1:]).contiguous(), y[:1].expand(6).contiguous())  # one sample, six times
    params = dict(model.named_parameters())
    before = _snapshot(model)

    torch.manual_seed(3)
    train = ff.per_sample_fisher(ff.losses.classification(model, dropout="train"), params, same, path=path)
    torch.manual_seed(3)
    again = ff.per_sample_fisher(ff.losses.classification(model, dropout="train"), params, same, path=path)
    evaluated = ff.per_sample_fisher(ff.losses.classification(model), params, same, path=path)

    for k, groups in train.groups.items():
        flat = groups.reshape(6, -1)
        distinct = {tuple(row.tolist()) for row in flat}
        assert len(distinct) == 6, f"{k}: per-sample Fisher of identical samples should differ (own masks)"
        assert torch.equal(groups, again.groups[k]), f"{k}: the same seed should reproduce the masks"
        e = evaluated.groups[k].reshape(6, -1)
        assert torch.equal(e, e[:1].expand_as(e)), f"{k}: eval semantics give identical samples identical Fisher"
    _assert_same_snapshot(before, _snapshot(model))


@pytest.mark.parametrize("call", ["per_sample_fisher", "kfac"])
def test_the_same_seed_draws_the_same_masks_whether_or_not_the_call_discovers(call: str) -> None:
    # the first call with a loss discovers its sites (or layers) by a forward of one sample, the
    # next ones keep them; that forward's dropout draws must not shift the masks of the Fisher itself
    model, batch = _case("mlp")
    params = dict(model.named_parameters())
    loss = ff.losses.classification(model, dropout="train")

    def run() -> dict[str, Tensor]:
        torch.manual_seed(7)
        if call == "kfac":
            return dict(ff.kfac.kfac(loss, params, batch).G)
        return dict(ff.per_sample_fisher(loss, params, batch).groups)

    first, second = run(), run()  # discovers, then keeps
    for k in first:
        assert torch.equal(first[k], second[k]), k


def test_train_option_runs_in_make_fisher_step_and_leaves_eval_default_deterministic() -> None:
    model, batch = _case("mlp")
    params = dict(model.named_parameters())
    step = ff.make_fisher_step(ff.losses.classification(model), decay=0.0)
    a, b = step(params, batch, step.init(params)), step(params, batch, step.init(params))
    assert all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)  # eval semantics: no randomness
    noisy = ff.make_fisher_step(ff.losses.classification(model, dropout="train"), decay=0.0)
    c, d = noisy(params, batch, noisy.init(params)), noisy(params, batch, noisy.init(params))
    assert any(not torch.equal(c.ema[k], d.ema[k]) for k in c.ema)  # fresh masks on every call
    assert all(m.training for m in model.modules())


def test_evaluation_context_for_a_plain_callable() -> None:
    # A hand-written per-sample loss opts into the same semantics with ff.dropout.evaluation().
    model, batch = _case("mlp")
    evaluated = copy.deepcopy(model).eval()

    def loss(p: dict[str, Tensor], sample: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
        x, y = sample
        with ff.dropout.evaluation():
            logits = torch.func.functional_call(model, p, (x[None],))
        return F.cross_entropy(logits, y[None], reduction="sum"), 1

    spec = ff.infer_spec(model)
    got = ff.fisher(loss, dict(model.named_parameters()), batch, spec=spec)
    want = ff.fisher(ff.losses.classification(evaluated), dict(evaluated.named_parameters()), batch, spec=spec)
    for k in want:
        assert _rel(got[k], want[k]) <= TOL, k
    assert ff.dropout.vmap_randomness(loss) == "error"
    assert ff.losses.classification(model, dropout="train").randomness == "different"


@pytest.mark.parametrize("name", ["mlp", "encoder"])
def test_the_engine_rewrites_dropout_in_its_own_mode_not_a_second_one(name: str, monkeypatch) -> None:
    # Inside the per-sample function the dropout rewriting is the first part of the engine's one
    # function mode: the loss's forward enters no EvalDropout of its own (every torch call would
    # cross a second Python mode), and the semantics are unchanged. Outside the engine the loss
    # still enters it.
    model, batch = _case(name)
    evaluated = copy.deepcopy(model).eval()
    entered = []
    original = ff.dropout.evaluation
    monkeypatch.setattr(ff.dropout, "evaluation", lambda: entered.append(1) or original())
    loss = ff.losses.classification(model)
    got = ff.fisher(loss, dict(model.named_parameters()), batch, path="direct")
    assert entered == []
    want = ff.fisher(ff.losses.classification(evaluated), dict(evaluated.named_parameters()), batch, path="direct")
    for k in want:
        assert _rel(got[k], want[k]) <= TOL, k
    x, y = batch
    with torch.no_grad():
        alone = loss(dict(model.named_parameters()), (x[0], y[0]))[0]
        assert entered == [1]
        expected = ff.losses.classification(evaluated)(dict(evaluated.named_parameters()), (x[0], y[0]))[0]
    assert torch.equal(alone, expected)
