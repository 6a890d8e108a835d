"""Fisher kinds (``kind="empirical" | "mc" | "exact"``, :mod:`fisherfunc.kinds`).

* ``"exact"`` equals an independent float64 reference: a naive loop over samples, target
  positions and classes, each ``Σ p(c|x) · g_c²`` term its own ``torch.autograd.grad`` call on the
  module itself, summed to groups by hand (``reference.reduce_groups``); and, for cross-entropy and
  squared-error models, BackPACK's ``DiagGGNExact`` summed to groups (the GGN is the Fisher there).
  Float64 results agree to ``1e-10``, float32 results to ``1e-6`` relative (per leaf,
  ``max|a − b| / max|b|``; measured float32 rounding is ~1e-7).
* ``"mc"`` with ``k`` draws computes ``(1/k) Σ_j g(y_j)²`` for the documented draws (a naive loop
  re-derives the labels from the same uniforms), and is an unbiased estimate of ``"exact"``: over a
  fixed set of seeds, the mean is within a Bonferroni-corrected number of standard errors (computed
  from the sample standard deviation) of ``"exact"`` for every group, while the same statistic
  rejects a 10 % bias — so the test has the power to fail.
* Same seed ⇒ bitwise-identical results; different ``chunk_size`` ⇒ the same result to ≤ 1e-12 in
  float64 (the draws are made for the whole batch before chunking, so every sample gets the same
  labels; only the rounding of batched kernels and the order in which chunk sums are added can
  differ); ``path="auto"`` and ``path="direct"`` agree for every kind.
* A worked example where the empirical and the true Fisher disagree by ~100× (README).
* Bad input gets a clear error before any model call.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable
from statistics import NormalDist
from typing import Any

import optree
import pytest
import torch
import torch.nn.functional as F
from reference import assert_groups_close, full_spec, reduce_groups
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc._engine.group_sums import find_sites
from fisherfunc._engine.kinds import FisherKind, sample_categorical, step_generator
from fisherfunc._engine.numerics import prepare
from fisherfunc._spec.resolve import resolve_spec
from fisherfunc.testing import cases

F64_TOL = 1e-10
F32_TOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


# --- models: from the registry; every one counts its forward calls in ``model.calls`` ---------------


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(
    dtype: torch.dtype = torch.float64, out: int = 4, batch: int = 6
) -> tuple[nn.Sequential, tuple[Tensor, Tensor]]:
    """``x [B, 4] -> [B, out]``: Linear → Tanh → Linear → Sigmoid → Linear, and ``(x, labels)``."""
    case = cases.case(
        "mlp", features=4, hidden=(6, 6), activation=("tanh", "sigmoid"), classes=out, batch=batch, dtype=dtype
    )
    return case.model, case.batch


def _tagger(dtype: torch.dtype = torch.float64, batch: int = 4, length: int = 5) -> tuple[nn.Module, tuple]:
    """A Conv1d tagger ``x [B, 3, T] -> logits [B, C, T]``; ``(x, labels, mask)``, padding, an ignored label."""
    case = cases.case("conv_tagger", seed=1, batch=batch, length=length, dtype=dtype)
    return case.model, case.batch


def _tagger_loss(model: nn.Module) -> ff.losses.ModelLoss:
    return ff.losses.token_classification(model, inputs=0, targets=1, mask=2, output=lambda o: o.transpose(1, 2))


def _lm(dtype: torch.dtype = torch.float64, batch: int = 4, length: int = 5) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """``ids [B, T] -> logits [B, T, 7]`` whose position ``t`` sees positions ``≤ t`` (a causal running
    mean), and ``(ids, mask)`` right-padded (every id, 0 included, occurs as a real token)."""
    case = cases.case(
        "causal_lm", seed=2, vocab=7, dim=5, hidden=6, norm=False, causal_mean=True, pad_id=None, batch=batch,
        seq_len=length, dtype=dtype,
    )  # fmt: skip
    return case.model, (case.batch["input_ids"], case.batch["attention_mask"])


def _layers(model: nn.Module) -> list[nn.Module]:
    """The model's layers in order, for BackPACK's ``nn.Sequential``."""
    return list(model) if isinstance(model, nn.Sequential) else model.layers()


# --- the naive float64 reference ------------------------------------------------------------------


def _scores(model: nn.Module, what: str, batch: tuple, b: int, variance: float = 1.0) -> list[tuple[float, Tensor]]:
    """Sample ``b``'s ``(weight, scalar)`` pairs whose gradients' weighted squares sum to its exact Fisher.

    Classification: ``(p_c, −log p_c)`` per class. Token classification / causal LM: the same for
    every real, non-ignored target position (position ``t − 1`` predicts label ``t`` for the LM).
    Gaussian: ``(1/σ², f_k)`` per output ``k``, since ``F = Σ_k (∂f_k/∂θ)² / σ²``.
    """
    if what == "classification":
        logits = model(batch[0][b : b + 1])[0]
        rows = [(logits, None)]
    elif what == "tokens":
        x, labels, mask = batch
        logits = model(x[b : b + 1])[0].transpose(0, 1)  # [T, C]
        rows = [(logits[t], None) for t in range(labels.shape[1]) if labels[b, t] != -100 and mask[b, t] != 0]
    elif what == "causal":
        ids, mask = batch
        logits = model(ids[b : b + 1])[0]  # [T, V]
        rows = [(logits[t - 1], None) for t in range(1, ids.shape[1]) if mask[b, t] != 0]
    else:
        out = model(batch[0][b : b + 1])[0]
        return [(1.0 / variance, out[k]) for k in range(out.shape[0])]
    pairs = []
    for z, _ in rows:
        p = torch.softmax(z, -1).detach()
        for c in range(z.shape[0]):
            pairs.append((float(p[c]), -torch.log_softmax(z, -1)[c]))
    return pairs


def _tokens(what: str, batch: tuple) -> float:
    if what == "tokens":
        return float(((batch[1] != -100) & (batch[2] != 0)).sum())
    if what == "causal":
        return float(batch[1][:, 1:].sum())
    return float(batch[0].shape[0])


def exact_reference(
    model: nn.Module, what: str, batch: tuple, spec: Any = None, variance: float = 1.0
) -> dict[str, Tensor | None]:
    """``Σ_b Σ_(t,c) p_tc · reduce(g_tc ⊙ g_tc) / Σ_b n_b`` by a naive loop (one autograd call per term)."""
    rules = full_spec(model, spec)
    names = [n for n, r in rules.items() if not isinstance(r, ff.Skip)]
    named = dict(model.named_parameters())
    sums = {n: torch.zeros_like(named[n]) for n in names}
    for b in range(batch[0].shape[0]):
        for weight, scalar in _scores(model, what, batch, b, variance):
            grads = torch.autograd.grad(scalar, [named[n] for n in names], retain_graph=True, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    sums[n] += weight * g.detach().square()
    total = _tokens(what, batch)
    return {n: (None if n not in sums else reduce_groups(r, sums[n]) / total) for n, r in rules.items()}


def mc_reference(model: nn.Module, what: str, batch: tuple, seed: int, k: int) -> dict[str, Tensor | None]:
    """``Σ_b (1/k) Σ_j reduce(g(y_j)²) / Σ_b n_b`` for the documented draws, by a naive loop.

    The draws are ``torch.rand([B, k, *target_shape], float64)`` from ``Generator().manual_seed(seed)``;
    a label is the right insertion point of ``u · P_{C−1}`` into the CDF ``P`` (``torch.searchsorted``).
    """
    rules = full_spec(model, None)
    named = dict(model.named_parameters())
    targets = batch[1] if what != "causal" else batch[0]
    u = torch.rand((targets.shape[0], k, *targets.shape[1:]), generator=_generator(seed), dtype=torch.float64)
    sums = {n: torch.zeros_like(p) for n, p in named.items()}
    for b in range(targets.shape[0]):
        if what == "classification":
            logits = model(batch[0][b : b + 1])  # [1, C]
            rows = [(logits[0], 0)]
        else:  # causal: logits t − 1 predict target t
            ids, mask = batch
            logits = model(ids[b : b + 1])[0]
            rows = [(logits[t - 1], t) for t in range(1, ids.shape[1]) if mask[b, t] != 0]
        for j in range(k):
            loss = 0.0
            for z, t in rows:
                cdf = torch.softmax(z.detach(), -1).cumsum(-1)
                draw = u[b, j] if what == "classification" else u[b, j, t]
                y = min(int(torch.searchsorted(cdf, draw * cdf[-1], right=True)), z.shape[0] - 1)
                loss = loss - torch.log_softmax(z, -1)[y]
            grads = torch.autograd.grad(loss, list(named.values()), retain_graph=True)
            for n, g in zip(named, grads):
                sums[n] += g.detach().square() / k
    total = _tokens(what, batch)
    return {n: reduce_groups(rules[n], sums[n]) / total for n in named}


# --- "exact" against the reference ----------------------------------------------------------------


def _exact_case(what: str, dtype: torch.dtype) -> tuple[nn.Module, Any, tuple, float]:
    if what == "classification":
        model, batch = _mlp(dtype)
        return model, ff.losses.classification(model), batch, 1.0
    if what == "tokens":
        model, batch = _tagger(dtype)
        return model, _tagger_loss(model), batch, 1.0
    model, batch = _mlp(dtype, out=3)
    batch = (batch[0], torch.randn(batch[0].shape[0], 3, dtype=dtype))
    return model, ff.losses.regression(model, variance=0.3), batch, 0.3


@pytest.mark.parametrize("path", ["auto", "direct"])
@pytest.mark.parametrize("what", ["classification", "tokens", "regression"])
def test_exact_matches_naive_reference(what: str, path: str) -> None:
    model, loss, batch, variance = _exact_case(what, torch.float64)
    expected = exact_reference(model, what, batch, variance=variance)
    got = ff.fisher(loss, _params(model), batch, kind="exact", path=path, chunk_size=3)
    assert_groups_close(got, expected, F64_TOL, f"{what} float64: ")
    params32 = {k: v.float() for k, v in _params(model).items()}
    batch32 = optree.tree_map(lambda t: t.float() if t.is_floating_point() else t, batch)
    got32 = ff.fisher(loss, params32, batch32, kind="exact", path=path)
    assert all(v.dtype == torch.float32 for v in got32.values())
    assert_groups_close(got32, expected, F32_TOL, f"{what} float32: ")


def test_exact_depends_on_labels_only_through_which_positions_count() -> None:
    # The true Fisher takes no labels from the data: changing every real label changes nothing;
    # ignoring one more position removes exactly that position's Σ_c p_c g_c² term.
    model, (x, labels, mask) = _tagger()
    loss, params = _tagger_loss(model), _params(model)
    a = ff.per_sample_fisher(loss, params, (x, labels, mask), kind="exact")
    other = torch.where(labels == -100, labels, (labels + 1) % 3)
    b = ff.per_sample_fisher(loss, params, (x, other, mask), kind="exact")
    for name in a.groups:
        assert torch.equal(a.groups[name], b.groups[name]), name
    assert a.tokens.tolist() == [3.0, 4.0, 4.0, 5.0]
    fewer = labels.clone()
    fewer[3, 0] = -100
    c = ff.per_sample_fisher(loss, params, (x, fewer, mask), kind="exact")
    assert c.tokens.tolist() == [3.0, 4.0, 4.0, 4.0]
    for name in a.groups:
        assert torch.equal(a.groups[name][:3], c.groups[name][:3]), name
        assert bool((c.groups[name][3] <= a.groups[name][3]).all()) and not torch.equal(c.groups[name], a.groups[name])


# --- BackPACK's DiagGGNExact ----------------------------------------------------------------------


def _backpack_diag(model: nn.Module, x: Tensor, y: Tensor, loss_module: nn.Module) -> dict[str, Tensor]:
    """BackPACK's exact GGN diagonal of ``loss_module(model(x), y)`` (``reduction="sum"``).

    BackPACK extends ``nn.Sequential`` of its known layers: a copy of the model's layers (extending
    registers hooks, which must stay off the original), with parameter names mapped back.
    """
    backpack = pytest.importorskip(
        "backpack", reason="BackPACK is not installed (pip install --no-deps -r requirements-peers.txt)"
    )
    from backpack.extensions import DiagGGNExact

    net = backpack.extend(copy.deepcopy(nn.Sequential(*_layers(model))))
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(list(net.parameters()))
    criterion = backpack.extend(loss_module)
    x = x.clone().requires_grad_(True)  # BackPACK's hooks warn when no input requires grad
    with backpack.backpack(DiagGGNExact()):
        criterion(net(x), y).backward()
    return {n: p.diag_ggn_exact.detach().clone() for n, p in zip(names, net.parameters())}


def _groups_of(model: nn.Module, diag: dict[str, Tensor], total: float) -> dict[str, Tensor | None]:
    return {n: reduce_groups(rule, diag[n]) / total for n, rule in full_spec(model).items()}


@pytest.mark.parametrize("what", ["classification", "tokens", "regression"])
def test_exact_matches_backpack_diag_ggn(what: str) -> None:
    model, loss, batch, _ = _exact_case(what, torch.float64)
    assert isinstance(model, nn.Sequential) or hasattr(model, "layers")
    if what == "tokens":  # BackPACK has no padding mask or ignore_index: a fully labelled batch
        batch = (batch[0], batch[1].clamp_min(0), torch.ones_like(batch[2]))
        criterion: nn.Module = nn.CrossEntropyLoss(reduction="sum")  # logits [B, C, T], labels [B, T]
    elif what == "classification":
        criterion = nn.CrossEntropyLoss(reduction="sum")
    else:  # Σ (f − y)² has GGN 2 JᵀJ = JᵀJ / σ² for σ² = 0.5
        loss = ff.losses.regression(model, variance=0.5)
        criterion = nn.MSELoss(reduction="sum")
    expected = _groups_of(model, _backpack_diag(model, batch[0], batch[1], criterion), _tokens(what, batch))
    assert_groups_close(ff.fisher(loss, _params(model), batch, kind="exact"), expected, F64_TOL, "float64: ")
    params32 = {k: v.float() for k, v in _params(model).items()}
    batch32 = optree.tree_map(lambda t: t.float() if t.is_floating_point() else t, batch)
    assert_groups_close(ff.fisher(loss, params32, batch32, kind="exact"), expected, F32_TOL, "float32: ")


# --- "mc": what it computes, and that it is unbiased ----------------------------------------------


def test_sample_categorical_inverts_the_cdf() -> None:
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.0, 1.0, 0.0]], dtype=torch.float64)
    # y = c exactly when u ∈ [P_{c−1}, P_c): P = [0.2, 0.7, 1.0] and [0, 1, 1]; zero-mass classes never
    u = torch.tensor([[0.0, 0.0], [0.19, 0.5], [0.21, 0.999], [0.69, 0.3], [0.71, 0.1], [0.9999, 0.99]])
    drawn = sample_categorical(probs, u.double())
    assert drawn.tolist() == [[0, 1], [0, 1], [1, 1], [1, 1], [2, 1], [2, 1]]


@pytest.mark.parametrize("path", ["auto", "direct"])
@pytest.mark.parametrize("what", ["classification", "causal"])
def test_mc_is_the_mean_of_squared_draw_gradients(what: str, path: str) -> None:
    # F_b = (1/k) Σ_j g(y_j)², for the documented draws — not the square of the averaged gradient.
    if what == "classification":
        model, batch = _mlp()
        loss = ff.losses.classification(model)
    else:
        model, batch = _lm()
        loss = ff.losses.causal_lm(model, inputs=0, mask=1)
    got = ff.fisher(loss, _params(model), batch, kind=ff.MC(samples=3, seed=11), path=path, chunk_size=3)
    assert_groups_close(got, mc_reference(model, what, batch, seed=11, k=3), F64_TOL, f"{what}: ")


def _max_z(draws: list[dict[str, Tensor]], expected: dict[str, Tensor]) -> tuple[float, float]:
    """The largest ``|mean − expected| / SE`` over every group entry, and its Bonferroni critical value.

    ``SE = s / √S`` with ``s`` the sample standard deviation over the ``S`` seeds; the critical
    value is the two-sided normal quantile at family-wise level 1e-3 over all entries.
    """
    seeds = len(draws)
    worst, entries = 0.0, 0
    for name, exp in expected.items():
        values = torch.stack([d[name] for d in draws]).double()
        se = values.std(0, correction=1) / math.sqrt(seeds)
        assert bool((se > 0).all()), f"{name}: a group that never varies cannot be tested"
        worst = max(worst, float(((values.mean(0) - exp.double()).abs() / se).max()))
        entries += exp.numel()
    return worst, NormalDist().inv_cdf(1 - 1e-3 / (2 * entries))


def _mc_case(what: str) -> tuple[Any, dict[str, Tensor], tuple, dict[str, Tensor]]:
    """(loss, params, batch, exact Fisher) with float64 models; the LM's from the naive reference."""
    if what == "classification":
        model, batch = _mlp(batch=32)
        loss: Any = ff.losses.classification(model)
    elif what == "tokens":
        model, batch = _tagger(batch=12)
        loss = _tagger_loss(model)
    elif what == "regression":
        model, (x, _) = _mlp(out=3, batch=24)
        batch = (x, torch.zeros(24, 3, dtype=torch.float64))
        loss = ff.losses.regression(model, variance=0.5)
    else:
        model, batch = _lm(batch=12)
        loss = ff.losses.causal_lm(model, inputs=0, mask=1)
        return loss, _params(model), batch, exact_reference(model, "causal", batch)  # type: ignore[return-value]
    return loss, _params(model), batch, ff.fisher(loss, _params(model), batch, kind="exact")


