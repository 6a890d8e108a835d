"""Data-parallel Fisher over ``torch.distributed``: N processes on N shards = one process on the union.

Sums, token counts and sample counts are additive over any split of the data, so::

    S = Σ_r S_r        N = Σ_r N_r        B = Σ_r B_r          (r: the processes)
    F̂_t = S / N        m_t = β m_{t−1} + (1 − β) F̂_t

Each process computes the exact sums of its own shard (:meth:`~fisherfunc.FisherStep.batch_sums`
or :func:`~fisherfunc.accumulate`), one all-reduce (SUM) adds them up, and every process applies
the same EMA update to its own replica of the state. The replicas stay identical (an all-reduce
hands every process the same buffer), and they equal the state of one process stepping on the
concatenated batches, up to float rounding of the reordered sums (≈1e-7 relative in float32).

Per step there are two collectives: the counts and failure flags (5 float64 values), then — only
if every process succeeded — the group sums as one flat buffer in the compute dtype. Buffers live
on the params' device, so any backend works: ``nccl`` with CUDA params, ``gloo`` with CPU params.

A process that fails never leaves the others waiting: failures are caught locally and exchanged
in the first collective, then every process raises — a :class:`~fisherfunc.NonFiniteError`
on every process when one shard had NaN/Inf values (its own process names parameters and
samples; sample indices are within that shard), a :class:`DistributedError` for any other
failure. With ``nonfinite="skip"`` a batch that is non-finite on any process is skipped by all,
so ``state.skipped`` also stays identical. A process group needs a ``timeout`` for the case where
a process dies outright.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import optree
import torch
import torch.distributed as dist
from torch import Tensor

from ._engine.batches import Batch
from ._engine.nonfinite import NonFiniteError
from ._estimate import Accumulator
from ._estimate import accumulate as local_accumulate
from ._state.state import FisherState
from ._state.step import FisherStep

__all__ = ["DistributedError", "DataParallelStep", "data_parallel", "all_reduce", "accumulate", "fisher"]

T = TypeVar("T")
_NONFINITE, _ERROR = 3, 4  # positions of the failure flags in the counts buffer


class DistributedError(RuntimeError):
    """Another process failed during a collective Fisher computation; every process raises this or its own error."""


def _check_ready(group: Any) -> None:
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) on every process "
            "first (or use the single-process functions of fisherfunc)"
        )


def _device(tree: Any) -> torch.device:
    """The device of the first tensor in ``tree`` (CPU if none)."""
    for leaf in optree.tree_leaves(tree):
        if isinstance(leaf, Tensor):
            return leaf.device
    return torch.device("cpu")


def _attempt(fn: Callable[[], T]) -> tuple[T | None, Exception | None]:
    try:
        return fn(), None
    except Exception as err:  # exchanged with the other processes, then re-raised everywhere
        return None, err


def _raise_together(failure: Exception | None, group: Any) -> None:
    """Every process learns which processes failed and why; then every process raises."""
    report = None
    if failure is not None:
        nonfinite = isinstance(failure, NonFiniteError)
        detail = failure.detail if isinstance(failure, NonFiniteError) else f"{type(failure).__name__}: {failure}"
        report = (nonfinite, detail, getattr(failure, "parameters", ()), getattr(failure, "samples", ()))
    reports: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, report, group=group)
    if failure is not None:
        raise failure
    failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
    if all(r[0] for _, r in failed):
        rank, (_, detail, parameters, samples) = failed[0]
        raise NonFiniteError(f"process {rank}'s shard: {detail}", parameters=parameters, samples=samples)
    listing = "; ".join(f"process {rank}: {r[1]}" for rank, r in failed)
    raise DistributedError(f"{len(failed)} process(es) failed, so every process stops: {listing}")


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def _unflat(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for t in like:
        out.append(flat[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


def _reduce(
    acc: Accumulator | None, failure: Exception | None, *, device: torch.device, group: Any, skip_nonfinite: bool
) -> Accumulator | None:
    """Sum ``acc`` over the processes; ``None`` when a non-finite batch is skipped by all.

    Raises on every process when any process failed (or had a non-finite batch under "raise").
    """
    counts = [0.0, 0.0, 0.0] if acc is None else [float(acc.tokens), float(acc.samples), float(acc.skipped)]
    flags = [
        float(isinstance(failure, NonFiniteError)),
        float(failure is not None and not isinstance(failure, NonFiniteError)),
    ]
    meta = torch.tensor(counts + flags, dtype=torch.float64, device=device)
    dist.all_reduce(meta, op=dist.ReduceOp.SUM, group=group)
    if meta[_ERROR] > 0 or (meta[_NONFINITE] > 0 and not skip_nonfinite):
        _raise_together(failure, group)
    if meta[_NONFINITE] > 0:
        return None
    assert acc is not None
    leaves, treespec = optree.tree_flatten(acc.sums)
    flat = _flat(leaves).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    sums = optree.tree_unflatten(treespec, [s.to(t.device) for s, t in zip(_unflat(flat, leaves), leaves)])
    tokens, samples, skipped = meta[:3].tolist()
    return Accumulator(sums, tokens, int(samples), int(skipped), acc.kind)


def all_reduce(acc: Accumulator, *, group: Any = None) -> Accumulator:
    """The sum of every process's accumulator (a new one; ``acc`` is untouched).

    A collective: every process of ``group`` must call it, with accumulators for the same
    parameters and rules (e.g. each from :func:`~fisherfunc.accumulate` on its own shard).

    Args:
        acc: this process's accumulator.
        group: the process group (``None``: the default group).

    Returns:
        ``Accumulator(Σ_r sums_r, Σ_r tokens_r, Σ_r samples_r, Σ_r skipped_r)``, identical on every process.
    """
    _check_ready(group)
    if not isinstance(acc, Accumulator):
        raise TypeError(f"all_reduce needs an Accumulator, got {type(acc).__name__}")
    result = _reduce(acc, None, device=_device(acc.sums), group=group, skip_nonfinite=True)
    assert result is not None
    return result


def accumulate(
    loss: Any, params: Any, batches: Batch | Iterable[Batch], *, group: Any = None, **options: Any
) -> Accumulator:
    """:func:`fisherfunc.accumulate` over this process's shard, summed over all processes.

    Args:
        loss: per-sample loss.
        params: pytree of parameter tensors (the same on every process).
        batches: this process's shard (one batch or an iterable of batches).
        group: the process group (``None``: the default group).
        **options: keyword arguments of :func:`fisherfunc.accumulate` (``spec``, ``chunk_size``,
            ``path``, ``nonfinite``, ...); the same on every process.

    Returns:
        The accumulator of the union of all shards, identical on every process.
    """
    _check_ready(group)
    acc, failure = _attempt(lambda: local_accumulate(loss, params, batches, **options))
    result = _reduce(acc, failure, device=_device(params), group=group, skip_nonfinite=False)
    assert result is not None
    return result


def fisher(loss: Any, params: Any, batches: Batch | Iterable[Batch], *, group: Any = None, **options: Any) -> Any:
    """:func:`fisherfunc.fisher` of the union of every process's shard: ``Σ_r S_r / Σ_r N_r``.

    Arguments as for :func:`accumulate`. Identical on every process.
    """
    acc = accumulate(loss, params, batches, group=group, **options)
    if acc.skipped and not acc.samples:
        raise NonFiniteError.all_skipped(acc.skipped)
    return optree.tree_map(lambda s: s / acc.tokens, acc.sums)


@dataclasses.dataclass(frozen=True, eq=False)
class DataParallelStep:
    """A :class:`~fisherfunc.FisherStep` whose batch is split over the processes of a group.

    ``dp(params, shard, state)`` on every process returns the state that
    ``fisher_step(params, union_of_shards, state)`` returns on one process.

    Attributes:
        fisher_step: the configured step (loss, spec, decay, chunking, path, kind, policy).
        group: the process group (``None``: the default group).
    """

    fisher_step: FisherStep
    group: Any = None

    def init(self, params: Any, **storage: Any) -> FisherState:
        """A fresh state, as :meth:`FisherStep.init` (``dtype=``, ``device=`` for storage)."""
        return self.fisher_step.init(params, **storage)

    def __call__(self, params: Any, shard: Batch, state: FisherState) -> FisherState:
        """Fold this process's ``shard`` of the batch into ``state``, with every other process's.

        A collective: every process of the group calls it once per step, with the same params
        and the same (replicated) state.

        Raises:
            NonFiniteError: on every process, when any shard is non-finite under ``nonfinite="raise"``.
            DistributedError: on the other processes, when one process fails (it raises its own error).
        """
        _check_ready(self.group)
        rank = dist.get_rank(self.group)  # MC with a seed: each process draws its own labels
        acc, failure = _attempt(lambda: self.fisher_step.batch_sums(params, shard, state, stream=rank))
        skip = self.fisher_step.nonfinite == "skip"
        total = _reduce(acc, failure, device=_device(params), group=self.group, skip_nonfinite=skip)
        if total is None:
            return state._replace(skipped=state.skipped + 1)
        return self.fisher_step.update(state, total)


def data_parallel(fisher_step: FisherStep, *, group: Any = None) -> DataParallelStep:
    """Make ``fisher_step`` data-parallel: each process passes its own shard of every batch.

    Args:
        fisher_step: from :func:`~fisherfunc.make_fisher_step`.
        group: the process group (``None``: the default group).

    Returns:
        A :class:`DataParallelStep` with the same ``init`` and call shape as ``fisher_step``.
    """
    if not isinstance(fisher_step, FisherStep):
        raise TypeError(f"data_parallel needs a FisherStep (from make_fisher_step), got {type(fisher_step).__name__}")
    return DataParallelStep(fisher_step, group)
