"""Model-family entries of the test-case registry: plain ``torch.nn`` models and their batches.

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

from .. import Buckets, Channel, Elementwise, Heads, Skip, Whole, infer_spec, losses
from ._batches import per_batch, token_batches
from ._models import (
    ACTIVATIONS,
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
    MeanPool,
    NormNet,
    PerSampleAttention,
    ReusedWeight,
    SelfAttention,
    SequenceClassifier,
    Sequential,
    TokenModel,
    Transformer,
    randomise_norms,
)
from ._registry import Built, register

__all__ = ["MODEL_CASES", "mlp_model"]

Sizes = int | Sequence[int]


def _labelled(shape: tuple[int, ...], classes: int, ignore_frac: float = 0.0) -> Tensor:
    """Class labels of ``shape``; each set to -100 with probability ``ignore_frac``."""
    y = torch.randint(0, classes, shape)
    if ignore_frac > 0:
        y = y.masked_fill(torch.rand(shape) < ignore_frac, -100)
    return y


def _classified(model: nn.Module, batch: Sizes, shape: tuple[int, ...], classes: int) -> Built:
    """Inputs ``[B, *shape]`` from ``N(0, 1)`` and labels ``[B]``, per batch; cross-entropy."""
    batches = [(torch.randn(size, *shape), _labelled((size,), classes)) for size in per_batch(batch)]
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

    ``x [B, features]``, ``y [B]``; with ``positions = T`` the MLP runs on every position of
    ``x [B, T, features]`` with a label per position ``y [B, T]`` (each ``-100`` with probability
    ``ignore_frac``) and the loss is ``token_classification``. ``spec="mixed"``: the first
    Linear's weight in ``Heads(2)`` (``hidden`` even) and its bias ``Skip()``, the next layer's
    weight ``Whole()``, the last bias ``Elementwise()``.
    """
    _spec_option(spec)
    model = mlp_model(features, hidden, classes, activation=activation, norm=norm, bias=bias, dropout=dropout)
    batches = []
    for size in per_batch(batch):
        shape = (size,) if positions is None else (size, positions)
        batches.append((torch.randn(*shape, features), _labelled(shape, classes, ignore_frac)))
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
    """The MLP of ``mlp`` with ``outputs`` outputs; ``(x, y)`` batches ``[B, features]``, ``[B, outputs]``.

    Loss ``regression(variance=variance)``: ``Σ_k (f_k − y_k)² / (2σ²)``, targets from ``N(0, 1)``.
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
    """Grouped Conv1d (``padding = kernel // 2``) → Tanh → Flatten → Linear; ``x [B, groups·in_per_group, length]``."""
    g, k = groups, kernel
    c_in, c_out = g * in_per_group, g * out_per_group
    model = Sequential(
        nn.Conv1d(c_in, c_out, k, groups=g, padding=k // 2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(c_out * (length + 2 * (k // 2) - k + 1), classes),
    )
    return _classified(model, batch, (c_in, length), classes)


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
    """Grouped Conv2d (3×3, padding 1) → GroupNorm → Tanh → mean pool → Linear; ``x [B, C, length, length]``.

    ``length = 1`` gives the convolution a single output position.
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
    return _classified(model, batch, (c_in, length, length), classes)


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
    """Grouped ConvTranspose1d (or 2d with ``two_d``) → Tanh → Flatten → Linear; ``x [B, C, length(, length)]``."""
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
    return _classified(model, batch, shape, classes)


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
    """A :class:`TokenModel` tagger on right-padded token batches (``input_ids``, ``labels``, ``attention_mask``).

    Labels in ``[0, classes)``; loss ``token_classification`` over ``labels`` with the padding mask
    (``mask=False``: no mask, padding excluded by ``ignore_index`` alone). See
    :func:`~fisherfunc.testing._batches.token_batches` for ``lengths``, ``ignore_frac`` and
    ``reserved_ids`` and ``pad_id``; ``padding_idx`` makes id 0 the embedding's padding index.
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
    """A :class:`TokenModel` language model (``classes = vocab``, optionally ``tied``) on right-padded batches.

    Loss ``causal_lm`` on ``input_ids`` (``labels=True``: on the unshifted ``labels`` entry, random
    ids with ``-100`` on padding and, with probability ``ignore_frac``, on real tokens) with the
    padding mask (unless ``mask=False``). Every sample has at least 2 real tokens (one target).
    ``pad_id=None``: ids in ``[0, vocab)`` everywhere, padding marked by the mask alone.
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
    """:class:`Transformer` (one encoder layer per ``norm_first`` entry) as a causal LM with a key-padding mask.

    ``dim = heads · head_dim``; loss ``causal_lm`` on ``input_ids`` with ``attention_mask`` as the
    padding mask and as the model's second input.
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


@register("conv_stack", tags=("classification", "conv"))
def conv_stack(*, batch: Sizes = 4) -> Built:
    """:class:`ConvStack`: Conv2d plain/grouped/depthwise into Conv1d plain/grouped/depthwise; ``x [B, 3, 7, 7]``."""
    return _classified(ConvStack(), batch, (3, 7, 7), 4)


@register("deconv_stack", tags=("classification", "conv"))
def deconv_stack(*, batch: Sizes = 4) -> Built:
    """:class:`DeconvStack`: ConvTranspose1d/2d/3d, groups 1, 2, 3 and depthwise; ``x [B, 6, 3, 3, 3]``."""
    return _classified(DeconvStack(), batch, (6, 3, 3, 3), 5)


@register("embedding_bag", tags=("classification", "embedding"))
def embedding_bag(*, batch: Sizes = 5, bag: int = 4, vocab: int = 12, classes: int = 3) -> Built:
    """:class:`Bags`: mean and sum ``nn.EmbeddingBag`` over bags ``ids [B, bag]``; cross-entropy."""
    model = Bags(vocab, 6, classes)
    batches = [(torch.randint(0, vocab, (size, bag)), _labelled((size,), classes)) for size in per_batch(batch)]
    return Built(model, losses.classification(model), batches)


@register("norms", tags=("classification", "conv", "norm"))
def norms(*, batch: Sizes = 4) -> Built:
    """:class:`NormNet`: InstanceNorm, BatchNorm2d/1d (running statistics), GroupNorm, RMSNorm; ``x [B, 3, 6, 6]``."""
    return _classified(NormNet(), batch, (3, 6, 6), 3)


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

    ``ids [B, seq_len]`` in ``[0, vocab)``, one label per sequence; cross-entropy.
    """
    model = SequenceClassifier(vocab, dim, width, heads, classes, norm=norm)
    batches = [(torch.randint(0, vocab, (size, seq_len)), _labelled((size,), classes)) for size in per_batch(batch)]
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
    """:class:`SelfAttention`, ``nn.MultiheadAttention`` used directly; ``(x, y)`` both ``[B, seq_len, dim]``.

    Loss ``regression(variance=variance)`` of the attention output against ``y ~ N(0, 1)``.
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
    """:class:`CrossAttention` (separate q/k/v projections, ``bias_k/v``); dict batches ``q, k, v, y``.

    ``q [B, queries, dim]``, ``k [B, keys, kdim]``, ``v [B, keys, vdim]``, ``y [B, queries, dim]``;
    loss ``regression(inputs=("q", "k", "v"), targets="y", variance=variance)``.
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
    """:class:`AttentionClassifier`: MHA residual blocks or encoder layers on ``x [B, seq_len, dim]``, mean-pooled.

    One label per sequence; cross-entropy. ``dropout`` is the layers' own dropout probability.
    """
    model = AttentionClassifier(
        dim, heads, classes, layers=layers, block=block, dropout=dropout, batch_first=batch_first
    )
    batches = [(torch.randn(size, seq_len, dim), _labelled((size,), classes)) for size in per_batch(batch)]
    randomise_norms(model)
    return Built(model, losses.classification(model), batches)


@register("encoder_decoder", tags=("classification", "attention", "transformer", "norm"))
def encoder_decoder(
    *, batch: Sizes = 5, seq_len: int = 6, dim: int = 8, heads: int = 2, classes: int = 3, causal: bool = False
) -> Built:
    """:class:`EncoderDecoder`: encoder and decoder layers (self- and cross-attention) on ``x [B, seq_len, dim]``."""
    model = EncoderDecoder(dim, heads, classes, causal=causal)
    batches = [(torch.randn(size, seq_len, dim), _labelled((size,), classes)) for size in per_batch(batch)]
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
    """:class:`PerSampleAttention` with a plain-callable loss; batches ``(x [B, T, dim], mask [B, T], y [B])``.

    The key padding mask is 1 except the last 2 positions of sample 1 and all but the first 2 of
    sample 3 (where the batch has them). The loss calls the model on one sample through
    ``torch.func.functional_call`` and returns ``(cross-entropy, 1)``.
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
    y = _labelled((batch,), classes)

    def loss(params: Any, sample: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, int]:
        x, mask, y = sample
        logits = functional_call(model, params, (x, mask))
        return F.cross_entropy(logits, y, reduction="sum"), 1

    return Built(model, loss, [(x, mask, y)])


@register("conv_tagger", tags=("token", "conv"))
def conv_tagger(*, batch: int = 4, length: int = 5, classes: int = 3) -> Built:
    """:class:`ConvTagger` on ``(x [B, 3, T], labels [B, T], mask [B, T])`` with padding and an ignored label.

    ``mask`` is 1 except the last 2 positions of sample 0 and the last of sample 2; label ``[1, 1]``
    is ``-100`` (where the batch has them). Loss ``token_classification(inputs=0, targets=1,
    mask=2)`` on the logits transposed to ``[T, classes]``.
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
    """:class:`CausalAttention` tagging ``x [B, T, dim]`` with labels ``y [B, T]``; ``token_classification``."""
    model = CausalAttention(dim, classes)
    batches = [(torch.randn(size, seq_len, dim), _labelled((size, seq_len), classes)) for size in per_batch(batch)]
    return Built(model, losses.token_classification(model), batches)


@register("conv_patches", tags=("classification", "conv"))
def conv_patches(*, dims: int = 2, batch: Sizes = 5, classes: int = 3) -> Built:
    """Conv → Tanh → Conv (no bias) → Flatten → Linear, with strides / dilations to unfold by hand.

    ``dims=2``: Conv2d(2, 3, 3, padding 1, stride 2), Conv2d(3, 4, 2) on ``x [B, 2, 6, 6]``;
    ``dims=1``: Conv1d(2, 3, 3, padding 1, dilation 2), Conv1d(3, 4, 2) on ``x [B, 2, 9]``.
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
    return _classified(model, batch, shape, classes)


@register("reused_weight", tags=("classification",))
def reused_weight(*, use: str = "twice", batch: Sizes = 6, dim: int = 4, classes: int = 3) -> Built:
    """:class:`ReusedWeight`: ``lin`` applied twice (``use="twice"``) or also in a plain matmul (``"matmul"``)."""
    return _classified(ReusedWeight(dim, classes, use=use), batch, (dim,), classes)


@register("conv1d_linear", tags=("classification",))
def conv1d_linear(*, batch: Sizes = 1, features: int = 4, classes: int = 3) -> Built:
    """A single GPT-2 :class:`Conv1D` (``weight [features, classes]``, ``torch.addmm``) as a classifier.

    Spec: ``weight`` by output channel (``Channel(1)``), ``bias`` by ``Channel(0)``.
    """
    built = _classified(Conv1D(classes, features), batch, (features,), classes)
    return Built(built.model, built.loss, built.batches, dict(CONV1D_RULES))


@register("index_net", tags=("classification", "special"))
def index_net(*, batch: Sizes = 5, dim: int = 4, classes: int = 3) -> Built:
    """:class:`IndexNet`: a Linear next to a non-floating (int64) parameter ``order``; spec skips ``order``."""
    model = IndexNet(dim, classes)
    built = _classified(model, batch, (dim,), classes)
    spec = {"lin.weight": Channel(), "lin.bias": Channel(), "order": Skip()}
    return Built(model, built.loss, built.batches, spec)


@register("functional_dropout", tags=("classification", "attention", "special"))
def functional_dropout(*, p: float = 0.6, batch: Sizes = 6, seq_len: int = 5, dim: int = 8, classes: int = 5) -> Built:
    """:class:`FunctionalDropout`: dropout hard-coded on (``training=True``) and inside attention; ``x [B, T, dim]``."""
    model = FunctionalDropout(dim, classes, p=p)
    batches = [(torch.randn(size, seq_len, dim), _labelled((size,), classes)) for size in per_batch(batch)]
    return Built(model, losses.classification(model), batches)


MODEL_CASES = (
    "mlp",
    "regression",
    "cnn1d",
    "cnn2d",
    "conv_transpose",
    "token_classification",
    "causal_lm",
    "transformer",
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
