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
(:mod:`fisherfunc.state`): ``m_t = β m_{t−1} + (1 − β) X_t``, read as ``m_t / (1 − β^t)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import optree
import torch
from torch import Tensor

from ..batch import BatchError, as_tree, batch_size, cast_floating, iter_batches, take
from ..estimate import _precheck, check_chunk_size
from ..kinds import DEFAULT_MAX_CLASSES, FisherKind, LabelSets, resolve_kind, step_generator
from ..state import bias_correction, check_decay
from .capture import capture_fn
from .layers import Layer, LayerShapes, ParamLeaves, discover_layers, flatten_params

__all__ = ["Approx", "KFAC", "KFACState", "KFACStep", "kfac", "make_kfac_step", "estimate", "merge", "check_approx"]

Approx = Literal["expand", "reduce"]


class KFAC(NamedTuple):
    """K-FAC factors of the covered layers: ``F_layer ≈ G ⊗ A`` (see the module docstring).

    Attributes:
        layers: the covered layers (:class:`~fisherfunc.kfac.layers.Layer`), in forward order.
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


def check_approx(approx: str) -> str:
    """Validate the sequence convention."""
    if approx not in ("expand", "reduce"):
        raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
    return approx


def _augment(a: Tensor) -> Tensor:
    """``ã = [a, 1]`` along the last axis."""
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


def _outer_statistic(approx: str) -> Callable[[int, Tensor, Tensor], Tensor]:
    """Per-sample ``Σ_t d dᵀ`` (expand) or ``d̄ d̄ᵀ`` (reduce), for the labelled kinds (inside ``vmap``)."""

    def stat(k: int, a: Tensor, d: Tensor) -> Tensor:  # (layer, inputs, output gradients)
        if approx == "reduce":
            d = d.sum(0, keepdim=True)
        return d.t() @ d

    return stat


@dataclasses.dataclass
class _Sums:
    """Exact running sums over batches (one call); ``None`` until a batch is committed."""

    A: list[Tensor | None]
    G: list[Tensor | None]
    positions: list[float]
    tokens: float = 0.0
    samples: int = 0


def _add(total: Tensor | None, part: Tensor) -> Tensor:
    """``total + part``, in place when ``total`` is ours (``None``: the first part itself)."""
    return part if total is None else total.add_(part)


def _input_factor(layer: Layer, a: Tensor, approx: str, mask: Tensor | None) -> tuple[Tensor, float]:
    """``Σ ã ãᵀ`` over a chunk's real positions (expand) or samples (reduce), and the count.

    ``mask [c, T]`` (1 = real token) leaves padded positions out; ``None`` counts every position.
    """
    if layer.bias is not None:
        a = _augment(a)
    if mask is None:  # every position
        a = a.mean(1) if approx == "reduce" else a.reshape(-1, a.shape[-1])
        return a.t() @ a, float(a.shape[0])
    m = mask.to(a.dtype).unsqueeze(-1)  # [c, T, 1]
    if approx == "reduce":  # ā_b = Σ_t m_t ã_bt / Σ_t m_t
        a = (a * m).sum(1) / m.sum(1).clamp_min(1.0)
        return a.t() @ a, float(a.shape[0])
    weighted = (a * m).reshape(-1, a.shape[-1])
    return weighted.t() @ a.reshape(-1, a.shape[-1]), float(m.sum())


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


def _batch_sums(
    loss: Any,
    params: ParamLeaves,
    layers: tuple[Layer, ...],
    batch: Any,
    approx: str,
    chunk_size: int | None,
    labels: LabelSets | None,
    generator: torch.Generator | None,
    sums: _Sums,
    shapes: LayerShapes | None = None,
) -> None:
    """Add one batch's ``Σ ã ãᵀ``, ``Σ d dᵀ``, positions, tokens and samples to ``sums``.

    Nothing is added unless the whole batch is computed and finite.
    """
    size, _ = _precheck(loss, batch)
    layers = (shapes or LayerShapes(loss, params, layers))(batch)
    run = capture_fn(loss, params, layers, labels=labels, statistic=_outer_statistic(approx))
    source = batch if labels is None else (batch, labels.draw(batch, generator))
    step = size if chunk_size is None else chunk_size
    A: list[Tensor | None] = [None] * len(layers)  # this batch's sums (committed at the end)
    G: list[Tensor | None] = [None] * len(layers)
    positions = [0.0] * len(layers)
    tokens = 0.0
    for start in range(0, size, step):
        chunk = take(batch, start, min(start + step, size))
        inputs, outputs, n = run(chunk if labels is None else take(source, start, min(start + step, size)))
        for k, layer in enumerate(layers):
            part, count = _input_factor(layer, inputs[k], approx, _position_mask(loss, chunk, layer))
            A[k] = _add(A[k], part)
            positions[k] += count
            if labels is not None:
                G[k] = _add(G[k], outputs[k].sum(0))  # the per-sample Σ_j w_j (d dᵀ), summed over the chunk
            else:
                d = outputs[k].sum(1) if approx == "reduce" else outputs[k].reshape(-1, layer.out_features)
                G[k] = _add(G[k], d.t() @ d)
        tokens += float(n.sum())
    done_A = [x for x in A if x is not None]
    done_G = [x for x in G if x is not None]
    assert len(done_A) == len(done_G) == len(layers)  # a batch has at least one chunk
    # tr A = Σ‖ã‖², tr G = Σ‖d‖²: finite iff every input and output gradient is (|off-diagonals| are
    # bounded by the diagonals), so the traces are the whole check, in one host sync
    traces = torch.stack([torch.diagonal(x).sum() for x in done_A + done_G])
    finite = torch.isfinite(traces)
    bad = (
        []
        if bool(finite.all())
        else [x.name for k, x in enumerate(layers) if not (finite[k] and finite[len(layers) + k])]
    )
    if bad:
        raise FloatingPointError(f"non-finite K-FAC factors in layer(s) {bad}; nothing was updated")
    if not tokens > 0:
        raise BatchError("the batch has no tokens to learn from (the loss returned num_tokens summing to 0)")
    for k in range(len(layers)):  # commit only a complete, finite batch
        sums.A[k] = _add(sums.A[k], done_A[k])
        sums.G[k] = _add(sums.G[k], done_G[k])
        sums.positions[k] += positions[k]
    sums.tokens += tokens
    sums.samples += size


def _setup(loss: Any, params: Any, first: Any, layers: Sequence[str] | None) -> tuple[ParamLeaves, tuple[Layer, ...]]:
    flat = flatten_params(params)
    sample = optree.tree_map(lambda x: x[0], first)
    return flat, discover_layers(loss, flat, cast_floating(sample, flat.dtype), layers)


def _empty_sums(layers: tuple[Layer, ...]) -> _Sums:
    return _Sums(A=[None] * len(layers), G=[None] * len(layers), positions=[0.0] * len(layers))


def _zeros(params: ParamLeaves, layers: tuple[Layer, ...]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Zero ``A`` and ``G`` for every layer (a fresh state)."""
    device = params.leaves[layers[0].weight].device
    A = {x.name: torch.zeros(x.a_dim, x.a_dim, dtype=params.dtype, device=device) for x in layers}
    G = {x.name: torch.zeros(x.out_features, x.out_features, dtype=params.dtype, device=device) for x in layers}
    return A, G


