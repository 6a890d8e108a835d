"""Non-finite batches: refused naming parameters and samples, or skipped and counted; never a half-update.

The precise cases use a two-parameter loss ``L_b = a·x_b + b·z_b`` whose per-sample gradients are
``x_b`` and ``z_b``, so a NaN or Inf planted in ``x`` or ``z`` makes exactly one parameter and known
samples non-finite. The model cases plant a NaN input and run both computation paths.
"""

from __future__ import annotations

import math
import re
from typing import Any

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import fisherfunc as ff
from fisherfunc._engine.nonfinite import NonFiniteWarning, _screen_all
from fisherfunc.testing import cases
from fisherfunc.testing.cases import Case


def linear_case(size: int = 6, seed: int = 0) -> Case:
    """The registry's ``L_b = a·x_b + b·z_b`` (``∇_a = x_b``, ``∇_b = z_b``) in float32, ``(x [B, 3], z [B, 2])``."""
    return cases.case("linear_scores", batch=size, seed=seed, dtype=torch.float32)


PARAMS = linear_case().params  # the same fixed values for every seed
linear_loss = linear_case().loss


def batch(size: int = 6, seed: int = 0) -> tuple[Tensor, Tensor]:
    return linear_case(size, seed).batch


def planted(where: str, samples: list[int], value: float = math.nan, seed: int = 0) -> tuple[Tensor, Tensor]:
    x, z = batch(seed=seed)
    target = x if where == "a" else z
    for s in samples:
        target[s, 0] = value
    return x, z


def snapshot(state: ff.FisherState) -> list[tuple[Tensor, Tensor, int]]:
    return [(t, t.clone(), t._version) for t in optree.tree_leaves(state.ema)]


def assert_unchanged(snap: list[tuple[Tensor, Tensor, int]]) -> None:
    for t, clone, version in snap:
        assert torch.equal(t, clone) and t._version == version


def assert_same_state(actual: ff.FisherState, expected: ff.FisherState) -> None:
    """Equal in every field but ``skipped``, and bitwise equal EMA tensors."""
    assert (actual.step, actual.tokens, actual.samples, actual.decay, actual.kind, actual.spec) == (
        expected.step, expected.tokens, expected.samples, expected.decay, expected.kind, expected.spec,
    )  # fmt: skip
    for a, e in zip(optree.tree_leaves(actual.ema), optree.tree_leaves(expected.ema), strict=True):
        assert torch.equal(a, e)


@pytest.fixture
def stepped() -> tuple[ff.FisherStep, ff.FisherStep, ff.FisherState]:
    raising = ff.make_fisher_step(linear_loss, spec=ff.Elementwise(), decay=0.7)
    skipping = ff.make_fisher_step(linear_loss, spec=ff.Elementwise(), decay=0.7, nonfinite="skip")
    state = raising(PARAMS, batch(seed=1), raising.init(PARAMS))
    return raising, skipping, state


# --- "raise" --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("where", "samples"), [("a", [2]), ("b", [1, 4]), ("b", [0, 1, 2, 3, 4, 5])])
def test_raise_names_parameter_and_samples(stepped, where: str, samples: list[int], value: float) -> None:
    raising, _, state = stepped
    snap = snapshot(state)
    with pytest.raises(ff.NonFiniteError) as info:
        raising(PARAMS, planted(where, samples, value), state)
    err = info.value
    assert err.parameters == (where,) and err.samples == tuple(samples)
    message = str(err)
    assert f"'{where}' at samples [{', '.join(map(str, samples))}]" in message
    assert ("'a'" in message) == (where == "a") and ("'b'" in message) == (where == "b")
    assert "nonfinite='skip'" in message  # says how to skip instead
    assert isinstance(err, ff.BatchError)
    assert_unchanged(snap)


def test_raise_is_the_default_policy(stepped) -> None:
    raising, _, state = stepped
    assert raising.nonfinite == "raise"
    with pytest.raises(ff.NonFiniteError):
        raising(PARAMS, planted("a", [0]), state)


def test_sample_indices_are_batch_indices_under_chunking() -> None:
    fisher_step = ff.make_fisher_step(linear_loss, spec=ff.Elementwise(), decay=0.5, chunk_size=2)
    with pytest.raises(ff.NonFiniteError) as info:
        fisher_step(PARAMS, planted("b", [3, 5]), fisher_step.init(PARAMS))
    assert info.value.samples == (3, 5) and info.value.parameters == ("b",)


