"""Per-sample squared gradients, reduced to groups inside the vectorised computation.

For one sample ``b`` with summed loss ``L_b`` and token count ``n_b``::

    g_b = ∇_θ L_b(θ)                    (torch.func.grad over functional params)
    s_b[rule] = rule.reduce(g_b ⊙ g_b)  (inside vmap: the full g_b never leaves this function)

``torch.func.vmap`` maps this over a chunk of samples, so at most ``chunk × |θ|`` per-sample
gradient memory exists at once, and only the ``chunk × groups`` reduced values leave it.

This module is the *direct* path (differentiate the weights). A factorised path (output probes,
DESIGN §6) computes the same :data:`ChunkFn` contract from layer inputs and output gradients and
can replace it for the layers it covers; :mod:`fisherfunc.estimate` only sees the contract.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import optree
import torch
from torch import Tensor
from torch.func import grad, vmap

from .batch import cast_floating
from .dropout import vmap_randomness
from .spec import ResolvedSpec

if TYPE_CHECKING:
    from .kinds import LabelSets

__all__ = [
    "ChunkFn",
    "SumsFn",
    "ChunkFns",
    "Prepared",
    "prepare",
    "direct_chunk_fn",
    "summed",
    "compute_dtype",
    "no_autocast",
]

PerSampleLoss = Callable[[Any, Any], tuple[Tensor, Tensor | int | float]]
#: ``(chunk) -> (groups, tokens)``: per-sample group sums ``[c, *group_shape]`` of the active
#: parameters, in spec order, and per-sample token counts ``[c]``.
ChunkFn = Callable[[Any], tuple[tuple[Tensor, ...], Tensor]]
#: ``(chunk) -> (sums, tokens)``: the chunk's group sums ``Σ_{b ∈ chunk} s_b`` ``[*group_shape]`` of
#: the active parameters, in spec order, and per-sample token counts ``[c]``. Callers that only
#: need sums (:func:`~fisherfunc.fisher`, :func:`~fisherfunc.accumulate`, the step) use this form,
#: which lets a path contract some sums at batch level instead of forming every ``s_b``.
SumsFn = Callable[[Any], tuple[tuple[Tensor, ...], Tensor]]


class ChunkFns(NamedTuple):
    """The two forms of one path's per-chunk computation (same inputs, same values).

    Attributes:
        per_sample: the per-sample values (``per_sample_fisher``; locating non-finite samples).
        sums: the chunk's sums (``fisher`` / ``accumulate`` / the step); equals
            ``per_sample``'s values summed over the chunk.
    """

    per_sample: ChunkFn
    sums: SumsFn


def summed(chunk_fn: ChunkFn) -> ChunkFns:
    """Both forms from a per-sample :data:`ChunkFn`: the sums form sums its output over the chunk."""

    def sums(chunk: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        groups, tokens = chunk_fn(chunk)
        return tuple(g.sum(0) for g in groups), tokens

    return ChunkFns(chunk_fn, sums)


def compute_dtype(params: list[Tensor]) -> torch.dtype:
    """float64 if any differentiated parameter is float64, else float32 (whatever the model's dtype)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


@contextlib.contextmanager
def no_autocast(device_types: set[str]) -> Iterator[None]:
    """The engine's numerics scope: autocast disabled on the given device types.

    Results must not depend on an outer autocast. torch's notice that ``vmap`` falls back to a
    loop for an operator without a batching rule (CPU flash attention, EmbeddingBag) is silenced
    here: the result is exact either way, and there is nothing a user can do about it.
    """
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        for device_type in sorted(device_types):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """Params split into differentiated and fixed leaves, cast to the compute dtype.

    Attributes:
        spec: the resolved spec.
        active: the differentiated leaves (``spec.active`` order), detached, in ``dtype``.
        leaves: all leaves (floating ones cast to ``dtype``), detached.
        dtype: the compute dtype.
        device_types: device types of the params (for disabling autocast).
    """

    spec: ResolvedSpec
    active: tuple[Tensor, ...]
    leaves: tuple[Tensor, ...]
    dtype: torch.dtype
    device_types: frozenset[str]

    def params_with(self, active: tuple[Tensor, ...]) -> Any:
        """The full params tree with the active leaves replaced by ``active``."""
        leaves = list(self.leaves)
        for i, value in zip(self.spec.active, active):
            leaves[i] = value
        return optree.tree_unflatten(self.spec.treespec, leaves)


def prepare(spec: ResolvedSpec, params: Any) -> Prepared:
    """Split and cast ``params`` for the engine (no copies of the caller's tensors are modified)."""
    leaves = spec.treespec.flatten_up_to(params)
    dtype = compute_dtype([leaves[i] for i in spec.active])
    cast = tuple((leaf.detach().to(dtype) if leaf.is_floating_point() else leaf.detach()) for leaf in leaves)
    return Prepared(
        spec=spec,
        active=tuple(cast[i] for i in spec.active),
        leaves=cast,
        dtype=dtype,
        device_types=frozenset(leaf.device.type for leaf in leaves),
    )


def direct_chunk_fn(
    loss: PerSampleLoss, prepared: Prepared, *, randomness: str | None = None, labels: LabelSets | None = None
) -> ChunkFn:
    """The direct path: ``vmap(grad(loss))`` over the active params, squared and reduced per sample.

    Args:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        prepared: params split into active/fixed leaves.
        randomness: passed to ``vmap`` (``"different"`` for independent dropout masks per sample);
            ``None``: the loss's own (``"different"`` under ``dropout="train"``, else ``"error"``).
        labels: the label sets of the ``"mc"`` / ``"exact"`` kinds (:mod:`fisherfunc.kinds`); then a
            chunk is ``(samples, noise)`` and ``s_b = Σ_j w_j rule.reduce(g(y_j) ⊙ g(y_j))``.
            ``None``: the dataset's labels (the empirical Fisher).

    Returns:
        A :data:`ChunkFn`.
    """
    rules = [prepared.spec.rules[i] for i in prepared.spec.active]
    dtype = prepared.dtype

    def sample_loss(active: tuple[Tensor, ...], sample: Any) -> tuple[Tensor, Tensor]:
        value, tokens = loss(prepared.params_with(active), sample)
        if not isinstance(value, Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"the per-sample loss must return a scalar loss_sum, got {shape}")
        return value, torch.as_tensor(tokens, dtype=dtype)

    def per_sample(active: tuple[Tensor, ...], sample: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        g, tokens = grad(sample_loss, has_aux=True)(active, sample)
        # s[rule] = rule.reduce(g ⊙ g): reduced here, inside vmap, so g never leaves.
        return tuple(rule.reduce(gi.square()) for rule, gi in zip(rules, g)), tokens

    def per_sample_labelled(active: tuple[Tensor, ...], sample_noise: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        assert labels is not None
        sample, noise = sample_noise

        def predict(active: tuple[Tensor, ...]) -> tuple[Tensor, tuple]:
            return labels.loss.forward(prepared.params_with(active), sample), ()

        def reduce(g: tuple, aux: Any) -> tuple[Tensor, ...]:
            return tuple(rule.reduce(gi.square()) for rule, gi in zip(rules, g[0]))

        return labels.expected_squares(predict, (active,), reduce, sample, noise)

    batched = vmap(
        per_sample if labels is None else per_sample_labelled,
        in_dims=(None, 0),
        randomness=randomness or vmap_randomness(loss),
    )

    def chunk_fn(chunk: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        with no_autocast(set(prepared.device_types)):
            return batched(prepared.active, cast_floating(chunk, dtype))

    return chunk_fn
