"""A resolved spec is kept across calls only while everything it was resolved from is unchanged.

:class:`~fisherfunc._spec.memo.SpecMemo` (one per ``FisherStep``, one per loss for one-shot calls):
inference (``spec=None``) runs once per model structure, not once per call; an edited spec, other
parameter shapes, a changed model or a callable spec are resolved again, and the result is what a
fresh resolution gives.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import fisherfunc as ff
from fisherfunc._spec.memo import SpecMemo
from fisherfunc._spec.resolve import resolve_spec


def _mlp(width: int = 6) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))


def _batch(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)


@pytest.fixture
def inferences(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts ``infer_spec`` calls made through the memo."""
    module = sys.modules["fisherfunc._spec.memo"]
    calls: list[int] = []
    original = module.infer_spec

    def counting(model: nn.Module) -> dict:
        calls.append(1)
        return original(model)

    monkeypatch.setattr(module, "infer_spec", counting)
    return calls


def test_a_step_infers_once_and_again_when_the_model_changes(inferences: list[int]) -> None:
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    step = ff.make_fisher_step(ff.losses.classification(model), decay=0.5)
    state = step.init(params)
    for _ in range(3):
        state = step(params, _batch(), state)
    assert len(inferences) == 1
    # another module in the same place (same parameter names and shapes): inferred again
    model[1] = nn.ReLU()
    step(params, _batch(), state)
    assert len(inferences) == 2
    # a new parameter object under the same name (a re-initialised layer): inferred again
    model[0] = nn.Linear(4, 6)
    step(params, _batch(), state)
    assert len(inferences) == 3


def test_one_shot_calls_with_one_loss_infer_once(inferences: list[int]) -> None:
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = ff.losses.classification(model)
    first = ff.fisher(loss, params, _batch())
    again = ff.fisher(loss, params, _batch())
    assert len(inferences) == 1
    for name in first:
        assert torch.equal(first[name], again[name])
    # the same loss built anew (a loop that builds its loss per call): the model's memo for that
    # description, shared
    ff.fisher(ff.losses.classification(model), params, _batch())
    assert len(inferences) == 1
    ff.fisher(ff.losses.classification(model, dropout="train"), params, _batch())  # other options: its own
    assert len(inferences) == 2
    ff.fisher(ff.losses.classification(_mlp()), params, _batch())  # another model: its own
    assert len(inferences) == 3


def test_an_edited_spec_is_resolved_again() -> None:
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = ff.losses.classification(model)
    spec = {"0.weight": ff.Channel(axis=0), "0.bias": ff.Whole(), "2.weight": ff.Whole(), "2.bias": ff.Whole()}
    before = ff.fisher(loss, params, _batch(), spec=spec)
    assert before["0.weight"].shape == (6,)
    spec["0.weight"] = ff.Elementwise()  # the same dict, edited: its rules are other objects
    after = ff.fisher(loss, params, _batch(), spec=spec)
    assert after["0.weight"].shape == (6, 4)
    assert torch.allclose(after["0.weight"].sum(1), before["0.weight"], rtol=1e-5)


def test_an_equal_spec_written_anew_is_kept() -> None:
    # rules are frozen values: ff.Elementwise() built on every call is the same spec
    memo = SpecMemo()
    params = {k: v.detach() for k, v in _mlp().named_parameters()}

    def spec(axis: int) -> dict[str, ff.Rule]:
        whole = ff.Whole()
        return {"0.weight": ff.Channel(axis=axis), "0.bias": whole, "2.weight": ff.Elementwise(), "2.bias": whole}

    first = memo.resolve(spec(0), params)
    assert memo.resolve(spec(0), params) is first
    other = memo.resolve(spec(1), params)
    assert other is not first
    assert dict(zip(other.names, other.group_shapes))["0.weight"] == (4,)


def test_other_parameter_shapes_are_resolved_again() -> None:
    memo = SpecMemo()
    rule = ff.Channel(axis=0)
    small = {k: v.detach() for k, v in _mlp(6).named_parameters()}
    wide = {k: v.detach() for k, v in _mlp(9).named_parameters()}
    assert memo.resolve(rule, small).group_shapes == resolve_spec(rule, small).group_shapes
    assert memo.resolve(rule, small) is memo.resolve(rule, small)  # kept
    kept = memo.resolve(rule, wide)
    assert kept.group_shapes == resolve_spec(rule, wide).group_shapes
    assert kept.group_shapes[0] == (9,)
    cast = {k: v.double() for k, v in wide.items()}  # another dtype: resolved again
    assert memo.resolve(rule, cast) is not kept


def test_a_callable_spec_is_called_on_every_call() -> None:
    memo = SpecMemo()
    params = {k: v.detach() for k, v in _mlp().named_parameters()}
    calls: list[int] = []

    def spec(p: dict) -> ff.Rule:
        calls.append(1)
        return ff.Elementwise()

    memo.resolve(spec, params)
    memo.resolve(spec, params)
    assert len(calls) == 2


def test_a_kept_spec_still_refuses_a_bad_state() -> None:
    # the state check runs on every call, against the kept resolution
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    step = ff.make_fisher_step(ff.losses.classification(model), decay=0.5)
    state = step(params, _batch(), step.init(params))
    other = ff.make_fisher_step(ff.losses.classification(model), spec=ff.Elementwise(), decay=0.5)
    with pytest.raises(ff.SpecError, match="the state was made with"):
        step(params, _batch(), other.init(params))
    step(params, _batch(), state)  # and the step goes on
