"""``make_fisher_step``: bind a loss, spec and decay into a pure ``fisher_step``.

    fisher_step = make_fisher_step(loss, spec=spec, decay=0.99)
    state = fisher_step.init(params)
    state = fisher_step(params, batch, state)      # a new state; the old one is untouched

Each call computes the token-normalised Fisher of the batch, ``F̂_t = Σ_b s_b / Σ_b n_b``, and
folds it into the EMA ``m_t = β m_{t−1} + (1 − β) F̂_t`` (see :mod:`fisherfunc.state`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optree
import torch

from .batch import Batch
from .estimate import Path, accumulate, check_chunk_size, check_path, resolve_for
from .per_sample import PerSampleLoss
from .rules import SpecError, is_rule
from .spec import ResolvedSpec, _few, path_name
from .state import FisherState, check_decay, ema_update, init_state

__all__ = ["FisherStep", "make_fisher_step"]


def _check_state(state: FisherState, resolved: ResolvedSpec, decay: float) -> None:
    """Refuse a state made for another decay, other parameters or other rules, naming what differs."""
    if state.decay != decay:
        raise SpecError(f"the state has decay {state.decay}, but this fisher_step uses decay {decay}")
    paths, rules, treespec = optree.tree_flatten_with_path(state.spec, is_leaf=is_rule)
    made_for = {path_name(p): r for p, r in zip(paths, rules, strict=True)}
    missing = [n for n in resolved.names if n not in made_for]
    extra = [n for n in made_for if n not in resolved.names]
    if missing or extra:
        parts = ([f"params have {_few(missing)} that the state lacks"] if missing else []) + (
            [f"the state has {_few(extra)} that params lack"] if extra else []
        )
        raise SpecError("the state was made for other parameters: " + "; ".join(parts))
    for name, rule in zip(resolved.names, resolved.rules, strict=True):
        if made_for[name] != rule:
            raise SpecError(
                f"parameter '{name}': the state was made with {made_for[name]!r}, but this fisher_step uses {rule!r}"
            )
    if treespec != resolved.treespec:
        raise SpecError(f"the state's tree structure {treespec} differs from the params' {resolved.treespec}")
    resolved.flatten_groups(state.ema, what="state.ema")


@dataclasses.dataclass(frozen=True, eq=False)
class FisherStep:
    """A configured, pure Fisher step (built by :func:`make_fisher_step`).

    Attributes:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        spec: group rules (``None``: inferred from ``loss.model`` on each call).
        decay: EMA decay ``β`` in ``[0, 1)``.
        chunk_size: samples per vectorised chunk (``None``: whole batch).
        path: ``"auto"`` (output probes where possible) or ``"direct"``; both exact.
    """

    loss: PerSampleLoss
    spec: Any
    decay: float
    chunk_size: int | None
    path: Path = "auto"

    def init(self, params: Any, *, dtype: torch.dtype | None = None) -> FisherState:
        """A fresh state for ``params`` (zero EMA, step 0); ``dtype`` sets the stored dtype."""
        resolved = resolve_for(self.loss, params, self.spec)
        return init_state(params, spec=resolved.rule_tree(), decay=self.decay, dtype=dtype)

    def __call__(self, params: Any, batch: Batch, state: FisherState) -> FisherState:
        """Fold one batch into ``state``; returns a new :class:`FisherState`.

        Args:
            params: pytree of parameter tensors (not modified).
            batch: one batch (tuple or mapping of tensors with a leading batch dimension).
            state: the current state (not modified).

        Raises:
            SpecError: if ``state`` was made for other parameters, rules or decay.
            BatchError: for a malformed batch or one with no tokens (before any model call).
        """
        if not isinstance(state, FisherState):
            raise TypeError(f"state must be a FisherState (from fisher_step.init(params)), got {type(state).__name__}")
        resolved = resolve_for(self.loss, params, self.spec)
        _check_state(state, resolved, self.decay)
        acc = accumulate(self.loss, params, batch, spec=resolved, chunk_size=self.chunk_size, path=self.path)
        batch_fisher = optree.tree_map(lambda s: s / acc.tokens, acc.sums)
        return ema_update(state, batch_fisher, acc.tokens, acc.samples)


def make_fisher_step(
    loss: PerSampleLoss,
    *,
    spec: Any = None,
    decay: float = 0.99,
    chunk_size: int | None = None,
    path: Path = "auto",
) -> FisherStep:
    """Bind configuration into a pure ``fisher_step(params, batch, state) -> state``.

    Args:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``, e.g. from
            :mod:`fisherfunc.losses`.
        spec: group rules: a rule, a (prefix) tree of rules or a callable ``params -> spec``;
            ``None`` infers them from ``loss.model`` with :func:`~fisherfunc.infer_spec`.
        decay: EMA decay ``β`` in ``[0, 1)``; ``0`` makes every step the one-shot batch estimate.
        chunk_size: samples per vectorised chunk (``None``: whole batch at once).
        path: ``"auto"`` (output probes for the linear-like weights that qualify, direct gradients
            elsewhere) or ``"direct"`` (``vmap(grad)`` of every parameter). Both are exact.

    Returns:
        A :class:`FisherStep`: call it, and use ``.init(params)`` for the first state.

    >>> import torch, fisherfunc as ff
    >>> model = torch.nn.Linear(3, 2)
    >>> fisher_step = ff.make_fisher_step(ff.losses.classification(model), decay=0.9)
    >>> params = dict(model.named_parameters())
    >>> state = fisher_step.init(params)
    >>> state = fisher_step(params, (torch.randn(4, 3), torch.randint(0, 2, (4,))), state)
    >>> state.step, state.samples
    (1, 4)
    """
    decay = check_decay(decay)
    check_chunk_size(chunk_size)
    check_path(path)
    return FisherStep(loss=loss, spec=spec, decay=decay, chunk_size=chunk_size, path=path)
