"""Stored values: how a state's group tensors are kept in float32, float64, bfloat16 or float16.

A stored group tensor is either a plain tensor (float32, float64, bfloat16) or, for float16, a
:class:`Scaled` pair of a float16 mantissa and an int8 power-of-two exponent per value::

    x = mantissa · 2^exponent        |mantissa| ∈ [0.5, 1],  exponent ∈ [−128, 127]

float16 alone spans only 6e-8..65504 and would flush small Fisher values to zero and overflow
large ones; with a per-value exponent every float32 normal value survives. A round trip
``x̂ = decode(encode(x))`` rounds once to nearest: ``|x̂ − x| ≤ u·|x|``, ``u`` the unit roundoff:

| stored   | bytes / value | relative error ``u`` (at most) | range kept at that precision |
|----------|---------------|--------------------------------|-------------------------------|
| float64  | 8             | exact                          | all                           |
| float32  | 4             | exact                          | all                           |
| bfloat16 | 2             | ``2⁻⁸ ≈ 3.9e-3``               | 1.2e-38 .. 3.3e38             |
| float16  | 3 (scaled)    | ``2⁻¹¹ ≈ 4.9e-4``              | 1.2e-38 .. 3.4e38             |

Zeros stay exact zeros in every format. Arithmetic never happens on stored values: they are
decoded to float32 (float64 for float64 storage) first, on whichever device the work runs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

__all__ = [
    "STORAGE_DTYPES",
    "UNIT_ROUNDOFF",
    "Scaled",
    "Stored",
    "check_storage_dtype",
    "encode",
    "decode",
    "zeros",
    "stored_dtype",
    "stored_device",
    "stored_shape",
]

#: The dtypes a state can be stored in.
STORAGE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: Relative precision of a stored value: ``|decode(encode(x)) − x| ≤ u·|x|``.
UNIT_ROUNDOFF = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

_MIN_EXPONENT, _MAX_EXPONENT = -128, 127


@dataclasses.dataclass(frozen=True, eq=False)
class Scaled:
    """A float16-stored tensor: ``x = mantissa · 2^exponent``, elementwise.

    A pytree *leaf* (not a node), like a tensor: mapping a tensor function over a state stored in
    float16 fails loudly instead of treating mantissas as values. Decode with :func:`decode`.

    Attributes:
        mantissa: float16, the values' shape; ``|mantissa| ∈ [0.5, 1]`` (0 for zeros).
        exponent: int8, the same shape.
    """

    mantissa: Tensor
    exponent: Tensor

    def __post_init__(self) -> None:
        m, e = self.mantissa, self.exponent
        if m.dtype != torch.float16 or e.dtype != torch.int8 or m.shape != e.shape or m.device != e.device:
            raise ValueError(
                "Scaled needs a float16 mantissa and an int8 exponent of the same shape and device, got "
                f"{m.dtype} {tuple(m.shape)} on {m.device} and {e.dtype} {tuple(e.shape)} on {e.device}"
            )

    @property
    def shape(self) -> torch.Size:
        """The values' shape."""
        return self.mantissa.shape

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype, float16."""
        return torch.float16

    @property
    def device(self) -> torch.device:
        """Where the values are stored."""
        return self.mantissa.device

    def to(self, device: torch.device | str) -> Scaled:
        """The same values stored on ``device``."""
        return Scaled(self.mantissa.to(device), self.exponent.to(device))

    def __repr__(self) -> str:
        return f"Scaled(shape={tuple(self.shape)}, device={self.device})"


#: A stored group tensor.
Stored = Tensor | Scaled


def check_storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """Validate a storage dtype (one of :data:`STORAGE_DTYPES`).

    Raises:
        ValueError: for a non-floating dtype or a floating one that cannot keep 1e-30..1e30.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise ValueError(f"dtype of the stored EMA must be a floating-point dtype, got {dtype}")
    if dtype not in STORAGE_DTYPES:
        names = ", ".join(str(d) for d in STORAGE_DTYPES)
        raise ValueError(f"a state cannot be stored in {dtype} (it would flush or overflow); choose one of {names}")
    return dtype


def _pow2(exponent: Tensor, dtype: torch.dtype) -> Tensor:
    """``2^exponent`` exactly, for integer exponents in ``[−126, 127]``, built from float32 bits."""
    bits = (exponent.to(torch.int32) + 127) << 23
    return bits.view(torch.float32).to(dtype)


def encode(x: Tensor, *, dtype: torch.dtype, device: torch.device | str | None = None) -> Stored:
    """Store ``x`` in ``dtype`` on ``device`` (default: ``x``'s device).

    float16 becomes :class:`Scaled`: ``frexp`` splits ``x = m · 2^e``; the exponent is kept in
    int8 (clamped to ``[−128, 127]``, which only matters below float32's normal range) and
    ``x · 2^−e`` — a power-of-two scaling, exact in float64 — is rounded to float16 once.

    Args:
        x: values, any floating dtype and shape.
        dtype: one of :data:`STORAGE_DTYPES`.
        device: where to store them.

    >>> x = torch.tensor([1e-30, 3.0, 1e30])
    >>> s = encode(x, dtype=torch.float16)
    >>> bool(((decode(s) - x).abs() <= 2**-11 * x).all())
    True
    """
    check_storage_dtype(dtype)
    if dtype != torch.float16:
        return x.to(device=device, dtype=dtype)
    wide = x.to(torch.float64)
    _, e = torch.frexp(wide)
    e = e.clamp(_MIN_EXPONENT, _MAX_EXPONENT)
    # x · 2^−e in two exact steps (each factor within float32's normal range).
    half = torch.div(-e, 2, rounding_mode="floor")
    mantissa = (wide * _pow2(half, torch.float64) * _pow2(-e - half, torch.float64)).to(torch.float16)
    return Scaled(mantissa.to(device), e.to(device=device, dtype=torch.int8))


def decode(stored: Stored, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """The values of a stored tensor, for arithmetic.

    Args:
        stored: a plain tensor or :class:`Scaled`.
        device: where to put the values (default: where they are stored); the stored form is
            moved (3 bytes a value for float16), then decoded there.
        dtype: the work dtype (default: float64 for float64 storage, else float32).

    Returns:
        A tensor of ``stored``'s shape (``stored`` itself when nothing changes).
    """
    work = dtype or (torch.float64 if stored_dtype(stored) == torch.float64 else torch.float32)
    if isinstance(stored, Tensor):
        return stored.to(device=device, dtype=work)
    m, e = stored.mantissa.to(device), stored.exponent.to(device=device, dtype=torch.int32)
    half = torch.div(e, 2, rounding_mode="floor")
    return m.to(work) * _pow2(half, work) * _pow2(e - half, work)


def zeros(shape: torch.Size | tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str | None) -> Stored:
    """Stored zeros of ``shape``."""
    check_storage_dtype(dtype)
    if dtype == torch.float16:
        return Scaled(
            torch.zeros(shape, dtype=torch.float16, device=device), torch.zeros(shape, dtype=torch.int8, device=device)
        )
    return torch.zeros(shape, dtype=dtype, device=device)


def stored_dtype(stored: Stored) -> torch.dtype:
    """The storage dtype of a stored tensor (float16 for :class:`Scaled`)."""
    return stored.dtype


def stored_device(stored: Stored) -> torch.device:
    """Where a stored tensor lives."""
    return stored.device


def stored_shape(stored: Stored) -> torch.Size:
    """The shape of the values."""
    return stored.shape
