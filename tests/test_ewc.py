"""``fisherfunc.ewc``: EWC penalties per task and online, checked against hand-written float64 formulas.

Values are float64 and compared with ``RTOL = 1e-12`` (relative; norm-wise per parameter for
gradients). The hand formulas spell out each rule's groups with reshapes and loops, never through
the library's own broadcast. Property tests draw model cases and specs from
:mod:`fisherfunc.testing.strategies` (derandomized, no database).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.func import functional_call, grad, vmap

import fisherfunc as ff
import fisherfunc.ewc as ewc
from fisherfunc._spec.resolve import resolve_spec
from fisherfunc.testing import cases
from fisherfunc.testing import strategies as fst

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-12
PROPERTY = settings(
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _close(actual: Tensor | float, expected: Tensor | float, rtol: float = RTOL) -> None:
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    scale = expected.abs().max() if expected.numel() else torch.tensor(0.0)
    assert (actual - expected).abs().max() <= rtol * scale, (actual, expected)


def _tree_close(actual: Any, expected: Any, rtol: float = RTOL) -> None:
    a, e = optree.tree_leaves(actual), optree.tree_leaves(expected)
    assert len(a) == len(e)
    for x, y in zip(a, e):
        assert x.shape == y.shape
        assert (x - y).norm() <= rtol * y.norm(), (x, y)


def _positive_like(tree: Any, seed: int, scale: float = 1.0) -> Any:
    g = torch.Generator().manual_seed(seed)
    return optree.tree_map(lambda t: scale * torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.01, tree)


def _shifted(tree: Any, seed: int, scale: float = 0.3) -> Any:
    g = torch.Generator().manual_seed(seed)
    return optree.tree_map(lambda t: t.detach() + scale * torch.randn(t.shape, generator=g, dtype=t.dtype), tree)


def _mlp() -> tuple[cases.Case, dict[str, Tensor]]:
    case = cases.case("mlp", seed=1, hidden=6)
    return case, {k: v.detach() for k, v in case.params.items()}


# --- the penalty equals the hand-written formula ----------------------------------------------------


def test_elementwise_penalty_is_the_formula_and_skips_none() -> None:
    _, anchor = _mlp()
    F = _positive_like(anchor, 0)
    F["0.bias"] = None  # not regularised
    theta = _shifted(anchor, 1)
    pen = ewc.penalty(anchor, F, strength=2.5)
    expected = sum(0.5 * 2.5 * (F[k] * (theta[k] - anchor[k]) ** 2).sum().item() for k in anchor if F[k] is not None)
    _close(pen(theta), expected)
    assert pen.fisher["0.bias"] is None and pen.constant == 0.0
    assert all(torch.equal(pen.anchor[k], anchor[k]) for k in anchor if F[k] is not None)


def _channel_formula(groups: Tensor, diff: Tensor, density: bool) -> float:
    """``Σ_o w_o Σ_rest diff[o, ...]²`` for ``Channel(0)``, ``w_o = F_o / n_o`` (density) or ``F_o``."""
    per_row = diff.reshape(diff.shape[0], -1)
    n = per_row.shape[1]
    return sum((groups[o] / (n if density else 1)) * (per_row[o] ** 2).sum() for o in range(diff.shape[0])).item()


@pytest.mark.parametrize("density", [True, False])
def test_channel_group_penalty_is_the_formula(density: bool) -> None:
    case, anchor = _mlp()
    F = ff.fisher(case.loss, anchor, case.batch, spec=case.spec, kind="exact")  # Channel(0) everywhere
    theta = _shifted(anchor, 2)
    pen = ewc.penalty(anchor, F, spec=case.spec, strength=3.0, density=density)
    expected = 0.5 * 3.0 * sum(_channel_formula(F[k], theta[k] - anchor[k], density) for k in anchor)
    _close(pen(theta), expected)


def _heads_formula(groups: Tensor, diff: Tensor, rule: ff.Rule, density: bool) -> float:
    """Each head's rows (axis 0, ``parts`` blocks of ``heads`` blocks) or columns (axis 1), written out."""
    if isinstance(rule, ff.Channel):
        return _channel_formula(groups, diff, density)
    assert isinstance(rule, ff.Heads)
    if rule.axis == 1:
        diff = diff.t()
    rows = diff.reshape(rule.parts, rule.num_heads, -1)  # [parts, heads, entries of one head's block]
    total = 0.0
    for p in range(rule.parts):
        for h in range(rule.num_heads):
            block = rows[p, h]
            value = groups.reshape(rule.parts, rule.num_heads)[p, h]
            total += ((value / (block.numel() if density else 1)) * (block**2).sum()).item()
    return total


