"""The per-sample call's function modes, entered as one: a :class:`Chain` of :class:`Part` s.

Four things act on the torch calls a model makes inside the per-sample function: dropout becomes
an identity under ``dropout="eval"`` (:class:`~fisherfunc.dropout.EvalDropout`), its recurrent
kernels run as linear recurrences (:class:`~fisherfunc._engine.recurrent.Recurrent`), the probed
weights' calls get their probes (:class:`~fisherfunc._engine.probes.ProbeMode`), and small CPU
attention calls take the math kernel (:class:`~fisherfunc._engine.attention.BatchedAttention`).
Each is a ``TorchFunctionMode`` that works alone. Entered as separate modes, torch hands every call
to each of them in turn, through its Python dispatch — about 2.6 µs per mode and call, 15 ms per
step of a 32-layer GPT-2, whose forward makes about 1900 torch calls. :class:`Chain` enters them
as one mode: a part passes a call on to the next part (:meth:`Part.proceed`) instead of back to
torch, and the torch code a part runs itself — the recurrences' steps, ``nn.MultiheadAttention``'s
body — runs under the whole chain again (:attr:`Part.outer`), so the parts after it see those
calls as the modes below it would. A part names the functions it acts on (:attr:`Part.funcs`);
every other call — most of a model's, ``view``, ``add``, ``softmax`` — goes straight to torch
without visiting the parts; a part that must see every call to stay correct (the probes', which
refuse any use of a probed weight but its probed calls) also :meth:`~Part.observe` s those calls
after they ran, which costs one check of the call's arguments instead of a walk through the chain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from torch.overrides import TorchFunctionMode

__all__ = ["Part", "Chain"]


class Part(TorchFunctionMode):
    """A function mode that is used alone or as one part of a :class:`Chain`.

    Subclasses implement :meth:`handle`, calling :meth:`proceed` where a plain mode would call the
    function, and running torch code of their own under :attr:`outer`.

    Attributes:
        funcs: the functions :meth:`handle` acts on; it passes every other call on unchanged.
            ``None``: it looks at every call.
        next: the part after this one in its chain (``None``: the call goes to torch).
        outer: the mode the part's own torch code runs under: itself alone, its chain in a chain.
    """

    funcs: ClassVar[frozenset[Callable[..., Any]] | None] = None

    #: whether the part must also :meth:`observe` the calls it does not act on (see :class:`Chain`)
    observes: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.next: Part | None = None
        self.outer: TorchFunctionMode = self

    def acts_on(self) -> frozenset[Callable[..., Any]] | None:
        """:attr:`funcs` of this part (an instance may look at every call where its class does not)."""
        return self.funcs

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        return self.handle(func, args, kwargs or {})

    def handle(self, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        """What the mode does with ``func(*args, **kwargs)`` (default: nothing)."""
        return self.proceed(func, args, kwargs)

    def observe(self, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any], out: Any) -> None:
        """Look at a call the part does not act on, after it ran (only where :attr:`observes`; may raise)."""

    def proceed(self, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        """The call, handed to the next part (alone, or last: to torch and any mode below)."""
        if self.next is None:
            return func(*args, **kwargs)
        return self.next.handle(func, args, kwargs)

    def onward(self) -> contextlib.AbstractContextManager[Any]:
        """The context for torch code the part runs itself, whose calls the parts after it must see.

        In a chain, the chain again — the part itself then sees those calls too, and passes on
        what it does not handle; alone, nothing (the modes below it see those calls already).
        """
        return self.outer if self.outer is not self else contextlib.nullcontext()


class Chain(TorchFunctionMode):
    """``parts`` (in dispatch order, first sees a call first) as one function mode."""

    def __init__(self, parts: Sequence[Part]) -> None:
        super().__init__()
        self.parts = tuple(parts)
        for part, following in zip(self.parts, (*self.parts[1:], None)):
            part.next, part.outer = following, self
        funcs = [part.acts_on() for part in self.parts]
        #: the functions some part acts on; ``None``: some part looks at every call
        self.relevant: frozenset[Callable[..., Any]] | None = (
            None if any(f is None for f in funcs) else frozenset().union(*funcs)  # type: ignore[arg-type]
        )
        #: the parts that observe the calls no part acts on
        self.observers = tuple(part for part in self.parts if part.observes)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        if not self.parts or (self.relevant is not None and func not in self.relevant):
            out = func(*args, **(kwargs or {}))
            for part in self.observers:
                part.observe(func, args, kwargs or {}, out)
            return out
        return self.parts[0].handle(func, args, kwargs or {})
