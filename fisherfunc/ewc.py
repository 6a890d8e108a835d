"""Elastic weight consolidation: a quadratic pull towards earlier tasks' parameters, weighted by their Fisher.

Kirkpatrick et al. (2017) learn task B without forgetting task A by adding to B's loss::

    Ω(θ) = ½ λ Σ_i F_i (θ_i − θ*_i)²

with ``θ*`` the parameters after task A (the *anchor*), ``F`` task A's diagonal Fisher at ``θ*``
and ``λ`` the strength. Its gradient is ``∂Ω/∂θ_i = λ F_i (θ_i − θ*_i)``.

**Per task** (:func:`per_task`): one anchor and one Fisher per past task, ``Ω = Σ_t Ω_t``. A sum of
quadratics is one quadratic, so the terms are folded once, when the penalty is built::

    Σ_t F_t,i (θ_i − θ*_t,i)² = W_i (θ_i − c_i)² + K_i
    W = Σ_t F_t     c = Σ_t F_t θ*_t / W     K_i = Σ_t F_t,i (θ*_t,i − c_i)²   (a constant)

and a step costs the same for ten tasks as for one (``c`` is computed as ``θ*_1 + Σ_t F_t (θ*_t −
θ*_1) / W``, so one task's centre, or several equal anchors, is the anchor itself, bit for bit).

**Online** (Schwarz et al. 2018, "Progress & Compress"; Chaudhry et al. 2018, EWC++): one running,
``γ``-decayed Fisher and the latest anchor. That is a :class:`~fisherfunc.FisherState`: pass one as
the Fisher, stepped once per batch by ``ff.make_fisher_step(..., decay=γ)`` or once per task by
:func:`fold`. The penalty uses its **bias-corrected** estimate ``ff.estimate(state) = m_t / (1 −
γ^t) = Σ_s γ^{t−s} F_s / Σ_s γ^{t−s}``, a weighted *average* with the scale of one task's Fisher —
so ``λ`` means the same after one task or ten, after one batch or a thousand, and after one task an
online penalty equals :func:`penalty` of that task's Fisher exactly. Progress & Compress sums instead,
``F*_t = Σ_s γ^{t−s} F_s``; its penalty with strength ``λ_PC`` is ours with ``λ = λ_PC (1 − γ^t) /
(1 − γ)`` (tested). The raw EMA ``m_t`` would make ``λ`` depend on how many steps a state has taken
(``1 − γ^t`` of the Fisher after ``t`` steps).

**Group Fisher** (channels, heads, token rows…) is spread onto the parameters' entries once, when
the penalty is built (:func:`fisherfunc._spec.groups.broadcast`): by default each entry of a group
``g`` of ``n_g`` entries gets the group's *density* ``F_g / n_g`` — the per-entry diagonal that the
group Fisher implies when its entries share it equally, exact in expectation over displacements of
equal variance (``density=False`` gives each entry ``F_g``: a group weighs its displacement norm
``‖θ_g − θ*_g‖²`` by its total Fisher, ``n_g`` times more).

A :class:`Penalty` holds per-entry weights and centres, so in the training loop it is one
subtraction and one weighted sum of squares per tensor: no broadcast, no group lookup, no in-place
operation, no ``.item()``. It works on functional params inside ``torch.func.grad`` and ``vmap``, and
on ``requires_grad`` params in an ordinary optimizer loop::

    penalty = ewc.penalty(anchor, fisher, strength=100.0)          # once, after task A
    loss = task_b_loss(params) + penalty(params)                   # every step of task B
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from ._naming import few, path_name
from ._spec.groups import broadcast
from ._spec.resolve import named_rules, resolve_spec
from ._spec.rules import SpecError
from ._state.codec import stored_shape
from ._state.state import FisherState, ema_update, estimate

__all__ = ["Penalty", "penalty", "per_task", "fold"]


def _treespec_names(tree: Any) -> tuple[optree.PyTreeSpec, tuple[str, ...], list[Any]]:
    paths, leaves, treespec = optree.tree_flatten_with_path(tree)
    return treespec, tuple(path_name(p) for p in paths), leaves


@dataclasses.dataclass(frozen=True, eq=False)
class Penalty:
    """An EWC penalty, its Fisher already spread onto the parameters' entries (from :func:`penalty`, :func:`per_task`).

    ``penalty(params) = ½ λ (Σ_i W_i (θ_i − c_i)² + K)``: a scalar tensor, differentiable in
    ``params``. For one task ``W = F`` and ``c = θ*`` (``K = 0``); for several, see :func:`per_task`.

    Attributes:
        treespec: the anchor's tree structure (params of this structure take the fast path).
        names: each parameter's dotted name, in flattening order.
        weights: per parameter, ``W`` of the parameter's shape (float32, float64 for float64
            anchors), or ``None`` for a parameter the penalty leaves alone.
        centres: per parameter, ``c`` of the parameter's shape (``None`` where ``weights`` is).
        constant: ``K = Σ_t Σ_i F_t,i (θ*_t,i − c_i)²``, 0 for one task.
        strength: ``λ``; ``dataclasses.replace(penalty, strength=...)`` rescales without rebuilding.
    """

    treespec: optree.PyTreeSpec
    names: tuple[str, ...]
    weights: tuple[Tensor | None, ...]
    centres: tuple[Tensor | None, ...]
    constant: float
    strength: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "strength", _check_strength(self.strength))

    @property
    def fisher(self) -> Any:
        """The per-entry weights ``W`` as a tree shaped like the anchor (``None`` where not penalised)."""
        return optree.tree_unflatten(self.treespec, list(self.weights))

    @property
    def anchor(self) -> Any:
        """The centres ``c`` as a tree shaped like the anchor (the anchor itself for one task)."""
        return optree.tree_unflatten(self.treespec, list(self.centres))

    def _leaves(self, params: Any) -> list[Any]:
        leaves, treespec = optree.tree_flatten(params)
        if treespec == self.treespec:
            return leaves
        _, names, leaves = _treespec_names(params)  # another container type, or extra parameters
        by_name = dict(zip(names, leaves))
        missing = [n for n, w in zip(self.names, self.weights) if w is not None and n not in by_name]
        if missing:
            raise SpecError(f"params lack {few(missing)}, which the penalty is anchored on")
        return [by_name.get(n) for n in self.names]

    def __call__(self, params: Any) -> Tensor:
        """``½ λ (Σ_i W_i (θ_i − c_i)² + K)`` for ``params``: a scalar tensor ``[]``.

        Args:
            params: a tree with the anchor's parameters (same names and shapes; parameters the
                anchor does not have, such as a new task's head, are not penalised). Tensors may
                require grad, or be functional params inside ``torch.func.grad`` / ``vmap``.

        Returns:
            A scalar tensor ``[]`` (per example of a ``vmap``), in the promoted dtype of params and weights.

        Raises:
            SpecError: naming a parameter that ``params`` lacks or has in another shape.
        """
        total: Tensor | None = None
        for name, p, w, c in zip(self.names, self._leaves(params), self.weights, self.centres):
            if w is None or c is None:
                continue
            if not isinstance(p, Tensor) or p.shape != w.shape:
                got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise SpecError(f"parameter '{name}' has shape {got}, but the penalty was built for {tuple(w.shape)}")
            d = p - c
            term = (w * d * d).sum()  # Σ_i W_i (θ_i − c_i)²
            total = term if total is None else total + term
        assert total is not None  # a penalty has at least one weighted parameter (checked when built)
        return 0.5 * self.strength * (total + self.constant)


def _check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength < math.inf:
        raise ValueError(f"strength must be a finite number >= 0, got {strength!r}")
    return float(strength)


def _anchor(anchor: Any, task: str) -> tuple[optree.PyTreeSpec, tuple[str, ...], list[Tensor]]:
    treespec, names, leaves = _treespec_names(anchor)
    if not leaves:
        raise SpecError(f"{task}the anchor is an empty tree")
    for name, leaf in zip(names, leaves):
        if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
            what = f"a {leaf.dtype} tensor" if isinstance(leaf, Tensor) else f"a {type(leaf).__name__}"
            raise SpecError(f"{task}anchor entry '{name}' is {what}, not a floating-point tensor")
    return treespec, names, leaves


def _elementwise(fisher: Any, names: Sequence[str], leaves: Sequence[Tensor], task: str) -> list[Tensor | None]:
    paths, values, _ = optree.tree_flatten_with_path(fisher, none_is_leaf=True)
    by_name = {path_name(p): v for p, v in zip(paths, values)}
    extra = [n for n in by_name if n not in names]
    if extra:
        raise SpecError(f"{task}Fisher entry '{extra[0]}' matches no parameter of the anchor")
    out: list[Tensor | None] = []
    for name, leaf in zip(names, leaves):
        if name not in by_name:
            raise SpecError(
                f"{task}the Fisher has no entry for parameter '{name}' (give it None to leave it unregularised)"
            )
        value = by_name[name]
        if value is not None and (not isinstance(value, Tensor) or value.shape != leaf.shape):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise SpecError(
                f"{task}the Fisher of parameter '{name}' has shape {got}, but the parameter has shape "
                f"{tuple(leaf.shape)} (a group Fisher needs spec=, the spec it was made with)"
            )
        out.append(value)
    return out


def _same_rules(state_spec: Any, spec: Any, anchor: Any, task: str) -> None:
    ours = named_rules(resolve_spec(state_spec, anchor).rule_tree())
    theirs = named_rules(resolve_spec(spec, anchor).rule_tree())
    for name, rule in ours.items():
        if rule != theirs[name]:
            raise SpecError(f"{task}parameter '{name}' has {rule!r} in the FisherState but {theirs[name]!r} in spec=")


def _task_fisher(
    anchor: Any, names: Sequence[str], leaves: Sequence[Tensor], fisher: Any, *, spec: Any, density: bool, task: str
) -> list[Tensor | None]:
    """One task's per-entry Fisher, one tensor (or ``None``) per anchor leaf."""
    if isinstance(fisher, FisherState):
        made_for = named_rules(fisher.spec)
        extra, missing = [n for n in made_for if n not in names], [n for n in names if n not in made_for]
        if extra or missing:
            raise SpecError(
                f"{task}the FisherState was made for other parameters: "
                + (f"it has '{extra[0]}', which the anchor lacks" if extra else f"it lacks '{missing[0]}'")
            )
        if spec is not None:
            _same_rules(fisher.spec, spec, anchor, task)
        spec, fisher = fisher.spec, estimate(fisher)
    if spec is None:
        return _elementwise(fisher, names, leaves, task)
    resolved = resolve_spec(spec, anchor)
    return list(resolved.leaves_of(broadcast(fisher, resolved, anchor, density=density)))


