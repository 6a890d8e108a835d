"""The hypothesis families of the test-case registry: MLPs, convolutions, token models, a transformer.

Each builder is registered in :mod:`fisherfunc.testing.cases` (whose docstring tables them) and
runs with the global RNG seeded: the model is initialised first, the batches are drawn next, norm
layers' affine parameters and running statistics last (:func:`randomise_norms`).
:func:`fisherfunc.testing.strategies.model_cases` draws their sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import Buckets, Channel, Elementwise, Heads, Skip, Whole, infer_spec, losses
from ._batches import labelled, per_batch, token_batches
from ._models import (
    ACTIVATIONS,
    Conv1D,
    MeanPool,
    Sequential,
    TokenModel,
    Transformer,
    randomise_norms,
)
from ._registry import Built, register

__all__ = ["CONV1D_RULES", "FAMILY_CASES", "classified", "mlp_model"]

Sizes = int | Sequence[int]


def classified(model: nn.Module, batch: Sizes, shape: tuple[int, ...], classes: int) -> Built:
    """Inputs ``[B, *shape]`` from ``N(0, 1)`` and labels ``[B]`` per batch, then norms randomised; cross-entropy."""
    batches = [(torch.randn(size, *shape), labelled((size,), classes)) for size in per_batch(batch)]
    return Built(randomise_norms(model), losses.classification(model), batches)


def mlp_model(
    features: int,
    hidden: int | Sequence[int],
    out: int,
    *,
    activation: str | Sequence[str] = "tanh",
    norm: bool = False,
    bias: bool = True,
    dropout: float = 0.0,
) -> Sequential:
    """``Linear → activation [→ LayerNorm] [→ dropout]`` per hidden width, then ``Linear(·, out)``.

    ``hidden`` is one width or one per hidden layer (``()``: a single Linear); ``activation`` one
    name of :data:`ACTIVATIONS` or one per hidden layer. ``norm`` puts a LayerNorm after the first
    activation; ``dropout > 0`` an ``nn.Dropout`` after even hidden layers' activations and an
    ``nn.AlphaDropout`` after odd ones. Input ``[..., features]`` → ``[..., out]``.
    """
    widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
    acts = (activation,) * len(widths) if isinstance(activation, str) else tuple(activation)
    if len(acts) != len(widths):
        raise ValueError(f"activation has {len(acts)} entries for {len(widths)} hidden layers")
    layers: list[nn.Module] = []
    width = features
    for i, (size, act) in enumerate(zip(widths, acts, strict=True)):
        layers += [nn.Linear(width, size, bias=bias), ACTIVATIONS[act]()]
        if norm and i == 0:
            layers.append(nn.LayerNorm(size))
        if dropout:
            layers.append(nn.Dropout(dropout) if i % 2 == 0 else nn.AlphaDropout(dropout))
        width = size
    layers.append(nn.Linear(width, out, bias=bias))
    return Sequential(*layers)


def _mlp_mixed_spec(model: Sequential) -> dict[str, Any]:
    """The ``mlp`` entry's ``spec="mixed"``.

    The first Linear's weight in ``Heads(2)`` and its bias skipped, the next layer's weight
    ``Whole()``, the last bias ``Elementwise()``, every other parameter by :func:`infer_spec`.
    """
    with_params = [i for i, m in enumerate(model) if any(True for _ in m.parameters(recurse=False))]
    linear = [i for i in with_params if isinstance(model[i], nn.Linear)]
    if len(with_params) < 2 or model[linear[0]].bias is None or model[linear[-1]].bias is None:
        raise ValueError("spec='mixed' needs at least two layers with parameters and biases")
    first, after = with_params[0], with_params[1]
    mixed = {f"{first}.weight": Heads(2), f"{first}.bias": Skip(), f"{after}.weight": Whole()}
    return infer_spec(model) | mixed | {f"{linear[-1]}.bias": Elementwise()}


def _spec_option(spec: str) -> None:
    if spec not in ("inferred", "mixed"):
        raise ValueError(f"spec must be 'inferred' or 'mixed', got {spec!r}")


@register("mlp", tags=("hypothesis", "classification", "mlp"))
def mlp(
    *,
    batch: Sizes = 8,
    features: int = 4,
    hidden: int | Sequence[int] = 6,
    classes: int = 3,
    activation: str | Sequence[str] = "tanh",
    norm: bool = False,
    bias: bool = True,
    dropout: float = 0.0,
    positions: int | None = None,
    ignore_frac: float = 0.0,
    spec: str = "inferred",
) -> Built:
    """An MLP classifier (:func:`mlp_model`); ``(x, y)`` batches, cross-entropy.

    Args:
        batch: ``B``, or one ``B`` per batch (``Case.batches``).
        features: input width: ``x [B, features]`` from ``N(0, 1)``.
        hidden: one hidden width, or one per hidden layer (``()``: a single Linear).
        classes: output width; labels ``y [B]`` in ``[0, classes)``.
        activation: ``"tanh"``, ``"relu"``, ``"gelu"`` or ``"sigmoid"``, or one per hidden layer.
        norm: a LayerNorm after the first activation.
        bias: whether the Linears have biases.
        dropout: ``> 0``: ``nn.Dropout`` / ``nn.AlphaDropout`` after the hidden activations.
        positions: ``T``: the MLP runs on every position of ``x [B, T, features]`` with labels
            ``y [B, T]`` and the loss is ``token_classification``.
        ignore_frac: with ``positions``, the probability that a label is ``-100``.
        spec: ``"inferred"``, or ``"mixed"``: the first Linear's weight in ``Heads(2)`` (``hidden``
            even) and its bias ``Skip()``, the next layer's weight ``Whole()``, the last bias
            ``Elementwise()``, the rest inferred.
    """
    _spec_option(spec)
    model = mlp_model(features, hidden, classes, activation=activation, norm=norm, bias=bias, dropout=dropout)
    batches = []
    for size in per_batch(batch):
        shape = (size,) if positions is None else (size, positions)
        batches.append((torch.randn(*shape, features), labelled(shape, classes, ignore_frac)))
    randomise_norms(model)
    loss = losses.classification(model) if positions is None else losses.token_classification(model)
    return Built(model, loss, batches, _mlp_mixed_spec(model) if spec == "mixed" else None)


@register("regression", tags=("hypothesis", "regression", "mlp"))
def regression(
    *,
    batch: Sizes = 8,
    features: int = 4,
    hidden: int | Sequence[int] = 6,
    outputs: int = 3,
    activation: str | Sequence[str] = "tanh",
    variance: float = 1.0,
) -> Built:
    """The ``mlp`` network with ``outputs`` outputs and a Gaussian loss; ``(x, y)`` batches.

    Args:
        batch: ``B``, or one ``B`` per batch.
        features: input width: ``x [B, features]`` from ``N(0, 1)``.
        hidden: one hidden width, or one per hidden layer.
        outputs: output width: targets ``y [B, outputs]`` from ``N(0, 1)``.
        activation: the hidden activations (as for ``mlp``).
        variance: ``σ²`` of ``regression(variance=σ²)``: ``L_b = Σ_k (f_k − y_bk)² / (2σ²)``.
    """
    model = mlp_model(features, hidden, outputs, activation=activation)
    batches = [(torch.randn(size, features), torch.randn(size, outputs)) for size in per_batch(batch)]
    return Built(model, losses.regression(model, variance=variance), batches)


@register("cnn1d", tags=("hypothesis", "classification", "conv"))
def cnn1d(
    *,
    batch: Sizes = 4,
    groups: int = 2,
    in_per_group: int = 2,
    out_per_group: int = 3,
    kernel: int = 3,
    length: int = 5,
    classes: int = 3,
) -> Built:
    """Grouped Conv1d (``padding = kernel // 2``) → Tanh → Flatten → Linear; cross-entropy.

    Args:
        batch: ``B``, or one ``B`` per batch.
        groups: the convolution's groups ``G``.
        in_per_group: input channels per group: ``x [B, G·in_per_group, length]``.
        out_per_group: output channels per group.
        kernel: kernel size.
        length: input length.
        classes: number of classes; labels ``y [B]``.
    """
    g, k = groups, kernel
    c_in, c_out = g * in_per_group, g * out_per_group
    model = Sequential(
        nn.Conv1d(c_in, c_out, k, groups=g, padding=k // 2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(c_out * (length + 2 * (k // 2) - k + 1), classes),
    )
    return classified(model, batch, (c_in, length), classes)


@register("cnn2d", tags=("hypothesis", "classification", "conv", "norm"))
def cnn2d(
    *,
    batch: Sizes = 4,
    groups: int = 2,
    in_per_group: int = 2,
    out_per_group: int = 2,
    length: int = 3,
    classes: int = 3,
) -> Built:
    """Grouped Conv2d (3×3, padding 1) → GroupNorm → Tanh → mean pool → Linear; cross-entropy.

    Args:
        batch: ``B``, or one ``B`` per batch.
        groups: the convolution's and the GroupNorm's groups ``G``.
        in_per_group: input channels per group: ``x [B, G·in_per_group, length, length]``.
        out_per_group: output channels per group.
        length: image side (``1``: the convolution has a single output position).
        classes: number of classes; labels ``y [B]``.
    """
    g = groups
    c_in, c_out = g * in_per_group, g * out_per_group
    model = Sequential(
        nn.Conv2d(c_in, c_out, 3, groups=g, padding=1),
        nn.GroupNorm(g, c_out),
        nn.Tanh(),
        MeanPool(),
        nn.Linear(c_out, classes),
    )
    return classified(model, batch, (c_in, length, length), classes)


@register("conv_transpose", tags=("hypothesis", "classification", "conv"))
def conv_transpose(
    *,
    batch: Sizes = 4,
    groups: int = 2,
    in_per_group: int = 2,
    out_per_group: int = 2,
    kernel: int = 2,
    stride: int = 2,
    length: int = 3,
    classes: int = 3,
    two_d: bool = False,
) -> Built:
    """Grouped ConvTranspose1d (or 2d) → Tanh → Flatten → Linear; cross-entropy.

    Args:
        batch: ``B``, or one ``B`` per batch.
        groups: the convolution's groups ``G`` (weight ``[G·in_per_group, out_per_group, *k]``).
        in_per_group: input channels per group: ``x [B, G·in_per_group, length(, length)]``.
        out_per_group: output channels per group.
        kernel: kernel size.
        stride: stride.
        length: input length (side).
        classes: number of classes; labels ``y [B]``.
        two_d: ConvTranspose2d on ``length × length`` images instead of ConvTranspose1d.
    """
    g, k = groups, kernel
    c_in, c_out = g * in_per_group, g * out_per_group
    out_len = (length - 1) * stride + k
    shape: tuple[int, ...]
    if two_d:
        conv: nn.Module = nn.ConvTranspose2d(c_in, c_out, k, stride=stride, groups=g)
        shape, flat = (c_in, length, length), c_out * out_len * out_len
    else:
        conv = nn.ConvTranspose1d(c_in, c_out, k, stride=stride, groups=g)
        shape, flat = (c_in, length), c_out * out_len
    model = Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(flat, classes))
    return classified(model, batch, shape, classes)


def _token_model(
    vocab: int, dim: int, classes: int, hidden: int | None, norm: bool, tied: bool, padding_idx: bool, **more: bool
) -> TokenModel:
    return TokenModel(
        vocab, dim, classes, hidden=hidden, norm=norm, tied=tied, padding_idx=0 if padding_idx else None, **more
    )


#: Rules for a GPT-2 :class:`Conv1D` (``weight [in, out]``), which :func:`infer_spec` does not place.
CONV1D_RULES = {"weight": Channel(1), "bias": Channel(0)}


def _token_spec(model: TokenModel, spec: str) -> Any:
    """The token entries' spec: inferred, or ``Buckets(4)`` for the embedding and ``up.bias`` skipped.

    A :class:`Conv1D` up-projection gets :data:`CONV1D_RULES` (by output channel).
    """
    _spec_option(spec)
    conv1d = isinstance(model.up, Conv1D)
    if spec == "inferred" and not conv1d:
        return None
    inferred = infer_spec(model, overrides={f"up.{k}": r for k, r in CONV1D_RULES.items()} if conv1d else None)
    if spec == "inferred":
        return inferred
    if model.up is None:
        raise ValueError("spec='mixed' needs hidden= (a residual block whose up-projection has a bias)")
    return inferred | {"emb.weight": Buckets(4), "up.bias": Skip()}


@register("token_classification", tags=("hypothesis", "token", "embedding", "norm"))
def token_classification(
    *,
    batch: Sizes = 4,
    seq_len: Sizes = 5,
    vocab: int = 11,
    dim: int = 6,
    classes: int = 5,
    hidden: int | None = None,
    norm: bool = True,
    padding_idx: bool = False,
    causal_mean: bool = False,
    conv1d: bool = False,
    lengths: Sequence[int] | None = None,
    mask: bool = True,
    ignore_index: int = -100,
    ignore_frac: float = 0.0,
    reserved_ids: int = 0,
    pad_id: int | None = 0,
    spec: str = "inferred",
) -> Built:
    """A :class:`TokenModel` tagger on right-padded token batches; ``token_classification`` loss.

    Batches ``{"input_ids", "labels", "attention_mask"}``, each ``[B, T]`` int64
    (:func:`~fisherfunc.testing._batches.token_batches`): real ids in ``[1, vocab)``, padding id 0,
    labels in ``[0, classes)`` on real tokens and ``ignore_index`` on padding.

    Args:
        batch: ``B``, or one ``B`` per batch.
        seq_len: ``T``, or one ``T`` per batch.
        vocab: vocabulary size (embedding rows).
        dim: embedding width.
        classes: number of label classes (the head's width).
        hidden: width of a residual ``up → tanh → down`` block, or ``None`` for none.
        norm: a LayerNorm after the embedding.
        padding_idx: make id 0 the embedding's ``padding_idx``.
        causal_mean: position ``t`` sees the running mean of positions ``≤ t``.
        conv1d: the block's up-projection is a GPT-2 :class:`Conv1D` (``addmm``).
        lengths: every sample's real length (one batch); default drawn, the first sample full.
        mask: the loss reads ``attention_mask`` (``False``: padding excluded by ``ignore_index``).
        ignore_index: label of padded and ignored positions.
        ignore_frac: probability that a real token's label is ``ignore_index``.
        reserved_ids: the last ids of the vocabulary never occur (rows free for a test to poison).
        pad_id: id of padded positions; ``None``: every id may be real, padding by the mask alone.
        spec: ``"inferred"``, or ``"mixed"``: ``Buckets(4)`` on the embedding and ``up.bias``
            skipped (needs ``hidden``).
    """
    model = _token_model(vocab, dim, classes, hidden, norm, False, padding_idx, conv1d=conv1d, causal_mean=causal_mean)
    batches = token_batches(
        batch,
        seq_len,
        vocab,
        lengths=lengths,
        classes=classes,
        ignore_index=ignore_index,
        ignore_frac=ignore_frac,
        reserved_ids=reserved_ids,
        pad_id=pad_id,
    )
    randomise_norms(model)
    loss = losses.token_classification(
        model,
        inputs="input_ids",
        targets="labels",
        mask="attention_mask" if mask else None,
        ignore_index=ignore_index,
    )
    return Built(model, loss, batches, _token_spec(model, spec))


@register("causal_lm", tags=("hypothesis", "token", "causal", "embedding", "norm"))
def causal_lm(
    *,
    batch: Sizes = 4,
    seq_len: Sizes = 5,
    vocab: int = 11,
    dim: int = 6,
    hidden: int | None = None,
    norm: bool = True,
    tied: bool = False,
    padding_idx: bool = False,
    causal_mean: bool = False,
    conv1d: bool = False,
    lengths: Sequence[int] | None = None,
    labels: bool = False,
    mask: bool = True,
    ignore_frac: float = 0.0,
    reserved_ids: int = 0,
    pad_id: int | None = 0,
    spec: str = "inferred",
) -> Built:
    """A :class:`TokenModel` language model (``classes = vocab``) on right-padded batches; ``causal_lm`` loss.

    Batches as for ``token_classification``, every sample with at least 2 real tokens (a target);
    the loss predicts ``input_ids`` shifted by one, or the unshifted ``labels`` entry.

    Args:
        batch: ``B``, or one ``B`` per batch.
        seq_len: ``T``, or one ``T`` per batch.
        vocab: vocabulary size (embedding rows).
        dim: embedding width.
        hidden: width of a residual ``up → tanh → down`` block, or ``None`` for none.
        norm: a LayerNorm after the embedding.
        tied: the head's weight is the embedding's (no head bias).
        padding_idx: make id 0 the embedding's ``padding_idx``.
        causal_mean: position ``t`` sees the running mean of positions ``≤ t`` (positions mix).
        conv1d: the block's up-projection is a GPT-2 :class:`Conv1D` (``addmm``).
        lengths: every sample's real length (one batch); default drawn, the first sample full.
        labels: targets from ``labels`` (random ids, ``-100`` on padding) instead of ``input_ids``.
        mask: the loss reads ``attention_mask``.
        ignore_frac: with ``labels``, the probability that a real token's label is ``-100``.
        reserved_ids: the last ids of the vocabulary never occur.
        pad_id: id of padded positions; ``None``: ids in ``[0, vocab)`` everywhere, padding by the
            mask alone.
        spec: ``"inferred"``, or ``"mixed"``: ``Buckets(4)`` on the embedding and ``up.bias``
            skipped (needs ``hidden``).
    """
    model = _token_model(vocab, dim, vocab, hidden, norm, tied, padding_idx, conv1d=conv1d, causal_mean=causal_mean)
    batches = token_batches(
        batch,
        seq_len,
        vocab,
        lengths=lengths,
        min_length=2,
        ignore_frac=ignore_frac,
        reserved_ids=reserved_ids,
        pad_id=pad_id,
    )
    randomise_norms(model)
    loss = losses.causal_lm(
        model,
        inputs="input_ids",
        labels="labels" if labels else None,
        mask="attention_mask" if mask else None,
    )
    return Built(model, loss, batches, _token_spec(model, spec))


@register("transformer", tags=("hypothesis", "token", "causal", "attention", "transformer", "norm"))
def transformer(
    *,
    batch: Sizes = 4,
    seq_len: Sizes = 5,
    vocab: int = 7,
    heads: int = 2,
    head_dim: int = 2,
    norm_first: bool | Sequence[bool] = True,
    lengths: Sequence[int] | None = None,
) -> Built:
    """:class:`Transformer` as a causal LM with a key-padding mask; ``causal_lm`` loss.

    The loss predicts ``input_ids`` shifted by one; ``attention_mask`` is the padding mask and the
    model's second input. Every sample has at least 2 real tokens.

    Args:
        batch: ``B``, or one ``B`` per batch.
        seq_len: ``T``, or one ``T`` per batch.
        vocab: vocabulary size.
        heads: attention heads.
        head_dim: width per head (``dim = heads · head_dim``).
        norm_first: pre-LN (``True``) or post-LN, or one flag per layer (the number of layers).
        lengths: every sample's real length (one batch); default drawn, the first sample full.
    """
    firsts = (norm_first,) if isinstance(norm_first, bool) else tuple(norm_first)
    model = Transformer(vocab, heads * head_dim, heads, firsts)
    batches = token_batches(batch, seq_len, vocab, lengths=lengths, min_length=2)
    randomise_norms(model)
    loss = losses.causal_lm(
        model,
        inputs={"input_ids": "input_ids", "attention_mask": "attention_mask"},
        labels="input_ids",
        mask="attention_mask",
    )
    return Built(model, loss, batches)


FAMILY_CASES = (
    "mlp",
    "regression",
    "cnn1d",
    "cnn2d",
    "conv_transpose",
    "token_classification",
    "causal_lm",
    "transformer",
)
