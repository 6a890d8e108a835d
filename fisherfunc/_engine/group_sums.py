"""Per-chunk group Fisher: ``rule.reduce(g_b ⊙ g_b)`` by the direct and the factorised path.

**Direct**: differentiate the parameter, square, reduce (inside ``vmap``).

**Factorised** (DESIGN §6): for a layer ``y = x Wᵀ + b`` the per-sample weight gradient is
``G_b = Σ_t d_bt a_btᵀ`` with ``a`` the layer's input and ``d = ∂L_b/∂y``, both had from output
probes (:mod:`~fisherfunc._engine.probes`), and the weight itself is never differentiated. A rule
needs only some sums of ``G ⊙ G`` (:meth:`~fisherfunc.Rule.square_sums`). Writing ``G = Uᵀ V`` with
``U [T, n0]`` and ``V [T, n1]`` the factors along the weight's two axes::

    rows[i] = Σ_j G_ij² = Σ_t U_ti (K U)_ti,   K = V Vᵀ  [T, T]   (Gram form)
    cols[j] = Σ_i G_ij² = Σ_t V_tj (K' V)_tj,  K' = U Uᵀ
    T = 1:    rows = U² · ‖V‖²,  cols = V² · ‖U‖²

The Gram form costs ``T²(n0 + n1)``, the direct form ``(Uᵀ V)²`` costs ``T n0 n1``; the cheaper is
used. An embedding ``y_t = W[id_t]`` has ``G[v] = Σ_{t: id_t = v} d_t``; with ``S_tt' = [id_t = id_t']``::

    r_t = Σ_t' S_tt' (d_t · d_t'),   rows[v] = Σ_{t: id_t = v} r_t,   cols[j] = Σ_t d_tj (S d)_tj

A weight is factorised (a :class:`Site`) when one sample's forward shows it used exactly once, by a
plain ``F.linear``, ``torch.addmm`` (GPT-2 ``Conv1D``) or ``F.embedding`` call, or used ``k`` times
and every time by the same kind of ``F.linear``/``torch.addmm`` call (a recurrent weight at each
time step): then ``G = Σ_uses Σ_t d_t a_tᵀ`` is the factorisation above over the ``k`` uses' tokens
stacked, and the square of the whole sum is formed. Everything else — weights used in two ways
(a tied embedding is also the output layer), norms, biases — takes the direct path in the same
``grad`` call.

Squares and sums are float32 or wider whatever the dtype the per-sample gradients and recorded
inputs come in (DESIGN §5): a bfloat16 forward and backward (``precision="model"``) hands its
gradients and factors to :func:`widen` before anything is squared, so the group sums are float32.
Where a factorised weight's per-sample gradient ``G = Σ_t d_t a_tᵀ`` is formed (the direct and full
forms), it is formed in the factors' dtype, as the model's own backward forms a weight's gradient
(float32 accumulation inside the matrix product, each entry rounded once to the model's dtype),
then widened and squared: widening the factors first ran the largest product of the computation at
float32 speed (a bfloat16 Llama's Fisher at 1.5× its forward+backward on a CPU with bfloat16 units,
1.07× now). The Gram form, whose terms cancel, is formed in float32.

Callers that only need the batch's sums (``fisher``, ``accumulate``, the step) get the sums form,
which contracts some sites at chunk level: with one vector per sample,
``Σ_b (u_b ⊗ v_b)² = (u²)ᵀ(v²)`` — one matrix product per chunk, not ``c`` per-sample
``[n0, n1]`` squares — and embeddings' per-token values are scattered once into the table.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from .._spec.resolve import ResolvedSpec
from .._spec.rules import SpecError, SquareSums
from .batches import Batch, cast_floating, first_sample, sample_key
from .kinds import LabelSets
from .loop import ChunkFns, summed
from .memos import one_shot
from .numerics import Prepared
from .probes import Call, StaleSites, discover
from .vectorise import PerSampleLoss, vectorise

__all__ = [
    "GradientPath",
    "Site",
    "find_sites",
    "group_chunk_fns",
    "GroupSums",
    "widen",
    "full_squares",
    "KEPT_FACTOR_BYTES",
    "factor_bytes",
    "in_backward",
]

#: ``"auto"``: output probes for the weights that qualify, direct gradients elsewhere (exact either
#: way); ``"direct"``: ``vmap(grad)`` of every parameter.
GradientPath = Literal["auto", "direct"]
_FACTORISED = ("linear", "addmm", "embedding")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Site:
    """A factorised weight.

    Attributes:
        leaf: index of the weight among the params' leaves.
        op: the call that uses it (``"linear"``, ``"addmm"`` or ``"embedding"``).
        out_shape: the probe's per-sample shape: the call's output shape, with a leading ``uses``
            for a weight called ``uses > 1`` times (one probe per call, stacked).
        sums: which sums of ``G ⊙ G`` the weight's rule needs.
        padding_idx: for embeddings, the row whose gradient is always zero.
        uses: how many calls use the weight (``> 1`` only for ``linear`` and ``addmm``).
        call: each of its calls as discovery saw it, its bias left unnamed (a bias is differentiated
            directly): a kept site's later calls must match it (see :class:`GroupSums`).
    """

    leaf: int
    op: str
    out_shape: tuple[int, ...]
    sums: SquareSums
    padding_idx: int | None = None
    uses: int = 1
    call: Call | None = None


def find_sites(loss: PerSampleLoss, prepared: Prepared, spec: ResolvedSpec, sample: Any) -> tuple[Site, ...]:
    """The weights that can take the factorised path, found by one forward of one sample."""
    needs: dict[int, SquareSums] = {}
    for i in spec.active:
        if len(spec.shapes[i]) == 2:
            try:
                needs[i] = spec.rules[i].square_sums(spec.shapes[i])
            except SpecError:  # a rule without a partition geometry: the direct path computes it
                continue
    if not needs:
        return ()
    found = discover(lambda: loss(prepared.tree(), cast_floating(sample, prepared.dtype)), prepared, list(needs))
    sites = []
    for i, sums in needs.items():
        repeated = found.repeated(i)
        if repeated is None or repeated[0].op not in _FACTORISED:
            continue
        call, uses = repeated
        shape = call.out_shape if uses == 1 else (uses, *call.out_shape)
        site = Site(i, call.op, shape, sums, call.padding_idx, uses, dataclasses.replace(call, bias=None))
        sites.append(site)
    return tuple(sites)


# --- square sums from factors ---------------------------------------------------------------------


def widen(x: Tensor) -> Tensor:
    """``x`` in float32 if it is a floating tensor narrower than that (bfloat16, float16), else ``x``.

    Squares and sums are float32 or wider: the square of a bfloat16 (8-bit significand) or float16
    (11-bit) value is exact in float32 (24-bit), so only the sums round, in float32.
    """
    return x.float() if x.is_floating_point() and torch.finfo(x.dtype).bits < 32 else x


#: The most blocks of rows a row (or column) sum is formed in (see :func:`_square_sums`).
_BLOCKS = 8


def _square_sums(u: Tensor, v: Tensor, sums: SquareSums) -> Tensor:
    """Sums of ``G ⊙ G`` for ``G = uᵀ v`` (``u [T, n0]``, ``v [T, n1]``), as rows, columns or full, float32 or wider.

    Row sums are formed for blocks of ``max(n1, n0 / 8)`` rows at a time (columns: the transpose),
    each block of ``u`` widened on its own, so no temporary is larger than ``[T, n1]`` (Gram form) or
    ``[n1, n1]`` (direct form) by more than 8×: a language-model head's ``[T, vocab]`` output
    gradient is never copied to float32 whole, nor its ``[vocab, d]`` square formed at once. In the
    direct and full forms ``G`` is formed in the factors' dtype, then widened and squared; the Gram
    form (whose terms cancel) from widened factors.
    """
    t, n0, n1 = u.shape[0], u.shape[1], v.shape[1]
    if sums == "full":
        g = widen(u.t() @ v)
        return g * g
    if sums == "cols":
        u, v = v, u
        n0, n1 = n1, n0
    # rows[i] = Σ_j (Σ_t u_ti v_tj)²
    if t == 1:
        return widen(u[0]).square() * widen(v[0]).square().sum()
    # Gram form, Σ_t u_ti (K u)_ti with K = v vᵀ: its terms cancel, so it is formed in float32 or wider
    gram = widen(v) @ widen(v).t() if t * (n0 + n1) < n0 * n1 else None
    step = max(n1, -(-n0 // _BLOCKS))
    rows = []
    for start in range(0, n0, step):
        block = u[:, start : start + step]
        if gram is not None:
            wide = widen(block)
            rows.append((wide * (gram @ wide)).sum(0))
        else:
            g = widen(block.t() @ v)  # direct form: G formed in the factors' dtype, as the model's backward does
            rows.append((g * g).sum(1))
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _factors(site: Site, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """``u [T, n0]``, ``v [T, n1]`` with ``G = uᵀ v`` in the weight's layout (in the dtype they come in).

    The layouts: linear ``[out, in]`` (``u = d``, ``v = a``), addmm ``[in, out]`` (``u = a``, ``v = d``).
    """
    a = a.reshape(-1, a.shape[-1])
    d = d.reshape(a.shape[0], -1)
    return (d, a) if site.op == "linear" else (a, d)


def _embedding_d(site: Site, ids: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Flat ids ``[T]`` and output gradients ``[T, D]`` (float32 or wider), zero at the padding row's tokens."""
    ids = ids.reshape(-1)
    d = widen(d).reshape(ids.shape[0], -1)
    if site.padding_idx is not None:  # the padding row gets no gradient
        d = d * (ids != site.padding_idx).unsqueeze(1).to(d.dtype)
    return ids, d


