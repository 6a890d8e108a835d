"""Merging estimates of disjoint data: exact for accumulators, token-weighted for states.

**Accumulators** (:func:`~fisherfunc.accumulate`) hold exact sums, so they merge by adding::

    S = S_a + S_b      N = N_a + N_b      B = B_a + B_b      skipped = skipped_a + skipped_b
    F̂ = S / N = (Σ_{b ∈ a ∪ b} s_b) / (Σ_{b ∈ a ∪ b} n_b)

``merge(a, b)`` *is* the accumulator of the union of the data (up to the rounding of one addition
per value): the same for any split, any order, any number of parts.

**States** (:class:`~fisherfunc.FisherState`) merge by token-weighted averaging of their EMAs::

    m = (N_a m_a + N_b m_b) / (N_a + N_b)        (N: the tokens each state has seen)

with the step count kept and tokens, samples and ``skipped`` added. This equals the state one
process would reach by stepping on the union of every step's batches whenever each step's tokens
split between the parts in the same proportion — always for one step (any decay), and for
lock-step data-parallel workers with equal-sized shards of fixed-length data. Otherwise it is
the token-weighted mean of the two estimates (a Fisher-merging average), not a union. The result
is stored like the first state. States
must share parameters, rules, decay, Fisher kind and step count; a fresh state (step 0) is the
identity. For an exact union of EMA states across processes, reduce each step's sums instead
(:mod:`fisherfunc.distributed`).

A ``{task: state}`` dict merges task by task; tasks present in one input only are kept as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from .._estimate import Accumulator
from .._naming import path_name
from .._spec.resolve import named_rules
from .._spec.rules import SpecError
from .codec import decode, encode, stored_device, stored_dtype, stored_shape
from .state import FisherState

__all__ = ["merge"]


def merge(first: Any, *others: Any) -> Any:
    """Merge accumulators, states or ``{task: state}`` dicts of disjoint data (see the module doc).

    Args:
        first: an :class:`~fisherfunc.Accumulator`, a :class:`~fisherfunc.FisherState` or a
            mapping ``task -> FisherState``.
        *others: more of the same type, made for the same parameters and rules.

    Returns:
        A new object of the same type; the inputs are not modified.

    Raises:
        TypeError: for mixed or unsupported types.
        SpecError: naming the first parameter whose structure, shape or rule differs, or the
            decay, kind or step count that differs.

    >>> import torch, fisherfunc as ff
    >>> model = torch.nn.Linear(4, 3)
    >>> loss, params = ff.losses.classification(model), dict(model.named_parameters())
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> both = ff.merge(ff.accumulate(loss, params, (x[:5], y[:5])), ff.accumulate(loss, params, (x[5:], y[5:])))
    >>> whole = ff.accumulate(loss, params, (x, y))
    >>> torch.allclose(both.sums["weight"], whole.sums["weight"]), both.samples
    (True, 8)
    """
    items = (first, *others)
    if all(isinstance(x, Accumulator) for x in items):
        return _merge_accumulators(items)
    if all(isinstance(x, FisherState) for x in items):
        return _merge_states(items)
    if all(isinstance(x, Mapping) and not isinstance(x, tuple) for x in items):
        return _merge_tasks(items)
    kinds = ", ".join(type(x).__name__ for x in items)
    raise TypeError(f"merge takes Accumulators, FisherStates or {{task: FisherState}} dicts, all alike; got {kinds}")


def _named(tree: Any) -> tuple[list[str], list[Any], optree.PyTreeSpec]:
    paths, leaves, treespec = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    return [path_name(p) for p in paths], leaves, treespec


def _check_alike(what: str, index: int, reference: Any, tree: Any) -> None:
    """Refuse a group tree whose parameters or shapes differ from ``reference``, naming the first."""
    ref_names, ref_leaves, ref_spec = _named(reference)
    names, leaves, treespec = _named(tree)
    for name in [*ref_names, *names]:
        if (name in ref_names) != (name in names):
            side = f"{what} {index}" if name in names else f"{what} 0"
            raise SpecError(f"cannot merge: parameter '{name}' is only in {side}")
    if treespec != ref_spec:
        raise SpecError(f"cannot merge: {what} {index} has the tree structure {treespec}, {what} 0 has {ref_spec}")
    for name, ref, leaf in zip(ref_names, ref_leaves, leaves):
        ref_shape = None if ref is None else tuple(stored_shape(ref))
        shape = None if leaf is None else tuple(stored_shape(leaf))
        if ref_shape != shape:
            raise SpecError(
                f"cannot merge: parameter '{name}' has groups {shape} in {what} {index}, {ref_shape} in {what} 0"
            )


def _merge_accumulators(items: Sequence[Accumulator]) -> Accumulator:
    first = items[0]
    for i, acc in enumerate(items[1:], start=1):
        if acc.kind != first.kind:
            raise ValueError(
                f"cannot merge: accumulator {i} holds kind={acc.kind!r}, accumulator 0 kind={first.kind!r}"
            )
        _check_alike("accumulator", i, first.sums, acc.sums)

    def add(*sums: Tensor) -> Tensor:
        total = sums[0]
        for s in sums[1:]:
            total = total + s.to(total.device)
        return total

    return Accumulator(
        sums=optree.tree_map(add, *(acc.sums for acc in items)),
        tokens=sum(float(acc.tokens) for acc in items),
        samples=sum(int(acc.samples) for acc in items),
        skipped=sum(int(acc.skipped) for acc in items),
        kind=first.kind,
    )


def _merge_states(items: Sequence[FisherState]) -> FisherState:
    first = items[0]
    first_rules = named_rules(first.spec)
    for i, state in enumerate(items[1:], start=1):
        for field in ("decay", "kind"):
            if getattr(state, field) != getattr(first, field):
                raise SpecError(
                    f"cannot merge: state {i} has {field} {getattr(state, field)!r}, state 0 {getattr(first, field)!r}"
                )
        _check_alike("state", i, first.ema, state.ema)
        for name, rule in named_rules(state.spec).items():
            if first_rules.get(name) != rule:
                raise SpecError(
                    f"cannot merge: parameter '{name}' has {rule!r} in state {i}, {first_rules[name]!r} in state 0"
                )
    stepped = [s for s in items if s.step > 0]  # a fresh state is the identity
    steps = sorted({s.step for s in stepped})
    if len(steps) > 1:
        raise SpecError(
            f"cannot merge states that took different numbers of steps ({', '.join(map(str, steps))}): their "
            "EMAs weight batches differently. Merge ff.accumulate(...) sums, which merge exactly, or average "
            "ff.estimate(...) of each yourself"
        )
    tokens = sum(float(s.tokens) for s in items)
    samples = sum(int(s.samples) for s in items)
    skipped = sum(int(s.skipped) for s in items)
    if not stepped:
        return first._replace(tokens=tokens, samples=samples, skipped=skipped)
    total = sum(float(s.tokens) for s in stepped)

    def mean(target: Any, *stored: Any) -> Any:
        # m = Σ_i N_i m_i / Σ_i N_i in float32 (float64 for float64 storage), stored like the first state.
        work = torch.float64 if stored_dtype(target) == torch.float64 else torch.float32
        device = stored_device(target)
        terms = [float(s.tokens) / total * decode(x, device=device, dtype=work) for s, x in zip(stepped, stored)]
        return encode(torch.stack(terms).sum(0), dtype=stored_dtype(target), device=device)

    ema = optree.tree_map(mean, first.ema, *(s.ema for s in stepped))
    return first._replace(ema=ema, step=steps[0], tokens=tokens, samples=samples, skipped=skipped)


def _merge_tasks(items: Sequence[Mapping[str, FisherState]]) -> dict[str, FisherState]:
    tasks: dict[str, list[FisherState]] = {}
    for mapping in items:
        for task, state in mapping.items():
            if not isinstance(state, FisherState):
                raise TypeError(f"task {task!r}: expected a FisherState, got {type(state).__name__}")
            tasks.setdefault(task, []).append(state)
    return {task: states[0] if len(states) == 1 else _merge_states(states) for task, states in tasks.items()}
