"""Per-sample losses: ``(params, sample) -> (loss_sum, num_tokens)``.

``sample`` is one example of a batch with the batch dimension removed. For the token-normalised
Fisher the loss of a sample is a **sum** over its tokens, never a mean::

    L_b(θ) = Σ_t m_bt · ℓ(f(x_b; θ)_t, y_bt)        n_b = Σ_t m_bt

Any callable with that signature works. The builders here wrap an ``nn.Module`` through
``torch.func.functional_call`` (with the module's buffers) and return :class:`ModelLoss` objects,
which also know the model's output distribution (``"categorical"`` or ``"gaussian"``), count
tokens cheaply before any model call, and refuse a model that cannot be vectorised per sample.

Batches are tuples or mappings of tensors; ``inputs``/``targets``/``mask`` name their entries
(an index for tuples, a key for mappings). ``inputs`` may be one entry (the model's single
positional argument), a tuple of entries (positional arguments) or a mapping
``{keyword: entry}`` (keyword arguments).

Dropout: every builder takes ``dropout="eval"`` (default: the model runs with dropout off, whatever
mode it is in, and is not modified) or ``dropout="train"`` (its own training-mode dropout, with
independent masks per sample); see :mod:`fisherfunc.dropout`. Hugging Face models take the
builders in :mod:`fisherfunc.hf`, which also turn padding masks into per-sample attention masks.

>>> import torch, fisherfunc as ff
>>> model = torch.nn.Linear(3, 4)
>>> loss = ff.losses.classification(model)            # batch = (x, y)
>>> params = dict(model.named_parameters())
>>> value, tokens = loss(params, (torch.randn(3), torch.tensor(1)))
>>> value.shape, int(tokens)
(torch.Size([]), 1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ._engine.batches import BatchError, entry
from ._engine.experts import check_jitter, dense_experts, verified_experts
from ._model_check import check_model
from .dropout import DropoutMode, check_dropout
from .dropout import scope as dropout_scope

__all__ = [
    "ModelLoss",
    "classification",
    "token_classification",
    "causal_lm",
    "regression",
    "custom",
    "check_model",
]

Key = Hashable  # an index into a tuple batch or a key of a mapping batch
Inputs = Key | tuple[Key, ...] | Mapping[str, Key]
Distribution = Literal["categorical", "gaussian"] | None


def _default_output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"cannot find the prediction in a model output of type {type(out).__name__}; pass output= "
        "(a key, an index or a function of the output)"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ModelLoss:
    """A per-sample loss of an ``nn.Module``: ``(params, sample) -> (loss_sum, num_tokens)``.

    Built by :func:`classification`, :func:`token_classification`, :func:`causal_lm`,
    :func:`regression` and :func:`custom`; not usually constructed directly.

    Attributes:
        model: the module; only its structure, buffers and mode are used (params come from the call).
        inputs: which batch entries are the model's inputs.
        targets: which batch entry holds the targets (``None`` for causal LM without labels).
        nll: ``(prediction, targets, mask) -> (loss_sum, num_tokens)`` for one sample.
        distribution: the model's output distribution, or ``None`` if unknown.
        mask: batch entry of a padding mask (1 = real token), if any.
        output: how to get the prediction tensor from the model's output.
        count: ``batch -> tokens per sample [B]`` computed without the model, if possible.
        dropout: ``"eval"`` (default): the model runs with every dropout an identity, whatever its
            mode, and unmodified (see :mod:`fisherfunc.dropout`); ``"train"``: its own
            training-mode dropout, with independent masks per sample.
        prepare: ``(kwargs, dtype) -> kwargs``: rewrites one sample's keyword inputs (batch
            dimension 1) before the model call, e.g. a Hugging Face padding mask into a 4-D
            attention mask (:mod:`fisherfunc.hf`); ``dtype`` is the compute dtype.
        ignore_index: the target value of an ignored position (categorical).
        shift: how many positions the targets lead the prediction (``1`` for next-token prediction).
        variance: the Gaussian's ``σ²``.

    ``distribution``, ``ignore_index``, ``shift`` and ``variance`` let the Fisher kinds
    :class:`~fisherfunc.MC` and :class:`~fisherfunc.Exact` sample or enumerate targets from the model.
    """

    model: nn.Module
    inputs: Inputs
    targets: Key | None
    nll: Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]]
    distribution: Distribution = None
    mask: Key | None = None
    output: Key | Callable[[Any], Tensor] | None = None
    count: Callable[[Any], Tensor] | None = None
    dropout: DropoutMode = "eval"
    prepare: Callable[[dict[str, Any], torch.dtype], dict[str, Any]] | None = None
    ignore_index: int = -100
    shift: int = 0
    variance: float = 1.0

    @property
    def randomness(self) -> str:
        """``vmap``'s ``randomness``: ``"different"`` under ``dropout="train"``, else ``"error"``."""
        return "different" if self.dropout == "train" else "error"

    def forward(self, params: Mapping[str, Tensor], sample: Any) -> Tensor:
        """The model's prediction for one sample (batch dimension removed)."""
        dtype = next((p.dtype for p in params.values() if p.is_floating_point()), None)
        buffers = {
            k: (b.to(dtype) if dtype is not None and b.is_floating_point() else b)
            for k, b in self.model.named_buffers()
        }
        if isinstance(self.inputs, Mapping):
            args: tuple = ()
            kwargs = {kw: entry(sample, key, "input").unsqueeze(0) for kw, key in self.inputs.items()}
        else:
            keys = self.inputs if isinstance(self.inputs, tuple) else (self.inputs,)
            args = tuple(entry(sample, key, "input").unsqueeze(0) for key in keys)
            kwargs = {}
        if self.prepare is not None:
            kwargs = self.prepare(kwargs, dtype or torch.get_default_dtype())
        # Scoped here, inside the per-sample function: dropout as asked, and fused experts (mixtures of
        # experts) in their verified dense form, which vmap can run; the model is left as it was.
        with dropout_scope(self.dropout), dense_experts(self.model):
            out = functional_call(self.model, ({**params}, buffers), args, kwargs)
        if self.output is None:
            pred = _default_output(out)
        elif callable(self.output):
            pred = self.output(out)
        else:
            pred = out[self.output]
        return pred.squeeze(0)

    def targets_of(self, sample: Any) -> Tensor | None:
        """The targets of one sample, or ``None`` when the builder derives them from the inputs."""
        return None if self.targets is None else entry(sample, self.targets, "target")

    def mask_of(self, sample: Any) -> Tensor | None:
        """The padding mask of one sample (or of a batch), if the loss has one."""
        return None if self.mask is None else entry(sample, self.mask, "mask")

    def __call__(self, params: Mapping[str, Tensor], sample: Any) -> tuple[Tensor, Tensor]:
        """``(loss_sum, num_tokens)`` of one sample."""
        targets = self.targets_of(sample)
        assert targets is not None, "every builder names its targets"
        return self.nll(self.forward(params, sample), targets, self.mask_of(sample))

    def check(self, batch: Any) -> None:
        """Checks made before any heavy work: model mode, the dropout option and the batch's entries."""
        check_model(self.model)
        check_dropout(self.dropout, self.model)
        check_jitter(self.model, self.dropout)
        verified_experts(self.model)  # a fused-experts layout that fails its self-test is refused by name here
        if not isinstance(batch, (tuple, list, Mapping)):
            raise BatchError(
                f"a batch for a fisherfunc.losses loss is a tuple or a mapping of tensors whose entries "
                f"inputs={self.inputs!r} and targets={self.targets!r} name; got a {type(batch).__name__}"
            )
        inputs = (
            self.inputs.values()
            if isinstance(self.inputs, Mapping)
            else (self.inputs if isinstance(self.inputs, tuple) else (self.inputs,))
        )
        for key in inputs:
            entry(batch, key, "input")
        if self.targets is not None:
            entry(batch, self.targets, "target")
        if self.mask is not None:
            entry(batch, self.mask, "mask")
        hf_mask = self.inputs.get("attention_mask") if isinstance(self.inputs, Mapping) else None
        is_hf = hasattr(getattr(self.model, "config", None), "_attn_implementation")
        if self.prepare is None and hf_mask is not None and is_hf:
            if entry(batch, hf_mask, "input").ndim == 2:
                raise ValueError(
                    f"{type(self.model).__name__} is a Hugging Face model given a 2-D attention_mask: it would build "
                    "its attention mask with data-dependent control flow, which torch.func.vmap cannot run. Use "
                    "fisherfunc.hf.causal_lm / masked_lm / sequence_classification, which pass a per-sample 4-D mask"
                )

    def count_tokens(self, batch: Any) -> Tensor | None:
        """Tokens per sample, shape ``[B]``, without running the model (``None`` if unknown)."""
        return None if self.count is None else self.count(batch)


