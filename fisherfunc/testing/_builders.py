"""Model entries of the test-case registry beyond the hypothesis families: named architectures and layouts.

Each builder is registered in :mod:`fisherfunc.testing.cases` (whose docstring tables them) and
runs with the global RNG seeded: the model is initialised first, the batches are drawn next, norm
layers' affine parameters and running statistics last (:func:`randomise_norms`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .. import Channel, Skip, losses
from ._batches import labelled, per_batch
from ._families import CONV1D_RULES, classified
from ._models import (
    AttentionClassifier,
    Bags,
    CausalAttention,
    Conv1D,
    ConvStack,
    ConvTagger,
    CrossAttention,
    DeconvStack,
    EncoderDecoder,
    FunctionalDropout,
    IndexNet,
    NormNet,
    PerSampleAttention,
    ReusedWeight,
    SelfAttention,
    SequenceClassifier,
    Sequential,
    randomise_norms,
)
from ._registry import Built, register

__all__ = ["MODEL_CASES"]

Sizes = int | Sequence[int]


@register("conv_stack", tags=("classification", "conv"))
def conv_stack(*, batch: Sizes = 4) -> Built:
    """:class:`ConvStack`: Conv2d plain/grouped/depthwise into Conv1d plain/grouped/depthwise; cross-entropy.

    Args:
        batch: ``B``, or one ``B`` per batch. Inputs ``x [B, 3, 7, 7]``, labels ``y [B]`` in ``[0, 4)``.
    """
    return classified(ConvStack(), batch, (3, 7, 7), 4)


@register("deconv_stack", tags=("classification", "conv"))
def deconv_stack(*, batch: Sizes = 4) -> Built:
    """:class:`DeconvStack`: ConvTranspose1d/2d/3d, groups 1, 2, 3 and depthwise; cross-entropy.

    Args:
        batch: ``B``, or one ``B`` per batch. Inputs ``x [B, 6, 3, 3, 3]``, labels ``y [B]`` in ``[0, 5)``.
    """
    return classified(DeconvStack(), batch, (6, 3, 3, 3), 5)


@register("embedding_bag", tags=("classification", "embedding"))
def embedding_bag(*, batch: Sizes = 5, bag: int = 4, vocab: int = 12, classes: int = 3) -> Built:
    """:class:`Bags`: mean and sum ``nn.EmbeddingBag`` over fixed-length bags; cross-entropy.

    Args:
        batch: ``B``, or one ``B`` per batch.
        bag: ids per bag: ``ids [B, bag]`` in ``[0, vocab)``.
        vocab: rows of both tables.
        classes: number of classes; labels ``y [B]``.
    """
    model = Bags(vocab, 6, classes)
    batches = [(torch.randint(0, vocab, (size, bag)), labelled((size,), classes)) for size in per_batch(batch)]
    return Built(model, losses.classification(model), batches)


@register("norms", tags=("classification", "conv", "norm"))
def norms(*, batch: Sizes = 4) -> Built:
    """:class:`NormNet`: InstanceNorm, BatchNorm2d/1d (random running statistics), GroupNorm, RMSNorm.

    Args:
        batch: ``B``, or one ``B`` per batch. Inputs ``x [B, 3, 6, 6]``, labels ``y [B]`` in ``[0, 3)``; cross-entropy.
    """
    return classified(NormNet(), batch, (3, 6, 6), 3)


@register("sequence_classifier", tags=("classification", "embedding", "attention"))
def sequence_classifier(
    *,
    batch: Sizes = 4,
    seq_len: int = 5,
    vocab: int = 12,
    dim: int = 6,
    width: int = 12,
    heads: int = 2,
    norm: bool = False,
    classes: int = 4,
) -> Built:
    """:class:`SequenceClassifier` (Embedding, Linear, MultiheadAttention, LayerNorm): a target for every rule.

    Args:
        batch: ``B``, or one ``B`` per batch.
        seq_len: ``T``: ids ``[B, T]`` in ``[0, vocab)``.
        vocab: embedding rows.
        dim: embedding width.
        width: the Linear's (and attention's) width.
        heads: attention heads (``0``: no attention layer).
        norm: a LayerNorm before the head.
        classes: number of classes; one label per sequence ``y [B]``, cross-entropy.
    """
    model = SequenceClassifier(vocab, dim, width, heads, classes, norm=norm)
    batches = [(torch.randint(0, vocab, (size, seq_len)), labelled((size,), classes)) for size in per_batch(batch)]
    randomise_norms(model)
    return Built(model, losses.classification(model), batches)


@register("self_attention", tags=("regression", "attention"))
def self_attention(
    *,
    batch: Sizes = 4,
    seq_len: int = 5,
    dim: int = 8,
    heads: int = 2,
    bias_kv: bool = False,
    need_weights: bool = True,
    variance: float = 0.7,
) -> Built:
    """:class:`SelfAttention`: ``nn.MultiheadAttention`` used directly, regressed on Gaussian targets.

    Args:
        batch: ``B``, or one ``B`` per batch.
        seq_len: ``T``: ``x [B, T, dim]`` and targets ``y [B, T, dim]`` from ``N(0, 1)``.
        dim: embedding width.
        heads: attention heads.
        bias_kv: ``add_bias_kv`` (``bias_k``, ``bias_v`` parameters).
        need_weights: whether the forward asks for the attention weights.
        variance: ``σ²`` of the ``regression`` loss.
    """
    model = SelfAttention(dim, heads, bias_kv=bias_kv, need_weights=need_weights)
    batches = [(torch.randn(size, seq_len, dim), torch.randn(size, seq_len, dim)) for size in per_batch(batch)]
    return Built(model, losses.regression(model, variance=variance), batches)


@register("cross_attention", tags=("regression", "attention"))
def cross_attention(
    *,
    batch: Sizes = 4,
    queries: int = 4,
    keys: int = 6,
    dim: int = 8,
    heads: int = 2,
    kdim: int = 6,
    vdim: int = 5,
    variance: float = 0.5,
) -> Built:
    """:class:`CrossAttention` (separate q/k/v projections, ``bias_k/v``) regressed on Gaussian targets.

    Dict batches ``{"q" [B, queries, dim], "k" [B, keys, kdim], "v" [B, keys, vdim], "y" [B,
    queries, dim]}``; loss ``regression(inputs=("q", "k", "v"), targets="y")``.

    Args:
        batch: ``B``, or one ``B`` per batch.
        queries: query positions.
        keys: key / value positions.
        dim: embedding width.
        heads: attention heads.
        kdim: key width.
        vdim: value width.
        variance: ``σ²`` of the ``regression`` loss.
    """
    model = CrossAttention(dim, heads, kdim, vdim)
    batches = [
        {
            "q": torch.randn(size, queries, dim),
            "k": torch.randn(size, keys, kdim),
            "v": torch.randn(size, keys, vdim),
            "y": torch.randn(size, queries, dim),
        }
        for size in per_batch(batch)
    ]
    loss = losses.regression(model, inputs=("q", "k", "v"), targets="y", variance=variance)
    return Built(model, loss, batches)


@register("attention_classifier", tags=("classification", "attention", "transformer", "norm"))
def attention_classifier(
    *,
    batch: Sizes = 4,
    seq_len: int = 5,
    dim: int = 8,
    heads: int = 2,
    layers: int = 1,
    block: str = "encoder",
    dropout: float = 0.0,
    batch_first: bool = True,
    classes: int = 3,
) -> Built:
    """:class:`AttentionClassifier`: MHA residual blocks or encoder layers, mean-pooled; cross-entropy.

    Args:
        batch: ``B``, or one ``B`` per batch.
        seq_len: ``T``: ``x [B, T, dim]`` from ``N(0, 1)``.
        dim: embedding width.
        heads: attention heads.
        layers: number of blocks (``layers.0``, ``layers.1``, ...).
        block: ``"mha"`` (``nn.MultiheadAttention``) or ``"encoder"`` (``nn.TransformerEncoderLayer``).
        dropout: the blocks' own dropout probability.
        batch_first: build and call the blocks batch-first, or sequence-first inside.
        classes: number of classes; one label per sequence ``y [B]``.
    """
    model = AttentionClassifier(
        dim, heads, classes, layers=layers, block=block, dropout=dropout, batch_first=batch_first
    )
    batches = [(torch.randn(size, seq_len, dim), labelled((size,), classes)) for size in per_batch(batch)]
    randomise_norms(model)
    return Built(model, losses.classification(model), batches)


@register("encoder_decoder", tags=("classification", "attention", "transformer", "norm"))
def encoder_decoder(
    *, batch: Sizes = 5, seq_len: int = 6, dim: int = 8, heads: int = 2, classes: int = 3, causal: bool = False
) -> Built:
    """:class:`EncoderDecoder`: encoder and decoder layers (self- and cross-attention); cross-entropy.

    Args:
        batch: ``B``, or one ``B`` per batch.
        seq_len: ``T``: ``x [B, T, dim]`` from ``N(0, 1)``.
        dim: embedding width.
        heads: attention heads.
        classes: number of classes; one label per sequence ``y [B]``.
        causal: causal masks on both self-attentions.
    """
    model = EncoderDecoder(dim, heads, classes, causal=causal)
    batches = [(torch.randn(size, seq_len, dim), labelled((size,), classes)) for size in per_batch(batch)]
    randomise_norms(model)
    return Built(model, losses.classification(model), batches)


@register("per_sample_attention", tags=("classification", "attention", "callable"))
def per_sample_attention(
    *,
    batch: int = 5,
    seq_len: int = 6,
    dim: int = 8,
    heads: int = 2,
    classes: int = 3,
    batch_first: bool = True,
    need_weights: bool = False,
    inputs: str = "self",
    kdim: int | None = None,
) -> Built:
    """:class:`PerSampleAttention` with a plain-callable loss on ``(x, mask, y)`` batches.

    The loss calls the model on one sample through ``torch.func.functional_call`` and returns
    ``(cross-entropy, 1)``. The key padding ``mask [B, T]`` is 1 except the last 2 positions of
    sample 1 and all but the first 2 of sample 3 (where the batch has them).

    Args:
        batch: ``B``: ``x [B, T, dim]`` from ``N(0, 1)``, ``y [B]``.
        seq_len: ``T``.
        dim: embedding width.
        heads: attention heads.
        classes: number of classes.
        batch_first: whether MHA is batch-first.
        need_weights: whether the forward asks for the attention weights.
        inputs: ``"self"``, ``"kv"`` or ``"qkv"`` (see :class:`PerSampleAttention`).
        kdim: width of keys and values (separate projection weights), or ``None``.
    """
    model = PerSampleAttention(
        dim, heads, classes, batch_first=batch_first, need_weights=need_weights, inputs=inputs, kdim=kdim
    )
    x = torch.randn(batch, seq_len, dim)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if batch > 1:
        mask[1, -2:] = 0
    if batch > 3:
        mask[3, 2:] = 0
    y = labelled((batch,), classes)

    def loss(params: Any, sample: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, int]:
        x, mask, y = sample
        logits = functional_call(model, params, (x, mask))
        return F.cross_entropy(logits, y, reduction="sum"), 1

    return Built(model, loss, [(x, mask, y)])


@register("conv_tagger", tags=("token", "conv"))
def conv_tagger(*, batch: int = 4, length: int = 5, classes: int = 3) -> Built:
    """:class:`ConvTagger` on ``(x, labels, mask)`` with padding and an ignored label; ``token_classification``.

    ``x [B, 3, T]``, ``labels [B, T]`` in ``[0, classes)``, ``mask [B, T]``: 1 except the last 2
    positions of sample 0 and the last of sample 2; label ``[1, 1]`` is ``-100`` (where the batch
    has them). The loss transposes the logits to ``[T, classes]``.

    Args:
        batch: ``B``.
        length: ``T``.
        classes: number of classes.
    """
    model = ConvTagger(classes)
    x = torch.randn(batch, 3, length)
    labels = torch.randint(0, classes, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0
    if batch > 2:
        mask[2, -1:] = 0
    if batch > 1 and length > 1:
        labels[1, 1] = -100
    loss = losses.token_classification(model, inputs=0, targets=1, mask=2, output=_channels_last)
    return Built(model, loss, [(x, labels, mask)])


def _channels_last(logits: Tensor) -> Tensor:
    return logits.transpose(1, 2)


@register("causal_attention", tags=("token", "attention"))
def causal_attention(*, batch: Sizes = 8, seq_len: int = 5, dim: int = 4, classes: int = 3) -> Built:
    """:class:`CausalAttention` tagging ``x [B, T, dim]`` with labels ``y [B, T]``; ``token_classification``.

    Args:
        batch: ``B``, or one ``B`` per batch.
        seq_len: ``T``.
        dim: input width.
        classes: number of classes.
    """
    model = CausalAttention(dim, classes)
    batches = [(torch.randn(size, seq_len, dim), labelled((size, seq_len), classes)) for size in per_batch(batch)]
    return Built(model, losses.token_classification(model), batches)


@register("conv_patches", tags=("classification", "conv"))
def conv_patches(*, dims: int = 2, batch: Sizes = 5, classes: int = 3) -> Built:
    """Conv → Tanh → Conv (no bias) → Flatten → Linear, with a stride or a dilation to unfold by hand.

    ``dims=2``: Conv2d(2, 3, 3, padding 1, stride 2), Conv2d(3, 4, 2) on ``x [B, 2, 6, 6]``;
    ``dims=1``: Conv1d(2, 3, 3, padding 1, dilation 2), Conv1d(3, 4, 2) on ``x [B, 2, 9]``.

    Args:
        dims: 1 or 2.
        batch: ``B``, or one ``B`` per batch.
        classes: number of classes; labels ``y [B]``, cross-entropy.
    """
    shape: tuple[int, ...]
    if dims == 2:
        first: nn.Module = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        second: nn.Module = nn.Conv2d(3, 4, 2, bias=False)
        shape, flat = (2, 6, 6), 4 * 2 * 2
    elif dims == 1:
        first, second = nn.Conv1d(2, 3, 3, padding=1, dilation=2), nn.Conv1d(3, 4, 2, bias=False)
        shape, flat = (2, 9), 4 * 6
    else:
        raise ValueError(f"dims must be 1 or 2, got {dims}")
    model = Sequential(first, nn.Tanh(), second, nn.Flatten(), nn.Linear(flat, classes))
    return classified(model, batch, shape, classes)


@register("reused_weight", tags=("classification",))
def reused_weight(*, use: str = "twice", batch: Sizes = 6, dim: int = 4, classes: int = 3) -> Built:
    """:class:`ReusedWeight`: one Linear applied twice, or also in a plain matmul; cross-entropy.

    Args:
        use: ``"twice"`` or ``"matmul"``.
        batch: ``B``, or one ``B`` per batch. Inputs ``x [B, dim]``, labels ``y [B]``.
        dim: input (and ``lin``'s) width.
        classes: number of classes.
    """
    return classified(ReusedWeight(dim, classes, use=use), batch, (dim,), classes)


@register("conv1d_linear", tags=("classification",))
def conv1d_linear(*, batch: Sizes = 1, features: int = 4, classes: int = 3) -> Built:
    """A single GPT-2 :class:`Conv1D` (``weight [features, classes]``, ``torch.addmm``) as a classifier.

    Spec: ``weight`` by output channel (``Channel(1)``), ``bias`` by ``Channel(0)``.

    Args:
        batch: ``B``, or one ``B`` per batch. Inputs ``x [B, features]``, labels ``y [B]``.
        features: input width.
        classes: number of classes.
    """
    built = classified(Conv1D(classes, features), batch, (features,), classes)
    return Built(built.model, built.loss, built.batches, dict(CONV1D_RULES))


@register("index_net", tags=("classification", "special"))
def index_net(*, batch: Sizes = 5, dim: int = 4, classes: int = 3) -> Built:
    """:class:`IndexNet`: a Linear next to a non-floating (int64) parameter ``order``; spec skips ``order``.

    Args:
        batch: ``B``, or one ``B`` per batch. Inputs ``x [B, dim]``, labels ``y [B]``.
        dim: input width.
        classes: number of classes.
    """
    model = IndexNet(dim, classes)
    built = classified(model, batch, (dim,), classes)
    spec = {"lin.weight": Channel(), "lin.bias": Channel(), "order": Skip()}
    return Built(model, built.loss, built.batches, spec)


@register("functional_dropout", tags=("classification", "attention", "special"))
def functional_dropout(*, p: float = 0.6, batch: Sizes = 6, seq_len: int = 5, dim: int = 8, classes: int = 5) -> Built:
    """:class:`FunctionalDropout`: dropout hard-coded on (``training=True``) and inside attention.

    Args:
        p: the dropout probability (``0``: the deterministic network).
        batch: ``B``, or one ``B`` per batch.
        seq_len: ``T``: ``x [B, T, dim]`` from ``N(0, 1)``.
        dim: width.
        classes: number of classes; labels ``y [B]``, cross-entropy.
    """
    model = FunctionalDropout(dim, classes, p=p)
    batches = [(torch.randn(size, seq_len, dim), labelled((size,), classes)) for size in per_batch(batch)]
    return Built(model, losses.classification(model), batches)


MODEL_CASES = (
    "conv_stack",
    "deconv_stack",
    "embedding_bag",
    "norms",
    "sequence_classifier",
    "self_attention",
    "cross_attention",
    "attention_classifier",
    "encoder_decoder",
    "per_sample_attention",
    "conv_tagger",
    "causal_attention",
    "conv_patches",
    "reused_weight",
    "conv1d_linear",
    "index_net",
    "functional_dropout",
)