@pytest.mark.parametrize("what", ["classification", "tokens", "regression", "causal"])
def test_mc_is_unbiased_for_exact(what: str) -> None:
    loss, params, batch, exact = _mc_case(what)
    draws = [ff.fisher(loss, params, batch, kind=ff.MC(samples=2, seed=seed)) for seed in range(200)]
    z, critical = _max_z(draws, exact)
    assert z <= critical, f"mc mean is {z:.2f} standard errors from exact (critical {critical:.2f})"
    # Power: the same statistic rejects a 10 % bias either way.
    for scale in (0.9, 1.1):
        biased, _ = _max_z(draws, {n: v * scale for n, v in exact.items()})
        assert biased > critical, f"a {scale}× bias is only {biased:.2f} standard errors away: the test is too weak"


# --- reproducibility and chunk independence -------------------------------------------------------


def test_same_seed_is_bitwise_identical_and_seeds_differ() -> None:
    model, batch = _lm(torch.float32)
    loss, params = ff.losses.causal_lm(model, inputs=0, mask=1), _params(model)
    a = ff.fisher(loss, params, batch, kind=ff.MC(samples=2, seed=7))
    b = ff.fisher(loss, params, batch, kind=ff.MC(samples=2, seed=7))
    c = ff.fisher(loss, params, batch, kind=ff.MC(samples=2, generator=_generator(7)))
    d = ff.fisher(loss, params, batch, kind=ff.MC(samples=2, seed=8))
    for name in a:
        assert torch.equal(a[name], b[name]) and torch.equal(a[name], c[name]), name
    assert any(not torch.equal(a[n], d[n]) for n in a), "another seed must give other draws"