def _site_sums(site: Site, rows: int, a_or_ids: Tensor, d: Tensor) -> Tensor:
    """One sample's sums of ``G ⊙ G`` (rows ``[n0]``, cols ``[n1]`` or full ``[n0, n1]``) from its factors."""
    if site.op != "embedding":
        u, v = _factors(site, a_or_ids, d)
        return _square_sums(u, v, site.sums)
    ids, d = _embedding_d(site, a_or_ids, d)
    if site.sums == "full":
        g = d.new_zeros(rows, d.shape[1]).index_add(0, ids, d)
        return g * g
    same = (ids.unsqueeze(0) == ids.unsqueeze(1)).to(d.dtype)  # S_tt'
    if site.sums == "rows":
        r = ((d @ d.t()) * same).sum(1)  # r_t = Σ_t' S_tt' d_t·d_t'
        return d.new_zeros(rows).index_add(0, ids, r)
    return (d * (same @ d)).sum(0)


def contracted_per_chunk(site: Site, shape: Sequence[int]) -> bool:
    """Whether a site's chunk sums are contracted outside ``vmap`` (see :func:`_site_parts`).

    Linear-like weights with one vector per sample (``T = 1``): ``Σ_b (u_b ⊗ v_b)² = (u²)ᵀ (v²)``
    is one matrix product for the chunk instead of ``c`` per-sample ``[n0, n1]`` squares.
    Embeddings' full squares and row sums: per-token values scattered once into the table
    instead of one ``[V, D]`` (or ``[V]``) table per sample. Full squares of a sequence layer
    (``T > 1``) whose factors ``T (n0 + n1)`` are no larger than one ``G_b`` (``n0 n1``): the
    factors leave ``vmap`` and :func:`full_squares` adds each sample's square into one sum.
    """
    if site.op == "embedding":
        return site.sums in ("full", "rows")
    tokens = math.prod(site.out_shape[:-1])
    if tokens == 1:
        return True
    # a full square of a sequence layer: G_b formed sample by sample into one reused buffer, its
    # square added in place (see _contract), when the factors are no larger than one G_b
    n0, n1 = shape
    return site.sums == "full" and tokens * (n0 + n1) <= n0 * n1


