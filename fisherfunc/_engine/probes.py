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
values) and how it is called (:class:`Call`). The gradient of a weight used ``k`` times is a sum
over its uses, and its square has cross terms, so one probe is only correct for a weight used once.
A weight whose every use is the same kind of linear call (``F.linear`` or ``torch.addmm`` with
equal output shapes: a recurrent weight at each time step, a layer shared across depth) gets one
probe per use instead, stacked ``[k, *out_shape]``, and its inputs are stacked alike::

    G = Σ_{i < k} Σ_t d_{i,t} a_{i,t}ᵀ        (a linear layer over k times the tokens)

so the square of the whole sum is formed, cross terms included. A weight also used any other way
(a tied embedding that is also an output layer, a fused weight that is split) takes the direct
path. The recurrent kernels are run as such linear calls by :mod:`~fisherfunc._engine.recurrent`,
entered below this mode. What to do with ``a`` and ``d`` is the caller's: the group path
(:mod:`~fisherfunc._engine.group_sums`) sums squares of ``G = Σ_t d_t a_tᵀ`` into groups, K-FAC
(:mod:`fisherfunc.kfac`) forms ``Σ a aᵀ`` and ``Σ d dᵀ``.

**Reducing probes.** A caller that only needs a function ``s = f(a, d)`` of a once-used weight's
factors (the group path's square sums) gives the slot a *reducer* ``f``. The call's output then
passes through :class:`ReducingProbe` instead of having a probe added: an identity in the forward
that keeps ``a`` for the backward, and whose backward, the moment ``d`` exists, returns ``d`` to the
layer and ``f(a, d)`` as the gradient of a small probe of ``s``'s shape::

    ∂L_b/∂p := f(a, d)        (p: zeros of s's shape; the layer's own gradient d flows on unchanged)

So no site's ``[T, out]`` output gradient nor its ``[T, in]`` input outlives that layer's backward:
``grad`` holds what a plain backward holds plus one site's reduction at a time, instead of every
site's ``a`` and ``d`` until the end (what kept a transformer's Fisher at 2–3× a forward+backward's
memory). The input ``a`` is the one the layer's own backward would keep for a weight gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from types import FunctionType
from typing import Any, Literal, cast

import optree
import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import attention_replacements
from .modes import Part
from .numerics import Prepared, scope
from .recurrent import Recurrent

__all__ = [
    "StaleSites",
    "uncoverable",
    "Op",
    "Call",
    "Discovery",
    "ProbeMode",
    "ReducingProbe",
    "Reducer",
    "discover",
    "arg",
    "transparent",
]

#: ``(a, d) -> s``: a once-used weight's recorded input and output gradient to what its probe's gradient is.
Reducer = Callable[[Tensor, Tensor], Tensor]

Op = Literal["linear", "addmm", "embedding", "conv1d", "conv2d"]
#: A convolution's ``(kernel, stride, padding, dilation)``, each a 2-tuple (conv1d as a conv2d over ``[1, L]``).
ConvGeometry = tuple[tuple[int, int], ...]
_CONV: dict[Callable[..., Any], Op] = {torch.conv1d: "conv1d", torch.conv2d: "conv2d"}
#: Calls whose repeated uses of one weight are factorised together (see :meth:`Discovery.repeated`).
_REPEATABLE: tuple[Op, ...] = ("linear", "addmm")


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
        calls: ``{leaf index: (Call, ...)}``: every supported call of each candidate, in call order.
    """

    uses: tuple[int, ...]
    calls: Mapping[int, tuple[Call, ...]]

    def single(self, leaf: int) -> Call | None:
        """The call of a weight used exactly once by a supported, plain call; else ``None``."""
        calls = self.calls.get(leaf, ())
        return calls[0] if len(calls) == 1 and calls[0].plain and self.uses[leaf] == 1 else None

    def repeated(self, leaf: int) -> tuple[Call, int] | None:
        """``(call, k)`` for a weight whose every one of ``k`` uses is the same plain call; else ``None``.

        ``k = 1`` is :meth:`single`. For ``k > 1`` the calls must be ``F.linear`` or ``torch.addmm``
        with equal output shapes (a recurrent weight at every step, a layer shared across depth):
        then ``G = Σ_uses Σ_t d_t a_tᵀ`` is a linear layer's gradient over ``k`` times the tokens.
        A weight also used any other way (a tied embedding, a split) is ``None``.
        """
        calls = self.calls.get(leaf, ())
        if not calls or self.uses[leaf] != len(calls) or not all(c.plain for c in calls):
            return None
        first = calls[0]
        if len(calls) > 1 and (first.op not in _REPEATABLE or any(c.out_shape != first.out_shape for c in calls)):
            return None
        return first, len(calls)


def arg(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    """A call's argument by position or keyword."""
    return args[position] if len(args) > position else kwargs.get(name, default)