def test_a_generator_advances_across_batches_and_calls() -> None:
    model, batch = _mlp()
    loss, params = ff.losses.classification(model), _params(model)
    g = _generator(3)
    first = ff.fisher(loss, params, batch, kind=ff.MC(generator=g))
    second = ff.fisher(loss, params, batch, kind=ff.MC(generator=g))
    assert any(not torch.equal(first[n], second[n]) for n in first)
    # two batches from one generator equal one call over both, with the draws in order
    both = ff.accumulate(loss, params, [batch, batch], kind=ff.MC(generator=_generator(3)))
    for n in first:
        assert torch.allclose(both.sums[n] / both.tokens, (first[n] + second[n]) / 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("path", ["auto", "direct"])
@pytest.mark.parametrize("what", ["causal", "tokens", "regression"])
def test_chunk_size_does_not_change_the_result(what: str, path: str) -> None:
    if what == "causal":
        model, batch = _lm(batch=7)
        loss: Any = ff.losses.causal_lm(model, inputs=0, mask=1)
    elif what == "tokens":
        model, batch = _tagger(batch=7)
        loss = _tagger_loss(model)
    else:
        model, (x, _) = _mlp(out=3, batch=7)
        batch = (x, torch.zeros(7, 3, dtype=torch.float64))
        loss = ff.losses.regression(model)
    params = _params(model)
    for kind in (ff.MC(samples=3, seed=5), ff.Exact()):
        if what == "causal" and kind.name == "exact":
            continue
        whole = ff.per_sample_fisher(loss, params, batch, kind=kind, path=path)
        total = ff.fisher(loss, params, batch, kind=kind, path=path)
        for chunk_size in (1, 2, 5):
            part = ff.per_sample_fisher(loss, params, batch, kind=kind, path=path, chunk_size=chunk_size)
            assert_groups_close(part.groups, whole.groups, 1e-12, f"{kind.name} chunk {chunk_size}: ")
            summed = ff.fisher(loss, params, batch, kind=kind, path=path, chunk_size=chunk_size)
            assert_groups_close(summed, total, 1e-12, f"{kind.name} chunk {chunk_size}: ")


@pytest.mark.parametrize(
    ("kind", "what"),  # a causal LM has no exact kind (test_exact_causal_lm_is_refused_with_the_reason)
    [("empirical", "tokens"), ("mc", "tokens"), ("exact", "tokens"), ("empirical", "causal"), ("mc", "causal")],
)
def test_paths_agree_for_every_kind(kind: str, what: str) -> None:
    model, (ids, mask) = _lm(batch=5, length=6)
    labels = ids.clone()
    labels[0, 2] = -100
    if what == "tokens":
        loss = ff.losses.token_classification(model, inputs=0, targets=2, mask=1)
    else:
        loss = ff.losses.causal_lm(model, inputs=0, labels=2, mask=1)
    params, batch = _params(model), (ids, mask, labels)
    resolved = resolve_spec(ff.infer_spec(model), params)
    sites = find_sites(
        loss, prepare(params, differentiated=resolved.active), resolved, optree.tree_map(lambda t: t[0], batch)
    )
    assert {resolved.names[s.leaf] for s in sites} == {"emb.weight", "up.weight", "down.weight", "head.weight"}
    value = ff.MC(samples=2, seed=1) if kind == "mc" else kind
    auto = ff.per_sample_fisher(loss, params, batch, kind=value, path="auto")
    direct = ff.per_sample_fisher(loss, params, batch, kind=value, path="direct")
    assert torch.equal(auto.tokens, direct.tokens)
    assert_groups_close(auto.groups, direct.groups, 1e-12, f"{kind}: ")


# --- the worked example: empirical and true Fisher disagree ---------------------------------------


def test_worked_example_empirical_and_true_fisher_disagree() -> None:
    # A 2-class linear model, confident at x = 1: p(class 0) = 0.99 exactly.
    model = nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5], [-0.5]], dtype=torch.float64) * math.log(99))
    loss, params = ff.losses.classification(model), _params(model)
    x = torch.ones(4, 1, dtype=torch.float64)
    right, wrong = (x, torch.zeros(4, dtype=torch.long)), (x, torch.ones(4, dtype=torch.long))
    p = 0.99
    # True Fisher per output row k: Σ_c p_c (p_k − [k = c])² x² = p (1 − p); the labels do not enter.
    for batch in (right, wrong):
        exact = ff.fisher(loss, params, batch, kind="exact")["weight"]
        assert torch.allclose(exact, torch.full((2,), p * (1 - p), dtype=torch.float64), rtol=1e-12)
    # Empirical: (p − [y = k])²: 100× too small where the model is right, 99× too large where it is wrong.
    small = ff.fisher(loss, params, right)["weight"]
    large = ff.fisher(loss, params, wrong)["weight"]
    assert torch.allclose(small, torch.full((2,), (1 - p) ** 2, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(large, torch.full((2,), p**2, dtype=torch.float64), rtol=1e-12)
    assert float((exact / small).min()) > 90 and float((large / exact).min()) > 90
    # Monte Carlo agrees with exact within its standard error: one draw gives (1 − p)² with
    # probability p and p² with probability 1 − p, so SE = σ / √(samples · k).
    k = 4000
    mc = ff.fisher(loss, params, right, kind=ff.MC(samples=k, seed=0))["weight"]
    sd = math.sqrt(p * (1 - p)) * (p**2 - (1 - p) ** 2)
    se = sd / math.sqrt(4 * k)
    assert float((mc - p * (1 - p)).abs().max()) <= 5 * se
    assert 5 * se < 0.5 * p * (1 - p)  # and that bound is tight enough to tell mc from empirical


# --- the step and the state -----------------------------------------------------------------------


def test_step_records_kind_and_a_seeded_step_is_pure() -> None:
    model, batch = _mlp()
    loss, params = ff.losses.classification(model), _params(model)
    step = ff.make_fisher_step(loss, kind=ff.MC(samples=2, seed=4), decay=0.5)
    state = step.init(params)
    assert state.kind == "mc" and ff.metadata(state)["kind"] == "mc"
    one, again = step(params, batch, state), step(params, batch, state)
    assert one.kind == "mc"
    for n in one.ema:
        assert torch.equal(one.ema[n], again.ema[n]), "same (params, batch, state) must give the same state"
    # step t draws from step_generator(seed, t): the first step is fisher(..., generator=that)
    expected = ff.fisher(loss, params, batch, kind=ff.MC(samples=2, generator=step_generator(4, 0)))
    for n in one.ema:
        assert torch.allclose(ff.estimate(one)[n], expected[n], rtol=1e-12, atol=0)
    two = step(params, batch, one)
    fresh = ff.fisher(loss, params, batch, kind=ff.MC(samples=2, generator=step_generator(4, 1)))
    assert any(not torch.allclose(fresh[n], expected[n]) for n in fresh), "step 1 must draw anew"
    for n in two.ema:
        assert torch.allclose(two.ema[n], 0.5 * one.ema[n] + 0.5 * fresh[n], rtol=1e-12, atol=0)


def test_step_with_exact_kind_equals_fisher() -> None:
    model, batch = _mlp()
    loss, params = ff.losses.classification(model), _params(model)
    step = ff.make_fisher_step(loss, kind=ff.Exact(), decay=0.0)
    state = step(params, batch, step.init(params))
    assert state.kind == "exact"
    for name, value in ff.fisher(loss, params, batch, kind="exact").items():
        assert torch.allclose(ff.estimate(state)[name], value, rtol=1e-12, atol=0)


def test_state_of_another_kind_is_refused_and_left_intact() -> None:
    model, batch = _mlp()
    loss, params = ff.losses.classification(model), _params(model)
    empirical = ff.make_fisher_step(loss, decay=0.5)
    state = empirical(params, batch, empirical.init(params))
    before = optree.tree_map(torch.clone, state.ema)
    mc = ff.make_fisher_step(loss, kind=ff.MC(seed=0), decay=0.5)
    model.calls = 0
    with pytest.raises(ff.SpecError, match="'empirical' Fisher.*'mc'"):
        mc(params, batch, state)
    assert model.calls == 0
    assert all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(state.ema), optree.tree_leaves(before)))
    assert ff.init_state(params, spec=ff.Whole(), kind="exact").kind == "exact"
    with pytest.raises(ValueError, match="kind must be one of 'empirical', 'mc', 'exact'"):
        ff.init_state(params, spec=ff.Whole(), kind="true")


