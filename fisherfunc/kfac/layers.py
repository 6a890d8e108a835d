"""Which layers K-FAC covers, and their inputs ``a`` and output gradients ``d`` without hooks.

A covered layer is a call ``y = a Wᵀ + b`` (``F.linear``: ``W [out, in]``) or ``y = b + a W``
(``torch.addmm``, GPT-2's ``Conv1D``: ``W [in, out]``) whose weight *is* (by identity) one of the
params and is used by exactly one call per forward. Its bias, when it is a param used only
there, becomes the last column of the augmented weight ``[W | b]`` (``[out, in + 1]``), and the
layer input gets a constant 1 (``ã = [a, 1]``).

As on the probe path (:mod:`fisherfunc.probes`), a scoped ``TorchFunctionMode`` entered inside
the per-sample function adds a zero probe to each covered layer's output and records its input;
``vmap(grad)`` with respect to the probes gives ``d = ∂L_b/∂y``. The weights themselves are not
differentiated. Weights used twice (tied embeddings, recurrent weights) are not covered — their
gradient is a sum over uses, which one Kronecker product does not describe.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Any, Literal

import optree
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..probes import _arg, _carries_values, _weight_of
from ..spec import path_name

__all__ = ["Layer", "ParamLeaves", "flatten_params", "discover_layers", "CaptureMode", "LayerShapes"]

Op = Literal["linear", "addmm"]


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer K-FAC covers.

    Attributes:
        name: the weight's dotted parameter name, e.g. ``"0.weight"``; the layer's key everywhere.
        weight: index of the weight among the params' leaves.
        bias: index of its bias among the leaves, or ``None`` (no bias, or a bias used elsewhere too).
        bias_name: the bias's dotted name, or ``None``.
        op: ``"linear"`` (``W [out, in]``) or ``"addmm"`` (``W [in, out]``).
        in_features: ``in``.
        out_features: ``out``.
        out_shape: per-sample shape of the layer's output, ``[*positions, out]``.
    """

    name: str
    weight: int
    bias: int | None
    bias_name: str | None
    op: Op
    in_features: int
    out_features: int
    out_shape: tuple[int, ...]

    @property
    def a_dim(self) -> int:
        """Size of the input factor ``A``: ``in + 1`` with a bias, else ``in``."""
        return self.in_features + (self.bias is not None)

    @property
    def positions(self) -> int:
        """Positions per sample (tokens, or 1 for one vector per example)."""
        return int(torch.Size(self.out_shape[:-1]).numel())

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable description."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class ParamLeaves:
    """A params tree flattened: leaves (detached, floating ones in the compute dtype) and names."""

    leaves: tuple[Tensor, ...]
    names: tuple[str, ...]
    treespec: optree.PyTreeSpec
    dtype: torch.dtype

    def tree(self) -> Any:
        """The params tree again (of the cast leaves)."""
        return optree.tree_unflatten(self.treespec, list(self.leaves))


def flatten_params(params: Any) -> ParamLeaves:
    """Flatten and cast ``params`` (float64 if any floating leaf is float64, else float32)."""
    paths, leaves, treespec = optree.tree_flatten_with_path(params)
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(f"params leaf '{path_name(path)}' is a {type(leaf).__name__}, not a tensor")
    floating = [x for x in leaves if x.is_floating_point()]
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in floating) else torch.float32
    cast = tuple(x.detach().to(dtype) if x.is_floating_point() else x.detach() for x in leaves)
    return ParamLeaves(cast, tuple(path_name(p) for p in paths), treespec, dtype)


