"""Mixture-of-experts models per sample: fused experts run in their dense, verified form.

``torch.func.vmap`` cannot run the experts forwards of ``transformers`` 5: ``eager`` finds the
experts hit with ``nonzero`` and loops over them with an ``if``; ``grouped_mm`` sorts tokens into
groups of varying size (and, on the CPU, takes no float64). Within :func:`dense_experts`, every
fused-experts module of a model runs :func:`~fisherfunc._spec.expert_layout.dense_forward` instead —
the same function of the same parameters, checked against the module's own forward on random
float64 inputs (≤ 1e-12) before it is trusted — so per-sample gradients are exact, with the
router's top-k chosen per token as the model chooses it::

    with dense_experts(model):
        F = fisher(loss, params, batch)

The swap is scoped like ``torch.func.functional_call``'s own reparametrisation: an instance
``forward`` set on each experts module when the block starts and removed when it ends (also on
error); blocks nest. No hook, no change of ``config``; outside the block the model is as it was.
While a block runs, another thread calling the same model gets the dense form too — the same
values (that is what the self-test checks), at its cost (``docs/experts.md``). Entered inside a
per-sample function instead, the block covers that one call.

Refused on entry, before any work, naming the module: experts whose layout fails the self-test
and experts run in parallel across devices (:func:`verified_experts`). :func:`check_jitter` refuses
a router's training-mode jitter noise under evaluation semantics (``dropout="eval"``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

from torch import Tensor, nn

from .._spec.expert_layout import ExpertLayout, dense_forward, expert_layout, forward_as
from .._spec.experts import fused_experts

__all__ = ["dense_experts", "verified_experts", "check_jitter"]

#: ``(name, module)`` of every fused-experts module, per model, kept while the model lives.
_MODELS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[str, nn.Module], ...]] = weakref.WeakKeyDictionary()
#: Attributes by which mixture-of-experts layers scale their inputs by random noise in training mode.
_JITTER = ("jitter_noise", "input_jitter_noise")


def verified_experts(model: nn.Module) -> tuple[tuple[nn.Module, ExpertLayout], ...]:
    """The fused-experts modules of ``model`` with their verified layouts (empty for a dense model).

    The modules are kept per model, and found again when a kept one is no longer where it was found
    (an experts module replaced since: patching the old one would leave the new one in its fused
    form); each one's layout is kept per module (:func:`~fisherfunc._spec.expert_layout.expert_layout`).

    Raises:
        SpecError: naming the first module whose layout fails its self-test.
    """
    kept = _MODELS.get(model)
    if kept is None or any(_at(model, name) is not module for name, module in kept):
        kept = _MODELS[model] = tuple(fused_experts(model))
    return tuple((module, expert_layout(module, name)) for name, module in kept)


def _at(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule of ``model`` at ``name``, or ``None`` if there is none now."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


@contextlib.contextmanager
def dense_experts(model: nn.Module) -> Iterator[None]:
    """Within the block, every fused-experts module of ``model`` runs the dense form; restored on exit.

    Args:
        model: any module; one without fused experts is left alone.

    Raises:
        SpecError: on entry, naming an experts module whose layout fails its self-test.

    >>> import torch
    >>> net = torch.nn.Linear(2, 2)          # no experts: nothing changes
    >>> with dense_experts(net):
    ...     y = net(torch.ones(1, 2))
    """
    with contextlib.ExitStack() as stack:
        for module, layout in verified_experts(model):
            stack.enter_context(forward_as(module, _dense(layout)))
        yield


def _dense(layout: ExpertLayout) -> Callable[..., Tensor]:
    def forward(module: nn.Module, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return dense_forward(module, layout, hidden, top_k_index, top_k_weights)

    return forward


def check_jitter(model: nn.Module, dropout: str) -> None:
    """Refuse router jitter (Mixtral's ``jitter_noise``, PhiMoE's ``input_jitter_noise``) under eval semantics.

    Such a layer multiplies its inputs by random noise in training mode: not an identity that
    ``dropout="eval"`` could remove without changing the module.

    Raises:
        ValueError: naming the layer, the noise, and the ways out.
    """
    if dropout != "eval":
        return
    for name, module in model.named_modules():
        for attr in _JITTER:
            noise = getattr(module, attr, 0)
            if module.training and isinstance(noise, float) and noise > 0:
                raise ValueError(
                    f"{name} ({type(module).__name__}) multiplies its inputs by random noise ({attr}={noise}) in "
                    "training mode, which dropout='eval' cannot turn off without changing the module: call "
                    "model.eval(), build the model with that noise at 0, or pass dropout='train' for the Fisher "
                    "of the noisy model"
                )
