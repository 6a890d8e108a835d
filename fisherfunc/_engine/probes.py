"""Output probes: a layer's input ``a`` and output gradient ``d = ∂L_b/∂y`` without hooks.

For a layer ``y = f(a; W)`` whose weight ``W`` is a parameter, a zero **probe** ``p`` added to the
output, ``y + p``, leaves the forward unchanged, and the gradient with respect to the probe is the
gradient with respect to the output::

    ∂L_b/∂p = ∂L_b/∂y = d        (per sample, under torch.func.vmap(grad(...)))

The input ``a`` is recorded as the call happens. Both are had by a scoped
``torch.overrides.TorchFunctionMode`` entered *inside* the per-sample function — nothing is attached
to any module. It acts on the calls whose weight *is* (by identity) one of the probed leaves:

| call                                   | weight layout              | recorded input          |
|----------------------------------------|----------------------------|-------------------------|
| ``F.linear(a, W, b)``                  | ``[out, in]``              | ``a``                   |
| ``torch.addmm(b, a, W)`` (GPT-2 Conv1D) | ``[in, out]``              | ``a``                   |
| ``F.embedding(ids, W)``                | ``[vocab, dim]``           | ``ids``                 |
| ``F.conv1d`` / ``F.conv2d``            | ``[out, C, *k]``           | the image               |

A mode's handler runs with the mode popped, so it does not see the calls nested in a function it
is handed; ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer``) is therefore re-entered through a copy that skips its own dispatch
(:func:`transparent`), so its projections are ``F.linear`` calls like any other.

**Discovery** (:func:`discover`) runs one sample's forward under the mode without probes and learns,
for every candidate weight, how often it is used (by any torch function that returns floating
values) and how it is called (:class:`Call`). A probe is only correct for a weight used exactly
once: the gradient of a weight used twice (tied embeddings, recurrent weights) is a sum over uses,
and its square has cross terms. What to do with ``a`` and ``d`` is the caller's: the group path
(:mod:`~fisherfunc._engine.group_sums`) sums squares of ``G = Σ_t d_t a_tᵀ`` into groups, K-FAC
(:mod:`fisherfunc.kfac`) forms ``Σ a aᵀ`` and ``Σ d dᵀ``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from types import FunctionType
from typing import Any, Literal

import optree
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .numerics import Prepared, scope

__all__ = ["Op", "Call", "Discovery", "ProbeMode", "discover", "arg", "transparent"]

Op = Literal["linear", "addmm", "embedding", "conv1d", "conv2d"]
#: A convolution's ``(kernel, stride, padding, dilation)``, each a 2-tuple (conv1d as a conv2d over ``[1, L]``).
ConvGeometry = tuple[tuple[int, int], ...]
_CONV: dict[Callable[..., Any], Op] = {torch.conv1d: "conv1d", torch.conv2d: "conv2d"}


@dataclasses.dataclass(frozen=True)
class Call:
    """How a probed weight is called, as discovery saw it.

    Attributes:
        op: the call.
        out_shape: per-sample shape of its output (the probe's shape).
        bias: leaf index of the bias argument when the bias is one of the params, else ``None``.
        padding_idx: an embedding's padding row (non-negative), whose gradient is always zero.
        plain: whether the call is the plain product the layouts above describe — an embedding
            without ``max_norm``/``scale_grad_by_freq``, an ``addmm`` with ``alpha = beta = 1``, a
            convolution with ``groups = 1`` and numeric padding.
        conv: a convolution's geometry, else ``None``.
    """

    op: Op
    out_shape: tuple[int, ...]
    bias: int | None = None
    padding_idx: int | None = None
    plain: bool = True
    conv: ConvGeometry | None = None


@dataclasses.dataclass(frozen=True)
class Discovery:
    """What one sample's forward showed about the candidate weights.

    Attributes:
        uses: for every leaf of the params, how many torch calls used it.
        calls: ``{leaf index: Call}`` for the candidates used by a supported call (the last such call).
    """

    uses: tuple[int, ...]
    calls: Mapping[int, Call]

    def single(self, leaf: int) -> Call | None:
        """The call of a weight used exactly once by a supported, plain call; else ``None``."""
        call = self.calls.get(leaf)
        return call if call is not None and call.plain and self.uses[leaf] == 1 else None


def arg(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    """A call's argument by position or keyword."""
    return args[position] if len(args) > position else kwargs.get(name, default)


def _weight_of(func: Callable, args: tuple, kwargs: dict) -> tuple[Op, Any] | None:
    if func is F.linear:
        return "linear", arg(args, kwargs, 1, "weight")
    if func is torch.addmm:
        return "addmm", arg(args, kwargs, 2, "mat2")
    if func is F.embedding:
        return "embedding", arg(args, kwargs, 1, "weight")
    if func in _CONV:
        return _CONV[func], arg(args, kwargs, 1, "weight")
    return None


@functools.cache
def transparent(func: Callable) -> Callable | None:
    """``func`` (a Python function that dispatches to ``__torch_function__``) without that dispatch.

    A mode's handler runs with the mode popped, so the torch calls nested inside a function it is
    handed are unseen; re-entering the mode and calling ``func`` again would dispatch to the handler
    again. This copy of ``func`` reads ``has_torch_function`` as always false — its first line —
    so run under the re-entered mode it executes its body, whose ``F.linear`` calls the mode sees.
    ``None`` if ``func`` does not have that form (then its weights are not probed).
    """
    code = getattr(func, "__code__", None)
    if code is None or "has_torch_function" not in code.co_names:
        return None
    namespace = {**func.__globals__, "has_torch_function": lambda *_: False}
    clone = FunctionType(code, namespace, func.__name__, func.__defaults__, func.__closure__)
    clone.__kwdefaults__ = func.__kwdefaults__
    return clone


def _carries_values(out: Any) -> bool:
    """Whether a call's output can carry its inputs' values.

    Metadata queries such as ``.dtype`` or ``.is_floating_point()`` return no floating tensor, so
    they are not uses of a weight.
    """
    if isinstance(out, Tensor):  # the common case, without a tree walk
        return out.is_floating_point()
    return any(isinstance(x, Tensor) and x.is_floating_point() for x in optree.tree_leaves(out))


def _pair(value: Any, spatial: int) -> tuple[int, int]:
    """A conv argument as a 2-tuple for ``F.unfold`` (conv1d becomes a conv2d over ``[1, L]``)."""
    values = (value,) * spatial if isinstance(value, int) else tuple(value)
    return (1, values[0]) if spatial == 1 and values else (values[0], values[1])


def _conv_geometry(op: Op, weight: Tensor, args: tuple, kwargs: dict) -> ConvGeometry | None:
    """``(kernel, stride, padding, dilation)`` of a conv call, or ``None`` if it is not plain."""
    stride, padding = arg(args, kwargs, 3, "stride", 1), arg(args, kwargs, 4, "padding", 0)
    dilation, groups = arg(args, kwargs, 5, "dilation", 1), arg(args, kwargs, 6, "groups", 1)
    if groups != 1 or (isinstance(padding, str) and padding != "valid"):
        return None
    padding = 0 if padding == "valid" else padding
    spatial = 1 if op == "conv1d" else 2
    kernel = tuple(weight.shape[2:])
    geometry = (_pair(kernel, spatial), _pair(stride, spatial), _pair(padding, spatial), _pair(dilation, spatial))
    if spatial == 1:  # the unit height of a conv1d-as-conv2d has no padding
        geometry = (geometry[0], geometry[1], (0, geometry[2][1]), geometry[3])
    return geometry


def _describe(op: Op, weight: Tensor, out: Tensor, args: tuple, kwargs: dict, leaf_of: Mapping[int, int]) -> Call:
    """The :class:`Call` of one supported call (discovery)."""
    if op == "embedding":
        padding_idx = arg(args, kwargs, 2, "padding_idx")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += weight.shape[0]
        plain = arg(args, kwargs, 3, "max_norm") is None and not arg(args, kwargs, 5, "scale_grad_by_freq", False)
        return Call(op, tuple(out.shape), padding_idx=padding_idx, plain=plain)
    if op == "addmm":
        bias = arg(args, kwargs, 0, "input")
        plain = kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1  # y = b + a W exactly
        return Call(op, tuple(out.shape), bias=leaf_of.get(id(bias)), plain=plain)
    bias = arg(args, kwargs, 2, "bias")
    geometry = _conv_geometry(op, weight, args, kwargs) if op in ("conv1d", "conv2d") else None
    plain = op == "linear" or geometry is not None
    return Call(op, tuple(out.shape), bias=leaf_of.get(id(bias)), plain=plain, conv=geometry)


class ProbeMode(TorchFunctionMode):
    """Adds probes to, and records the inputs of, the calls that use the probed weights.

    Args:
        slots: ``{id(weight tensor): slot}`` of the probed weights.
        probes: one probe per slot, added to the call's output; ``None`` for discovery, which
            instead counts the uses of every tensor in ``leaf_of`` and describes the calls.
        leaf_of: discovery: ``{id(tensor): leaf index}`` of every leaf of the params.

    After a run, ``inputs[slot]`` holds the slot's input (an embedding's ids), ``None`` if the
    weight was not called.
    """

    def __init__(
        self,
        slots: Mapping[int, int],
        probes: Sequence[Tensor] | None = None,
        leaf_of: Mapping[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.slots = slots
        self.probes = probes
        self.leaf_of = leaf_of or {}
        self.uses = [0] * len(self.leaf_of)
        self.calls: dict[int, Call] = {}
        self.inputs: list[Tensor | None] = [None] * len(slots)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:  # see into it: its projections are F.linear calls
            body = transparent(func)
            if body is not None:
                with self:
                    return body(*args, **kwargs)
        found = _weight_of(func, args, kwargs)
        slot = self.slots.get(id(found[1])) if found is not None else None
        out = func(*args, **kwargs)
        if self.probes is None and _carries_values(out):  # discovery: count uses of the params' leaves
            for x in optree.tree_leaves((args, kwargs)):
                leaf = self.leaf_of.get(id(x)) if isinstance(x, Tensor) else None
                if leaf is not None:
                    self.uses[leaf] += 1
        if slot is None:
            return out
        assert found is not None
        op, weight = found
        self.inputs[slot] = arg(args, kwargs, 1, "mat1") if op == "addmm" else arg(args, kwargs, 0, "input")
        if self.probes is None:
            self.calls[slot] = _describe(op, weight, out, args, kwargs, self.leaf_of)
            return out
        return out + self.probes[slot]

    def recorded(self, like: Tensor) -> tuple[Tensor, ...]:
        """The recorded inputs, an empty tensor like ``like`` for a slot that was not called."""
        empty = like.new_zeros(0)
        return tuple(x if x is not None else empty for x in self.inputs)


def discover(run: Callable[[], Any], prepared: Prepared, candidates: Sequence[int]) -> Discovery:
    """Run ``run()`` (one sample's forward of ``prepared``'s leaves) under the mode, without gradients.

    Args:
        run: calls the model on ``prepared.tree()`` for one sample.
        prepared: the prepared params (leaf identities are what the mode matches).
        candidates: leaf indices of the weights that may be probed.

    Returns:
        Every leaf's use count and the candidates' calls.
    """
    slots = {id(prepared.leaves[i]): k for k, i in enumerate(candidates)}
    leaf_of = {id(x): i for i, x in enumerate(prepared.leaves)}
    mode = ProbeMode(slots, leaf_of=leaf_of)
    with torch.no_grad(), scope(prepared.device_types), mode:
        run()
    return Discovery(uses=tuple(mode.uses), calls={candidates[k]: call for k, call in mode.calls.items()})
