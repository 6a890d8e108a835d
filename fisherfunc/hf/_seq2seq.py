"""Per-sample loss of a Hugging Face encoder–decoder (T5, BART, mBART, Marian, Whisper-like).

The decoder's labels given the encoder's input, token-normalised like :func:`~fisherfunc.hf.causal_lm`::

    L_b = Σ_t d_t [y_t ≠ ignore] · (−log p(y_t | x, y_<t))        n_b = Σ_t d_t [y_t ≠ ignore]

with ``d`` the decoder's padding mask (all ones unless ``decoder_attention_mask`` is an input). The
batch is what ``DataCollatorForSeq2Seq`` makes: ``input_ids``/``attention_mask`` ``[B, S]`` for the
encoder and ``labels`` ``[B, T]`` padded with ``ignore_index``. Inside the per-sample function:

* **encoder** — the sample is front-aligned by its mask (:mod:`~fisherfunc.hf._align`), and the
  model gets the key mask ``[1, 1, 1, S]`` (:func:`~fisherfunc.hf._masks.key_mask`) as
  ``attention_mask``: its encoder attends to every real token, and these models pass the same mask
  on to the decoder's cross-attention, where it is just as right;
* **decoder inputs** — the batch's ``decoder_input_ids`` if they are an input; else made from the
  labels as the model makes them, by its own ``prepare_decoder_input_ids_from_labels`` (T5's
  ``_shift_right``, BART's and Marian's ``shift_tokens_right``, mBART's language-code wrap-around),
  or, for a model without one (Whisper), ``[decoder_start_token_id, y_0, …, y_{T−2}]`` with ignored
  labels replaced by ``pad_token_id``;
* **decoder padding** — labels padded on the right need no mask: the decoder is causal, so no real
  position sees a later one, and the decoder builds its own causal mask. With
  ``decoder_attention_mask`` among the inputs, the decoder's entries are aligned by it too and the
  decoder gets the 4-D causal mask (:func:`~fisherfunc.hf._masks.attention_mask`).

When the loss is built, the live padding check (:mod:`~fisherfunc.hf._checks`) compares its
per-sample forward on a probe padded left and right with ``model(input_ids, attention_mask,
labels=...)`` on the unpadded probe, which makes the decoder inputs the model's own way.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._engine.batches import entry
from ..dropout import DropoutMode, check_dropout
from ._align import align_entries
from ._checks import PROBE_LENGTH, check_padding, probe_ids
from ._losses import HFLoss
from ._masks import AttentionLayout, attention_mask, implementation, key_mask
from ._view import loss_view

__all__ = ["Seq2SeqInputs", "seq2seq_lm"]

_HF_IGNORE = -100  # what the models' own shift functions replace by pad_token_id


@dataclasses.dataclass(frozen=True)
class Seq2SeqInputs:
    """The ``prepare`` step of :func:`seq2seq_lm`: one aligned sample's keyword inputs for the model.

    Attributes:
        implementation: ``"sdpa"`` or ``"eager"``.
        mask: keyword of the encoder's padding mask (``None``: no padding).
        decoder_mask: keyword of the decoder's padding mask (``None``: none; labels padded on the right).
        labels: keyword under which the labels arrive to make the decoder inputs from (``None``: the
            batch gives ``decoder_input_ids``); removed before the model is called.
        shift: ``labels [1, T] -> decoder_input_ids [1, T]``.
        no_cache: whether to pass ``use_cache=False``.
    """

    implementation: str
    mask: str | None
    decoder_mask: str | None
    labels: str | None
    shift: Callable[[Tensor], Tensor] | None
    no_cache: bool

    def __call__(self, kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """``{input_ids [1, S], attention_mask [1, S], labels [1, T], ...}`` → the model's keyword arguments."""
        out = dict(kwargs)
        if self.labels is not None:
            assert self.shift is not None
            out["decoder_input_ids"] = self.shift(out.pop(self.labels))
        if self.mask is not None:
            out["attention_mask"] = key_mask(kwargs[self.mask], self.implementation, dtype)
        if self.decoder_mask is not None:
            layout = AttentionLayout(causal=True, implementation=self.implementation)
            out["decoder_attention_mask"] = attention_mask(kwargs[self.decoder_mask], layout, dtype)
        if self.no_cache:
            out["use_cache"] = False
        return out


def _shift(model: nn.Module, ignore_index: int) -> Callable[[Tensor], Tensor]:
    """The model's own ``labels → decoder_input_ids``, or the standard shift where it has none."""
    config = model.config
    own = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if callable(own):

        def shift(labels: Tensor) -> Tensor:
            return own(labels=torch.where(labels == ignore_index, _HF_IGNORE, labels))

        return shift
    start, pad = getattr(config, "decoder_start_token_id", None), getattr(config, "pad_token_id", None)
    if not isinstance(start, int) or not isinstance(pad, int):
        raise ValueError(
            f"{type(model).__name__} has no prepare_decoder_input_ids_from_labels, and its config has "
            f"decoder_start_token_id={start!r}, pad_token_id={pad!r}: fisherfunc.hf cannot make its decoder inputs; "
            "put decoder_input_ids in the batch and in inputs="
        )

    def standard(labels: Tensor) -> Tensor:
        # [start, y_0, ..., y_{T−2}], ignored labels → pad
        shifted = torch.cat([torch.full_like(labels[..., :1], start), labels[..., :-1]], dim=-1)
        return torch.where(shifted == ignore_index, torch.full_like(shifted, pad), shifted)

    return standard