class CaptureMode(TorchFunctionMode):
    """Adds probes to, and records the inputs of, the calls that use the covered weights.

    In discovery (``probes=None``) it counts every use of every candidate leaf in any torch
    function's arguments and records, for each ``F.linear`` / ``torch.addmm`` on a candidate
    weight, the output shape and the bias argument.
    """

    def __init__(self, slots: dict[int, int], probes: Sequence[Tensor] | None = None) -> None:
        super().__init__()
        self.slots = slots  # id(weight leaf) -> slot
        self.probes = probes
        self.uses: dict[int, int] = {}  # discovery: id(leaf) -> number of uses
        self.calls: dict[int, tuple[Op, tuple[int, ...], int | None]] = {}  # slot -> (op, out shape, id(bias))
        self.inputs: list[Tensor | None] = [None] * len(slots)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        found = _weight_of(func, args, kwargs)
        slot = self.slots.get(id(found[1])) if found is not None and found[0] != "embedding" else None
        out = func(*args, **kwargs)
        if self.probes is None and _carries_values(out):
            for leaf in optree.tree_leaves((args, kwargs)):
                if isinstance(leaf, Tensor):
                    self.uses[id(leaf)] = self.uses.get(id(leaf), 0) + 1
        if slot is None:
            return out
        assert found is not None
        op = found[0]
        if op == "linear":
            self.inputs[slot] = _arg(args, kwargs, 0, "input")
            bias = _arg(args, kwargs, 2, "bias")
        else:
            self.inputs[slot] = _arg(args, kwargs, 1, "mat1")
            bias = _arg(args, kwargs, 0, "input")
            beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
            if beta != 1 or alpha != 1:  # a scaled addmm is not y = b + a W
                slot = None
        if self.probes is None and slot is not None:
            self.calls[slot] = (op, tuple(out.shape), id(bias) if isinstance(bias, Tensor) else None)  # type: ignore[assignment]
        if self.probes is not None:
            out = out + self.probes[slot]
        return out


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
            raise ValueError(f"layers pattern {pattern!r} matches no 2-D parameter; weights are {list(names)[:8]}")
        chosen += hits
    return sorted(set(chosen))


def discover_layers(loss: Any, params: ParamLeaves, sample: Any, patterns: Sequence[str] | None) -> tuple[Layer, ...]:
    """Find the covered layers by one forward of one sample (no gradients).

    Args:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        params: the flattened params.
        sample: one sample (batch dimension removed).
        patterns: glob patterns of weight names to cover (``None``: every linear-like weight).

    Raises:
        ValueError: a pattern matching no 2-D parameter, or no layer qualifying at all.
    """
    two_d = [i for i, leaf in enumerate(params.leaves) if leaf.ndim == 2 and leaf.is_floating_point()]
    candidates = [two_d[k] for k in _select([params.names[i] for i in two_d], patterns)]
    slots = {id(params.leaves[i]): k for k, i in enumerate(candidates)}
    mode = CaptureMode(slots)
    with torch.no_grad(), mode:
        loss(params.tree(), sample)
    index_of = {id(leaf): i for i, leaf in enumerate(params.leaves)}
    layers = []
    for k, i in enumerate(candidates):
        call = mode.calls.get(k)
        if call is None or mode.uses.get(id(params.leaves[i]), 0) != 1:
            continue
        op, out_shape, bias_id = call
        bias = index_of.get(bias_id) if bias_id is not None else None
        if bias is not None and mode.uses.get(bias_id, 0) != 1:  # type: ignore[arg-type]
            bias = None
        w = params.leaves[i]
        out_f, in_f = (w.shape[0], w.shape[1]) if op == "linear" else (w.shape[1], w.shape[0])
        layers.append(
            Layer(
                name=params.names[i],
                weight=i,
                bias=bias,
                bias_name=params.names[bias] if bias is not None else None,
                op=op,
                in_features=int(in_f),
                out_features=int(out_f),
                out_shape=out_shape,
            )
        )
    if not layers:
        raise ValueError(
            "no layer qualifies for K-FAC: it covers weights used once per forward by F.linear or "
            "torch.addmm (nn.Linear, GPT-2 Conv1D, attention projections outside F.multi_head_attention_forward)"
        )
    return tuple(layers)


class LayerShapes:
    """The covered layers with their per-sample output shapes for each batch's sample shapes.

    Sequence lengths may differ between batches; the probes must match each. Discovery runs once
    per distinct sample shape, and must find the same layers (and biases) as the first batch.
    """

    def __init__(self, loss: Any, params: ParamLeaves, layers: Sequence[Layer]) -> None:
        self.loss, self.params, self.layers = loss, params, tuple(layers)
        self.cache: dict[Any, tuple[Layer, ...]] = {}

    def __call__(self, batch: Any) -> tuple[Layer, ...]:
        """``layers`` shaped for ``batch`` (a batch with a leading dimension)."""
        from ..batch import cast_floating

        key = tuple((tuple(x.shape[1:]), x.dtype) for x in optree.tree_leaves(batch))
        if key not in self.cache:
            sample = cast_floating(optree.tree_map(lambda x: x[0], batch), self.params.dtype)
            found = {x.name: x for x in discover_layers(self.loss, self.params, sample, None)}
            changed = [x.name for x in self.layers if x.name not in found or found[x.name].bias != x.bias]
            if changed:
                raise ValueError(f"layer(s) {changed} are not used the same way for samples of shape {key}")
            self.cache[key] = tuple(dataclasses.replace(x, out_shape=found[x.name].out_shape) for x in self.layers)
        return self.cache[key]
