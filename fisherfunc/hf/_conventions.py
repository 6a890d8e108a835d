"""How each Hugging Face family attends and counts positions: the table the losses follow.

**Causality** is read from the config, in this order (the first that applies decides)::

    config.is_encoder_decoder              → an encoder–decoder: fisherfunc.hf.seq2seq_lm
    config.is_causal is False              → bidirectional (a decoder family used as an encoder)
    model_type has a masked-LM class       → an encoder family: causal iff config.is_decoder
    model_type has a causal-LM class       → causal
    class name ends in ForCausalLM / LMHeadModel → causal;  in ForMaskedLM → bidirectional

"has a masked-LM / causal-LM class" means ``transformers``' own auto-class tables
(``MODEL_FOR_MASKED_LM_MAPPING_NAMES``, ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), which list every
family ``AutoModelForMaskedLM`` / ``AutoModelForCausalLM`` can build. An encoder family such as BERT
or RoBERTa is in both (``BertLMHeadModel`` is BERT with ``is_decoder=True``), so it is looked up as an
encoder first. The losses then check the answer on the live model (:mod:`~fisherfunc.hf._checks`):
whether its outputs at the first position change when later tokens do.

**Positions and masks.** Every sample is front-aligned first (:mod:`~fisherfunc.hf._align`): its real
tokens fill the first slots, so a model that builds its own positions builds the unpadded sample's.
Only what a model builds from the 2-D ``attention_mask`` needs more, since it never gets a 2-D mask:

| ``model_type``                              | attends (decided by)             | positions it builds         | pass |
|---------------------------------------------|----------------------------------|-----------------------------|------|
| ``bert``, ``electra``, ``convbert``,        | both ways (``is_decoder=False``  | ``arange(T)`` from slot 0   | M    |
| ``distilbert``                              | of a masked-LM family)           |                             |      |
| ``roberta``, ``xlm-roberta``, ``camembert`` | both ways (same)                 | ``padding_idx + 1 + t`` over| M    |
|                                             |                                  | the ids ≠ ``padding_idx``   |      |
| ``gpt2``, ``llama``, ``mistral``, ``qwen2``,| causally (a causal-LM family)    | ``arange(T)`` from slot 0   | M    |
| ``gemma*``, ``gpt_neox``, ``phi``, ``phi3``,|                                  | (rotary or learned)         |      |
| ``gptj``, ``codegen``, ``falcon`` (rotary)  |                                  |                             |      |
| ``opt``, ``biogpt``                         | causally (a causal-LM family)    | ``cumsum(m) − 1`` of the    | M, P |
|                                             |                                  | 2-D mask (OPT adds 2)       |      |
| ``bloom``, ``falcon`` with ``alibi=True``   | causally (a causal-LM family)    | ALiBi: ``slope_h ·          | —    |
|                                             |                                  | (cumsum(m) − 1)`` per key   |      |
| ``t5``, ``bart``, ``mbart``, ``marian``     | encoder both ways, decoder       | relative buckets (T5),      | K    |
| (:func:`~fisherfunc.hf.seq2seq_lm`)         | causally (``is_encoder_decoder``)| ``arange(T) + 2`` (BART)    |      |

M: the least mask that keeps a front-aligned sample exact (:mod:`~fisherfunc.hf._losses`,
``HFInputs.form``): a causal model gets none where its live padding check passes without one (its
own causal attention; the padding follows every real token), else one additive causal mask shared
by every sample and layer (:func:`~fisherfunc.hf._masks.causal_mask`); a bidirectional model gets
the keys' ``[1, 1, 1, T]`` mask (:func:`~fisherfunc.hf._masks.key_mask`), or the full per-sample
``[1, 1, T, T]`` mask where its layers mix full and sliding-window attention; P: ``position_ids = cumsum(m) − 1`` of
the aligned mask (a 4-D mask has no cumsum the model could take); K: a 4-D key mask ``[1, 1, 1, S]``
for the encoder's self-attention and the decoder's cross-attention (the decoder builds its own
causal mask; labels padded on the right are never seen by an earlier position); —: no mask at all:
the ALiBi families build ALiBi from the mask they are given, and causal attention never sees the
padding that follows the real tokens, so the model's own all-ones mask gives the unpadded sample's
outputs at every real position.

A family not listed builds its positions from its first slot or from its ids, like the first rows;
the losses' live padding check (:mod:`~fisherfunc.hf._checks`) refuses a model for which that is
not so. It also refuses ConvBERT, whose span convolution reads the padding tokens' embeddings (no
mask reaches it), and, on transformers 5.0, the encoders whose backbone builds its mask with
``get_extended_attention_mask`` (ConvBERT, RoFormer, MPNet, BigBird, ...), which takes 2-D or 3-D
masks only: the message says which. Positions a batch brings itself (``inputs=(...,
"position_ids")``) are passed as they are, aligned with the tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

__all__ = ["Causality", "Feeding", "causality", "feeding", "FROM_MASK_POSITIONS", "ALIBI"]

#: families whose positions are ``cumsum(attention_mask) − 1`` of the 2-D mask (a 4-D mask cannot give them)
FROM_MASK_POSITIONS = frozenset({"opt", "biogpt"})
#: families with ALiBi biases built from the 2-D mask (``falcon`` only with ``config.alibi``)
ALIBI = frozenset({"bloom", "falcon"})


@dataclasses.dataclass(frozen=True)
class Causality:
    """Whether a model attends causally, and why we think so.

    Attributes:
        causal: ``True`` (decoder), ``False`` (encoder), ``None`` (the config does not say).
        source: the config entry or table that decided, for messages.
    """

    causal: bool | None
    source: str


@dataclasses.dataclass(frozen=True)
class Feeding:
    """What a loss passes a family besides its ids.

    Attributes:
        positions: ``"own"``: nothing (the model builds them); ``"counted"``: ``position_ids =
            cumsum(m) − 1`` of the aligned mask.
        mask: ``"4d"``: the per-sample 4-D mask; ``"none"``: no mask (ALiBi families, causal only).
    """

    positions: Literal["own", "counted"] = "own"
    mask: Literal["4d", "none"] = "4d"


def _auto_names() -> tuple[dict[str, str], dict[str, str]]:
    """``transformers``' masked-LM and causal-LM auto-class tables ``{model_type: class name}``."""
    from transformers.models.auto import modeling_auto

    return dict(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES), dict(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def causality(model: nn.Module) -> Causality:
    """Causality of a ``transformers`` model from its config (the order in the module docstring).

    Args:
        model: the ``transformers`` model (inside any wrapper).
    """
    config = model.config
    kind = getattr(config, "model_type", None) or ""
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        return Causality(None, f"config.is_encoder_decoder=True ({kind!r} is an encoder-decoder)")
    if getattr(config, "is_causal", None) is False:
        return Causality(False, "config.is_causal=False")
    masked, causal = _auto_names()
    if kind in masked:
        decoder = bool(getattr(config, "is_decoder", False))
        return Causality(decoder, f"config.is_decoder={decoder} of the encoder family {kind!r} ({masked[kind]})")
    if kind in causal:
        return Causality(True, f"{kind!r} is a causal-LM family ({causal[kind]})")
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return Causality(True, f"the class name {name}")
    if name.endswith("ForMaskedLM"):
        return Causality(False, f"the class name {name}")
    return Causality(None, f"{kind or name!r} is in neither of transformers' masked-LM and causal-LM tables")


def feeding(model: nn.Module) -> Feeding:
    """The family's row of the table in the module docstring.

    Args:
        model: the ``transformers`` model (inside any wrapper).
    """
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind in ALIBI and (kind != "falcon" or getattr(config, "alibi", False)):
        return Feeding(mask="none")
    if kind in FROM_MASK_POSITIONS:
        return Feeding(positions="counted")
    return Feeding()
