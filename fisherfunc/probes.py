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
back as auxiliary output. The factorised weights are not differentiated at all.

A weight qualifies when a shape-discovery call (one sample, no gradients) sees it used exactly once,
by one of those calls, and its rule needs only row sums, column sums or the full square. Anything
else — a weight used twice (tied embeddings, recurrent weights: the square of a sum has cross
terms), passed to another function (the attention projections inside
``F.multi_head_attention_forward``), norms, biases — is differentiated directly in the same
``grad`` call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import optree
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap
from torch.overrides import TorchFunctionMode

from .batch import cast_floating
from .dropout import vmap_randomness
from .per_sample import ChunkFn, PerSampleLoss, Prepared, direct_chunk_fn, no_autocast
from .rules import Buckets, Channel, Elementwise, Heads, Rows, Rule, Whole

if TYPE_CHECKING:
    from .kinds import LabelSets

__all__ = ["Site", "discover_sites", "probe_chunk_fn", "auto_chunk_fn"]

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


def _carries_values(out: Any) -> bool:
    """Whether a call's output can carry its inputs' values.

    Metadata queries such as ``.dtype`` or ``.is_floating_point()`` return no floating tensor, so
    they are not uses of a weight.
    """
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


def _site_groups(
    site: Site, rule: Rule, weight_shape: torch.Size, a: Tensor | None, ids: Tensor | None, d: Tensor
) -> Tensor:
    """``rule.reduce(G ⊙ G)`` for one sample of one factorised weight, from its factors."""
    if site.op == "embedding":
        assert ids is not None
        ids = ids.reshape(-1)
        d = d.reshape(ids.shape[0], -1)
        if site.padding_idx is not None:  # the padding row gets no gradient
            d = d * (ids != site.padding_idx).unsqueeze(1).to(d.dtype)
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
    assert a is not None
    a = a.reshape(-1, a.shape[-1])
    d = d.reshape(a.shape[0], -1)
    u, v = (d, a) if site.op == "linear" else (a, d)  # weight layout: linear [out, in], addmm [in, out]
    sums = _square_sums(u, v, site.need)
    if site.need == "rows":
        return rule.reduce(sums.unsqueeze(1))
    if site.need == "cols":
        return rule.reduce(sums.unsqueeze(0))
    return rule.reduce(sums)


def probe_chunk_fn(
    loss: PerSampleLoss,
    prepared: Prepared,
    sites: Sequence[Site],
    *,
    randomness: str | None = None,
    labels: LabelSets | None = None,
) -> ChunkFn:
    """A :data:`~fisherfunc.per_sample.ChunkFn` using probes for ``sites``, direct gradients elsewhere.

    ``randomness`` goes to ``vmap``; ``None`` takes the loss's own (see :func:`~fisherfunc.dropout.vmap_randomness`).
    With ``labels`` (the ``"mc"`` / ``"exact"`` kinds, :mod:`fisherfunc.kinds`) a chunk is
    ``(samples, noise)``: one forward records the layer inputs ``a``, and each label set's
    cotangent is pulled back to the probes and direct params, ``d_j``; the factorised sums
    use ``a`` and ``d_j``, weighted and summed over the sets inside ``vmap``.
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

    def reduce(grads: tuple, recorded: tuple) -> tuple[Tensor, ...]:
        (g_direct, d_probes), (inputs, ids) = grads, recorded
        out: list[Tensor | None] = [None] * len(spec.active)
        for i, g in zip(direct, g_direct):
            out[position[i]] = spec.rules[i].reduce(g.square())
        for k, site in enumerate(sites):
            out[position[site.leaf]] = _site_groups(
                site, spec.rules[site.leaf], spec.shapes[site.leaf], inputs[k], ids[k], d_probes[k]
            )
        return tuple(out)  # type: ignore[arg-type]

    def per_sample(direct_params: tuple[Tensor, ...], probe_values: tuple[Tensor, ...], sample: Any):
        grads, (tokens, recorded) = grad(sample_loss, argnums=(0, 1), has_aux=True)(direct_params, probe_values, sample)
        return reduce(grads, recorded), tokens

    def per_sample_labelled(direct_params: tuple[Tensor, ...], probe_values: tuple[Tensor, ...], sample_noise: Any):
        assert labels is not None
        sample, noise = sample_noise

        def predict(direct_params: tuple[Tensor, ...], probe_values: tuple[Tensor, ...]):
            return under_probes(labels.loss.forward, direct_params, probe_values, sample)

        return labels.expected_squares(predict, (direct_params, probe_values), reduce, sample, noise)

    batched = vmap(
        per_sample if labels is None else per_sample_labelled,
        in_dims=(None, None, 0),
        randomness=randomness or vmap_randomness(loss),
    )
    direct_params = tuple(prepared.active[position[i]] for i in direct)

    def chunk_fn(chunk: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        with no_autocast(set(prepared.device_types)):
            return batched(direct_params, probes, cast_floating(chunk, dtype))

    return chunk_fn


def auto_chunk_fn(loss: PerSampleLoss, prepared: Prepared, sample: Any, *, labels: LabelSets | None = None) -> ChunkFn:
    """Probes where a weight qualifies (found from ``sample``), the direct path otherwise.

    ``labels``: the label sets of the ``"mc"`` / ``"exact"`` kinds, or ``None`` (empirical).
    """
    sites = discover_sites(loss, prepared, sample)
    if not sites:
        return direct_chunk_fn(loss, prepared, labels=labels)
    return probe_chunk_fn(loss, prepared, sites, labels=labels)