def _site_parts(site: Site, a_or_ids: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """One sample's share of a chunk-level site (inside ``vmap``), summed by :func:`_contract`.

    Linear-like: the factors ``(u, v)``, ``G_b = uᵀ v`` (``T = 1``: the vectors, widened). Embedding:
    the ids ``[T]`` and a per-token value ``[T, k]`` whose scatter-add into the rows is the sample's contribution::

        full:  m = S d,  value_t = m_t² · [t is the first token with id_t]   (G_b[id_t] = m_t)
        rows:  value_t = r_t = Σ_t' S_tt' d_t·d_t'
    """
    if site.op != "embedding":
        u, v = _factors(site, a_or_ids, d)
        return (widen(u[0]), widen(v[0])) if u.shape[0] == 1 else (u, v)
    ids, d = _embedding_d(site, a_or_ids, d)
    same = (ids.unsqueeze(0) == ids.unsqueeze(1)).to(d.dtype)  # S_tt'
    if site.sums == "rows":
        return ids, ((d @ d.t()) * same).sum(1, keepdim=True)
    first = (same.tril(-1).sum(1) == 0).to(d.dtype)  # no earlier token with the same id
    return ids, (same @ d).square() * first.unsqueeze(1)


def _contract(site: Site, rows: int, parts: tuple[Tensor, Tensor]) -> Tensor:
    """``Σ_{b ∈ chunk}`` of a chunk-level site's square sums, from its stacked parts.

    Linear-like with ``u [c, n0]``, ``v [c, n1]``::

        full = (u²)ᵀ (v²),   rows = (u²)ᵀ ‖v‖²,   cols = (v²)ᵀ ‖u‖²
    """
    if site.op == "embedding":
        ids, values = parts
        k = values.shape[-1]
        table = values.new_zeros(rows, k).index_add(0, ids.reshape(-1), values.reshape(-1, k))
        return table if site.sums == "full" else table[:, 0]
    if parts[0].ndim == 3:  # full squares of a sequence layer: u [c, T, n0], v [c, T, n1]
        return full_squares(parts[0], parts[1])
    u2, v2 = parts[0].square(), parts[1].square()
    if site.sums == "full":
        return u2.t() @ v2
    if site.sums == "rows":
        return u2.t() @ v2.sum(1)
    return v2.t() @ u2.sum(1)


def full_squares(u: Tensor, v: Tensor) -> Tensor:
    """``Σ_b G_b ⊙ G_b`` with ``G_b = u_bᵀ v_b`` (``u [c, T, n0]``, ``v [c, T, n1]``), float32 or wider.

    There is no batch-level shortcut for ``T > 1``: ``Σ_b (Σ_t u_bt ⊗ v_bt)²`` expanded is a product
    over ``c T²`` pairs of tokens, ``T`` times the cost of forming each ``G_b``. So each ``G_b`` is
    formed (in the factors' dtype, as the model's backward forms a weight gradient) into one reused
    ``[n0, n1]`` buffer and its square added in place: the same products as a batched ``bmm``, but no
    ``[c, n0, n1]`` stack is written and read back, and the buffer stays in cache (~30% faster than
    ``(G ⊙ G).sum(0)`` over the stack on a CPU, measured at the benchmarks' layer sizes).
    """
    n0, n1 = u.shape[-1], v.shape[-1]
    narrow = widen(u) is not u
    buffer = u.new_empty(n0, n1)
    total = torch.zeros(n0, n1, dtype=torch.promote_types(u.dtype, torch.float32), device=u.device)
    for b in range(u.shape[0]):
        torch.mm(u[b].t(), v[b], out=buffer)
        g = widen(buffer) if narrow else buffer
        total.addcmul_(g, g)
    return total


def reducible_in_backward(site: Site) -> bool:
    """Whether a site can form its square sums inside the backward (a :class:`~.probes.ReducingProbe`).

    A once-used ``F.linear``/``torch.addmm`` weight: ``s = square_sums(a, d)`` the moment its output
    gradient ``d`` exists, so neither ``a [T, in]`` nor ``d [T, out]`` outlives the layer's backward.
    Repeated weights (their ``G`` sums over uses) and embeddings keep their factors to the end.
    Which of the sites that can, do: :func:`in_backward`.
    """
    return site.op != "embedding" and site.uses == 1


#: Per sample, the most bytes of probed layers' inputs and output gradients kept to the end of the
#: backward rather than reduced inside it (see :func:`in_backward`).
KEPT_FACTOR_BYTES = 1 << 20


def factor_bytes(site: Site, shape: Sequence[int], itemsize: int, sets: int = 1) -> int:
    """One sample's bytes of a linear-like site's input ``a [T, in]`` and output gradients ``d [T, out]``.

    ``sets``: how many output gradients a sample has (one per label set of the ``"mc"`` kind).
    """
    tokens, n_out = math.prod(site.out_shape[:-1]), site.out_shape[-1]
    n_in = shape[1] if site.op == "linear" else shape[0]  # linear [out, in], addmm [in, out]
    return tokens * (n_in + sets * n_out) * itemsize


def in_backward(
    sites: Sequence[Site],
    shapes: Sequence[Sequence[int]],
    itemsize: int,
    budget: int | None = None,
    sets: int | None = 1,
) -> frozenset[int]:
    """The leaves of the sites whose square sums are formed inside the backward, by a :class:`~.probes.ReducingProbe`.

    Reducing in the backward bounds memory: no site's factors outlive its layer's backward, which is
    what keeps a language model's Fisher at its forward+backward's memory. But under ``torch.func``
    every ``autograd.Function`` call builds its per-level function classes and flattens its
    arguments several times: 0.2–0.6 ms of Python per layer and chunk on a CPU, which on a small
    layer exceeds its products (``nn.TransformerEncoderLayer`` at d = 128, T = 32: 1.36× a
    forward+backward with every site reduced in the backward, 1.18× with none). So the sites are
    taken smallest first, and their factors kept to the end of the backward (reduced there, inside
    ``vmap``, by the same code) while they total at most ``budget`` bytes per sample; the others
    reduce in the backward. A layer of a model at scale (``T·(in + out)`` in the millions) is
    always over the budget alone; the extra memory of a chunk of ``c`` samples is at most
    ``c · budget``.

    Args:
        sites: the sites of a chunk computation.
        shapes: the weights' shapes, indexed by leaf.
        itemsize: bytes per element of the factors (the compute dtype's).
        budget: the most bytes per sample kept to the end (default :data:`KEPT_FACTOR_BYTES`).
        sets: output gradients per sample: 1, the ``"mc"`` kind's label sets, or ``None`` when not
            known before the forward (the ``"exact"`` kind's classes): then every site that can
            reduces in the backward.
    """
    budget = KEPT_FACTOR_BYTES if budget is None else budget
    if sets is None:
        budget, sets = 0, 1
    able = sorted((factor_bytes(s, shapes[s.leaf], itemsize, sets), s.leaf) for s in sites if reducible_in_backward(s))
    kept = 0
    reduced = set()
    for size, leaf in able:
        if kept + size <= budget:
            kept += size
        else:
            reduced.add(leaf)
    return frozenset(reduced)


def _sums_shape(site: Site, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of a 2-D weight's square sums: rows ``[n0]``, cols ``[n1]``, full ``[n0, n1]``."""
    return {"rows": (shape[0],), "cols": (shape[1],), "full": (shape[0], shape[1])}[site.sums]


def _reducer(site: Site, a: Tensor, d: Tensor) -> Tensor:
    """One sample's square sums from a layer's input ``a`` and output gradient ``d`` (in the backward)."""
    u, v = _factors(site, a, d)
    return _square_sums(u, v, site.sums)


# --- the chunk functions --------------------------------------------------------------------------


def group_chunk_fns(
    loss: PerSampleLoss,
    prepared: Prepared,
    spec: ResolvedSpec,
    sites: Sequence[Site] = (),
    *,
    labels: LabelSets | None = None,
) -> ChunkFns:
    """Both forms of the per-chunk group Fisher: probes for ``sites``, direct gradients elsewhere.

    With no sites this is the direct path. Values are in ``spec.active`` order.
    """
    site_of = {s.leaf: s for s in sites}
    direct = [i for i in spec.active if i not in site_of]
    position = {i: k for k, i in enumerate(spec.active)}
    rules = spec.rules
    # rule.reduce of the square sums, prepared outside vmap
    to_groups = {s.leaf: rules[s.leaf].from_square_sums(spec.shapes[s.leaf], s.sums) for s in sites}

    wide = torch.promote_types(prepared.dtype, torch.float32)
    # output gradients per sample: one, or one per label set (the "exact" kind's count is the model's)
    sets = 1 if labels is None else getattr(labels.kind, "samples", None)

    def make_reduce(chunk_level: frozenset[int], inside: frozenset[int]) -> Callable[..., tuple[Any, ...]]:
        def reduce(g_direct: tuple[Tensor, ...], d: tuple[Tensor, ...], inputs: tuple[Tensor, ...]) -> tuple[Any, ...]:
            out: list[Any] = [None] * len(spec.active)
            for i, g in zip(direct, g_direct):
                out[position[i]] = rules[i].reduce(widen(g).square())  # s = rule.reduce(g ⊙ g), inside vmap
            for k, site in enumerate(sites):
                rows = spec.shapes[site.leaf][0]
                if site.leaf in chunk_level:
                    out[position[site.leaf]] = _site_parts(site, inputs[k], d[k])
                elif site.leaf in inside:  # d[k] is the square sums already (ReducingProbe)
                    out[position[site.leaf]] = to_groups[site.leaf](d[k])
                else:
                    out[position[site.leaf]] = to_groups[site.leaf](_site_sums(site, rows, inputs[k], d[k]))
            return tuple(out)

        return reduce

    def run(chunk_level: frozenset[int]) -> Callable[[Any], tuple[tuple[Any, ...], Tensor]]:
        itemsize = torch.empty(0, dtype=prepared.dtype).element_size()
        inside = in_backward([s for s in sites if s.leaf not in chunk_level], spec.shapes, itemsize, sets=sets)
        reducing = [s.leaf in inside for s in sites]
        fn = vectorise(
            loss,
            prepared,
            direct=direct,
            probed=[s.leaf for s in sites],
            probe_shapes=[_sums_shape(s, spec.shapes[s.leaf]) if r else s.out_shape for s, r in zip(sites, reducing)],
            probe_dtypes=[wide if r else None for r in reducing],
            repeats=[s.uses for s in sites],
            calls=[s.call for s in sites],
            reducers=[functools.partial(_reducer, s) if r else None for s, r in zip(sites, reducing)],
            reduce=make_reduce(chunk_level, inside),
            labels=labels,
        )

        def values(chunk: Any) -> tuple[tuple[Any, ...], Tensor]:
            out, tokens, _ = fn(chunk)
            return out, tokens

        return values

    chunk_level = (
        frozenset(s.leaf for s in sites if contracted_per_chunk(s, spec.shapes[s.leaf]))
        if labels is None
        else frozenset()
    )
    if not chunk_level:
        return summed(run(frozenset()))
    parts_fn = run(chunk_level)
    built: list[Callable[[Any], tuple[tuple[Any, ...], Tensor]]] = []

    def per_sample(chunk: Any) -> tuple[tuple[Any, ...], Tensor]:
        # built on first use: the sums' callers (fisher, accumulate, the step) never call it
        if not built:
            built.append(run(frozenset()))
        return built[0](chunk)

    def sums(chunk: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        parts, tokens = parts_fn(chunk)
        out = []
        for i, part in zip(spec.active, parts):
            if i in chunk_level:
                site = site_of[i]
                out.append(to_groups[i](_contract(site, spec.shapes[i][0], part)))
            else:
                out.append(part.sum(0))
        return tuple(out), tokens

    return ChunkFns(per_sample, sums)


#: Discovered sites kept across calls (a ``FisherStep``'s memo): at most this many keys, then it starts over.
_MAX_DISCOVERED = 64

#: One-shot calls' memos of discovered sites, per loss (or per model and built loss, see :mod:`.memos`).
_ONE_SHOT: weakref.WeakKeyDictionary[Any, dict[Hashable, dict[tuple, tuple[Site, ...]]]] = weakref.WeakKeyDictionary()


def one_shot_memo(loss: PerSampleLoss) -> dict[tuple, tuple[Site, ...]] | None:
    """The memo of sites that one-shot calls (``fisher``, ``accumulate``, ...) with ``loss`` share.

    A loss built anew with the same options for the same model shares it (:func:`.memos.one_shot`).
    ``None`` for a loss that cannot be weakly referenced or hashed: each call then discovers.
    """
    return one_shot(_ONE_SHOT, loss, dict)


class GroupSums:
    """The per-chunk group Fisher of one call, for each sample shape of its batches.

    Discovery (one sample's forward) runs once per sample shape, spec, dtypes and training modes
    and is kept across calls: in a :class:`~fisherfunc.FisherStep`'s memo, or for one-shot calls
    in a memo per loss (:func:`one_shot_memo`; a loss built anew with the same options for the
    same model shares it), so a notebook's repeated ``ff.fisher(loss, ...)`` calls pay it once.
    What keeps a kept site valid if the model's calls change between two forwards: the probe mode
    refuses a probed weight used in any way but by the calls discovery saw
    (:class:`~fisherfunc._engine.probes.ProbeMode`), and the call then discovers again.

    Args:
        loss: the per-sample loss.
        prepared: the prepared params.
        spec: the resolved spec.
        path: ``"auto"`` or ``"direct"``.
        labels: the label sets of the ``"mc"`` / ``"exact"`` kinds, or ``None``.
        discovered: a memo of sites kept across calls, or ``None`` for the loss's one-shot memo.
    """

    def __init__(
        self,
        loss: PerSampleLoss,
        prepared: Prepared,
        spec: ResolvedSpec,
        path: GradientPath,
        labels: LabelSets | None = None,
        discovered: dict[tuple, tuple[Site, ...]] | None = None,
    ) -> None:
        self.loss, self.prepared, self.spec, self.path, self.labels = loss, prepared, spec, path, labels
        self.discovered = discovered if discovered is not None else one_shot_memo(loss)
        self._fns: dict[Any, ChunkFns] = {}

    def _memo_key(self, key: tuple) -> tuple:
        """Everything discovery depends on but the loss's code and the params' values.

        The resolved spec (names, rules, shapes), the dtypes and devices of the leaves, the
        samples' shapes and dtypes, and the training flags of ``loss.model``'s modules (a module may
        call other layers in training mode).
        """
        model = getattr(self.loss, "model", None)
        modes = tuple(m.training for m in model.modules()) if isinstance(model, torch.nn.Module) else ()
        leaves = tuple((x.dtype, x.device) for x in self.prepared.leaves)
        spec = self.spec
        return (spec.names, spec.rules, spec.shapes, self.prepared.dtype, leaves, modes, key)

    def _sites(self, batch: Batch, key: tuple) -> tuple[Site, ...]:
        if self.discovered is None:
            return find_sites(self.loss, self.prepared, self.spec, first_sample(batch))
        memo = self._memo_key(key)
        if memo not in self.discovered:
            if len(self.discovered) >= _MAX_DISCOVERED:
                self.discovered.clear()
            self.discovered[memo] = find_sites(self.loss, self.prepared, self.spec, first_sample(batch))
        return self.discovered[memo]

    def forget(self, batch: Batch) -> None:
        """Drop what was discovered for ``batch``'s sample shapes (its sites went stale), here and in the memo."""
        key = sample_key(batch)
        self._fns.pop(key, None)
        if self.discovered is not None:
            self.discovered.pop(self._memo_key(key), None)

    def run(self, batch: Batch, compute: Callable[[ChunkFns], T]) -> T:
        """``compute`` of ``batch``'s per-chunk computation; if its kept sites went stale, discovered again once.

        :class:`~fisherfunc._engine.probes.StaleSites` is raised during a forward, before any sum
        of the batch is returned, so the second run starts from nothing. Sites that are stale the
        moment they were discovered mean the model calls its weights differently in discovery's
        forward (one sample, no gradients) than under ``vmap`` and ``grad``: the probes cannot be
        trusted for it, so its samples of that shape take the direct path (exact; kept, with a
        warning once).
        """
        try:
            return compute(self(batch))
        except StaleSites:  # the model's calls changed since its sites were discovered: discover again
            self.forget(batch)
        try:
            return compute(self(batch))
        except StaleSites as exc:
            warnings.warn(
                f"{exc}; this happened right after discovery, so the model calls its weights differently "
                "with gradients (or under vmap) than without: its samples of this shape take the direct "
                "path (exact, slower)",
                RuntimeWarning,
                stacklevel=2,
            )
            key = sample_key(batch)
            if self.discovered is not None:
                self.discovered[self._memo_key(key)] = ()
            self._fns[key] = group_chunk_fns(self.loss, self.prepared, self.spec, (), labels=self.labels)
            return compute(self._fns[key])

    def __call__(self, batch: Batch) -> ChunkFns:
        """The per-chunk computation for ``batch``'s sample shapes."""
        key = sample_key(batch)
        if key not in self._fns:
            sites = () if self.path == "direct" else self._sites(batch, key)
            self._fns[key] = group_chunk_fns(self.loss, self.prepared, self.spec, sites, labels=self.labels)
        return self._fns[key]
