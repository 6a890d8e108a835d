"""One-shot estimates: per-sample group Fisher and the token-normalised batch / dataset Fisher.

Token-normalised empirical Fisher over all samples ``b`` of all batches::

    F̂ = ( Σ_b rule.reduce(g_b ⊙ g_b) ) / ( Σ_b n_b )

Batches are streamed chunk by chunk (``chunk_size`` samples at a time, :mod:`~fisherfunc._engine.loop`)
and each chunk's reduced values are summed immediately, so memory is ``chunk × |θ|`` for per-sample
gradients plus the group sums; the result does not depend on how the data is split into batches or
chunks.

``precision`` chooses the dtype of the forward and backward (``"float32"``, or the model's own
``"model"``; squares and sums are float32 either way, see :mod:`~fisherfunc._engine.numerics`);
``max_memory`` a budget that picks the chunk size (:mod:`~fisherfunc._engine.budget`).

``kind`` chooses the targets of the squared gradients: the dataset's labels (``Empirical()``),
labels sampled from the model (``MC(samples=k, seed=s)``) or the expectation over its classes
(``Exact()``); see :mod:`fisherfunc._engine.kinds`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from ._engine import loop
from ._engine.batches import Batch, BatchError, as_tree, batch_size
from ._engine.budget import Budget, parse_bytes
from ._engine.group_sums import GradientPath, GroupSums, Site
from ._engine.kinds import FisherKind, as_kind, label_sets
from ._engine.loop import ChunkFns
from ._engine.nonfinite import NonFiniteError, NonFinitePolicy, NonFiniteWarning, check_nonfinite, check_per_sample
from ._engine.numerics import Precision, Prepared, check_precision, prepare, scope
from ._engine.vectorise import PerSampleLoss
from ._spec.memo import SpecMemo, spec_memo
from ._spec.resolve import Params, ResolvedSpec, Spec
from ._spec.rules import SpecError

__all__ = [
    "PerSampleFisher",
    "Accumulator",
    "fisher",
    "per_sample_fisher",
    "accumulate",
    "resolve_for",
    "check_options",
    "precheck",
    "make_budget",
    "batch_accumulator",
]


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
    name of the Fisher kind the sums were taken at. Accumulators of disjoint data and the same kind
    merge exactly by adding every count field (:func:`fisherfunc.merge`).
    """

    sums: Any
    tokens: float
    samples: int
    skipped: int = 0
    kind: str = "empirical"


def resolve_for(loss: PerSampleLoss, params: Params, spec: Spec | None, memo: SpecMemo | None = None) -> ResolvedSpec:
    """Resolve ``spec`` against ``params``; with ``spec=None`` infer it from ``loss.model``.

    The result is kept in ``memo`` (default: the loss's one-shot memo) and reused while the spec's
    rules, the params' shapes and, for an inferred spec, the model's modules are unchanged
    (:mod:`~fisherfunc._spec.memo`).
    """
    if isinstance(spec, ResolvedSpec):
        return spec
    model = getattr(loss, "model", None)
    if spec is None and not isinstance(model, torch.nn.Module):
        raise SpecError(
            "spec=None needs a loss built by fisherfunc.losses (which knows its model); for a plain "
            "callable pass spec=, e.g. spec=fisherfunc.Elementwise() for the full diagonal"
        )
    return (memo if memo is not None else spec_memo(loss)).resolve(spec, params, model if spec is None else None)


def check_options(
    *,
    chunk_size: int | None = None,
    path: str = "auto",
    nonfinite: str = "raise",
    precision: str = "float32",
    max_memory: int | str | None = None,
) -> None:
    """Validate the options every estimate takes, before any work.

    Raises:
        ValueError: naming the option and the value at fault.
    """
    check_precision(precision)
    if max_memory is not None:
        parse_bytes(max_memory)
    valid = chunk_size is None or (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1)
    if not valid:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if path not in ("auto", "direct"):
        raise ValueError(f"path must be 'auto' or 'direct', got {path!r}")
    check_nonfinite(nonfinite)


def precheck(loss: PerSampleLoss, batch: Batch) -> int:
    """Cheap checks before any model call: batch shape, the loss's own checks, token count; the batch size."""
    size = batch_size(batch)
    check = getattr(loss, "check", None)
    if check is not None:
        check(batch)
    counter = getattr(loss, "count_tokens", None)
    tokens = counter(batch) if counter is not None else None
    if tokens is not None and not float(tokens.sum()) > 0:
        raise BatchError("the batch has no tokens to learn from (every target is masked or ignored)")
    return size


