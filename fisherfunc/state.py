"""Immutable Fisher state: an exponential moving average of group Fisher, debiased on read.

With one global decay ``β`` and one step counter for all groups::

    m_t = β · m_{t−1} + (1 − β) · F̂_t          (stored: raw, not debiased)
    estimate(state) = m_t / (1 − β^t)            (exact when F̂_t is constant)

``decay=0`` makes each step the one-shot batch estimate. States are ``NamedTuple``s, so they
are pytree nodes for optree and ``torch.utils._pytree``; every update returns a new state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from .rules import is_rule
from .spec import ResolvedSpec, path_name, resolve_spec

__all__ = ["FisherState", "init_state", "estimate", "bias_correction", "ema_update", "clear", "metadata", "check_decay"]


class FisherState(NamedTuple):
    """Running group Fisher.

    Attributes:
        ema: group tree (the params' structure; ``None`` for ``Skip()``), raw EMA ``m_t``.
        step: number of steps ``t`` taken.
        tokens: tokens seen, ``Σ n_b`` over all steps.
        samples: samples seen.
        decay: the EMA decay ``β`` in ``[0, 1)``.
        spec: the resolved rule tree (the params' structure, rules as leaves).
        kind: the Fisher kind the steps compute (``"empirical"`` — dataset labels — for now).

    The only tensors are the leaves of ``ema``; the other fields are plain Python values, so the
    state keys itself (``to_keyed(state, task=...)``) and debiases itself (``estimate(state)``).
    Map tensor functions over ``state.ema``, e.g. ``state._replace(ema=tree_map(f, state.ema))``.
    """

    ema: Any
    step: int
    tokens: float
    samples: int
    decay: float
    spec: Any
    kind: str = "empirical"


def check_decay(decay: float) -> float:
    """Validate an EMA decay: a real number in ``[0, 1)``."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
    return float(decay)


def _zeros(resolved: ResolvedSpec, params: Any, dtype: torch.dtype | None) -> Any:
    leaves = resolved.treespec.flatten_up_to(params)
    zeros = []
    for i in resolved.active:
        p = leaves[i]
        zdtype = dtype or (torch.float64 if p.dtype == torch.float64 else torch.float32)
        zeros.append(torch.zeros(resolved.group_shapes[i], dtype=zdtype, device=p.device))
    return resolved.unflatten_groups(zeros)


def init_state(params: Any, *, spec: Any, decay: float = 0.99, dtype: torch.dtype | None = None) -> FisherState:
    """A fresh state (zero EMA, step 0) for ``params`` under ``spec``.

    Args:
        params: pytree of parameter tensors (only shapes, dtypes and devices are read).
        spec: group rules (prefix tree or callable), resolved and validated here.
        decay: EMA decay ``β`` in ``[0, 1)``.
        dtype: dtype of the stored EMA (default float32, or float64 for float64 params).
    """
    decay = check_decay(decay)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype of the stored EMA must be a floating-point dtype, got {dtype}")
    resolved = resolve_spec(spec, params)
    return FisherState(
        ema=_zeros(resolved, params, dtype),
        step=0,
        tokens=0.0,
        samples=0,
        decay=decay,
        spec=resolved.rule_tree(),
    )


def ema_update(state: FisherState, batch_fisher: Any, tokens: float, samples: int) -> FisherState:
    """``m_t = β m_{t−1} + (1 − β) F̂_t``; returns a new state (the old one is untouched).

    Args:
        state: the current state.
        batch_fisher: token-normalised Fisher ``F̂_t`` of the new batch (group tree like ``ema``).
        tokens: tokens in the batch.
        samples: samples in the batch.
    """
    beta = state.decay

    def update(m: Tensor, f: Tensor) -> Tensor:
        work = torch.float64 if m.dtype == torch.float64 else torch.float32  # arithmetic in float32+
        return (beta * m.to(work) + (1.0 - beta) * f.to(device=m.device, dtype=work)).to(m.dtype)

    return state._replace(
        ema=optree.tree_map(update, state.ema, batch_fisher),
        step=state.step + 1,
        tokens=state.tokens + float(tokens),
        samples=state.samples + int(samples),
    )


def estimate(state: FisherState) -> Any:
    """The bias-corrected Fisher ``m_t / (1 − β^t)`` (a new group tree).

    Raises:
        ValueError: if the state has taken no step yet (there is nothing to estimate).

    >>> import torch, fisherfunc as ff
    >>> model = torch.nn.Linear(3, 2)
    >>> step = ff.make_fisher_step(ff.losses.classification(model), decay=0.9)
    >>> params = dict(model.named_parameters())
    >>> state = step(params, (torch.randn(5, 3), torch.randint(0, 2, (5,))), step.init(params))
    >>> ff.estimate(state)["weight"].shape
    torch.Size([2])
    """
    if state.step == 0:
        raise ValueError("the state has taken no step yet; call fisher_step(params, batch, state) first")
    correction = bias_correction(state.decay, state.step)
    return optree.tree_map(lambda m: m / correction, state.ema)


def bias_correction(decay: float, step: int) -> float:
    """``1 − β^t``, accurate to a few ulps for every ``β`` in ``[0, 1)``.

    Written as ``−expm1(t · log β)``: the naive ``1.0 - decay**step`` cancels catastrophically for
    ``β`` near 1 (``β = 1 − 10⁻⁹`` loses 7 digits), which would bias a float64 estimate.
    """
    return 1.0 if decay == 0.0 else -math.expm1(step * math.log(decay))


def clear(states: Mapping[str, FisherState], tasks: str | Iterable[str] | None = None) -> dict[str, FisherState]:
    """A new ``task -> state`` dict with the chosen tasks reset to a fresh state.

    Args:
        states: ``{task: state}``; not modified.
        tasks: a task name or names to reset; ``None`` resets every task.

    Raises:
        KeyError: naming a task that is not in ``states``.
    """
    chosen = list(states) if tasks is None else ([tasks] if isinstance(tasks, str) else list(tasks))
    missing = [t for t in chosen if t not in states]
    if missing:
        raise KeyError(f"no state for task(s) {missing}; tasks are {sorted(states)}")
    out = dict(states)
    for t in chosen:
        s = states[t]
        out[t] = s._replace(ema=optree.tree_map(torch.zeros_like, s.ema), step=0, tokens=0.0, samples=0)
    return out


def metadata(state: FisherState) -> dict[str, Any]:
    """A JSON-serialisable description of a state: counts, decay and the rule of every parameter."""
    paths, rules, _ = optree.tree_flatten_with_path(state.spec, is_leaf=is_rule)
    return {
        "step": state.step,
        "tokens": state.tokens,
        "samples": state.samples,
        "decay": state.decay,
        "kind": state.kind,
        "rules": {path_name(p): repr(r) for p, r in zip(paths, rules)},
    }