def kfac(
    loss: Any,
    params: Any,
    batches: Any,
    *,
    approx: Approx = "expand",
    layers: Sequence[str] | None = None,
    chunk_size: int | None = None,
    kind: FisherKind | str = "empirical",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    max_classes: int = DEFAULT_MAX_CLASSES,
) -> KFAC:
    """K-FAC factors of one batch or an iterable of batches (exact sums, then normalised).

    Args:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        params: pytree of parameter tensors (e.g. ``dict(model.named_parameters())``); not modified.
        batches: one batch or an iterable of batches.
        approx: ``"expand"`` or ``"reduce"`` (identical for one position per example).
        layers: glob patterns of the weight names to cover (``None``: every weight used once by
            ``F.linear`` / ``torch.addmm``).
        chunk_size: samples per vectorised chunk (``None``: a whole batch).
        kind: ``"empirical"``, ``"mc"`` or ``"exact"`` (:mod:`fisherfunc.kinds`); ``G`` is taken at
            those targets, ``A`` does not depend on them.
        mc_samples: draws per example for ``"mc"``.
        generator: the generator ``"mc"`` draws from.
        seed: an int seed for ``"mc"`` instead of ``generator``.
        max_classes: the most classes ``"exact"`` may enumerate.

    Returns:
        :class:`KFAC` with float32 factors (float64 for float64 params).

    >>> import torch, fisherfunc as ff
    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> F = ff.kfac.kfac(ff.losses.classification(model), dict(model.named_parameters()), (x, y))
    >>> F.A["weight"].shape, F.G["weight"].shape   # [in + 1 (bias), in + 1], [out, out]
    (torch.Size([5, 5]), torch.Size([3, 3]))
    """
    check_approx(approx)
    check_chunk_size(chunk_size)
    labels, generator = resolve_kind(
        loss, kind, mc_samples=mc_samples, generator=generator, seed=seed, max_classes=max_classes
    )
    flat: ParamLeaves | None = None
    found: tuple[Layer, ...] = ()
    sums: _Sums | None = None
    shapes: LayerShapes | None = None
    for batch in iter_batches(batches):
        batch = as_tree(batch)
        batch_size(batch)
        if flat is None:
            flat, found = _setup(loss, params, batch, layers)
            sums = _empty_sums(found)
            shapes = LayerShapes(loss, flat, found, first=batch)
        assert sums is not None
        _batch_sums(loss, flat, found, batch, approx, chunk_size, labels, generator, sums, shapes)
    if flat is None or sums is None:
        raise BatchError("no batches were given")
    return KFAC(
        layers=found,
        A={x.name: s.div_(n) for x, s, n in zip(found, sums.A, sums.positions)},  # type: ignore[union-attr]
        G={x.name: s.div_(sums.tokens) for x, s in zip(found, sums.G)},  # type: ignore[union-attr]
        positions={x.name: n for x, n in zip(found, sums.positions)},
        tokens=sums.tokens,
        samples=sums.samples,
        approx=approx,
        kind=FisherKind(kind).value,
        names=flat.names,
    )


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


