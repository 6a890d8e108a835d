"""The factorised path: group Fisher of linear-like layers from output probes (hook-free).

For a layer ``y = x Wᵀ + b`` the per-sample weight gradient is ``G_b = Σ_t d_bt a_btᵀ`` with
``a`` the layer's input and ``d = ∂L_b/∂y``. Group rules only need sums of ``G_b ⊙ G_b`` along one
axis, which follow from ``a`` and ``d`` without forming ``G_b``. Writing ``G = Uᵀ V`` with
``U [T, n0]`` and ``V [T, n1]`` the factors along the weight's two axes::

    rows[i] = Σ_j G_ij² = Σ_t U_ti (K U)_ti,   K = V Vᵀ  [T, T]   (Gram form)
    cols[j] = Σ_i G_ij² = Σ_t V_tj (K' V)_tj,  K' = U Uᵀ
    T = 1:    rows = U² · ‖V‖²,  cols = V² · ‖U‖²

The Gram form costs ``T²(n0 + n1)``, the direct form ``(Uᵀ V)²`` costs ``T n0 n1``; the cheaper is
used. An embedding ``y_t = W[id_t]`` has ``G[v] = Σ_{t: id_t = v} d_t``; with ``S_tt' = [id_t = id_t']``::

    r_t = Σ_t' S_tt' (d_t · d_t'),   rows[v] = Σ_{t: id_t = v} r_t,   cols[j] = Σ_t d_tj (S d)_tj

How ``a`` and ``d`` are had without hooks: inside the per-sample function a scoped
``TorchFunctionMode`` adds a zero **probe** to the output of every ``F.linear``, ``torch.addmm``
(GPT-2 ``Conv1D``) and ``F.embedding`` call whose weight *is* (by identity) one of the params, and
records its input. ``vmap(grad(...))`` with respect to the probes gives ``d``; the inputs come
back as auxiliary output. The factorised weights are not differentiated at all. The mode also sees
into ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``),
whose projections are ``F.linear`` calls: a fused in-projection used once (self-attention) is a
site like any other.

A weight qualifies when a shape-discovery call (one sample, no gradients) sees it used exactly once,
by one of those calls, and its rule needs only row sums, column sums or the full square. Anything
else — a weight used twice (tied embeddings, recurrent weights: the square of a sum has cross
terms), passed to another function (a fused in-projection split for cross-attention), norms,
biases — is differentiated directly in the same ``grad`` call.

Callers that only need the batch's sums (:func:`~fisherfunc.fisher`, :func:`~fisherfunc.accumulate`,
the step) get the sums form (:func:`probe_chunk_fns`), which contracts some sites outside ``vmap``:
with one vector per sample, ``Σ_b (d_b ⊗ a_b)² = (d²)ᵀ(a²)`` — one matrix product per chunk, not
``B`` per-sample ``[out, in]`` squares (the elementwise diagonal at about the cost of a weight
gradient) — and embeddings' per-token values are scattered once into the table.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from types import FunctionType
from typing import TYPE_CHECKING, Any, Literal

import optree
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap
from torch.overrides import TorchFunctionMode

from .batch import cast_floating
from .dropout import vmap_randomness
from .per_sample import ChunkFn, ChunkFns, PerSampleLoss, Prepared, direct_chunk_fn, no_autocast, summed
from .rules import Buckets, Channel, Elementwise, Heads, Rows, Rule, Whole

if TYPE_CHECKING:
    from .kinds import LabelSets

__all__ = ["Site", "discover_sites", "probe_chunk_fn", "probe_chunk_fns", "auto_chunk_fn", "auto_chunk_fns"]

Op = Literal["linear", "addmm", "embedding"]
Need = Literal["rows", "cols", "full"]


@dataclasses.dataclass(frozen=True)
class Site:
    """A factorised weight.

    Attributes:
        leaf: index of the weight among the spec's leaves.
        op: the call that uses it.
        out_shape: per-sample shape of that call's output (the probe's shape).
        need: which sums of ``G ⊙ G`` the weight's rule needs.
        padding_idx: for embeddings, the row whose gradient is always zero.
    """

    leaf: int
    op: Op
    out_shape: torch.Size
    need: Need
    padding_idx: int | None = None


def _need(rule: Rule) -> Need | None:
    """Which sums of a 2-D ``G ⊙ G`` a rule reads, or ``None`` if it cannot be factorised."""
    if isinstance(rule, Channel) and rule.groups == 1:
        return "rows" if rule.axis % 2 == 0 else "cols"
    if isinstance(rule, Heads):
        return "rows" if rule.axis % 2 == 0 else "cols"
    if isinstance(rule, (Rows, Buckets, Whole)):
        return "rows"
    if isinstance(rule, Elementwise):
        return "full"
    return None


def _arg(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def _weight_of(func: Callable, args: tuple, kwargs: dict) -> tuple[Op, Tensor] | None:
    if func is F.linear:
        return "linear", _arg(args, kwargs, 1, "weight")
    if func is torch.addmm:
        return "addmm", _arg(args, kwargs, 2, "mat2")
    if func is F.embedding:
        return "embedding", _arg(args, kwargs, 1, "weight")
    return None


@functools.cache
def _transparent(func: Callable) -> Callable | None:
    """``func`` (a Python function that dispatches to ``__torch_function__``) without that dispatch.

    A mode's handler runs with the mode popped, so the torch calls nested inside a function it is
    handed are unseen; re-entering the mode and calling ``func`` again would dispatch to the handler
    again. This copy of ``func`` reads ``has_torch_function`` as always false — its first line —
    so run under the re-entered mode it executes its body, whose ``F.linear`` calls the mode sees.
    ``None`` if ``func`` does not have that form (then its weights take the direct path).
    """
    code = getattr(func, "__code__", None)
    if code is None or "has_torch_function" not in code.co_names:
        return None
    namespace = {**func.__globals__, "has_torch_function": lambda *_: False}
    clone = FunctionType(code, namespace, func.__name__, func.__defaults__, func.__closure__)
    clone.__kwdefaults__ = func.__kwdefaults__
    return clone


def _carries_values(out: Any) -> bool:
    """Whether a call's output can carry its inputs' values.

    Metadata queries such as ``.dtype`` or ``.is_floating_point()`` return no floating tensor, so
    they are not uses of a weight.
    """
    if isinstance(out, Tensor):  # the common case, without a tree walk
        return out.is_floating_point()
    return any(isinstance(x, Tensor) and x.is_floating_point() for x in optree.tree_leaves(out))


class _ProbeMode(TorchFunctionMode):
    """Adds probes to (and records inputs of) the calls that use target weights.

    In discovery (``probes=None``) it counts every use of every target weight in any torch
    function's arguments, and records the supported uses' output shapes.
    """

    def __init__(self, slots: dict[int, int], probes: Sequence[Tensor] | None = None) -> None:
        super().__init__()
        self.slots = slots
        self.probes = probes
        n = len(slots)
        self.uses = [0] * n
        self.calls: list[tuple[Op, torch.Size, int | None] | None] = [None] * n
        self.inputs: list[Tensor | None] = [None] * n
        self.ids: list[Tensor | None] = [None] * n

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:  # see into it: its projections are F.linear calls
            body = _transparent(func)
            if body is not None:
                with self:
                    return body(*args, **kwargs)
        found = _weight_of(func, args, kwargs)
        slot = self.slots.get(id(found[1])) if found is not None else None
        out = func(*args, **kwargs)
        if self.probes is None and _carries_values(out):  # discovery: count uses of target weights
            for leaf in optree.tree_leaves((args, kwargs)):
                s = self.slots.get(id(leaf)) if isinstance(leaf, Tensor) else None
                if s is not None:
                    self.uses[s] += 1
        if slot is None:
            return out
        assert found is not None
        op = found[0]
        if op == "embedding":
            ids = _arg(args, kwargs, 0, "input")
            padding_idx = _arg(args, kwargs, 2, "padding_idx")
            plain = _arg(args, kwargs, 3, "max_norm") is None and not _arg(args, kwargs, 5, "scale_grad_by_freq", False)
            if self.probes is None:
                if padding_idx is not None and padding_idx < 0:
                    padding_idx += found[1].shape[0]
                self.calls[slot] = (op, out.shape, padding_idx) if plain else None
            self.ids[slot] = ids
        else:
            self.inputs[slot] = _arg(args, kwargs, 0, "input") if op == "linear" else _arg(args, kwargs, 1, "mat1")
            if self.probes is None:
                self.calls[slot] = (op, out.shape, None)
        if self.probes is not None:
            out = out + self.probes[slot]
        return out


def discover_sites(loss: PerSampleLoss, prepared: Prepared, sample: Any) -> tuple[Site, ...]:
    """Find the weights that can take the factorised path, by one forward of one sample."""
    spec = prepared.spec
    candidates = [i for i in spec.active if len(spec.shapes[i]) == 2 and _need(spec.rules[i]) is not None]
    if not candidates:
        return ()
    slots = {id(prepared.leaves[i]): k for k, i in enumerate(candidates)}
    mode = _ProbeMode(slots)
    with torch.no_grad(), no_autocast(set(prepared.device_types)), mode:
        loss(prepared.params_with(prepared.active), cast_floating(sample, prepared.dtype))
    sites = []
    for k, i in enumerate(candidates):
        call = mode.calls[k]
        if mode.uses[k] == 1 and call is not None:
            op, shape, padding_idx = call
            need = _need(spec.rules[i])
            assert need is not None
            sites.append(Site(leaf=i, op=op, out_shape=shape, need=need, padding_idx=padding_idx))
    return tuple(sites)


def _square_sums(u: Tensor, v: Tensor, need: Need) -> Tensor:
    """Sums of ``G ⊙ G`` for ``G = uᵀ v`` (``u [T, n0]``, ``v [T, n1]``), as rows, columns or full."""
    t, n0, n1 = u.shape[0], u.shape[1], v.shape[1]
    if need == "full":
        g = u.t() @ v
        return g * g
    if need == "cols":
        u, v = v, u
        n0, n1 = n1, n0
    # rows[i] = Σ_j (Σ_t u_ti v_tj)²
    if t == 1:
        return u[0].square() * v[0].square().sum()
    if t * (n0 + n1) < n0 * n1:  # Gram form: Σ_t u_ti (K u)_ti with K = v vᵀ
        return (u * ((v @ v.t()) @ u)).sum(0)
    g = u.t() @ v  # direct form
    return (g * g).sum(1)


def _reduce_sums(rule: Rule, need: Need, sums: Tensor) -> Tensor:
    """``rule.reduce`` of row sums ``[n0]``, column sums ``[n1]`` or the full square ``[n0, n1]``."""
    if need == "rows":
        return rule.reduce(sums.unsqueeze(1))
    if need == "cols":
        return rule.reduce(sums.unsqueeze(0))
    return rule.reduce(sums)


def _embedding_d(site: Site, ids: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Flat ids ``[T]`` and output gradients ``[T, D]``, zero at the padding row's tokens."""
    ids = ids.reshape(-1)
    d = d.reshape(ids.shape[0], -1)
    if site.padding_idx is not None:  # the padding row gets no gradient
        d = d * (ids != site.padding_idx).unsqueeze(1).to(d.dtype)
    return ids, d


