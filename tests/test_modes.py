"""One function mode for the per-sample call: a :class:`~fisherfunc._engine.modes.Chain` of parts.

A chain must act exactly as its parts entered as nested modes (the first part on top): every part
sees every call in order, a part's own torch code (run under :meth:`Part.onward`) reaches the parts
after it, and a part alone still works as a plain mode. End to end, the engine's results through
the chain are checked against naive loops in test_probes, test_recurrent and test_attention.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from fisherfunc._engine.modes import Chain, Part


class Seen(Part):
    """Records the calls it sees; on ``torch.tanh`` runs its own torch code (``sigmoid``) instead."""

    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        super().__init__()
        self.name, self.log = name, log

    def handle(self, func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        self.log.append((self.name, getattr(func, "__name__", str(func))))
        if func is torch.tanh and self.name == "first":
            with self.onward():
                return torch.sigmoid(args[0])
        return self.proceed(func, args, kwargs)


def run(entered: str) -> tuple[list[tuple[str, str]], torch.Tensor]:
    log: list[tuple[str, str]] = []
    first, second = Seen("first", log), Seen("second", log)
    x = torch.linspace(-1, 1, 5)
    if entered == "chain":
        context: Any = Chain([first, second])
    else:  # nested, the first part on top
        context = contextlib.ExitStack()
        context.enter_context(second)
        context.enter_context(first)
    with context:
        out = F.relu(torch.tanh(x) - 0.5)
    return log, out


def test_a_chain_acts_as_its_parts_nested() -> None:
    (chained, out_chained), (nested, out_nested) = run("chain"), run("nested")
    assert torch.equal(out_chained, out_nested)

    def of(log: list[tuple[str, str]], part: str) -> list[str]:
        return [name for who, name in log if who == part]

    # the second part sees the same calls in the same order, the first part's own call included
    assert of(chained, "second") == of(nested, "second")
    assert "sigmoid" in of(chained, "second") and "tanh" not in of(chained, "second")
    # in a chain the first part also sees its own call (run under the chain again) and passes it on
    assert of(chained, "first") == [n for n in of(nested, "first")[:1]] + ["sigmoid"] + of(nested, "first")[1:]


def test_a_part_alone_is_a_plain_mode() -> None:
    log: list[tuple[str, str]] = []
    with Seen("alone", log):
        out = torch.tanh(torch.ones(2)) * 2
    assert torch.allclose(out, torch.tanh(torch.ones(2)) * 2)
    assert [name for _, name in log][:3] == ["ones", "tanh", "mul"]


def test_an_empty_chain_changes_nothing() -> None:
    with Chain([]):
        assert torch.equal(torch.tanh(torch.zeros(3)), torch.zeros(3))


class Narrow(Seen):
    """A part that acts on ``torch.tanh`` and ``F.relu`` only (:attr:`Part.funcs`)."""

    funcs = frozenset({torch.tanh, F.relu})


def test_calls_no_part_acts_on_go_straight_to_torch() -> None:
    """A chain hands a part only the functions it names; with a part that names none, every call."""
    x = torch.linspace(-1, 1, 5)
    log: list[tuple[str, str]] = []
    with Chain([Narrow("first", log), Narrow("second", log)]):
        out = F.relu(torch.tanh(x) - 0.5)
    assert torch.equal(out, F.relu(torch.sigmoid(x) - 0.5))  # the first part still replaces tanh
    # the subtraction reached neither part; the first part's own sigmoid is not one the second acts on
    assert log == [("first", "tanh"), ("first", "relu"), ("second", "relu")]
    log.clear()
    with Chain([Narrow("first", log), Seen("second", log)]):  # the second part looks at every call
        F.relu(torch.tanh(x) - 0.5)
    assert ("second", "sigmoid") in log and any(name == "sub" or "sub" in name for _, name in log)