def test_non_finite_token_counts_are_named() -> None:
    def loss(params: dict[str, Tensor], sample: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, z = sample
        return params["a"] @ x + params["b"] @ z, torch.where(z[1] == 7.0, math.inf, 1.0)  # n_b = inf at z = 7

    x, z = batch()
    z[4, 1] = 7.0
    with pytest.raises(ff.NonFiniteError, match=re.escape("'num_tokens' at samples [4]")) as info:
        ff.fisher(loss, PARAMS, (x, z), spec=ff.Elementwise())
    assert info.value.parameters == ("num_tokens",) and info.value.samples == (4,)


def test_overflowing_sum_of_finite_values_is_refused() -> None:
    # Per-sample squares 2.25e38 are finite in float32; their sum over two samples is not.
    x = torch.full((2, 3), 1.5e19)
    z = torch.zeros(2, 2)
    per_sample = ff.per_sample_fisher(linear_loss, PARAMS, (x, z), spec=ff.Elementwise())
    assert torch.isfinite(per_sample.groups["a"]).all()
    with pytest.raises(ff.NonFiniteError, match=r"overflows torch\.float32 in 'a'") as info:
        ff.fisher(linear_loss, PARAMS, (x, z), spec=ff.Elementwise())
    assert info.value.parameters == ("a",) and info.value.samples == ()
    # float64 params compute in float64, where the sum is finite.
    wide = {k: v.double() for k, v in PARAMS.items()}
    assert torch.isfinite(ff.fisher(linear_loss, wide, (x.double(), z.double()), spec=ff.Elementwise())["a"]).all()


def test_finite_sums_whose_total_overflows_are_accepted() -> None:
    # Sums are screened by their totals; entries 1.96e38 are finite in float32, their total over
    # three entries is not: a false alarm, resolved exactly (no error, the values as computed).
    x = torch.full((1, 3), 1.4e19)
    z = torch.zeros(1, 2)
    got = ff.fisher(linear_loss, PARAMS, (x, z), spec=ff.Elementwise())
    assert torch.isfinite(got["a"]).all() and not torch.isfinite(got["a"].sum())
    per_sample = ff.per_sample_fisher(linear_loss, PARAMS, (x, z), spec=ff.Elementwise())
    assert torch.equal(got["a"], per_sample.groups["a"][0])


def test_iterable_of_batches_names_the_batch() -> None:
    batches = [batch(seed=1), batch(seed=2), planted("a", [1]), batch(seed=3)]
    with pytest.raises(ff.NonFiniteError, match=r"^batch 2 has non-finite values: .*'a' at samples \[1\]") as info:
        ff.fisher(linear_loss, PARAMS, batches, spec=ff.Elementwise())
    assert info.value.batch == 2
    with pytest.raises(ff.NonFiniteError, match=r"^the batch has non-finite values"):
        ff.accumulate(linear_loss, PARAMS, planted("a", [1]), spec=ff.Elementwise())


@pytest.mark.parametrize("spec", [None, ff.Elementwise()], ids=["inferred", "elementwise"])
@pytest.mark.parametrize("path", ["auto", "direct"])
def test_model_with_a_nan_input(path: str, spec: Any) -> None:
    # On the auto path the weights' chunk sums are contracted at batch level ((d²)ᵀ(a²)); a NaN
    # there is still detected, and the chunk's per-sample rerun names the sample.
    case = cases.case("mlp", batch=8, dtype=torch.float32)  # Linear(4, 6) → Tanh → Linear(6, 3)
    params = {k: v.detach() for k, v in case.params.items()}
    x, y = case.batch[0].clone(), case.batch[1]
    x[5, 2] = math.nan
    loss = case.loss
    fisher_step = ff.make_fisher_step(loss, spec=spec, decay=0.9, path=path, chunk_size=3)
    state = fisher_step.init(params)
    with pytest.raises(ff.NonFiniteError) as info:
        fisher_step(params, (x, y), state)
    assert set(info.value.parameters) == set(params) and info.value.samples == (5,)
    skipped = ff.make_fisher_step(loss, spec=spec, decay=0.9, path=path, nonfinite="skip")
    after = skipped(params, (x, y), state)
    assert after.skipped == 1 and after.step == 0


# --- "skip" ---------------------------------------------------------------------------------------


def test_skip_counts_and_changes_nothing_else(stepped) -> None:
    _, skipping, state = stepped
    snap = snapshot(state)
    after = skipping(PARAMS, planted("b", [1, 2], math.inf), state)
    assert after.skipped == state.skipped + 1 == 1
    assert_same_state(after, state)
    assert_unchanged(snap)
    assert ff.metadata(after)["skipped"] == 1
    twice = skipping(PARAMS, planted("a", [0]), after)
    assert twice.skipped == 2
    assert_same_state(twice, state)


def test_skipping_is_as_if_the_batch_never_came(stepped) -> None:
    raising, skipping, state = stepped
    good = [batch(seed=5), batch(seed=6)]
    with_bad = skipping(PARAMS, good[1], skipping(PARAMS, planted("a", [3]), skipping(PARAMS, good[0], state)))
    without = raising(PARAMS, good[1], raising(PARAMS, good[0], state))
    assert with_bad.skipped == 1 and without.skipped == 0
    assert_same_state(with_bad, without)


def test_skip_for_accumulate_and_fisher() -> None:
    batches = [batch(seed=1), planted("b", [0]), batch(seed=2), planted("a", [5], math.inf)]
    acc = ff.accumulate(linear_loss, PARAMS, batches, spec=ff.Elementwise(), nonfinite="skip")
    clean = ff.accumulate(linear_loss, PARAMS, [batches[0], batches[2]], spec=ff.Elementwise())
    assert (acc.skipped, acc.samples, acc.tokens) == (2, clean.samples, clean.tokens)
    for name in PARAMS:
        assert torch.equal(acc.sums[name], clean.sums[name])
    with pytest.warns(NonFiniteWarning, match="skipped 2 batch"):
        F = ff.fisher(linear_loss, PARAMS, batches, spec=ff.Elementwise(), nonfinite="skip")
    assert torch.equal(F["a"], clean.sums["a"] / clean.tokens)


def test_everything_skipped() -> None:
    bad = [planted("a", [0]), planted("b", [1])]
    acc = ff.accumulate(linear_loss, PARAMS, bad, spec=ff.Elementwise(), nonfinite="skip")
    assert (acc.skipped, acc.samples, acc.tokens) == (2, 0, 0.0)
    assert all(torch.equal(acc.sums[k], torch.zeros_like(v)) for k, v in PARAMS.items())  # merges as nothing
    with pytest.raises(ff.NonFiniteError, match="all 2 batch"):
        ff.fisher(linear_loss, PARAMS, bad, spec=ff.Elementwise(), nonfinite="skip")
    fisher_step = ff.make_fisher_step(linear_loss, spec=ff.Elementwise())
    with pytest.raises(ff.BatchError, match="has 0.0 tokens"):  # folding it in would divide by zero
        fisher_step.update(fisher_step.init(PARAMS), acc)


@pytest.mark.parametrize("policy", ["ignore", None, "Skip", True])
def test_policy_is_validated_before_any_work(policy: Any) -> None:
    calls = []

    def counting(params: dict[str, Tensor], sample: Any) -> tuple[Tensor, int]:
        calls.append(1)
        return linear_loss(params, sample)

    for call in (
        lambda: ff.make_fisher_step(counting, spec=ff.Elementwise(), nonfinite=policy),
        lambda: ff.fisher(counting, PARAMS, batch(), spec=ff.Elementwise(), nonfinite=policy),
        lambda: ff.accumulate(counting, PARAMS, batch(), spec=ff.Elementwise(), nonfinite=policy),
    ):
        with pytest.raises(ValueError, match=re.escape(f"nonfinite must be 'raise' or 'skip', got {policy!r}")):
            call()
    assert not calls


def test_float16_storage_is_never_half_updated() -> None:
    fisher_step = ff.make_fisher_step(linear_loss, spec=ff.Elementwise(), decay=0.9, nonfinite="skip")
    state = fisher_step(PARAMS, batch(seed=1), fisher_step.init(PARAMS, dtype=torch.float16))
    after = fisher_step(PARAMS, planted("a", [2]), state)
    assert after.skipped == 1 and after.ema is state.ema


@given(
    sizes=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    bad=st.one_of(st.none(), st.sampled_from([math.nan, math.inf, -math.inf])),
    where=st.integers(0, 10**6),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_the_chunk_screen_flags_exactly_the_lists_with_a_non_finite_entry(
    sizes: list[int], bad: float | None, where: int, dtype: torch.dtype, seed: int
) -> None:
    # the screen of a chunk's sums (one norm over the list): any NaN/±Inf entry anywhere flags it;
    # finite values of ordinary size never do (a false alarm needs a total past the dtype's range)
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, 3, generator=gen, dtype=dtype) * 1e3 for n in sizes]
    cells = sum(x.numel() for x in xs)
    if bad is not None and cells:
        flat = where % cells
        for x in xs:
            if flat < x.numel():
                x.view(-1)[flat] = bad
                break
            flat -= x.numel()
    expected = any(not bool(torch.isfinite(x).all()) for x in xs)
    assert bool(_screen_all(xs)) == expected
