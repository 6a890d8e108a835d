"""Storage policy: where a state's EMA lives and in which dtype, separate from where it is computed.

A state is stored in float32 (the default), float64, bfloat16 or float16 — float16 with a
per-value power-of-two exponent, so nothing in 1e-38..3.4e38 flushes or overflows (the precision
table is in :mod:`~fisherfunc._state.codec`, whose :class:`Scaled`, :func:`encode` and
:func:`decode` are re-exported here) — on any device, e.g. the CPU while the model runs on a GPU::

    state = fisher_step.init(params, dtype=torch.bfloat16, device="cpu")   # or store(state, ...)
    state = fisher_step(params_on_gpu, batch_on_gpu, state)                 # still bfloat16 on CPU

The policy is a property of the state, set when it is made and kept by every step: a step
computes ``F̂_t`` on the params' device, then, one group tensor at a time, decodes the stored
``m_{t−1}`` onto that device in float32, forms ``β m_{t−1} + (1 − β) F̂_t`` and stores the result
back where and how ``m_{t−1}`` was stored. Reading is explicit: :func:`~fisherfunc.estimate`
returns float32 values where the state is stored unless given ``device=``, and :func:`read` is a
lazy view that decodes and moves one group tensor only when it is looked up.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import optree
import torch
from torch import Tensor

from ._naming import path_name
from ._state.codec import (
    STORAGE_DTYPES,
    UNIT_ROUNDOFF,
    Scaled,
    Stored,
    check_storage_dtype,
    decode,
    encode,
    stored_device,
    stored_dtype,
)
from ._state.ema import bias_correction
from ._state.state import FisherState

__all__ = ["store", "read", "nbytes", "LazyEstimate", "Scaled", "encode", "decode", "STORAGE_DTYPES", "UNIT_ROUNDOFF"]


def store(
    state: FisherState, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> FisherState:
    """The same state stored in ``dtype`` on ``device`` (a new state; ``state`` is untouched).

    Converting to a lower precision rounds once (see :mod:`~fisherfunc._state.codec`); converting back up
    is exact, so ``store(store(s, dtype=bfloat16), dtype=float32)`` equals ``s`` rounded to bfloat16.

    Args:
        state: the state to convert.
        dtype: the new storage dtype (default: keep each tensor's).
        device: the new storage device (default: keep each tensor's).

    >>> import torch, fisherfunc as ff
    >>> state = ff.init_state({"w": torch.zeros(3, 2)}, spec=ff.Channel(), decay=0.9)
    >>> ff.storage.store(state, dtype=torch.float16).ema["w"]
    Scaled(shape=(3,), device=cpu)
    """
    if not isinstance(state, FisherState):
        raise TypeError(f"store needs a FisherState, got {type(state).__name__}")
    if dtype is not None:
        check_storage_dtype(dtype)

    def convert(m: Stored) -> Stored:
        target = stored_dtype(m) if dtype is None else dtype
        where = stored_device(m) if device is None else device
        work = torch.float64 if torch.float64 in (stored_dtype(m), target) else torch.float32
        return encode(decode(m, dtype=work), dtype=target, device=where)

    return state._replace(ema=optree.tree_map(convert, state.ema))


class LazyEstimate(Mapping[str, Tensor]):
    """A read-only ``{param_name: estimate}`` view of a state; each lookup decodes one group tensor.

    Nothing is decoded, moved or cached until a name is looked up, so a large state kept on the CPU
    can be brought to a GPU one group tensor at a time. Names are the dotted parameter names (as
    in :func:`~fisherfunc.to_keyed`); skipped parameters have no entry.
    """

    def __init__(self, state: FisherState, device: torch.device | str | None) -> None:
        if state.step == 0:
            raise ValueError("the state has taken no step yet; call fisher_step(params, batch, state) first")
        self._correction = bias_correction(state.decay, state.step)
        self._device = device
        paths, leaves, _ = optree.tree_flatten_with_path(state.ema)
        self._stored = {path_name(p): m for p, m in zip(paths, leaves)}

    def __getitem__(self, name: str) -> Tensor:
        """The bias-corrected estimate ``m_t / (1 − β^t)`` of parameter ``name``, in float32."""
        if name not in self._stored:
            raise KeyError(f"no estimate for parameter {name!r} (skipped or unknown); names are {sorted(self._stored)}")
        return decode(self._stored[name], device=self._device) / self._correction

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)

    def __repr__(self) -> str:
        return f"LazyEstimate({len(self)} parameters, device={self._device})"


def read(state: FisherState, *, device: torch.device | str | None = None) -> LazyEstimate:
    """A lazy, explicit read-back: ``read(state, device="cuda")[name]`` decodes one group tensor.

    Args:
        state: a state that has taken at least one step.
        device: where looked-up values go (default: where they are stored).

    Returns:
        A :class:`LazyEstimate` mapping parameter names to bias-corrected float32 estimates.
    """
    if not isinstance(state, FisherState):
        raise TypeError(f"read needs a FisherState, got {type(state).__name__}")
    return LazyEstimate(state, device)


def nbytes(state: FisherState) -> int:
    """Bytes the state's stored values take (3 per value for float16, mantissa and exponent)."""

    def size(m: Stored) -> int:
        parts = (m,) if isinstance(m, Tensor) else (m.mantissa, m.exponent)
        return sum(t.numel() * t.element_size() for t in parts)

    return sum(size(m) for m in optree.tree_leaves(state.ema))