def _factors(site: Site, a: Tensor | None, d: Tensor) -> tuple[Tensor, Tensor]:
    """``u [T, n0]``, ``v [T, n1]`` with ``G = uᵀ v`` in the weight's layout.

    The layouts: linear ``[out, in]`` (``u = d``, ``v = a``), addmm ``[in, out]`` (``u = a``, ``v = d``).
    """
    assert a is not None
    a = a.reshape(-1, a.shape[-1])
    d = d.reshape(a.shape[0], -1)
    return (d, a) if site.op == "linear" else (a, d)


def _site_groups(
    site: Site, rule: Rule, weight_shape: torch.Size, a: Tensor | None, ids: Tensor | None, d: Tensor
) -> Tensor:
    """``rule.reduce(G ⊙ G)`` for one sample of one factorised weight, from its factors."""
    if site.op == "embedding":
        assert ids is not None
        ids, d = _embedding_d(site, ids, d)
        if site.need == "full":
            g = d.new_zeros(weight_shape).index_add(0, ids, d)
            return rule.reduce(g * g)
        same = (ids.unsqueeze(0) == ids.unsqueeze(1)).to(d.dtype)  # S_tt'
        if site.need == "rows":
            r = ((d @ d.t()) * same).sum(1)  # r_t = Σ_t' S_tt' d_t·d_t'
            rows = d.new_zeros(weight_shape[0]).index_add(0, ids, r)
            return rule.reduce(rows.unsqueeze(1))
        cols = (d * (same @ d)).sum(0)
        return rule.reduce(cols.unsqueeze(0))
    u, v = _factors(site, a, d)
    return _reduce_sums(rule, site.need, _square_sums(u, v, site.need))


