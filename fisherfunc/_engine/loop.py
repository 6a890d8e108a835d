"""The one chunk loop: stream a batch through a per-chunk computation, sum, screen, fold batches.

Every estimate — group Fisher (``fisher``, ``accumulate``, the step), K-FAC factors and EK-FAC
scalings — is a sum over samples of per-sample terms. A batch of ``B`` samples is cut into chunks
of ``chunk_size`` (views, no copies); each chunk's computation returns its sums, which are added
up at once, so no more than one chunk's per-sample intermediates ever exist (``vmap(chunk_size=…)``
would concatenate them instead)::

    S = Σ_chunks Σ_{b ∈ chunk} s_b        N = Σ_b n_b

With a memory budget (:mod:`~fisherfunc._engine.budget`) the first chunks of a batch of a new
sample shape are one sample, then two, measured; the rest are cut to the planned size.

Finiteness is screened on each chunk's sums (:class:`~fisherfunc._engine.nonfinite.FiniteCheck`):
a NaN or Inf per-sample value makes its chunk's sum non-finite, and only then is the chunk
recomputed sample by sample to name the samples. Over an iterable of batches (:func:`fold`) a
non-finite batch raises a :class:`~fisherfunc._engine.nonfinite.NonFiniteError` naming the batch,
or is skipped and counted, by the caller's policy; nothing of a refused batch reaches a sum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import optree
import torch
from torch import Tensor

from .batches import Batch, BatchError, iter_batches, sample_key, take
from .budget import Budget, measure
from .nonfinite import FiniteCheck, NonFiniteError, NonFinitePolicy

__all__ = ["ChunkFn", "ChunkFns", "summed", "one_by_one", "stream", "planned", "batch_sums", "Totals", "fold"]

T = TypeVar("T")

#: ``chunk -> (values, tokens [c])``: a tuple of tensors and the chunk's per-sample token counts.
ChunkFn = Callable[[Any], tuple[tuple[Tensor, ...], Tensor]]


class ChunkFns(NamedTuple):
    """The two forms of one per-chunk computation (same inputs, same values).

    Attributes:
        per_sample: per-sample values ``[c, ...]`` (``per_sample_fisher``; naming non-finite samples).
        sums: the chunk's sums ``Σ_{b ∈ chunk} s_b``; a computation may contract some of them at
            chunk level instead of forming every ``s_b``.
    """

    per_sample: ChunkFn
    sums: ChunkFn


def summed(per_sample: ChunkFn) -> ChunkFns:
    """Both forms from a per-sample computation: the sums form sums its output over the chunk."""

    def sums(chunk: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        values, tokens = per_sample(chunk)
        return tuple(v.sum(0) for v in values), tokens

    return ChunkFns(per_sample, sums)


def one_by_one(sums: ChunkFn) -> ChunkFn:
    """Per-sample values from a sums-only computation, by running it on one sample at a time."""

    def per_sample(chunk: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        size = optree.tree_leaves(chunk)[0].shape[0]
        parts = [sums(take(chunk, b, b + 1)) for b in range(size)]
        values = tuple(torch.stack([p[0][i] for p in parts]) for i in range(len(parts[0][0])))
        return values, torch.cat([p[1] for p in parts])

    return per_sample


def stream(source: Any, size: int, chunk_size: int | None) -> Iterator[tuple[int, int, Any]]:
    """``(start, stop, chunk)`` for consecutive chunks of ``chunk_size`` samples (views of ``source``)."""
    step = size if chunk_size is None else chunk_size
    for start in range(0, size, step):
        stop = min(start + step, size)
        yield start, stop, take(source, start, stop)


def planned(
    run: Callable[[Any], T],
    source: Any,
    size: int,
    chunk_size: int | None,
    budget: Budget | None,
    device: torch.device,
) -> Iterator[T]:
    """``run(chunk)`` over consecutive chunks of ``source``: ``chunk_size`` samples, or as a budget plans.

    With a budget and a sample shape it has no plan for, the first chunks are one sample, then two,
    each measured (:func:`~fisherfunc._engine.budget.measure`); the plan made from them cuts the rest.

    Raises:
        BudgetError: one sample does not fit the budget (after that sample, before any other).
    """
    if budget is None:
        for _, _, chunk in stream(source, size, chunk_size):
            yield run(chunk)
        return
    key = sample_key(source)
    start = 0
    if key not in budget.plans:
        trials: list[tuple[int, int]] = []
        for n in (1, 2):
            if start >= size:
                break
            stop = min(start + n, size)
            out, peak = measure(lambda: run(take(source, start, stop)), device)  # noqa: B023
            if n == 1:  # the running sums, held while later chunks run
                leaves: list[Any] = optree.tree_leaves(out)  # type: ignore[arg-type]
                budget.kept = sum(x.nbytes for x in leaves if isinstance(x, Tensor))
            trials.append((stop - start, peak))
            if n == 1:
                budget.plan(trials)  # one sample that does not fit raises here
            yield out
            start = stop
        if len(trials) < 2 or trials[1][0] < 2:  # too few samples to measure the slope: plan per next batch
            return
        budget.plans[key] = budget.plan(trials)
    step = budget.plans[key]
    for begin in range(start, size, step):
        yield run(take(source, begin, min(begin + step, size)))


def batch_sums(
    fns: ChunkFns,
    source: Any,
    size: int,
    chunk_size: int | None,
    names: Sequence[str],
    *,
    budget: Budget | None = None,
    device: torch.device | None = None,
) -> tuple[list[Tensor], float]:
    """The exact sums of one batch, screened for NaN/Inf.

    Args:
        fns: the per-chunk computation.
        source: what the chunks are sliced from (the batch, or ``(batch, noise)``).
        size: the batch size ``B``.
        chunk_size: samples per chunk (``None``: the whole batch at once).
        names: a name for each value (parameters, or K-FAC factors), for the error messages.
        budget: a memory budget that plans the chunks (``chunk_size`` is then its cap), or ``None``.
        device: where the chunks run (for the budget's measurements; default CPU).

    Returns:
        ``(sums, tokens)``: the batch's sum of each value, and ``Σ_b n_b``.

    Raises:
        NonFiniteError: a non-finite per-sample value (naming values and samples) or sum.
        BatchError: the batch has no tokens.
        BudgetError: one sample does not fit ``budget``.
    """
    finite = FiniteCheck(names, rerun=lambda start, stop: fns.per_sample(take(source, start, stop)))
    sums: list[Tensor] | None = None
    tokens: Tensor | None = None
    for part, n in planned(fns.sums, source, size, chunk_size, budget, device or torch.device("cpu")):
        finite.add(part, n)  # a NaN/Inf per-sample value makes its chunk's sum non-finite
        if sums is None:  # the chunk's tensors are fresh: later chunks are added in place
            sums, tokens = list(part), n.sum()
        else:
            assert tokens is not None
            for s, p in zip(sums, part):
                s.add_(p.to(s.device))
            tokens = tokens + n.sum().to(tokens.device)
    assert sums is not None and tokens is not None  # a batch has at least one chunk
    finite.check(sums)  # one host sync; raises NonFiniteError naming values and samples
    total = float(tokens)
    if not total > 0:
        raise BatchError("the batch has no tokens to learn from (the loss returned num_tokens summing to 0)")
    return sums, total


@dataclasses.dataclass
class Totals:
    """Exact sums over the batches of one call.

    Attributes:
        sums: each value's sum over every sample of every folded batch (``None`` if none was folded).
        tokens: ``Σ n_b``.
        samples: samples folded.
        skipped: batches skipped as non-finite.
    """

    sums: list[Tensor] | None = None
    tokens: float = 0.0
    samples: int = 0
    skipped: int = 0


def fold(
    batches: Batch | Iterable[Batch],
    compute: Callable[[Batch], tuple[list[Tensor], float, int]],
    *,
    nonfinite: NonFinitePolicy = "raise",
) -> Totals:
    """Sum ``compute(batch) = (sums, tokens, samples)`` over one batch or an iterable of batches.

    Args:
        batches: one batch (a tensor, tuple or mapping) or an iterable of batches.
        compute: one batch's exact sums (e.g. via :func:`batch_sums`).
        nonfinite: ``"raise"`` (naming the batch's index in an iterable) or ``"skip"`` (counted).

    Raises:
        NonFiniteError: under ``"raise"``.
        BatchError: no batches at all.
    """
    single = isinstance(batches, (Tensor, tuple, Mapping))
    totals = Totals()
    for index, batch in enumerate(iter_batches(batches)):
        try:
            part, tokens, samples = compute(batch)
        except NonFiniteError as err:
            if nonfinite == "raise":
                raise (err if single else err.at_batch(index)) from None
            totals.skipped += 1
            continue
        if totals.sums is None:
            totals.sums = part
        else:
            for s, p in zip(totals.sums, part):
                s.add_(p.to(s.device))
        totals.tokens += tokens
        totals.samples += samples
    if totals.sums is None and not totals.skipped:
        raise BatchError("no batches were given")
    return totals