# --- classification -------------------------------------------------------------------------------


def _categorical_nll(logits: Tensor, targets: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    # One label: L = −log softmax(z)[y], n = 1.
    return F.cross_entropy(logits, targets, reduction="sum"), torch.ones((), dtype=logits.dtype)


def classification(
    model: nn.Module,
    *,
    inputs: Inputs = 0,
    targets: Key = 1,
    output: Key | Callable[[Any], Tensor] | None = None,
    dropout: DropoutMode = "eval",
) -> ModelLoss:
    """Cross-entropy with one label per example: ``L_b = −log p(y_b | x_b)``, ``n_b = 1``.

    The model maps inputs ``[1, ...]`` to logits ``[1, C]``; targets are class indices ``[B]``.
    """
    check_dropout(dropout)
    return ModelLoss(
        model=model,
        inputs=inputs,
        targets=targets,
        nll=_categorical_nll,
        distribution="categorical",
        output=output,
        count=lambda batch: torch.ones(entry(batch, targets, "target").shape[0]),
        dropout=dropout,
    )


# --- token-level losses ---------------------------------------------------------------------------


def _token_valid(targets: Tensor, mask: Tensor | None, ignore_index: int) -> Tensor:
    valid = targets != ignore_index
    if mask is not None:
        valid = valid & (mask != 0)
    return valid


def _token_nll(ignore_index: int, shift: bool) -> Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]]:
    def nll(logits: Tensor, targets: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        # L = Σ_t m_t · (−log softmax(z_t)[y_t]),  n = Σ_t m_t, with m_t = [y_t ≠ ignore] · mask_t.
        if shift:  # position t predicts token t + 1
            logits, targets = logits[:-1], targets[1:]
            mask = None if mask is None else mask[1:]
        valid = _token_valid(targets, mask, ignore_index)
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), safe.reshape(-1), reduction="none")
        weights = valid.reshape(-1).to(per_token.dtype)
        return (per_token * weights).sum(), weights.sum()

    return nll


