"""Group rules for Hugging Face ``transformers`` layers: attention heads, ``Conv1D``, norms.

:func:`fisherfunc.infer_spec` calls :func:`hf_rules` and lets its rules win over the torch.nn ones
(an attention projection is an ``nn.Linear`` too, but its rows are heads). Head counts come from
``model.config`` (or the attention module's own ``config``); where the module keeps a copy as an
attribute (``num_heads``, ``num_attention_heads``, ``head_dim``), that copy — the number its
forward uses — is read first::

    h  = config.num_attention_heads          (GPT-2's n_head)
    kv = config.num_key_value_heads or h     (grouped-query attention)
    d  = config.head_dim or hidden_size / h

| family (attention module has)                 | parameter                          | rule                         |
|-----------------------------------------------|------------------------------------|------------------------------|
| BERT-like: ``self.{query,key,value}``,        | ``query/key/value`` weight ``[h·d, E]``, bias | ``Heads(h, 0)``   |
| ``output.dense`` (``Bert/RobertaAttention``)   | ``output.dense.weight [E, h·d]``   | ``Heads(h, 1)``              |
| GPT-2-like: ``c_attn``, ``c_proj`` (``Conv1D``) | ``c_attn.weight [E, 3·E]`` (in, out) | ``Heads(h, 1, parts=3)``   |
|                                               | ``c_attn.bias [3·E]``              | ``Heads(h, 0, parts=3)``     |
|                                               | ``c_proj.weight [E, E]`` (in, out) | ``Heads(h, 0)`` (input rows) |
|                                               | cross-attention: ``c_attn``        | ``Heads(h, 1, parts=2)``     |
|                                               | and ``q_attn.weight``              | ``Heads(h, 1)``              |
| Llama/Mistral/Qwen-like: ``q/k/v/o_proj``     | ``q_proj`` weight ``[h·d, E]``, bias | ``Heads(h, 0)``            |
|                                               | ``k_proj``, ``v_proj`` ``[kv·d, E]`` | ``Heads(kv, 0)``           |
|                                               | ``o_proj.weight [E, h·d]``         | ``Heads(h, 1)``              |
| any ``Conv1D``                                | weight ``[in, out]`` / bias        | ``Channel(1)`` / ``Channel(0)`` |
| any norm (class name ending in ``Norm``)       | 1-D weight / bias                  | ``Channel(0)``               |

Output-projection biases keep the torch.nn ``Channel(0)``. Only modules whose class comes from
``transformers`` are read, so a user's own ``Conv1D`` or ``q_proj`` keeps the torch.nn rules.
Nothing here imports ``transformers``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, cast

from torch import nn

from .rules import Channel, Heads, Rule, SpecError

__all__ = ["hf_rules", "placements", "attention_families", "is_hf_module", "AttentionBlock", "attention_blocks"]


def is_hf_module(module: nn.Module) -> bool:
    """Whether ``module``'s class is defined by ``transformers`` (or its remote-code modules)."""
    return type(module).__module__.startswith("transformers")


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def _is_conv1d(module: Any) -> bool:
    return isinstance(module, nn.Module) and type(module).__name__ == "Conv1D" and is_hf_module(module)


def _configs(model: nn.Module) -> dict[str, Any]:
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


