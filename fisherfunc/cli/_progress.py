"""The command's progress line on stderr, counted in tokens (or batches): tqdm if installed, else plain.

The total is known before the first batch when the loss can count a batch's tokens without a model
call (``loss.count_tokens(batch)``: every loss of :mod:`fisherfunc.losses` and :mod:`fisherfunc.hf`);
each step then advances by the tokens it folded in (``state.tokens`` after minus before), so the
line ends at exactly the total. A loss that cannot count is shown in batches.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress", "total_tokens"]


def total_tokens(loss: Any, batches: list[Any]) -> float | None:
    """``Σ n_b`` over every batch, or ``None`` if the loss has no ``count_tokens``."""
    counter = getattr(loss, "count_tokens", None)
    if counter is None:
        return None
    return float(sum(float(counter(batch).sum()) for batch in batches))


class Progress:
    """A progress counter on stderr: a tqdm bar if tqdm imports, else one rewritten plain line.

    Args:
        total: the amount at the end (tokens or batches).
        unit: ``"tokens"`` or ``"batches"``.
        description: the text before the bar.
    """

    def __init__(self, total: float, unit: str, description: str) -> None:
        self.total, self.unit, self.description = total, unit, description
        self.done = 0.0
        self.start = time.perf_counter()
        try:
            from tqdm import tqdm  # type: ignore[import-untyped]
        except ImportError:
            tqdm = None
        self.bar = None
        if tqdm is not None:
            self.bar = tqdm(total=total, desc=description, unit=" " + unit, unit_scale=True, file=sys.stderr)

    def advance(self, amount: float) -> None:
        """Count ``amount`` more tokens (or batches) as done."""
        self.done += amount
        if self.bar is not None:
            self.bar.update(amount)
            return
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        filled = int(30 * self.done // self.total) if self.total else 30
        line = f"\r{self.description}: [{'#' * filled:<30}] {self.done:g}/{self.total:g} {self.unit} ({rate:,.0f}/s)"
        print(line, end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        """End the line (or close the bar)."""
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr, flush=True)