#: The calls a probing :class:`ProbeMode` acts on (:func:`_weight_of`'s, and the attention function it sees into).
_PROBED: frozenset[Callable[..., Any]] = frozenset(
    {F.linear, torch.addmm, F.embedding, *_CONV, F.multi_head_attention_forward}
)


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
    ``F.multi_head_attention_forward``'s copy also splits its packed projection by views
    (:func:`~fisherfunc._engine.attention.in_projection_packed`). ``None`` if ``func`` does not have
    that form (then its weights are not probed).
    """
    code = getattr(func, "__code__", None)
    if code is None or "has_torch_function" not in code.co_names:
        return None
    namespace = {**func.__globals__, "has_torch_function": lambda *_: False, **attention_replacements(func)}
    clone = FunctionType(code, namespace, func.__name__, func.__defaults__, func.__closure__)
    clone.__kwdefaults__ = func.__kwdefaults__
    return clone


def _is_use(func: Callable, out: Any) -> bool:
    """Whether a call uses its inputs' values in a way the gradient sees.

    Metadata queries such as ``.dtype`` or ``.is_floating_point()`` return no floating tensor, and
    ``.data`` and ``.detach()`` return one that carries no gradient (torch 2.1's recurrent modules
    read ``weight.data`` in their forward), so none of them is a use of a weight.
    """
    if func is Tensor.detach or getattr(func, "__self__", None) is Tensor.data:
        return False
    if isinstance(out, Tensor):  # the common case, without a tree walk
        return out.is_floating_point()
    if isinstance(out, (bool, int, float, torch.dtype, torch.device)):  # metadata: no tree walk either
        return False
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


def _mentions(watched: frozenset[int], values: Any) -> list[int]:
    """The ids in ``watched`` of the objects in ``values`` (a call's arguments), lists, tuples and dicts included."""
    hits = []
    for x in values:
        if id(x) in watched:
            hits.append(id(x))
        elif isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
            hits += _mentions(watched, x)
        elif isinstance(x, dict):
            hits += _mentions(watched, x.values())
    return hits


def _name(func: Any) -> str:
    """A torch function's name for a message (``Tensor.T`` for a property's getter)."""
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", None) == "__get__" and owner is not None:
        return f"Tensor.{getattr(owner, '__name__', owner)}"
    return str(getattr(func, "__qualname__", None) or getattr(func, "__name__", func))


def uncoverable(exc: StaleSites, names: Sequence[str]) -> ValueError:
    """K-FAC's error for layers stale right after discovery: the model calls them differently with gradients.

    Args:
        exc: the error of the run right after discovery.
        names: the params' leaf names (``exc.leaf`` indexes them).
    """
    which = f"'{names[exc.leaf]}'" if exc.leaf is not None else "a covered weight"
    return ValueError(
        f"K-FAC cannot cover {which}: {exc}. This happened right after discovery (one sample's forward without "
        "gradients), so the model calls that weight differently with gradients or under vmap; pass layers= "
        "patterns that leave its layer out"
    )


def _same_call(expected: Call, seen: Call) -> bool:
    """Whether a probed call is the one discovery saw (its bias compared only where ``expected`` names one)."""
    return (
        seen.op == expected.op
        and seen.out_shape == expected.out_shape
        and seen.padding_idx == expected.padding_idx
        and seen.plain == expected.plain
        and seen.conv == expected.conv
        and (expected.bias is None or seen.bias == expected.bias)
    )


class StaleSites(RuntimeError):
    """A forward used a probed weight otherwise than discovery saw for its sample shape.

    The model's calls changed since discovery (a flag, a different code path): the probes would
    give a wrong gradient, so the computation stops; the engine then discovers again.

    Attributes:
        leaf: index of the weight (or watched bias) among the params' leaves, where known.
    """

    def __init__(self, message: str, leaf: int | None = None) -> None:
        super().__init__(message)
        self.leaf = leaf


class ReducingProbe(torch.autograd.Function):
    """``y`` unchanged in the forward; in the backward ``d`` for ``y`` and ``reducer(a, d)`` for ``probe``.

    ``forward(y [*, out], a [*, in], probe [s], reducer) -> y``; ``backward(d) -> (d, 0, reducer(a, d), -)``.
    ``a`` gets no gradient through this path (the layer's own backward gives it one). Runs under
    ``torch.func`` transforms: its own ``vmap`` rule (the forward is a copy, batched where ``y``
    is), and a backward of plain torch ops, which ``vmap`` vectorises with the rest — no generated
    rule, whose per-call class building was Python overhead on every probed layer.
    """

    @staticmethod
    def forward(y: Tensor, a: Tensor, probe: Tensor, reducer: Reducer) -> Tensor:  # noqa: D102
        return y.clone()

    @staticmethod
    def vmap(  # noqa: D102
        info: Any, in_dims: tuple, y: Tensor, a: Tensor, probe: Tensor, reducer: Reducer
    ) -> tuple[Tensor, Any]:
        return y.clone(), in_dims[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:  # noqa: D102
        _, a, _, reducer = inputs
        ctx.save_for_backward(a)
        ctx.reducer = reducer

    @staticmethod
    def backward(ctx: Any, d: Tensor) -> tuple[Tensor, None, Tensor, None]:  # noqa: D102
        (a,) = ctx.saved_tensors
        return d, None, ctx.reducer(a, d), None


class ProbeMode(Part):
    """Adds probes to, and records the inputs of, the calls that use the probed weights.

    Args:
        slots: ``{id(weight tensor): slot}`` of the probed weights.
        probes: one probe per slot, added to the call's output; ``None`` for discovery, which
            instead counts the uses of every tensor in ``leaf_of`` and describes the calls.
        leaf_of: ``{id(tensor): leaf index}`` of every leaf of the params: discovery counts their
            uses; probing names a probed call's bias by it (see ``expect``).
        repeats: how many calls use each slot's weight (default 1). A slot used ``k > 1`` times has a
            probe ``[k, *out_shape]``: its ``i``-th call adds ``probe[i]``, and its inputs are stacked.
        reducers: per slot, ``None`` or a :data:`Reducer` for a once-used ``F.linear``/``torch.addmm``
            weight: its call goes through :class:`ReducingProbe` (the slot's probe has the reducer's
            output shape) and its input is not recorded.
        expect: probing: per slot, the :class:`Call` discovery saw (``None``: not checked). A probed
            call that differs from it (another op, output shape, geometry, padding row, or a bias
            other than ``expect.bias`` when that is set) raises :class:`StaleSites`.
        watch: probing: ids of further tensors (K-FAC's folded biases) that, like the probed
            weights, may be used by their probed calls only.

    After a run, ``inputs[slot]`` holds the slot's input (an embedding's ids; ``[k, ...]`` for a
    repeated slot), ``None`` if the weight was not called or the slot reduces in the backward.

    **Kept sites stay valid, or the run stops.** Sites are discovered once and kept across calls
    (per loss and sample shapes), but a model's calls may change between two forwards (a
    flag, a different code path). A probe is only correct while its weight is used by exactly the
    calls discovery saw, so a probing mode looks at *every* call: one that uses a probed weight
    other than as the weight of its probed call (``x @ W.T``, ``torch.cat([W, ...])``), a probed
    weight called more (or fewer) times than discovery saw, or a probed call that differs from the
    discovered one raises :class:`StaleSites` before any sum is returned, and the engine
    discovers again.
    """

    def __init__(
        self,
        slots: Mapping[int, int],
        probes: Sequence[Tensor] | None = None,
        leaf_of: Mapping[int, int] | None = None,
        repeats: Sequence[int] | None = None,
        reducers: Sequence[Reducer | None] | None = None,
        expect: Sequence[Call | None] | None = None,
        watch: Collection[int] = (),
    ) -> None:
        super().__init__()
        self.slots = slots
        self.expect = tuple(expect) if expect is not None else (None,) * len(slots)
        #: probing: the tensors only their probed calls may use (the probed weights, and ``watch``)
        self.watched = frozenset((*slots, *watch))
        self.reducers = tuple(reducers) if reducers is not None else (None,) * len(slots)
        self.probes = probes
        self.leaf_of = leaf_of or {}
        self.repeats = tuple(repeats) if repeats is not None else (1,) * len(slots)
        self.uses = [0] * len(self.leaf_of)
        self.calls: dict[int, list[Call]] = {}
        self.inputs: list[Tensor | None] = [None] * len(slots)
        self.called = [False] * len(slots)  # whether a once-used slot was called
        self.slot_ids = {k: i for i, k in slots.items()}  # slot -> id of its weight
        self.steps: list[list[Tensor]] = [[] for _ in slots]  # the inputs of repeated slots, in call order
        # a repeated slot's probe split once into its uses (one unbind, whose backward is one stack;
        # indexing the probe per use would materialise a full-size gradient per use)
        self.parts: dict[int, tuple[Tensor, ...]] = {}

    def acts_on(self) -> frozenset[Callable[..., Any]] | None:  # noqa: D102
        # probing: the probed calls, and nn.MultiheadAttention's function to see into (every other
        # call is observed, see observe); discovery counts every call's uses of the params
        return _PROBED if self.probes is not None else None

    @property
    def observes(self) -> bool:  # type: ignore[override]  # noqa: D102
        return self.probes is not None

    def observe(self, func: Any, args: tuple, kwargs: dict[str, Any], out: Any) -> None:  # noqa: D102
        # probing: a call that is not a probed one must not use a probed weight (see _check_uses)
        seen = _mentions(self.watched, (*args, *kwargs.values())) if self.watched else None
        if seen and _is_use(func, out):  # (most mentions are reads: .dtype, .is_floating_point())
            self._check_uses(func, args, kwargs, out, None, None, seen)

    def handle(self, func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:  # noqa: D102
        if func is F.multi_head_attention_forward:  # see into it: its projections are F.linear calls
            body = transparent(func)
            if body is not None:
                with self.outer:  # this mode (or its chain) again, over the function's body
                    return body(*args, **kwargs)
        found = _weight_of(func, args, kwargs)
        slot = self.slots.get(id(found[1])) if found is not None else None
        out = self.proceed(func, args, kwargs)
        if self.probes is not None:
            seen = _mentions(self.watched, (*args, *kwargs.values()))
            if seen:
                self._check_uses(func, args, kwargs, out, found, slot, seen)
            if slot is None:
                return out
        elif _is_use(func, out):  # discovery: count uses of the params' leaves
            for x in optree.tree_leaves(cast(Any, (args, kwargs))):
                leaf = self.leaf_of.get(id(x)) if isinstance(x, Tensor) else None
                if leaf is not None:
                    self.uses[leaf] += 1
        if slot is None:
            return out
        assert found is not None
        op, weight = found
        a = arg(args, kwargs, 1, "mat1") if op == "addmm" else arg(args, kwargs, 0, "input")
        if self.probes is None:
            self.inputs[slot] = a
            self.calls.setdefault(slot, []).append(_describe(op, weight, out, args, kwargs, self.leaf_of))
            return out
        reducer = self.reducers[slot]
        if self.repeats[slot] == 1:
            # a once-used weight called again would add its probe twice: a wrong G, so refuse (this is
            # the check that keeps sites discovered by an earlier call valid, see group_sums.GroupSums)
            if self.called[slot]:
                raise StaleSites(
                    "a probed weight was called more than the 1 time discovery saw: the model's calls changed "
                    "between two forwards of samples of one shape",
                    self.leaf_of.get(id(weight)),
                )
            self.called[slot] = True
            if reducer is not None:
                return ReducingProbe.apply(out, a, self.probes[slot], reducer)
            self.inputs[slot] = a
            return out + self.probes[slot]
        use = len(self.steps[slot])
        if use >= self.repeats[slot]:
            raise StaleSites(
                f"a probed weight was called more than the {self.repeats[slot]} times discovery saw: the model's "
                "calls changed between two forwards of samples of one shape",
                self.leaf_of.get(id(weight)),
            )
        self.steps[slot].append(a)
        if slot not in self.parts:
            self.parts[slot] = self.probes[slot].unbind(0)
        return out + self.parts[slot][use]

    def _check_uses(
        self,
        func: Any,
        args: tuple,
        kwargs: dict,
        out: Any,
        found: tuple[Op, Any] | None,
        slot: int | None,
        seen: list[int],
    ) -> None:
        """Probing: raise :class:`StaleSites` unless a call that mentions watched tensors is a discovered use.

        ``seen``: the watched ids among the call's arguments. A probed call may mention its weight
        and its bias; it must be the call discovery saw. Any other call may mention them only
        without using their values (``.shape``, ``.dtype``, ``.detach()``).
        """
        if slot is not None:
            assert found is not None
            op, weight = found
            bias = arg(args, kwargs, 0, "input") if op == "addmm" else arg(args, kwargs, 2, "bias")
            seen = list(seen)
            for own in (id(weight), id(bias)):
                if own in seen:
                    seen.remove(own)
            expected, leaf_of = self.expect[slot], self.leaf_of
            if expected is not None and not _same_call(expected, _describe(op, weight, out, args, kwargs, leaf_of)):
                raise StaleSites(
                    f"a probed weight's {op} call is not the one discovery saw ({expected}): the model's calls "
                    "changed between two forwards of samples of one shape",
                    self.leaf_of.get(id(weight)),
                )
        if seen and _is_use(func, out):
            raise StaleSites(
                f"a probed weight was used by {_name(func)}, not only by the call discovery saw: the model's calls "
                "changed between two forwards of samples of one shape",
                self.leaf_of.get(seen[0]),
            )

    def recorded(self, like: Tensor) -> tuple[Tensor, ...]:
        """The recorded inputs: stacked over a repeated slot's uses, empty like ``like`` for a reducing slot.

        Raises:
            StaleSites: a slot was called fewer times than discovery saw (not at all, for a once-used one).
        """
        empty = like.new_zeros(0)
        out = []
        for slot, (x, steps) in enumerate(zip(self.inputs, self.steps)):
            if self.repeats[slot] == 1 and not self.called[slot]:
                # its weight's gradient is zero now, but its probe alone would not say so (an empty input)
                raise StaleSites(
                    "a probed weight was not called, but discovery saw it called once: the model's calls changed "
                    "between two forwards of samples of one shape",
                    self.leaf_of.get(self.slot_ids[slot]),
                )
            if self.repeats[slot] > 1 and len(steps) != self.repeats[slot]:
                raise StaleSites(
                    f"a probed weight was called {len(steps)} times, but discovery saw {self.repeats[slot]}: the "
                    "model's calls changed between two forwards of samples of one shape"
                )
            out.append(torch.stack(steps) if self.repeats[slot] > 1 else x if x is not None else empty)
        return tuple(out)


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
    # the random draws of a forward with dropout="train" come from a copy of the generators' state:
    # whether a call discovered (or found its sites kept) must not change the draws of its Fisher
    device = prepared.device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad(), scope(prepared), mode, Recurrent():
        run()
    return Discovery(uses=tuple(mode.uses), calls={candidates[k]: tuple(calls) for k, calls in mode.calls.items()})
