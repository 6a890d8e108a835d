"""Group rules for Hugging Face ``transformers`` layers: attention heads, ``Conv1D``, norms.

:func:`fisherfunc.infer_spec` calls :func:`placements` and lets its rules win over the torch.nn
ones (an attention projection is an ``nn.Linear`` too, but its rows are heads). Which module is
which family, and how it lays out its heads, is the family table (:mod:`~fisherfunc._spec.layouts`);
head counts ``H`` (query heads) and ``KV`` (key-value heads) are read off the module (the numbers
its forward uses), else its config. Every layout is checked on the live module before its rules
are placed (:mod:`~fisherfunc._spec.verify`). The rules, ``Linear`` weights stored ``[out, in]``:

| family                       | parameter                           | rule                               | groups    |
|------------------------------|-------------------------------------|------------------------------------|-----------|
| BERT-like                    | self.{query,key,value} weight, bias | ``Heads(H)``                       | [H]       |
| ViT-like (transformers 5.0)  | attention.{query,key,value}         | ``Heads(H)``                       | [H]       |
| ConvBERT                     | output.dense.weight [heads │ spans] | ``Heads(H, axis=1, parts=2)``      | [2, H]    |
| GPT-2 (``Conv1D`` (in, out)) | c_attn weight / bias                | ``Heads(H, 1, parts=3)`` / axis 0  | [3, H]    |
|                              | c_proj.weight                       | ``Heads(H, 0)``                    | [H]       |
|                              | cross: q_attn; c_attn               | ``Heads(H, 1)``; ``parts=2``       | [2, H]    |
| GPT-NeoX, Bloom, Falcon and  | fused QKV [H, 3, d]                 | ``Heads(H, parts=3,``              | [3, H]    |
| GPT-BigCode (multi-head)     |                                     | ``layout="interleaved")``          |           |
| Falcon (new architecture)    | fused QKV [KV, H/KV + 2, d]         | same, ``kv_heads=KV``              | [H+2KV]   |
| Falcon, GPT-BigCode (MQA)    | fused [Q │ K │ V], one K/V head     | ``Heads(H, parts=3, kv_heads=1)``  | [H+2]     |
| Phi-3                        | qkv_proj [Q │ K │ V]                | ``Heads(H, parts=3, kv_heads=KV)`` | [H+2KV]   |
| CodeGen                      | qkv_proj: 4 shards of [Q │ V │ K]   | ``Heads(H, parts=3, shards=4)``    | [3, H]    |
| Llama-like, Phi              | q_proj / k_proj, v_proj             | ``Heads(H)`` / ``Heads(KV)``       | [H], [KV] |
| OPT, GPT-J, BART-like,       | Q, K, V projections                 | ``Heads(H)``                       | [H]       |
| Whisper, DistilBERT, T5      |                                     |                                    |           |
| every family                 | output projection weight (columns)  | ``Heads(H, axis=1)``               | [H]       |
| any ``Conv1D``               | weight [in, out] / bias             | ``Channel(1)`` / ``Channel(0)``    |           |
| ConvBERT ``SeparableConv1D`` | bias [out, 1]                       | ``Channel(0)``                     |           |
| masked-LM head (RoBERTa-like)| its own bias [V] next to ``decoder``| ``Channel(0)``                     | [V]       |
| any norm (class ``…Norm``)   | 1-D weight / bias                   | ``Channel(0)``                     |           |

A masked-LM head's own vocabulary bias (``RobertaLMHead.bias``, CamemBERT's, XLM-R's: ``[V]``, ``V``
the ``decoder``'s outputs) is normally the decoder's bias under another name, placed by the
``Linear`` rule; transformers 5.0's ``CamembertForMaskedLM`` leaves the two untied (and the decoder
untied from the embeddings), so its ``lm_head.bias`` is a parameter of its own that the forward
never uses: ``Channel(0)`` (one value per vocabulary entry, exactly 0 there) places it either way.
Output-projection biases keep the torch.nn ``Channel(0)``; T5's ``relative_attention_bias`` keeps
``Rows()`` (see the table's docs). Only modules whose class comes from ``transformers`` are read,
so a user's own ``Conv1D`` or ``q_proj`` keeps the torch.nn rules. Nothing here imports
``transformers``.

**Every other model**: a ``transformers`` module that looks like attention (``attn`` or
``attention`` in its class name, with ``Linear`` children) but fits no row, or whose layout cannot
be tested, keeps the per-channel torch.nn rules and :func:`placements` warns
(:class:`HeadLayoutWarning`), naming the module and the ``overrides=`` that would declare its heads.
A layout that fails its test is refused: its parameters map to a :class:`~fisherfunc.SpecError`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator

from torch import nn

from .layouts import AttentionBlock, HeadPart, Role, build_block, configs, is_conv1d, is_hf_module, matches
from .rules import Channel, Rule, SpecError
from .verify import verify_blocks

__all__ = [
    "HeadLayoutWarning",
    "hf_rules",
    "placements",
    "attention_families",
    "is_hf_module",
    "AttentionBlock",
    "HeadPart",
    "attention_blocks",
]


class HeadLayoutWarning(UserWarning):
    """An attention module's parameters get per-channel rules, not per-head ones.

    Its family is not in fisherfunc's layout table, or its layout could not be tested on the live
    module. Declare its heads with ``overrides=`` (e.g. ``{"*.attn.q.weight": fisherfunc.Heads(12)}``).
    """


def attention_families(model: nn.Module) -> set[str]:
    """The names of the table rows describing ``model``'s attention modules (e.g. ``{"llama"}``)."""
    return {family.name for family, _, _ in matches(model)}


