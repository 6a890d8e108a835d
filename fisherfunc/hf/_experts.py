"""Mixture-of-experts models per sample: their experts run the dense, verified form inside the loss.

``torch.func.vmap`` cannot run the experts forwards of ``transformers`` 5 (``eager`` loops over the
experts hit with ``nonzero`` and ``if``; ``grouped_mm`` sorts tokens into groups of varying size and,
on the CPU, takes no float64). Inside the per-sample function of a :func:`routed` loss, every
fused-experts module of the model runs :func:`~fisherfunc._spec.expert_layout.dense_forward`
instead — the same function of the same parameters, checked against the module's own forward on
random float64 inputs (≤ 1e-12) before it is trusted — so per-sample gradients are exact, with the
router's top-k chosen per token as the model chooses it.

The swap is scoped like ``torch.func.functional_call``'s own reparametrisation: an instance
``forward`` set on each experts module for the duration of one per-sample call and removed after
it (also on error). No hook, no change of ``config``; outside the call the model is as it was.
While a call runs, another thread calling the same model gets the dense form too — the same
values (that is what the self-test checks), at its cost (see ``docs/experts.md``).

Refused before any work, naming the module: experts whose layout fails the self-test, experts run
in parallel across devices, and a router with training-mode jitter noise under ``dropout="eval"``
(random, and not an identity that evaluation semantics could remove without editing the module).
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn

from .._spec.expert_layout import ExpertLayout, dense_forward, expert_layout, forward_as
from .._spec.experts import fused_experts
from ..losses import ModelLoss

__all__ = ["RoutedLoss", "routed", "dense_experts", "verified_experts"]

#: Verified ``(module, layout)`` of every fused-experts module, per model, kept while the model lives.
_MODELS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[nn.Module, ExpertLayout], ...]] = weakref.WeakKeyDictionary()


def verified_experts(model: nn.Module) -> tuple[tuple[nn.Module, ExpertLayout], ...]:
    """The fused-experts modules of ``model`` with their verified layouts (empty for a dense model).

    Raises:
        SpecError: naming the first module whose layout fails its self-test.
    """
    if model not in _MODELS:
        _MODELS[model] = tuple((module, expert_layout(module, name)) for name, module in fused_experts(model))
    return _MODELS[model]


@contextlib.contextmanager
def dense_experts(model: nn.Module) -> Iterator[None]:
    """Within the block, every fused-experts module of ``model`` runs the dense form; restored on exit.

    >>> import torch, fisherfunc as ff
    >>> net = torch.nn.Linear(2, 2)          # no experts: nothing changes
    >>> with dense_experts(net):
    ...     pass
    """
    with contextlib.ExitStack() as stack:
        for module, layout in verified_experts(model):
            stack.enter_context(forward_as(module, _dense(layout)))
        yield


def _dense(layout: ExpertLayout) -> Any:
    def forward(module: nn.Module, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return dense_forward(module, layout, hidden, top_k_index, top_k_weights)

    return forward


#: Attributes by which mixture-of-experts layers scale their inputs by random noise in training mode.
_JITTER = ("jitter_noise", "input_jitter_noise")


def _check_jitter(model: nn.Module, dropout: str) -> None:
    """Refuse router jitter (Mixtral's ``jitter_noise``, PhiMoE's ``input_jitter_noise``) under eval semantics."""
    for name, module in model.named_modules():
        for attr in _JITTER:
            noise = getattr(module, attr, 0)
            if dropout == "eval" and module.training and isinstance(noise, float) and noise > 0:
                raise ValueError(
                    f"{name} ({type(module).__name__}) multiplies its inputs by random noise ({attr}={noise}) in "
                    "training mode, which dropout='eval' cannot turn off without changing the module: call "
                    "model.eval(), build the model with that noise at 0, or pass dropout='train' for the Fisher "
                    "of the noisy model"
                )


@dataclasses.dataclass(frozen=True, eq=False)
class RoutedLoss(ModelLoss):
    """A :class:`~fisherfunc.losses.ModelLoss` whose model runs its experts in the dense, verified form."""

    def forward(self, params: Mapping[str, Tensor], sample: Any) -> Tensor:
        """The model's prediction for one sample, its experts dense (see the module docstring)."""
        with dense_experts(self.model):
            return super().forward(params, sample)


def routed(loss: ModelLoss) -> ModelLoss:
    """``loss`` with its model's fused experts run per sample in the dense, verified form.

    A loss whose model has no fused experts (or that is already routed) is returned as is. The
    experts' self-tests run here, once per module, so a refusal comes before any Fisher work.

    Args:
        loss: a :class:`~fisherfunc.losses.ModelLoss` (e.g. from ``fisherfunc.hf.causal_lm``).

    Returns:
        A :class:`RoutedLoss` with the same fields, or ``loss``.

    Raises:
        SpecError: an experts module's layout fails its self-test (named).
        ValueError: a router adds jitter noise in training mode under ``dropout="eval"`` (named).
    """
    if isinstance(loss, RoutedLoss) or not verified_experts(loss.model):
        return loss
    _check_jitter(loss.model, loss.dropout)
    fields = {f.name: getattr(loss, f.name) for f in dataclasses.fields(loss) if f.init}
    return RoutedLoss(**fields)
