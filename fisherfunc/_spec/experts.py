"""Mixtures of experts: group rules for fused experts and their routers, placed by ``infer_spec``.

A mixture-of-experts layer of ``transformers`` 5 holds ``E`` experts as fused 3-D tensors (layouts
and their live self-test: :mod:`~fisherfunc._spec.expert_layout`) and a router whose weight
``[E, H]`` scores the experts for each token. The groups:

| parameter                                    | rule                           | groups       | key suffix        |
|----------------------------------------------|--------------------------------|--------------|-------------------|
| ``experts.gate_up_proj`` ``[E, 2·I, H]``      | ``ExpertChannels(1)`` (default)| ``[E, 2·I]``  | ``expert_channel``|
| ``experts.down_proj`` ``[E, H, I]``           | ``ExpertChannels(1)``          | ``[E, H]``    | ``expert_channel``|
| transposed (``[E, in, out]``)                 | ``ExpertChannels(2)``          | ``[E, out]``  | ``expert_channel``|
| expert biases ``[E, out]``                    | ``ExpertChannels(1)``          | ``[E, out]``  | ``expert_channel``|
| any of the above, one number per expert       | ``Channel(0)`` (an override)   | ``[E]``       | ``channel``       |
| router ``gate.weight`` ``[E, H]`` (and bias)  | ``Channel(0)``                 | ``[E]``       | ``channel``       |

``ExpertChannels`` keeps expert ``e``'s output channels apart — the analogue of ``Channel(0)`` for an
``nn.Linear`` — in the order the module stores them (for a concatenated ``gate_up_proj``: the ``I``
gate channels, then the ``I`` up channels). One number per expert is ``Channel(0)``: it sums every
entry whose index on axis 0 is ``e``, exactly the sum of ``ExpertChannels`` over its channels
(``overrides={"*.experts.*": fisherfunc.Channel(0)}``).

The router's convention: **row ``e`` of its weight is expert ``e``'s routing row** — the logit
``z_ne = W_e · x_n`` that top-k compares — so its ``Channel(0)`` is one number per expert, indexed
like the experts' groups. It is verified on the live router before it is trusted: with the weight's
row ``e`` set to ones and the others to zero, the router must choose expert ``e`` for every token.

A layer whose experts fail their self-test, or whose router fails its check, gets a ``SpecError``
for those parameters (raised by ``infer_spec`` unless an override covers them); its experts cannot
run per sample either (:mod:`fisherfunc._engine.experts` refuses them by name).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .expert_layout import expert_layout, is_fused_experts
from .rules import Channel, Rule, SpecError

__all__ = ["ExpertChannels", "placements", "fused_experts", "router_of", "check_router"]

#: Names a mixture-of-experts block gives its router, tried in order.
_ROUTER_NAMES = ("gate", "router")


@dataclasses.dataclass(frozen=True)
class ExpertChannels(Rule):
    """One value per expert and output channel: ``F[e, c] = Σ_{entries with index e on axis 0, c on axis} x``.

    Args:
        axis: the output-channel axis of the fused expert tensor (1 for ``[E, out, in]``, 2 for the
            transposed ``[E, in, out]``; 1 for a bias ``[E, out]``). Axis 0 is the expert.

    >>> import torch
    >>> ExpertChannels(1).reduce(torch.ones(2, 3, 4)).tolist()   # [E=2, out=3, in=4] -> [E, out]
    [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
    """

    axis: int = 1
    group_type: str = dataclasses.field(default="expert_channel", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        if len(shape) < 2:
            raise SpecError(f"parameter '{name}' of shape {tuple(shape)}: {self!r} needs [experts, ...] with 2+ axes")
        if not 1 <= self.axis < len(shape):
            raise SpecError(
                f"parameter '{name}' of shape {tuple(shape)}: {self!r}: the channel axis must be one of "
                f"1..{len(shape) - 1} (axis 0 is the expert)"
            )
        return torch.Size([shape[0], shape[self.axis]])

    def reduce(self, x: Tensor) -> Tensor:
        others = [d for d in range(1, x.ndim) if d != self.axis]
        return x.sum(dim=others) if others else x

    def membership(self, shape: torch.Size | Sequence[int], device: torch.device | str | None = None) -> Tensor:
        shape = torch.Size(shape)
        groups = self.group_shape(shape)
        view = [1] * len(shape)
        expert, channel = list(view), list(view)
        expert[0], channel[self.axis] = shape[0], shape[self.axis]
        e = torch.arange(shape[0], device=device).reshape(expert)
        c = torch.arange(shape[self.axis], device=device).reshape(channel)
        return (e * groups[1] + c).expand(shape).contiguous()  # group (e, c) at flat e · out + c


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every fused-experts module of ``model`` (unverified)."""
    return [(name, module) for name, module in model.named_modules() if is_fused_experts(module)]


def router_of(model: nn.Module, experts_name: str, num_experts: int) -> tuple[str, nn.Module] | None:
    """The router beside an experts module: the block's ``gate``/``router`` child with a 2-D weight ``[E, ·]``."""
    block_name = experts_name.rpartition(".")[0]
    block = model.get_submodule(block_name)
    for local in _ROUTER_NAMES:
        child = getattr(block, local, None)
        weight = getattr(child, "weight", None)
        if isinstance(child, nn.Module) and isinstance(weight, Tensor) and weight.ndim == 2:
            if weight.shape[0] == num_experts:
                return (f"{block_name}.{local}" if block_name else local), child
    return None


def _chosen(output: object, expert: int, tokens: int, num_experts: int) -> bool | None:
    """Whether a router's output picks ``expert`` for every token (``None``: no choice found in it)."""
    leaves = list(output) if isinstance(output, (tuple, list)) else [output]
    tensors = [t for t in leaves if isinstance(t, Tensor) and t.ndim == 2 and t.shape[0] == tokens]
    indices = [t for t in tensors if not t.is_floating_point()]
    if indices:  # top-k indices [N, k]
        return all(bool((t == expert).any(-1).all()) for t in indices)
    scores = [t for t in tensors if t.shape[1] == num_experts]
    if scores:  # logits or probabilities [N, E]
        return all(bool((t.argmax(-1) == expert).all()) for t in scores)
    return None


#: Routers checked (``None``: passed, else the refusal), kept while the module lives.
_ROUTERS: weakref.WeakKeyDictionary[nn.Module, SpecError | None] = weakref.WeakKeyDictionary()


def check_router(router: nn.Module, name: str, num_experts: int) -> None:
    """Verify that row ``e`` of the router's weight is expert ``e``'s routing row (once per module).

    With the weight's row ``e`` all ones and every other row zero, tokens of positive entries give
    expert ``e`` the largest logit; the router's top-k indices (or, for a plain linear router, its
    ``[N, E]`` scores' arg-max) must then name ``e`` for every token, for each ``e``.

    Raises:
        SpecError: naming the router, if it chooses another expert or its output shows no choice.
    """
    if router not in _ROUTERS:
        _ROUTERS[router] = _router_error(router, name, num_experts)
    error = _ROUTERS[router]
    if error is not None:
        raise error


def _router_error(router: nn.Module, name: str, num_experts: int) -> SpecError | None:
    weight = router.weight
    assert isinstance(weight, Tensor)
    tokens = 3
    x = torch.ones(tokens, weight.shape[1], dtype=torch.float64)
    others = {key: torch.zeros_like(p, dtype=torch.float64) for key, p in router.named_parameters() if key != "weight"}
    # floating buffers (e.g. a score-correction bias) zeroed too, so that only row e scores
    buffers = {
        key: (torch.zeros_like(b, dtype=torch.float64) if b.is_floating_point() else b)
        for key, b in router.named_buffers()
    }
    for e in range(num_experts):
        row = torch.zeros(weight.shape, dtype=torch.float64)
        row[e] = 1.0
        try:
            with torch.no_grad():
                output = torch.func.functional_call(router, ({"weight": row, **others}, buffers), (x,))
        except Exception as error:  # the router's own code failed on a plain [N, H] input
            return SpecError(
                f"{name} ({type(router).__name__}): the router check could not call it on [tokens, hidden] "
                f"states ({type(error).__name__}: {error}); give its parameters rules with overrides=, e.g. "
                f"{{'{name}.weight': fisherfunc.Channel(0)}} once you know row e scores expert e"
            )
        chose = _chosen(output, e, tokens, num_experts)
        if not chose:
            return SpecError(
                f"{name} ({type(router).__name__}): with only row {e} of its weight set, it does not choose "
                f"expert {e} for every token{' (its output shows no choice)' if chose is None else ''}, so its rows "
                f"are not the experts' routing rows; give its parameters rules with overrides=, e.g. "
                f"{{'{name}.weight': fisherfunc.Elementwise()}}"
            )
    return None


def placements(model: nn.Module) -> dict[str, Rule | SpecError]:
    """Rules for the fused experts and routers of ``model``, keyed by dotted parameter path.

    Experts get :class:`ExpertChannels` on their output-channel axis, routers ``Channel(0)`` (see
    the module's table), each after its live check; a check that fails maps the parameters to the
    ``SpecError`` that ``infer_spec`` raises unless an override covers them.
    """
    out: dict[str, Rule | SpecError] = {}
    for name, module in fused_experts(model):
        try:
            layout = expert_layout(module, name)
            for key, param in module.named_parameters(recurse=False):
                out[f"{name}.{key}"] = ExpertChannels(layout.channel_axis if param.ndim == 3 else 1)
        except SpecError as error:
            out.update({f"{name}.{key}": error for key, _ in module.named_parameters(recurse=False)})
        num_experts = int(dict(module.named_parameters(recurse=False))["down_proj"].shape[0])
        found = router_of(model, name, num_experts)
        if found is not None:  # the router's rows are checked on their own, whatever the experts' verdict
            router_name, router = found
            try:
                check_router(router, router_name, num_experts)
                rule: Rule | SpecError = Channel(0)
            except SpecError as error:
                rule = error
            for key, param in router.named_parameters(recurse=False):
                if param.shape[0] == num_experts:
                    out[f"{router_name}.{key}"] = rule
    return out
