"""Batches for the test-case registry, drawn from the global RNG (seeded by :func:`~fisherfunc.testing.cases.case`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["labelled", "per_batch", "padded_token_batch", "token_batches"]


def per_batch(value: int | Sequence[int], count: int | None = None, *, what: str = "batch") -> tuple[int, ...]:
    """One integer per batch: ``value`` itself if a sequence, else ``value`` repeated ``count`` times.

    Args:
        value: an int (every batch) or one int per batch.
        count: the number of batches (``None``: one, or ``len(value)``).
        what: the size's name, for the error.

    Raises:
        ValueError: if a sequence's length is not ``count``.
    """
    if isinstance(value, int):
        return (value,) * (1 if count is None else count)
    values = tuple(int(v) for v in value)
    if count is not None and len(values) != count:
        raise ValueError(f"{what} has {len(values)} entries, one per batch, but there are {count} batches")
    return values


def labelled(shape: tuple[int, ...], classes: int, ignore_frac: float = 0.0) -> Tensor:
    """Class labels of ``shape`` in ``[0, classes)``; each set to -100 with probability ``ignore_frac``."""
    y = torch.randint(0, classes, shape)
    if ignore_frac > 0:
        y = y.masked_fill(torch.rand(shape) < ignore_frac, -100)
    return y


def padded_token_batch(
    lengths: list[int], seq_len: int, vocab: int, *, pad_id: int = 0, ignore_index: int = -100
) -> dict[str, Tensor]:
    """Make a right-padded token batch from the global RNG: ``input_ids``, ``labels``, ``attention_mask``.

    Sample ``b`` has ``lengths[b]`` real tokens (ids in ``[1, vocab)``) followed by ``pad_id``;
    ``attention_mask`` is 1 on real tokens; ``labels`` are random classes in ``[0, vocab)`` on real
    tokens and ``ignore_index`` on padding. All three are ``[B, seq_len]`` int64. The ids are drawn
    first, then the labels.
    """
    size = len(lengths)
    real = torch.arange(seq_len).expand(size, seq_len) < torch.tensor(lengths).unsqueeze(1)
    ids = torch.randint(1, vocab, (size, seq_len))
    labels = torch.randint(0, vocab, (size, seq_len))
    return {
        "input_ids": torch.where(real, ids, torch.full_like(ids, pad_id)),
        "labels": torch.where(real, labels, torch.full_like(labels, ignore_index)),
        "attention_mask": real.long(),
    }


def token_batches(
    batch: int | Sequence[int],
    seq_len: int | Sequence[int],
    vocab: int,
    *,
    lengths: Sequence[int] | None = None,
    min_length: int = 1,
    classes: int | None = None,
    ignore_index: int = -100,
    ignore_frac: float = 0.0,
    reserved_ids: int = 0,
    pad_id: int | None = 0,
) -> list[dict[str, Tensor]]:
    """Right-padded token batches ``{"input_ids", "labels", "attention_mask"}``, one per batch size.

    Per batch of ``B`` samples and length ``T``: the real lengths are ``lengths`` (one batch only)
    or drawn in ``[min_length, T]`` with the first sample full (``T``); then
    :func:`padded_token_batch` with ids in ``[1, vocab − reserved_ids)`` (the last
    ``reserved_ids`` ids never occur) — or, with ``pad_id=None``, ids in ``[0, vocab −
    reserved_ids)`` at every position, padding marked by the mask alone; labels are taken modulo
    ``classes`` on real tokens; finally each real label is set to ``ignore_index`` with probability
    ``ignore_frac``.

    Args:
        batch: ``B``, or one ``B`` per batch.
        seq_len: ``T``, or one ``T`` per batch.
        vocab: the vocabulary size.
        lengths: every sample's real length (a single batch).
        min_length: the shortest drawn length (2 for a causal LM: every sample has a target).
        classes: the number of label classes (``None``: ``vocab``).
        ignore_index: the label of padded and ignored positions.
        ignore_frac: the probability that a real token's label is ``ignore_index``.
        reserved_ids: ids at the top of the vocabulary that never occur.
        pad_id: the id of padded positions (never a real token), or ``None``: every id can be real
            and padded positions hold random ids too.

    Returns:
        One dict per batch, every entry ``[B, T]`` int64.
    """
    sizes = per_batch(batch)
    seq_lens = per_batch(seq_len, len(sizes), what="seq_len")
    if lengths is not None and len(sizes) != 1:
        raise ValueError("lengths= fixes the real lengths of a single batch; draw them for several batches")
    out = []
    for size, length in zip(sizes, seq_lens, strict=True):
        if lengths is not None:
            real = [int(n) for n in lengths]
            if len(real) != size:
                raise ValueError(f"lengths has {len(real)} entries for a batch of {size}")
        else:
            drawn = torch.randint(min_length, length + 1, (size,))
            drawn[0] = length
            real = drawn.tolist()
        if pad_id is None:
            ids = torch.randint(0, vocab - reserved_ids, (size, length))
            labels = torch.randint(0, vocab - reserved_ids, (size, length))
            mask = torch.arange(length).expand(size, length) < torch.tensor(real).unsqueeze(1)
            data = {"input_ids": ids, "labels": labels.masked_fill(~mask, ignore_index), "attention_mask": mask.long()}
        else:
            data = padded_token_batch(real, length, vocab - reserved_ids, pad_id=pad_id, ignore_index=ignore_index)
        real_tokens = data["attention_mask"] == 1
        if classes is not None:
            data["labels"] = torch.where(real_tokens, data["labels"] % classes, data["labels"])
        if ignore_frac > 0:
            dropped = real_tokens & (torch.rand(size, length) < ignore_frac)
            data["labels"] = data["labels"].masked_fill(dropped, ignore_index)
        out.append(data)
    return out
