"""Hugging Face entries of the test-case registry: tiny ``transformers`` models built offline from configs.

``transformers`` is imported when a case is built, never when this module is imported, so the
registry (and the rest of fisherfunc) works without it; building one of these cases without it
raises ``ImportError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import hf
from ._registry import Built, register

__all__ = ["HF_CASES", "hf_model"]

LM_FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
CLASSIFIER_FAMILIES = ("bert", "gpt2", "llama")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - the test extra installs it
        raise ImportError("the hf_* test cases need transformers: pip install 'fisherfunc[hf]'") from err
    return transformers


def hf_model(
    family: str,
    head: str,
    *,
    impl: str = "sdpa",
    vocab: int = 40,
    dim: int = 16,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 6,
    positions: int = 16,
    classes: int = 3,
    dropout: float = 0.1,
    pad_id: int = 0,
    sliding_window: int = 3,
) -> nn.Module:
    """A tiny ``transformers`` model from a config, float32, as ``transformers`` returns it.

    Args:
        family: ``"bert"``, ``"gpt2"``, ``"llama"`` (grouped-query attention: ``kv_heads`` key-value
            heads of ``head_dim``, attention biases), ``"mistral"`` (sliding window on every
            layer) or ``"qwen2"`` (sliding window on the layers after the first).
        head: ``"lm"`` (masked LM for BERT, causal LM otherwise) or ``"cls"`` (sequence classification).
        impl: ``attn_implementation``: ``"sdpa"`` or ``"eager"``.
        vocab: vocabulary size.
        dim: hidden size.
        layers: number of layers.
        heads: number of attention heads.
        kv_heads: key-value heads (Llama, Mistral, Qwen2).
        head_dim: Llama's head dimension (``dim / heads`` for the others).
        positions: maximum number of positions.
        classes: number of labels of the classification head.
        dropout: the config's dropout probabilities.
        pad_id: the padding token id.
        sliding_window: Mistral's / Qwen2's attention window.
    """
    transformers = _transformers()
    common: dict[str, Any] = {"vocab_size": vocab, "pad_token_id": pad_id, "attn_implementation": impl}
    common["num_labels"] = classes
    if family == "bert":
        config = transformers.BertConfig(
            hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=24,
            max_position_embeddings=positions, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            **common,
        )  # fmt: skip
        cls = transformers.BertForMaskedLM if head == "lm" else transformers.BertForSequenceClassification
    elif family == "gpt2":
        config = transformers.GPT2Config(
            n_embd=dim, n_layer=layers, n_head=heads, n_positions=positions, bos_token_id=1, eos_token_id=1,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **common,
        )  # fmt: skip
        cls = transformers.GPT2LMHeadModel if head == "lm" else transformers.GPT2ForSequenceClassification
    elif family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, intermediate_size=24, max_position_embeddings=positions, attention_bias=True,
            attention_dropout=dropout, bos_token_id=1, eos_token_id=1, **common,
        )  # fmt: skip
        cls = transformers.LlamaForCausalLM if head == "lm" else transformers.LlamaForSequenceClassification
    elif family in ("mistral", "qwen2") and head == "lm":
        window: dict[str, Any] = {"sliding_window": sliding_window}
        if family == "qwen2":
            window.update(use_sliding_window=True, max_window_layers=1)
        config = getattr(transformers, f"{family.capitalize()}Config")(
            hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            intermediate_size=24, max_position_embeddings=positions, attention_dropout=dropout, bos_token_id=1,
            eos_token_id=1, **window, **common,
        )  # fmt: skip
        cls = getattr(transformers, f"{family.capitalize()}ForCausalLM")
    else:
        raise ValueError(f"no tiny {family!r} model with a {head!r} head")
    return cls(config)


def padded_ids(
    lengths: Sequence[int], seq_len: int, vocab: int, *, side: str = "right", pad_id: int = 0
) -> dict[str, Tensor]:
    """``input_ids``/``attention_mask`` ``[B, T]`` for sequences of ``lengths`` padded on ``side``, and MLM labels.

    Ids are drawn in ``[2, vocab)`` (0 and 1 are padding and bos/eos); ``labels`` hold every other
    real token (positions 0, 2, ... of a sequence) and -100 elsewhere.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    size = len(lengths)
    ids = torch.full((size, seq_len), pad_id)
    mask = torch.zeros(size, seq_len, dtype=torch.long)
    labels = torch.full((size, seq_len), -100)
    for b, n in enumerate(lengths):
        tokens = torch.randint(2, vocab, (n,))
        span = slice(0, n) if side == "right" else slice(seq_len - n, seq_len)
        ids[b, span], mask[b, span] = tokens, 1
        labels[b, span] = torch.where(torch.arange(n) % 2 == 0, tokens, torch.full_like(tokens, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@register("hf_causal_lm", tags=("hf", "token", "causal", "attention", "transformer"))
def hf_causal_lm(
    *,
    family: str = "gpt2",
    impl: str = "sdpa",
    side: str = "right",
    lengths: Sequence[int] = (7, 5, 3),
    seq_len: int = 7,
    vocab: int = 40,
    dim: int = 16,
    layers: int = 2,
    heads: int = 4,
    positions: int = 16,
    dropout: float = 0.1,
    pad_id: int = 0,
) -> Built:
    """A tiny GPT-2 / Llama / Mistral / Qwen2 causal LM (:func:`hf_model`) and a padded batch.

    Batch ``{"input_ids", "attention_mask"}`` ``[B, T]`` (:func:`padded_ids`); loss
    ``fisherfunc.hf.causal_lm(model)``.

    Args:
        family: ``"gpt2"``, ``"llama"``, ``"mistral"`` or ``"qwen2"``.
        impl: ``attn_implementation``: ``"sdpa"`` or ``"eager"``.
        side: padding side, ``"right"`` or ``"left"``.
        lengths: real lengths of the sequences (``B = len(lengths)``).
        seq_len: ``T``, at least ``max(lengths)``.
        vocab: vocabulary size (ids drawn in ``[2, vocab)``).
        dim: hidden size.
        layers: number of layers.
        heads: attention heads.
        positions: maximum number of positions.
        dropout: the config's dropout probabilities.
        pad_id: the padding token id.
    """
    if family not in LM_FAMILIES:
        raise ValueError(f"family must be one of {LM_FAMILIES}, got {family!r}")
    model = hf_model(
        family, "lm", impl=impl, vocab=vocab, dim=dim, layers=layers, heads=heads, positions=positions,
        dropout=dropout, pad_id=pad_id,
    )  # fmt: skip
    batch = padded_ids(lengths, seq_len, vocab, side=side, pad_id=pad_id)
    del batch["labels"]
    return Built(model, hf.causal_lm(model), [batch])


@register("hf_masked_lm", tags=("hf", "token", "attention", "transformer"))
def hf_masked_lm(
    *,
    impl: str = "sdpa",
    side: str = "right",
    lengths: Sequence[int] = (7, 5, 3),
    seq_len: int = 7,
    vocab: int = 40,
    dim: int = 16,
    layers: int = 2,
    heads: int = 4,
    dropout: float = 0.1,
) -> Built:
    """A tiny BERT masked LM and a padded batch with MLM ``labels`` (every other real token).

    Batch ``{"input_ids", "attention_mask", "labels"}`` ``[B, T]``; loss
    ``fisherfunc.hf.masked_lm(model)``.

    Args:
        impl: ``attn_implementation``: ``"sdpa"`` or ``"eager"``.
        side: padding side, ``"right"`` or ``"left"``.
        lengths: real lengths of the sequences (``B = len(lengths)``).
        seq_len: ``T``, at least ``max(lengths)``.
        vocab: vocabulary size (ids drawn in ``[2, vocab)``).
        dim: hidden size.
        layers: number of layers.
        heads: attention heads.
        dropout: the config's dropout probabilities.
    """
    model = hf_model("bert", "lm", impl=impl, vocab=vocab, dim=dim, layers=layers, heads=heads, dropout=dropout)
    batch = padded_ids(lengths, seq_len, vocab, side=side)
    return Built(model, hf.masked_lm(model), [batch])


@register("hf_sequence_classification", tags=("hf", "classification", "attention", "transformer"))
def hf_sequence_classification(
    *,
    family: str = "bert",
    impl: str = "sdpa",
    side: str = "right",
    lengths: Sequence[int] = (7, 5, 3),
    seq_len: int = 7,
    vocab: int = 40,
    dim: int = 16,
    layers: int = 2,
    heads: int = 4,
    positions: int = 16,
    classes: int = 3,
    dropout: float = 0.1,
) -> Built:
    """A tiny BERT / GPT-2 / Llama sequence classifier and a padded batch with a class per sequence.

    Batch ``{"input_ids", "attention_mask"}`` ``[B, T]`` and ``"labels" [B]`` in ``[0, classes)``;
    loss ``fisherfunc.hf.sequence_classification(model)``.

    Args:
        family: ``"bert"``, ``"gpt2"`` or ``"llama"``.
        impl: ``attn_implementation``: ``"sdpa"`` or ``"eager"``.
        side: padding side, ``"right"`` or ``"left"``.
        lengths: real lengths of the sequences (``B = len(lengths)``).
        seq_len: ``T``, at least ``max(lengths)``.
        vocab: vocabulary size (ids drawn in ``[2, vocab)``).
        dim: hidden size.
        layers: number of layers.
        heads: attention heads.
        positions: maximum number of positions.
        classes: number of labels.
        dropout: the config's dropout probabilities.
    """
    if family not in CLASSIFIER_FAMILIES:
        raise ValueError(f"family must be one of {CLASSIFIER_FAMILIES}, got {family!r}")
    model = hf_model(
        family, "cls", impl=impl, vocab=vocab, dim=dim, layers=layers, heads=heads, positions=positions,
        classes=classes, dropout=dropout,
    )  # fmt: skip
    batch = padded_ids(lengths, seq_len, vocab, side=side)
    batch["labels"] = torch.randint(0, classes, (len(lengths),))
    return Built(model, hf.sequence_classification(model), [batch])


HF_CASES = ("hf_causal_lm", "hf_masked_lm", "hf_sequence_classification")
