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
from .estimate import accumulate, resolve_for
from .per_sample import PerSampleLoss
from .rules import SpecError
from .spec import resolve_spec
from .state import FisherState, check_decay, ema_update, init_state

__all__ = ["FisherStep", "make_fisher_step"]


@dataclasses.dataclass(frozen=True, eq=False)
class FisherStep:
    """A configured, pure Fisher step (built by :func:`make_fisher_step`).

    Attributes:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        spec: group rules (``None``: inferred from ``loss.model`` on each call).
        decay: EMA decay ``β`` in ``[0, 1)``.
        chunk_size: samples per vectorised chunk (``None``: whole batch).
    """

    loss: PerSampleLoss
    spec: Any
    decay: float
    chunk_size: int | None

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
        if state.decay != self.decay:
            raise SpecError(f"the state has decay {state.decay}, but this fisher_step uses decay {self.decay}")
        if not resolve_spec(state.spec, params).same_as(resolved):
            raise SpecError("the state was made for other parameters or rules than this fisher_step uses")
        resolved.flatten_groups(state.ema, what="state.ema")
        acc = accumulate(self.loss, params, batch, spec=resolved, chunk_size=self.chunk_size)
        batch_fisher = optree.tree_map(lambda s: s / acc.tokens, acc.sums)
        return ema_update(state, batch_fisher, acc.tokens, acc.samples)


def make_fisher_step(
    loss: PerSampleLoss,
    *,
    spec: Any = None,
    decay: float = 0.99,
    chunk_size: int | None = None,
) -> FisherStep:
    """Bind configuration into a pure ``fisher_step(params, batch, state) -> state``.

    Args:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``, e.g. from
            :mod:`fisherfunc.losses`.
        spec: group rules: a rule, a (prefix) tree of rules or a callable ``params -> spec``;
            ``None`` infers them from ``loss.model`` with :func:`~fisherfunc.infer_spec`.
        decay: EMA decay ``β`` in ``[0, 1)``; ``0`` makes every step the one-shot batch estimate.
        chunk_size: samples per vectorised chunk (``None``: whole batch at once).

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
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return FisherStep(loss=loss, spec=spec, decay=decay, chunk_size=chunk_size)
