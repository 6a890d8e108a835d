"""The live-bytes tracker and the memory budget (``max_memory=``) that picks the chunk size."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
