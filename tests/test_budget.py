"""The live-bytes tracker and the memory budget (``max_memory=``) that picks the chunk size."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import assert_groups_close, cross_entropy_sum, reference_fisher
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc._engine.budget import BudgetError, parse_bytes
from fisherfunc._engine.memory import LiveBytes

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the tracker, against allocations whose size is known ------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool])
def test_counts_known_allocations_views_and_frees(dtype: torch.dtype) -> None:
    item = torch.empty((), dtype=dtype).element_size()
    with LiveBytes() as live:
        x = torch.zeros(1000, dtype=dtype)
        assert live.current == 1000 * item
        view = x.view(10, 100)[2:5]  # views share the storage: nothing new
        x.zero_()  # in place: nothing new
        assert live.current == 1000 * item
        y = torch.ones(300, dtype=dtype)
        assert live.current == 1300 * item
        del x, view
        assert live.current == 300 * item
        z = torch.zeros(200, dtype=dtype)
        del y, z
    assert live.peak == 1300 * item
    assert live.current == 0


def test_storages_from_before_are_the_baseline() -> None:
    before = torch.randn(10_000)
    with LiveBytes() as live:
        doubled = before * 2  # one new storage; the input is not counted
        before.view(100, 100)[3].add_(1)  # views and in-place changes of it are not new either
        del before
    assert live.peak == 10_000 * 4
    assert live.current == 10_000 * 4
    del doubled
    assert live.current == 0


def test_resize_in_place_changes_the_count() -> None:
    with LiveBytes() as live:
        x = torch.zeros(100)
        x.resize_(1000)
        assert live.current == 4000
    assert live.peak == 4000


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 16), width=st.integers(1, 300))
def test_vmap_is_seen_as_the_physical_batched_tensors(batch: int, width: int) -> None:
    """A vmapped op over B samples allocates B times one sample's bytes, and the mode sees all of them."""
    x = torch.randn(batch, width)
    with LiveBytes() as live:
        y = torch.func.vmap(torch.exp)(x)
    assert live.peak == batch * width * 4
    assert live.current == y.nbytes


def test_grad_under_vmap_counts_the_per_sample_gradients() -> None:
    batch, tokens, width = 6, 5, 40
    w = torch.randn(width, width)
    xs = torch.randn(batch, tokens, width)

    def loss(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w).sum()

    with LiveBytes() as live:
        with live.section("per-sample"):
            grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(w, xs)
    per_sample_grads = batch * width * width * 4
    assert grads.nbytes == per_sample_grads
    assert live.current == per_sample_grads
    # the peak holds the gradients and the saved activations tanh(x w) [B, T, width] of the backward
    assert live.peak >= per_sample_grads + batch * tokens * width * 4
    assert set(live.peak_by_section) == {"per-sample"}
    assert sum(live.peak_by_op.values()) == live.peak
    assert live.peak_by_op["aten.bmm.default"] >= per_sample_grads


def test_sections_attribute_the_peak() -> None:
    with LiveBytes() as live:
        with live.section("a"):
            a = torch.zeros(100)
            with live.section("b"):
                b = torch.zeros(50)
        del a
        c = torch.zeros(10)
    assert live.peak == 600
    assert live.peak_by_section == {"a": 400, "b": 200}
    live.reset_peak()
    assert live.peak == 240
    assert live.peak_by_section == {"b": 200, "": 40}
    del b, c


# --- the budget: parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("8GiB", 8 * 2**30), ("500MB", 500 * 10**6), ("1.5 GiB", 3 * 2**29), ("64kib", 64 * 1024), ("1024", 1024)],
)
def test_sizes_parse_in_binary_and_decimal_units(text: str, size: int) -> None:
    assert parse_bytes(text) == size
    assert parse_bytes(size) == size


@pytest.mark.parametrize("bad", ["8 gigs", "GiB", "-1GiB", "0", 0, -5, True, 1.5, "1e3"])
def test_a_bad_budget_is_refused_before_any_work_naming_max_memory(bad: object) -> None:
    model, batch = mlp(), data(4)
    calls = []

    def loss(p: dict, sample: tuple) -> tuple:
        calls.append(1)
        return ff.losses.classification(model)(p, sample)

    params = dict(model.named_parameters())
    for call in (
        lambda: ff.fisher(loss, params, batch, spec=ff.Channel(0), max_memory=bad),
        lambda: ff.accumulate(loss, params, batch, spec=ff.Channel(0), max_memory=bad),
        lambda: ff.per_sample_fisher(loss, params, batch, spec=ff.Channel(0), max_memory=bad),
        lambda: ff.make_fisher_step(loss, spec=ff.Channel(0), max_memory=bad),
    ):
        with pytest.raises(BudgetError, match="max_memory"):
            call()
    assert not calls


# --- the budget: chunks ----------------------------------------------------------------------------

WIDTH = 96


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 10))


