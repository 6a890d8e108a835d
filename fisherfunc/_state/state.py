"""Immutable Fisher state: an exponential moving average of group Fisher, debiased on read.

With one global decay ``β`` and one step counter for all groups::

    m_t = β · m_{t−1} + (1 − β) · F̂_t          (stored: raw, not debiased)
    estimate(state) = m_t / (1 − β^t)            (exact when F̂_t is constant)

``decay=0`` makes each step the one-shot batch estimate. States are ``NamedTuple``s, so they
are pytree nodes for optree and ``torch.utils._pytree``; every update returns a new state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, cast

import optree
import torch
from torch import Tensor

from .._engine.kinds import FisherKind, kind_name
from .._spec.resolve import ResolvedSpec, named_rules, resolve_spec
from .codec import check_storage_dtype, decode, stored_device, stored_dtype, stored_shape, zeros
from .ema import bias_correction, check_decay, ema_all

__all__ = ["FisherState", "init_state", "estimate", "ema_update", "clear", "metadata"]


class FisherState(NamedTuple):
    """Running group Fisher.

    Attributes:
        ema: group tree (the params' structure; ``None`` for ``Skip()``), raw EMA ``m_t``.
        step: number of steps ``t`` taken.
        tokens: tokens seen, ``Σ n_b`` over all steps.
        samples: samples seen.
        decay: the EMA decay ``β`` in ``[0, 1)``.
        spec: the resolved rule tree (the params' structure, rules as leaves).
        kind: the Fisher kind the steps compute: ``"empirical"`` (dataset labels), ``"mc"`` or
            ``"exact"`` (see :class:`fisherfunc.FisherKind`); a plain ``str``.
        skipped: batches skipped as non-finite (``nonfinite="skip"``); they changed nothing else.

    The only tensors are the leaves of ``ema``; the other fields are plain Python values, so the
    state keys itself (``to_keyed(state, task=...)``) and debiases itself (``estimate(state)``).
    Map tensor functions over ``state.ema``, e.g. ``state._replace(ema=tree_map(f, state.ema))``.
    A state stored in float16 has :class:`~fisherfunc.storage.Scaled` leaves (mantissa and
    exponent) instead of tensors; see :mod:`fisherfunc.storage` for storage dtypes and devices.
    """

    ema: Any
    step: int
    tokens: float
    samples: int
    decay: float
    spec: Any
    kind: str = "empirical"
    skipped: int = 0


def _zeros(resolved: ResolvedSpec, params: Any, dtype: torch.dtype | None, device: Any) -> Any:
    leaves: list[Tensor] = resolved.leaves_of(params)
    stored = []
    for i in resolved.active:
        p = leaves[i]
        zdtype = dtype or (torch.float64 if p.dtype == torch.float64 else torch.float32)
        stored.append(zeros(resolved.groups_of(i), dtype=zdtype, device=p.device if device is None else device))
    return resolved.unflatten_groups(stored)


def init_state(
    params: Any,
    *,
    spec: Any,
    decay: float = 0.99,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    kind: FisherKind | str = "empirical",
) -> FisherState:
    """A fresh state (zero EMA, step 0) for ``params`` under ``spec``.

    Args:
        params: pytree of parameter tensors (only shapes, dtypes and devices are read).
        spec: group rules (prefix tree or callable), resolved and validated here.
        decay: EMA decay ``β`` in ``[0, 1)``.
        dtype: storage dtype of the EMA: float32 (default; float64 for float64 params), float64,
            bfloat16 or float16 (kept with a per-value exponent, see :mod:`~fisherfunc._state.codec`).
        device: where the EMA is stored (default: each parameter's device), e.g. ``"cpu"`` while
            the params are on a GPU; every step computes on the params' device and stores back.
        kind: the Fisher kind the steps will compute (a kind value or its name); the state records its name.
    """
    decay = check_decay(decay)
    kind = kind_name(kind)
    if dtype is not None:
        check_storage_dtype(dtype)
    resolved = resolve_spec(spec, params)
    return FisherState(
        ema=_zeros(resolved, params, dtype, device),
        step=0,
        tokens=0.0,
        samples=0,
        decay=decay,
        spec=resolved.rule_tree(),
        kind=kind,
    )


def ema_update(
    state: FisherState, batch_fisher: Any, tokens: float, samples: int, *, divisor: float = 1.0, owned: bool = False
) -> FisherState:
    """``m_t = β m_{t−1} + (1 − β) F̂_t``; returns a new state (the old one is untouched).

    Args:
        state: the current state.
        batch_fisher: ``divisor · F̂_t``: the new batch's token-normalised Fisher (group tree like
            ``ema``), or its sums with ``divisor = tokens``.
        tokens: tokens in the batch.
        samples: samples in the batch.
        divisor: divides ``batch_fisher`` (inside the update, no tree of its own).
        owned: ``batch_fisher`` is the caller's scratch, which the update may overwrite (see
            :func:`~fisherfunc._state.ema.ema`).

    The arithmetic and storage are those of :func:`~fisherfunc._state.ema.ema`.
    """
    ms, tree = optree.tree_flatten(state.ema)
    fs = cast(list[Tensor], tree.flatten_up_to(batch_fisher))  # the batch's group tensors, the state's layout
    return state._replace(
        ema=optree.tree_unflatten(tree, ema_all(ms, fs, state.decay, divisor, owned=owned)),
        step=state.step + 1,
        tokens=state.tokens + float(tokens),
        samples=state.samples + int(samples),
    )


def estimate(state: FisherState, *, device: torch.device | str | None = None) -> Any:
    """The bias-corrected Fisher ``m_t / (1 − β^t)`` (a new group tree).

    Stored values are decoded and divided in float32 (float64 for float64 storage).

    Args:
        state: the state.
        device: where to put the estimate (default: where the state is stored); nothing moves
            unless asked (see :func:`fisherfunc.storage.read` for a lazy, per-group read).

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
    return optree.tree_map(lambda m: decode(m, device=device) / correction, state.ema)


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
        fresh = optree.tree_map(lambda m: zeros(stored_shape(m), dtype=stored_dtype(m), device=stored_device(m)), s.ema)
        out[t] = s._replace(ema=fresh, step=0, tokens=0.0, samples=0, skipped=0)
    return out


def metadata(state: FisherState) -> dict[str, Any]:
    """A JSON-serialisable description of a state: counts, decay, storage and every parameter's rule."""
    stored = optree.tree_leaves(state.ema)
    return {
        "step": state.step,
        "tokens": state.tokens,
        "samples": state.samples,
        "skipped": state.skipped,
        "decay": state.decay,
        "kind": state.kind,
        "storage": {
            "dtypes": sorted({str(stored_dtype(m)).removeprefix("torch.") for m in stored}),
            "devices": sorted({str(stored_device(m)) for m in stored}),
        },
        "rules": {name: repr(rule) for name, rule in named_rules(state.spec).items()},
    }
