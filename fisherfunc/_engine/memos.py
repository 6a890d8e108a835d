"""Where one-shot calls keep what they learn about a loss: on the loss, or on its model for a built loss.

One-shot calls (``ff.fisher``, ``ff.accumulate``, ``ff.per_sample_fisher``, ``kfac.kfac``, ...) keep
the resolved spec, the probe sites and K-FAC's layers they find, so a repeated call pays neither
spec inference nor a discovery forward again. What they are kept under:

- a loss built by :mod:`fisherfunc.losses` or :mod:`fisherfunc.hf` (a dataclass with a ``model``
  module) is described by its options — every field but the model, a function by its code (its
  captured options are fields too). Building the loss anew for every call
  (``ff.fisher(ff.losses.classification(model), params, batch)`` in a loop) gives an equal
  description, so those calls share one memo, kept on the model for as long as the model lives;
- any other callable keeps its own memo, for as long as it lives.

Sharing is safe because nothing kept is trusted blindly: a kept spec is compared with the model's
modules and params on every call (:mod:`~fisherfunc._spec.memo`), and a kept probe site or K-FAC
layer is checked on every forward — :class:`~fisherfunc._engine.probes.ProbeMode` refuses any use
of a probed weight but the call discovery saw, and the call then discovers again. A description
is only what keeps two differently built losses from evicting each other's sites.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

from torch import Tensor, nn

__all__ = ["one_shot", "describe"]

M = TypeVar("M")


#: Descriptions already made, by loss object (a loss reused across calls is described once).
_DESCRIBED: weakref.WeakKeyDictionary[Any, Hashable | None] = weakref.WeakKeyDictionary()


def describe(loss: Any) -> Hashable | None:
    """A built loss's options as a hashable value (``None``: not a built loss; it keeps its own memo).

    A built loss is a dataclass instance whose ``model`` field is an ``nn.Module``. Each other field
    is described by value: a function by its code object, a module or tensor by identity, a
    mapping or sequence by its items; never by a reference to the model, so a memo kept on the
    model does not keep the model alive.
    """
    try:
        return _DESCRIBED[loss]
    except (KeyError, TypeError):  # not described yet, or not weakly referenceable
        pass
    described = _describe(loss)
    try:
        _DESCRIBED[loss] = described
    except TypeError:
        pass
    return described


def _describe(loss: Any) -> Hashable | None:
    if not dataclasses.is_dataclass(loss) or isinstance(loss, type):
        return None
    if not isinstance(getattr(loss, "model", None), nn.Module):
        return None
    fields = (f.name for f in dataclasses.fields(loss) if f.name != "model")
    return type(loss), tuple((name, _value(getattr(loss, name))) for name in fields)


def _value(value: Any) -> Hashable:
    """``value`` as a hashable description (see :func:`describe`)."""
    if isinstance(value, (nn.Module, Tensor)):
        return ("object", id(value))
    code = getattr(value, "__code__", None)
    if code is not None:  # a function, a closure, a bound method: its code
        return ("code", code)
    if isinstance(value, Mapping):
        return ("mapping", tuple((_value(k), _value(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_value(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return ("object", id(value))
    return value


def one_shot(memos: weakref.WeakKeyDictionary[Any, dict[Hashable, M]], loss: Any, make: Callable[[], M]) -> M | None:
    """The memo of ``loss`` in ``memos``, made by ``make()`` on first use.

    Kept on ``loss.model`` under :func:`describe` ``(loss)`` for a built loss, else on ``loss``.
    ``None`` for a loss that cannot be weakly referenced or hashed: each call then starts afresh.
    """
    description = describe(loss)
    owner = loss.model if description is not None else loss
    try:
        kept = memos.setdefault(owner, {})
    except TypeError:
        return None
    if description not in kept:
        kept[description] = make()
    return kept[description]
