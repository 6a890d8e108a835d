"""Fisher-weighted model merging (Matena & Raffel, NeurIPS 2022): pure functions over params trees.

Models fine-tuned from one start are merged entry by entry, each model's value weighted by how much
its own data constrains it — its diagonal Fisher — and by a coefficient ``λ_i``. For every merged
parameter entry ``p``::

    θ_p = Σ_i λ_i (F̃_ip + ε) θ_ip  /  Σ_i λ_i (F̃_ip + ε)

    F̃_i = F_i / s_i        s_i = 1 (normalize=None) | mean_p F_ip ("mean") | ‖F_i‖₂ ("l2")
    ε   = floor · mean_{i, p} F̃_ip      (over every model and every merged entry with Fisher)

- **Floor.** ``ε`` is added to every model's Fisher, so the denominator is never zero and an entry
  that no model has Fisher for (zero, or a ``Skip()`` parameter) gets the ``λ``-weighted plain
  average ``Σ_i λ_i θ_ip / Σ_i λ_i``. It is *relative* — ``floor`` times the mean Fisher entry —
  so the merge does not change when every Fisher is multiplied by one constant (token-normalised
  Fisher has no natural unit). The default ``1e-8`` only matters where every model's Fisher is
  below about ``1e-8`` of the mean; ``floor`` must be positive.
- **Normalisation** (default ``"l2"``): each model's Fisher is divided by its L2 norm over the
  merged entries, as the paper's reference implementation does by default (``normalize_fishers``);
  ``"mean"`` divides by its mean entry, ``None`` keeps the paper's equation as written.
  fisherfunc's Fisher is already a mean per token, so a model with more data does not get a larger
  Fisher; but a model that fits its data more confidently has a smaller one, and without
  normalisation it counts less (on ``examples/merging_digits.py`` that cost accuracy, see
  ``docs/merging.md``). Normalised, only each model's *pattern* of Fisher matters, and ``λ`` sets
  how much each model counts.
- **Group Fisher** (channels, heads, …: a group tree and its spec, or a
  :class:`~fisherfunc.FisherState`) is spread onto its parameters' entries as a density,
  ``F_g / n_g`` per entry (``broadcast(..., density=True)``): the per-entry diagonal implied when a
  group's entries share its Fisher equally, summing to the group's value, so group and elementwise
  Fisher are on one scale (the floor and the normalisation compare them).
- **Excluded parameters** (``exclude=`` ``fnmatch`` globs over dotted names, e.g. task heads
  ``"classifier.*"``) are copied from the ``base`` model (the first by default), like the paper's
  reference implementation, which keeps the target model's head. Other models may lack them or
  have other shapes; a pattern that matches none of the base model's parameters is an error.
- **Names.** Models are matched by parameter name after removing a prefix shared by *all* of a
  model's names (``module.`` from ``DataParallel``, ``_orig_mod.`` from ``torch.compile``,
  ``base_model.model.`` from PEFT). Every mismatch — a parameter missing from a model, a different
  shape, a Fisher that does not fit its model — raises :class:`~fisherfunc.SpecError`, naming it,
  before any arithmetic.

Each model's Fisher is given in its own model's structure and names: an elementwise tree (its
params' shapes; ``None`` for a parameter without Fisher), a group tree with ``spec=``, a
:class:`~fisherfunc.FisherState` (its estimate and its own spec), or the path of a file written by
:func:`fisherfunc.save` (read with ``fisherfunc.load(path, params, task=task)``). Nothing given is
modified: the result is new tensors in the base model's structure, dtypes and devices (detached),
computed in float64 (float32 on devices without float64), one parameter at a time.
:func:`search_coefficients` picks ``λ`` on a grid by a validation score.

>>> import torch, fisherfunc.merging as fm
>>> a, b = {"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}
>>> fm.merge_models([a, b], [{"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 1.0])}])["w"]
tensor([0.7500, 0.2500])
>>> fm.merge_models([a, b], None)["w"]  # no Fisher: the plain average
tensor([0.5000, 0.5000])
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from ._naming import few, path_name
from ._spec.groups import broadcast
from ._spec.resolve import resolve_spec
from ._spec.rules import Elementwise, Rule, Skip, SpecError
from ._state.files import load
from ._state.state import FisherState, estimate

__all__ = ["PREFIXES", "NORMALIZATIONS", "CoefficientSearch", "merge_models", "search_coefficients", "simplex_grid"]

#: Prefixes removed from a model's names when every one of its names has it, repeatedly.
PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "base_model.model.")
#: The values of ``normalize=`` besides ``None``.
NORMALIZATIONS: tuple[str, ...] = ("l2", "mean")


class CoefficientSearch(NamedTuple):
    """What :func:`search_coefficients` found.

    Attributes:
        coefficients: the best ``λ`` (one per model), the first maximum in grid order.
        score: its score.
        params: the models merged with it (the base model's structure).
        scores: every grid point and its score, ``((λ, score), …)`` in grid order.
    """

    coefficients: tuple[float, ...]
    score: float
    params: Any
    scores: tuple[tuple[tuple[float, ...], float], ...]


# --- matching models by name ----------------------------------------------------------------------


def _strip(names: list[str], prefixes: Sequence[str]) -> tuple[list[str], str]:
    """Remove, repeatedly, any of ``prefixes`` that every name has; returns the names and what was removed."""
    removed = ""
    while True:
        shared = [p for p in prefixes if p and all(n.startswith(p) and len(n) > len(p) for n in names)]
        if not shared:
            return names, removed
        names = [n[len(shared[0]) :] for n in names]
        removed += shared[0]


@dataclasses.dataclass(frozen=True)
class _Model:
    """One model's leaves under their canonical (prefix-free) names."""

    leaves: dict[str, Tensor]
    prefix: str
    treespec: optree.PyTreeSpec
    order: tuple[str, ...]


def _model(params: Any, index: int, prefixes: Sequence[str]) -> _Model:
    if isinstance(params, (FisherState, Tensor)) or not optree.tree_leaves(params):
        raise TypeError(f"models[{index}] must be a non-empty params tree, got {type(params).__name__}")
    paths, leaves, treespec = optree.tree_flatten_with_path(params)
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(f"models[{index}]: parameter '{path_name(path)}' is a {type(leaf).__name__}, not a Tensor")
    names, prefix = _strip([path_name(p) for p in paths], prefixes)
    return _Model(dict(zip(names, leaves)), prefix, treespec, tuple(names))


def _excluded(base: _Model, exclude: Sequence[str]) -> set[str]:
    out: set[str] = set()
    for pattern in exclude:
        hits = [n for n in base.order if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise SpecError(f"exclude pattern {pattern!r} matches no parameter of the base model ({few(base.order)})")
        out.update(hits)
    return out


def _check_models(models: list[_Model], base: int, exclude: Sequence[str]) -> list[str]:
    """The merged names (base order); raise naming the first mismatch between models."""
    ref = models[base]
    _excluded(ref, exclude)  # every pattern matches a parameter of the base model

    def kept(m: _Model) -> list[str]:
        return [n for n in m.order if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]

    merged = kept(ref)
    for i, m in enumerate(models):
        missing = [n for n in merged if n not in m.leaves]
        extra = [n for n in kept(m) if n not in ref.leaves]
        if missing or extra:
            removed = [f"{x.prefix!r} from models[{j}]" for j, x in ((i, m), (base, ref)) if x.prefix]
            where = f" (after removing {' and '.join(dict.fromkeys(removed))})" if removed else ""
            what = f"models[{base}]'s {few(missing)} missing from models[{i}]" if missing else ""
            what += "; " if missing and extra else ""
            what += f"models[{i}]'s {few(extra)} missing from models[{base}]" if extra else ""
            raise SpecError(
                f"the models' parameters differ: {what}{where}; exclude= takes parameters to keep as they are"
            )
        for n in merged:
            if m.leaves[n].shape != ref.leaves[n].shape:
                raise SpecError(
                    f"parameter '{n}' has shape {tuple(m.leaves[n].shape)} in models[{i}] but "
                    f"{tuple(ref.leaves[n].shape)} in models[{base}]; exclude= it to keep models[{base}]'s"
                )
            if not m.leaves[n].is_floating_point():
                raise SpecError(f"parameter '{n}' of models[{i}] is {m.leaves[n].dtype}; exclude= it to copy it")
    return merged


# --- reading each model's Fisher ------------------------------------------------------------------


def _tasks(task: str | Sequence[str | None] | None, count: int) -> list[str | None]:
    if task is None or isinstance(task, str):
        return [task] * count
    tasks = list(task)
    if len(tasks) != count:
        raise ValueError(f"task has {len(tasks)} entries for {count} models")
    return tasks


def _read(fisher: Any, params: Any, spec: Any, task: str | None, index: int) -> tuple[Any, Any]:
    """``(group tree, rule tree)`` of one model's Fisher, in that model's structure."""
    if isinstance(fisher, (str, os.PathLike)):
        fisher = load(fisher, params, task=task)
        if not isinstance(fisher, FisherState):
            raise ValueError(f"fishers[{index}]: the file holds tasks {sorted(fisher)}; pass task= to choose one")
    if isinstance(fisher, Mapping) and fisher and all(isinstance(v, FisherState) for v in fisher.values()):
        raise TypeError(f"fishers[{index}] is a {{task: FisherState}} dict; pass one of its states")
    if isinstance(fisher, FisherState):
        return estimate(fisher), fisher.spec
    if spec is not None:
        return fisher, spec
    treespec = optree.tree_structure(params)
    try:
        leaves = treespec.flatten_up_to(fisher)
    except (ValueError, TypeError) as err:
        raise SpecError(f"fishers[{index}] does not have the structure of models[{index}]: {err}") from None
    rules = [Skip() if leaf is None else Elementwise() for leaf in leaves]
    return fisher, optree.tree_unflatten(treespec, rules)


def _fisher_leaves(
    fisher: Any, model: _Model, params: Any, spec: Any, task: str | None, index: int
) -> dict[str, tuple[Tensor, Rule]]:
    """``{canonical name: (group value, rule)}`` for the parameters that have Fisher."""
    groups, rules = _read(fisher, params, spec, task, index)
    try:
        resolved = resolve_spec(rules, params)
        values = resolved.flatten_groups(groups, "the Fisher")
    except SpecError as err:
        raise SpecError(f"fishers[{index}] does not fit models[{index}]: {err}") from None
    return {model.order[i]: (v, resolved.rules[i]) for i, v in zip(resolved.active, values)}


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _entries(value: Tensor, rule: Rule, like: Tensor) -> Tensor:
    """A group value spread onto a parameter's entries, as a density ``F_g / n_g`` (compute dtype)."""
    value = value.detach().to(like.device, _compute_dtype(like.device))
    if isinstance(rule, Elementwise):
        return value
    return broadcast(value, rule, torch.empty(like.shape, device="meta"), density=True)


# --- the merge ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """Validated models and Fisher: ``merge(λ)`` is the arithmetic alone."""

    models: list[_Model]
    base: int
    merged: frozenset[str]
    fishers: list[dict[str, tuple[Tensor, Rule]]]  # per model; empty without Fisher
    scales: list[float]  # s_i
    eps: float  # ε

    def weight(self, i: int, name: str, like: Tensor) -> Tensor | float:
        """``F̃_ip + ε`` for one parameter of model ``i``."""
        if name not in self.fishers[i]:
            return self.eps
        value, rule = self.fishers[i][name]
        return _entries(value, rule, like) / self.scales[i] + self.eps

    def merge(self, coefficients: Sequence[float] | None) -> Any:
        lam = _coefficients(coefficients, len(self.models))
        ref = self.models[self.base]
        out = []
        with torch.no_grad():
            for name in ref.order:
                like = ref.leaves[name]
                if name not in self.merged:
                    out.append(like.detach().clone())
                    continue
                dtype = _compute_dtype(like.device)
                num = torch.zeros(like.shape, dtype=dtype, device=like.device)
                den = torch.zeros(like.shape, dtype=dtype, device=like.device)
                for i, m in enumerate(self.models):
                    if lam[i] == 0.0:
                        continue
                    w = lam[i] * self.weight(i, name, like)  # λ_i (F̃_ip + ε)
                    num += w * m.leaves[name].detach().to(like.device, dtype)
                    den += w
                out.append((num / den).to(like.dtype))  # Σ λ (F̃ + ε) θ / Σ λ (F̃ + ε)
        return optree.tree_unflatten(ref.treespec, out)


def _coefficients(coefficients: Sequence[float] | None, count: int) -> list[float]:
    lam = [1.0] * count if coefficients is None else [float(c) for c in coefficients]
    if len(lam) != count:
        raise ValueError(f"coefficients has {len(lam)} entries for {count} models")
    if not all(math.isfinite(c) and c >= 0 for c in lam) or not any(c > 0 for c in lam):
        raise ValueError(f"coefficients must be finite, non-negative and not all zero, got {lam}")
    return lam


def _prepare(
    models: Sequence[Any],
    fishers: Sequence[Any] | None,
    *,
    spec: Any,
    task: str | Sequence[str | None] | None,
    floor: float,
    normalize: str | None,
    exclude: str | Sequence[str],
    base: int,
    prefixes: Sequence[str],
) -> _Prepared:
    if isinstance(models, Mapping) or not isinstance(models, Sequence) or not models:
        raise TypeError("models must be a non-empty list of params trees (one per model)")
    if not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor > 0):
        raise ValueError(f"floor must be a positive number (the denominator must never vanish), got {floor!r}")
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be None or one of {NORMALIZATIONS}, got {normalize!r}")
    if not -len(models) <= base < len(models):
        raise ValueError(f"base={base} is not the index of one of the {len(models)} models")
    base %= len(models)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    parsed = [_model(p, i, prefixes) for i, p in enumerate(models)]
    merged = _check_models(parsed, base, exclude)
    if fishers is None:
        return _Prepared(parsed, base, frozenset(merged), [{} for _ in parsed], [1.0] * len(parsed), floor)
    if isinstance(fishers, (Mapping, str, os.PathLike, FisherState)) or len(fishers) != len(models):
        raise TypeError("fishers must be None or a list with one Fisher per model")
    tasks = _tasks(task, len(models))
    found = [
        {n: v for n, v in _fisher_leaves(f, m, p, spec, t, i).items() if n in merged}
        for i, (f, m, p, t) in enumerate(zip(fishers, parsed, models, tasks))
    ]
    for n in merged:
        having = [i for i, f in enumerate(found) if n in f]
        if having and len(having) != len(found):
            lacking = [i for i in range(len(found)) if i not in having]
            raise SpecError(
                f"parameter '{n}' has Fisher in models {having} but not in {lacking}: give every model Fisher "
                "for it, or none (then it is averaged plainly), or exclude= it"
            )
    sums, squares, counts = [0.0] * len(found), [0.0] * len(found), [0] * len(found)
    with torch.no_grad():
        for i, f in enumerate(found):
            for n, (value, rule) in f.items():
                x = _entries(value, rule, parsed[i].leaves[n])
                if not bool(torch.isfinite(x).all()) or bool((x < 0).any()):
                    raise ValueError(f"fishers[{i}]: parameter '{n}' has negative or non-finite Fisher")
                sums[i] += float(x.sum())
                squares[i] += float(x.square().sum())
                counts[i] += x.numel()
    scales = [1.0] * len(found)
    if normalize is not None:
        for i in range(len(found)):
            s = math.sqrt(squares[i]) if normalize == "l2" else sums[i] / max(counts[i], 1)
            if counts[i] and not s > 0:
                raise ValueError(f"fishers[{i}] is zero on every merged parameter: it cannot be normalised")
            scales[i] = s if s > 0 else 1.0
    total, count = sum(s / c for s, c in zip(sums, scales)), sum(counts)
    mean = total / count if count and total > 0 else 1.0
    return _Prepared(parsed, base, frozenset(merged), found, scales, floor * mean)


def merge_models(
    models: Sequence[Any],
    fishers: Sequence[Any] | None,
    *,
    coefficients: Sequence[float] | None = None,
    spec: Any = None,
    task: str | Sequence[str | None] | None = None,
    floor: float = 1e-8,
    normalize: str | None = "l2",
    exclude: str | Sequence[str] = (),
    base: int = 0,
    prefixes: Sequence[str] = PREFIXES,
) -> Any:
    """Fisher-weighted average of models: ``θ = Σ_i λ_i (F̃_i + ε) θ_i / Σ_i λ_i (F̃_i + ε)``.

    Every entry ``p`` of every merged parameter (the module docstring has the details)::

        θ_p = Σ_i λ_i (F̃_ip + ε) θ_ip / Σ_i λ_i (F̃_ip + ε),   F̃_i = F_i / s_i,   ε = floor · mean F̃

    Args:
        models: ``M`` params trees (e.g. ``{name: p.detach()}`` of ``named_parameters()``), matched
            by name after removing ``prefixes``; merged parameters must have one shape everywhere.
        fishers: ``None`` (no Fisher: the ``λ``-weighted plain average) or ``M`` Fishers, each in its
            own model's structure: an elementwise tree (leaves shaped like the params, ``None`` for
            none), a group tree made with ``spec`` (leaves ``[*group_shape]``), a
            :class:`~fisherfunc.FisherState`, or the path of a file saved by :func:`fisherfunc.save`.
        coefficients: ``λ_i ≥ 0``, one per model (default: all 1); only their ratios matter.
        spec: the spec of the group trees in ``fishers`` (``None``: they are elementwise). States
            and files bring their own.
        task: the task to read from state files (one name, or one per model).
        floor: ``ε`` relative to the mean Fisher entry; positive.
        normalize: ``"l2"`` (default) or ``"mean"``: divide each model's Fisher by its L2 norm or
            mean entry over the merged parameters first; ``None``: do not.
        exclude: ``fnmatch`` globs over dotted (prefix-free) names of parameters copied from the
            base model instead of merged, e.g. task heads ``"classifier.*"``.
        base: the model whose structure, names, dtypes, devices and excluded parameters the result has.
        prefixes: name prefixes to remove when all of a model's names have one.

    Returns:
        A new params tree with the base model's structure; tensors of its parameters' shapes, dtypes
        and devices, detached.

    Raises:
        SpecError: naming a parameter that one model lacks or has in another shape, or a Fisher
            that does not fit its model, or a parameter that some models have Fisher for and others
            not — before any arithmetic.
        ValueError: for bad options, or a negative or non-finite Fisher.

    >>> import torch, fisherfunc as ff, fisherfunc.merging as fm
    >>> a = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    >>> b = {"module.w": torch.ones(2, 3), "module.b": torch.ones(2)}       # DataParallel names
    >>> F = [{"w": torch.tensor([1.0, 0.0]), "b": torch.ones(2)},
    ...      {"module.w": torch.tensor([0.0, 1.0]), "module.b": torch.ones(2)}]
    >>> merged = fm.merge_models([a, b], F, spec=ff.Channel(0))      # channel Fisher, spread onto rows
    >>> merged["w"].round(decimals=6)                                # each row from the model with its Fisher
    tensor([[0., 0., 0.],
            [1., 1., 1.]])
    """
    prepared = _prepare(
        models,
        fishers,
        spec=spec,
        task=task,
        floor=floor,
        normalize=normalize,
        exclude=exclude,
        base=base,
        prefixes=prefixes,
    )
    return prepared.merge(coefficients)


# --- choosing the coefficients --------------------------------------------------------------------


def simplex_grid(num_models: int, *, steps: int = 11) -> tuple[tuple[float, ...], ...]:
    """Every ``λ`` with entries in ``{0, 1/(steps−1), …, 1}`` that sum to 1, in lexicographic order.

    ``C(steps + num_models − 2, num_models − 1)`` points: 11 for two models and the default steps,
    66 for three.

    >>> simplex_grid(2, steps=3)
    ((0.0, 1.0), (0.5, 0.5), (1.0, 0.0))
    """
    if num_models < 1 or steps < 2:
        raise ValueError(f"simplex_grid needs num_models >= 1 and steps >= 2, got {num_models} and {steps}")
    n = steps - 1
    points = [k for k in itertools.product(range(n + 1), repeat=num_models - 1) if sum(k) <= n]
    return tuple(tuple(x / n for x in (*k, n - sum(k))) for k in sorted(points))


def search_coefficients(
    models: Sequence[Any],
    fishers: Sequence[Any] | None,
    score: Callable[[Any], float],
    *,
    steps: int = 11,
    grid: Sequence[Sequence[float]] | None = None,
    spec: Any = None,
    task: str | Sequence[str | None] | None = None,
    floor: float = 1e-8,
    normalize: str | None = "l2",
    exclude: str | Sequence[str] = (),
    base: int = 0,
    prefixes: Sequence[str] = PREFIXES,
) -> CoefficientSearch:
    """The ``λ`` on a grid whose merge scores highest: ``argmax_λ score(merge_models(..., coefficients=λ))``.

    Models and Fisher are read and checked once; each grid point is one merge and one call of
    ``score``. Deterministic: ties go to the first point in grid order.

    Args:
        models: as for :func:`merge_models`.
        fishers: as for :func:`merge_models`.
        score: ``merged params -> float``, higher is better (e.g. accuracy on a held-out split).
        steps: points per edge of the default grid, :func:`simplex_grid` ``(M, steps=steps)``.
        grid: the ``λ`` to try instead (each one entry per model).
        spec: as for :func:`merge_models`.
        task: as for :func:`merge_models`.
        floor: as for :func:`merge_models`.
        normalize: as for :func:`merge_models`.
        exclude: as for :func:`merge_models`.
        base: as for :func:`merge_models`.
        prefixes: as for :func:`merge_models`.

    Returns:
        A :class:`CoefficientSearch`: the best ``λ``, its score, its merged params and every score.

    Raises:
        ValueError: for an empty grid or a score that is not a real number, and as :func:`merge_models`.

    >>> import torch, fisherfunc.merging as fm
    >>> a, b = {"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}
    >>> found = fm.search_coefficients([a, b], None, lambda p: -abs(float(p["w"]) - 0.3), steps=11)
    >>> [round(c, 6) for c in found.coefficients], round(float(found.params["w"]), 6)
    ([0.7, 0.3], 0.3)
    """
    prepared = _prepare(
        models,
        fishers,
        spec=spec,
        task=task,
        floor=floor,
        normalize=normalize,
        exclude=exclude,
        base=base,
        prefixes=prefixes,
    )
    points = simplex_grid(len(models), steps=steps) if grid is None else tuple(tuple(map(float, g)) for g in grid)
    if not points:
        raise ValueError("the grid is empty")
    scores: list[tuple[tuple[float, ...], float]] = []
    best: tuple[int, Any] | None = None
    for lam in points:
        merged = prepared.merge(lam)
        value = score(merged)
        if not isinstance(value, (int, float, Tensor)) or not math.isfinite(float(value)):
            raise ValueError(f"score returned {value!r} for coefficients {lam}; it must return a finite number")
        scores.append((lam, float(value)))
        if best is None or scores[-1][1] > scores[best[0]][1]:
            best = (len(scores) - 1, merged)
    assert best is not None
    lam, value = scores[best[0]]
    return CoefficientSearch(coefficients=lam, score=value, params=best[1], scores=tuple(scores))
