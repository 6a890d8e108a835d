"""``merge``: accumulators of the parts add up to the accumulator of the whole; states merge token-weighted.

The property tests draw float64 model cases (every family, padded token batches included, so
parts have different token counts) and specs from :mod:`fisherfunc.testing.strategies`, split the
batch at a drawn point and compare with ``RTOL = 1e-12`` (norm-wise per parameter, as the
invariant checks do).
"""

from __future__ import annotations

from typing import Any

import optree
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import fisherfunc as ff
from fisherfunc._engine.batches import batch_size, take
from fisherfunc.storage import UNIT_ROUNDOFF
from fisherfunc.testing import cases
from fisherfunc.testing import invariants as inv
from fisherfunc.testing import strategies as fst

RTOL = 1e-12
PROPERTY = settings(
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _case_and_split(data: st.DataObject, parts: int) -> tuple[fst.Case, object, list[object]]:
    case = data.draw(fst.model_cases(batch_size=st.integers(parts, 5)), label="case")
    spec = data.draw(st.one_of(st.none(), fst.specs(case.params)), label="spec")
    size = batch_size(case.batch)
    cuts = sorted(data.draw(st.sets(st.integers(1, size - 1), min_size=parts - 1, max_size=parts - 1), label="cuts"))
    bounds = [0, *cuts, size]
    pieces = [take(case.batch, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    return case, spec, pieces


@PROPERTY
@given(data=st.data())
def test_merge_of_two_halves_is_the_whole(data: st.DataObject) -> None:
    case, spec, (first, second) = _case_and_split(data, 2)
    a = ff.accumulate(case.loss, case.params, first, spec=spec)
    b = ff.accumulate(case.loss, case.params, second, spec=spec)
    whole = ff.accumulate(case.loss, case.params, case.batch, spec=spec)
    merged = ff.merge(a, b)
    assert (merged.tokens, merged.samples, merged.skipped) == (whole.tokens, whole.samples, 0)
    inv.assert_fisher_close(merged.sums, whole.sums, rtol=RTOL, what="merged sums")
    fisher_of_merged = optree.tree_map(lambda s: s / merged.tokens, merged.sums)
    inv.assert_fisher_close(fisher_of_merged, ff.fisher(case.loss, case.params, case.batch, spec=spec), rtol=RTOL)
    # Merging is symmetric, and leaves its inputs alone.
    inv.assert_fisher_close(ff.merge(b, a).sums, merged.sums, rtol=RTOL, what="merge(b, a)")
    inv.assert_fisher_close(a.sums, ff.accumulate(case.loss, case.params, first, spec=spec).sums, rtol=0.0)


@settings(PROPERTY, max_examples=15)
@given(data=st.data())
def test_merge_of_three_parts_in_any_grouping(data: st.DataObject) -> None:
    case, spec, pieces = _case_and_split(data, 3)
    a, b, c = (ff.accumulate(case.loss, case.params, p, spec=spec) for p in pieces)
    whole = ff.accumulate(case.loss, case.params, case.batch, spec=spec)
    for merged in (ff.merge(a, b, c), ff.merge(ff.merge(a, b), c), ff.merge(a, ff.merge(c, b))):
        assert (merged.tokens, merged.samples) == (whole.tokens, whole.samples)
        inv.assert_fisher_close(merged.sums, whole.sums, rtol=RTOL, what="merged sums")


@PROPERTY
@given(data=st.data(), decay=st.sampled_from([0.0, 0.5, 0.99]))
def test_merge_of_one_step_states_is_the_state_of_the_whole(data: st.DataObject, decay: float) -> None:
    case, spec, (first, second) = _case_and_split(data, 2)
    fisher_step = ff.make_fisher_step(case.loss, spec=spec, decay=decay)
    fresh = fisher_step.init(case.params)
    merged = ff.merge(fisher_step(case.params, first, fresh), fisher_step(case.params, second, fresh))
    whole = fisher_step(case.params, case.batch, fresh)
    assert (merged.step, merged.tokens, merged.samples, merged.spec) == (1, whole.tokens, whole.samples, whole.spec)
    inv.assert_fisher_close(ff.estimate(merged), ff.estimate(whole), rtol=RTOL, what="merged estimate")
    inv.assert_fisher_close(merged.ema, whole.ema, rtol=RTOL, what="merged EMA")


# --- states over several steps ----------------------------------------------------------------------


def _mlp() -> tuple[Any, dict[str, Tensor], list[tuple[Tensor, Tensor]]]:
    """Linear(4, 6) → Tanh → Linear(6, 3), float64, and four batches of 8."""
    case = cases.case("mlp", batch=(8, 8, 8, 8))
    params = {k: v.detach() for k, v in case.params.items()}
    return case.loss, params, list(case.batches)


def test_lock_step_workers_with_equal_shards_merge_exactly() -> None:
    # One label per sample and equal-size shards: each step's tokens split 50/50, so the token-
    # weighted mean of the workers' EMAs is the EMA of the whole batches.
    loss, params, batches = _mlp()
    fisher_step = ff.make_fisher_step(loss, decay=0.8)
    states = [fisher_step.init(params) for _ in range(3)]
    for x, y in batches:
        states[0] = fisher_step(params, (x[:4], y[:4]), states[0])
        states[1] = fisher_step(params, (x[4:], y[4:]), states[1])
        states[2] = fisher_step(params, (x, y), states[2])
    merged = ff.merge(states[0], states[1])
    assert (merged.step, merged.tokens, merged.samples) == (4, 32.0, 32)
    inv.assert_fisher_close(merged.ema, states[2].ema, rtol=RTOL, what="merged EMA")


def test_fresh_state_is_the_identity_and_counts_add() -> None:
    loss, params, batches = _mlp()
    fisher_step = ff.make_fisher_step(loss, decay=0.8, nonfinite="skip")
    state = fisher_step(params, batches[0], fisher_step.init(params))
    fresh = fisher_step.init(params)._replace(skipped=2)
    for merged in (ff.merge(state, fresh), ff.merge(fresh, state)):
        assert (merged.step, merged.tokens, merged.samples, merged.skipped) == (1, 8.0, 8, 2)
        inv.assert_fisher_close(merged.ema, state.ema, rtol=RTOL)


def test_states_of_different_steps_are_refused() -> None:
    loss, params, batches = _mlp()
    fisher_step = ff.make_fisher_step(loss, decay=0.8)
    one = fisher_step(params, batches[0], fisher_step.init(params))
    two = fisher_step(params, batches[1], one)
    with pytest.raises(ff.SpecError, match=r"different numbers of steps \(1, 2\).*ff\.accumulate"):
        ff.merge(one, two)


def test_mismatches_are_refused_naming_the_culprit() -> None:
    loss, params, batches = _mlp()
    base = ff.make_fisher_step(loss, decay=0.8)
    state = base(params, batches[0], base.init(params))
    other_decay = ff.make_fisher_step(loss, decay=0.5)
    with pytest.raises(ff.SpecError, match=r"decay 0\.5"):
        ff.merge(state, other_decay(params, batches[0], other_decay.init(params)))
    spec = ff.infer_spec(loss.model) | {"2.weight": ff.Elementwise()}
    other_rule = ff.make_fisher_step(loss, decay=0.8, spec=spec)
    with pytest.raises(ff.SpecError, match=r"parameter '2\.weight' has groups \(3, 6\)"):
        ff.merge(state, other_rule(params, batches[0], other_rule.init(params)))
    heads = ff.make_fisher_step(loss, decay=0.8, spec=ff.infer_spec(loss.model) | {"2.weight": ff.Heads(3)})
    with pytest.raises(ff.SpecError, match=r"parameter '2\.weight' has Heads"):
        ff.merge(state, heads(params, batches[0], heads.init(params)))
    acc = ff.accumulate(loss, params, batches[0])
    acc_skip = ff.accumulate(loss, params, batches[0], spec=ff.infer_spec(loss.model) | {"0.bias": ff.Skip()})
    with pytest.raises(ff.SpecError, match=r"parameter '0\.bias' has groups None in accumulator 1, \(6,\)"):
        ff.merge(acc, acc_skip)
    with pytest.raises(TypeError, match="all alike; got Accumulator, FisherState"):
        ff.merge(acc, state)
    exact = ff.accumulate(loss, params, batches[1], kind="exact")
    assert (acc.kind, exact.kind) == ("empirical", "exact")
    with pytest.raises(ValueError, match="accumulator 1 holds kind='exact', accumulator 0 kind='empirical'"):
        ff.merge(acc, exact)
    assert ff.merge(exact, ff.accumulate(loss, params, batches[0], kind="exact")).kind == "exact"


def test_task_dicts_merge_task_by_task() -> None:
    loss, params, batches = _mlp()
    fisher_step = ff.make_fisher_step(loss, decay=0.0)
    fresh = fisher_step.init(params)
    a, b, c = (fisher_step(params, batch, fresh) for batch in batches[:3])
    merged = ff.merge({"math": a, "code": c}, {"math": b})
    assert list(merged) == ["math", "code"] and merged["code"] is c
    both = fisher_step(params, tuple(torch.cat(parts) for parts in zip(batches[0], batches[1])), fresh)
    inv.assert_fisher_close(ff.estimate(merged["math"]), ff.estimate(both), rtol=RTOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merged_state_keeps_the_first_states_storage(dtype: torch.dtype) -> None:
    loss, params, batches = _mlp()
    fisher_step = ff.make_fisher_step(loss, decay=0.8)
    a = fisher_step(params, batches[0], fisher_step.init(params, dtype=dtype))
    b = fisher_step(params, batches[1], fisher_step.init(params))
    merged = ff.merge(a, b)
    assert ff.metadata(merged)["storage"]["dtypes"] == [str(dtype).removeprefix("torch.")]
    expected = optree.tree_map(lambda x, y: (x.double() + y) / 2, ff.estimate(a), ff.estimate(b))
    actual = optree.tree_map(lambda t: t.double(), ff.estimate(merged))
    inv.assert_fisher_close(actual, expected, rtol=4 * UNIT_ROUNDOFF[dtype], what="merged low-precision estimate")
