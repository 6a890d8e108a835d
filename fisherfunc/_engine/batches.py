"""Batches: pytrees of tensors sharing a leading batch dimension ``B``.

Checks run before any heavy work; chunks are views (no copies) taken along the batch dimension.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import optree
import torch
from torch import Tensor

from .._naming import path_name

__all__ = [
    "Batch",
    "BatchError",
    "entry",
    "batch_size",
    "take",
    "cast_floating",
    "iter_batches",
    "as_tree",
    "sample_key",
    "first_sample",
]

Batch = Any  # a tensor, tuple, dict (or any pytree) of tensors with a leading batch dimension


class BatchError(ValueError):
    """A batch is malformed (leaves of different batch sizes, empty, no tokens...)."""


def entry(batch: Any, key: Any, role: str) -> Tensor:
    """The entry ``key`` of a batch or sample (an index of a tuple, a key of a mapping).

    Raises:
        BatchError: naming the missing ``role`` entry (``"input"``, ``"target"``, ``"mask"``) and
            what the batch has instead.
    """
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError):
        have = list(batch.keys()) if isinstance(batch, Mapping) else f"{len(batch)} entries"
        raise BatchError(f"the batch has no {role} entry {key!r} (it has {have})") from None


def batch_size(batch: Batch) -> int:
    """The shared leading dimension of every leaf of ``batch``.

    Raises:
        BatchError: if a leaf is not a tensor, is a scalar, the leaves disagree on the batch size,
            or the batch is empty.
    """
    paths, leaves, _ = optree.tree_flatten_with_path(batch)
    if not leaves:
        raise BatchError("the batch has no tensors")
    sizes: dict[str, int] = {}
    for path, leaf in zip(paths, leaves):
        name = path_name(path) if path else "batch"
        if not isinstance(leaf, Tensor):
            raise BatchError(f"batch entry '{name}' is a {type(leaf).__name__}, not a torch.Tensor")
        if leaf.ndim == 0:
            raise BatchError(f"batch entry '{name}' is a scalar; every entry needs a leading batch dimension")
        sizes[name] = leaf.shape[0]
    distinct = set(sizes.values())
    if len(distinct) > 1:
        listing = ", ".join(f"'{k}': {v}" for k, v in sizes.items())
        raise BatchError(f"batch entries have different batch sizes ({listing})")
    size = distinct.pop()
    if size == 0:
        raise BatchError("the batch is empty (batch size 0)")
    return size


def take(batch: Batch, start: int, stop: int) -> Batch:
    """Samples ``start:stop`` of every leaf (views, no copies)."""
    return optree.tree_map(lambda x: x[start:stop], batch)


def cast_floating(tree: Any, dtype: torch.dtype) -> Any:
    """Cast the floating-point leaves of ``tree`` to ``dtype``; other leaves pass through."""
    return optree.tree_map(
        lambda x: x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != dtype else x,
        tree,
    )


def iter_batches(batches: Batch | Iterable[Batch]) -> Iterator[Batch]:
    """Yield batches from one batch or an iterable of batches.

    One batch is a tensor, a tuple (named tuples included) or a mapping; anything else that is
    iterable (a list, a generator, a ``DataLoader``) is an iterable of batches.
    """
    if isinstance(batches, (Tensor, tuple, Mapping)):
        yield as_tree(batches)
        return
    for batch in batches:
        yield as_tree(batch)


def as_tree(batch: Batch) -> Batch:
    """A batch as a pytree optree walks into.

    A mapping that is not a ``dict`` (Hugging Face's ``BatchEncoding``, a ``UserDict``) becomes a
    ``dict`` of its entries; anything else is returned unchanged.
    """
    return dict(batch) if isinstance(batch, Mapping) and not isinstance(batch, dict) else batch


def sample_key(batch: Batch) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
    """The shapes and dtypes of one sample of every leaf: what a traced per-sample computation depends on."""
    return tuple((tuple(x.shape[1:]), x.dtype) for x in optree.tree_leaves(batch))


def first_sample(batch: Batch) -> Batch:
    """Sample 0 of every leaf, batch dimension removed."""
    return optree.tree_map(lambda x: x[0], batch)