def _token_counter(targets: Key, mask: Key | None, ignore_index: int, shift: bool) -> Callable[[Any], Tensor]:
    def count(batch: Any) -> Tensor:
        y = entry(batch, targets, "target")
        m = None if mask is None else entry(batch, mask, "mask")
        if shift:
            y = y[:, 1:]
            m = None if m is None else m[:, 1:]
        return _token_valid(y, m, ignore_index).reshape(y.shape[0], -1).sum(1)

    return count


def token_classification(
    model: nn.Module,
    *,
    inputs: Inputs = 0,
    targets: Key = 1,
    mask: Key | None = None,
    ignore_index: int = -100,
    output: Key | Callable[[Any], Tensor] | None = None,
    dropout: DropoutMode = "eval",
) -> ModelLoss:
    """Cross-entropy summed over a sequence's tokens; padding and ``ignore_index`` excluded.

    Logits ``[T, C]`` per sample, targets ``[T]``; ``mask`` (optional) names a ``[B, T]`` padding
    mask (nonzero = real token). ``n_b`` counts the tokens that contribute.
    """
    check_dropout(dropout)
    return ModelLoss(
        model=model,
        inputs=inputs,
        targets=targets,
        nll=_token_nll(ignore_index, shift=False),
        distribution="categorical",
        mask=mask,
        output=output,
        count=_token_counter(targets, mask, ignore_index, shift=False),
        ignore_index=ignore_index,
        dropout=dropout,
    )