@pytest.mark.parametrize("density", [True, False])
def test_head_group_penalty_is_the_formula(density: bool) -> None:
    case = cases.case("self_attention", seed=3)  # fused in-projection Heads(2, parts=3), out_proj Heads(2, axis=1)
    anchor = {k: v.detach() for k, v in case.params.items()}
    assert case.spec["attn.in_proj_weight"] == ff.Heads(2, axis=0, parts=3)
    assert case.spec["attn.out_proj.weight"] == ff.Heads(2, axis=1)
    F = ff.fisher(case.loss, anchor, case.batch, spec=case.spec)
    theta = _shifted(anchor, 4)
    pen = ewc.penalty(anchor, F, spec=case.spec, strength=0.7, density=density)
    expected = 0.5 * 0.7 * sum(_heads_formula(F[k], theta[k] - anchor[k], case.spec[k], density) for k in anchor)
    _close(pen(theta), expected)


def test_two_tasks_sum_their_penalties() -> None:
    case, params = _mlp()
    anchor_1, anchor_2 = _shifted(params, 5), _shifted(params, 6)
    F1 = _positive_like(params, 7)  # elementwise
    F2 = ff.fisher(case.loss, anchor_2, case.batch, spec=case.spec, kind="exact")  # channels
    F2_entries = {k: (F2[k] / anchor_2[k][0].numel()).reshape(-1, *[1] * (anchor_2[k].dim() - 1)) for k in F2}
    theta = _shifted(params, 8)
    lam = 4.0
    pen = ewc.per_task([(anchor_1, F1, None), (anchor_2, F2)], strength=lam, spec=case.spec)  # a triple's own spec
    expected = sum(
        0.5 * lam * (F[k] * (theta[k] - a[k]) ** 2).sum().item()
        for a, F in ((anchor_1, F1), (anchor_2, F2_entries))
        for k in params
    )
    _close(pen(theta), expected)
    assert pen.constant > 0  # two anchors: the folded quadratic keeps its constant
    gradient = grad(pen)(theta)
    for k in params:
        g = lam * (F1[k] * (theta[k] - anchor_1[k]) + F2_entries[k] * (theta[k] - anchor_2[k]))
        _close(gradient[k], g)


def test_per_task_with_equal_anchors_keeps_the_anchor_exactly() -> None:
    _, anchor = _mlp()
    pen = ewc.per_task([(anchor, _positive_like(anchor, 0)), (anchor, _positive_like(anchor, 1))], strength=1.0)
    assert all(torch.equal(pen.anchor[k], anchor[k]) for k in anchor)
    assert pen.constant == 0.0 and pen(anchor).item() == 0.0


def test_a_parameter_skipped_by_one_task_takes_the_other_tasks_anchor() -> None:
    _, params = _mlp()
    a1, a2 = _shifted(params, 1), _shifted(params, 2)
    F1, F2 = _positive_like(params, 3), _positive_like(params, 4)
    F1["2.weight"] = None
    pen = ewc.per_task([(a1, F1), (a2, F2)], strength=1.0)
    assert torch.equal(pen.anchor["2.weight"], a2["2.weight"]) and torch.equal(pen.fisher["2.weight"], F2["2.weight"])


