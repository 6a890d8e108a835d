"""Invariant checks: point them at your own ``(loss, params, batch, spec)``.

Each check computes the same Fisher two ways that must agree mathematically and raises
``AssertionError`` naming the parameter, the group and the size of the disagreement.

Comparison, per group tree leaf (one parameter), with ``f = max|expected leaf|`` and
``G = max over every leaf of max|expected|``::

    max |actual − expected| ≤ atol + rtol · max(f, √(f · G))

Fisher values are squares, ``s = g²``, and rounding errs on ``g`` by ``δ ≈ ε·‖g‖`` absolutely, so
``s`` errs by ``2|g|δ + δ² ≈ ε·√(s · G)``: relative to ``f`` for the largest parameters, and to
``√(f · G)`` for a parameter whose gradient is tiny or vanishes analytically (the attention key
bias; anything in front of a LayerNorm over two features), which otherwise holds pure rounding
noise. ``rtol=None`` picks ``1e-10`` for float64 and ``1e-4`` for float32 results.

>>> import torch, fisherfunc as ff
>>> from fisherfunc.testing import invariants
>>> model = torch.nn.Linear(3, 2).double()
>>> loss = ff.losses.classification(model)
>>> batch = (torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))
>>> invariants.check_all(loss, dict(model.named_parameters()), batch, ff.Channel(0))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import optree
import torch
from torch import Tensor

from .._engine.batches import batch_size, take
from .._estimate import PerSampleFisher, accumulate, fisher, per_sample_fisher, resolve_for
from .._spec.rules import Rule, Skip
from .._state.state import FisherState, estimate
from .._state.step import make_fisher_step

__all__ = [
    "assert_fisher_close",
    "check_conservation",
    "check_token_invariance",
    "check_permutation_invariance",
    "check_chunk_invariance",
    "check_split_additivity",
    "check_per_sample_consistency",
    "check_paths_agree",
    "check_ema_constant",
    "check_decay_zero",
    "check_pure_step",
    "check_all",
]

Params = Any
Batch = Any
Spec = Any
Loss = Callable[[Any, Any], tuple[Tensor, Any]]


# --- comparison helpers ---------------------------------------------------------------------------


def _default_rtol(tree: Any) -> float:
    leaves = [x for x in optree.tree_leaves(tree) if isinstance(x, Tensor)]
    return 1e-10 if any(x.dtype == torch.float64 for x in leaves) else 1e-4


def _assert_close(check: str, what: str, actual: Any, expected: Any, rtol: float | None, atol: float) -> None:
    """Leaf by leaf: ``max|a − e| ≤ atol + rtol · max(f, √(f·G))``; ``None`` leaves (Skip) must match."""
    if isinstance(expected, PerSampleFisher):  # groups and token counts have different units
        if not isinstance(actual, PerSampleFisher):
            raise AssertionError(f"{check}: {what}: got a {type(actual).__name__}, expected a PerSampleFisher")
        _assert_close(check, f"{what} (groups)", actual.groups, expected.groups, rtol, atol)
        _assert_close(check, f"{what} (tokens)", actual.tokens, expected.tokens, rtol, atol)
        return
    rtol = _default_rtol(expected) if rtol is None else rtol
    paths, exp_leaves, treespec = optree.tree_flatten_with_path(expected, none_is_leaf=True)
    try:
        act_leaves: list[Any] = list(treespec.flatten_up_to(actual))
    except (ValueError, TypeError) as err:
        raise AssertionError(f"{check}: {what}: the group trees differ in structure ({err})") from None
    tensors = [e for e in exp_leaves if isinstance(e, Tensor) and e.numel() > 0]
    tree_scale = max((float(e.detach().abs().max()) for e in tensors), default=0.0)
    for path, a, e in zip(paths, act_leaves, exp_leaves, strict=True):
        name = ".".join(map(str, path)) or "<root>"
        if a is None or e is None:
            if a is not e:
                raise AssertionError(f"{check}: {what}: entry '{name}' is {a!r} but expected {e!r}")
            continue
        if a.shape != e.shape or a.dtype != e.dtype:
            raise AssertionError(
                f"{check}: {what}: entry '{name}' has shape {tuple(a.shape)} {a.dtype}, "
                f"expected {tuple(e.shape)} {e.dtype}"
            )
        if a.numel() == 0:
            continue
        a64, e64 = a.detach().double().cpu(), e.detach().double().cpu()
        if not (torch.isfinite(a64).all() and torch.isfinite(e64).all()):
            raise AssertionError(f"{check}: {what}: entry '{name}' is not finite:\n  got {a64}\n  expected {e64}")
        diff = (a64 - e64).abs()
        scale = float(e64.abs().max())
        tol = atol + rtol * max(scale, (scale * tree_scale) ** 0.5)
        worst = float(diff.max())
        if not worst <= tol:
            index = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), tuple(diff.shape)))
            raise AssertionError(
                f"{check}: {what}: entry '{name}' differs at group {list(index)}: "
                f"{float(a64[index]):.17g} vs expected {float(e64[index]):.17g}; "
                f"max |diff| {worst:.3g} > tolerance {tol:.3g} (atol {atol:g} + rtol {rtol:g} × "
                f"max(f, √(f·G)) with f = max|expected| {scale:.3g}, G = largest value of any entry {tree_scale:.3g})"
            )


def assert_fisher_close(
    actual: Any, expected: Any, *, rtol: float | None = None, atol: float = 0.0, what: str = "Fisher"
) -> None:
    """Assert two group trees (or :class:`~fisherfunc.PerSampleFisher`) agree, as every check does.

    Per parameter, ``max|actual − expected| ≤ atol + rtol · max(f, √(f · G))`` (see the module
    docstring); skipped (``None``) entries must match, shapes and dtypes must be equal.

    Args:
        actual: the computed group tree.
        expected: the reference group tree.
        rtol: relative tolerance (``None``: ``1e-10`` for float64, ``1e-4`` otherwise).
        atol: absolute tolerance.
        what: a description for the message.

    Raises:
        AssertionError: naming the parameter and the group that differ most.
    """
    _assert_close("assert_fisher_close", what, actual, expected, rtol, atol)


def _cat(batches: Sequence[Batch]) -> Batch:
    return optree.tree_map(lambda *xs: torch.cat(xs), *batches)


def _flat_rules(loss: Loss, params: Params, spec: Spec) -> list[tuple[str, Rule, Tensor]]:
    resolved = resolve_for(loss, params, spec)
    leaves: list[Any] = list(resolved.treespec.flatten_up_to(params))
    return [(resolved.names[i], resolved.rules[i], leaves[i]) for i in resolved.active]


# --- rules ----------------------------------------------------------------------------------------


def check_conservation(rule: Rule, x: Tensor, *, rtol: float | None = None, atol: float = 0.0) -> None:
    """Conservation of one rule: ``rule.reduce(x).sum() == x.sum()``, and the group shape.

    ``|Σ reduce(x) − Σ x| ≤ atol + rtol · Σ |x|``; the result must have the shape
    ``rule.group_shape(x.shape)`` and the dtype of ``x``.

    Args:
        rule: any rule but ``Skip()``.
        x: a tensor of the parameter's shape (non-negative, like squared gradients).
        rtol: relative tolerance on the sums, against ``Σ |x|`` (``None``: ``1e-12`` for float64
            ``x``, ``1e-5`` otherwise).
        atol: absolute tolerance.

    Raises:
        AssertionError: if the sums, the shape or the dtype disagree.
    """
    rtol = (1e-12 if x.dtype == torch.float64 else 1e-5) if rtol is None else rtol
    if isinstance(rule, Skip):
        raise ValueError("Skip() has no groups; conservation applies to every other rule")
    expected_shape = rule.group_shape(x.shape)
    groups = rule.reduce(x)
    if groups.shape != expected_shape or groups.dtype != x.dtype:
        raise AssertionError(
            f"check_conservation: {rule!r} on shape {tuple(x.shape)} gave {tuple(groups.shape)} {groups.dtype}, "
            f"expected group_shape {tuple(expected_shape)} {x.dtype}"
        )
    total, reduced = float(x.double().sum()), float(groups.double().sum())
    tol = atol + rtol * float(x.double().abs().sum())
    if not abs(reduced - total) <= tol:
        raise AssertionError(
            f"check_conservation: {rule!r} on shape {tuple(x.shape)} does not conserve the sum: "
            f"Σ reduce(x) = {reduced:.17g}, Σ x = {total:.17g}, |diff| {abs(reduced - total):.3g} > tolerance {tol:.3g}"
        )


# --- one-shot estimates ---------------------------------------------------------------------------


def check_token_invariance(
    loss: Loss,
    params: Params,
    batch: Batch,
    spec: Spec = None,
    *,
    chunk_size: int | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
) -> None:
    """Duplicating the batch leaves the token-normalised Fisher unchanged.

    ``F̂(batch ⧺ batch) = 2 Σ_b s_b / 2 Σ_b n_b = F̂(batch)``, and the same for the two copies
    passed as an iterable of batches.

    Args:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        params: pytree of parameter tensors.
        batch: one batch.
        spec: group rules (``None``: inferred from ``loss.model``).
        chunk_size: passed to :func:`fisherfunc.fisher`.
        rtol: relative tolerance (norm-wise per parameter; ``None``: from the dtype).
        atol: absolute tolerance.

    Raises:
        AssertionError: naming the parameter and group that moved.
    """
    once = fisher(loss, params, batch, spec=spec, chunk_size=chunk_size)
    twice = fisher(loss, params, _cat([batch, batch]), spec=spec, chunk_size=chunk_size)
    _assert_close("check_token_invariance", "Fisher of the batch concatenated with itself", twice, once, rtol, atol)
    listed = fisher(loss, params, [batch, batch], spec=spec, chunk_size=chunk_size)
    _assert_close("check_token_invariance", "Fisher of [batch, batch]", listed, once, rtol, atol)


def check_permutation_invariance(
    loss: Loss,
    params: Params,
    batch: Batch,
    spec: Spec = None,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
) -> None:
    """Permuting the samples of a batch leaves the Fisher unchanged (and permutes per-sample values).

    Args:
        loss: per-sample loss.
        params: pytree of parameter tensors.
        batch: one batch.
        spec: group rules (``None``: inferred from ``loss.model``).
        generator: draws the permutation (``torch.randperm``); pass a seeded one to reproduce.
        chunk_size: passed to :func:`fisherfunc.fisher`.
        rtol: relative tolerance (``None``: from the dtype).
        atol: absolute tolerance.

    Raises:
        AssertionError: naming the parameter and group that moved.
    """
    perm = torch.randperm(batch_size(batch), generator=generator)
    shuffled = optree.tree_map(lambda x: x[perm.to(x.device)], batch)
    base = fisher(loss, params, batch, spec=spec, chunk_size=chunk_size)
    moved = fisher(loss, params, shuffled, spec=spec, chunk_size=chunk_size)
    _assert_close(
        "check_permutation_invariance",
        f"Fisher after permuting the samples by {perm.tolist()}",
        moved,
        base,
        rtol,
        atol,
    )
    per = per_sample_fisher(loss, params, batch, spec=spec, chunk_size=chunk_size)
    per_moved = per_sample_fisher(loss, params, shuffled, spec=spec, chunk_size=chunk_size)
    expected = optree.tree_map(lambda g: g[perm.to(g.device)], cast(Any, per), none_is_leaf=False)
    _assert_close(
        "check_permutation_invariance", "per-sample Fisher of the permuted batch", per_moved, expected, rtol, atol
    )


def check_chunk_invariance(
    loss: Loss,
    params: Params,
    batch: Batch,
    spec: Spec = None,
    *,
    chunk_sizes: Sequence[int] = (1, 2, 3),
    rtol: float | None = None,
    atol: float = 0.0,
) -> None:
    """Check that the Fisher and the per-sample Fisher do not depend on ``chunk_size``.

    Args:
        loss: per-sample loss.
        params: pytree of parameter tensors.
        batch: one batch.
        spec: group rules (``None``: inferred from ``loss.model``).
        chunk_sizes: chunk sizes compared with ``chunk_size=None`` (the whole batch at once).
        rtol: relative tolerance (``None``: from the dtype).
        atol: absolute tolerance.

    Raises:
        AssertionError: naming the chunk size, the parameter and the group.
    """
    whole = fisher(loss, params, batch, spec=spec)
    per_whole = per_sample_fisher(loss, params, batch, spec=spec)
    for size in chunk_sizes:
        chunked = fisher(loss, params, batch, spec=spec, chunk_size=size)
        _assert_close("check_chunk_invariance", f"Fisher with chunk_size={size}", chunked, whole, rtol, atol)
        per = per_sample_fisher(loss, params, batch, spec=spec, chunk_size=size)
        _assert_close("check_chunk_invariance", f"per-sample Fisher with chunk_size={size}", per, per_whole, rtol, atol)


def check_split_additivity(
    loss: Loss,
    params: Params,
    batches: Sequence[Batch],
    spec: Spec = None,
    *,
    chunk_size: int | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
) -> None:
    """Fisher over a batch split in two equals the Fisher over the merged batch.

    With ``S_i = Σ_{b ∈ batch_i} s_b`` and ``N_i = Σ_{b ∈ batch_i} n_b``::

        F̂([batch_1, batch_2]) = F̂(batch_1 ⧺ batch_2) = (S_1 + S_2) / (N_1 + N_2)
                              = (N_1 F̂(batch_1) + N_2 F̂(batch_2)) / (N_1 + N_2)

    Args:
        loss: per-sample loss.
        params: pytree of parameter tensors.
        batches: the two parts ``[batch_1, batch_2]`` (each with tokens).
        spec: group rules (``None``: inferred from ``loss.model``).
        chunk_size: passed to :func:`fisherfunc.fisher`.
        rtol: relative tolerance (``None``: from the dtype).
        atol: absolute tolerance.

    Raises:
        AssertionError: naming the parameter and group, or the token/sample counts.
    """
    if len(batches) != 2:
        raise ValueError(f"check_split_additivity takes a list of two batches, got {len(batches)}")
    first, second = batches
    merged = _cat([first, second])
    whole = fisher(loss, params, merged, spec=spec, chunk_size=chunk_size)
    streamed = fisher(loss, params, [first, second], spec=spec, chunk_size=chunk_size)
    _assert_close("check_split_additivity", "Fisher of [batch_1, batch_2]", streamed, whole, rtol, atol)
    a = accumulate(loss, params, first, spec=spec, chunk_size=chunk_size)
    b = accumulate(loss, params, second, spec=spec, chunk_size=chunk_size)
    ab = accumulate(loss, params, merged, spec=spec, chunk_size=chunk_size)
    if (a.tokens + b.tokens, a.samples + b.samples) != (ab.tokens, ab.samples):
        raise AssertionError(
            f"check_split_additivity: tokens/samples of the parts ({a.tokens} + {b.tokens}, {a.samples} + "
            f"{b.samples}) do not add up to the merged batch's ({ab.tokens}, {ab.samples})"
        )
    summed = optree.tree_map(lambda x, y: x + y, a.sums, b.sums)
    _assert_close("check_split_additivity", "sum of the parts' accumulated sums", summed, ab.sums, rtol, atol)
    weighted = optree.tree_map(lambda x, y: (x + y) / (a.tokens + b.tokens), a.sums, b.sums)
    _assert_close("check_split_additivity", "token-weighted mean of the parts' Fisher", weighted, whole, rtol, atol)


def check_per_sample_consistency(
    loss: Loss,
    params: Params,
    batch: Batch,
    spec: Spec = None,
    *,
    chunk_size: int | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
) -> None:
    """``Σ_b per_sample.groups[b] / Σ_b per_sample.tokens[b] == fisher(batch)``.

    Also checks the shapes: groups ``[B, *group_shape]``, tokens ``[B]``.

    Args:
        loss: per-sample loss.
        params: pytree of parameter tensors.
        batch: one batch.
        spec: group rules (``None``: inferred from ``loss.model``).
        chunk_size: passed to both computations.
        rtol: relative tolerance (``None``: from the dtype).
        atol: absolute tolerance.

    Raises:
        AssertionError: naming the parameter and group, or the malformed shape.
    """
    size = batch_size(batch)
    per = per_sample_fisher(loss, params, batch, spec=spec, chunk_size=chunk_size)
    expected = fisher(loss, params, batch, spec=spec, chunk_size=chunk_size)
    if per.tokens.shape != (size,):
        raise AssertionError(
            f"check_per_sample_consistency: tokens have shape {tuple(per.tokens.shape)}, expected ({size},)"
        )
    paths, leaves, _ = optree.tree_flatten_with_path(per.groups)
    bad = [
        (".".join(map(str, p)), tuple(g.shape))
        for p, g in zip(paths, leaves, strict=True)
        if g.ndim == 0 or g.shape[0] != size
    ]
    if bad:
        raise AssertionError(f"check_per_sample_consistency: per-sample groups lack the batch dimension {size}: {bad}")
    total = float(per.tokens.sum())
    mean = optree.tree_map(lambda g: g.sum(0) / total, per.groups)
    _assert_close("check_per_sample_consistency", "Σ per-sample groups / Σ tokens", mean, expected, rtol, atol)


def check_paths_agree(
    loss: Loss,
    params: Params,
    batch: Batch,
    spec: Spec = None,
    *,
    chunk_size: int | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
) -> None:
    """Check that the factorised path (``path="auto"``) agrees with ``vmap(grad)`` (``"direct"``).

    Both compute ``rule.reduce(g_b ⊙ g_b)`` exactly; ``"auto"`` from layer inputs and output
    gradients for the weights that qualify (DESIGN §6). Compared per sample and for the batch.

    Args:
        loss: per-sample loss.
        params: pytree of parameter tensors.
        batch: one batch.
        spec: group rules (``None``: inferred from ``loss.model``).
        chunk_size: passed to both computations.
        rtol: relative tolerance (``None``: from the dtype).
        atol: absolute tolerance.

    Raises:
        AssertionError: naming the parameter and group.
    """
    direct = per_sample_fisher(loss, params, batch, spec=spec, chunk_size=chunk_size, path="direct")
    auto = per_sample_fisher(loss, params, batch, spec=spec, chunk_size=chunk_size, path="auto")
    _assert_close("check_paths_agree", 'per-sample Fisher, path="auto" vs "direct"', auto, direct, rtol, atol)
    direct_f = fisher(loss, params, batch, spec=spec, chunk_size=chunk_size, path="direct")
    auto_f = fisher(loss, params, batch, spec=spec, chunk_size=chunk_size, path="auto")
    _assert_close("check_paths_agree", 'Fisher, path="auto" vs "direct"', auto_f, direct_f, rtol, atol)


# --- steps ----------------------------------------------------------------------------------------


def check_ema_constant(
    loss: Loss,
    params: Params,
    batch: Batch,
    spec: Spec = None,
    *,
    decay: float = 0.9,
    steps: int = 3,
    chunk_size: int | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
) -> None:
    """Feed the same batch ``steps`` times: ``estimate(state) == fisher(batch)`` at every step.

    With a constant ``F̂``, ``m_t = (1 − β^t) F̂`` and the bias-corrected estimate is exactly ``F̂``;
    the counters must read ``step = t``, ``samples = t·B``, ``tokens = t·Σ n_b``.

    Args:
        loss: per-sample loss.
        params: pytree of parameter tensors.
        batch: one batch.
        spec: group rules (``None``: inferred from ``loss.model``).
        decay: the EMA decay ``β`` in ``[0, 1)``.
        steps: number of steps.
        chunk_size: passed to both computations.
        rtol: relative tolerance (``None``: from the dtype).
        atol: absolute tolerance.

    Raises:
        AssertionError: naming the step, the parameter and the group, or the counter.
    """
    expected = fisher(loss, params, batch, spec=spec, chunk_size=chunk_size)
    tokens = accumulate(loss, params, batch, spec=spec, chunk_size=chunk_size).tokens
    size = batch_size(batch)
    fisher_step = make_fisher_step(loss, spec=spec, decay=decay, chunk_size=chunk_size)
    state = fisher_step.init(params)
    for t in range(1, steps + 1):
        state = fisher_step(params, batch, state)
        counters = (state.step, state.samples, state.tokens)
        if counters != (t, t * size, t * tokens):
            raise AssertionError(
                f"check_ema_constant: after {t} step(s) (step, samples, tokens) = {counters}, "
                f"expected {(t, t * size, t * tokens)}"
            )
        _assert_close(
            "check_ema_constant",
            f"estimate after {t} step(s) with decay={decay!r}",
            estimate(state),
            expected,
            rtol,
            atol,
        )


def check_decay_zero(
    loss: Loss,
    params: Params,
    batch: Batch,
    spec: Spec = None,
    *,
    warmup: Batch | None = None,
    chunk_size: int | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
) -> None:
    """With ``decay=0`` a step's estimate is the one-shot Fisher of its batch, whatever came before.

    ``m_t = 0 · m_{t−1} + 1 · F̂_t`` and ``1 − 0^t = 1``, so ``estimate = F̂_t``: checked after a
    first step, and after a step that follows one on ``warmup`` (if given).

    Args:
        loss: per-sample loss.
        params: pytree of parameter tensors.
        batch: one batch.
        spec: group rules (``None``: inferred from ``loss.model``).
        warmup: an earlier batch whose contribution must be forgotten entirely.
        chunk_size: passed to both computations.
        rtol: relative tolerance (``None``: from the dtype).
        atol: absolute tolerance.

    Raises:
        AssertionError: naming the parameter and group.
    """
    expected = fisher(loss, params, batch, spec=spec, chunk_size=chunk_size)
    fisher_step = make_fisher_step(loss, spec=spec, decay=0.0, chunk_size=chunk_size)
    state = fisher_step.init(params)
    first = fisher_step(params, batch, state)
    _assert_close("check_decay_zero", "estimate after one decay=0 step", estimate(first), expected, rtol, atol)
    if warmup is not None:
        after = fisher_step(params, batch, fisher_step(params, warmup, state))
        _assert_close(
            "check_decay_zero", "estimate of a decay=0 step after a warm-up step", estimate(after), expected, rtol, atol
        )


def _snapshot(tree: Any) -> list[tuple[str, Any]]:
    """Everything a mutation could change about a tree's tensors, by path."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree)
    out = []
    for path, x in zip(paths, leaves, strict=True):
        name = ".".join(map(str, path)) or "<root>"
        if isinstance(x, Tensor):
            data = x.detach().cpu().clone()
            grad = x.grad if x.is_leaf else None  # .grad of a non-leaf warns and is always None
            try:
                version = x._version  # bumped by every in-place operation
            except RuntimeError:  # inference tensors have no version counter
                version = None
            out.append((name, (data, x.dtype, x.shape, x.device, x.requires_grad, grad, version)))
        else:
            out.append((name, x))
    return out


