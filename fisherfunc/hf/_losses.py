"""Per-sample losses for Hugging Face models: causal LM, masked LM, sequence classification.

Batches are dicts of ``[B, T]`` tensors with ``transformers``' names (``dict(tokenizer(...))`` plus
``labels``). Each builder returns a :class:`~fisherfunc.losses.ModelLoss` whose ``prepare`` step
turns one sample's 2-D ``attention_mask`` into the 4-D mask the model would have built
(:mod:`~fisherfunc.hf._masks`) and adds ``position_ids`` counted over the real tokens, so that

    L_b is the same whatever the padding side (left, right, none),

and per-sample gradients can be taken under ``torch.func.vmap``. The model never sees the
``labels``; the loss is computed here, summed over a sample's tokens:

| builder                     | ``L_b``                                         | ``n_b``              |
|-----------------------------|-------------------------------------------------|----------------------|
| ``causal_lm``               | ``Σ_t v_t · (−log p(y_t | x_<t))``              | ``Σ_t v_t``          |
| ``masked_lm``               | ``Σ_t m_t [y_t ≠ ignore] · (−log p(y_t | x))``  | labelled real tokens |
| ``sequence_classification`` | ``−log p(y | x)``                               | 1                    |

with ``v_t = m_{t−1} · m_t · [y_t ≠ ignore]`` (``m``: the padding mask, ``y``: the labels).

For the causal LM a target counts only when the token predicting it is real too (``m_{t−1} = 1``):
with left padding the first real token would otherwise be "predicted" from padding, a term that
depends on the padding and that no unpadded sequence has. With right padding ``v_t = m_t``.

Dropout is off by default (``dropout="eval"``), whatever mode the model is in; see
:mod:`fisherfunc.dropout`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._engine.batches import entry
from ..dropout import DropoutMode, check_dropout
from ..losses import ModelLoss
from ._masks import AttentionLayout, attention_layout, attention_mask, position_ids

__all__ = ["HFInputs", "causal_lm", "masked_lm", "sequence_classification"]

_INPUTS = ("input_ids", "attention_mask")


@dataclasses.dataclass(frozen=True)
class HFInputs:
    """The ``prepare`` step of a Hugging Face loss: one sample's keyword inputs for the model.

    Attributes:
        layout: the model's attention layout.
        mask: keyword of the 2-D padding mask among the inputs (``None``: no padding).
        positions: whether to add ``position_ids`` counted over real tokens.
        no_cache: whether to pass ``use_cache=False`` (nothing is generated).
    """

    layout: AttentionLayout
    mask: str | None
    positions: bool
    no_cache: bool

    def __call__(self, kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """``{input_ids [1, T], attention_mask [1, T], ...}`` → the model's keyword arguments."""
        out = dict(kwargs)
        ids = kwargs["input_ids"]
        padding = kwargs[self.mask] if self.mask is not None else torch.ones_like(ids)
        out["attention_mask"] = attention_mask(padding, self.layout, dtype)
        if self.positions:
            out["position_ids"] = position_ids(padding)
        if self.no_cache:
            out["use_cache"] = False
        return out


def _accepts(model: nn.Module, name: str) -> bool:
    parameters = inspect.signature(model.forward).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _base(
    model: nn.Module, inputs: Sequence[str], causal: bool | None, dropout: DropoutMode
) -> tuple[dict[str, str], str | None, HFInputs]:
    """Checked inputs ``{keyword: batch key}``, the padding mask's key and the ``prepare`` step."""
    check_dropout(dropout)
    inputs = tuple(inputs)
    if "input_ids" not in inputs:
        raise ValueError(f"inputs must include 'input_ids' (got {list(inputs)}); inputs_embeds is not supported")
    if "labels" in inputs:
        raise ValueError("'labels' are the loss's targets, not a model input: remove it from inputs")
    layout = attention_layout(model, causal=causal)
    mask = "attention_mask" if "attention_mask" in inputs else None
    params = inspect.signature(model.forward).parameters
    prepare = HFInputs(
        layout=layout,
        mask=mask,
        positions="position_ids" not in inputs and "position_ids" in params,
        no_cache="use_cache" in params,
    )
    if not _accepts(model, "attention_mask"):
        raise ValueError(f"{type(model).__name__}.forward takes no attention_mask; fisherfunc.hf cannot mask it")
    return {key: key for key in inputs}, mask, prepare


def _pairs(mask: Tensor) -> Tensor:
    """``v_t = m_{t−1} · m_t`` (and ``v_0 = m_0``): a target counts if its predictor is real too."""
    return torch.cat([mask[..., :1], mask[..., 1:] * mask[..., :-1]], dim=-1)


def _valid(targets: Tensor, mask: Tensor | None, ignore_index: int) -> Tensor:
    valid = targets != ignore_index
    return valid if mask is None else valid & (mask != 0)


def _token_sum(logits: Tensor, targets: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """``Σ_t valid_t · (−log softmax(z_t)[y_t])`` and ``Σ_t valid_t`` for one sample."""
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), safe.reshape(-1), reduction="none")
    weights = valid.reshape(-1).to(per_token.dtype)
    return (per_token * weights).sum(), weights.sum()


