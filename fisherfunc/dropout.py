"""Dropout semantics of a Fisher computation, chosen without touching the model.

The Fisher of a network with dropout is, by default, the Fisher of the deterministic network that
evaluation uses: ``f(x; θ)`` with every dropout an identity (inverted dropout scales at training
time, so evaluation needs no rescaling). That holds **whatever mode the model is in**, and the
model is never mutated: no ``.eval()``/``.train()`` toggling, no hooks. Instead a scoped
``torch.overrides.TorchFunctionMode``, entered inside the per-sample function, rewrites the calls
that drop values:

| call                                                                  | under ``dropout="eval"`` |
|-----------------------------------------------------------------------|--------------------------|
| ``F.dropout``, ``F.dropout1d/2d/3d``, ``F.alpha_dropout``,            | returns its input        |
| ``F.feature_alpha_dropout`` and their ``torch.`` twins                |                          |
| ``F.scaled_dot_product_attention``                                    | ``dropout_p = 0``        |
| ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``)        | ``dropout_p = 0``        |

The last row is needed because a mode does not see the calls nested inside a function it was
handed. Everything else passes through unchanged, so an eval-mode model computes exactly what it
computes without the mode.

Inside the engine's per-sample function the same rewriting is the first part of its one function
mode (:class:`~fisherfunc._engine.modes.Chain`) rather than a mode of its own: every torch call a
model makes then crosses one Python mode, not two (0.2–0.3 ms of a 15 ms
``nn.TransformerEncoderLayer`` step on a CPU). :func:`scope` knows it (:func:`chained`) and enters
nothing.

``dropout="train"`` keeps the model's own training-mode randomness: the engine then vectorises with
``vmap(randomness="different")``, so every sample draws its own dropout masks (from torch's global
generator: seed it with ``torch.manual_seed`` for a reproducible result). That is the Fisher of
the stochastic network; it needs the model (or some of its modules) in training mode.

>>> import torch, fisherfunc as ff
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5)).train()
>>> x = torch.ones(2, 3)
>>> with ff.dropout.evaluation():
...     same = torch.equal(net(x), net[0](x))
>>> same, net.training                  # dropout was an identity; the model's mode is untouched
(True, True)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._engine.modes import Part

__all__ = ["DropoutMode", "EvalDropout", "evaluation", "scope", "check_dropout", "vmap_randomness"]

#: ``"eval"``: dropout is an identity (the deterministic network); ``"train"``: the model's own
#: training-mode dropout, with independent masks per sample.
DropoutMode = Literal["eval", "train"]
_MODES = ("eval", "train")

# Functions that drop (or alpha-drop) values of their first argument; identity at evaluation.
_IDENTITY: tuple[Callable[..., Any], ...] = tuple(
    f
    for f in (
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.alpha_dropout,
        F.feature_alpha_dropout,
        getattr(torch, "dropout", None),
        getattr(torch, "dropout_", None),
        getattr(torch, "feature_dropout", None),
        getattr(torch, "feature_dropout_", None),
        getattr(torch, "alpha_dropout", None),
        getattr(torch, "alpha_dropout_", None),
        getattr(torch, "feature_alpha_dropout", None),
        getattr(torch, "feature_alpha_dropout_", None),
    )
    if f is not None
)
# Functions with a ``dropout_p`` argument: (function, its position).
_DROPOUT_P: tuple[tuple[Callable[..., Any], int], ...] = (
    (F.scaled_dot_product_attention, 4),
    (F.multi_head_attention_forward, 10),
)


class EvalDropout(Part):
    """A torch function mode under which every dropout is an identity (evaluation semantics).

    Enter it *inside* the function that calls the model (e.g. inside ``vmap(grad(...))``): it
    changes no module, no global state once exited, and only the calls listed in the module
    docstring. It is also a :class:`~fisherfunc._engine.modes.Part`: the engine runs it as the first
    part of its per-sample function mode.
    """

    funcs = frozenset({*_IDENTITY, *(f for f, _ in _DROPOUT_P)})

    def handle(self, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:  # noqa: D102
        if func in _IDENTITY:
            return args[0] if args else kwargs["input"]
        for target, position in _DROPOUT_P:
            if func is target:
                if len(args) > position:
                    args = (*args[:position], 0.0, *args[position + 1 :])
                else:
                    kwargs = {**kwargs, "dropout_p": 0.0}
                break
        return self.proceed(func, args, kwargs)


#: Whether an :class:`EvalDropout` part of the engine's function mode covers the current call.
_CHAINED: contextvars.ContextVar[bool] = contextvars.ContextVar("fisherfunc_eval_dropout_chained", default=False)


@contextlib.contextmanager
def chained() -> Iterator[None]:
    """Within the block an enclosing mode's :class:`EvalDropout` part covers every call; :func:`scope` adds none.

    The engine enters it together with the chain that holds the part; nothing else should.
    """
    token = _CHAINED.set(True)
    try:
        yield
    finally:
        _CHAINED.reset(token)


def evaluation() -> EvalDropout:
    """A context in which dropout is an identity, whatever mode the modules are in."""
    return EvalDropout()


def scope(mode: DropoutMode) -> contextlib.AbstractContextManager[Any]:
    """The context a per-sample function runs its model in: :func:`evaluation` or nothing.

    Nothing, too, for ``"eval"`` inside :func:`chained`: the engine's own mode rewrites the calls.
    """
    return evaluation() if mode == "eval" and not _CHAINED.get() else contextlib.nullcontext()


def check_dropout(mode: object, model: nn.Module | None = None) -> None:
    """Validate a dropout option (and, for ``"train"``, that ``model`` can be random at all).

    Raises:
        ValueError: for a value other than ``"eval"``/``"train"``, or for ``"train"`` with a model
            none of whose modules is in training mode (its dropout would be off).
    """
    if mode not in _MODES:
        raise ValueError(f"dropout must be 'eval' or 'train', got {mode!r}")
    if mode == "train" and model is not None and not any(m.training for m in model.modules()):
        raise ValueError(
            f"dropout='train' keeps the model's training-mode dropout, but {type(model).__name__} and all its "
            "modules are in eval mode, so nothing would be dropped: call model.train() first, or use the default "
            "dropout='eval'"
        )


def vmap_randomness(loss: object) -> str:
    """``vmap``'s ``randomness`` for a loss: its ``randomness`` attribute, else ``"error"``.

    A :class:`~fisherfunc.losses.ModelLoss` says ``"different"`` (own masks per sample) under
    ``dropout="train"`` and ``"error"`` otherwise: a random operation inside the vectorised
    computation then fails loudly instead of silently sharing one mask across samples.
    """
    return str(getattr(loss, "randomness", "error"))