# --- online: a FisherState, bias-corrected, and fold ------------------------------------------------


def test_a_running_state_gives_its_bias_corrected_estimate() -> None:
    case, anchor = _mlp()
    step = ff.make_fisher_step(case.loss, spec=case.spec, decay=0.8, kind="exact")
    state = step.init(anchor)
    for seed in range(3):
        state = step(_shifted(anchor, seed, 0.1), case.batch, state)  # three batches at drifting params
    estimate = ff.estimate(state)
    theta = _shifted(anchor, 9)
    pen = ewc.penalty(anchor, state, strength=5.0)
    expected = 0.5 * 5.0 * sum(_channel_formula(estimate[k], theta[k] - anchor[k], True) for k in anchor)
    _close(pen(theta), expected)
    raw = 0.5 * 5.0 * sum(_channel_formula(state.ema[k], theta[k] - anchor[k], True) for k in anchor)
    assert pen(theta).item() == pytest.approx(raw / (1 - 0.8**3), rel=1e-12)  # not the raw EMA
    # the state's own spec is used; a spec= that agrees is accepted, one that does not is refused
    _close(ewc.penalty(anchor, state, spec=case.spec, strength=5.0)(theta), expected)
    with pytest.raises(ff.SpecError, match=r"^parameter '0\.bias' has Channel.*in the FisherState but Whole"):
        ewc.penalty(anchor, state, spec=ff.Whole(), strength=5.0)


def test_online_after_one_task_is_per_task_ewc() -> None:
    case, anchor = _mlp()
    F = ff.fisher(case.loss, anchor, case.batch, spec=case.spec, kind="exact")
    running = ewc.fold(ff.init_state(anchor, spec=case.spec, decay=0.95, kind="exact"), F)
    theta = _shifted(anchor, 3)
    online = ewc.penalty(anchor, running, strength=2.0)(theta)
    _close(online, ewc.penalty(anchor, F, spec=case.spec, strength=2.0)(theta))


def test_online_matches_progress_and_compress_with_rescaled_strength() -> None:
    # P&C: F*_t = γ F*_{t−1} + F_t, Ω = ½ λ_PC Σ F* (θ − θ*_t)²; ours with λ = λ_PC (1 − γ^t) / (1 − γ).
    _, params = _mlp()
    gamma, lam_pc = 0.7, 3.0
    fishers = [_positive_like(params, s) for s in range(3)]
    running = ff.init_state(params, spec=ff.Elementwise(), decay=gamma)
    star = {k: torch.zeros_like(v) for k, v in params.items()}
    for F in fishers:
        running = ewc.fold(running, F, tokens=10.0, samples=10)
        star = {k: gamma * star[k] + F[k] for k in params}
    assert running.step == 3 and running.tokens == 30.0 and running.samples == 30
    anchor, theta = _shifted(params, 7), _shifted(params, 8)
    t = running.step
    pen = ewc.penalty(anchor, running, strength=lam_pc * (1 - gamma**t) / (1 - gamma))
    expected = sum(0.5 * lam_pc * (star[k] * (theta[k] - anchor[k]) ** 2).sum().item() for k in params)
    _close(pen(theta), expected)


def test_fold_is_the_states_ema_and_takes_states_too() -> None:
    case, anchor = _mlp()
    F1, F2 = (ff.fisher(case.loss, _shifted(anchor, s, 0.1), case.batch, spec=case.spec) for s in (1, 2))
    running = ff.init_state(anchor, spec=case.spec, decay=0.5)
    before = optree.tree_map(torch.clone, running.ema)
    folded = ewc.fold(ewc.fold(running, F1), F2)
    for k in anchor:
        _close(ff.estimate(folded)[k], (0.5 * F1[k] + F2[k]) / 1.5)
    assert all(torch.equal(running.ema[k], before[k]) for k in anchor) and running.step == 0  # untouched
    step = ff.make_fisher_step(case.loss, spec=case.spec, decay=0.0)
    task_state = step(anchor, case.batch, step.init(anchor))
    again = ewc.fold(running, task_state)
    assert again.tokens == task_state.tokens and again.samples == task_state.samples
    _tree_close(ff.estimate(again), ff.estimate(task_state))


