"""Per-sample attention masks, position ids and the attention layout of Hugging Face models.

A 2-D padding mask cannot go to a Hugging Face model inside ``vmap``: the model builds its
attention mask from it with data-dependent Python control flow (``if padding_mask.all(): ...``)
that a batched tensor refuses. A 4-D mask is passed through unchanged by ``transformers``' mask
builders (``create_causal_mask``, ``create_bidirectional_mask``; BERT, GPT-2, Llama, Mistral and
Qwen alike), so inside the per-sample function the padding mask ``m [1, T]`` becomes the mask
those builders would have made, as pure tensor algebra::

    allowed[q, k] = m_k  ∧  (k ≤ q, if causal)  ∧  (q − k < W, if a sliding window W applies)
    allowed[q, q] = 1   for a row q that would allow no key at all
    sdpa:  allowed                                   (bool, [1, 1, T, T])
    eager: 0 where allowed, finfo(dtype).min elsewhere  (additive, [1, 1, T, T])

The second line differs from ``transformers``: with left padding a causal model's padding rows
allow no key, and some eager implementations (Llama's softmax runs in float32) turn such a row of a
float64 model into NaN, which the backward pass spreads into every gradient (``0 · NaN``).
Letting an empty row attend to itself changes only the outputs at padding positions, which reach
neither a real token (padding keys are masked) nor the loss, so every real output, the loss and
the Fisher are unchanged — and finite.

Models whose layers mix full and sliding-window attention (``config.layer_types``) get a dict
``{"full_attention": ..., "sliding_attention": ...}``, which those models also accept as is.

The losses front-align every sample first (:mod:`~fisherfunc.hf._align`), so a padding query
that allows no key only occurs when a caller builds masks for left padding directly.

An encoder's self-attention and a decoder's cross-attention need no mask per query:
:func:`key_mask` gives ``[1, 1, 1, S]`` (``allowed[k] = m_k``), which broadcasts over queries.

Position ids, for the families that build them from the 2-D mask (OPT, BioGPT; see
:mod:`~fisherfunc.hf._conventions`), are counted over the real tokens only — what those models
compute, and the convention of ``transformers``' ``generate``::

    position_ids_t = (Σ_{t' ≤ t} m_t') − 1 for a real token, 0 for padding

>>> import torch
>>> position_ids(torch.tensor([[0, 0, 1, 1, 1]]))
tensor([[0, 0, 0, 1, 2]])
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import ProbeError, observed_causality
from ._conventions import causality
from ._view import loss_view

__all__ = [
    "AttentionLayout",
    "attention_layout",
    "attention_mask",
    "causal_mask",
    "key_mask",
    "implementation",
    "position_ids",
]

_IMPLEMENTATIONS = ("sdpa", "eager")
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """What 4-D attention mask a Hugging Face model expects.

    Attributes:
        causal: whether a token attends only to itself and earlier tokens.
        implementation: ``"sdpa"`` (boolean mask) or ``"eager"`` (additive float mask).
        sliding_window: ``W``: a token attends only to the ``W`` latest positions (``None``: all).
        mixed: whether layers mix full and sliding-window attention (then the mask is a dict).
        source: what decided ``causal`` (a config entry confirmed on the live model, or the override).
    """

    causal: bool
    implementation: str
    sliding_window: int | None = None
    mixed: bool = False
    source: str = ""


def implementation(model: nn.Module) -> str:
    """The attention implementation of a (possibly wrapped) ``transformers`` model: ``"sdpa"`` or ``"eager"``.

    Raises:
        ValueError: for a model that is not a ``transformers`` model, or another implementation.
    """
    inner = loss_view(model).inner
    found = getattr(inner.config, "_attn_implementation", None)
    if found not in _IMPLEMENTATIONS:
        raise ValueError(
            f"{type(inner).__name__} uses attn_implementation={found!r}; per-sample Fisher runs under "
            "torch.func.vmap, which needs 'sdpa' or 'eager': load the model with attn_implementation='sdpa' (or "
            "call model.set_attn_implementation('sdpa'))"
        )
    return str(found)


def _causality(model: nn.Module) -> tuple[bool, str]:
    """Causality from the config (:func:`~fisherfunc.hf._conventions.causality`), checked on the live model."""
    decided = causality(model)
    observed = observed_causality(model)
    seen = "causally" if observed else "both ways"
    if decided.causal is None:
        return observed, f"{decided.source}; observed on the live model: it attends {seen}"
    if decided.causal != observed:
        said = "causally" if decided.causal else "both ways"
        change = "does not change" if observed else "changes"
        raise ProbeError(
            f"{type(model).__name__}'s config says it attends {said} ({decided.source}), but its output at the first "
            f"position {change} when the later tokens change; pass causal=True (decoder) or causal=False (encoder) "
            "to say which"
        )
    return decided.causal, f"{decided.source}; confirmed on the live model"


def attention_layout(model: nn.Module, *, causal: bool | None = None) -> AttentionLayout:
    """Read a Hugging Face model's attention layout from its config, checked on the live model.

    Args:
        model: a ``transformers`` model (``model.config`` is read), possibly wrapped (PEFT,
            ``torch.compile``, ``DataParallel``; see :mod:`~fisherfunc.hf._view`).
        causal: override whether attention is causal (not checked); ``None`` reads it from the
            config (:mod:`~fisherfunc.hf._conventions`) and confirms it on the live model: its output
            at the first position must not change with later tokens exactly when it is causal.

    Raises:
        ValueError: for a model without a ``transformers`` config, an attention implementation
            other than ``sdpa``/``eager``, or an encoder-decoder (see :func:`~fisherfunc.hf.seq2seq_lm`);
            :class:`~fisherfunc.hf._checks.ProbeError` (a ``ValueError``) when the config and the live model
            disagree.
    """
    inner = loss_view(model).inner
    config = inner.config
    found = implementation(inner)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(inner).__name__} is an encoder-decoder model: use fisherfunc.hf.seq2seq_lm for its decoder's "
            "labels (causal_lm, masked_lm and the classifiers are for encoder-only and decoder-only models)"
        )
    if causal is None:
        causal, source = _causality(inner)
    else:
        source = f"causal={causal} given"
    layer_types = tuple(getattr(config, "layer_types", None) or ())
    unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
    if unknown:
        raise ValueError(
            f"{type(inner).__name__} has attention layer types {unknown}; fisherfunc.hf builds masks for "
            f"{list(_LAYER_TYPES)} only"
        )
    window = getattr(config, "sliding_window", None) if causal else None
    mixed = "sliding_attention" in layer_types
    if layer_types and not mixed:
        window = None  # every layer attends fully; a configured window is unused
    return AttentionLayout(causal=causal, implementation=found, sliding_window=window, mixed=mixed, source=source)


def position_ids(mask: Tensor) -> Tensor:
    """Positions counted over real tokens: ``cumsum(m) − 1``, and 0 at padding.

    Args:
        mask: ``[..., T]`` padding mask (nonzero = real token).

    Returns:
        ``[..., T]`` int64 position ids.
    """
    m = (mask != 0).long()
    return (m.cumsum(-1) - 1).masked_fill(m == 0, 0)


def _allowed(mask: Tensor, causal: bool, window: int | None) -> Tensor:
    """``allowed[b, 0, q, k]`` (bool, ``[B, 1, T, T]``) from a ``[B, T]`` padding mask."""
    t = mask.shape[-1]
    q = torch.arange(t, device=mask.device).unsqueeze(1)
    k = torch.arange(t, device=mask.device).unsqueeze(0)
    allowed = (mask != 0)[:, None, None, :]  # the key is a real token
    if causal:
        allowed = allowed & (k <= q)
    if window is not None:
        allowed = allowed & (q - k < window)
    allowed = allowed.expand(mask.shape[0], 1, t, t)
    empty = ~allowed.any(-1, keepdim=True)  # a padding query with no key to attend to
    return allowed | (empty & (k == q))


def _encode(allowed: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    if implementation == "eager":  # additive: 0 where allowed, the dtype's most negative value elsewhere
        return torch.where(allowed, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)
    return allowed


def key_mask(mask: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """A 4-D mask of the keys only, ``[B, 1, 1, S]``: every query may attend to every real key.

    For bidirectional attention whose queries need no mask of their own: an encoder's self-attention
    after front alignment (padding queries attend to the real keys; their outputs reach nothing), and
    a decoder's cross-attention to the encoder's tokens.

    Args:
        mask: ``[B, S]`` padding mask of the keys (nonzero = real token).
        implementation: ``"sdpa"`` (bool) or ``"eager"`` (additive).
        dtype: the compute dtype (of an eager model's additive mask).
    """
    if mask.ndim != 2:
        raise ValueError(f"the padding mask of one sample must have shape [1, S], got {tuple(mask.shape)}")
    return _encode((mask != 0)[:, None, None, :], implementation, dtype)


def causal_mask(length: int, layout: AttentionLayout, dtype: torch.dtype, device: torch.device) -> Any:
    """The causal (and sliding-window) mask of every front-aligned sample of ``length`` slots, additive.

    After front alignment the padding follows the real tokens, so causal attention never lets a real
    query see it: one mask, built from the positions alone, serves every sample. It is additive
    (0 where allowed, ``finfo(dtype).min`` elsewhere) for ``sdpa`` too, which would otherwise
    turn a boolean mask into a float copy in every layer (each kept for the backward); built from
    no sample's values, it is shared by the samples of a chunk and by the layers::

        allowed[q, k] = (k ≤ q)  ∧  (q − k < W, if a sliding window W applies)

    Args:
        length: ``T``.
        layout: a causal :class:`AttentionLayout`.
        dtype: the compute dtype.
        device: where to build it.

    Returns:
        ``[1, 1, T, T]`` of ``dtype``; a dict of two for mixed layers.
    """
    ones = torch.ones(1, length, dtype=torch.long, device=device)

    def build(window: int | None) -> Tensor:
        return _encode(_allowed(ones, True, window), "eager", dtype)

    if not layout.mixed:
        return build(layout.sliding_window)
    return {"full_attention": build(None), "sliding_attention": build(layout.sliding_window)}


def attention_mask(mask: Tensor, layout: AttentionLayout, dtype: torch.dtype) -> Any:
    """The 4-D attention mask (or dict of masks) a model with ``layout`` builds from ``mask``.

    Args:
        mask: ``[B, T]`` padding mask (nonzero = real token); under ``vmap`` ``B`` is 1.
        layout: the model's :class:`AttentionLayout`.
        dtype: the compute dtype (of an eager model's additive mask).

    Returns:
        ``[B, 1, T, T]`` bool (sdpa) or ``dtype`` (eager) tensor; a dict of two for mixed layers.
    """
    if mask.ndim != 2:
        raise ValueError(f"the padding mask of one sample must have shape [1, T], got {tuple(mask.shape)}")
    full = _encode(
        _allowed(mask, layout.causal, None if layout.mixed else layout.sliding_window), layout.implementation, dtype
    )
    if not layout.mixed:
        return full
    sliding = _encode(_allowed(mask, layout.causal, layout.sliding_window), layout.implementation, dtype)
    return {"full_attention": full, "sliding_attention": sliding}