# --- bad inputs: clear errors before any model call -----------------------------------------------


def _custom_loss(model: nn.Module) -> Any:
    return ff.losses.custom(model, lambda pred, y: F.cross_entropy(pred.unsqueeze(0), y.unsqueeze(0)))


BAD = [
    ({"kind": "true"}, ValueError, "kind must be one of 'empirical', 'mc', 'exact' or a kind value, got 'true'"),
    ({"kind": None}, TypeError, "kind must be fisherfunc.Empirical(), MC(...), Exact(...) or a name"),
    ({"kind": "mc"}, ValueError, "kind='mc' draws labels at random: pass kind=fisherfunc.MC(samples=k, seed=<int>)"),
]

# A kind value is validated when it is built, before any entry point sees it.
BAD_KINDS = [
    (lambda: ff.MC(), ValueError, "give it seed=<int> or generator=torch.Generator()"),
    (lambda: ff.MC(seed=1, generator=torch.Generator()), ValueError, "either generator= or seed="),
    (lambda: ff.MC(seed=1.5), TypeError, "MC(seed=...) must be an int"),
    (lambda: ff.MC(seed=True), TypeError, "MC(seed=...) must be an int"),
    (lambda: ff.MC(generator=3), TypeError, "MC(generator=...) must be a torch.Generator"),
    (lambda: ff.MC(seed=0, samples=0), ValueError, "MC(samples=...) must be a positive int, got 0"),
    (lambda: ff.MC(seed=0, samples=-2), ValueError, "MC(samples=...) must be a positive int"),
    (lambda: ff.MC(seed=0, samples=2.0), ValueError, "MC(samples=...) must be a positive int"),
    (lambda: ff.MC(seed=0, samples=True), ValueError, "MC(samples=...) must be a positive int"),
    (lambda: ff.Exact(max_classes=0), ValueError, "Exact(max_classes=...) must be a positive int"),
    (lambda: ff.MC(4, seed=0), TypeError, "positional"),  # options are keyword-only
]


