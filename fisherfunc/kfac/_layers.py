"""Which layers K-FAC covers, and their inputs ``a`` and output gradients ``d``, without hooks.

A covered layer is a call ``y = a Wᵀ + b`` (``F.linear``: ``W [out, in]``), ``y = b + a W``
(``torch.addmm``, GPT-2's ``Conv1D``: ``W [in, out]``) or a convolution (``F.conv1d`` /
``F.conv2d`` with ``groups=1``: ``W [out, C, *k]`` read as ``[out, C·Πk]``, the input unfolded into
one patch per output position, Grosse & Martens 2016) whose weight *is* (by identity) one of the
params and is used by exactly one call per forward. Its bias, when it is a param used only
there, becomes the last column of the augmented weight ``[W | b]`` (``[out, in + 1]``), and the
layer input gets a constant 1 (``ã = [a, 1]``).

``a`` and ``d`` come from the engine's one probe mechanism (:mod:`~fisherfunc._engine.probes`),
shared with the group path: a zero probe on each covered layer's output, ``vmap(grad)`` with
respect to the probes. The weights themselves are not differentiated. Weights used twice (tied
embeddings, recurrent weights) are not covered — their gradient is a sum over uses, which one
Kronecker product does not describe.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import weakref
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._engine.batches import cast_floating, first_sample, sample_key
from .._engine.memos import one_shot
from .._engine.numerics import Prepared
from .._engine.probes import Op, discover

__all__ = [
    "Layer",
    "discover_layers",
    "find_layers",
    "LayerShapes",
    "MAX_REMEMBERED",
    "context_key",
    "one_shot_memo",
]

_COVERED: tuple[Op, ...] = ("linear", "addmm", "conv1d", "conv2d")


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer K-FAC covers.

    Attributes:
        name: the weight's dotted parameter name, e.g. ``"0.weight"``; the layer's key everywhere.
        weight: index of the weight among the params' leaves.
        bias: index of its bias among the leaves, or ``None`` (no bias, or a bias used elsewhere too).
        bias_name: the bias's dotted name, or ``None``.
        op: ``"linear"`` (``W [out, in]``), ``"addmm"`` (``W [in, out]``), ``"conv1d"`` or
            ``"conv2d"`` (``W [out, C, *k]``).
        in_features: ``in`` (``C·Πk`` for a convolution).
        out_features: ``out``.
        out_shape: per-sample shape of the layer's output, ``[*positions, out]`` (``[.., out, *spatial]``
            for a convolution).
        weight_shape: the weight's shape.
        conv: for a convolution, ``(kernel, stride, padding, dilation)`` as 2-tuples; else ``None``.
    """

    name: str
    weight: int
    bias: int | None
    bias_name: str | None
    op: Op
    in_features: int
    out_features: int
    out_shape: tuple[int, ...]
    weight_shape: tuple[int, ...] = ()
    conv: tuple[tuple[int, int], ...] | None = None

    @property
    def a_dim(self) -> int:
        """Size of the input factor ``A``: ``in + 1`` with a bias, else ``in``."""
        return self.in_features + (self.bias is not None)

    @property
    def positions(self) -> int:
        """Positions per sample (tokens, or 1 for one vector per example)."""
        return int(torch.Size(self.out_shape).numel()) // self.out_features

    def input_rows(self, x: Tensor) -> Tensor:
        """One sample's layer input as ``[positions, in]`` (convolutions: unfolded patches)."""
        if self.conv is None:
            return x.reshape(-1, self.in_features)
        kernel, stride, padding, dilation = self.conv
        spatial = 1 if self.op == "conv1d" else 2
        x = x.reshape(-1, *x.shape[x.ndim - spatial - 1 :])  # [1, C, *spatial]
        if spatial == 1:
            x = x.unsqueeze(2)  # conv1d as conv2d over [1, L]
        patches = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        return patches[0].t()  # [C·Πk, L] -> [L, C·Πk]

    def output_rows(self, d: Tensor) -> Tensor:
        """One sample's output gradient as ``[positions, out]``."""
        if self.conv is None:
            return d.reshape(-1, self.out_features)
        return d.reshape(self.out_features, -1).t()  # [(1,) out, *spatial] -> [positions, out]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable description."""
        return dataclasses.asdict(self)


def _select(names: Sequence[str], patterns: Sequence[str] | None) -> list[int]:
    """Indices of the names matching any pattern (all with ``None``); a pattern matching nothing is an error."""
    if patterns is None:
        return list(range(len(names)))
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen = []
    for pattern in patterns:
        hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"layers pattern {pattern!r} matches no weight; weights are {list(names)[:8]}")
        chosen += hits
    return sorted(set(chosen))


def discover_layers(loss: Any, params: Prepared, sample: Any, patterns: Sequence[str] | None) -> tuple[Layer, ...]:
    """Find the covered layers by one forward of one sample (no gradients).

    Args:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        params: the prepared params.
        sample: one sample (batch dimension removed).
        patterns: glob patterns of weight names to cover (``None``: every linear-like weight).

    Raises:
        ValueError: a pattern matching no 2-D parameter, or no layer qualifying at all.
    """
    weights = [i for i, leaf in enumerate(params.leaves) if leaf.ndim in (2, 3, 4) and leaf.is_floating_point()]
    candidates = [weights[k] for k in _select([params.names[i] for i in weights], patterns)]
    found = discover(lambda: loss(params.tree(), cast_floating(sample, params.dtype)), params, candidates)
    layers = []
    for i in candidates:
        call = found.single(i)
        if call is None or call.op not in _COVERED:
            continue
        bias = call.bias if call.bias is not None and found.uses[call.bias] == 1 else None
        w = params.leaves[i]
        if call.op == "addmm":
            out_f, in_f = w.shape[1], w.shape[0]
        else:  # linear [out, in]; conv [out, C, *k] as [out, C·Πk]
            out_f, in_f = w.shape[0], w[0].numel()
        layers.append(
            Layer(
                name=params.names[i],
                weight=i,
                bias=bias,
                bias_name=params.names[bias] if bias is not None else None,
                op=call.op,
                in_features=int(in_f),
                out_features=int(out_f),
                out_shape=call.out_shape,
                weight_shape=tuple(w.shape),
                conv=call.conv,
            )
        )
    if not layers:
        raise ValueError(
            "no layer qualifies for K-FAC: it covers weights used once per forward by F.linear, torch.addmm "
            "or F.conv1d/F.conv2d with groups=1 (nn.Linear, GPT-2 Conv1D, nn.Conv1d/2d, attention projections)"
        )
    return tuple(layers)


