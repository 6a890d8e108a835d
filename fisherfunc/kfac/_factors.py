"""K-FAC factors: one-shot over batches, and an EMA state with bias correction.

For a covered layer with augmented weight ``W̃ = [W | b]`` (``[out, in + 1]``), the per-sample
gradient is ``vec(∇_W̃ L_b) = Σ_t d_bt ⊗ ã_bt`` (row-major ``vec``). The token-normalised Fisher
block ``F = Σ_b vec(∇L_b) vec(∇L_b)ᵀ / Σ_b n_b`` is approximated by ``G ⊗ A``, with one of two
conventions for the T positions of a sequence (Eschenhagen et al. 2023):

``"expand"`` — every position is an example (cross-position terms dropped)::

    A = Σ_{b,t} ã_bt ã_btᵀ / N          N = Σ_b T_b   (positions seen by the layer)
    G = Σ_{b,t} d_bt d_btᵀ / Σ_b n_b

``"reduce"`` — positions are pooled before the outer products::

    ā_b = (1/T_b) Σ_t ã_bt,  d̄_b = Σ_t d_bt        (T_b: the sample's real positions)
    A = Σ_b ā_b ā_bᵀ / B
    G = Σ_b d̄_b d̄_bᵀ / Σ_b n_b

With one position per example both are ``Σ_b (d_b d_bᵀ) ⊗ (ã_b ã_bᵀ) / B`` approximated by
``E[d dᵀ] ⊗ E[ã ãᵀ]``, and exact for one example. ``A`` is an average over positions: the real
ones when the loss knows a padding mask (``mask=`` of :mod:`fisherfunc.losses`, the Hugging Face
losses) and the layer sees those positions, else every position (as the peers do); a padded
position's ``d`` is zero either way. ``G`` carries the Fisher's token normalisation, so
``diag(G ⊗ A)`` is directly comparable with :func:`fisherfunc.fisher`.

Merging estimates of disjoint data is exact: ``A`` by positions, ``G`` by tokens
(:func:`merge`). The EMA state folds per-batch ``A_t``, ``G_t`` as the group-Fisher state does
(:mod:`~fisherfunc._state.ema`): ``m_t = β m_{t−1} + (1 − β) X_t``, read as ``m_t / (1 − β^t)``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from .._engine import loop
from .._engine.batches import Batch, BatchError, as_tree, batch_size, iter_batches
from .._engine.kinds import FisherKind, LabelSets, as_kind, label_sets
from .._engine.nonfinite import NonFiniteError, NonFinitePolicy
from .._engine.numerics import Prepared, prepare, scope
from .._engine.probes import StaleSites, uncoverable
from .._estimate import check_options, precheck
from .._state.ema import bias_correction, check_decay, ema
from ._capture import capture_fn
from ._layers import Layer, LayerShapes, find_layers, one_shot_memo

__all__ = [
    "Approx",
    "KFAC",
    "KFACState",
    "KFACStep",
    "kfac",
    "kfac_and_shapes",
    "make_kfac_step",
    "estimate",
    "merge",
    "check_approx",
    "check_update_every",
    "gram",
]

Approx = Literal["expand", "reduce"]


class KFAC(NamedTuple):
    """K-FAC factors of the covered layers: ``F_layer ≈ G ⊗ A`` (see the module docstring).

    Attributes:
        layers: the covered layers (:class:`~fisherfunc.kfac.Layer`), in forward order.
        A: ``{layer name: [in(+1), in(+1)]}`` input factors (last row/column: the bias's 1).
        G: ``{layer name: [out, out]}`` output-gradient factors, token-normalised.
        positions: ``{layer name: N}``, the positions ``A`` averages over.
        tokens: ``Σ_b n_b``, the tokens ``G`` is normalised by.
        samples: samples seen.
        approx: ``"expand"`` or ``"reduce"``.
        kind: ``"empirical"``, ``"mc"`` or ``"exact"`` (the targets ``d`` was taken at).
        names: every parameter's dotted name (for matching vectors to layers).
    """

    layers: tuple[Layer, ...]
    A: dict[str, Tensor]
    G: dict[str, Tensor]
    positions: dict[str, float]
    tokens: float
    samples: int
    approx: str
    kind: str
    names: tuple[str, ...]


class KFACState(NamedTuple):
    """Running K-FAC factors: raw EMAs of the per-batch ``A_t`` and ``G_t`` (debiased by :func:`estimate`).

    Attributes:
        layers: the covered layers.
        A: ``{layer name: raw EMA of A_t}``.
        G: ``{layer name: raw EMA of G_t}``.
        positions: ``{layer name: positions seen over all steps}``.
        step: steps taken ``t``.
        tokens: tokens seen over all steps.
        samples: samples seen.
        decay: the EMA decay ``β`` in ``[0, 1)``.
        approx: ``"expand"`` or ``"reduce"``.
        kind: the Fisher kind.
        names: every parameter's dotted name.
        calls: calls of the step that returned this state, refreshing the factors or not (with
            ``update_every=k`` the factors are refreshed on calls ``0, k, 2k, …``; ``step`` counts
            the refreshes). A batch refused as non-finite is not counted.
    """

    layers: tuple[Layer, ...]
    A: dict[str, Tensor]
    G: dict[str, Tensor]
    positions: dict[str, float]
    step: int
    tokens: float
    samples: int
    decay: float
    approx: str
    kind: str
    names: tuple[str, ...]
    calls: int = 0


def check_approx(approx: str) -> str:
    """Validate the sequence convention."""
    if approx not in ("expand", "reduce"):
        raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
    return approx


#: :func:`gram` splits its product from this many columns, on the CPU, with at least
#: ``GRAM_ROWS × threads`` rows. Measured (2-core CPU, float32, ms, one product -> split):
#: 1 thread 128×785 1.46 -> 1.14, 1024×257 1.30 -> 1.01; 2 threads 1024×257 0.77 -> 0.72,
#: 1024×1025 10.7 -> 8.7, but 128×785 0.79 -> 0.92 (short products do not use both cores well).
GRAM_SPLIT = 192
GRAM_ROWS = 128


def gram(x: Tensor, out: Tensor | None = None) -> Tensor:
    """``xᵀ x`` (``[n, n]``) of ``x [m, n]``, forming only the upper block row and the lower-right block.

    With ``x = [x₁ | x₂]`` split at ``h = n // 2``::

        xᵀx = [[x₁ᵀx₁, x₁ᵀx₂],        x₁ᵀ x  (the top h rows, one product)
               [x₂ᵀx₁, x₂ᵀx₂]]        x₂ᵀx₁ = (x₁ᵀx₂)ᵀ (copied), x₂ᵀx₂ = gram(x₂) (recursively)

    so the products cost ``3/4`` of ``x.t() @ x``'s ``2 m n²`` FLOPs, less with the recursion.
    Narrow, short or non-CPU inputs take one product (see :data:`GRAM_SPLIT`). Every block is
    written in place into ``out`` (``[n, n]``, rows contiguous; a fresh tensor if ``None``): one
    allocation, no temporaries.
    """
    m, n = x.shape
    if out is None:
        out = x.new_empty(n, n)
    if n < GRAM_SPLIT or x.device.type != "cpu" or m < GRAM_ROWS * torch.get_num_threads():
        return torch.mm(x.t(), x, out=out)
    h = n // 2
    torch.mm(x[:, :h].t(), x, out=out[:h])  # [x₁ᵀx₁ | x₁ᵀx₂]
    gram(x[:, h:], out=out[h:, h:])
    out[h:, :h] = out[:h, h:].t()
    return out


def _outer_statistic(approx: str) -> Callable[[int, Tensor, Tensor], Tensor]:
    """Per-sample ``Σ_t d dᵀ`` (expand) or ``d̄ d̄ᵀ`` (reduce), for the labelled kinds (inside ``vmap``)."""

    def stat(k: int, a: Tensor, d: Tensor) -> Tensor:  # (layer, inputs, output gradients)
        if approx == "reduce":
            d = d.sum(0, keepdim=True)
        return d.t() @ d

    return stat


def _input_factor(layer: Layer, a: Tensor, approx: str, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``Σ ã ãᵀ`` over a chunk's real positions (expand) or samples (reduce), and the count.

    ``mask [c, T]`` (1 = real token) leaves padded positions out; ``None`` counts every position.
    With a bias, ``ã = [r, e]`` is never formed: its rows ``r`` are zero wherever ``e`` is (``e``
    is 1 for a real row, 0 for a padded position or a sample without one), so::

        Σ ã ãᵀ = [[Σ r rᵀ, Σ r],
                  [Σ rᵀ,   Σ e]]
    """
    if mask is None:  # every position: e = 1
        rows = a.mean(1) if approx == "reduce" else a.reshape(-1, a.shape[-1])
        count = real = a.new_tensor(float(rows.shape[0]))
    else:
        m = mask.to(a.dtype).unsqueeze(-1)  # [c, T, 1]
        if approx == "reduce":  # ā_b = Σ_t m_t ã_bt / max(Σ_t m_t, 1): its last entry is 1, or 0 without real positions
            rows = (a * m).sum(1) / m.sum(1).clamp_min(1.0)
            count, real = a.new_tensor(float(rows.shape[0])), (m.sum(1) > 0).sum().to(a.dtype)
        else:  # Σ_t m_t ã_t ã_tᵀ = (m ã)ᵀ (m ã), as m_t ∈ {0, 1}
            rows = (a * m).reshape(-1, a.shape[-1])
            count = real = m.sum()
    if layer.bias is None:
        return gram(rows), count
    n = rows.shape[1]
    out = rows.new_empty(n + 1, n + 1)
    gram(rows, out=out[:n, :n])
    column = rows.sum(0)
    out[:n, n] = column
    out[n, :n] = column
    out[n, n] = real
    return out, count


def _position_mask(loss: Any, chunk: Any, layer: Layer) -> Tensor | None:
    """The loss's padding mask ``[c, T]`` if the layer sees exactly those T positions, else ``None``."""
    mask_of = getattr(loss, "mask_of", None)
    mask = mask_of(chunk) if mask_of is not None else None
    if not isinstance(mask, Tensor) or mask.ndim != 2:
        return None
    lead = [n for n in layer.out_shape[:-1] if n != 1]  # e.g. (1, T) when the loss keeps a batch axis of 1
    if layer.positions != mask.shape[1] or len(lead) > 1:
        return None
    return mask != 0


def _factor_names(layers: Sequence[Layer]) -> list[str]:
    """The names of the summed values, for error messages: ``A[layer]``, ``G[layer]``, ``positions[layer]``."""
    return [f"{field}[{x.name}]" for field in ("A", "G", "positions") for x in layers]


def _factor_sums(
    loss: Any, params: Prepared, layers: tuple[Layer, ...], approx: str, labels: LabelSets | None
) -> loop.ChunkFns:
    """A chunk's ``Σ ã ãᵀ``, ``Σ d dᵀ`` and positions of every layer (the values of :func:`_factor_names`)."""
    run = capture_fn(loss, params, layers, labels=labels, statistic=_outer_statistic(approx))

    def sums(source: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        chunk = source if labels is None else source[0]
        inputs, outputs, n = run(source)
        A, G, positions = [], [], []
        for k, layer in enumerate(layers):
            part, count = _input_factor(layer, inputs[k], approx, _position_mask(loss, chunk, layer))
            A.append(part)
            positions.append(count)
            if labels is not None:  # the per-sample Σ_j w_j (d dᵀ), summed over the chunk
                G.append(outputs[k].sum(0))
            else:
                d = outputs[k].sum(1) if approx == "reduce" else outputs[k].reshape(-1, layer.out_features)
                G.append(gram(d))
        return (*A, *G, *positions), n

    return loop.ChunkFns(loop.one_by_one(sums), sums)


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
    """What one call needs for every batch: the prepared params, the layers, their shapes per batch."""

    loss: Any
    params: Prepared
    layers: tuple[Layer, ...]
    shapes: LayerShapes
    checked: Batch | None = None  # the batch already prechecked (by identity): not checked twice

    @classmethod
    def discover(
        cls,
        loss: Any,
        params: Any,
        first: Batch,
        patterns: Sequence[str] | None,
        memo: dict[tuple, tuple[Layer, ...]] | None = None,
    ) -> _Plan:
        """Prepare ``params`` and find the covered layers on the first batch's first sample (checked first).

        ``memo``: layers and shapes kept across calls (a step's, or the loss's one-shot memo).
        """
        precheck(loss, first)
        prepared = prepare(params)
        layers = find_layers(loss, prepared, first, patterns, memo)
        return cls(loss, prepared, layers, LayerShapes(loss, prepared, layers, first=first, memo=memo), first)


def _fold(
    plan: _Plan,
    batches: Batch | Iterable[Batch],
    approx: str,
    chunk_size: int | None,
    labels: LabelSets | None,
    generator: torch.Generator | None,
    nonfinite: NonFinitePolicy,
    *,
    rediscover: bool = True,
) -> loop.Totals:
    """Exact sums of every layer's ``Σ ã ãᵀ``, ``Σ d dᵀ`` and positions over the batches (one chunk loop).

    ``rediscover``: a batch whose kept shapes went stale (:class:`StaleSites`) is computed again on
    shapes discovered anew; ``False`` lets the error propagate (the caller starts over).
    """
    names = _factor_names(plan.layers)

    def compute(batch: Batch) -> tuple[list[Tensor], float, int]:
        size = batch_size(batch) if batch is plan.checked else precheck(plan.loss, batch)
        source = batch if labels is None else (batch, labels.draw(batch, generator))

        def run() -> tuple[list[Tensor], float]:
            fns = _factor_sums(plan.loss, plan.params, plan.shapes(batch), approx, labels)
            with scope(plan.params.device_types):  # the factors' products: no outer autocast either
                return loop.batch_sums(fns, source, size, chunk_size, names)

        try:
            sums, tokens = run()
        except StaleSites:  # the model's calls changed since the shapes were kept: discover again
            if not rediscover:
                raise
            plan.shapes.forget(batch)
            try:
                sums, tokens = run()
            except StaleSites as exc:  # stale right after discovery: the model calls the layers differently
                raise uncoverable(exc, plan.params.names) from exc
        return sums, tokens, size

    return loop.fold(batches, compute, nonfinite=nonfinite)


def _first(batches: Batch | Iterable[Batch]) -> tuple[Batch, Batch | Iterable[Batch]]:
    """The first batch (to discover the layers on) and the batches to fold, iterators included."""
    if isinstance(batches, (Tensor, tuple, Mapping)):
        first = as_tree(batches)
        batch_size(first)
        return first, first
    items = iter_batches(batches)
    try:
        first = next(items)
    except StopIteration:
        raise BatchError("no batches were given") from None
    batch_size(first)
    return first, itertools.chain([first], items)


def kfac(
    loss: Any,
    params: Any,
    batches: Any,
    *,
    approx: Approx = "expand",
    layers: Sequence[str] | None = None,
    chunk_size: int | None = None,
    kind: FisherKind | str = "empirical",
    nonfinite: NonFinitePolicy = "raise",
) -> KFAC:
    """K-FAC factors of one batch or an iterable of batches (exact sums, then normalised).

    Args:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        params: pytree of parameter tensors (e.g. ``dict(model.named_parameters())``); not modified.
        batches: one batch or an iterable of batches.
        approx: ``"expand"`` or ``"reduce"`` (identical for one position per example).
        layers: glob patterns of the weight names to cover (``None``: every weight used once by
            ``F.linear`` / ``torch.addmm`` / ``F.conv1d`` / ``F.conv2d``).
        chunk_size: samples per vectorised chunk (``None``: a whole batch).
        kind: ``fisherfunc.Empirical()``, ``MC(samples=k, seed=s)`` or ``Exact()``; ``G`` is taken
            at those targets, ``A`` does not depend on them.
        nonfinite: a batch with NaN/Inf inputs or output gradients is refused with a
            :class:`~fisherfunc.NonFiniteError` naming the factors (``"raise"``) or left out
            (``"skip"``); nothing of it reaches the factors either way.

    Returns:
        :class:`KFAC` with float32 factors (float64 for float64 params).

    >>> import torch, fisherfunc as ff
    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> F = ff.kfac.kfac(ff.losses.classification(model), dict(model.named_parameters()), (x, y))
    >>> F.A["weight"].shape, F.G["weight"].shape   # [in + 1 (bias), in + 1], [out, out]
    (torch.Size([5, 5]), torch.Size([3, 3]))
    """
    return kfac_and_shapes(
        loss, params, batches, approx=approx, layers=layers, chunk_size=chunk_size, kind=kind, nonfinite=nonfinite
    )[0]


def kfac_and_shapes(
    loss: Any,
    params: Any,
    batches: Any,
    *,
    approx: Approx = "expand",
    layers: Sequence[str] | None = None,
    chunk_size: int | None = None,
    kind: FisherKind | str = "empirical",
    nonfinite: NonFinitePolicy = "raise",
) -> tuple[KFAC, LayerShapes]:
    """:func:`kfac`, and the layers' shapes it discovered (for a second pass over the same batches)."""
    check_approx(approx)
    check_options(chunk_size=chunk_size, nonfinite=nonfinite)
    kind = as_kind(kind)
    labels = label_sets(loss, kind)
    # layers and shapes kept for this loss by earlier calls, unless the batches can be read only once
    memo = None if isinstance(batches, Iterator) else one_shot_memo(loss)
    first, rest = _first(batches)
    plan = _Plan.discover(loss, params, first, layers, memo)
    try:
        totals = _fold(plan, rest, approx, chunk_size, labels, kind.draws(), nonfinite, rediscover=memo is None)
    except StaleSites:  # what was kept went stale (the model's calls changed): start over, discovering
        assert memo is not None
        memo.clear()
        first, rest = _first(batches)
        plan = _Plan.discover(loss, params, first, layers)
        totals = _fold(plan, rest, approx, chunk_size, labels, kind.draws(), nonfinite)
    if totals.sums is None:
        raise NonFiniteError.all_skipped(totals.skipped)
    found = plan.layers
    count = len(found)
    A, G, positions = totals.sums[:count], totals.sums[count : 2 * count], totals.sums[2 * count :]
    factors = KFAC(
        layers=found,
        A={x.name: s.div_(float(n)) for x, s, n in zip(found, A, positions)},
        G={x.name: s.div_(totals.tokens) for x, s in zip(found, G)},
        positions={x.name: float(n) for x, n in zip(found, positions)},
        tokens=totals.tokens,
        samples=totals.samples,
        approx=approx,
        kind=kind.name,
        names=plan.params.names,
    )
    return factors, plan.shapes


def merge(first: KFAC, *others: KFAC) -> KFAC:
    """K-FAC factors of the union of disjoint data: ``A`` weighted by positions, ``G`` by tokens (exact).

    Raises:
        ValueError: if the estimates cover different layers or use different conventions or kinds.
    """
    items = (first, *others)
    for i, item in enumerate(items[1:], 1):
        for field in ("layers", "approx", "kind", "names"):
            if getattr(item, field) != getattr(first, field):
                raise ValueError(f"K-FAC estimate {i} differs from estimate 0 in {field!r}; only alike estimates merge")
    tokens = sum(x.tokens for x in items)
    out_A: dict[str, Tensor] = {}
    out_G: dict[str, Tensor] = {}
    out_n: dict[str, float] = {}
    for layer in first.layers:
        n = sum(x.positions[layer.name] for x in items)
        out_A[layer.name] = torch.stack([x.A[layer.name] * (x.positions[layer.name] / n) for x in items]).sum(0)
        out_G[layer.name] = torch.stack([x.G[layer.name] * (x.tokens / tokens) for x in items]).sum(0)
        out_n[layer.name] = n
    return first._replace(A=out_A, G=out_G, positions=out_n, tokens=tokens, samples=sum(x.samples for x in items))


# --- the EMA state --------------------------------------------------------------------------------


def check_update_every(update_every: int) -> int:
    """Validate ``update_every``: a positive ``int`` (not a ``bool``)."""
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"update_every must be a positive int (refresh every k-th call), got {update_every!r}")
    return update_every


@dataclasses.dataclass(frozen=True, eq=False)
class KFACStep:
    """A configured, pure K-FAC step (built by :func:`make_kfac_step`): ``state = step(params, batch, state)``.

    Attributes:
        loss: per-sample loss.
        decay: the EMA decay ``β``.
        approx: ``"expand"`` or ``"reduce"``.
        layers: glob patterns of the covered weights (``None``: all that qualify).
        chunk_size: samples per vectorised chunk.
        kind: the Fisher kind value; an ``MC`` with a seed draws step ``t`` from ``(seed, t)``.
        nonfinite: ``"raise"`` or ``"skip"`` (then the state only counts nothing: it is returned as is).
        update_every: refresh the factors on every ``k``-th call (``state.calls % k == 0``); the
            other calls return the state with only ``calls`` advanced.
    """

    loss: Any
    decay: float
    approx: str
    layers: Sequence[str] | None
    chunk_size: int | None
    kind: FisherKind
    nonfinite: NonFinitePolicy = "raise"
    update_every: int = 1
    # the layers' shapes discovered by earlier calls, by sample shapes, loss, params' shapes and
    # modes (a memo: the step's results do not depend on it; see LayerShapes.key)
    _shapes: dict[tuple, tuple[Layer, ...]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        check_update_every(self.update_every)

    def init(self, params: Any, example: Any) -> KFACState:
        """A fresh state (zero EMAs, step 0); ``example`` is a batch used only to find the layers' shapes."""
        batch = as_tree(example)
        batch_size(batch)
        plan = _Plan.discover(self.loss, params, batch, self.layers, memo=self._shapes)
        prepared, found = plan.params, plan.layers
        device = prepared.leaves[found[0].weight].device
        return KFACState(
            layers=found,
            A={x.name: torch.zeros(x.a_dim, x.a_dim, dtype=prepared.dtype, device=device) for x in found},
            G={x.name: torch.zeros(x.out_features, x.out_features, dtype=prepared.dtype, device=device) for x in found},
            positions={x.name: 0.0 for x in found},
            step=0,
            tokens=0.0,
            samples=0,
            decay=self.decay,
            approx=self.approx,
            kind=self.kind.name,
            names=prepared.names,
        )

    def __call__(self, params: Any, batch: Any, state: KFACState) -> KFACState:
        """Fold one batch's ``A_t`` and ``G_t`` into the EMA; returns a new state (``state`` is untouched).

        With ``update_every=k`` only calls with ``state.calls % k == 0`` compute: the others read
        neither ``params`` nor ``batch`` and return ``state._replace(calls=state.calls + 1)`` — the
        EMAs, ``step`` (so the bias correction ``1 − β^step`` of :func:`estimate`), tokens and
        samples are those of the last refresh. ``k`` calls thus cost one refresh: the state after
        calls ``0 … n−1`` equals, but for ``calls``, the state of a ``k = 1`` step called on
        batches ``0, k, 2k, …`` only.

        Raises:
            ValueError: a state made with another decay, convention, kind or for other parameters.
            NonFiniteError: under ``nonfinite="raise"``, a batch with NaN/Inf values (the state is
                untouched; under ``"skip"`` it is returned as it was, ``calls`` included, so the
                next call refreshes).
        """
        if not isinstance(state, KFACState):
            raise TypeError(f"state must be a KFACState (from step.init), got {type(state).__name__}")
        for field, mine in (("decay", self.decay), ("approx", self.approx), ("kind", self.kind.name)):
            if getattr(state, field) != mine:
                raise ValueError(f"the state has {field}={getattr(state, field)!r}, this step {mine!r}")
        if state.calls % self.update_every:  # an amortised call: the factors of the last refresh stand
            return state._replace(calls=state.calls + 1)
        batch = as_tree(batch)
        batch_size(batch)
        prepared = prepare(params)
        if prepared.names != state.names:
            raise ValueError("the state was made for other parameters (their names differ)")
        for layer in state.layers:
            w = prepared.leaves[layer.weight]
            if tuple(w.shape) != layer.weight_shape:
                raise ValueError(
                    f"parameter '{layer.name}' has shape {tuple(w.shape)}, the state expects {layer.weight_shape}"
                )
        shapes = LayerShapes(self.loss, prepared, state.layers, memo=self._shapes)
        plan = _Plan(self.loss, prepared, state.layers, shapes)
        labels = label_sets(self.loss, self.kind)
        generator = self.kind.draws(step=state.step)
        totals = _fold(plan, batch, self.approx, self.chunk_size, labels, generator, self.nonfinite)
        if totals.sums is None:  # skipped as non-finite
            return state
        count = len(state.layers)
        A, G, positions = totals.sums[:count], totals.sums[count : 2 * count], totals.sums[2 * count :]
        # m_t = β m_{t−1} + (1 − β) X_t, with X_t = A_t = Σ ã ãᵀ / positions and G_t = Σ d dᵀ / tokens
        # (the division folded into the update, in place on this call's own sums: no tensor allocated)
        # (each sum a fresh tensor of this call, see _factor_sums)
        beta, layers = self.decay, state.layers
        return state._replace(
            A={x.name: ema(state.A[x.name], s, beta, float(n), owned=True) for x, s, n in zip(layers, A, positions)},
            G={x.name: ema(state.G[x.name], s, beta, totals.tokens, owned=True) for x, s in zip(layers, G)},
            positions={x.name: state.positions[x.name] + float(n) for x, n in zip(state.layers, positions)},
            step=state.step + 1,
            tokens=state.tokens + totals.tokens,
            samples=state.samples + totals.samples,
            calls=state.calls + 1,
        )


def make_kfac_step(
    loss: Any,
    *,
    decay: float = 0.95,
    approx: Approx = "expand",
    layers: Sequence[str] | None = None,
    chunk_size: int | None = None,
    kind: FisherKind | str = "empirical",
    nonfinite: NonFinitePolicy = "raise",
    update_every: int = 1,
) -> KFACStep:
    """Bind a loss, decay and convention into a pure ``kfac_step(params, batch, state) -> state``.

    Arguments as for :func:`kfac`; ``decay`` is the EMA decay ``β`` in ``[0, 1)`` (``0``: each
    step is the one-shot batch estimate). ``kind=MC(samples=k, seed=s)`` draws step ``t`` from a
    generator seeded by ``(s, t)``, so a run is reproducible.

    ``update_every=k`` (a positive int) amortises the factors: calls ``0, k, 2k, …`` (counted by
    ``state.calls``) compute ``A_t``, ``G_t`` and fold them in; the calls between return the state
    unchanged but for ``calls`` (see :meth:`KFACStep.__call__`). The step keeps the layers' shapes
    found by earlier calls (per sample shape), so a steady-state call runs no discovery forward.

    Raises:
        ValueError: a bad ``decay``, ``approx``, ``chunk_size``, ``nonfinite`` or ``update_every``
            (before anything is computed).

    >>> import torch, fisherfunc as ff
    >>> model = torch.nn.Linear(4, 3)
    >>> params = dict(model.named_parameters())
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> step = ff.kfac.make_kfac_step(ff.losses.classification(model), update_every=2)
    >>> state = step.init(params, (x, y))
    >>> for _ in range(3):
    ...     state = step(params, (x, y), state)
    >>> state.calls, state.step    # calls 0 and 2 refreshed the factors
    (3, 2)
    """
    update_every = check_update_every(update_every)
    decay = check_decay(decay)
    check_approx(approx)
    check_options(chunk_size=chunk_size, nonfinite=nonfinite)
    kind = as_kind(kind)
    label_sets(loss, kind)  # validate early
    return KFACStep(loss, decay, approx, layers, chunk_size, kind, nonfinite, update_every)


def estimate(state: KFACState) -> KFAC:
    """The bias-corrected factors ``m_t / (1 − β^t)`` as a :class:`KFAC`.

    Raises:
        ValueError: if the state has taken no step yet.
    """
    if state.step == 0:
        raise ValueError("the state has taken no step yet; call kfac_step(params, batch, state) first")
    c = bias_correction(state.decay, state.step)
    return KFAC(
        layers=state.layers,
        A={k: v / c for k, v in state.A.items()},
        G={k: v / c for k, v in state.G.items()},
        positions=dict(state.positions),
        tokens=state.tokens,
        samples=state.samples,
        approx=state.approx,
        kind=state.kind,
        names=state.names,
    )