def _checked(value: Tensor, like: Tensor, name: str, task: str) -> Tensor:
    work = torch.float64 if like.dtype == torch.float64 else torch.float32
    value = value.detach().to(device=like.device, dtype=work)
    if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
        raise ValueError(f"{task}the Fisher of parameter '{name}' has negative or non-finite entries")
    return value


def _combine(terms: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """``W = Σ F_t``, ``c = a_1 + Σ_t F_t (a_t − a_1) / W`` (``a_1`` where ``W = 0``), ``K = Σ_t Σ F_t (a_t − c)²``."""
    (f1, a1), rest = terms[0], terms[1:]
    if not rest:
        return f1.clone(), a1.clone(), torch.zeros((), dtype=f1.dtype, device=f1.device)
    weight = f1 + sum(f for f, _ in rest)
    pull = sum(f * (a - a1) for f, a in rest)
    centre = a1 + torch.where(weight > 0, pull / weight.clamp_min(torch.finfo(weight.dtype).tiny), 0.0)
    constant = sum((f * (a - centre).square()).sum() for f, a in terms)
    return weight, centre, torch.as_tensor(constant)


def per_task(
    tasks: Iterable[tuple[Any, Any] | tuple[Any, Any, Any]], *, strength: float, spec: Any = None, density: bool = True
) -> Penalty:
    """The EWC penalty of several past tasks, ``Ω(θ) = ½ λ Σ_t Σ_i F_t,i (θ_i − θ*_t,i)²``, folded into one.

    Built as ``½ λ (Σ_i W_i (θ_i − c_i)² + K)`` with ``W = Σ_t F_t``, ``c = Σ_t F_t θ*_t / W`` and the
    constant ``K = Σ_t Σ_i F_t,i (θ*_t,i − c_i)²`` (equal for every ``θ``, so the value is the
    per-task sum itself and the gradient is ``λ Σ_t F_t (θ − θ*_t)``).

    Args:
        tasks: ``(anchor_t, fisher_t)`` pairs, or ``(anchor_t, fisher_t, spec_t)`` triples, one per
            past task. Every anchor is a tree of tensors
            with the same names and shapes (the params after task ``t``; copied, so training on in
            place does not move them). A Fisher is an elementwise tree (the anchor's names and shapes;
            ``None`` for parameters it leaves alone), a group tree made with ``spec``, or a
            :class:`~fisherfunc.FisherState` (its bias-corrected :func:`~fisherfunc.estimate` and
            its own spec).
        strength: ``λ >= 0``.
        spec: the spec the group-tree Fishers of pairs were made with (``None``: elementwise
            Fishers); a triple's ``spec_t`` is that task's. A FisherState keeps its own; given both,
            their rules must agree.
        density: spread a group's Fisher as its density ``F_g / n_g`` (default) or as ``F_g``.

    Returns:
        A :class:`Penalty`: ``penalty(params)`` is a scalar tensor ``[]``.

    Raises:
        SpecError: naming a parameter the Fisher lacks or has that the anchor does not, a shape
            that differs (between a Fisher and its anchor, or between anchors), or a spec that
            does not fit — all when the penalty is built.
        ValueError: for no tasks, a negative or infinite strength, negative or non-finite Fisher
            entries, or a Fisher that leaves every parameter alone.

    >>> import torch
    >>> anchors = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([2.0, 0.0])}]
    >>> fishers = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, 0.0])}]
    >>> pen = per_task(zip(anchors, fishers), strength=2.0)
    >>> pen.anchor["w"].tolist(), pen({"w": torch.tensor([1.0, 1.0])}).item()   # (1 + 3·1 + 1 + 0)
    ([1.5, 0.0], 5.0)
    """
    strength = _check_strength(strength)
    tasks = list(tasks)
    if not tasks:
        raise ValueError("per_task needs at least one (anchor, fisher) pair")
    treespec, names, first = _anchor(tasks[0][0], "task 0: " if len(tasks) > 1 else "")
    per_leaf: list[list[tuple[Tensor, Tensor]]] = [[] for _ in names]
    for t, item in enumerate(tasks):
        if not isinstance(item, tuple) or len(item) not in (2, 3):
            raise TypeError(f"task {t}: expected an (anchor, fisher) pair or (anchor, fisher, spec) triple")
        anchor, fisher, task_spec = item if len(item) == 3 else (*item, spec)
        task = f"task {t}: " if len(tasks) > 1 else ""
        _, anchor_names, leaves = _anchor(anchor, task)
        if anchor_names != names:
            odd = [n for n in (*anchor_names, *names) if (n in names) != (n in anchor_names)] or list(anchor_names)
            raise SpecError(f"{task}the anchor has other parameters than task 0's (first difference: '{odd[0]}')")
        for name, leaf, ref in zip(names, leaves, first):
            if leaf.shape != ref.shape:
                raise SpecError(
                    f"{task}anchor parameter '{name}' has shape {tuple(leaf.shape)}, task 0's {tuple(ref.shape)}"
                )
        values = _task_fisher(anchor, names, leaves, fisher, spec=task_spec, density=density, task=task)
        for i, (name, leaf, value) in enumerate(zip(names, leaves, values)):
            if value is not None:
                f = _checked(value, first[i], name, task)
                per_leaf[i].append((f, leaf.detach().to(device=f.device, dtype=f.dtype)))
    if not any(per_leaf):
        raise ValueError("the Fisher leaves every parameter alone (all None): there is nothing to penalise")
    weights: list[Tensor | None] = []
    centres: list[Tensor | None] = []
    constant = 0.0
    for terms in per_leaf:
        if not terms:
            weights.append(None)
            centres.append(None)
            continue
        w, c, k = _combine(terms)
        weights.append(w)
        centres.append(c)
        constant += float(k)
    return Penalty(
        treespec=treespec,
        names=names,
        weights=tuple(weights),
        centres=tuple(centres),
        constant=constant,
        strength=strength,
    )


def penalty(anchor: Any, fisher: Any, *, strength: float, spec: Any = None, density: bool = True) -> Penalty:
    """The EWC penalty ``Ω(θ) = ½ λ Σ_i F_i (θ_i − θ*_i)²`` of one past task (or an online Fisher).

    Args:
        anchor: the parameters after the past task, ``θ*``: a tree of tensors (copied).
        fisher: ``F``: an elementwise tree (the anchor's names and shapes, ``None`` for parameters
            it leaves alone), a group tree made with ``spec`` (``[*group_shape]`` per parameter), or
            a :class:`~fisherfunc.FisherState` — for online EWC, a running state with decay ``γ``
            (its bias-corrected estimate, with its own spec).
        strength: ``λ >= 0``.
        spec: the spec of a group-tree Fisher (``None``: elementwise).
        density: spread a group's Fisher as ``F_g / n_g`` (default) or ``F_g`` onto its entries.

    Returns:
        A :class:`Penalty`; ``penalty(params)`` is a scalar tensor ``[]`` and its gradient is
        ``λ F ⊙ (θ − θ*)``.

    Raises:
        SpecError: when built, naming a parameter the Fisher lacks, one the anchor lacks, or one
            whose shape differs.
        ValueError: for a negative strength, or negative or non-finite Fisher entries.

    >>> import torch, fisherfunc as ff
    >>> anchor = {"w": torch.zeros(2, 3)}
    >>> pen = penalty(anchor, {"w": torch.tensor([3.0, 6.0])}, spec=ff.Channel(0), strength=1.0)
    >>> pen.fisher["w"]                              # each row's Fisher, shared by its 3 entries
    tensor([[1., 1., 1.],
            [2., 2., 2.]])
    >>> pen({"w": torch.ones(2, 3)})                  # ½ (3·1 + 3·2)
    tensor(4.5000)
    """
    return per_task([(anchor, fisher)], strength=strength, spec=spec, density=density)


def fold(running: FisherState, fisher: Any, *, tokens: float = 0.0, samples: int = 0) -> FisherState:
    """Fold one task's Fisher into a running, ``γ``-decayed one: ``m_k = γ m_{k−1} + (1 − γ) F_k``.

    Online EWC with one step per task: start from ``ff.init_state(params, spec=spec, decay=γ)``
    and fold each finished task's Fisher. ``ff.estimate(running)`` is then ``Σ_k γ^{K−k} F_k /
    Σ_k γ^{K−k}``, and :func:`penalty` of the running state, anchored at the latest parameters, is
    online EWC. The arithmetic and storage are the state's own EMA (a new state is returned; the
    old one is untouched).

    Args:
        running: the running state (its ``decay`` is ``γ``, its spec that of every task's Fisher).
        fisher: the task's Fisher: a group tree with ``running``'s structure and group shapes
            (``[*group_shape]``, ``None`` for skipped parameters), e.g. from :func:`fisherfunc.fisher`,
            or a :class:`~fisherfunc.FisherState` with the same spec and kind (its estimate, tokens
            and samples).
        tokens: tokens the task's Fisher was computed over (added to ``running.tokens``; taken from
            a FisherState when one is given).
        samples: samples, likewise.

    Raises:
        SpecError: naming a parameter whose group shape or rule differs, or which one side lacks.

    >>> import torch, fisherfunc as ff
    >>> params = {"w": torch.zeros(2, 3)}
    >>> running = ff.init_state(params, spec=ff.Channel(0), decay=0.5)
    >>> running = fold(fold(running, {"w": torch.tensor([1.0, 1.0])}), {"w": torch.tensor([4.0, 0.0])})
    >>> ff.estimate(running)["w"]                    # (0.5 · F_1 + F_2) / 1.5
    tensor([3.0000, 0.3333])
    """
    if not isinstance(running, FisherState):
        raise TypeError(f"running must be a FisherState (e.g. ff.init_state(...)), got {type(running).__name__}")
    if isinstance(fisher, FisherState):
        ours, theirs = named_rules(running.spec), named_rules(fisher.spec)
        for name in sorted(set(ours) | set(theirs)):
            if ours.get(name) != theirs.get(name):
                raise SpecError(
                    f"parameter '{name}': the running state has {ours.get(name)!r}, the task's Fisher has "
                    f"{theirs.get(name)!r}"
                )
        if fisher.kind != running.kind:
            raise SpecError(f"the running state holds a {running.kind!r} Fisher, the task's is {fisher.kind!r}")
        fisher, tokens, samples = estimate(fisher), fisher.tokens, fisher.samples
    _, names, stored = _treespec_names(running.ema)
    _, given_names, given = _treespec_names(fisher)
    shapes = {n: tuple(stored_shape(m)) for n, m in zip(names, stored)}
    given_shapes = {
        n: tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__ for n, g in zip(given_names, given)
    }
    for name in sorted(set(shapes) | set(given_shapes)):
        if shapes.get(name) != given_shapes.get(name):
            raise SpecError(
                f"parameter '{name}': the running state's groups have shape {shapes.get(name)}, the task's "
                f"Fisher {given_shapes.get(name)} (None: absent or skipped)"
            )
    by_name = dict(zip(given_names, given))
    fisher = optree.tree_unflatten(optree.tree_structure(running.ema), [by_name[n] for n in names])
    return ema_update(running, fisher, tokens, samples)
