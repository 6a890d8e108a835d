"""One-shot estimates: per-sample group Fisher and the token-normalised batch / dataset Fisher.

Token-normalised empirical Fisher over all samples ``b`` of all batches::

    F̂ = ( Σ_b rule.reduce(g_b ⊙ g_b) ) / ( Σ_b n_b )

Batches are streamed chunk by chunk (``chunk_size`` samples at a time) and each chunk's reduced
values are summed immediately, so memory is ``chunk × |θ|`` for per-sample gradients plus the
group sums; the result does not depend on how the data is split into batches or chunks.

``kind`` chooses the targets of the squared gradients: the dataset's labels (``"empirical"``),
labels sampled from the model (``"mc"``) or the expectation over its classes (``"exact"``); see
:mod:`fisherfunc.kinds`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

import optree
import torch
from torch import Tensor

from .batch import BatchError, as_tree, batch_size, iter_batches, take
from .kinds import DEFAULT_MAX_CLASSES, FisherKind, LabelSets, check_kind, resolve_kind
from .nonfinite import FiniteCheck, NonFiniteError, NonFinitePolicy, NonFiniteWarning, check_nonfinite
from .per_sample import ChunkFns, PerSampleLoss, Prepared, direct_chunk_fn, prepare, summed
from .probes import Site, auto_chunk_fns, discover_sites
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
    """Exact one-shot sums: ``Σ_b rule.reduce(g_b ⊙ g_b)`` (group tree), ``Σ_b n_b`` and ``B``.

    ``skipped`` counts the batches left out as non-finite (``nonfinite="skip"``); ``kind`` is the
    Fisher kind the sums were taken at. Accumulators of disjoint data and the same kind merge
    exactly by adding every count field (:func:`fisherfunc.merge`).
    """

    sums: Any
    tokens: float
    samples: int
    skipped: int = 0
    kind: str = "empirical"


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


#: Discovered probe sites kept across calls (by :class:`~fisherfunc.step.FisherStep`), keyed by
#: :func:`_discovery_key`; at most this many keys, then it starts over.
_MAX_DISCOVERED = 64


def _discovery_key(loss: PerSampleLoss, prepared: Prepared, sample_key: tuple) -> tuple:
    """Everything discovery's result depends on, but the loss's code and the params' values.

    The loss, the resolved spec (names, rules, shapes), the dtypes and devices of the leaves, the
    samples' shapes and dtypes, and the training flags of ``loss.model``'s modules (a module may
    call other layers in training mode).
    """
    spec = prepared.spec
    model = getattr(loss, "model", None)
    modes = tuple(m.training for m in model.modules()) if isinstance(model, torch.nn.Module) else ()
    leaves = tuple((leaf.dtype, leaf.device) for leaf in prepared.leaves)
    return (id(loss), spec.names, spec.rules, spec.shapes, prepared.dtype, leaves, modes, sample_key)


def _chunk_fn(
    loss: PerSampleLoss,
    prepared: Prepared,
    batch: Batch,
    path: Path,
    labels: LabelSets | None = None,
    cache: dict[Any, ChunkFns] | None = None,
    discovered: dict[tuple, tuple[Site, ...]] | None = None,
) -> ChunkFns:
    """The per-chunk computation for one batch, in both forms (probe shapes are discovered from its first sample).

    ``cache`` (one per call over the same ``prepared`` params) reuses the computation for later
    batches whose samples have the same shapes and dtypes, so discovery runs once per shape.
    ``discovered`` keeps the discovered sites across calls (a ``FisherStep``'s), so a step over
    batches of shapes seen before runs no discovery at all.
    """
    key = tuple((tuple(x.shape[1:]), x.dtype) for x in optree.tree_leaves(batch))
    if cache is not None and key in cache:
        return cache[key]
    if path == "direct":
        fn = summed(direct_chunk_fn(loss, prepared, labels=labels))
    else:
        sample = optree.tree_map(lambda x: x[0], batch)
        sites = None
        if discovered is not None:
            found = _discovery_key(loss, prepared, key)
            sites = discovered.get(found)
            if sites is None:
                sites = discover_sites(loss, prepared, sample)
                if len(discovered) >= _MAX_DISCOVERED:
                    discovered.clear()
                discovered[found] = sites
        fn = auto_chunk_fns(loss, prepared, sample, labels=labels, sites=sites)
    if cache is not None:
        cache[key] = fn
    return fn


def _with_noise(batch: Batch, labels: LabelSets | None, generator: torch.Generator | None) -> Batch:
    """What the chunks are sliced from: the batch, or ``(batch, noise)`` with all draws made up front."""
    return batch if labels is None else (batch, labels.draw(batch, generator))


def _stream(
    chunk_fn: Callable[[Any], tuple[tuple[Tensor, ...], Tensor]], batch: Batch, size: int, chunk_size: int | None
) -> Iterable[tuple[tuple[Tensor, ...], Tensor]]:
    step = size if chunk_size is None else chunk_size
    for start in range(0, size, step):
        yield chunk_fn(take(batch, start, min(start + step, size)))


def _batch_sums(
    loss: PerSampleLoss,
    prepared: Prepared,
    batch: Batch,
    chunk_size: int | None,
    path: Path,
    labels: LabelSets | None = None,
    generator: torch.Generator | None = None,
    cache: dict[Any, ChunkFns] | None = None,
    discovered: dict[tuple, tuple[Site, ...]] | None = None,
) -> tuple[list[Tensor], float, int]:
    size, _ = _precheck(loss, batch)
    fns = _chunk_fn(loss, prepared, batch, path, labels, cache, discovered)
    sums: list[Tensor] | None = None
    tokens = torch.zeros((), dtype=prepared.dtype)
    source = _with_noise(batch, labels, generator)
    names = [prepared.spec.names[i] for i in prepared.spec.active]
    # only the chunk sums are needed (the path may contract some at batch level); a flagged chunk
    # is rerun per sample to name its samples
    finite = FiniteCheck(names, rerun=lambda start, stop: fns.per_sample(take(source, start, stop)))
    for groups, n in _stream(fns.sums, source, size, chunk_size):
        part = list(groups)
        finite.add(part, n)  # NaN/Inf in a per-sample value makes its chunk's sum non-finite
        sums = part if sums is None else [s + p for s, p in zip(sums, part)]
        tokens = tokens + n.sum().to(tokens.device)
    assert sums is not None
    finite.check(sums)  # one host sync; raises NonFiniteError naming parameters and samples
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
    kind: FisherKind | str = "empirical",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    max_classes: int = DEFAULT_MAX_CLASSES,
    nonfinite: NonFinitePolicy = "raise",
) -> Accumulator:
    """Exact sums over one batch or an iterable of batches (see :class:`Accumulator`).

    Two accumulators over disjoint data add up to the accumulator of their union. Arguments as
    for :func:`fisher`; with ``nonfinite="skip"`` the skipped batches are counted in
    ``Accumulator.skipped``, and if every batch is skipped the sums are zeros (0 tokens).
    """
    return _accumulate(
        loss,
        params,
        batches,
        spec=spec,
        chunk_size=chunk_size,
        path=path,
        kind=kind,
        mc_samples=mc_samples,
        generator=generator,
        seed=seed,
        max_classes=max_classes,
        nonfinite=nonfinite,
    )


def _accumulate(
    loss: PerSampleLoss,
    params: Params,
    batches: Batch | Iterable[Batch],
    *,
    spec: Spec | None,
    chunk_size: int | None,
    path: Path,
    kind: FisherKind | str,
    mc_samples: int,
    generator: torch.Generator | None,
    seed: int | None,
    max_classes: int,
    nonfinite: NonFinitePolicy,
    discovered: dict[tuple, tuple[Site, ...]] | None = None,
) -> Accumulator:
    """:func:`accumulate`, with the probe sites found by earlier calls in ``discovered`` (see :func:`_chunk_fn`)."""
    check_chunk_size(chunk_size)
    check_path(path)
    check_nonfinite(nonfinite)
    labels, generator = resolve_kind(
        loss, kind, mc_samples=mc_samples, generator=generator, seed=seed, max_classes=max_classes
    )
    resolved = resolve_for(loss, params, spec)
    prepared = prepare(resolved, params)
    sums: list[Tensor] | None = None
    tokens, samples, skipped = 0.0, 0, 0
    cache: dict[Any, ChunkFns] = {}
    for index, batch in enumerate(iter_batches(batches)):
        try:
            part, n, b = _batch_sums(loss, prepared, batch, chunk_size, path, labels, generator, cache, discovered)
        except NonFiniteError as err:
            if nonfinite == "raise":
                raise (err if isinstance(batches, (Tensor, tuple, Mapping)) else err.at_batch(index)) from None
            skipped += 1
            continue
        sums = part if sums is None else [s + p for s, p in zip(sums, part)]
        tokens, samples = tokens + n, samples + b
    if sums is None and not skipped:
        raise BatchError("no batches were given")
    if sums is None:  # every batch skipped: the empty accumulator (zeros), which merges as nothing
        sums = [torch.zeros(resolved.group_shapes[i], dtype=prepared.dtype, device=p.device)
                for i, p in zip(resolved.active, prepared.active)]  # fmt: skip
    return Accumulator(resolved.unflatten_groups(sums), tokens, samples, skipped, check_kind(kind).value)


def fisher(
    loss: PerSampleLoss,
    params: Params,
    batches: Batch | Iterable[Batch],
    *,
    spec: Spec | None = None,
    chunk_size: int | None = None,
    path: Path = "auto",
    kind: FisherKind | str = "empirical",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    max_classes: int = DEFAULT_MAX_CLASSES,
    nonfinite: NonFinitePolicy = "raise",
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
        kind: ``"empirical"`` (the dataset's labels; the default), ``"mc"`` (labels sampled from
            the model) or ``"exact"`` (the expectation over the model's classes); see
            :mod:`fisherfunc.kinds` for the equations, costs and when to use which.
        mc_samples: draws per example for ``"mc"``.
        generator: the ``torch.Generator`` that ``"mc"`` draws from (advanced by the call).
        seed: an int seed for ``"mc"`` instead of ``generator`` (a fresh generator per call).
        max_classes: the most classes (or Gaussian outputs) ``"exact"`` may enumerate.
        nonfinite: a batch whose per-sample values contain NaN/Inf is refused with a
            :class:`~fisherfunc.nonfinite.NonFiniteError` naming parameters and samples
            (``"raise"``), or left out with a :class:`~fisherfunc.nonfinite.NonFiniteWarning`
            (``"skip"``; use :func:`accumulate` to get the count instead).

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
    acc = accumulate(
        loss,
        params,
        batches,
        spec=spec,
        chunk_size=chunk_size,
        path=path,
        kind=kind,
        mc_samples=mc_samples,
        generator=generator,
        seed=seed,
        max_classes=max_classes,
        nonfinite=nonfinite,
    )
    if acc.skipped and not acc.samples:
        raise NonFiniteError.all_skipped(acc.skipped)
    if acc.skipped:
        warnings.warn(f"skipped {acc.skipped} batch(es) with non-finite per-sample values", NonFiniteWarning, 2)
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
    kind: FisherKind | str = "empirical",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    max_classes: int = DEFAULT_MAX_CLASSES,
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
        kind: ``"empirical"`` (the dataset's labels; the default), ``"mc"`` (labels sampled from
            the model) or ``"exact"`` (the expectation over the model's classes); see
            :mod:`fisherfunc.kinds` for the equations, costs and when to use which.
        mc_samples: draws per example for ``"mc"``.
        generator: the ``torch.Generator`` that ``"mc"`` draws from (advanced by the call).
        seed: an int seed for ``"mc"`` instead of ``generator`` (a fresh generator per call).
        max_classes: the most classes (or Gaussian outputs) ``"exact"`` may enumerate.

    Returns:
        :class:`PerSampleFisher` with ``groups`` leaves ``[B, *group_shape]`` and ``tokens [B]``.
    """
    check_chunk_size(chunk_size)
    check_path(path)
    labels, generator = resolve_kind(
        loss, kind, mc_samples=mc_samples, generator=generator, seed=seed, max_classes=max_classes
    )
    resolved = resolve_for(loss, params, spec)
    prepared = prepare(resolved, params)
    batch = as_tree(batch)
    size, _ = _precheck(loss, batch)
    chunk_fn = _chunk_fn(loss, prepared, batch, path, labels).per_sample
    parts = list(_stream(chunk_fn, _with_noise(batch, labels, generator), size, chunk_size))
    groups = [torch.cat([p[0][i] for p in parts]) for i in range(len(resolved.active))]
    tokens = torch.cat([p[1] for p in parts])
    return PerSampleFisher(resolved.unflatten_groups(groups), tokens)
