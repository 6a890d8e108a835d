"""How parameters and values are named in keys, tables and error messages.

A parameter's name is the dotted path of its pytree leaf (``("encoder", "0.weight")`` →
``"encoder.0.weight"``), the ``named_parameters()`` name for the usual flat dict. Lists in error
messages show a few items and count the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["path_name", "few"]


def path_name(path: Sequence[Any]) -> str:
    """The dotted name of a pytree path, e.g. ``("encoder", "0.weight") -> "encoder.0.weight"``.

    >>> path_name(("encoder", "0.weight")), path_name(())
    ('encoder.0.weight', '<root>')
    """
    return ".".join(str(p) for p in path) if path else "<root>"


def few(items: Sequence[object], limit: int = 5, *, quote: bool = True) -> str:
    """Up to ``limit`` items for a message, and how many more: ``'a', 'b' and 2 more``.

    >>> few(["a", "b", "c"], 2), few([1, 2, 3], 2, quote=False)
    ("'a', 'b' and 1 more", '1, 2 and 1 more')
    """
    shown = ", ".join(repr(x) if quote else str(x) for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
