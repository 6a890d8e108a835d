"""Storage policy: states kept in float32/float64/bfloat16/float16 on a chosen device, read back explicitly.

The codec's contract, ``|decode(encode(x)) − x| ≤ u·|x|`` with ``u`` the storage dtype's unit
roundoff over 1e-38..1e38 (zeros exact), is checked by hypothesis; the step's contract — the
storage dtype and device are kept, arithmetic is float32, Fisher values of 1e-30 and 1e30 survive
float16 — on a loss whose per-sample gradients are set by hand.
"""

from __future__ import annotations

import math

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import fisherfunc as ff
from fisherfunc import storage
from fisherfunc._state import codec
from fisherfunc.storage import UNIT_ROUNDOFF, Scaled, decode, encode
from fisherfunc.testing import cases

LOW = [torch.bfloat16, torch.float16]
ALL = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@settings(deadline=None, derandomize=True, database=None, max_examples=60)
@given(
    exponents=st.lists(st.floats(-37.9, 37.9), min_size=1, max_size=40),
    signs=st.lists(st.booleans(), min_size=40, max_size=40),
    dtype=st.sampled_from(ALL),
)
def test_codec_round_trip_is_within_the_unit_roundoff(exponents: list[float], signs: list[bool], dtype) -> None:
    x = torch.tensor([10.0**e for e in exponents], dtype=torch.float32)
    x = torch.where(torch.tensor(signs[: len(x)]), -x, x)
    back = decode(encode(x, dtype=dtype))
    assert back.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and back.shape == x.shape
    bound = UNIT_ROUNDOFF[dtype] * x.abs().to(back.dtype)
    assert ((back - x.to(back.dtype)).abs() <= bound).all()


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_zeros_and_the_extremes_survive(dtype: torch.dtype) -> None:
    x = torch.tensor([0.0, 1e-30, 1e30, -1e-30, 3.0e38, 1.2e-38]).reshape(2, 3)
    back = decode(encode(x, dtype=dtype))
    assert back[0, 0] == 0.0 and torch.isfinite(back).all() and (back[x != 0] != 0).all()


def test_float16_is_stored_scaled_and_moves_as_a_unit() -> None:
    s = encode(torch.tensor([[1e-30, 2.0], [1e30, 0.0]]), dtype=torch.float16, device="cpu")
    assert isinstance(s, Scaled) and s.shape == (2, 2) and s.dtype == torch.float16
    assert s.mantissa.dtype == torch.float16 and s.exponent.dtype == torch.int8
    assert s.mantissa.abs().max() <= 1.0 and isinstance(s.to("cpu"), Scaled)
    assert optree.tree_leaves({"w": s}) == [s]  # a leaf: tensor maps over a float16 state fail loudly
    with pytest.raises(ValueError, match="float16 mantissa and an int8 exponent"):
        Scaled(torch.zeros(2), torch.zeros(2, dtype=torch.int8))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int32, torch.complex64], ids=str)
def test_other_storage_dtypes_are_refused(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=str(dtype).replace(".", r"\.")):
        ff.init_state({"w": torch.zeros(2)}, spec=ff.Elementwise(), dtype=dtype)
    with pytest.raises(ValueError, match=str(dtype).replace(".", r"\.")):
        codec.check_storage_dtype(dtype)


# --- steps on stored states -----------------------------------------------------------------------

# ``L_b = tiny·x_b + huge·z_b + Σ off``: gradients ``x_b`` (~1e-15) and ``z_b`` (~1e15), ``off`` skipped.
SCALED = cases.case("scaled_gradients", batch=(4, 4, 4), dtype=torch.float32)
PARAMS, SPEC, scaled_loss = SCALED.params, SCALED.spec, SCALED.loss


def batches(n: int = 3) -> list[tuple[Tensor, Tensor]]:
    return list(SCALED.batches[:n])


