"""The module a Hugging Face loss calls: the user's model seen through wrappers, runnable under ``vmap``.

Users bring models wrapped for training or inference. The loss reads the ``transformers`` model
inside (its config, its forward's arguments) and calls a module whose parameter names are the
wrapper's, so the parameters a user passes (``dict(wrapped.named_parameters())``) fit it as they are:

| wrapper                                 | model inside          | the loss calls                                 |
|-----------------------------------------|-----------------------|------------------------------------------------|
| ``nn.DataParallel``, ``DistributedDataParallel`` | ``.module``  | the model inside, named ``module.``            |
| ``torch.compile``'s ``OptimizedModule`` | ``._orig_mod``        | the original module, named ``_orig_mod.``      |
| PEFT ``PeftModel`` (LoRA, ...)          | ``.get_base_model()`` | the ``PeftModel`` (it applies the adapters)    |

Data-parallel scatter and gradient hooks belong to a training step, not to per-sample gradients, and
compiling inside ``vmap`` would recompile for every shape. Wrappers nest (``torch.compile(peft_model)``).
Neither the user's model nor any of its modules is modified.

One family has a module ``torch.func`` cannot differentiate through: BLOOM's ``BloomGelu`` calls an
``autograd.Function`` without ``setup_context`` (its hand-written backward is the exact derivative
of its forward). The loss calls a copy of the module tree in which each such module is replaced by
the same function with ordinary autograd; only the modules on the path to it are copied (shallowly:
the parameters and every other module are the user's own):

| module        | replaced by (its backward is the exact derivative of this)   |
|---------------|--------------------------------------------------------------|
| ``BloomGelu`` | ``x · ½ (1 + tanh(0.79788456 · x · (1 + 0.044715 x²)))``     |
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__ = ["LossView", "loss_view", "is_hf_model"]


def is_hf_model(module: Any) -> bool:
    """Whether ``module`` is a ``transformers`` model: a module with a config that names its attention."""
    return isinstance(module, nn.Module) and hasattr(getattr(module, "config", None), "_attn_implementation")


def _is_peft(module: nn.Module) -> bool:
    return type(module).__module__.startswith("peft") and callable(getattr(module, "get_base_model", None))


def _is_compiled(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def _delegated(module: nn.Module) -> str | None:
    """The attribute holding the model inside a wrapper whose own forward the loss skips, if any."""
    if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "module"
    if _is_compiled(module):
        return "_orig_mod"
    return None


class _Through(nn.Module):
    """Calls the module it holds under ``name``, so parameter names keep the wrapper's prefix."""

    def __init__(self, name: str, inner: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.add_module(name, inner)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_submodule(self.name)(*args, **kwargs)


class _TanhGelu(nn.Module):
    """BLOOM's GELU with ordinary autograd: ``x · ½ (1 + tanh(0.79788456 · x · (1 + 0.044715 x²)))``."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


#: ``class name (from transformers) -> a module computing the same function with ordinary autograd``.
SUBSTITUTES: dict[str, Callable[[nn.Module], nn.Module]] = {"BloomGelu": lambda module: _TanhGelu()}


def _substituted(module: nn.Module) -> nn.Module:
    """``module``, or a shallow copy whose descendants in :data:`SUBSTITUTES` are replaced."""
    replaced: dict[str, nn.Module] = {}
    for name, child in module.named_children():
        make = SUBSTITUTES.get(type(child).__name__) if type(child).__module__.startswith("transformers") else None
        new = make(child) if make is not None else _substituted(child)
        if new is not child:
            replaced[name] = new
    if not replaced:
        return module
    twin = copy.copy(module)  # shares parameters, buffers and the other children
    twin._modules = {**module._modules, **replaced}
    return twin


def _called(module: nn.Module) -> nn.Module:
    """What the loss calls for ``module``: through delegating wrappers, else ``module`` with substitutes."""
    attr = _delegated(module)
    if attr is not None:
        return _Through(attr, _called(getattr(module, attr)))
    return _substituted(module)  # a transformers model, or a PEFT model whose forward is the adapted model's


@dataclasses.dataclass(frozen=True)
class LossView:
    """A user's model as a Hugging Face loss sees it.

    Attributes:
        call: the module the loss calls (parameter names: the user's model's).
        inner: the ``transformers`` model inside every wrapper (config and forward signature).
        wrappers: the wrappers seen through, outermost first (class names).
    """

    call: nn.Module
    inner: nn.Module
    wrappers: tuple[str, ...]


def loss_view(model: nn.Module) -> LossView:
    """See ``model`` through its wrappers (see the module docstring).

    Args:
        model: a ``transformers`` model, possibly wrapped.

    Raises:
        ValueError: when no ``transformers`` model is found inside.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a torch.nn.Module (a Hugging Face transformers model), got {type(model).__name__}")
    wrappers: list[str] = []
    current = model
    while not is_hf_model(current):
        attr = _delegated(current)
        if attr is not None:
            inside = getattr(current, attr)
        elif _is_peft(current):
            peft_model: Any = current
            inside = cast(nn.Module, peft_model.get_base_model())
        else:
            seen = f" inside {' > '.join(wrappers)}" if wrappers else ""
            raise ValueError(
                f"{type(current).__name__}{seen} is not a Hugging Face transformers model (it has no config with an "
                "attention implementation); use the builders in fisherfunc.losses instead"
            )
        wrappers.append(type(current).__name__)
        current = inside
    return LossView(call=_called(model), inner=current, wrappers=tuple(wrappers))