def _count(config: Any, module: nn.Module, where: str, *names: str) -> int:
    """A head count: the module's own attribute (the forward uses it), else the config's."""
    for source in (module, config):
        for attr in names:
            value = getattr(source, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    raise SpecError(
        f"infer_spec: cannot read the number of attention heads of '{where}' ({type(module).__name__}): neither it nor "
        f"its config has {' / '.join(names)}. Give its parameters rules with overrides=, e.g. "
        f"overrides={{'{where}.*': fisherfunc.Channel(0)}}"
    )


def _families(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """``(family, module name, module)`` for every recognised attention module of ``model``."""
    for name, module in model.named_modules():
        if not is_hf_module(module):
            continue
        inner = getattr(module, "self", None)
        output = getattr(module, "output", None)
        if (
            isinstance(inner, nn.Module)
            and all(_linear(inner, p) is not None for p in ("query", "key", "value"))
            and isinstance(output, nn.Module)
            and _linear(output, "dense") is not None
        ):
            yield "bert", name, module
        elif _is_conv1d(getattr(module, "c_attn", None)) and _is_conv1d(getattr(module, "c_proj", None)):
            yield "gpt2", name, module
        elif all(_linear(module, p) is not None for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            yield "llama", name, module


def attention_families(model: nn.Module) -> set[str]:
    """The attention families found in ``model``: a subset of ``{"bert", "gpt2", "llama"}``."""
    return {family for family, _, _ in _families(model)}


def _join(prefix: str, local: str) -> str:
    return f"{prefix}.{local}" if prefix else local


def _bert(name: str, module: nn.Module, config: Any) -> dict[str, Rule]:
    inner = module.get_submodule("self")
    h = _count(config, inner, _join(name, "self"), "num_attention_heads", "num_heads")
    rules: dict[str, Rule] = {}
    for part in ("query", "key", "value"):
        rules[f"self.{part}.weight"] = Heads(h, axis=0)
        rules[f"self.{part}.bias"] = Heads(h, axis=0)
    rules["output.dense.weight"] = Heads(h, axis=1)
    return rules


def _gpt2(name: str, module: nn.Module, config: Any) -> dict[str, Rule]:
    h = _count(config, module, name, "num_heads", "num_attention_heads", "n_head")
    cross = _is_conv1d(getattr(module, "q_attn", None))
    parts = 2 if cross else 3  # cross-attention fuses only K and V; Q has its own q_attn
    rules: dict[str, Rule] = {
        "c_attn.weight": Heads(h, axis=1, parts=parts),  # Conv1D stores (in, parts·out): heads along axis 1
        "c_attn.bias": Heads(h, axis=0, parts=parts),
        "c_proj.weight": Heads(h, axis=0),  # (in, out): the input rows are the heads' outputs
    }
    if cross:
        rules["q_attn.weight"] = Heads(h, axis=1)
        rules["q_attn.bias"] = Heads(h, axis=0)
    return rules


def _llama(name: str, module: nn.Module, config: Any) -> dict[str, Rule | SpecError]:
    h = _count(config, module, name, "num_heads", "num_attention_heads")
    kv = getattr(module, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None) or h
    hidden = getattr(config, "hidden_size", None)
    head_dim = (
        getattr(module, "head_dim", None) or getattr(config, "head_dim", None) or (hidden // h if hidden else None)
    )
    rules: dict[str, Rule | SpecError] = {}
    for proj, heads in {"q_proj": h, "k_proj": kv, "v_proj": kv}.items():
        rows = getattr(module, proj).out_features
        placed: Rule | SpecError = Heads(heads, axis=0)
        if head_dim and rows != heads * head_dim:  # the config contradicts the weights: place nothing
            placed = SpecError(
                f"infer_spec: '{_join(name, proj)}.weight' has {rows} rows, but the config says {heads} heads × "
                f"head_dim {head_dim} = {heads * head_dim}. Give it a rule with overrides=, e.g. "
                f"overrides={{'{_join(name, proj)}.*': fisherfunc.Heads(<heads>)}}"
            )
        rules[f"{proj}.weight"] = rules[f"{proj}.bias"] = placed
    rules["o_proj.weight"] = Heads(h, axis=1)
    return rules


def _local_rules(module: nn.Module) -> dict[str, Rule]:
    """Rules of Hugging Face layers that need no config: ``Conv1D`` and norms."""
    if _is_conv1d(module):
        return {"weight": Channel(axis=1), "bias": Channel(0)}
    if is_hf_module(module) and type(module).__name__.endswith("Norm"):
        return {
            local: Channel(0)
            for local in ("weight", "bias")
            if isinstance(getattr(module, local, None), nn.Parameter) and getattr(module, local).ndim == 1
        }
    return {}


_LOCALS = {  # the parameters each family's rules cover (names relative to the attention module)
    "bert": tuple(f"self.{p}.{w}" for p in ("query", "key", "value") for w in ("weight", "bias"))
    + ("output.dense.weight",),
    "gpt2": ("c_attn.weight", "c_attn.bias", "c_proj.weight", "q_attn.weight", "q_attn.bias"),
    "llama": tuple(f"{p}.{w}" for p in ("q_proj", "k_proj", "v_proj") for w in ("weight", "bias")) + ("o_proj.weight",),
}


def placements(model: nn.Module) -> dict[str, Rule | SpecError]:
    """Like :func:`hf_rules`, but a module whose heads cannot be read maps its parameters to the error.

    :func:`fisherfunc.infer_spec` raises such an error only for parameters that ``overrides`` leave
    without a rule.
    """
    configs = _configs(model)
    found: dict[str, Rule | SpecError] = {}
    for name, module in model.named_modules():
        for local, rule in _local_rules(module).items():
            found[_join(name, local)] = rule
    builders: dict[str, Callable[[str, nn.Module, Any], Mapping[str, Rule | SpecError]]] = {
        "bert": _bert,
        "gpt2": _gpt2,
        "llama": _llama,
    }
    for family, name, module in _families(model):
        rules: dict[str, Rule | SpecError]
        try:
            rules = dict(builders[family](name, module, configs.get(name)))
        except SpecError as err:  # no head count at all: none of the module's attention parameters is placed
            rules = {local: err for local in _LOCALS[family]}
        for local, placed in rules.items():
            found[_join(name, local)] = placed
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
        SpecError: if an attention module's head count cannot be read or contradicts its weights.
    """
    out: dict[str, Rule] = {}
    for path, rule in placements(model).items():
        if isinstance(rule, SpecError):
            raise rule
        out[path] = rule
    return out


# --- head layouts: which parameters (and which parts of fused ones) make each head ----------------

#: A head's part: its query rows, key rows, value rows, or its columns of the output projection.
Role = Literal["q", "k", "v", "o"]


@dataclasses.dataclass(frozen=True)
class AttentionBlock:
    """One attention module's heads, read off the live module (for :func:`fisherfunc.head_importance`).

    Attributes:
        module: the attention module's dotted name.
        attention: ``"self"`` or ``"cross"`` (the module's own ``is_cross_attention``, or the
            cross-attention of ``nn.TransformerDecoderLayer``).
        heads: query heads ``H`` (also the output projection's column blocks).
        kv_heads: key-value heads ``KV``: ``H`` for multi-head, ``1`` for multi-query, between for
            grouped-query attention; query head ``h`` reads key-value head ``h // (H / KV)``.
        parts: ``(parameter name, role, fused part or None)``: which parameter holds which part of
            every head; a fused projection's group values are ``[parts, heads]`` and ``part``
            selects the row (GPT-2 ``c_attn``: 0 = Q, 1 = K, 2 = V).
    """

    module: str
    attention: Literal["self", "cross"]
    heads: int
    kv_heads: int
    parts: tuple[tuple[str, Role, int | None], ...]


def _present(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


def _block(
    model: nn.Module, prefix: str, attention: Any, heads: int, kv_heads: int, parts: list[tuple[str, str, int | None]]
) -> AttentionBlock:
    """The block of module ``prefix``; ``parts``: ``(local parameter name, role, fused part)``, absent ones dropped."""
    kind: Literal["self", "cross"] = "cross" if attention else "self"
    found = tuple(
        (_join(prefix, local), cast(Role, role), part)
        for local, role, part in parts
        if _present(model, _join(prefix, local))
    )
    return AttentionBlock(module=prefix, attention=kind, heads=heads, kv_heads=kv_heads, parts=found)


def _hf_block(model: nn.Module, family: str, name: str, module: nn.Module, config: Any) -> AttentionBlock:
    cross = getattr(module, "is_cross_attention", False)
    if family == "bert":
        h = _count(config, module.get_submodule("self"), _join(name, "self"), "num_attention_heads", "num_heads")
        parts: list[tuple[str, str, int | None]] = [
            (f"self.{p}.{w}", role, None) for p, role in (("query", "q"), ("key", "k"), ("value", "v"))
            for w in ("weight", "bias")
        ]  # fmt: skip
        return _block(model, name, cross, h, h, [*parts, ("output.dense.weight", "o", None)])
    if family == "gpt2":
        h = _count(config, module, name, "num_heads", "num_attention_heads", "n_head")
        if _is_conv1d(getattr(module, "q_attn", None)):  # cross-attention: Q alone, K and V fused
            fused: list[tuple[str, str, int | None]] = [
                (f"c_attn.{w}", role, i) for w in ("weight", "bias") for i, role in enumerate(("k", "v"))
            ]
            parts = [("q_attn.weight", "q", None), ("q_attn.bias", "q", None), *fused]
            return _block(model, name, True, h, h, [*parts, ("c_proj.weight", "o", None)])
        fused = [(f"c_attn.{w}", role, i) for w in ("weight", "bias") for i, role in enumerate(("q", "k", "v"))]
        return _block(model, name, cross, h, h, [*fused, ("c_proj.weight", "o", None)])
    h = _count(config, module, name, "num_heads", "num_attention_heads")
    kv = getattr(module, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None) or h
    parts = [
        (f"{p}.{w}", role, None) for p, role in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"))
        for w in ("weight", "bias")
    ]  # fmt: skip
    return _block(model, name, cross, h, int(kv), [*parts, ("o_proj.weight", "o", None)])


def _torch_block(model: nn.Module, name: str, module: nn.MultiheadAttention, cross: bool) -> AttentionBlock:
    h = module.num_heads
    parts: list[tuple[str, str, int | None]] = [
        *((f"in_proj_{w}", role, i) for w in ("weight", "bias") for i, role in enumerate(("q", "k", "v"))),
        ("q_proj_weight", "q", None), ("k_proj_weight", "k", None), ("v_proj_weight", "v", None),
        ("bias_k", "k", None), ("bias_v", "v", None), ("out_proj.weight", "o", None),
    ]  # fmt: skip
    return _block(model, name, cross, h, h, parts)


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """Every attention module of ``model`` whose parameters ``infer_spec`` groups by heads, in module order.

    Covers the Hugging Face families of the rule table (BERT-, GPT-2- and Llama-like, grouped-query
    aware) and ``nn.MultiheadAttention`` (a ``nn.TransformerDecoderLayer``'s ``multihead_attn`` is
    its cross-attention). Head counts are read as the rules read them: the module's own attribute
    first, then its config.
    """
    configs = _configs(model)
    found = {
        name: _hf_block(model, family, name, module, configs.get(name)) for family, name, module in _families(model)
    }
    cross_of_decoders = {id(m.multihead_attn) for m in model.modules() if isinstance(m, nn.TransformerDecoderLayer)}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            found[name] = _torch_block(model, name, module, id(module) in cross_of_decoders)
    order = [name for name, _ in model.named_modules() if name in found]
    return [found[name] for name in order]