def data(size: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(size)
    return torch.randn(size, WIDTH, generator=g), torch.randint(0, 10, (size,), generator=g)


def one_chunk_peak(model: nn.Module, batch: tuple[Tensor, Tensor], chunk: int) -> int:
    params = dict(model.named_parameters())
    with LiveBytes() as live:
        ff.fisher(ff.losses.classification(model), params, batch, spec=ff.Channel(0), path="direct", chunk_size=chunk)
    return live.peak


def test_the_budget_picks_a_chunk_that_keeps_the_peak_within_it_and_the_result_exact() -> None:
    """On the direct path a chunk holds c per-sample gradients: the peak grows with c, and the budget bounds it."""
    model, batch = mlp(), data(24)
    params = dict(model.named_parameters())
    loss = ff.losses.classification(model)
    peak1, peak2 = one_chunk_peak(model, data(1), 1), one_chunk_peak(model, data(2), 2)
    budget = peak1 + 4 * (peak2 - peak1)  # room for about five samples per chunk
    step = ff.make_fisher_step(loss, spec=ff.Channel(0), decay=0.0, path="direct", max_memory=budget)
    state = step.init(params)
    with LiveBytes() as live:
        state = step(params, batch, state)
    assert live.peak <= budget
    (chunk,) = step.chunk_plans.values()
    assert 2 < chunk < 24
    same = ff.fisher(loss, params, batch, spec=ff.Channel(0), path="direct", chunk_size=chunk)
    whole = ff.fisher(loss, params, batch, spec=ff.Channel(0), path="direct")
    assert whole_peak_exceeds(model, batch, budget)
    expected = reference_fisher(
        copy.deepcopy(model).double(), (batch[0].double(), batch[1]), lambda m, s: cross_entropy_sum(m(s[0]), s[1]),
        ff.Channel(0),
    )  # fmt: skip
    for name in same:
        torch.testing.assert_close(ff.estimate(state)[name], same[name], rtol=1e-6, atol=0)
        torch.testing.assert_close(whole[name], same[name], rtol=1e-6, atol=0)
    assert_groups_close(same, expected, 1e-5)
    # fisher with the same budget: the same plan, the same result
    budgeted = ff.fisher(loss, params, batch, spec=ff.Channel(0), path="direct", max_memory=budget)
    for name in same:
        torch.testing.assert_close(budgeted[name], same[name], rtol=1e-6, atol=0)
    per = ff.per_sample_fisher(loss, params, batch, spec=ff.Channel(0), path="direct", max_memory=budget)
    assert per.tokens.shape == (24,)
    for name in same:
        torch.testing.assert_close(per.groups[name].sum(0) / per.tokens.sum(), same[name], rtol=1e-6, atol=0)


def whole_peak_exceeds(model: nn.Module, batch: tuple[Tensor, Tensor], budget: int) -> bool:
    """Whether the whole batch in one chunk would have exceeded the budget (so the budget did something)."""
    return one_chunk_peak(model, batch, batch[0].shape[0]) > budget


def test_chunk_size_caps_the_planned_chunk() -> None:
    model, batch = mlp(), data(12)
    params = dict(model.named_parameters())
    step = ff.make_fisher_step(
        ff.losses.classification(model), spec=ff.Channel(0), chunk_size=4, max_memory="1GiB", path="direct"
    )
    step(params, batch, step.init(params))
    assert list(step.chunk_plans.values()) == [4]


def test_a_budget_below_one_sample_raises_naming_the_budget_and_the_need() -> None:
    model, batch = mlp(), data(16)
    chunks = []

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: Tensor) -> Tensor:
            chunks.append(x.shape)
            return self.inner(x)

    counting = Counting()
    loss = ff.losses.classification(counting)
    need = one_chunk_peak(model, data(1), 1)
    with pytest.raises(BudgetError, match=r"max_memory=.* is below what one sample needs") as err:
        ff.fisher(
            loss, dict(counting.named_parameters()), batch, spec=ff.Channel(0), path="direct", max_memory=need // 2
        )
    assert "one-sample chunk's peak" in str(err.value)
    assert len(chunks) <= 2  # the build-time discovery and the one-sample trial, not the batch


def test_float32_copies_above_the_budget_are_refused_before_any_model_call() -> None:
    model = mlp().to(torch.bfloat16)
    params = dict(model.named_parameters())
    copies = sum(p.numel() for p in params.values()) * 4
    calls = []

    def loss(p: dict, sample: tuple) -> tuple:
        calls.append(1)
        return ff.losses.classification(model)(p, sample)

    x, y = data(4)
    with pytest.raises(BudgetError, match="float32 parameter copies") as err:
        ff.fisher(loss, params, (x.bfloat16(), y), spec=ff.Channel(0), max_memory=copies // 2)
    assert "precision='model'" in str(err.value) and not calls
    ff.fisher(loss, params, (x.bfloat16(), y), spec=ff.Channel(0), max_memory=copies // 2, precision="model")