@dataclasses.dataclass(frozen=True, eq=False)
class KFACStep:
    """A configured, pure K-FAC step (built by :func:`make_kfac_step`): ``state = step(params, batch, state)``."""

    loss: Any
    decay: float
    approx: str
    layers: Sequence[str] | None
    chunk_size: int | None
    kind: str
    mc_samples: int
    seed: int | None
    max_classes: int

    def init(self, params: Any, example: Any) -> KFACState:
        """A fresh state (zero EMAs, step 0); ``example`` is a batch used only to find the layers' shapes."""
        batch = as_tree(example)
        batch_size(batch)
        flat, found = _setup(self.loss, params, batch, self.layers)
        A, G = _zeros(flat, found)
        return KFACState(
            layers=found,
            A=A,
            G=G,
            positions={x.name: 0.0 for x in found},
            step=0,
            tokens=0.0,
            samples=0,
            decay=self.decay,
            approx=self.approx,
            kind=self.kind,
            names=flat.names,
        )

    def __call__(self, params: Any, batch: Any, state: KFACState) -> KFACState:
        """Fold one batch's ``A_t`` and ``G_t`` into the EMA; returns a new state (``state`` is untouched).

        Raises:
            ValueError: a state made with another decay, convention, kind or for other parameters.
        """
        if not isinstance(state, KFACState):
            raise TypeError(f"state must be a KFACState (from step.init), got {type(state).__name__}")
        for field in ("decay", "approx", "kind"):
            if getattr(state, field) != getattr(self, field):
                raise ValueError(f"the state has {field}={getattr(state, field)!r}, this step {getattr(self, field)!r}")
        batch = as_tree(batch)
        batch_size(batch)
        flat = flatten_params(params)
        if flat.names != state.names:
            raise ValueError("the state was made for other parameters (their names differ)")
        for layer in state.layers:
            w = flat.leaves[layer.weight]
            expected = layer.weight_shape
            if tuple(w.shape) != expected:
                raise ValueError(f"parameter '{layer.name}' has shape {tuple(w.shape)}, the state expects {expected}")
        labels, generator = resolve_kind(
            self.loss,
            self.kind,
            mc_samples=self.mc_samples,
            generator=None if self.seed is None else step_generator(self.seed, state.step),
            max_classes=self.max_classes,
        )
        sums = _empty_sums(state.layers)
        _batch_sums(self.loss, flat, state.layers, batch, self.approx, self.chunk_size, labels, generator, sums)
        beta = state.decay

        def fold(m: Tensor, total: Tensor | None, count: float) -> Tensor:
            # m_t = β m_{t−1} + (1 − β) X_t with X_t = total / count; `total` is ours, so in place
            assert total is not None
            return total.mul_((1.0 - beta) / count).add_(m.to(total.device, total.dtype), alpha=beta)

        return state._replace(
            A={x.name: fold(state.A[x.name], s, n) for x, s, n in zip(state.layers, sums.A, sums.positions)},
            G={x.name: fold(state.G[x.name], s, sums.tokens) for x, s in zip(state.layers, sums.G)},
            positions={x.name: state.positions[x.name] + n for x, n in zip(state.layers, sums.positions)},
            step=state.step + 1,
            tokens=state.tokens + sums.tokens,
            samples=state.samples + sums.samples,
        )


def make_kfac_step(
    loss: Any,
    *,
    decay: float = 0.95,
    approx: Approx = "expand",
    layers: Sequence[str] | None = None,
    chunk_size: int | None = None,
    kind: FisherKind | str = "empirical",
    mc_samples: int = 1,
    seed: int | None = None,
    max_classes: int = DEFAULT_MAX_CLASSES,
) -> KFACStep:
    """Bind a loss, decay and convention into a pure ``kfac_step(params, batch, state) -> state``.

    Arguments as for :func:`kfac`; ``decay`` is the EMA decay ``β`` in ``[0, 1)`` (``0``: each
    step is the one-shot batch estimate). ``kind="mc"`` needs ``seed``: step ``t`` draws from
    a generator seeded by ``(seed, t)``, so a run is reproducible.
    """
    decay = check_decay(decay)
    check_approx(approx)
    check_chunk_size(chunk_size)
    resolve_kind(loss, kind, mc_samples=mc_samples, seed=seed, max_classes=max_classes)  # validate early
    return KFACStep(loss, decay, approx, layers, chunk_size, FisherKind(kind).value, mc_samples, seed, max_classes)


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