def _blocks(model: nn.Module) -> tuple[list[AttentionBlock], dict[str, SpecError]]:
    """The table's blocks of ``model``, and errors for modules whose head count cannot be read at all."""
    found = configs(model)
    blocks: list[AttentionBlock] = []
    unreadable: dict[str, SpecError] = {}
    for family, name, module in matches(model):
        try:
            blocks.append(build_block(model, family, name, module, found.get(name)))
        except SpecError as err:  # no head count: none of the module's projections is placed
            for proj in family.projections:
                for local in ("weight", "bias"):
                    unreadable[f"{name}.{proj.path}.{local}" if name else f"{proj.path}.{local}"] = err
    return blocks, unreadable


def _local_rules(module: nn.Module) -> dict[str, Rule]:
    """Rules of Hugging Face layers that need no config: ``Conv1D``, ConvBERT's separable convolution, norms."""
    if is_conv1d(module):
        return {"weight": Channel(axis=1), "bias": Channel(0)}
    if is_hf_module(module) and type(module).__name__ == "SeparableConv1D":  # its own bias [out, 1]
        return {"bias": Channel(0)}
    if _vocabulary_bias(module):  # a masked-LM head's bias [V], tied to its decoder's or (5.0's CamemBERT) not
        return {"bias": Channel(0)}
    if is_hf_module(module) and type(module).__name__.endswith("Norm"):
        return {
            local: Channel(0)
            for local in ("weight", "bias")
            if isinstance(getattr(module, local, None), nn.Parameter) and getattr(module, local).ndim == 1
        }
    return {}