def _summed_at_batch_level(site: Site) -> bool:
    """Whether the chunk sums of a site are contracted outside ``vmap`` (see :func:`_site_parts`).

    Linear-like weights with one vector per sample (``T = 1``): ``Σ_b (u_b ⊗ v_b)² = (u²)ᵀ (v²)``
    is one matrix product for the chunk instead of ``c`` per-sample ``[n0, n1]`` squares.
    Embeddings' full squares and row sums: per-token values scattered once into the table
    instead of one ``[V, D]`` (or ``[V]``) table per sample.
    """
    if site.op == "embedding":
        return site.need in ("full", "rows")
    return math.prod(site.out_shape[:-1]) == 1


def _site_parts(site: Site, a: Tensor | None, ids: Tensor | None, d: Tensor) -> tuple[Tensor, Tensor]:
    """One sample's share of a batch-level site (inside ``vmap``), summed by :func:`_contract`.

    Linear-like (``T = 1``): the factors ``(u, v)``, ``G_b = u vᵀ``. Embedding: the ids ``[T]`` and a
    per-token value ``[T, k]`` whose scatter-add into the rows is the sample's contribution::

        full:  m = S d,  value_t = m_t² · [t is the first token with id_t]   (G_b[id_t] = m_t)
        rows:  value_t = r_t = Σ_t' S_tt' d_t·d_t'
    """
    if site.op != "embedding":
        u, v = _factors(site, a, d)
        return u[0], v[0]
    assert ids is not None
    ids, d = _embedding_d(site, ids, d)
    same = (ids.unsqueeze(0) == ids.unsqueeze(1)).to(d.dtype)  # S_tt'
    if site.need == "rows":
        return ids, ((d @ d.t()) * same).sum(1, keepdim=True)
    first = (same.tril(-1).sum(1) == 0).to(d.dtype)  # no earlier token with the same id
    return ids, (same @ d).square() * first.unsqueeze(1)