@pytest.mark.parametrize(("build", "error", "match"), BAD_KINDS, ids=[str(i) for i in range(len(BAD_KINDS))])
def test_bad_kind_values_are_refused_when_built(build: Callable, error: type, match: str) -> None:
    with pytest.raises(error, match=re.escape(match)):
        build()


def _entry_points() -> list[Callable[..., Any]]:
    def via_step(loss: Any, params: Any, batch: Any, **options: Any) -> Any:
        step = ff.make_fisher_step(loss, **options)
        return step(params, batch, step.init(params))

    return [ff.fisher, ff.per_sample_fisher, ff.accumulate, via_step]


@pytest.mark.parametrize("entry", _entry_points(), ids=["fisher", "per_sample_fisher", "accumulate", "step"])
@pytest.mark.parametrize(("options", "error", "match"), BAD, ids=[repr(b[0]) for b in BAD])
def test_bad_kind_options(entry: Callable, options: dict, error: type, match: str) -> None:
    model, batch = _mlp(torch.float32)
    with pytest.raises(error, match=re.escape(match)):
        entry(ff.losses.classification(model), _params(model), batch, **options)
    assert model.calls == 0


@pytest.mark.parametrize("entry", _entry_points(), ids=["fisher", "per_sample_fisher", "accumulate", "step"])
@pytest.mark.parametrize("kind", ["mc", "exact"])
def test_kinds_need_a_known_distribution(entry: Callable, kind: str) -> None:
    model, batch = _mlp(torch.float32)
    options = {"kind": ff.MC(seed=0) if kind == "mc" else kind}
    with pytest.raises(ValueError, match=r"no known output distribution \(fisherfunc.losses.custom\)"):
        entry(_custom_loss(model), _params(model), batch, **options)

    def plain(params: Any, sample: Any) -> tuple[Tensor, int]:
        return F.cross_entropy(torch.func.functional_call(model, params, (sample[0],)), sample[1]), 1

    with pytest.raises(ValueError, match="a plain callable"):
        entry(plain, _params(model), batch, spec=ff.Whole(), **options)
    assert model.calls == 0
    ff.fisher(_custom_loss(model), _params(model), batch)  # the empirical kind takes any loss