def _vocabulary_bias(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` LM head with a bias ``[V]`` beside its ``decoder`` ``Linear(…, V)``."""
    bias, decoder = getattr(module, "bias", None), getattr(module, "decoder", None)
    return (
        is_hf_module(module)
        and isinstance(bias, nn.Parameter)
        and isinstance(decoder, nn.Linear)
        and tuple(bias.shape) == (decoder.out_features,)
    )


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return (
        is_hf_module(module)
        and ("attn" in name or "attention" in name)
        and any(isinstance(c, nn.Linear) or is_conv1d(c) for c in module.children())
    )


def _within(name: str, ancestor: str) -> bool:
    return name == ancestor or not ancestor or name.startswith(f"{ancestor}.")


def _unknown(model: nn.Module, known: list[str]) -> Iterator[tuple[str, nn.Module]]:
    """Attention-looking ``transformers`` modules neither inside nor around a known block."""
    for name, module in model.named_modules():
        related = any(_within(name, k) or _within(k, name) for k in known)
        if _looks_like_attention(module) and not related:
            yield name, module


def _warn_unverified(model: nn.Module, unverified: dict[str, tuple[str, str]]) -> None:
    """One warning per attention class whose modules keep per-channel rules (``{module: (class, reason)}``)."""
    by_class: dict[str, list[tuple[str, str]]] = {}
    for name, (cls, reason) in unverified.items():
        by_class.setdefault(cls, []).append((name, reason))
    for cls, found in by_class.items():
        name, reason = found[0]
        module = model.get_submodule(name)
        linear = next((n for n, c in module.named_children() if isinstance(c, nn.Linear) or is_conv1d(c)), "q")
        pattern = re.sub(r"\.\d+(?=\.|$)", ".*", name) if name else ""
        example = f"{pattern}.{linear}.weight" if pattern else f"{linear}.weight"
        listing = ", ".join(f"'{n}'" for n, _ in found[:3]) + (" ..." if len(found) > 3 else "")
        warnings.warn(
            f"infer_spec: {len(found)} attention module(s) of class {cls} ({listing}) get per-channel rules, not "
            f"per-head ones: {reason}. To group their parameters by heads, declare the layout with overrides=, e.g. "
            f"overrides={{'{example}': fisherfunc.Heads(<heads>)}} (see fisherfunc.Heads for fused layouts)",
            HeadLayoutWarning,
            stacklevel=4,
        )


def _verified(
    model: nn.Module, *, warn: bool, overridden: Callable[[str], bool] | None = None
) -> tuple[list[AttentionBlock], dict[str, Rule | SpecError]]:
    """The blocks whose layouts passed, and ``{parameter: rule or error}`` of every block."""
    blocks, unreadable = _blocks(model)
    placed: dict[str, Rule | SpecError] = dict(unreadable)
    verdicts = verify_blocks(model, blocks)
    trusted: list[AttentionBlock] = []
    unverified: dict[str, tuple[str, str]] = {}
    for block in blocks:
        verdict = verdicts[block.module]
        placed.update(block.errors)
        if verdict.error is not None:
            placed.update({param: verdict.error for param in block.rules})
        elif verdict.unverified is not None:
            cls = type(model.get_submodule(block.module)).__name__
            unverified[block.module] = (cls, f"the layout could not be tested ({verdict.unverified})")
        else:
            placed.update(block.rules)
            trusted.append(block)
    if warn:
        for name, module in _unknown(model, [b.module for b in blocks]):
            unverified[name] = (type(module).__name__, "no family in fisherfunc's layout table describes this class")
        if overridden is not None:  # modules whose parameters all have the user's rules need no advice
            unverified = {
                name: why
                for name, why in unverified.items()
                if not all(
                    overridden(f"{name}.{p}" if name else p) for p, _ in model.get_submodule(name).named_parameters()
                )
            }
        _warn_unverified(model, unverified)
    return trusted, placed


def placements(
    model: nn.Module, *, warn: bool = True, overridden: Callable[[str], bool] | None = None
) -> dict[str, Rule | SpecError]:
    """Like :func:`hf_rules`, but a module whose heads cannot be placed maps its parameters to the error.

    :func:`fisherfunc.infer_spec` raises such an error only for parameters that ``overrides`` leave
    without a rule.

    Args:
        model: any module; only submodules whose class comes from ``transformers`` are read.
        warn: warn (:class:`HeadLayoutWarning`) for attention modules left with per-channel rules.
        overridden: whether a parameter (dotted name) has a rule from the user's ``overrides``; an
            attention module all of whose parameters do is not warned about.
    """
    found: dict[str, Rule | SpecError] = {}
    for name, module in model.named_modules():
        for local, rule in _local_rules(module).items():
            found[f"{name}.{local}" if name else local] = rule
    _, heads = _verified(model, warn=warn, overridden=overridden)
    found.update(heads)
    out: dict[str, Rule | SpecError] = {}
    for path, placed in found.items():
        try:
            model.get_parameter(path)
        except AttributeError:  # e.g. a projection without bias
            continue
        out[path] = placed
    return out


def hf_rules(model: nn.Module) -> dict[str, Rule]:
    """Rules for the Hugging Face layers of ``model`` (none for a model without any).

    Args:
        model: any module; only submodules whose class comes from ``transformers`` are read.

    Returns:
        ``{parameter path: rule}``; paths resolve with ``model.get_parameter`` (a tied parameter
        may appear under a name that ``named_parameters()`` does not list). Parameters a module
        does not have (e.g. a bias-free projection) are left out.

    Raises:
        SpecError: if an attention module's head count cannot be read or contradicts its weights,
            or its layout fails the self-test on the live module.
    """
    out: dict[str, Rule] = {}
    for path, rule in placements(model).items():
        if isinstance(rule, SpecError):
            raise rule
        out[path] = rule
    return out


# --- head layouts for head_importance -------------------------------------------------------------


def _torch_block(name: str, module: nn.MultiheadAttention, cross: bool) -> AttentionBlock:
    """``nn.MultiheadAttention``: fused ``in_proj`` ``[Q │ K │ V]`` or separate projections (torch's own layout)."""
    h = module.num_heads

    def join(local: str) -> str:
        return f"{name}.{local}" if name else local

    present = dict(module.named_parameters())
    parts: list[HeadPart] = []
    fused: tuple[Role, ...] = ("q", "k", "v")
    for local in ("in_proj_weight", "in_proj_bias"):
        if local in present:
            parts += [HeadPart(join(local), role, i * h, (i + 1) * h, (3, h)) for i, role in enumerate(fused)]
    separate: tuple[tuple[str, Role], ...] = (
        ("q_proj_weight", "q"), ("k_proj_weight", "k"), ("v_proj_weight", "v"), ("bias_k", "k"), ("bias_v", "v"),
        ("out_proj.weight", "o"),
    )  # fmt: skip
    for local, role in separate:
        if local in present:
            parts.append(HeadPart(join(local), role, 0, h, (h,)))
    return AttentionBlock(name, "torch", "cross" if cross else "self", h, h, tuple(parts))


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """Every attention module of ``model`` whose parameters ``infer_spec`` groups by heads, in module order.

    Covers the Hugging Face families of the table whose layout passed its self-test (the same
    blocks ``infer_spec`` places rules for) and ``nn.MultiheadAttention`` (a
    ``nn.TransformerDecoderLayer``'s ``multihead_attn`` is its cross-attention).
    """
    trusted, _ = _verified(model, warn=False)
    found = {block.module: block for block in trusted}
    cross_of_decoders = {id(m.multihead_attn) for m in model.modules() if isinstance(m, nn.TransformerDecoderLayer)}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            found[name] = _torch_block(name, module, id(module) in cross_of_decoders)
    return [found[name] for name, _ in model.named_modules() if name in found]