def test_fold_refuses_other_groups_rules_and_kinds() -> None:
    case, anchor = _mlp()
    running = ff.init_state(anchor, spec=case.spec, decay=0.5)
    bad = {k: torch.ones(2) for k in anchor}
    with pytest.raises(ff.SpecError, match=r"parameter '0\.bias': the running state's groups have shape \(6,\)"):
        ewc.fold(running, bad)
    missing = {k: torch.ones(v.shape[0], dtype=torch.float64) for k, v in anchor.items() if k != "2.bias"}
    with pytest.raises(ff.SpecError, match=r"parameter '2\.bias'.*None: absent or skipped"):
        ewc.fold(running, missing)
    other = ff.make_fisher_step(case.loss, spec=ff.Whole(), decay=0.0)
    with pytest.raises(ff.SpecError, match=r"parameter '0\.bias': the running state has Channel.*Whole"):
        ewc.fold(running, other(anchor, case.batch, other.init(anchor)))
    exact = ff.make_fisher_step(case.loss, spec=case.spec, decay=0.0, kind="exact")
    with pytest.raises(ff.SpecError, match="holds a 'empirical' Fisher, the task's is 'exact'"):
        ewc.fold(running, exact(anchor, case.batch, exact.init(anchor)))
    with pytest.raises(TypeError, match="running must be a FisherState"):
        ewc.fold({"w": torch.ones(1)}, {"w": torch.ones(1)})


# --- properties --------------------------------------------------------------------------------------


@st.composite
def _setups(draw: st.DrawFn) -> tuple[Any, Any, Any, Any, Any]:
    """A model's params as anchor, a Fisher (elementwise tree, or a group tree and a spec), a θ."""
    case = draw(fst.model_cases(), label="case")
    anchor = {k: v.detach() for k, v in case.params.items()}
    seed = draw(fst.seeds(), label="seed")
    exponent = draw(st.integers(-8, 8), label="Fisher scale 10^")
    theta = _shifted(anchor, seed + 1, draw(st.sampled_from([1e-6, 1e-2, 1.0]), label="distance"))
    if draw(st.booleans(), label="group Fisher"):
        spec = draw(fst.specs(anchor), label="spec")
        r = resolve_spec(spec, anchor)
        g = torch.Generator().manual_seed(seed)
        values = [torch.rand(r.groups_of(i), generator=g, dtype=torch.float64) * 10.0**exponent for i in r.active]
        return anchor, r.unflatten_groups(values), spec, theta, case
    return anchor, _positive_like(anchor, seed, 10.0**exponent), None, theta, case


def _expected_gradient(pen: ewc.Penalty, theta: Any, anchor: Any, lam: float) -> dict[str, Tensor]:
    F = pen.fisher
    return {k: lam * F[k] * (theta[k] - anchor[k]) if F[k] is not None else torch.zeros_like(theta[k]) for k in theta}


@PROPERTY
@given(setup=_setups(), lam=st.floats(1e-3, 1e3))
def test_gradient_is_lambda_fisher_times_displacement(setup: Any, lam: float) -> None:
    anchor, F, spec, theta, _ = setup
    pen = ewc.penalty(anchor, F, spec=spec, strength=lam)
    if spec is None:
        _tree_close({k: v for k, v in pen.fisher.items() if v is not None}, F)
    else:  # each group's entries share its density: Σ_g w = F_g and n_g Σ_g w² = (Σ_g w)², by the rule's own sum
        resolved = resolve_spec(spec, anchor)
        for rule, w, f in zip(resolved.rules, resolved.leaves_of(pen.fisher), resolved.leaves_of(F)):
            if w is None:
                assert f is None
                continue
            n = rule.reduce(torch.ones_like(w))
            _close(rule.reduce(w), torch.where(n > 0, f, 0.0))  # an empty group (a bucket no row maps to) has none
            _close(n * rule.reduce(w * w), rule.reduce(w) ** 2)
    expected = _expected_gradient(pen, theta, anchor, lam)
    _tree_close(grad(pen)(theta), expected)  # torch.func on functional params
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    pen(leaves).backward()  # autograd on ordinary leaves
    _tree_close({k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()}, expected)