def seq2seq_lm(
    model: nn.Module,
    *,
    inputs: Sequence[str] = ("input_ids", "attention_mask"),
    labels: str = "labels",
    ignore_index: int = -100,
    dropout: DropoutMode = "eval",
) -> HFLoss:
    """Cross-entropy of an encoder–decoder's labels, summed over the labelled decoder tokens.

    See the module docstring for the encoder and decoder inputs. ``n_b`` counts the labelled
    decoder tokens (``labels ≠ ignore_index``, and real in ``decoder_attention_mask`` if given).

    Args:
        model: a ``*ForConditionalGeneration`` (or ``MarianMTModel``) with ``sdpa`` or ``eager``
            attention, possibly wrapped (PEFT, ``torch.compile``, ``DataParallel``).
        inputs: batch keys passed to the model by the same name: the encoder's (``input_ids`` or
            ``input_features``, optional ``attention_mask``), and optionally ``decoder_input_ids``
            and ``decoder_attention_mask``.
        labels: batch key of the decoder's labels ``[B, T]``.
        ignore_index: label value that does not count.
        dropout: ``"eval"`` (dropout off, the model unmodified) or ``"train"``.

    Returns:
        A loss ``(params, sample) -> (loss_sum, num_tokens)``.

    Raises:
        ValueError: for a model that is not an encoder–decoder, ``labels`` among ``inputs``, or a
            model whose decoder inputs cannot be made from the labels.
    """
    check_dropout(dropout)
    inputs = tuple(inputs)
    view = loss_view(model)
    inner = view.inner
    found = implementation(inner)
    if not getattr(inner.config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(inner).__name__} is not an encoder-decoder model (config.is_encoder_decoder is False); use "
            "fisherfunc.hf.causal_lm, masked_lm, token_classification or sequence_classification"
        )
    if labels in inputs:
        raise ValueError(f"'{labels}' are the loss's targets, not a model input: remove it from inputs")
    mask = "attention_mask" if "attention_mask" in inputs else None
    decoder_mask = "decoder_attention_mask" if "decoder_attention_mask" in inputs else None
    given = "decoder_input_ids" in inputs
    keys = {key: key for key in inputs}
    if not given:
        keys["labels"] = labels  # read by the prepare step, which makes the decoder inputs from it
    prepare = Seq2SeqInputs(
        implementation=found,
        mask=mask,
        decoder_mask=decoder_mask,
        labels=None if given else "labels",
        shift=None if given else _shift(inner, ignore_index),
        no_cache="use_cache" in inspect.signature(inner.forward).parameters,
    )
    encoder = [key for key in inputs if key not in ("decoder_input_ids", "decoder_attention_mask")]
    groups: list[tuple[str, tuple[str, ...]]] = []
    if mask is not None:
        groups.append((mask, tuple(encoder)))
    if decoder_mask is not None:
        groups.append((decoder_mask, (labels, "decoder_input_ids")))
    align = tuple(groups)

    def nll(logits: Tensor, y: Tensor, m: Tensor | None) -> tuple[Tensor, Tensor]:
        # L = Σ_t d_t [y_t ≠ ignore] · (−log softmax(z_t)[y_t])
        valid = y != ignore_index if m is None else (y != ignore_index) & (m != 0)
        safe = torch.where(valid, y, torch.zeros_like(y))
        per_token = torch.nn.functional.cross_entropy(logits, safe, reduction="none")
        weights = valid.to(per_token.dtype)
        return (per_token * weights).sum(), weights.sum()

    def count(batch: Any) -> Tensor:
        batch = align_entries(batch, align)
        y = entry(batch, labels, "target")
        valid = y != ignore_index
        if decoder_mask is not None:
            valid = valid & (entry(batch, decoder_mask, "mask") != 0)
        return valid.sum(1)

    loss = HFLoss(
        model=view.call,
        inputs=keys,
        targets=labels,
        nll=nll,
        distribution="categorical",
        mask=decoder_mask,
        count=count,
        dropout=dropout,
        prepare=prepare,
        ignore_index=ignore_index,
        align=align,
    )
    _probe(loss, view.call, inner, set(inputs))
    return loss


def _probe(loss: HFLoss, call: nn.Module, inner: nn.Module, inputs: set[str]) -> None:
    """The live padding check of a seq2seq loss (skipped for inputs a probe of ids cannot make)."""
    if not inputs <= {"input_ids", "attention_mask"}:
        return
    config, device = inner.config, next(inner.parameters()).device
    n, t = PROBE_LENGTH, PROBE_LENGTH - 1
    ids = torch.tensor(probe_ids(config, n), device=device)
    target = torch.tensor(probe_ids(config, t, offset=n), device=device)
    pad = getattr(config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else 0
    fill, ones = torch.full((2,), pad, device=device), torch.ones(n, dtype=torch.long, device=device)
    zeros = torch.zeros(2, dtype=torch.long, device=device)
    padded = [torch.cat([ids, fill]), torch.cat([fill, ids])]
    masks = [torch.cat([ones, zeros]), torch.cat([zeros, ones])]
    y = torch.cat([target, torch.tensor([loss.ignore_index], device=device)])  # one padded label on the right
    batch = {"input_ids": torch.stack(padded), "labels": torch.stack([y, y])}
    if "attention_mask" in inputs:
        batch["attention_mask"] = torch.stack(masks)
    else:
        batch = {k: v[:1] for k, v in batch.items()}  # no mask: the unpadded probe only
        batch["input_ids"] = ids[None]
    params = dict(call.named_parameters())
    check_padding(
        type(inner).__name__,
        dataclasses.replace(loss, dropout="eval").forward,
        params,
        batch,
        lambda: call(input_ids=ids[None], attention_mask=ones[None], labels=target[None]).logits[0],
        t,
        "same" if loss.dropout == "train" else "error",
        "its encoder got a key mask, its decoder inputs were made from the labels",
    )
