"""Which models the engine can run per sample, checked before any heavy work.

The engine calls the model inside ``torch.func.vmap(torch.func.grad(...))``. Two things cannot
run there, and both are refused with an error that names the modules at fault:

- a BatchNorm layer in training mode: its batch statistics mix the samples of a batch, so
  per-sample gradients are not defined, and it updates running statistics in place;
- a module (or global) **backward** hook — ``register_full_backward_hook``,
  ``register_full_backward_pre_hook``, the legacy ``register_backward_hook``, or another library's
  instrumentation such as BackPACK's ``extend(model)``: torch implements them with an
  ``autograd.Function`` that torch.func transforms cannot run.

Forward hooks and forward pre-hooks are part of the model's function and run as written, on one
sample at a time (a hook that stores tensors stores the per-sample ones of the transform).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as torch_module

__all__ = ["check_model"]

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_BACKWARD_HOOKS = ("_backward_hooks", "_backward_pre_hooks")
_GLOBAL_BACKWARD_HOOKS = ("_global_backward_hooks", "_global_backward_pre_hooks")


def check_model(model: nn.Module) -> None:
    """Refuse models that cannot give per-sample gradients under ``torch.func``.

    Raises:
        ValueError: for a BatchNorm layer in training mode, or modules with backward hooks
            (naming them).

    >>> import torch
    >>> net = torch.nn.Linear(2, 2)
    >>> _ = net.register_full_backward_hook(lambda *args: None)
    >>> check_model(net)
    Traceback (most recent call last):
    ...
    ValueError: module(s) '<root>' of Linear carry backward hooks ...
    """
    hooked: list[str] = []
    for name, module in model.named_modules():  # one walk: BatchNorm modes and backward hooks
        if any(getattr(module, attr, None) for attr in _BACKWARD_HOOKS):
            hooked.append(name or "<root>")
        if isinstance(module, _BATCHNORM) and module.training:
            raise ValueError(
                f"BatchNorm layer '{name or '<root>'}' is in training mode: its output mixes the samples "
                "of a batch (batch statistics), so per-sample gradients are not defined, and it updates "
                "running statistics in place, which torch.func cannot vectorise. Call model.eval() to use "
                "the running statistics (or replace it with GroupNorm/LayerNorm)"
            )
    if hooked:
        listing = ", ".join(repr(n) for n in hooked[:8]) + (f" and {len(hooked) - 8} more" if len(hooked) > 8 else "")
        raise ValueError(
            f"module(s) {listing} of {type(model).__name__} carry backward hooks (register_full_backward_hook, "
            "or another library's instrumentation such as BackPACK's extend(model)): torch runs them through an "
            "autograd.Function that torch.func's vmap and grad cannot run. fisherfunc needs no hooks: use a copy "
            "of the model without them (e.g. a model that was never extended), or remove the hooks' handles"
        )
    if any(getattr(torch_module, attr, None) for attr in _GLOBAL_BACKWARD_HOOKS):
        raise ValueError(
            "a global module backward hook is registered (torch.nn.modules.module.register_module_full_backward_hook): "
            "torch.func's vmap and grad cannot run it; remove it while computing Fisher information"
        )