#: Sample shapes kept per memo before it is cleared (a memo of a step that sees ever new shapes stays small).
MAX_REMEMBERED = 64

#: One-shot calls' memos of discovered layers and shapes, per loss (or per model and built loss, see
#: :mod:`fisherfunc._engine.memos`).
_ONE_SHOT: weakref.WeakKeyDictionary[Any, dict[Hashable, dict[tuple, tuple[Layer, ...]]]] = weakref.WeakKeyDictionary()


def one_shot_memo(loss: Any) -> dict[tuple, tuple[Layer, ...]] | None:
    """The memo of layers and shapes that one-shot calls (``kfac``, ``ekfac``) with ``loss`` share.

    As the group Fisher's (:func:`fisherfunc._engine.group_sums.one_shot_memo`): a loss built anew
    with the same options for the same model shares it, and a kept entry is checked on every forward
    (the probe mode raises :class:`~fisherfunc._engine.probes.StaleSites` for a covered weight used
    in any way but the call discovery saw), and the call then discovers again. ``None`` for a loss
    that cannot be weakly referenced or hashed: each call then discovers.
    """
    return one_shot(_ONE_SHOT, loss, dict)


def context_key(loss: Any, params: Prepared) -> tuple:
    """What discovery depends on besides the samples, the loss's code and the params' values.

    The params' names, shapes, dtypes and devices, and the training flags
    of ``loss.model``'s modules (a module may route calls differently in training mode).
    """
    model = getattr(loss, "model", None)
    modes = tuple(m.training for m in model.modules()) if isinstance(model, torch.nn.Module) else ()
    leaves = tuple((tuple(x.shape), x.dtype, x.device) for x in params.leaves)
    return (params.names, leaves, modes)


def find_layers(
    loss: Any,
    params: Prepared,
    first: Any,
    patterns: Sequence[str] | None,
    memo: dict[tuple, tuple[Layer, ...]] | None = None,
) -> tuple[Layer, ...]:
    """:func:`discover_layers` on ``first``'s first sample, or what ``memo`` kept for the same key."""
    if memo is None:
        return discover_layers(loss, params, first_sample(first), patterns)
    chosen = None if patterns is None else (patterns,) if isinstance(patterns, str) else tuple(patterns)
    key = ("layers", *context_key(loss, params), chosen, sample_key(first))
    if key not in memo:
        if len(memo) >= MAX_REMEMBERED:
            memo.clear()
        memo[key] = discover_layers(loss, params, first_sample(first), patterns)
    return memo[key]


class LayerShapes:
    """The covered layers with their per-sample output shapes for each batch's sample shapes.

    Sequence lengths may differ between batches; the probes must match each. Discovery (one
    sample's forward) runs once per distinct sample shape, and must find the same layers (and
    biases) as the first batch. With a ``memo`` kept across calls (a :class:`~fisherfunc.kfac.KFACStep`'s),
    it runs once per shape across calls: the memo's key is everything discovery depends on but the
    loss's code and the params' values (:meth:`key`).
    """

    def __init__(
        self,
        loss: Any,
        params: Prepared,
        layers: Sequence[Layer],
        first: Any = None,
        memo: dict[tuple, tuple[Layer, ...]] | None = None,
    ) -> None:
        """``first``: the batch ``layers`` were discovered on (its shapes need no new discovery)."""
        self.loss, self.params, self.layers = loss, params, tuple(layers)
        self.cache: dict[tuple, tuple[Layer, ...]] = memo if memo is not None else {}
        self._context: tuple | None = None
        if first is not None:
            self.cache[self.key(first)] = self.layers

    def key(self, batch: Any) -> tuple:
        """What the layers' shapes for ``batch`` depend on, the loss's code and the params' values aside.

        :func:`context_key`, the layers, and the samples' shapes and dtypes
        (:func:`~fisherfunc._engine.batches.sample_key`).
        """
        if self._context is None:
            self._context = ("shapes", *context_key(self.loss, self.params), self.layers)
        return (*self._context, sample_key(batch))

    def forget(self, batch: Any) -> None:
        """Drop the shapes kept for ``batch``'s sample shapes (they went stale): the next call discovers."""
        self.cache.pop(self.key(batch), None)

    def __call__(self, batch: Any) -> tuple[Layer, ...]:
        """``layers`` shaped for ``batch`` (a batch with a leading dimension)."""
        key = self.key(batch)
        if key not in self.cache:
            found = {x.name: x for x in discover_layers(self.loss, self.params, first_sample(batch), None)}
            changed = [x.name for x in self.layers if x.name not in found or found[x.name].bias != x.bias]
            if changed:
                raise ValueError(f"layer(s) {changed} are not used the same way for samples of shape {key[-1]}")
            if len(self.cache) >= MAX_REMEMBERED:
                self.cache.clear()
            self.cache[key] = tuple(dataclasses.replace(x, out_shape=found[x.name].out_shape) for x in self.layers)
        return self.cache[key]
