"""Attention-head importance: one number per head of every layer, from a group Fisher tree or a state.

A head is its query rows, key rows and value rows and its columns of the output projection (with
their biases, when the spec gives them per-head rules). The layout — which parameter, and which
part of a fused projection, holds which part of which head — is read off the live model
(:func:`~fisherfunc._spec.families.attention_blocks`, the same table ``infer_spec`` uses), never
guessed from names. For the ``l``-th attention module of a kind (self- or cross-attention)::

    Q[l, h], O[l, h]   the query rows' and output columns' Fisher of query head h       (H heads)
    K[l, g], V[l, g]   the key and value rows' Fisher of key-value head g               (KV heads)

**Grouped-query and multi-query attention** (``KV < H``): query head ``h`` reads key-value head
``g(h) = ⌊h / r⌋`` with ``r = H / KV`` (transformers' ``repeat_kv``; the tests check it on a live
model). A key-value head's Fisher is shared equally by the ``r`` query heads that read it::

    matrix[l, h]    = Q[l, h] + O[l, h] + (K[l, g(h)] + V[l, g(h)]) / r          [layers, H]
    kv_groups[l, g] = K[l, g] + V[l, g] + Σ_{h: g(h) = g} (Q[l, h] + O[l, h])   [layers, KV]

so both views sum to the total Fisher of the attention parameters with per-head rules, and for
multi-head attention (``r = 1``) the two are the same matrix. Example: 4 query heads reading 2
key-value heads (``r = 2``) with ``Q = [1, 2, 3, 4]``, ``O = 0``, ``K = [10, 20]``, ``V = 0`` give
``matrix = [6, 7, 13, 14]`` and ``kv_groups = [13, 27]``.

>>> import torch, fisherfunc as ff
>>> model = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
>>> F = ff.fisher(ff.losses.regression(model), dict(model.named_parameters()),
...               (torch.randn(3, 5, 8), torch.randn(3, 5, 8)))
>>> ff.head_importance(F, model).matrix.shape          # [layers, heads]
torch.Size([1, 2])
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor, nn

from ._naming import path_name
from ._spec.families import AttentionBlock, HeadPart, attention_blocks
from ._state.state import FisherState, estimate

__all__ = ["HeadImportance", "head_importance"]


class HeadImportance(NamedTuple):
    """Per-head Fisher of one kind of attention (self or cross) in every layer.

    Attributes:
        matrix: ``[layers, H]`` the importance of each query head (see the module docstring);
            ``[B, layers, H]`` for per-sample groups.
        parts: ``{"q", "k", "v", "o"}`` each shaped like ``matrix``; ``"k"`` and ``"v"`` are the
            shares ``K[l, g(h)] / r``, so ``matrix == q + k + v + o``.
        kv_groups: ``[layers, KV]`` (``[B, layers, KV]``) the importance of each key-value group.
        layers: the attention modules' names, one per row.
        heads: ``H``.
        kv_heads: ``KV``.
        attention: ``"self"`` or ``"cross"``.
    """

    matrix: Tensor
    parts: dict[str, Tensor]
    kv_groups: Tensor
    layers: tuple[str, ...]
    heads: int
    kv_heads: int
    attention: str


def _flat(groups: Any) -> dict[str, Tensor | None]:
    if isinstance(groups, FisherState):
        groups = estimate(groups)
    paths, leaves, _ = optree.tree_flatten_with_path(groups, none_is_leaf=True)
    return {path_name(p): v for p, v in zip(paths, leaves)}


def _part(flat: dict[str, Tensor | None], part: HeadPart, block: AttentionBlock, lead: tuple[int, ...]) -> Tensor:
    """The ``[*lead, stop − start]`` per-head values of one part of a parameter; zeros for ``Skip()``."""
    size = part.stop - part.start
    if part.param not in flat:
        raise KeyError(f"the group tree has no entry for '{part.param}' of attention module '{block.module}'")
    value = flat[part.param]
    if value is None:  # Skip(): no Fisher was computed, so it adds nothing
        return torch.zeros(*lead, size, dtype=torch.float64)
    value = value.detach().to("cpu", torch.float64)
    if tuple(value.shape) != (*lead, *part.shape):
        fused = f" (a fused projection; its {part.role.upper()} heads are groups {part.start}..{part.stop - 1})"
        raise ValueError(
            f"parameter '{part.param}'{fused if size != part.groups else ''} has group values of shape "
            f"{tuple(value.shape)}, not one per head ({(*lead, *part.shape)}): compute the Fisher with the "
            "per-head rules of fisherfunc.infer_spec(model) (Heads)"
        )
    return value.reshape(*lead, part.groups)[..., part.start : part.stop]


def _lead(flat: dict[str, Tensor | None], block: AttentionBlock) -> tuple[int, ...]:
    """Leading dimensions of the values (``(B,)`` for per-sample groups, ``()`` for a group tree)."""
    part = next((p for p in block.parts if flat.get(p.param) is not None), None)
    if part is None:
        return ()
    value = flat[part.param]
    assert value is not None
    return tuple(value.shape[: max(value.ndim - len(part.shape), 0)])


def head_importance(groups: Any, model: nn.Module, *, attention: str = "self") -> HeadImportance:
    """The ``[layers, heads]`` attention-head importance of a group Fisher tree or a state.

    Args:
        groups: a group tree (from :func:`~fisherfunc.fisher` with the per-head rules of
            :func:`~fisherfunc.infer_spec`), a :class:`~fisherfunc.FisherState` (its bias-corrected
            estimate), or per-sample groups (``PerSampleFisher.groups``, leaves ``[B, ...]``: then
            every result has a leading ``[B]``); skipped parameters contribute nothing.
        model: the model the Fisher is of: its attention modules give the layout.
        attention: ``"self"`` or ``"cross"`` (encoder–decoders and decoders with cross-attention
            have both, as separate matrices).

    Returns:
        A :class:`HeadImportance`, float64 on the CPU (``matrix`` ``[layers, H]``, or ``[B, layers, H]``
        for per-sample groups).

    Raises:
        ValueError: no attention module of that kind, layers with different head counts, or a
            parameter whose group values are not per head.
    """
    if attention not in ("self", "cross"):
        raise ValueError(f"attention must be 'self' or 'cross', got {attention!r}")
    blocks = [b for b in attention_blocks(model) if b.attention == attention]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no {attention}-attention module whose parameters are grouped by heads"
        )
    shapes = {(b.heads, b.kv_heads) for b in blocks}
    if len(shapes) > 1:
        listing = ", ".join(f"'{b.module}': {b.heads} heads / {b.kv_heads} key-value heads" for b in blocks[:4])
        raise ValueError(
            f"the {attention}-attention layers have different head counts ({listing}); no matrix holds them"
        )
    heads, kv = blocks[0].heads, blocks[0].kv_heads
    if heads % kv:
        raise ValueError(f"'{blocks[0].module}': {heads} query heads cannot share {kv} key-value heads evenly")
    flat = _flat(groups)
    lead = _lead(flat, blocks[0])
    sizes = {"q": heads, "k": kv, "v": kv, "o": heads}
    per_role = {role: torch.zeros(*lead, len(blocks), n, dtype=torch.float64) for role, n in sizes.items()}
    for row, block in enumerate(blocks):
        for part in block.parts:
            per_role[part.role][..., row, :] += _part(flat, part, block, lead)
    q, k, v, o = (per_role[role] for role in "qkvo")
    r = heads // kv
    group_of = torch.arange(heads) // r  # query head h reads key-value head ⌊h / r⌋
    shared_k, shared_v = k[..., group_of] / r, v[..., group_of] / r
    matrix = q + shared_k + shared_v + o
    kv_groups = k + v + (q + o).reshape(*lead, len(blocks), kv, r).sum(-1)
    return HeadImportance(
        matrix=matrix,
        parts={"q": q, "k": shared_k, "v": shared_v, "o": o},
        kv_groups=kv_groups,
        layers=tuple(b.module for b in blocks),
        heads=heads,
        kv_heads=kv,
        attention=attention,
    )