def causal_lm(
    model: nn.Module,
    *,
    inputs: Sequence[str] = _INPUTS,
    labels: str | None = None,
    ignore_index: int = -100,
    causal: bool | None = None,
    dropout: DropoutMode = "eval",
) -> ModelLoss:
    """Next-token cross-entropy of a Hugging Face causal LM (GPT-2, Llama, Mistral, Qwen...).

    Position ``t − 1`` predicts token ``t``; the target counts when both positions are real tokens
    and the label is not ``ignore_index`` (see the module docstring).

    Args:
        model: a ``*ForCausalLM`` / ``*LMHeadModel`` with ``sdpa`` or ``eager`` attention.
        inputs: batch keys passed to the model by the same name; must include ``input_ids``
            (``attention_mask``, ``token_type_ids``, ``position_ids`` optional).
        labels: batch key of unshifted labels (may hold ``ignore_index``); ``None``: the input ids.
        ignore_index: label value that does not count.
        causal: override the attention layout's causality (``None``: from the model).
        dropout: ``"eval"`` (dropout off, the model unmodified) or ``"train"``.

    Returns:
        A loss ``(params, sample) -> (loss_sum, num_tokens)``.
    """
    keys, mask, prepare = _base(model, inputs, causal, dropout)
    targets = labels if labels is not None else "input_ids"

    def nll(logits: Tensor, y: Tensor, m: Tensor | None) -> tuple[Tensor, Tensor]:
        # L = Σ_t v_t · (−log softmax(z_{t−1})[y_t]),  v_t = m_{t−1} m_t [y_t ≠ ignore]
        valid = _valid(y[1:], None if m is None else _pairs(m)[1:], ignore_index)
        return _token_sum(logits[:-1], y[1:], valid)

    def count(batch: Any) -> Tensor:
        y = entry(batch, targets, "target")
        m = None if mask is None else _pairs(entry(batch, mask, "mask"))[:, 1:]
        return _valid(y[:, 1:], m, ignore_index).sum(1)

    return ModelLoss(
        model=model,
        inputs=keys,
        targets=targets,
        nll=nll,
        distribution="categorical",
        mask=mask,
        count=count,
        dropout=dropout,
        prepare=prepare,
        ignore_index=ignore_index,
        shift=1,
    )


def masked_lm(
    model: nn.Module,
    *,
    inputs: Sequence[str] = _INPUTS,
    labels: str = "labels",
    ignore_index: int = -100,
    dropout: DropoutMode = "eval",
) -> ModelLoss:
    """Masked-token cross-entropy of a Hugging Face masked LM (BERT, RoBERTa, MiniLM...).

    ``labels`` holds the original id at the positions to predict and ``ignore_index`` elsewhere
    (as ``DataCollatorForLanguageModeling`` makes them); ``n_b`` counts the labelled real tokens.

    Args:
        model: a ``*ForMaskedLM`` with ``sdpa`` or ``eager`` attention.
        inputs: batch keys passed to the model by the same name; must include ``input_ids``.
        labels: batch key of the labels ``[B, T]``.
        ignore_index: label value that does not count.
        dropout: ``"eval"`` (dropout off, the model unmodified) or ``"train"``.
    """
    keys, mask, prepare = _base(model, inputs, None, dropout)

    def nll(logits: Tensor, y: Tensor, m: Tensor | None) -> tuple[Tensor, Tensor]:
        # L = Σ_t m_t [y_t ≠ ignore] · (−log softmax(z_t)[y_t])
        return _token_sum(logits, y, _valid(y, m, ignore_index))

    def count(batch: Any) -> Tensor:
        m = None if mask is None else entry(batch, mask, "mask")
        return _valid(entry(batch, labels, "target"), m, ignore_index).sum(1)

    return ModelLoss(
        model=model,
        inputs=keys,
        targets=labels,
        nll=nll,
        distribution="categorical",
        mask=mask,
        count=count,
        dropout=dropout,
        prepare=prepare,
        ignore_index=ignore_index,
    )


def sequence_classification(
    model: nn.Module,
    *,
    inputs: Sequence[str] = _INPUTS,
    labels: str = "labels",
    causal: bool | None = None,
    dropout: DropoutMode = "eval",
) -> ModelLoss:
    """Cross-entropy of a Hugging Face sequence classifier, one label per sequence: ``−log p(y | x)``.

    The model pools as it always does (BERT: the first token; GPT-2/Llama: the last token that is
    not ``config.pad_token_id``, which must then be set).

    Args:
        model: a ``*ForSequenceClassification`` with ``config.num_labels ≥ 2``.
        inputs: batch keys passed to the model by the same name; must include ``input_ids``.
        labels: batch key of the class indices ``[B]``.
        causal: override the attention layout's causality (``None``: from the model).
        dropout: ``"eval"`` (dropout off, the model unmodified) or ``"train"``.
    """
    problem = getattr(model.config, "problem_type", None)
    if problem not in (None, "single_label_classification") or getattr(model.config, "num_labels", 2) < 2:
        raise ValueError(
            f"sequence_classification is the categorical loss of single-label classification; {type(model).__name__} "
            f"has problem_type={problem!r}, num_labels={getattr(model.config, 'num_labels', None)}; only "
            "single-label classification with num_labels >= 2 is supported"
        )
    keys, mask, prepare = _base(model, inputs, causal, dropout)

    def nll(logits: Tensor, y: Tensor, m: Tensor | None) -> tuple[Tensor, Tensor]:
        # L = −log softmax(z)[y], n = 1
        return F.cross_entropy(logits, y, reduction="sum"), torch.ones((), dtype=logits.dtype)

    return ModelLoss(
        model=model,
        inputs=keys,
        targets=labels,
        nll=nll,
        distribution="categorical",
        count=lambda batch: torch.ones(entry(batch, labels, "target").shape[0]),
        dropout=dropout,
        prepare=prepare,
    )
