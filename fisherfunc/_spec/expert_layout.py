"""Fused experts (``transformers`` 5): their layout, stated as the function it computes, and its live self-test.

``transformers`` 5 stores a mixture-of-experts layer's ``E`` experts as fused 3-D tensors in one
module (``MixtralExperts``, ``Qwen2MoeExperts``, ``Qwen3MoeExperts``, ``OlmoeExperts``, ...), called as
``experts(x [N, H], top_k_index [N, k], top_k_weights [N, k])`` after a router picked ``k`` experts
per token. The layouts, one table:

| parameter            | stored (``is_transposed`` false) | transposed            | output channels      |
|----------------------|----------------------------------|-----------------------|----------------------|
| ``gate_up_proj``     | ``[E, 2·I, H]`` (gated)          | ``[E, H, 2·I]``       | axis 1 / axis 2      |
| ``up_proj``          | ``[E, I, H]`` (not gated)        | ``[E, H, I]``         | axis 1 / axis 2      |
| ``down_proj``        | ``[E, H, I]``                    | ``[E, I, H]``         | axis 1 / axis 2      |
| ``*_bias`` (if any)  | ``[E, out]``                     | ``[E, out]``          | axis 1               |

and the function they compute, for token ``n`` routed to experts ``idx[n, j]`` with weights ``w[n, j]``::

    u_ne  = W1_e x_n (+ b1_e)                    [N, E, 2I]   (every expert, every token)
    a_ne  = gate(u_ne)                           [N, E, I]    the module's own _apply_gate (or act_fn)
    y_ne  = W2_e a_ne (+ b2_e)                   [N, E, H]
    r_ne  = Σ_j w[n, j] · [idx[n, j] = e]        [N, E]       routing weights, zero off the top-k
    out_n = Σ_e r_ne · y_ne                      [N, H]

This **dense** form (:func:`dense_forward`) is what experts run per sample, within
:func:`~fisherfunc._engine.experts.dense_experts`: the model's own forwards choose experts with
data-dependent control flow (``nonzero``, a loop with ``if`` over the experts hit, ``torch.where``;
the ``grouped_mm`` kernel sorts tokens into groups of varying size), which ``torch.func.vmap``
cannot run. It is exact: an expert off a token's top-k gets the
routing weight 0, so its contribution to the output — and to every gradient — is exactly zero (for
finite activations), and the router's gradient flows through ``w`` as in the model.

Its cost, against the routed computation of ``k`` experts per token: ``E / k`` times the expert
FLOPs, and activations ``[N, E, 2I]`` instead of ``[N, k, 2I]``. Gathering each token's expert weights
(``transformers``' ``batched_mm``) would instead hold ``[N·k, 2I, H]`` weights per sample, ``N·k / E``
times the per-sample gradient of the tensor itself.

The layout is read off the module (its ``is_transposed`` flag, else the shapes) and **verified**
before it is trusted (:func:`expert_layout`): the module's own eager forward and :func:`dense_forward`
run on pseudo-random float64 inputs and weights (every expert hit, ``k = 2``) and must agree to 1e-12; a
module that does not is refused, by name. Nothing here imports ``transformers``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn

from .rules import SpecError

__all__ = ["ExpertLayout", "is_fused_experts", "expert_layout", "dense_forward", "forward_as", "SELF_TEST_TOL"]

#: Largest relative difference ``max|dense − own| / max|own|`` the self-test accepts (float64).
SELF_TEST_TOL = 1e-12
#: The self-test shrinks the intermediate size to this (the layout does not depend on it).
_TEST_INTERMEDIATE = 3


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """How one fused-experts module stores its experts (see the module's table).

    Attributes:
        num_experts: ``E``.
        hidden: ``H``, the size of the tokens' hidden states.
        intermediate: ``I``, each expert's inner size.
        gated: ``gate_up_proj`` (gated, ``2·I`` outputs) rather than ``up_proj``.
        transposed: weights stored ``[E, in, out]`` rather than ``[E, out, in]``.
        bias: whether ``{up}_bias`` and ``down_proj_bias`` ``[E, out]`` exist.
        post_norm: whether ``post_expert_norm`` is applied to each expert's output.
    """

    num_experts: int
    hidden: int
    intermediate: int
    gated: bool
    transposed: bool
    bias: bool
    post_norm: bool

    @property
    def up(self) -> str:
        """The first projection's name: ``gate_up_proj`` or ``up_proj``."""
        return "gate_up_proj" if self.gated else "up_proj"

    @property
    def channel_axis(self) -> int:
        """The axis of each expert's output channels in the 3-D weights (1, or 2 when transposed)."""
        return 2 if self.transposed else 1

    def shapes(self, intermediate: int | None = None) -> dict[str, tuple[int, ...]]:
        """The parameter shapes of this layout (with ``intermediate`` in place of ``I`` if given)."""
        e, h, i = self.num_experts, self.hidden, self.intermediate if intermediate is None else intermediate
        out1 = 2 * i if self.gated else i
        shapes: dict[str, tuple[int, ...]] = {
            self.up: (e, h, out1) if self.transposed else (e, out1, h),
            "down_proj": (e, i, h) if self.transposed else (e, h, i),
        }
        if self.bias:
            shapes[f"{self.up}_bias"] = (e, out1)
            shapes["down_proj_bias"] = (e, h)
        return shapes


def _own(module: nn.Module) -> dict[str, Tensor]:
    return dict(module.named_parameters(recurse=False))


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds fused experts: 3-D ``down_proj`` and ``gate_up_proj``/``up_proj``, same ``E``."""
    own = _own(module)
    up = own.get("gate_up_proj", own.get("up_proj"))
    down = own.get("down_proj")
    return up is not None and down is not None and up.ndim == 3 and down.ndim == 3 and up.shape[0] == down.shape[0]


def _candidate(module: nn.Module, name: str) -> ExpertLayout:
    """The layout the module's flag (else its shapes) claims; not yet verified."""
    own = _own(module)
    gated = "gate_up_proj" in own
    up, down = own["gate_up_proj" if gated else "up_proj"], own["down_proj"]
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        transposed = flag
    else:  # no flag: transposed only if just that reading fits (H shared as up[2] = down[1], or up[1] = down[2])
        transposed = up.shape[2] != down.shape[1] and up.shape[1] == down.shape[2]
    e, h = up.shape[0], (up.shape[1] if transposed else up.shape[2])
    intermediate = down.shape[1] if transposed else down.shape[2]
    bias_names = {f"{'gate_up_proj' if gated else 'up_proj'}_bias", "down_proj_bias"}
    bias = bias_names <= set(own)
    layout = ExpertLayout(
        num_experts=e,
        hidden=h,
        intermediate=intermediate,
        gated=gated,
        transposed=transposed,
        bias=bias,
        post_norm=bool(getattr(module, "has_post_expert_norm", False)),
    )
    expected = layout.shapes()
    actual = {k: tuple(v.shape) for k, v in own.items()}
    if any(actual.get(k) != s for k, s in expected.items()) or set(actual) - set(expected):
        raise SpecError(
            f"{name} ({type(module).__name__}): parameters {actual} do not match the fused-experts layout "
            f"{expected} (E={e}, H={h}, I={intermediate}, transposed={transposed})"
        )
    return layout


def dense_forward(
    module: nn.Module, layout: ExpertLayout, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The experts' output by the dense form of the module docstring (``vmap``-safe, exact).

    Args:
        module: the experts module (its parameters, ``_apply_gate``/``act_fn``, ``post_expert_norm``).
        layout: its verified layout.
        hidden: ``[N, H]`` token states.
        top_k_index: ``[N, k]`` the experts chosen per token.
        top_k_weights: ``[N, k]`` their routing weights.

    Returns:
        ``[N, H]`` in ``hidden``'s dtype.
    """
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"{type(module).__name__}: routing weights of shape {tuple(top_k_weights.shape)} do not match the "
            f"chosen experts {tuple(top_k_index.shape)}; fisherfunc's dense experts take one weight per chosen expert"
        )
    w1, w2 = _tensor(module, layout.up), _tensor(module, "down_proj")
    n, e = hidden.shape[0], layout.num_experts
    u = torch.einsum("nh,eho->neo" if layout.transposed else "nh,eoh->neo", hidden, w1)
    if layout.bias:
        u = u + _tensor(module, f"{layout.up}_bias")
    gate = _function(module, "_apply_gate" if layout.gated else "act_fn")
    a = gate(u.reshape(n * e, -1)).reshape(n, e, -1)  # the module's own gating, on [N·E, 2I] as it expects
    y = torch.einsum("nei,eih->neh" if layout.transposed else "nei,ehi->neh", a, w2)
    if layout.bias:
        y = y + _tensor(module, "down_proj_bias")
    if layout.post_norm:
        y = _function(module, "post_expert_norm")(y.reshape(n * e, -1)).reshape(n, e, -1)
    experts = torch.arange(layout.num_experts, device=top_k_index.device)
    chosen = (top_k_index.unsqueeze(-1) == experts).to(y.dtype)  # [N, k, E]
    routing = (top_k_weights.to(y.dtype).unsqueeze(-1) * chosen).sum(1)  # r_ne
    return torch.einsum("ne,neh->nh", routing, y).to(hidden.dtype)


def _tensor(module: nn.Module, name: str) -> Tensor:
    value = getattr(module, name)
    assert isinstance(value, Tensor), f"{type(module).__name__}.{name} is not a tensor"
    return value


def _function(module: nn.Module, name: str) -> Callable[[Tensor], Tensor]:
    value = getattr(module, name)
    assert callable(value), f"{type(module).__name__}.{name} is not callable"
    return cast(Callable[[Tensor], Tensor], value)


@contextlib.contextmanager
def forward_as(module: nn.Module, forward: Callable[..., Tensor]) -> Iterator[None]:
    """Within the block, ``module(...)`` calls ``forward(module, ...)``; the module is restored on exit.

    The swap is an instance attribute that shadows the class's ``forward`` (no hook), removed (or
    the previous instance attribute put back) when the block ends, also on error.
    """
    slots = module.__dict__  # an instance attribute shadows the class's forward; nn.Module.__call__ reads it
    had, previous = "forward" in slots, slots.get("forward")
    slots["forward"] = types.MethodType(forward, module)
    try:
        yield
    finally:
        if had:
            slots["forward"] = previous
        else:
            del slots["forward"]


def _eager(module: nn.Module) -> Callable[..., Tensor]:
    """The module class's own eager forward (``transformers`` wraps it to dispatch on the config)."""
    forward = type(module).forward
    return getattr(forward, "__wrapped__", forward)


def _scrambled(shape: tuple[int, ...], salt: int) -> Tensor:
    """Deterministic float64 values in ``[-0.5, 0.5)``: ``|frac(sin(12.9898 i + 78.233 s) · 43758.5453)| − ½``.

    No random generator: the self-test may first run inside a per-sample function, where ``vmap``
    refuses random operations, and it never touches torch's global generator.
    """
    i = torch.arange(math.prod(shape), dtype=torch.float64)
    return (torch.sin(12.9898 * i + 78.233 * salt) * 43758.5453).frac().abs().sub(0.5).reshape(shape)


def _self_test(module: nn.Module, layout: ExpertLayout, name: str) -> None:
    """Run the module's own forward and :func:`dense_forward` on scrambled float64 data; raise if they differ."""
    e, h = layout.num_experts, layout.hidden
    k = min(2, e)
    n = 2 * e
    params = {
        key: _scrambled(shape, salt)
        for salt, (key, shape) in enumerate(layout.shapes(min(layout.intermediate, _TEST_INTERMEDIATE)).items())
    }
    x = _scrambled((n, h), 7)
    index = (torch.arange(n).unsqueeze(1) + torch.arange(k)) % e  # every expert hit, k distinct per token
    weights = _scrambled((n, k), 8) + 1.0  # in [0.5, 1.5)
    buffers = {key: b.double() if b.is_floating_point() else b for key, b in module.named_buffers()}
    extras = {key: p.detach().double() for key, p in module.named_parameters() if "." in key}  # e.g. a norm's
    try:
        with torch.no_grad():
            own = _call(module, _eager(module), {**params, **extras}, buffers, (x, index, weights))
            dense = _call(
                module, lambda m, *a: dense_forward(m, layout, *a), {**params, **extras}, buffers, (x, index, weights)
            )
    except Exception as error:  # any failure of the module's own code is a layout it does not have
        raise SpecError(
            f"{name} ({type(module).__name__}): the fused-experts self-test could not run its forward "
            f"({type(error).__name__}: {error}); fisherfunc cannot vectorise it per sample"
        ) from error
    scale = float(own.abs().max())
    diff = float((dense - own).abs().max()) / max(scale, torch.finfo(torch.float64).tiny)
    if not torch.isfinite(own).all() or diff > SELF_TEST_TOL:
        raise SpecError(
            f"{name} ({type(module).__name__}): its forward differs from the fused-experts layout {layout} "
            f"(relative difference {diff:.1e} > {SELF_TEST_TOL:.0e} on pseudo-random float64 inputs); fisherfunc "
            "refuses to compute per-sample Fisher through it"
        )


def _call(
    module: nn.Module, forward: Callable[..., Tensor], params: dict[str, Tensor], buffers: dict[str, Tensor], args: Any
) -> Tensor:
    with forward_as(module, forward):
        return torch.func.functional_call(module, (params, buffers), args)


#: Verified layouts (or the refusal) per module, kept while the module lives.
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, ExpertLayout | SpecError] = weakref.WeakKeyDictionary()


def expert_layout(module: nn.Module, name: str = "experts") -> ExpertLayout:
    """The verified layout of a fused-experts module (checked once per module, then remembered).

    Args:
        module: a module for which :func:`is_fused_experts` holds.
        name: its dotted name, for messages.

    Raises:
        SpecError: if its shapes fit no layout of the table, it runs experts in parallel across
            devices, or its forward differs from :func:`dense_forward` (the message names it).
    """
    found = _VERIFIED.get(module)
    if found is None:
        try:
            if getattr(module, "_is_expert_parallel", False):
                raise SpecError(
                    f"{name} ({type(module).__name__}) runs its experts in parallel across devices; fisherfunc "
                    "computes per-sample Fisher of experts held on one device only"
                )
            found = _candidate(module, name)
            _self_test(module, found, name)
        except SpecError as error:
            found = error
        _VERIFIED[module] = found
    if isinstance(found, SpecError):
        raise found
    return found