def _bitwise_equal(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def _assert_unchanged(what: str, before: list[tuple[str, Any]], after: list[tuple[str, Any]]) -> None:
    if [n for n, _ in before] != [n for n, _ in after]:
        raise AssertionError(f"check_pure_step: the structure of {what} changed")
    for (name, old), (_, new) in zip(before, after, strict=True):
        if isinstance(old, tuple) and old and isinstance(old[0], Tensor):
            fields = ("values", "dtype", "shape", "device", "requires_grad", "grad", "version counter")
            for field, x, y in zip(fields, old, new, strict=True):
                same = _bitwise_equal(x, y) if field == "values" else (x is y if field == "grad" else x == y)
                if not same:
                    raise AssertionError(f"check_pure_step: fisher_step changed the {field} of {what} '{name}'")
        elif old != new:
            raise AssertionError(f"check_pure_step: fisher_step changed {what} '{name}': {old!r} -> {new!r}")


def check_pure_step(
    loss: Loss,
    params: Params,
    batch: Batch,
    spec: Spec = None,
    *,
    decay: float = 0.9,
    chunk_size: int | None = None,
) -> None:
    """``fisher_step`` leaves its input state, the params, the batch and the model bitwise unchanged.

    Two steps are taken (so the input state of the second has a non-zero EMA). Compared before
    and after each call: every tensor's bytes, dtype, shape, device, ``requires_grad``, ``.grad``
    and version counter (which in-place operations bump), and the state's counters; also the
    buffers and parameters of ``loss.model`` if the loss has one.

    Args:
        loss: per-sample loss.
        params: pytree of parameter tensors.
        batch: one batch.
        spec: group rules (``None``: inferred from ``loss.model``).
        decay: the EMA decay.
        chunk_size: passed to the step.

    Raises:
        AssertionError: naming what changed.
    """
    model = getattr(loss, "model", None)
    module_state = (lambda: dict(model.state_dict(keep_vars=True))) if model is not None else (lambda: {})
    fisher_step = make_fisher_step(loss, spec=spec, decay=decay, chunk_size=chunk_size)
    state = fisher_step.init(params)
    for t in (1, 2):
        before = {
            "params": _snapshot(params),
            "batch": _snapshot(batch),
            "the input state": _snapshot(state._asdict()),
            "the model": _snapshot(module_state()),
        }
        new = fisher_step(params, batch, state)
        after = {
            "params": _snapshot(params),
            "batch": _snapshot(batch),
            "the input state": _snapshot(state._asdict()),
            "the model": _snapshot(module_state()),
        }
        for what in before:
            _assert_unchanged(what, before[what], after[what])
        if not isinstance(new, FisherState) or new is state or new.step != state.step + 1:
            raise AssertionError(
                f"check_pure_step: step {t} did not return a new FisherState with step {state.step + 1}"
            )
        state = new


# --- everything -----------------------------------------------------------------------------------


def check_all(
    loss: Loss,
    params: Params,
    batch: Batch,
    spec: Spec = None,
    *,
    decay: float = 0.9,
    chunk_sizes: Sequence[int] = (1, 2),
    generator: torch.Generator | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
) -> None:
    """Run every check on one ``(loss, params, batch, spec)`` and report all failures at once.

    Conservation runs for every active rule on a random non-negative tensor of its parameter's
    shape; split additivity splits the batch in halves (skipped for ``B = 1``) and
    :func:`check_decay_zero` uses the first half as warm-up.

    Args:
        loss: per-sample loss.
        params: pytree of parameter tensors.
        batch: one batch; every half of it must have tokens.
        spec: group rules (``None``: inferred from ``loss.model``).
        decay: EMA decay for :func:`check_ema_constant` and :func:`check_pure_step`.
        chunk_sizes: for :func:`check_chunk_invariance`.
        generator: for the permutation and the conservation tensors.
        rtol: relative tolerance (``None``: from the dtype).
        atol: absolute tolerance.

    Raises:
        AssertionError: listing every failed check.
    """
    size = batch_size(batch)
    half = [take(batch, 0, size // 2), take(batch, size // 2, size)] if size > 1 else None
    checks: list[tuple[str, Callable[[], None]]] = []
    for name, rule, param in _flat_rules(loss, params, spec):
        x = torch.rand(param.shape, generator=generator, dtype=torch.float64)
        checks.append((f"conservation of '{name}'", functools.partial(check_conservation, rule, x, rtol=rtol)))
    tol: dict[str, Any] = {"rtol": rtol, "atol": atol}
    checks += [
        ("token invariance", lambda: check_token_invariance(loss, params, batch, spec, **tol)),
        ("permutation", lambda: check_permutation_invariance(loss, params, batch, spec, generator=generator, **tol)),
        ("chunks", lambda: check_chunk_invariance(loss, params, batch, spec, chunk_sizes=chunk_sizes, **tol)),
        ("per-sample", lambda: check_per_sample_consistency(loss, params, batch, spec, **tol)),
        ("paths", lambda: check_paths_agree(loss, params, batch, spec, **tol)),
        ("EMA of a constant", lambda: check_ema_constant(loss, params, batch, spec, decay=decay, **tol)),
        ("decay 0", lambda: check_decay_zero(loss, params, batch, spec, warmup=half[0] if half else None, **tol)),
        ("pure step", lambda: check_pure_step(loss, params, batch, spec, decay=decay)),
    ]
    if half is not None:
        checks.append(("split", lambda: check_split_additivity(loss, params, half, spec, **tol)))
    failures = []
    for _, run in checks:
        try:
            run()
        except AssertionError as err:
            failures.append(str(err))
    if failures:
        raise AssertionError(f"{len(failures)} of {len(checks)} invariant checks failed:\n- " + "\n- ".join(failures))
