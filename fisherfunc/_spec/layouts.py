"""The family table: how each Hugging Face attention module lays out its heads, stated once.

A row (:class:`Family`) names the attention modules it describes — by class name, or by the
projections they own — and, for every projection, which head parts its rows hold (its *roles*, in
storage order) and how fused parts are arranged (:class:`~fisherfunc.Heads`' ``layout``)::

    H  = the module's num_heads / num_attention_heads / n_heads / n_head, else its config's
    KV = its num_key_value_heads / num_kv_heads / kv_heads, else its config's, else H
    d  = the head width: the module's head_dim, else the config's; every projection must agree

| row         | matched by (class, or projections owned) | projections: roles (fused layout of the axis)           |
|-------------|------------------------------------------|---------------------------------------------------------|
| convbert    | ``ConvBertAttention``                    | self.query q, self.key k, self.value v; output.dense o- |
| bert        | self.{query,key,value}, output.dense     | q, k, v; o                                              |
| vit         | attention.{query,key,value}, output.dense| q, k, v; o                                              |
| gpt_bigcode | ``GPTBigCodeAttention``, multi_query     | c_attn qkv ``[Q: H·d │ K: d │ V: d]``; c_proj o         |
| gpt_bigcode | ``GPTBigCodeAttention``, not multi_query | c_attn qkv interleaved ``[H, 3, d]``; c_proj o          |
| gpt2        | q_attn, c_attn, c_proj (cross-attention) | q_attn q; c_attn kv ``[K │ V]``; c_proj o               |
| gpt2        | c_attn, c_proj (``Conv1D``: (in, out))   | c_attn qkv ``[Q │ K │ V]``; c_proj o                    |
| gpt_neox    | ``GPTNeoXAttention``                     | query_key_value qkv interleaved ``[H, 3, d]``; dense o  |
| bloom       | ``BloomAttention``                       | query_key_value qkv interleaved ``[H, 3, d]``; dense o  |
| falcon      | ``FalconAttention``, new architecture    | query_key_value qkv interleaved ``[KV, H/KV + 2, d]``   |
| falcon      | ``FalconAttention``, multi_query         | query_key_value qkv ``[Q: H·d │ K: d │ V: d]``          |
| falcon      | ``FalconAttention``, neither             | query_key_value qkv interleaved ``[H, 3, d]``; dense o  |
| codegen     | ``CodeGenAttention``                     | qkv_proj qvk in S shards ``[S, Q │ V │ K]`` (S: mp_num) |
| phi3        | qkv_proj, o_proj                         | qkv_proj qkv ``[Q: H·d │ K: KV·d │ V: KV·d]``; o_proj o |
| llama       | q_proj, k_proj, v_proj, o_proj           | q (H heads), k, v (KV heads); o                         |
| phi         | q_proj, k_proj, v_proj, dense            | q (H heads), k, v (KV heads); o                         |
| bart        | q_proj, k_proj, v_proj, out_proj         | q, k, v; o                                              |
| distilbert  | q_lin, k_lin, v_lin, out_lin             | q, k, v; o                                              |
| t5          | q, k, v, o                               | q, k, v; o                                              |

Falcon's and CodeGen's output projection (``dense``, ``out_proj``) is o. CodeGen's shard count
``S`` is its module's ``mp_num`` (transformers 5.24 stores it); transformers 5.0's
``CodeGenAttention`` has no such attribute and hard-codes ``mp_num = 4`` in its forward (the same
``[S, Q │ V │ K]`` layout, head ``h`` in shard ``h // (H / S)``), so the row falls back to 4 there —
a claim the self-test checks like any other. ``o-`` is ConvBERT's
output projection, whose input is ``[attention heads │ convolution spans]``: one part per head, one
part that is no head's. The models each row covers are in :data:`FAMILIES` (``Family.models``).

Rows are tried in order; the first that fits a module wins (so class-specific rows come before the
structural ones whose projections they share). Only modules whose class comes from ``transformers``
are read. A row is a claim, not a fact: before its rules are trusted, the layout is checked on the
live module (:mod:`~fisherfunc._spec.verify`).

**Self and cross attention**: a module is cross-attention when its ``is_cross_attention`` is true
or it is its parent's ``encoder_attn`` (BART-like, Whisper), ``EncDecAttention`` (T5) or
``crossattention`` (BERT-like).

**T5's relative attention bias** ``relative_attention_bias.weight [buckets, H]`` lives in the first
layer of each stack and is added to the attention scores of head ``h`` of *every* layer of that
stack: it is no one layer's head weight, so it keeps the embedding rule ``Rows()`` (one value per
relative-position bucket) and stays out of :func:`fisherfunc.head_importance`. For one value per
head index across the stack, pass ``overrides={"*.relative_attention_bias.weight": Channel(1)}``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any, Literal, cast

from torch import nn

from .rules import Heads, Rule, SpecError

__all__ = [
    "Role",
    "Projection",
    "Family",
    "FAMILIES",
    "HeadPart",
    "AttentionBlock",
    "is_hf_module",
    "is_conv1d",
    "configs",
    "matches",
    "build_block",
    "CROSS_NAMES",
]

#: A part of a head: its query rows, key rows, value rows, or output-projection columns; ``"-"``
#: marks a fused part that belongs to no attention head (ConvBERT's convolution spans).
Role = Literal["q", "k", "v", "o", "-"]
Layout = Literal["blocked", "interleaved"]

#: Names under which a parent holds its cross-attention module.
CROSS_NAMES = ("encoder_attn", "EncDecAttention", "crossattention")
_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV = ("num_key_value_heads", "num_kv_heads", "kv_heads")


@dataclasses.dataclass(frozen=True)
class Projection:
    """One projection of an attention module.

    Attributes:
        path: the ``nn.Linear`` (or ``Conv1D``) submodule, relative to the attention module.
        roles: its fused parts in storage order, one letter each (:data:`Role`): ``"q"``, ``"o"``,
            ``"qkv"``, ``"kv"``, ``"qvk"`` (CodeGen), ``"o-"`` (ConvBERT's output: heads, then spans).
        layout: how fused parts are arranged (:class:`~fisherfunc.Heads`).
        shards: ``(attribute, default)``: the attention module's attribute holding a shard count
            (CodeGen's ``mp_num``), and the count its forward uses when the module has no such
            attribute (transformers 5.0's CodeGen hard-codes 4). ``None``: one shard.
    """

    path: str
    roles: str
    layout: Layout = "blocked"
    shards: tuple[str, int] | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    """A row of the table.

    Attributes:
        name: the family.
        models: the models it covers (documentation).
        projections: the projections every matching module owns, with their roles.
        classes: class names that select the row; empty: any ``transformers`` module owning the projections.
        when: ``(attribute, value)`` pairs the module must show (Falcon's ``multi_query``, ...).
        heads_from: the submodule whose attributes count the heads (``"self"`` for BERT-like), ``""``: the module.
    """

    name: str
    models: str
    projections: tuple[Projection, ...]
    classes: tuple[str, ...] = ()
    when: tuple[tuple[str, object], ...] = ()
    heads_from: str = ""


def _p(path: str, roles: str, layout: Layout = "blocked", shards: tuple[str, int] | None = None) -> Projection:
    return Projection(path, roles, layout, shards)


#: The table (module docstring), in matching order.
FAMILIES: tuple[Family, ...] = (
    Family("convbert", "ConvBERT", (_p("self.query", "q"), _p("self.key", "k"), _p("self.value", "v"),
           _p("output.dense", "o-")), classes=("ConvBertAttention",), heads_from="self"),
    Family("bert", "BERT, RoBERTa, XLM-R, ELECTRA, CamemBERT", (_p("self.query", "q"), _p("self.key", "k"),
           _p("self.value", "v"), _p("output.dense", "o")), heads_from="self"),
    Family("vit", "ViT, DeiT, DINOv2, ViT-MAE, VideoMAE, YOLOS (as transformers 5.0 lays them out)",
           (_p("attention.query", "q"), _p("attention.key", "k"), _p("attention.value", "v"), _p("output.dense", "o")),
           heads_from="attention"),
    Family("gpt_bigcode", "GPT-BigCode (StarCoder), multi-query", (_p("c_attn", "qkv"), _p("c_proj", "o")),
           classes=("GPTBigCodeAttention",), when=(("multi_query", True), ("is_cross_attention", False))),
    Family("gpt_bigcode", "GPT-BigCode, multi-head", (_p("c_attn", "qkv", "interleaved"), _p("c_proj", "o")),
           classes=("GPTBigCodeAttention",), when=(("multi_query", False), ("is_cross_attention", False))),
    Family("gpt2", "GPT-2 cross-attention", (_p("q_attn", "q"), _p("c_attn", "kv"), _p("c_proj", "o"))),
    Family("gpt2", "GPT-2", (_p("c_attn", "qkv"), _p("c_proj", "o"))),
    Family("gpt_neox", "GPT-NeoX, Pythia", (_p("query_key_value", "qkv", "interleaved"), _p("dense", "o")),
           classes=("GPTNeoXAttention",)),
    Family("bloom", "Bloom", (_p("query_key_value", "qkv", "interleaved"), _p("dense", "o")),
           classes=("BloomAttention",)),
    Family("falcon", "Falcon, new decoder architecture", (_p("query_key_value", "qkv", "interleaved"),
           _p("dense", "o")), classes=("FalconAttention",), when=(("new_decoder_architecture", True),)),
    Family("falcon", "Falcon, multi-query", (_p("query_key_value", "qkv"), _p("dense", "o")),
           classes=("FalconAttention",), when=(("new_decoder_architecture", False), ("multi_query", True))),
    Family("falcon", "Falcon, multi-head", (_p("query_key_value", "qkv", "interleaved"), _p("dense", "o")),
           classes=("FalconAttention",), when=(("new_decoder_architecture", False), ("multi_query", False))),
    Family("codegen", "CodeGen", (_p("qkv_proj", "qvk", shards=("mp_num", 4)), _p("out_proj", "o")),
           classes=("CodeGenAttention",)),
    Family("phi3", "Phi-3", (_p("qkv_proj", "qkv"), _p("o_proj", "o"))),
    Family("llama", "Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma-2, Starcoder2, ViT (5.24)", (_p("q_proj", "q"),
           _p("k_proj", "k"), _p("v_proj", "v"), _p("o_proj", "o"))),
    Family("phi", "Phi", (_p("q_proj", "q"), _p("k_proj", "k"), _p("v_proj", "v"), _p("dense", "o"))),
    Family("bart", "OPT, GPT-J, BART, mBART, Marian, Whisper", (_p("q_proj", "q"), _p("k_proj", "k"),
           _p("v_proj", "v"), _p("out_proj", "o"))),
    Family("distilbert", "DistilBERT", (_p("q_lin", "q"), _p("k_lin", "k"), _p("v_lin", "v"), _p("out_lin", "o"))),
    Family("t5", "T5, mT5", (_p("q", "q"), _p("k", "k"), _p("v", "v"), _p("o", "o"))),
)  # fmt: skip


# --- matching ------------------------------------------------------------------------------------


def is_hf_module(module: nn.Module) -> bool:
    """Whether ``module``'s class is defined by ``transformers`` (or its remote-code modules)."""
    return type(module).__module__.startswith("transformers")


def is_conv1d(module: Any) -> bool:
    """Whether ``module`` is a ``transformers`` ``Conv1D`` (weight stored ``(in, out)``)."""
    return isinstance(module, nn.Module) and type(module).__name__ == "Conv1D" and is_hf_module(module)


def _projection(module: nn.Module, path: str) -> nn.Module | None:
    try:
        child = module.get_submodule(path)
    except AttributeError:
        return None
    return child if isinstance(child, nn.Linear) or is_conv1d(child) else None


def configs(model: nn.Module) -> dict[str, Any]:
    """The config of every module: its own ``.config``, else its nearest ancestor's."""
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        own = getattr(module, "config", None)
        if own is not None and not isinstance(own, nn.Module):
            out[name] = own
        else:
            parent = name.rpartition(".")[0] if name else None
            out[name] = out.get(parent) if parent is not None else None
    return out


def _fits(family: Family, module: nn.Module) -> bool:
    if family.classes and type(module).__name__ not in family.classes:
        return False
    if any(bool(getattr(module, attr, False)) != value for attr, value in family.when):
        return False
    return all(_projection(module, p.path) is not None for p in family.projections)


def matches(model: nn.Module) -> Iterator[tuple[Family, str, nn.Module]]:
    """``(row, module name, module)`` for every ``transformers`` module of ``model`` that a row describes."""
    for name, module in model.named_modules():
        if is_hf_module(module):
            family = next((f for f in FAMILIES if _fits(f, module)), None)
            if family is not None:
                yield family, name, module


# --- a module's heads, read off the live module ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeadPart:
    """Which groups of one parameter hold one part of every head.

    Attributes:
        param: the parameter's dotted name in the model.
        role: ``"q"``, ``"k"``, ``"v"`` or ``"o"``.
        start: the part's first group in the parameter's flattened groups.
        stop: one past its last (``stop − start`` heads: ``H`` for q and o, ``KV`` for k and v).
        shape: the parameter's group shape (all its parts): ``[H]``, ``[parts, H]`` or ``[H + 2·KV]``.
    """

    param: str
    role: Role
    start: int
    stop: int
    shape: tuple[int, ...]

    @property
    def groups(self) -> int:
        """The parameter's number of groups."""
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class AttentionBlock:
    """One attention module's heads: its rules and which of their groups make each head.

    Attributes:
        module: the attention module's dotted name.
        family: the table row's name (``"torch"`` for ``nn.MultiheadAttention``).
        attention: ``"self"`` or ``"cross"``.
        heads: query heads ``H`` (also the output projection's column blocks).
        kv_heads: key-value heads ``KV``; query head ``h`` reads key-value head ``h // (H / KV)``.
        parts: every head part of every parameter with a per-head rule.
        rules: ``{parameter name: rule}`` for those parameters.
        errors: ``{parameter name: error}`` for the module's parameters whose sizes contradict the
            head counts (no rule is placed for them).
    """

    module: str
    family: str
    attention: Literal["self", "cross"]
    heads: int
    kv_heads: int
    parts: tuple[HeadPart, ...]
    rules: dict[str, Rule] = dataclasses.field(default_factory=dict, compare=False)
    errors: dict[str, SpecError] = dataclasses.field(default_factory=dict, compare=False)


def _join(prefix: str, local: str) -> str:
    return f"{prefix}.{local}" if prefix else local


def _count(sources: tuple[Any, ...], names: tuple[str, ...]) -> int | None:
    for source in sources:
        for attr in names:
            value = getattr(source, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _attention_kind(model: nn.Module, name: str, module: nn.Module) -> Literal["self", "cross"]:
    local = name.rpartition(".")[2]
    return "cross" if getattr(module, "is_cross_attention", False) is True or local in CROSS_NAMES else "self"


def build_block(model: nn.Module, family: Family, name: str, module: nn.Module, config: Any) -> AttentionBlock:
    """The :class:`AttentionBlock` of ``module`` as ``family`` describes it.

    Raises:
        SpecError: if the head count cannot be read at all (names the module and the override).
    """
    counter = module.get_submodule(family.heads_from) if family.heads_from else module
    where = _join(name, family.heads_from)
    h = _count((counter, config), _HEADS)
    if h is None:
        raise SpecError(
            f"infer_spec: cannot read the number of attention heads of '{where}' ({type(counter).__name__}): neither "
            f"it nor its config has {' / '.join(_HEADS)}. Give its parameters rules with overrides=, e.g. "
            f"overrides={{'{where}.*': fisherfunc.Channel(0)}}"
        )
    kv = _count((counter, config), _KV) or h
    head_dim = _count((counter, config), ("head_dim",))
    rules: dict[str, Rule] = {}
    errors: dict[str, SpecError] = {}
    parts: list[HeadPart] = []
    width: tuple[str, int] | None = None  # (parameter, head width) of the first projection
    for proj in family.projections:
        layer = module.get_submodule(proj.path)
        counts = [kv if role in "kv" else h for role in proj.roles]
        conv1d = is_conv1d(layer)
        output = proj.roles[0] in "o-"
        axis = (0 if conv1d else 1) if output else (1 if conv1d else 0)
        weight = _join(_join(name, proj.path), "weight")
        size = cast(nn.Parameter, layer.weight).shape[axis]
        shards = int(getattr(module, proj.shards[0], proj.shards[1])) if proj.shards else 1
        rule = Heads(
            counts[0],
            axis=axis,
            parts=len(proj.roles),
            kv_heads=counts[1] if len(counts) > 1 and counts[1] != counts[0] else None,
            layout=proj.layout if len(counts) > 1 else "blocked",
            shards=shards,
        )
        error = _size_error(weight, size, counts, head_dim, width, "columns" if output else "rows")
        width = width or (weight, size // sum(counts))
        params = [(weight, rule)]
        if not output:
            params.append((_join(_join(name, proj.path), "bias"), dataclasses.replace(rule, axis=0)))
        for param, placed in params:
            if not _present(model, param):
                continue
            if error is not None:
                errors[param] = error
                continue
            rules[param] = placed
            shape = tuple(placed.group_shape(model.get_parameter(param).shape, param))
            first = 0
            for role, n in zip(proj.roles, counts):
                if role != "-":
                    parts.append(HeadPart(param, cast(Role, role), first, first + n, shape))
                first += n
    kind = _attention_kind(model, name, module)
    return AttentionBlock(name, family.name, kind, h, kv, tuple(parts), rules, errors)


def _size_error(
    param: str, size: int, counts: list[int], head_dim: int | None, width: tuple[str, int] | None, what: str
) -> SpecError | None:
    """An error if ``size`` is not ``Σ counts × d`` for the one head width ``d`` of the module."""
    heads = " + ".join(map(str, counts))
    fix = (
        f"Give it a rule with overrides=, e.g. overrides={{'{param.rpartition('.')[0]}.*': "
        f"fisherfunc.Heads(<heads>{', axis=1' if what == 'columns' else ''})}}"
    )
    if head_dim is not None:
        if size != sum(counts) * head_dim:
            return SpecError(
                f"infer_spec: '{param}' has {size} {what}, but the config says {heads} heads × head_dim {head_dim} = "
                f"{sum(counts) * head_dim}. {fix}"
            )
        return None
    if size % sum(counts) or (width is not None and size != sum(counts) * width[1]):
        other = f" ('{width[0]}' has heads of width {width[1]})" if width is not None else ""
        return SpecError(
            f"infer_spec: '{param}' has {size} {what}, which {heads} heads of one width cannot fill{other}. {fix}"
        )
    return None


def _present(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True