def run(dtype: torch.dtype | None) -> ff.FisherState:
    fisher_step = ff.make_fisher_step(scaled_loss, spec=SPEC, decay=0.9)
    state = fisher_step.init(PARAMS, dtype=dtype, device="cpu")
    for batch in batches():
        state = fisher_step(PARAMS, batch, state)
    return state


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_states_keep_1e_minus_30_and_1e30(dtype: torch.dtype) -> None:
    reference, low = run(None), run(dtype)
    assert ff.metadata(low)["storage"] == {"dtypes": [str(dtype).removeprefix("torch.")], "devices": ["cpu"]}
    assert low.ema["off"] is None
    # Each step rounds the stored EMA once, so three steps stay within a few unit roundoffs.
    bound = 4 * UNIT_ROUNDOFF[dtype]
    for name in ("tiny", "huge"):
        expected, actual = ff.estimate(reference)[name], ff.estimate(low)[name]
        assert actual.dtype == torch.float32
        assert 1e-31 < expected.min() and expected.max() < 1e-29 or 1e29 < expected.min() and expected.max() < 1e31
        assert ((actual - expected).abs() <= bound * expected).all(), name


def test_plain_float16_would_have_flushed() -> None:
    # Why float16 is scaled: the raw values are outside float16's range.
    F = ff.estimate(run(None))
    assert (F["tiny"].half() == 0).all() and torch.isinf(F["huge"].half()).all()


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_estimate_and_keys_decode_every_storage(dtype: torch.dtype) -> None:
    state = run(dtype)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    assert all(t.dtype == work for t in optree.tree_leaves(ff.estimate(state, device="cpu")))
    keyed = ff.to_keyed(state, task="t")
    assert list(keyed) == ["t|huge|channel", "t|tiny|param"] and keyed["t|huge|channel"].dtype == work


def test_read_is_lazy_and_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    state = run(torch.float16)
    calls = []
    real = storage.decode
    monkeypatch.setattr(storage, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    lazy = storage.read(state, device="cpu")
    assert not calls and len(lazy) == 2 and sorted(lazy) == ["huge", "tiny"]
    assert torch.equal(lazy["tiny"], ff.estimate(state)["tiny"]) and len(calls) == 1
    with pytest.raises(KeyError, match="'off'"):
        lazy["off"]  # skipped: no estimate
    with pytest.raises(ValueError, match="no step yet"):
        storage.read(ff.init_state(PARAMS, spec=SPEC))


def test_store_converts_without_touching_the_input() -> None:
    state = run(None)
    before = [t.clone() for t in optree.tree_leaves(state.ema)]
    half = storage.store(state, dtype=torch.float16)
    back = storage.store(half, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(state.ema), before))
    assert isinstance(half.ema["tiny"], Scaled) and back.ema["tiny"].dtype == torch.float32
    assert (half.step, half.tokens, half.samples, half.spec) == (state.step, state.tokens, state.samples, state.spec)
    for name in ("tiny", "huge"):
        assert ((back.ema[name] - state.ema[name]).abs() <= 2**-11 * state.ema[name]).all()
    assert storage.nbytes(half) == 3 * 5 and storage.nbytes(state) == 4 * 5
    with pytest.raises(TypeError, match="store needs a FisherState"):
        storage.store(state.ema, dtype=torch.float16)


def test_clear_keeps_the_storage() -> None:
    cleared = ff.clear({"t": run(torch.float16)._replace(skipped=3)})["t"]
    assert isinstance(cleared.ema["tiny"], Scaled) and (decode(cleared.ema["tiny"]) == 0).all()
    assert (cleared.step, cleared.tokens, cleared.samples, cleared.skipped) == (0, 0.0, 0, 0)


def test_the_update_is_float32_arithmetic() -> None:
    # m_t = β m + (1 − β) F̂ with m = 1 stored in bfloat16, β = 0.99, F̂ = 1.5: in float32 it is 1.005,
    # stored as 1.0078125; bfloat16 arithmetic (each product rounded) would give 1.0.
    params = {"w": torch.ones(1)}
    fisher_step = ff.make_fisher_step(lambda p, s: ((p["w"] * s).sum(), 1), spec=ff.Whole(), decay=0.99)
    state = fisher_step.init(params, dtype=torch.bfloat16)
    state = state._replace(ema={"w": torch.tensor(1.0, dtype=torch.bfloat16)}, step=5)
    sample = torch.full((1, 1), math.sqrt(1.5))
    f = ff.fisher(fisher_step.loss, params, sample, spec=ff.Whole())["w"]
    after = fisher_step(params, sample, state)
    m = torch.tensor(1.0, dtype=torch.bfloat16)
    in_bfloat16 = 0.99 * m + 0.01 * f.to(torch.bfloat16)
    assert in_bfloat16 == 1.0 and after.ema["w"].dtype == torch.bfloat16
    assert after.ema["w"] == (0.99 * m.float() + 0.01 * f).to(torch.bfloat16) == 1.0078125