def causal_lm(
    model: nn.Module,
    *,
    inputs: Inputs = 0,
    labels: Key | None = None,
    mask: Key | None = None,
    ignore_index: int = -100,
    output: Key | Callable[[Any], Tensor] | None = None,
    dropout: DropoutMode = "eval",
) -> ModelLoss:
    """Next-token cross-entropy, summed over a sequence: position ``t`` predicts token ``t + 1``.

    Targets are the input ids (``inputs`` must then be a single entry, or name ``labels``) shifted
    by one; ``labels`` (optional, unshifted like Hugging Face's) may set ``ignore_index`` entries;
    ``mask`` names a ``[B, T]`` padding mask whose zeros exclude target positions.
    """
    if labels is None:
        if isinstance(inputs, Mapping):
            raise ValueError("causal_lm with keyword inputs needs labels= (the entry holding the token ids)")
        if isinstance(inputs, tuple):
            if len(inputs) != 1:
                raise ValueError("causal_lm with several inputs needs labels= (the entry holding the token ids)")
            (labels,) = inputs
        else:
            labels = inputs
    check_dropout(dropout)
    return ModelLoss(
        model=model,
        inputs=inputs,
        targets=labels,
        nll=_token_nll(ignore_index, shift=True),
        distribution="categorical",
        mask=mask,
        output=output,
        count=_token_counter(labels, mask, ignore_index, shift=True),
        ignore_index=ignore_index,
        shift=1,
        dropout=dropout,
    )


# --- regression -----------------------------------------------------------------------------------


def regression(
    model: nn.Module,
    *,
    inputs: Inputs = 0,
    targets: Key = 1,
    variance: float = 1.0,
    output: Key | Callable[[Any], Tensor] | None = None,
    dropout: DropoutMode = "eval",
) -> ModelLoss:
    """Squared error summed over a sample's outputs, as a Gaussian negative log-likelihood.

    ``L_b = Σ_k (f_k(x_b) − y_bk)² / (2σ²)`` (``σ² = variance``), ``n_b = 1``. The ``½`` makes
    ``∇L_b`` the score of a Gaussian likelihood, so the Fisher has its usual scale ``Jᵀ J / σ²``.
    The model maps inputs ``[1, ...]`` to predictions ``[1, K]`` (or any shape with ``K`` entries);
    targets are ``[B, K]``.
    """
    if not variance > 0:
        raise ValueError(f"variance must be > 0, got {variance}")
    check_dropout(dropout)

    def nll(pred: Tensor, y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return (pred - y.reshape(pred.shape)).square().sum() / (2 * variance), torch.ones((), dtype=pred.dtype)

    return ModelLoss(
        model=model,
        inputs=inputs,
        targets=targets,
        nll=nll,
        distribution="gaussian",
        variance=variance,
        output=output,
        count=lambda batch: torch.ones(entry(batch, targets, "target").shape[0]),
        dropout=dropout,
    )


# --- anything else --------------------------------------------------------------------------------


def custom(
    model: nn.Module,
    fn: Callable[[Tensor, Tensor], Tensor | tuple[Tensor, Tensor]],
    *,
    inputs: Inputs = 0,
    targets: Key = 1,
    output: Key | Callable[[Any], Tensor] | None = None,
    dropout: DropoutMode = "eval",
) -> ModelLoss:
    """Any function of one sample's (prediction, targets), batch dimension removed.

    The prediction and the targets reach ``fn`` as one sample's tensors, e.g. ``[C]`` logits and
    a ``[]`` class index, or ``[T, C]`` and ``[T]`` for a sequence.

    Args:
        model: the module.
        fn: returns the sample's summed loss, or ``(loss_sum, num_tokens)``; a bare loss counts as
            one token. Use ``torch`` operations only (it runs under ``vmap``).
        inputs: the model's input entries.
        targets: the targets' entry.
        output: how to get the prediction from the model's output.
        dropout: ``"eval"`` (dropout off, whatever the model's mode) or ``"train"`` (the model's
            own training-mode dropout, independent masks per sample).
    """
    check_dropout(dropout)

    def nll(pred: Tensor, y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        res = fn(pred, y)
        if isinstance(res, tuple):
            value, tokens = res
            return value, torch.as_tensor(tokens, dtype=pred.dtype)
        return res, torch.ones((), dtype=pred.dtype)

    return ModelLoss(model=model, inputs=inputs, targets=targets, nll=nll, output=output, dropout=dropout)