def prepare_for(loss: PerSampleLoss, params: Params, resolved: ResolvedSpec, precision: Precision) -> Prepared:
    """The prepared params of a call: differentiated leaves chosen by the spec, the loss's model completing a subset."""
    return prepare(params, differentiated=resolved.active, precision=precision, model=getattr(loss, "model", None))


def make_budget(
    max_memory: int | str | None, prepared: Prepared, chunk_size: int | None, plans: dict | None = None
) -> Budget | None:
    """The call's memory budget (``None`` without ``max_memory``), refusing one the call's own copies exceed.

    ``plans`` is a :class:`~fisherfunc.FisherStep`'s memo of chunk plans per sample shape.
    """
    if max_memory is None:
        return None
    budget = Budget(parse_bytes(max_memory), held=prepared.copied_bytes, cap=chunk_size)
    if plans is not None:
        budget.plans = plans
    budget.check_held()
    return budget


def batch_accumulator(
    loss: PerSampleLoss,
    params: Params,
    batches: Batch | Iterable[Batch],
    *,
    spec: Spec | None,
    chunk_size: int | None,
    path: GradientPath,
    kind: FisherKind | str,
    nonfinite: NonFinitePolicy,
    precision: Precision = "float32",
    max_memory: int | str | None = None,
    generator: torch.Generator | None = None,
    discovered: dict[tuple, tuple[Site, ...]] | None = None,
    plans: dict | None = None,
) -> Accumulator:
    """:func:`accumulate`, drawing ``"mc"`` labels from ``generator`` and keeping sites in ``discovered``.

    ``generator`` (default: ``kind.draws()``) is how a step draws from ``(seed, step)``;
    ``discovered`` and ``plans`` are a :class:`~fisherfunc.FisherStep`'s memos of probe sites and
    of the budget's chunk plans.
    """
    check_options(chunk_size=chunk_size, path=path, nonfinite=nonfinite, precision=precision, max_memory=max_memory)
    kind = as_kind(kind)
    labels = label_sets(loss, kind)
    draws = generator if generator is not None else kind.draws()
    resolved = resolve_for(loss, params, spec)
    prepared = prepare_for(loss, params, resolved, precision)
    budget = make_budget(max_memory, prepared, chunk_size, plans)
    engine = GroupSums(loss, prepared, resolved, path, labels, discovered)
    names = [resolved.names[i] for i in resolved.active]

    def compute(batch: Batch) -> tuple[list[Tensor], float, int]:
        size = precheck(loss, batch)
        source = batch if labels is None else (batch, labels.draw(batch, draws))

        def run(fns: ChunkFns) -> tuple[list[Tensor], float]:
            with scope(prepared):  # chunk-level contractions and sums: no outer autocast either (under "float32")
                return loop.batch_sums(fns, source, size, chunk_size, names, budget=budget, device=prepared.device)

        sums, tokens = engine.run(batch, run)
        return sums, tokens, size

    totals = loop.fold(batches, compute, nonfinite=nonfinite)
    sums = totals.sums
    if sums is None:  # every batch skipped: the empty accumulator (zeros), which merges as nothing
        wide = torch.promote_types(prepared.dtype, torch.float32)
        sums = [torch.zeros(resolved.groups_of(i), dtype=wide, device=prepared.leaves[i].device)
                for i in resolved.active]  # fmt: skip
    return Accumulator(resolved.unflatten_groups(sums), totals.tokens, totals.samples, totals.skipped, kind.name)


def accumulate(
    loss: PerSampleLoss,
    params: Params,
    batches: Batch | Iterable[Batch],
    *,
    spec: Spec | None = None,
    chunk_size: int | None = None,
    path: GradientPath = "auto",
    kind: FisherKind | str = "empirical",
    nonfinite: NonFinitePolicy = "raise",
    precision: Precision = "float32",
    max_memory: int | str | None = None,
) -> Accumulator:
    """Exact sums over one batch or an iterable of batches (see :class:`Accumulator`).

    Two accumulators over disjoint data add up to the accumulator of their union. Arguments as
    for :func:`fisher`; with ``nonfinite="skip"`` the skipped batches are counted in
    ``Accumulator.skipped``, and if every batch is skipped the sums are zeros (0 tokens).
    """
    return batch_accumulator(
        loss,
        params,
        batches,
        spec=spec,
        chunk_size=chunk_size,
        path=path,
        kind=kind,
        nonfinite=nonfinite,
        precision=precision,
        max_memory=max_memory,
    )


