"""Per-sample losses for Hugging Face models: causal LM, masked LM, sequence and token classification.

Batches are dicts of ``[B, T]`` tensors with ``transformers``' names (``dict(tokenizer(...))`` plus
``labels``). Each builder returns an :class:`HFLoss` (a :class:`~fisherfunc.losses.ModelLoss`) that,
inside the per-sample function,

1. front-aligns the sample (:mod:`~fisherfunc.hf._align`): ids, mask, token types and labels are
   permuted so the real tokens come first, in order;
2. passes the model what its family needs besides the ids (:mod:`~fisherfunc.hf._conventions`):
   ``position_ids`` for the families that count them from the 2-D mask, and the least mask that
   gives the unpadded sample's outputs at every real position (:mod:`~fisherfunc.hf._masks`):

   | attention                       | mask passed                                  | memory            |
   |---------------------------------|----------------------------------------------|-------------------|
   | causal                          | none: the model builds its own causal mask   | none (``sdpa``)   |
   | causal, if the model cannot run | one additive causal ``[1, 1, T, T]``, shared | ``T²`` per chunk  |
   | without a mask under ``vmap``   | by the chunk's samples and the layers        |                   |
   | both ways                       | the keys' ``[1, 1, 1, T]``                   | ``T`` per sample  |
   | both ways, mixed sliding layers | the full ``[1, 1, T, T]``                    | ``T²`` per sample |

   After alignment the padding follows the real tokens, so causal attention never lets a real
   query see it, and a bidirectional query needs only the keys masked (a padding query's output
   reaches neither a real token nor the loss). Without a mask ``sdpa`` runs causally with no
   ``[T, T]`` tensor at all, and grouped-query attention without copies of the keys and values;
   a model that reads its ids when given no mask (GPT-2 warns about padding by looking at them,
   which ``vmap`` refuses) gets :func:`~fisherfunc.hf._masks.causal_mask` instead: the live check
   at build time decides. A boolean ``[T, T]`` mask per sample, which ``sdpa`` turns into a float
   copy in every layer, each kept for the backward, cost ``layers × T²`` floats per sample (64 MiB
   for 4 layers at ``T = 2048``),

so that ``L_b`` is the unpadded sample's whatever the padding side (left, right, none), and per-sample
gradients can be taken under ``torch.func.vmap``. Causality is read from the config, never asked
for: ``causal=`` only overrides it. When a loss is built, a few probe forwards check the causality
and the padding on the live model (:mod:`~fisherfunc.hf._checks`). The model never sees the
``labels``; the loss is computed here, summed over a sample's tokens:

| builder                     | ``L_b``                                         | ``n_b``              |
|-----------------------------|-------------------------------------------------|----------------------|
| ``causal_lm``               | ``Σ_t v_t · (−log p(y_t | x_<t))``              | ``Σ_t v_t``          |
| ``masked_lm``               | ``Σ_t m_t [y_t ≠ ignore] · (−log p(y_t | x))``  | labelled real tokens |
| ``token_classification``    | ``Σ_t m_t [y_t ≠ ignore] · (−log p(y_t | x))``  | labelled real tokens |
| ``sequence_classification`` | ``−log p(y | x)``                               | 1                    |

with ``v_t = m_{t−1} · m_t · [y_t ≠ ignore]`` (``m``: the aligned padding mask, ``y``: the labels)
— for the aligned sample, pairs of consecutive real tokens. Encoder–decoders take
:func:`~fisherfunc.hf.seq2seq_lm`.

Models wrapped by PEFT, ``torch.compile`` or ``DataParallel`` are seen through
(:mod:`~fisherfunc.hf._view`): pass the wrapper and its own ``named_parameters()``.

Dropout is off by default (``dropout="eval"``), whatever mode the model is in; see
:mod:`fisherfunc.dropout`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._engine.batches import entry
from .._engine.experts import dense_experts
from ..dropout import DropoutMode, check_dropout
from ..losses import ModelLoss
from ._align import align_entries
from ._checks import PROBE_LENGTH, ProbeError, check_padding, observed_causality, probe_ids
from ._conventions import causality, feeding
from ._masks import AttentionLayout, attention_layout, attention_mask, causal_mask, key_mask, position_ids
from ._view import LossView, loss_view

__all__ = ["HFLoss", "HFInputs", "causal_lm", "masked_lm", "token_classification", "sequence_classification"]

Key = Hashable
AlignGroups = tuple[tuple[Key, tuple[Key, ...]], ...]

_INPUTS = ("input_ids", "attention_mask")


@dataclasses.dataclass(frozen=True)
class HFInputs:
    """The ``prepare`` step of a Hugging Face loss: one aligned sample's keyword inputs for the model.

    Attributes:
        layout: the model's attention layout.
        mask: keyword of the 2-D padding mask among the inputs (``None``: no padding).
        positions: whether to add ``position_ids = cumsum(m) − 1`` (families that count positions
            from the 2-D mask; see :mod:`~fisherfunc.hf._conventions`).
        no_cache: whether to pass ``use_cache=False`` (nothing is generated).
        pass_mask: whether to pass the 4-D mask; ``False`` for the ALiBi families (causal), which
            then build their own causal mask and never see the padding after the real tokens.
        form: which mask: ``"none"`` (causal attention: the model's own), ``"causal"`` (one
            additive mask shared by every sample, see :func:`~fisherfunc.hf._masks.causal_mask`),
            ``"keys"`` (the keys' ``[1, 1, 1, T]``, bidirectional attention) or ``"full"``
            (``[1, 1, T, T]`` per sample).
    """

    layout: AttentionLayout
    mask: str | None
    positions: bool
    no_cache: bool
    pass_mask: bool = True
    form: Literal["none", "causal", "keys", "full"] = "full"

    def __call__(self, kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """``{input_ids [1, T], attention_mask [1, T], ...}`` → the model's keyword arguments."""
        out = dict(kwargs)
        ids = kwargs["input_ids"]
        padding = kwargs[self.mask] if self.mask is not None else torch.ones_like(ids)
        if not self.pass_mask or self.form == "none":
            out.pop("attention_mask", None)
        elif self.form == "causal":
            out["attention_mask"] = causal_mask(ids.shape[-1], self.layout, dtype, ids.device)
        elif self.form == "keys":
            out["attention_mask"] = key_mask(padding, self.layout.implementation, dtype)
        else:
            out["attention_mask"] = attention_mask(padding, self.layout, dtype)
        if self.positions:
            out["position_ids"] = position_ids(padding)
        if self.no_cache:
            out["use_cache"] = False
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class HFLoss(ModelLoss):
    """A :class:`~fisherfunc.losses.ModelLoss` whose samples are front-aligned before anything reads them.

    The model's inputs, the targets and the mask are read from the aligned sample
    (:func:`~fisherfunc.hf._align.align_entries`; token-level entries ``[T]``, or ``[B, T]`` for a
    batch, permuted along ``T``), so the loss, the token count, the label sets of the ``mc``/``exact``
    kinds and K-FAC's position masks all see the same order as the model.

    Attributes:
        align: ``(mask entry, entries aligned by it)`` pairs.
    """

    align: AlignGroups = ()

    def aligned(self, sample: Any) -> Any:
        """``sample`` (or a batch) with its token-level entries aligned."""
        return align_entries(sample, self.align)

    def forward(self, params: Mapping[str, Tensor], sample: Any) -> Tensor:
        """The model's prediction for one aligned sample (batch dimension removed)."""
        return super().forward(params, self.aligned(sample))

    def targets_of(self, sample: Any) -> Tensor | None:
        """The aligned targets of one sample (or a batch)."""
        return super().targets_of(self.aligned(sample))

    def mask_of(self, sample: Any) -> Tensor | None:
        """The aligned padding mask of one sample (or a batch)."""
        return super().mask_of(self.aligned(sample))


def _accepts(model: nn.Module, name: str) -> bool:
    parameters = inspect.signature(model.forward).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What every builder reads off the model before building its loss."""

    view: LossView
    keys: dict[str, str]
    mask: str | None
    prepare: HFInputs


def _mask_form(layout: AttentionLayout) -> Literal["none", "keys", "full"]:
    """The least mask that gives a front-aligned sample's outputs at its real positions (before the live check)."""
    if layout.causal:
        return "none"
    return "full" if layout.mixed else "keys"


def _setup(
    model: nn.Module, inputs: Sequence[str], causal: bool | None, dropout: DropoutMode, source: str | None = None
) -> _Setup:
    """Checked inputs, the model seen through wrappers, its layout and the ``prepare`` step.

    ``source`` replaces the layout's account of its causality (for a ``causal`` the builder decided).
    """
    check_dropout(dropout)
    inputs = tuple(inputs)
    if "input_ids" not in inputs:
        raise ValueError(f"inputs must include 'input_ids' (got {list(inputs)}); inputs_embeds is not supported")
    if "labels" in inputs:
        raise ValueError("'labels' are the loss's targets, not a model input: remove it from inputs")
    view = loss_view(model)
    inner = view.inner
    layout = attention_layout(inner, causal=causal)
    if source is not None:
        layout = dataclasses.replace(layout, source=source)
    rule = feeding(inner)
    if rule.mask == "none" and not layout.causal:
        raise ValueError(
            f"{type(inner).__name__} adds ALiBi biases built from the 2-D attention mask, which fisherfunc.hf can "
            "only leave out for causal attention (the padding after the real tokens is then never seen); it "
            f"cannot run it with causal=False ({layout.source})"
        )
    if not _accepts(inner, "attention_mask"):
        raise ValueError(f"{type(inner).__name__}.forward takes no attention_mask; fisherfunc.hf cannot mask it")
    mask = "attention_mask" if "attention_mask" in inputs else None
    params = inspect.signature(inner.forward).parameters
    prepare = HFInputs(
        layout=layout,
        mask=mask,
        positions=rule.positions == "counted" and "position_ids" not in inputs and _accepts(inner, "position_ids"),
        no_cache="use_cache" in params,
        pass_mask=rule.mask == "4d",
        form=_mask_form(layout),
    )
    return _Setup(view=view, keys={key: key for key in inputs}, mask=mask, prepare=prepare)


def _pad_id(config: Any) -> int:
    """The config's padding id (0 where it has none: a probe's padding is masked anyway)."""
    pad = getattr(config, "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


def _groups(mask: str | None, keys: Sequence[Key]) -> AlignGroups:
    return () if mask is None else ((mask, tuple(keys)),)


def _probed(loss: HFLoss, setup: _Setup, *, tokens: bool) -> HFLoss:
    """``loss`` after the live padding check; a causal model checked without a mask first.

    A causal model runs without a mask where the check passes so (under ``vmap``, equal to the
    unpadded sample); otherwise, or where no check can run, with the shared causal mask.
    """
    if setup.prepare.form == "none":
        try:
            if _probe(loss, setup, tokens=tokens):
                return loss
        except ProbeError:
            pass
        prepare = dataclasses.replace(setup.prepare, form="causal")
        loss, setup = dataclasses.replace(loss, prepare=prepare), dataclasses.replace(setup, prepare=prepare)
    _probe(loss, setup, tokens=tokens)
    return loss


def _probe(loss: HFLoss, setup: _Setup, *, tokens: bool) -> bool:
    """The live padding check (:func:`~fisherfunc.hf._checks.check_padding`) of a freshly built loss.

    Returns:
        Whether it ran (it needs a batch made of ids only).
    """
    inner = setup.view.inner
    known = {"input_ids", "attention_mask", "token_type_ids", "position_ids"}
    if not set(setup.keys) <= known:
        return False  # a probe is made of ids only
    config = inner.config
    device = next(inner.parameters()).device
    ids = torch.tensor(probe_ids(config, PROBE_LENGTH), device=device)
    pad = _pad_id(config)
    n, extra = PROBE_LENGTH, 2 if setup.mask is not None else 0
    fill = torch.full((extra,), pad, device=device)
    ones, zeros = torch.ones(n, dtype=torch.long, device=device), torch.zeros(extra, dtype=torch.long, device=device)
    rows = [(torch.cat([ids, fill]), torch.cat([ones, zeros]))]  # padded on the right
    if extra:
        rows.append((torch.cat([fill, ids]), torch.cat([zeros, ones])))  # and on the left
    padded_ids, masks = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    batch: dict[str, Tensor] = {"input_ids": padded_ids}
    reference: dict[str, Tensor] = {"input_ids": ids[None], "attention_mask": ones[None]}
    if setup.mask is not None:
        batch[setup.mask] = masks
    if "token_type_ids" in setup.keys:
        batch["token_type_ids"], reference["token_type_ids"] = torch.zeros_like(padded_ids), torch.zeros_like(ids)[None]
    if "position_ids" in setup.keys:
        batch["position_ids"], reference["position_ids"] = position_ids(masks), torch.arange(n, device=device)[None]
    call, eval_loss = setup.view.call, dataclasses.replace(loss, dropout="eval")
    params = dict(call.named_parameters())
    layout = setup.prepare.layout
    masked = setup.prepare.pass_mask and setup.prepare.form != "none"
    hint = (
        f"it was fed as {'causal' if layout.causal else 'bidirectional'} ({layout.source}), "
        f"{f'with a 4-D mask ({setup.prepare.form})' if masked else 'without a mask'}"
        f"{', position_ids counted over its real tokens' if setup.prepare.positions else ', no position_ids'}"
    )
    check_padding(
        type(inner).__name__,
        eval_loss.forward,
        params,
        batch,
        lambda: _dense_call(call, reference),
        n if tokens else None,
        "same" if loss.dropout == "train" else "error",
        hint,
    )
    return True


def _dense_call(call: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """``call(**inputs).logits[0]`` with fused experts in their dense form, as the loss's forward runs them."""
    with dense_experts(call):
        return call(**inputs).logits[0]


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
) -> HFLoss:
    """Next-token cross-entropy of a Hugging Face causal LM (GPT-2, Llama, Pythia, OPT, Falcon, BLOOM...).

    Position ``t − 1`` predicts token ``t``; the target counts when both positions are real tokens
    and the label is not ``ignore_index`` (see the module docstring).

    Args:
        model: a ``*ForCausalLM`` / ``*LMHeadModel`` with ``sdpa`` or ``eager`` attention, possibly
            wrapped (PEFT, ``torch.compile``, ``DataParallel``).
        inputs: batch keys passed to the model by the same name; must include ``input_ids``
            (``attention_mask``, ``token_type_ids``, ``position_ids`` optional).
        labels: batch key of unshifted labels (may hold ``ignore_index``); ``None``: the input ids.
        ignore_index: label value that does not count.
        causal: override the causality read from the config (``None``: read and checked live).
        dropout: ``"eval"`` (dropout off, the model unmodified) or ``"train"``.

    Returns:
        A loss ``(params, sample) -> (loss_sum, num_tokens)``.
    """
    setup = _setup(model, inputs, causal, dropout)
    mask, targets = setup.mask, labels if labels is not None else "input_ids"
    groups = _groups(mask, [*setup.keys, targets])

    def nll(logits: Tensor, y: Tensor, m: Tensor | None) -> tuple[Tensor, Tensor]:
        # L = Σ_t v_t · (−log softmax(z_{t−1})[y_t]),  v_t = m_{t−1} m_t [y_t ≠ ignore]
        valid = _valid(y[1:], None if m is None else _pairs(m)[1:], ignore_index)
        return _token_sum(logits[:-1], y[1:], valid)

    def count(batch: Any) -> Tensor:
        batch = align_entries(batch, groups)
        y = entry(batch, targets, "target")
        m = None if mask is None else _pairs(entry(batch, mask, "mask"))[:, 1:]
        return _valid(y[:, 1:], m, ignore_index).sum(1)

    loss = HFLoss(
        model=setup.view.call,
        inputs=setup.keys,
        targets=targets,
        nll=nll,
        distribution="categorical",
        mask=mask,
        count=count,
        dropout=dropout,
        prepare=setup.prepare,
        ignore_index=ignore_index,
        shift=1,
        align=groups,
    )
    return _probed(loss, setup, tokens=True)


def _token_loss(setup: _Setup, labels: str, ignore_index: int, dropout: DropoutMode) -> HFLoss:
    """``Σ_t m_t [y_t ≠ ignore] · (−log softmax(z_t)[y_t])``, ``n_b`` the labelled real tokens."""
    mask = setup.mask
    groups = _groups(mask, [*setup.keys, labels])

    def nll(logits: Tensor, y: Tensor, m: Tensor | None) -> tuple[Tensor, Tensor]:
        # L = Σ_t m_t [y_t ≠ ignore] · (−log softmax(z_t)[y_t])
        return _token_sum(logits, y, _valid(y, m, ignore_index))

    def count(batch: Any) -> Tensor:
        m = None if mask is None else entry(batch, mask, "mask")
        return _valid(entry(batch, labels, "target"), m, ignore_index).sum(1)

    loss = HFLoss(
        model=setup.view.call,
        inputs=setup.keys,
        targets=labels,
        nll=nll,
        distribution="categorical",
        mask=mask,
        count=count,
        dropout=dropout,
        prepare=setup.prepare,
        ignore_index=ignore_index,
        align=groups,
    )
    return _probed(loss, setup, tokens=True)


def masked_lm(
    model: nn.Module,
    *,
    inputs: Sequence[str] = _INPUTS,
    labels: str = "labels",
    ignore_index: int = -100,
    dropout: DropoutMode = "eval",
) -> HFLoss:
    """Masked-token cross-entropy of a Hugging Face masked LM (BERT, RoBERTa, XLM-R, DistilBERT...).

    ``labels`` holds the original id at the positions to predict and ``ignore_index`` elsewhere
    (as ``DataCollatorForLanguageModeling`` makes them); ``n_b`` counts the labelled real tokens.
    A masked LM attends both ways; that is checked (config and live model), never asked for.

    Args:
        model: a ``*ForMaskedLM`` with ``sdpa`` or ``eager`` attention, possibly wrapped.
        inputs: batch keys passed to the model by the same name; must include ``input_ids``.
        labels: batch key of the labels ``[B, T]``.
        ignore_index: label value that does not count.
        dropout: ``"eval"`` (dropout off, the model unmodified) or ``"train"``.

    Raises:
        ValueError: for a model that attends causally (a decoder: use :func:`causal_lm`).
    """
    inner = loss_view(model).inner
    decided = causality(inner)
    if decided.causal:
        raise ValueError(
            f"{type(inner).__name__} attends causally ({decided.source}): it is a decoder, not a masked LM; use "
            "fisherfunc.hf.causal_lm"
        )
    setup = _setup(model, inputs, False, dropout, f"{decided.source}; a masked LM: confirmed on the live model")
    if observed_causality(inner):
        raise ProbeError(
            f"{type(inner).__name__}'s output at the first position does not change when the later tokens change: "
            f"it attends causally, so it is not a masked LM ({decided.source}); use fisherfunc.hf.causal_lm"
        )
    return _token_loss(setup, labels, ignore_index, dropout)


def token_classification(
    model: nn.Module,
    *,
    inputs: Sequence[str] = _INPUTS,
    labels: str = "labels",
    ignore_index: int = -100,
    causal: bool | None = None,
    dropout: DropoutMode = "eval",
) -> HFLoss:
    """Cross-entropy of a Hugging Face token classifier, one label per token (NER, POS tagging...).

    ``L_b = Σ_t m_t [y_t ≠ ignore] · (−log p(y_t | x))``, ``n_b`` the labelled real tokens (labels as
    ``DataCollatorForTokenClassification`` makes them: ``ignore_index`` on padding and sub-words).

    Args:
        model: a ``*ForTokenClassification`` with ``sdpa`` or ``eager`` attention, possibly wrapped.
        inputs: batch keys passed to the model by the same name; must include ``input_ids``.
        labels: batch key of the labels ``[B, T]``.
        ignore_index: label value that does not count.
        causal: override the causality read from the config (``None``: read and checked live).
        dropout: ``"eval"`` (dropout off, the model unmodified) or ``"train"``.
    """
    return _token_loss(_setup(model, inputs, causal, dropout), labels, ignore_index, dropout)


def sequence_classification(
    model: nn.Module,
    *,
    inputs: Sequence[str] = _INPUTS,
    labels: str = "labels",
    causal: bool | None = None,
    dropout: DropoutMode = "eval",
) -> HFLoss:
    """Cross-entropy of a Hugging Face sequence classifier, one label per sequence: ``−log p(y | x)``.

    The model pools as it always does (BERT, RoBERTa: the first token, which front alignment makes
    the first real token; GPT-2, Llama: the last token that is not ``config.pad_token_id``, which
    must then be set when batches are padded).

    Args:
        model: a ``*ForSequenceClassification`` with ``config.num_labels ≥ 2``, possibly wrapped.
        inputs: batch keys passed to the model by the same name; must include ``input_ids``.
        labels: batch key of the class indices ``[B]``.
        causal: override the causality read from the config (``None``: read and checked live).
        dropout: ``"eval"`` (dropout off, the model unmodified) or ``"train"``.
    """
    inner = loss_view(model).inner
    problem = getattr(inner.config, "problem_type", None)
    if problem not in (None, "single_label_classification") or getattr(inner.config, "num_labels", 2) < 2:
        raise ValueError(
            f"sequence_classification is the categorical loss of single-label classification; {type(inner).__name__} "
            f"has problem_type={problem!r}, num_labels={getattr(inner.config, 'num_labels', None)}; only "
            "single-label classification with num_labels >= 2 is supported"
        )
    setup = _setup(model, inputs, causal, dropout)
    if setup.prepare.layout.causal and setup.mask is not None and getattr(inner.config, "pad_token_id", None) is None:
        raise ValueError(
            f"{type(inner).__name__} pools the last token that is not config.pad_token_id, which is None: set "
            "model.config.pad_token_id to the id the batch is padded with"
        )

    def nll(logits: Tensor, y: Tensor, m: Tensor | None) -> tuple[Tensor, Tensor]:
        # L = −log softmax(z)[y], n = 1
        return F.cross_entropy(logits, y, reduction="sum"), torch.ones((), dtype=logits.dtype)

    loss = HFLoss(
        model=setup.view.call,
        inputs=setup.keys,
        targets=labels,
        nll=nll,
        distribution="categorical",
        count=lambda batch: torch.ones(entry(batch, labels, "target").shape[0]),
        dropout=dropout,
        prepare=setup.prepare,
        align=_groups(setup.mask, list(setup.keys)),
    )
    return _probed(loss, setup, tokens=False)
