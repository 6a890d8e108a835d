"""One-shot estimates: per-sample group Fisher and the token-normalised batch / dataset Fisher.

Token-normalised empirical Fisher over all samples ``b`` of all batches::

    F̂ = ( Σ_b rule.reduce(g_b ⊙ g_b) ) / ( Σ_b n_b )

Batches are streamed chunk by chunk (``chunk_size`` samples at a time) and each chunk's reduced
values are summed immediately, so memory is ``chunk × |θ|`` for per-sample gradients plus the
group sums; the result does not depend on how the data is split into batches or chunks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import optree
import torch
from torch import Tensor

from .batch import BatchError, batch_size, iter_batches, take
from .per_sample import ChunkFn, PerSampleLoss, Prepared, direct_chunk_fn, prepare
from .probes import auto_chunk_fn
from .rules import SpecError
from .spec import ResolvedSpec, resolve_spec

__all__ = [
    "PerSampleFisher",
    "Accumulator",
    "fisher",
    "per_sample_fisher",
    "accumulate",
    "resolve_for",
    "check_chunk_size",
]

Params = Any
Batch = Any
Spec = Any
#: ``"auto"``: output probes for the weights that qualify, direct gradients elsewhere (exact either
#: way, see :mod:`fisherfunc.probes`); ``"direct"``: ``vmap(grad)`` of every parameter.
Path = Literal["auto", "direct"]


class PerSampleFisher(NamedTuple):
    """Per-sample group Fisher of one batch.

    Attributes:
        groups: group tree (params' structure, ``None`` for skipped); each leaf
            ``[B, *group_shape]`` holds ``rule.reduce(g_b ⊙ g_b)`` (not divided by tokens).
        tokens: ``[B]`` token count ``n_b`` of each sample.
    """

    groups: Any
    tokens: Tensor


class Accumulator(NamedTuple):
    """Exact one-shot sums: ``Σ_b rule.reduce(g_b ⊙ g_b)`` (group tree), ``Σ_b n_b`` and ``B``."""

    sums: Any
    tokens: float
    samples: int


def resolve_for(loss: PerSampleLoss, params: Params, spec: Spec | None) -> ResolvedSpec:
    """Resolve ``spec`` against ``params``; with ``spec=None`` infer it from ``loss.model``."""
    if isinstance(spec, ResolvedSpec):
        return spec
    if spec is None:
        model = getattr(loss, "model", None)
        if model is None:
            raise SpecError(
                "spec=None needs a loss built by fisherfunc.losses (which knows its model); for a plain "
                "callable pass spec=, e.g. spec=fisherfunc.Elementwise() for the full diagonal"
            )
        from .infer import infer_spec

        spec = infer_spec(model)
    return resolve_spec(spec, params)


def check_chunk_size(chunk_size: int | None) -> None:
    """Validate ``chunk_size``: a positive int (not a bool) or ``None``."""
    valid = chunk_size is None or (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1)
    if not valid:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _precheck(loss: PerSampleLoss, batch: Batch) -> tuple[int, Tensor | None]:
    """Cheap checks before any model call: batch shape, the loss's own checks, token count."""
    size = batch_size(batch)
    check = getattr(loss, "check", None)
    if check is not None:
        check(batch)
    counter = getattr(loss, "count_tokens", None)
    tokens = counter(batch) if counter is not None else None
    if tokens is not None and not float(tokens.sum()) > 0:
        raise BatchError("the batch has no tokens to learn from (every target is masked or ignored)")
    return size, tokens


def check_path(path: str) -> None:
    """Validate the computation path."""
    if path not in ("auto", "direct"):
        raise ValueError(f"path must be 'auto' or 'direct', got {path!r}")


def _chunk_fn(loss: PerSampleLoss, prepared: Prepared, batch: Batch, path: Path) -> ChunkFn:
    """The per-chunk computation for one batch (probe shapes are discovered from its first sample)."""
    if path == "direct":
        return direct_chunk_fn(loss, prepared)
    return auto_chunk_fn(loss, prepared, optree.tree_map(lambda x: x[0], batch))


def _stream(
    chunk_fn: ChunkFn, batch: Batch, size: int, chunk_size: int | None
) -> Iterable[tuple[tuple[Tensor, ...], Tensor]]:
    step = size if chunk_size is None else chunk_size
    for start in range(0, size, step):
        yield chunk_fn(take(batch, start, min(start + step, size)))


def _batch_sums(
    loss: PerSampleLoss, prepared: Prepared, batch: Batch, chunk_size: int | None, path: Path
) -> tuple[list[Tensor], float, int]:
    size, _ = _precheck(loss, batch)
    chunk_fn = _chunk_fn(loss, prepared, batch, path)
    sums: list[Tensor] | None = None
    tokens = torch.zeros((), dtype=prepared.dtype)
    for groups, n in _stream(chunk_fn, batch, size, chunk_size):
        part = [g.sum(0) for g in groups]
        sums = part if sums is None else [s + p for s, p in zip(sums, part)]
        tokens = tokens + n.sum().to(tokens.device)
    assert sums is not None
    total = float(tokens)
    if not total > 0:
        raise BatchError("the batch has no tokens to learn from (the loss returned num_tokens summing to 0)")
    return sums, total, size


def accumulate(
    loss: PerSampleLoss,
    params: Params,
    batches: Batch | Iterable[Batch],
    *,
    spec: Spec | None = None,
    chunk_size: int | None = None,
    path: Path = "auto",
) -> Accumulator:
    """Exact sums over one batch or an iterable of batches (see :class:`Accumulator`).

    Two accumulators over disjoint data add up to the accumulator of their union.
    """
    check_chunk_size(chunk_size)
    check_path(path)
    resolved = resolve_for(loss, params, spec)
    prepared = prepare(resolved, params)
    sums: list[Tensor] | None = None
    tokens, samples = 0.0, 0
    for batch in iter_batches(batches):
        part, n, b = _batch_sums(loss, prepared, batch, chunk_size, path)
        sums = part if sums is None else [s + p for s, p in zip(sums, part)]
        tokens, samples = tokens + n, samples + b
    if sums is None:
        raise BatchError("no batches were given")
    return Accumulator(resolved.unflatten_groups(sums), tokens, samples)


def fisher(
    loss: PerSampleLoss,
    params: Params,
    batches: Batch | Iterable[Batch],
    *,
    spec: Spec | None = None,
    chunk_size: int | None = None,
    path: Path = "auto",
) -> Any:
    """Token-normalised group Fisher of one batch or of an iterable of batches.

    ``F̂ = (Σ_b rule.reduce(g_b ⊙ g_b)) / (Σ_b n_b)`` over every sample of every batch: exact,
    and independent of how the data is split into batches or chunks.

    Args:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        params: pytree of parameter tensors (e.g. ``dict(model.named_parameters())``); not modified.
        batches: one batch (a tensor, tuple or mapping of tensors with a leading batch dimension)
            or an iterable of batches (list, generator, ``DataLoader``).
        spec: group rules (prefix tree, or callable); ``None`` infers them from ``loss.model``.
        chunk_size: samples per vectorised chunk (``None``: a whole batch at once). Peak
            per-sample gradient memory is ``chunk_size × |θ|``.
        path: ``"auto"`` (output probes for the linear-like weights that qualify, direct
            gradients elsewhere) or ``"direct"`` (``vmap(grad)`` of every parameter). Both are exact.

    Returns:
        Group tree with the params' structure; leaf shapes are the rules' group shapes, ``None``
        for ``Skip()``; float32 (float64 if the params are float64).

    >>> import torch, fisherfunc as ff
    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> F = ff.fisher(ff.losses.classification(model), dict(model.named_parameters()), (x, y))
    >>> F["weight"].shape   # one value per output channel
    torch.Size([3])
    """
    acc = accumulate(loss, params, batches, spec=spec, chunk_size=chunk_size, path=path)
    return _divide(acc.sums, acc.tokens)


def _divide(tree: Any, tokens: float) -> Any:
    return optree.tree_map(lambda s: s / tokens, tree)


def per_sample_fisher(
    loss: PerSampleLoss,
    params: Params,
    batch: Batch,
    *,
    spec: Spec | None = None,
    chunk_size: int | None = None,
    path: Path = "auto",
) -> PerSampleFisher:
    """Group Fisher of each sample of one batch: ``rule.reduce(g_b ⊙ g_b)`` and ``n_b``.

    ``fisher(loss, params, batch) == sum over b of groups / tokens.sum()``. Memory is
    ``chunk_size × |θ|`` for gradients plus the ``B × groups`` output.

    Args:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        params: pytree of parameter tensors; not modified.
        batch: one batch (leading dimension ``B``).
        spec: group rules; ``None`` infers them from ``loss.model``.
        chunk_size: samples per vectorised chunk (``None``: the whole batch).
        path: ``"auto"`` (probes where possible) or ``"direct"``; see :func:`fisher`.

    Returns:
        :class:`PerSampleFisher` with ``groups`` leaves ``[B, *group_shape]`` and ``tokens [B]``.
    """
    check_chunk_size(chunk_size)
    check_path(path)
    resolved = resolve_for(loss, params, spec)
    prepared = prepare(resolved, params)
    size, _ = _precheck(loss, batch)
    chunk_fn = _chunk_fn(loss, prepared, batch, path)
    parts = list(_stream(chunk_fn, batch, size, chunk_size))
    groups = [torch.cat([p[0][i] for p in parts]) for i in range(len(resolved.active))]
    tokens = torch.cat([p[1] for p in parts])
    return PerSampleFisher(resolved.unflatten_groups(groups), tokens)
