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