def fisher(
    loss: PerSampleLoss,
    params: Params,
    batches: Batch | Iterable[Batch],
    *,
    spec: Spec | None = None,
    chunk_size: int | None = None,
    path: GradientPath = "auto",
    kind: FisherKind | str = "empirical",
    nonfinite: NonFinitePolicy = "raise",
    precision: Precision = "float32",
    max_memory: int | str | None = None,
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
        kind: which targets: ``fisherfunc.Empirical()`` (the dataset's labels; the default),
            ``fisherfunc.MC(samples=k, seed=s)`` (labels sampled from the model) or
            ``fisherfunc.Exact(max_classes=C)`` (the expectation over the model's classes); the
            strings ``"empirical"`` and ``"exact"`` are shorthands.
        nonfinite: a batch whose per-sample values contain NaN/Inf is refused with a
            :class:`~fisherfunc.NonFiniteError` naming parameters and samples (``"raise"``), or
            left out with a ``NonFiniteWarning`` (``"skip"``; use :func:`accumulate` to get the
            count instead).
        precision: ``"float32"`` (forward and backward in float32, float64 if a differentiated
            parameter is float64, autocast off: exact arithmetic, at the cost of a float32 copy of
            every parameter of a low-precision model) or ``"model"`` (forward and backward in the
            model's own dtype, e.g. bfloat16, under the caller's autocast if any, no parameter
            copied; only squares, sums and the result in float32; float16 is refused). See
            docs/precision.md for the measured error of ``"model"``.
        max_memory: a budget in bytes (an int, or a string such as ``"8GiB"`` or ``"500MB"``) for
            what the call allocates beyond the model and the batch: two trial chunks (one sample,
            then two) measure the memory per sample and the chunk size is chosen to stay within it
            (``chunk_size`` is then an upper bound). A budget below one sample's need raises a
            ``BudgetError`` naming both.

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
        nonfinite=nonfinite,
        precision=precision,
        max_memory=max_memory,
    )
    if acc.skipped and not acc.samples:
        raise NonFiniteError.all_skipped(acc.skipped)
    if acc.skipped:
        warnings.warn(f"skipped {acc.skipped} batch(es) with non-finite per-sample values", NonFiniteWarning, 2)
    return optree.tree_map(lambda s: s / acc.tokens, acc.sums)


def per_sample_fisher(
    loss: PerSampleLoss,
    params: Params,
    batch: Batch,
    *,
    spec: Spec | None = None,
    chunk_size: int | None = None,
    path: GradientPath = "auto",
    kind: FisherKind | str = "empirical",
    precision: Precision = "float32",
    max_memory: int | str | None = None,
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
        kind: ``Empirical()``, ``MC(samples=k, seed=s)`` or ``Exact()``; see :func:`fisher`.
        precision: ``"float32"`` or ``"model"``; see :func:`fisher`.
        max_memory: a budget that picks the chunk size; see :func:`fisher` (the ``B × groups``
            output is held outside it).

    Returns:
        :class:`PerSampleFisher` with ``groups`` leaves ``[B, *group_shape]`` and ``tokens [B]``.

    Raises:
        NonFiniteError: NaN/Inf per-sample values, naming the parameters and samples.
    """
    check_options(chunk_size=chunk_size, path=path, precision=precision, max_memory=max_memory)
    kind = as_kind(kind)
    labels = label_sets(loss, kind)
    resolved = resolve_for(loss, params, spec)
    prepared = prepare_for(loss, params, resolved, precision)
    budget = make_budget(max_memory, prepared, chunk_size)
    batch = as_tree(batch)
    size = precheck(loss, batch)
    engine = GroupSums(loss, prepared, resolved, path, labels)
    source = batch if labels is None else (batch, labels.draw(batch, kind.draws()))

    def run(fns: ChunkFns) -> list[tuple[tuple[Tensor, ...], Tensor]]:
        with scope(prepared):
            return list(loop.planned(fns.per_sample, source, size, chunk_size, budget, prepared.device))

    parts = engine.run(batch, run)
    groups = [torch.cat([p[0][i] for p in parts]) for i in range(len(resolved.active))]
    tokens = torch.cat([p[1] for p in parts])
    check_per_sample([resolved.names[i] for i in resolved.active], groups, tokens)  # NaN/Inf: NonFiniteError
    return PerSampleFisher(resolved.unflatten_groups(groups), tokens)
