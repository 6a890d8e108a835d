"""A memory budget (``max_memory=``) that picks the chunk size, so any dataset fits where one sample does.

The memory a chunk of ``c`` samples allocates beyond what exists before it (the model, the batch)
is close to affine in ``c``: a part that does not grow with the chunk (the chunk's group sums, the
parameters' float32 copies under ``precision="float32"``) and one per sample (activations kept for
the backward, probe gradients, Gram matrices, per-sample direct gradients)::

    peak(c) ≈ fixed + c · per_sample

Two trial chunks measure it on the batch itself — one sample, then two — so the trial is not extra
work: their sums are the batch's first three samples' sums. Then::

    per_sample = peak(2) − peak(1)          (peak(1) if that is not positive)
    fixed      = max(peak(1) − per_sample, 0) + held
    chunk      = min(⌊(budget − fixed) / per_sample⌋, chunk_size, B)

where ``held`` is what the call keeps outside the chunks (the float32 copies of the parameters,
and the running sums: one chunk's output).
Peaks are the :class:`~fisherfunc._engine.memory.LiveBytes` count on CPU and
``torch.cuda.max_memory_allocated`` above the memory allocated before the chunk on CUDA. A plan is
made once per sample shape (a batch of longer sequences is measured again); a
:class:`~fisherfunc.FisherStep` keeps its plans across steps.

``chunk_size`` with ``max_memory`` is an upper bound on the planned chunk. A budget below what one
sample needs (``held``, or ``held + peak(1)`` once measured) raises a :class:`BudgetError` naming
the budget and the need, before any further sample is computed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .memory import LiveBytes

__all__ = ["BudgetError", "parse_bytes", "format_bytes", "Budget"]

T = TypeVar("T")

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


class BudgetError(ValueError):
    """A memory budget is malformed, or below what one sample needs."""


def parse_bytes(value: Any, name: str = "max_memory") -> int:
    """Bytes from an int or a string such as ``"8GiB"``, ``"500MB"``, ``"1.5 GiB"`` or ``"1024"``.

    Units: ``B``, decimal ``KB``/``MB``/``GB``/``TB`` (powers of 1000) and binary
    ``KiB``/``MiB``/``GiB``/``TiB`` (powers of 1024), in any case.

    Raises:
        BudgetError: naming ``name`` and the value, for anything else or a size that is not positive.

    >>> parse_bytes("8GiB"), parse_bytes("500MB"), parse_bytes(4096)
    (8589934592, 500000000, 4096)
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BudgetError(f"{name} must be a number of bytes or a string such as '8GiB' or '500MB', got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise BudgetError(
                f"{name}={value!r} is not a size: write a number and a unit among B, KB, MB, GB, TB (powers of "
                "1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. '8GiB'"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise BudgetError(f"{name} must be positive, got {value!r}")
    return size


def format_bytes(size: float) -> str:
    """``size`` bytes in binary units, e.g. ``"1.5 GiB"``.

    >>> format_bytes(3 * 2**29)
    '1.5 GiB'
    """
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


def measure(run: Callable[[], T], device: torch.device) -> tuple[T, int]:
    """``run()`` and the peak bytes it allocated beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = run()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - before
    with LiveBytes(device_type=device.type) as live:
        out = run()
    return out, live.peak


@dataclasses.dataclass
class Budget:
    """The chunk sizes a memory budget allows, planned per sample shape from two trial chunks.

    Attributes:
        limit: the budget in bytes.
        held: bytes the call holds outside the chunks (the parameters' float32 copies).
        cap: ``chunk_size``, an upper bound on the planned chunk (``None``: none).
        plans: the planned chunk size per sample shape (see :func:`~fisherfunc._engine.batches.sample_key`).
        kept: bytes of one chunk's output, which the running sums hold while later chunks run
            (set by the first trial).
    """

    limit: int
    held: int = 0
    cap: int | None = None
    plans: dict[Any, int] = dataclasses.field(default_factory=dict)
    kept: int = 0

    def check_held(self) -> None:
        """Raise before any model call if what the call holds already exceeds the budget."""
        if self.held > self.limit:
            raise BudgetError(
                f"max_memory={format_bytes(self.limit)} is below what the call holds before any sample: "
                f"{format_bytes(self.held)} of float32 parameter copies; use precision='model' (no copies) "
                "or a larger max_memory"
            )

    def plan(self, trials: list[tuple[int, int]]) -> int:
        """The chunk size from the trial peaks ``[(samples, peak bytes), ...]`` (one, then two samples).

        Raises:
            BudgetError: if one sample does not fit, naming the budget and the one-sample need.
        """
        one = trials[0][1]
        if self.held + one > self.limit:
            raise BudgetError(
                f"max_memory={format_bytes(self.limit)} is below what one sample needs: "
                f"{format_bytes(self.held + one)} (a one-sample chunk's peak {format_bytes(one)}"
                + (f" + {format_bytes(self.held)} of float32 parameter copies" if self.held else "")
                + "); raise max_memory or shorten the sequences"
                + (", or use precision='model' (no copies)" if self.held else "")
            )
        per_sample = trials[1][1] - one if len(trials) > 1 else one
        if per_sample <= 0:
            per_sample = one
        fixed = max(one - per_sample, 0) + self.held + self.kept
        chunk = max((self.limit - fixed) // max(per_sample, 1), 1)
        return int(chunk if self.cap is None else min(chunk, self.cap))