@pytest.mark.parametrize("entry", _entry_points(), ids=["fisher", "per_sample_fisher", "accumulate", "step"])
def test_exact_causal_lm_is_refused_with_the_reason(entry: Callable) -> None:
    model, batch = _lm(torch.float32)
    with pytest.raises(ValueError, match=r"not available for a causal LM.*T·V backward passes.*kind=fisherfunc.MC"):
        entry(ff.losses.causal_lm(model, inputs=0, mask=1), _params(model), batch, kind="exact")
    assert model.calls == 0


@pytest.mark.parametrize("what", ["classification", "regression"])
def test_too_many_classes_suggests_mc(what: str) -> None:
    model, batch = _mlp(torch.float32, out=4)
    if what == "regression":
        loss: Any = ff.losses.regression(model)
        batch = (batch[0], torch.zeros(batch[0].shape[0], 4))
    else:
        loss = ff.losses.classification(model)
    with pytest.raises(ValueError, match=r"enumerate 4 .*max_classes=3; use kind=fisherfunc.MC"):
        ff.fisher(loss, _params(model), batch, kind=ff.Exact(max_classes=3), path="direct")
    assert model.calls == 1, "raised at the first (vectorised) forward, before any backward pass"
    ff.fisher(loss, _params(model), batch, kind=ff.Exact(max_classes=4))  # the limit is inclusive


def test_fisher_kinds_are_frozen_values_with_names() -> None:
    assert [k.name for k in (ff.Empirical(), ff.MC(seed=0), ff.Exact())] == ["empirical", "mc", "exact"]
    assert all(isinstance(k, FisherKind) for k in (ff.Empirical(), ff.MC(seed=0), ff.Exact()))
    assert ff.FisherKind is FisherKind
    assert ff.MC(samples=2, seed=3) == ff.MC(samples=2, seed=3) and ff.Exact() == ff.Exact(max_classes=1024)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ff.MC(seed=0).samples = 4  # type: ignore[misc]
    import fisherfunc._engine.kinds as kinds

    assert kinds.__doc__ and all(hasattr(kinds, name) for name in kinds.__all__)