@PROPERTY
@given(setup=_setups(), lam=st.floats(1e-3, 1e3), factor=st.floats(0.0, 1e3))
def test_zero_at_the_anchor_non_negative_and_linear_in_strength(setup: Any, lam: float, factor: float) -> None:
    anchor, F, spec, theta, _ = setup
    pen = ewc.penalty(anchor, F, spec=spec, strength=lam)
    assert pen(anchor).item() == 0.0
    value = pen(theta)
    assert value.item() >= 0.0 and value.shape == () and value.dtype == torch.float64
    scaled = ewc.penalty(anchor, F, spec=spec, strength=lam * factor)(theta)
    assert scaled.item() == pytest.approx(factor * value.item(), rel=RTOL, abs=1e-300)  # below: subnormals
    replaced = dataclasses.replace(pen, strength=lam * factor)(theta)  # rescaled without rebuilding
    assert replaced.item() == pytest.approx(factor * value.item(), rel=RTOL, abs=1e-300)


# --- inside torch.func, and in an optimizer loop -----------------------------------------------------


def test_inside_grad_and_vmap_over_perturbations() -> None:
    case, anchor = _mlp()
    F = ff.fisher(case.loss, anchor, case.batch, spec=case.spec, kind="exact")
    pen = ewc.penalty(anchor, F, spec=case.spec, strength=10.0)
    x, y = case.batch

    def objective(p: dict[str, Tensor]) -> Tensor:
        logits = functional_call(case.model, p, (x,))
        return torch.nn.functional.cross_entropy(logits, y) + pen(p)

    theta = _shifted(anchor, 3)
    plain = grad(lambda p: torch.nn.functional.cross_entropy(functional_call(case.model, p, (x,)), y))(theta)
    both = grad(objective)(theta)
    for k in anchor:
        _close(both[k] - plain[k], 10.0 * pen.fisher[k] * (theta[k] - anchor[k]))

    g = torch.Generator().manual_seed(0)
    stacked = {k: v + 0.1 * torch.randn((5, *v.shape), generator=g, dtype=v.dtype) for k, v in anchor.items()}
    batched = vmap(pen)(stacked)
    assert batched.shape == (5,)
    for i in range(5):
        _close(batched[i], pen({k: v[i] for k, v in stacked.items()}))
    grads = vmap(grad(pen))(stacked)
    for k in anchor:
        _close(grads[k], 10.0 * pen.fisher[k] * (stacked[k] - anchor[k]))


