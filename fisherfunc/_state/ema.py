"""The exponential moving average every running estimate uses, and its bias correction.

With one global decay ``β`` and one step counter for all tensors of a state::

    m_t = β · m_{t−1} + (1 − β) · X_t          (stored: raw, not debiased)
    estimate = m_t / (1 − β^t)                  (exact when X_t is constant)

``X_t`` is the batch's token-normalised group Fisher (:class:`~fisherfunc.FisherState`) or its
K-FAC factors (:class:`~fisherfunc.kfac.KFACState`). The arithmetic runs in float32 (float64 for
float64 storage) on ``X_t``'s device — the compute device — one tensor at a time (a step's own
sums: one ``torch._foreach_*`` call per pass over the list, :func:`ema_all`); the result is stored
back where and how ``m`` was stored (:mod:`~fisherfunc._state.codec`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast, overload

import torch
from torch import Tensor

from .codec import Scaled, Stored, decode, encode, stored_device, stored_dtype

__all__ = ["check_decay", "bias_correction", "ema", "ema_all"]


def check_decay(decay: float) -> float:
    """Validate an EMA decay: a real number in ``[0, 1)``."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
    return float(decay)


def bias_correction(decay: float, step: int) -> float:
    """``1 − β^t``, accurate to a few ulps for every ``β`` in ``[0, 1)``.

    Written as ``−expm1(t · log β)``: the naive ``1.0 - decay**step`` cancels catastrophically for
    ``β`` near 1 (``β = 1 − 10⁻⁹`` loses 7 digits), which would bias a float64 estimate.

    >>> bias_correction(0.5, 2)
    0.75
    """
    return 1.0 if decay == 0.0 else -math.expm1(step * math.log(decay))


@overload
def ema(m: Tensor, x: Tensor, decay: float, divisor: float = 1.0, *, owned: bool = False) -> Tensor: ...


@overload
def ema(m: Scaled, x: Tensor, decay: float, divisor: float = 1.0, *, owned: bool = False) -> Scaled: ...


def ema(m: Stored, x: Tensor, decay: float, divisor: float = 1.0, *, owned: bool = False) -> Stored:
    """``β m + (1 − β) X`` with ``X = x / divisor``, in float32 (float64 for float64 storage) on ``x``'s device.

    The result is stored like ``m``. ``divisor`` folds a normalisation into the update (a batch's
    sums ``x`` over its token count): ``X`` is formed once, as a new tensor, and the update runs in
    place on it — one new tensor, three passes; with ``β = 0`` the result is ``X`` exactly.

    ``owned=True`` says ``x`` is the caller's own scratch (a step's freshly computed batch sums, never
    seen by a user): then, when it is a contiguous tensor of the working dtype, ``X`` is formed in
    place on it and no tensor is allocated (the same operations in the same order, so the same
    values). Leave it ``False`` for anything a caller may still read.

    >>> ema(torch.zeros(2), torch.ones(2), 0.75)
    tensor([0.2500, 0.2500])
    >>> ema(torch.zeros(2), torch.full((2,), 8.0), 0.75, divisor=8.0)
    tensor([0.2500, 0.2500])
    """
    work = torch.float64 if stored_dtype(m) == torch.float64 else torch.float32
    if owned and x.dtype == work and x.is_contiguous():
        new = x.div_(divisor) if divisor != 1.0 else x  # X, in place on the caller's scratch
    else:
        new = x.to(work) / divisor if divisor != 1.0 else x.to(work, copy=True)  # X, a new tensor
    if decay != 0.0:
        new.mul_(1.0 - decay).add_(decode(m, device=x.device, dtype=work), alpha=decay)
    return encode(new, dtype=stored_dtype(m), device=stored_device(m))


def ema_all(
    ms: Sequence[Stored], xs: Sequence[Tensor], decay: float, divisor: float = 1.0, *, owned: bool = False
) -> list[Stored]:
    """:func:`ema` of each pair ``(m, x)``: the same values, bit for bit.

    Where every pair qualifies for ``owned`` in place work and ``m`` is a plain tensor of the
    working dtype on ``x``'s device (a float32 or float64 state on the compute device, a step's
    own sums), the three passes run as ``torch._foreach_*`` calls over the whole list — the same
    operations in the same order on each tensor, one call each instead of one per tensor (a
    model's dozens of small group tensors cost more in per-call work than in arithmetic).
    Everything else goes through :func:`ema` one pair at a time.
    """
    ms, xs = list(ms), list(xs)
    if owned and xs and _foreach_ready(ms, xs):
        if divisor != 1.0:
            torch._foreach_div_(xs, divisor)  # X, in place on the caller's scratch
        if decay != 0.0:
            torch._foreach_mul_(xs, 1.0 - decay)
            torch._foreach_add_(xs, cast(list[Tensor], ms), alpha=decay)
        return list(xs)
    return [ema(m, x, decay, divisor, owned=owned) for m, x in zip(ms, xs)]


def _foreach_ready(ms: list[Stored], xs: list[Tensor]) -> bool:
    """Whether :func:`ema_all`'s list form applies: plain, contiguous tensors, one working dtype, one device."""
    first = xs[0]
    work = first.dtype
    if work not in (torch.float32, torch.float64):
        return False
    return all(
        isinstance(m, Tensor)
        and m.dtype == work
        and x.dtype == work
        and m.device == first.device
        and x.device == first.device
        and x.is_contiguous()
        for m, x in zip(ms, xs)
    )
