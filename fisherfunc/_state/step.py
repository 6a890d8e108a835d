"""``make_fisher_step``: bind a loss, spec and decay into a pure ``fisher_step``.

    fisher_step = make_fisher_step(loss, spec=spec, decay=0.99)
    state = fisher_step.init(params)
    state = fisher_step(params, batch, state)      # a new state; the old one is untouched

Each call computes the token-normalised Fisher of the batch, ``F̂_t = Σ_b s_b / Σ_b n_b``, and
folds it into the EMA ``m_t = β m_{t−1} + (1 − β) F̂_t`` (:mod:`~fisherfunc._state.ema`).

``precision`` is how a step computes, not what it estimates: a state records no precision, and a
state made under ``"float32"`` may be continued under ``"model"`` (or the reverse) — the steps then
differ only by the low-precision forward's rounding (docs/precision.md measures it). The budget's
chunk plans (``max_memory``) are kept across steps, per sample shape, like the probe sites, and so
is the resolved spec, while the params' shapes and the rules (or the model) stay the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optree
import torch

from .._engine.batches import Batch, BatchError
from .._engine.group_sums import GradientPath, Site
from .._engine.kinds import Empirical, FisherKind, as_kind, label_sets
from .._engine.nonfinite import NonFiniteError, NonFinitePolicy
from .._engine.numerics import Precision
from .._engine.vectorise import PerSampleLoss
from .._estimate import Accumulator, batch_accumulator, check_options, resolve_for
from .._naming import few
from .._spec.memo import SpecMemo
from .._spec.resolve import ResolvedSpec, named_rules
from .._spec.rules import SpecError, is_rule
from .codec import Scaled
from .ema import check_decay
from .state import FisherState, ema_update, init_state

__all__ = ["FisherStep", "make_fisher_step"]


def _check_state(state: FisherState, resolved: ResolvedSpec, decay: float) -> None:
    """Refuse a state made for another decay, other parameters or other rules, naming what differs."""
    if state.decay != decay:
        raise SpecError(f"the state has decay {state.decay}, but this fisher_step uses decay {decay}")
    made_for = named_rules(state.spec)
    missing = [n for n in resolved.names if n not in made_for]
    extra = [n for n in made_for if n not in resolved.names]
    if missing or extra:
        parts = ([f"params have {few(missing)} that the state lacks"] if missing else []) + (
            [f"the state has {few(extra)} that params lack"] if extra else []
        )
        raise SpecError("the state was made for other parameters: " + "; ".join(parts))
    for name, rule in zip(resolved.names, resolved.rules, strict=True):
        if made_for[name] != rule:
            raise SpecError(
                f"parameter '{name}': the state was made with {made_for[name]!r}, but this fisher_step uses {rule!r}"
            )
    treespec = optree.tree_structure(state.spec, is_leaf=is_rule)
    if treespec != resolved.treespec:
        raise SpecError(f"the state's tree structure {treespec} differs from the params' {resolved.treespec}")
    stored_shapes = optree.tree_map(lambda m: m.mantissa if isinstance(m, Scaled) else m, state.ema)
    resolved.flatten_groups(stored_shapes, what="state.ema")


@dataclasses.dataclass(frozen=True, eq=False)
class FisherStep:
    """A configured, pure Fisher step (built by :func:`make_fisher_step`).

    Attributes:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        spec: group rules (``None``: inferred from ``loss.model`` on each call).
        decay: EMA decay ``β`` in ``[0, 1)``.
        chunk_size: samples per vectorised chunk (``None``: whole batch).
        path: ``"auto"`` (output probes where possible) or ``"direct"``; both exact.
        kind: the Fisher kind value (:class:`~fisherfunc.Empirical`, :class:`~fisherfunc.MC`,
            :class:`~fisherfunc.Exact`). An ``MC`` with a seed draws step ``t``'s labels from
            ``(seed, t)``, so a step is a pure function of ``(params, batch, state)``.
        nonfinite: ``"raise"`` or ``"skip"`` a batch with NaN/Inf per-sample values.
        precision: ``"float32"`` or ``"model"`` (see :func:`~fisherfunc.fisher`).
        max_memory: a memory budget that picks the chunk size (bytes, or e.g. ``"8GiB"``), or ``None``.
    """

    loss: PerSampleLoss
    spec: Any
    decay: float
    chunk_size: int | None
    path: GradientPath = "auto"
    kind: FisherKind = Empirical()
    nonfinite: NonFinitePolicy = "raise"
    precision: Precision = "float32"
    max_memory: int | str | None = None
    # probe sites discovered by earlier calls, by sample shapes, spec and modes (a memo: the
    # step's results do not depend on it; see fisherfunc._engine.group_sums.GroupSums)
    _discovered: dict[tuple, tuple[Site, ...]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # the budget's chunk size per sample shape (a memo; see fisherfunc._engine.budget)
    _plans: dict[Any, int] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    # the resolved spec, reused while the params' shapes and the rules (or the model) are unchanged
    # (a memo; see fisherfunc._spec.memo)
    _specs: SpecMemo = dataclasses.field(default_factory=SpecMemo, init=False, repr=False, compare=False)

    @property
    def chunk_plans(self) -> dict[Any, int]:
        """The chunk size ``max_memory`` planned for each sample shape seen so far (a copy; empty without a budget).

        Keys are the samples' ``((shape, dtype), ...)`` per batch entry, batch dimension removed.
        """
        return dict(self._plans)

    def init(
        self, params: Any, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> FisherState:
        """A fresh state for ``params`` (zero EMA, step 0), stored in ``dtype`` on ``device``.

        See :func:`~fisherfunc.init_state` and :mod:`fisherfunc.storage` for the storage policy.
        """
        resolved = resolve_for(self.loss, params, self.spec, self._specs)
        return init_state(
            params, spec=resolved.rule_tree(), decay=self.decay, dtype=dtype, device=device, kind=self.kind
        )

    def __call__(self, params: Any, batch: Batch, state: FisherState) -> FisherState:
        """Fold one batch into ``state``; returns a new :class:`FisherState`.

        Args:
            params: pytree of parameter tensors (not modified).
            batch: one batch (tuple or mapping of tensors with a leading batch dimension).
            state: the current state (not modified).

        Raises:
            SpecError: if ``state`` was made for other parameters, rules, decay or Fisher kind.
            BatchError: for a malformed batch or one with no tokens (before any model call).
            NonFiniteError: with ``nonfinite="raise"``, for NaN/Inf per-sample values, naming
                the parameters and samples; with ``"skip"`` the result is ``state`` with
                ``skipped`` increased by one and nothing else changed.
        """
        try:
            acc = self.batch_sums(params, batch, state)
        except NonFiniteError:
            if self.nonfinite == "raise":
                raise
            return state._replace(skipped=state.skipped + 1)
        return self._fold(state, acc, owned=True)  # the sums are this call's own: updated in place

    def batch_sums(self, params: Any, batch: Batch, state: FisherState, *, stream: int = 0) -> Accumulator:
        """The batch's exact sums ``Σ_b s_b``, ``Σ_b n_b``, ``B``, after checking ``state`` (no update).

        ``fisher_step(params, batch, state) == fisher_step.update(state, fisher_step.batch_sums(...))``
        for a finite batch; :mod:`fisherfunc.distributed` sums the middle term over processes.
        ``stream`` (``MC`` with a seed) selects independent draws for the same step —
        :mod:`fisherfunc.distributed` passes each process's rank, so shards do not share noise.

        Raises:
            NonFiniteError: for NaN/Inf per-sample values, whatever the policy.
        """
        if not isinstance(state, FisherState):
            raise TypeError(f"state must be a FisherState (from fisher_step.init(params)), got {type(state).__name__}")
        resolved = resolve_for(self.loss, params, self.spec, self._specs)
        _check_state(state, resolved, self.decay)
        if state.kind != self.kind.name:
            raise SpecError(
                f"the state holds a {state.kind!r} Fisher, but this fisher_step computes {self.kind.name!r}"
            )
        if isinstance(batch, list):  # one batch as a DataLoader yields it ([x, y]), not a list of batches
            batch = tuple(batch)
        return batch_accumulator(
            self.loss,
            params,
            batch,
            spec=resolved,
            chunk_size=self.chunk_size,
            path=self.path,
            kind=self.kind,
            nonfinite="raise",
            precision=self.precision,
            max_memory=self.max_memory,
            generator=self.kind.draws(step=state.step, stream=stream),
            discovered=self._discovered,
            plans=self._plans,
        )

    def update(self, state: FisherState, acc: Accumulator) -> FisherState:
        """Fold a batch's sums into ``state``: ``F̂_t = Σ_b s_b / Σ_b n_b``, then the EMA update.

        Raises:
            BatchError: if ``acc`` has no tokens (an empty or all-skipped accumulator).
        """
        return self._fold(state, acc, owned=False)  # acc is the caller's: left as it is

    def _fold(self, state: FisherState, acc: Accumulator, *, owned: bool) -> FisherState:
        if not acc.tokens > 0:
            raise BatchError(f"the accumulator has {acc.tokens} tokens: there is no batch Fisher to fold in")
        # F̂_t = Σ_b s_b / Σ_b n_b
        return ema_update(state, acc.sums, acc.tokens, acc.samples, divisor=acc.tokens, owned=owned)


def make_fisher_step(
    loss: PerSampleLoss,
    *,
    spec: Any = None,
    decay: float = 0.99,
    chunk_size: int | None = None,
    path: GradientPath = "auto",
    kind: FisherKind | str = "empirical",
    nonfinite: NonFinitePolicy = "raise",
    precision: Precision = "float32",
    max_memory: int | str | None = None,
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
        kind: ``fisherfunc.Empirical()`` (dataset labels; the default), ``fisherfunc.MC(samples=k,
            seed=s)`` (labels sampled from the model: step ``t`` draws from ``(s, t)``; with
            ``generator=`` instead, the generator is advanced by every call) or
            ``fisherfunc.Exact()`` (expectation over classes); ``"empirical"`` / ``"exact"`` are
            shorthands. The states record its name (``state.kind``), and a state of another kind is
            refused.
        nonfinite: a batch whose per-sample values contain NaN or Inf is refused with a
            :class:`~fisherfunc.NonFiniteError` naming the parameters and samples (``"raise"``, the
            default) or skipped and counted in ``state.skipped`` (``"skip"``); either way the state
            is not otherwise changed.
        precision: ``"float32"`` (the default: forward and backward in float32) or ``"model"``
            (in the model's own dtype, no parameter copied; float32 squares, sums and state). Not
            recorded in the state: a state may be continued under the other policy.
        max_memory: a budget (bytes, or a string such as ``"8GiB"``) from which the chunk size
            is planned per sample shape, once, and kept across steps; ``chunk_size`` is its cap.

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
    check_options(chunk_size=chunk_size, path=path, nonfinite=nonfinite, precision=precision, max_memory=max_memory)
    kind = as_kind(kind)
    label_sets(loss, kind)  # a kind the loss cannot compute is refused now, not at the first step
    return FisherStep(
        loss=loss,
        spec=spec,
        decay=decay,
        chunk_size=chunk_size,
        path=path,
        kind=kind,
        nonfinite=nonfinite,
        precision=precision,
        max_memory=max_memory,
    )