def _contract(site: Site, rule: Rule, weight_shape: torch.Size, parts: tuple[Tensor, Tensor]) -> Tensor:
    """``Σ_{b ∈ chunk} rule.reduce(G_b ⊙ G_b)`` of a batch-level site from its stacked parts.

    ``rule.reduce`` only sums entries, so it commutes with the sum over samples. Linear-like with
    ``u [c, n0]``, ``v [c, n1]``::

        full = (u²)ᵀ (v²),   rows = (u²)ᵀ ‖v‖²,   cols = (v²)ᵀ ‖u‖²
    """
    if site.op == "embedding":
        ids, values = parts
        k = values.shape[-1]
        table = values.new_zeros(weight_shape[0], k).index_add(0, ids.reshape(-1), values.reshape(-1, k))
        return rule.reduce(table)  # full: [V, D]; rows: [V, 1]
    u2, v2 = parts[0].square(), parts[1].square()
    if site.need == "full":
        sums = u2.t() @ v2
    elif site.need == "rows":
        sums = u2.t() @ v2.sum(1)
    else:
        sums = v2.t() @ u2.sum(1)
    return _reduce_sums(rule, site.need, sums)


def probe_chunk_fns(
    loss: PerSampleLoss,
    prepared: Prepared,
    sites: Sequence[Site],
    *,
    randomness: str | None = None,
    labels: LabelSets | None = None,
) -> ChunkFns:
    """Both forms of the per-chunk computation using probes for ``sites``, direct gradients elsewhere.

    ``randomness`` goes to ``vmap``; ``None`` takes the loss's own (see :func:`~fisherfunc.dropout.vmap_randomness`).
    With ``labels`` (the ``"mc"`` / ``"exact"`` kinds, :mod:`fisherfunc.kinds`) a chunk is
    ``(samples, noise)``: one forward records the layer inputs ``a``, and each label set's
    cotangent is pulled back to the probes and direct params, ``d_j``; the factorised sums
    use ``a`` and ``d_j``, weighted and summed over the sets inside ``vmap``.

    The sums form contracts the sites of :func:`_summed_at_batch_level` outside ``vmap``
    (empirical kind only; with ``labels`` it sums the per-sample values).
    """
    spec = prepared.spec
    site_of = {s.leaf: s for s in sites}
    direct = [i for i in spec.active if i not in site_of]
    slots = {id(prepared.leaves[s.leaf]): k for k, s in enumerate(sites)}
    dtype = prepared.dtype
    device = prepared.active[0].device
    probes = tuple(torch.zeros(s.out_shape, dtype=dtype, device=device) for s in sites)
    position = {i: k for k, i in enumerate(spec.active)}

    def under_probes(call: Callable, direct_params: tuple[Tensor, ...], probe_values: tuple[Tensor, ...], sample: Any):
        # call(params, sample) with probes added; returns its output and the recorded inputs and ids
        active = list(prepared.active)
        for i, p in zip(direct, direct_params):
            active[position[i]] = p
        mode = _ProbeMode(slots, probe_values)
        with mode:
            out = call(prepared.params_with(tuple(active)), sample)
        empty = torch.zeros(0, dtype=dtype, device=device)
        inputs = tuple(x if x is not None else empty for x in mode.inputs)
        ids = tuple(x if x is not None else empty for x in mode.ids)
        return out, (inputs, ids)

    def sample_loss(direct_params: tuple[Tensor, ...], probe_values: tuple[Tensor, ...], sample: Any):
        (value, tokens), recorded = under_probes(loss, direct_params, probe_values, sample)
        if not isinstance(value, Tensor) or value.ndim != 0:
            raise ValueError("the per-sample loss must return a scalar loss_sum")
        return value, (torch.as_tensor(tokens, dtype=dtype), recorded)

    def make_reduce(batch_level: frozenset[int]) -> Callable[[tuple, tuple], tuple]:
        def reduce(grads: tuple, recorded: tuple) -> tuple:
            (g_direct, d_probes), (inputs, ids) = grads, recorded
            out: list[Any] = [None] * len(spec.active)
            for i, g in zip(direct, g_direct):
                out[position[i]] = spec.rules[i].reduce(g.square())
            for k, site in enumerate(sites):
                if k in batch_level:
                    out[position[site.leaf]] = _site_parts(site, inputs[k], ids[k], d_probes[k])
                else:
                    out[position[site.leaf]] = _site_groups(
                        site, spec.rules[site.leaf], spec.shapes[site.leaf], inputs[k], ids[k], d_probes[k]
                    )
            return tuple(out)

        return reduce

    def make_batched(batch_level: frozenset[int]) -> Callable:
        reduce = make_reduce(batch_level)

        def per_sample(direct_params: tuple[Tensor, ...], probe_values: tuple[Tensor, ...], sample: Any):
            grads, (tokens, recorded) = grad(sample_loss, argnums=(0, 1), has_aux=True)(
                direct_params, probe_values, sample
            )
            return reduce(grads, recorded), tokens

        def per_sample_labelled(direct_params: tuple[Tensor, ...], probe_values: tuple[Tensor, ...], sample_noise: Any):
            assert labels is not None
            sample, noise = sample_noise

            def predict(direct_params: tuple[Tensor, ...], probe_values: tuple[Tensor, ...]):
                return under_probes(labels.loss.forward, direct_params, probe_values, sample)

            return labels.expected_squares(predict, (direct_params, probe_values), reduce, sample, noise)

        return vmap(
            per_sample if labels is None else per_sample_labelled,
            in_dims=(None, None, 0),
            randomness=randomness or vmap_randomness(loss),
        )

    direct_params = tuple(prepared.active[position[i]] for i in direct)
    per_sample_batched = make_batched(frozenset())

    def chunk_fn(chunk: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        with no_autocast(set(prepared.device_types)):
            return per_sample_batched(direct_params, probes, cast_floating(chunk, dtype))

    batch_level = frozenset(k for k, s in enumerate(sites) if _summed_at_batch_level(s)) if labels is None else None
    if not batch_level:
        return summed(chunk_fn)
    sums_batched = make_batched(batch_level)
    contract_at = {position[s.leaf]: s for k, s in enumerate(sites) if k in batch_level}

    def sums_fn(chunk: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        with no_autocast(set(prepared.device_types)):
            parts, tokens = sums_batched(direct_params, probes, cast_floating(chunk, dtype))
            sums = []
            for j, part in enumerate(parts):
                site = contract_at.get(j)
                if site is None:
                    sums.append(part.sum(0))
                else:
                    sums.append(_contract(site, spec.rules[site.leaf], spec.shapes[site.leaf], part))
            return tuple(sums), tokens

    return ChunkFns(chunk_fn, sums_fn)


def probe_chunk_fn(
    loss: PerSampleLoss,
    prepared: Prepared,
    sites: Sequence[Site],
    *,
    randomness: str | None = None,
    labels: LabelSets | None = None,
) -> ChunkFn:
    """A :data:`~fisherfunc.per_sample.ChunkFn` using probes for ``sites``, direct gradients elsewhere.

    The per-sample form of :func:`probe_chunk_fns` (see there for the arguments).
    """
    return probe_chunk_fns(loss, prepared, sites, randomness=randomness, labels=labels).per_sample


def auto_chunk_fns(
    loss: PerSampleLoss,
    prepared: Prepared,
    sample: Any,
    *,
    labels: LabelSets | None = None,
    sites: Sequence[Site] | None = None,
) -> ChunkFns:
    """Probes where a weight qualifies (found from ``sample``), the direct path otherwise; both forms.

    ``labels``: the label sets of the ``"mc"`` / ``"exact"`` kinds, or ``None`` (empirical).
    ``sites``: :func:`discover_sites`' result for such a sample, when already known.
    """
    if sites is None:
        sites = discover_sites(loss, prepared, sample)
    if not sites:
        return summed(direct_chunk_fn(loss, prepared, labels=labels))
    return probe_chunk_fns(loss, prepared, sites, labels=labels)


def auto_chunk_fn(loss: PerSampleLoss, prepared: Prepared, sample: Any, *, labels: LabelSets | None = None) -> ChunkFn:
    """The per-sample form of :func:`auto_chunk_fns`."""
    return auto_chunk_fns(loss, prepared, sample, labels=labels).per_sample