def test_sgd_on_the_penalty_alone_moves_towards_the_anchor() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    F = _positive_like(anchor, 1)
    pen = ewc.penalty(anchor, F, strength=2.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    distances = []
    for _ in range(5):
        opt.zero_grad()
        pen(dict(model.named_parameters())).backward()
        opt.step()
        distances.append(sum(((v.detach() - anchor[k]) ** 2).sum().item() for k, v in model.named_parameters()))
    assert all(b < a for a, b in zip(distances, distances[1:]))
    for k, v in model.named_parameters():  # θ_5 − θ* = (1 − lr λ F)^5 (θ_0 − θ*), entry by entry
        _close(v.detach() - anchor[k], (1 - 0.1 * 2.0 * F[k]) ** 5 * (start[k] - anchor[k]))


def test_anchor_and_fisher_are_copied_and_inputs_untouched() -> None:
    model = torch.nn.Linear(3, 2)
    params = dict(model.named_parameters())  # live, requires_grad: the penalty must not follow them
    F = {k: torch.ones_like(v) for k, v in params.items()}
    pen = ewc.penalty(params, F, strength=1.0)
    frozen = {k: v.detach().clone() for k, v in params.items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    F["weight"].mul_(100.0)
    assert pen(frozen).item() == 0.0
    assert pen(params).item() == pytest.approx(0.5 * 6.0)
    assert not any(w.requires_grad for w in pen.fisher.values()) and not any(
        c.requires_grad for c in pen.anchor.values()
    )


def test_params_by_name_extra_parameters_and_float32() -> None:
    _, anchor64 = _mlp()
    anchor = {k: v.float() for k, v in anchor64.items()}
    pen = ewc.penalty(anchor, _positive_like(anchor, 0), strength=1.0)
    assert all(w.dtype == torch.float32 for w in pen.fisher.values())
    theta = _shifted(anchor, 1)
    value = pen(theta)
    assert value.dtype == torch.float32
    # another container type, and a new task's head the anchor never had: matched by name, not penalised
    other = collections.OrderedDict(reversed(list(theta.items())))
    other["head_b.weight"] = torch.randn(3, 3)
    assert pen(other).item() == value.item()


# --- errors, at construction ---------------------------------------------------------------------------


def test_mismatches_are_refused_when_the_penalty_is_built() -> None:
    case, anchor = _mlp()
    F = _positive_like(anchor, 0)
    with pytest.raises(ff.SpecError, match=r"no entry for parameter '2\.bias' \(give it None"):
        ewc.penalty(anchor, {k: v for k, v in F.items() if k != "2.bias"}, strength=1.0)
    with pytest.raises(ff.SpecError, match=r"Fisher entry 'extra' matches no parameter of the anchor"):
        ewc.penalty(anchor, {**F, "extra": torch.ones(2)}, strength=1.0)
    with pytest.raises(ff.SpecError, match=r"Fisher of parameter '0\.weight' has shape \(6,\).*\(6, 4\).*spec="):
        ewc.penalty(anchor, ff.fisher(case.loss, anchor, case.batch, spec=case.spec), strength=1.0)
    with pytest.raises(ff.SpecError, match=r"'0\.weight' should have shape \(6,\), got \(5,\)"):
        ewc.penalty(anchor, {**{k: torch.ones(v.shape[0]) for k, v in anchor.items()}, "0.weight": torch.ones(5)},
                    spec=case.spec, strength=1.0)  # fmt: skip
    small = {**anchor, "0.weight": anchor["0.weight"][:, :3]}
    with pytest.raises(ff.SpecError, match=r"task 1: anchor parameter '0\.weight' has shape \(6, 3\), task 0's"):
        ewc.per_task([(anchor, F), (small, F)], strength=1.0)
    with pytest.raises(ff.SpecError, match=r"task 1: the anchor has other parameters than task 0's.*'2\.bias'"):
        ewc.per_task([(anchor, F), ({k: v for k, v in anchor.items() if k != "2.bias"}, F)], strength=1.0)
    step = ff.make_fisher_step(case.loss, spec=case.spec, decay=0.0)
    state = step(anchor, case.batch, step.init(anchor))
    with pytest.raises(
        ff.SpecError, match=r"^the FisherState was made for other parameters: it has '2\.bias', which the anchor lacks"
    ):
        ewc.penalty({k: v for k, v in anchor.items() if k != "2.bias"}, state, strength=1.0)
    with pytest.raises(ValueError, match="no step yet"):
        ewc.penalty(anchor, step.init(anchor), strength=1.0)
    with pytest.raises(ValueError, match=r"the Fisher of parameter '0\.bias' has negative or non-finite"):
        ewc.penalty(anchor, {**F, "0.bias": -F["0.bias"]}, strength=1.0)
    with pytest.raises(ValueError, match=r"the Fisher of parameter '0\.bias' has negative or non-finite"):
        ewc.penalty(anchor, {**F, "0.bias": F["0.bias"] * math.nan}, strength=1.0)
    with pytest.raises(ValueError, match="every parameter alone"):
        ewc.penalty(anchor, {k: None for k in anchor}, strength=1.0)
    for bad in (-1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="strength must be a finite number >= 0"):
            ewc.penalty(anchor, F, strength=bad)
        with pytest.raises(ValueError, match="strength must be a finite number >= 0"):
            dataclasses.replace(ewc.penalty(anchor, F, strength=1.0), strength=bad)
    with pytest.raises(ValueError, match="at least one"):
        ewc.per_task([], strength=1.0)
    with pytest.raises(ff.SpecError, match=r"anchor entry 'n' is a torch.int64 tensor"):
        ewc.penalty({"n": torch.ones(2, dtype=torch.long)}, {"n": torch.ones(2)}, strength=1.0)


def test_params_that_do_not_fit_are_named_when_called() -> None:
    _, anchor = _mlp()
    pen = ewc.penalty(anchor, _positive_like(anchor, 0), strength=1.0)
    with pytest.raises(ff.SpecError, match=r"params lack '2\.bias', which the penalty is anchored on"):
        pen({k: v for k, v in anchor.items() if k != "2.bias"})
    with pytest.raises(
        ff.SpecError, match=r"parameter '0\.bias' has shape \(5,\), but the penalty was built for \(6,\)"
    ):
        pen({**anchor, "0.bias": torch.zeros(5, dtype=torch.float64)})


# --- the example and the docs --------------------------------------------------------------------------


def _example() -> Any:
    path = ROOT / "examples" / "ewc_digits.py"
    spec = importlib.util.spec_from_file_location("ewc_digits", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ewc_digits", module)
    spec.loader.exec_module(module)
    return module


def test_digits_example_table_and_what_the_docs_claim(capsys: pytest.CaptureFixture[str]) -> None:
    # seed 0 of the documented run, at the strengths its validation sweep chose (docs/ewc.md)
    pytest.importorskip("sklearn")
    example = _example()
    threads = torch.get_num_threads()
    table = example.main(seeds=(0,), strengths=(10**-0.5, 10**3.5), refine=False)
    assert torch.get_num_threads() == threads  # main restores the thread setting
    out = capsys.readouterr().out
    for method in example.METHODS:
        row = rf"\| {re.escape(method)} \| [^|]+ \| 0\.\d{{3}} ± 0\.000 \| 0\.\d{{3}} ± 0\.000 \|"
        assert re.search(row, out), method
    # what the docs claim: without a regulariser the shared head forgets A completely; every
    # penalty keeps most of A at a cost of a few points on B; the diagonal Fisher keeps the most,
    # clearly more than the same pull on every weight (L2)
    A = {method: row["A"][0] for method, row in table.items() if method != "A before B"}
    B = {method: row["B"][0] for method, row in table.items() if method != "A before B"}
    assert A["none"] < 0.05 and B["none"] > 0.9
    for method in ("L2 to θ*_A", "EWC, diagonal", "EWC, channels", "online EWC"):
        assert A[method] > 0.8 and B[method] > 0.85, method
    assert A["EWC, diagonal"] == max(A.values()) and A["EWC, diagonal"] > A["L2 to θ*_A"] + 0.03
    assert B["EWC, diagonal"] > B["L2 to θ*_A"] - 0.02


def test_docs_table_is_the_examples_output() -> None:
    text = (ROOT / "docs" / "ewc.md").read_text()
    assert "python examples/ewc_digits.py" in text
    example = _example()
    for method in example.METHODS:
        assert re.search(rf"^\| {re.escape(method)} \| ", text, flags=re.M), method


def test_docs_code_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "ewc.md").read_text(), flags=re.S)
    assert blocks
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(block, namespace)
