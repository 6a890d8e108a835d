"""Which layers K-FAC covers, and their inputs ``a`` and output gradients ``d`` without hooks.

A covered layer is a call ``y = a Wᵀ + b`` (``F.linear``: ``W [out, in]``), ``y = b + a W``
(``torch.addmm``, GPT-2's ``Conv1D``: ``W [in, out]``) or a convolution (``F.conv1d`` /
``F.conv2d`` with ``groups=1``: ``W [out, C, *k]`` read as ``[out, C·Πk]``, the input unfolded into
one patch per output position, Grosse & Martens 2016) whose weight *is* (by identity) one of the
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
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..probes import _arg, _carries_values, _transparent, _weight_of
from ..spec import path_name

__all__ = ["Layer", "ParamLeaves", "flatten_params", "discover_layers", "CaptureMode", "LayerShapes"]

Op = Literal["linear", "addmm", "conv1d", "conv2d"]
_CONV = {torch.conv1d: "conv1d", torch.conv2d: "conv2d"}


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
        # slot -> (op, out shape, id(bias), conv geometry)
        self.calls: dict[int, tuple[Op, tuple[int, ...], int | None, Any]] = {}
        self.inputs: list[Tensor | None] = [None] * len(slots)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:  # see into it: its projections are F.linear calls
            body = _transparent(func)  # (see fisherfunc.probes)
            if body is not None:
                with self:
                    return body(*args, **kwargs)
        found: Any = _weight_of(func, args, kwargs)
        if func in _CONV:
            found = (_CONV[func], _arg(args, kwargs, 1, "weight"))
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
        geometry = None
        if op in ("conv1d", "conv2d"):
            self.inputs[slot] = _arg(args, kwargs, 0, "input")
            bias = _arg(args, kwargs, 2, "bias")
            geometry = _conv_geometry(op, found[1], args, kwargs)
            if geometry is None:  # grouped, or string padding: not covered
                slot = None
        elif op == "linear":
            self.inputs[slot] = _arg(args, kwargs, 0, "input")
            bias = _arg(args, kwargs, 2, "bias")
        else:
            self.inputs[slot] = _arg(args, kwargs, 1, "mat1")
            bias = _arg(args, kwargs, 0, "input")
            beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
            if beta != 1 or alpha != 1:  # a scaled addmm is not y = b + a W
                slot = None
        if self.probes is None and slot is not None:
            self.calls[slot] = (op, tuple(out.shape), id(bias) if isinstance(bias, Tensor) else None, geometry)
        if self.probes is not None:
            out = out + self.probes[slot]
        return out


def _pair(value: Any, spatial: int) -> tuple[int, int]:
    """A conv argument as a 2-tuple for ``F.unfold`` (conv1d becomes a conv2d over ``[1, L]``)."""
    values = (value,) * spatial if isinstance(value, int) else tuple(value)
    return (1, values[0]) if spatial == 1 and values else tuple(values)  # type: ignore[return-value]


def _conv_geometry(op: str, weight: Tensor, args: tuple, kwargs: dict) -> tuple[tuple[int, int], ...] | None:
    """``(kernel, stride, padding, dilation)`` of a conv call, or ``None`` if it is not covered."""
    stride, padding = _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0)
    dilation, groups = _arg(args, kwargs, 5, "dilation", 1), _arg(args, kwargs, 6, "groups", 1)
    if groups != 1 or (isinstance(padding, str) and padding != "valid"):
        return None
    padding = 0 if padding == "valid" else padding
    spatial = 1 if op == "conv1d" else 2
    kernel = tuple(weight.shape[2:])
    geometry = (_pair(kernel, spatial), _pair(stride, spatial), _pair(padding, spatial), _pair(dilation, spatial))
    if spatial == 1:  # the unit height of a conv1d-as-conv2d has no padding
        geometry = (geometry[0], geometry[1], (0, geometry[2][1]), geometry[3])
    return geometry


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
    weights = [i for i, leaf in enumerate(params.leaves) if leaf.ndim in (2, 3, 4) and leaf.is_floating_point()]
    candidates = [weights[k] for k in _select([params.names[i] for i in weights], patterns)]
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
        op, out_shape, bias_id, geometry = call
        bias = index_of.get(bias_id) if bias_id is not None else None
        if bias is not None and mode.uses.get(bias_id, 0) != 1:  # type: ignore[arg-type]
            bias = None
        w = params.leaves[i]
        if op == "addmm":
            out_f, in_f = w.shape[1], w.shape[0]
        else:  # linear [out, in]; conv [out, C, *k] as [out, C·Πk]
            out_f, in_f = w.shape[0], w[0].numel()
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
                weight_shape=tuple(w.shape),
                conv=geometry,
            )
        )
    if not layers:
        raise ValueError(
            "no layer qualifies for K-FAC: it covers weights used once per forward by F.linear, torch.addmm "
            "or F.conv1d/F.conv2d with groups=1 (nn.Linear, GPT-2 Conv1D, nn.Conv1d/2d, attention projections)"
        )
    return tuple(layers)


class LayerShapes:
    """The covered layers with their per-sample output shapes for each batch's sample shapes.

    Sequence lengths may differ between batches; the probes must match each. Discovery runs once
    per distinct sample shape, and must find the same layers (and biases) as the first batch.
    """

    def __init__(self, loss: Any, params: ParamLeaves, layers: Sequence[Layer], first: Any = None) -> None:
        """``first``: the batch ``layers`` were discovered on (its shapes need no new discovery)."""
        self.loss, self.params, self.layers = loss, params, tuple(layers)
        self.cache: dict[Any, tuple[Layer, ...]] = {}
        if first is not None:
            self.cache[self._key(first)] = self.layers

    @staticmethod
    def _key(batch: Any) -> Any:
        return tuple((tuple(x.shape[1:]), x.dtype) for x in optree.tree_leaves(batch))

    def __call__(self, batch: Any) -> tuple[Layer, ...]:
        """``layers`` shaped for ``batch`` (a batch with a leading dimension)."""
        from ..batch import cast_floating

        key = self._key(batch)
        if key not in self.cache:
            sample = cast_floating(optree.tree_map(lambda x: x[0], batch), self.params.dtype)
            found = {x.name: x for x in discover_layers(self.loss, self.params, sample, None)}
            changed = [x.name for x in self.layers if x.name not in found or found[x.name].bias != x.bias]
            if changed:
                raise ValueError(f"layer(s) {changed} are not used the same way for samples of shape {key}")
            self.cache[key] = tuple(dataclasses.replace(x, out_shape=found[x.name].out_shape) for x in self.layers)
        return self.cache[key]
