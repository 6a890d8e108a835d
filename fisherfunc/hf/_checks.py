"""Live checks of a Hugging Face loss on the model itself, run once when the loss is built.

A family's conventions (:mod:`~fisherfunc.hf._conventions`) are read from its config; these checks
confirm them on the live model, with a few forward passes of a short probe sequence (no gradients,
dropout off, the random-number state restored):

* **causality** — the model is called as a user calls it, on two probes that share their first
  token and differ in every later one. A causal model's output at position 0 is the same for both
  (``|Δ| ≤ √ε · max|h|``, ``ε`` the dtype's resolution); a bidirectional one's changes. When the config
  does not say, this decides; when it does and they disagree, the loss is refused.
* **padding** — the loss's own per-sample forward, under ``torch.func.vmap`` as the Fisher runs it,
  on the probe padded on the right and on the left, must give the model's outputs for the unpadded
  probe (``max|Δ| ≤ √ε · max|out|`` over the real positions). This checks the masks, the positions,
  the front alignment and the decoder inputs of every family at once, and that the model runs
  under ``vmap`` at all (an error there is reported with the model's name, before any batch).

The probe's ids avoid the config's special tokens; a probe needs only ids, so a loss whose inputs
include anything else (``input_features``, ``pixel_values``) is not probed for padding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from .._engine.experts import dense_experts
from .._engine.numerics import scope
from ..dropout import evaluation

__all__ = ["PROBE_LENGTH", "probe_ids", "observed_causality", "check_padding", "ProbeError"]

PROBE_LENGTH = 4  # real tokens of a probe
_SPECIAL = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "decoder_start_token_id")


class ProbeError(ValueError):
    """A live check found the model differs from what the loss assumed, or cannot run per sample."""


def _tolerance(dtype: torch.dtype) -> float:
    return math.sqrt(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def probe_ids(config: Any, count: int, *, offset: int = 0) -> list[int]:
    """``count`` token ids that are none of the config's special tokens, starting after ``offset`` others."""
    special: set[int] = set()
    for name in _SPECIAL:
        value = getattr(config, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        special |= {v for v in values if isinstance(v, int)}
    vocab = int(getattr(config, "vocab_size", 0) or 0) or 1000
    ids = [i for i in range(min(vocab, 4096)) if i not in special]
    if len(ids) < offset + count:
        raise ProbeError(f"the vocabulary ({vocab} ids) is too small for a probe of {offset + count} ordinary tokens")
    # spread the picks over the vocabulary, away from the first (often special) ids
    step = max(1, len(ids) // (offset + count + 1))
    return [ids[(k + 1) * step - 1] for k in range(offset, offset + count)]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No gradients, dropout off, and the random-number state restored afterwards."""
    with torch.no_grad(), evaluation(), torch.random.fork_rng(devices=[]):
        yield


def _hidden(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    for name in ("last_hidden_state", "logits"):
        value = getattr(out, name, None)
        if isinstance(value, Tensor):
            return value
    return out[0]


def observed_causality(model: nn.Module) -> bool:
    """Whether the live model's output at position 0 ignores every later token.

    Args:
        model: a decoder-only or encoder-only ``transformers`` model (its backbone,
            ``model.base_model``, is called on two probes of :data:`PROBE_LENGTH` tokens).

    Raises:
        ProbeError: when the model cannot be called on a probe.
    """
    backbone = getattr(model, "base_model", model)
    first, rest = probe_ids(model.config, 1), probe_ids(model.config, 2 * (PROBE_LENGTH - 1), offset=1)
    device = _device(model)
    a = torch.tensor([first + rest[: PROBE_LENGTH - 1]], device=device)
    b = torch.tensor([first + rest[PROBE_LENGTH - 1 :]], device=device)
    try:
        with _quiet(), dense_experts(model):  # fused experts in their verified dense form, as the loss runs them
            ha = _hidden(backbone(input_ids=a, attention_mask=torch.ones_like(a)))[0, 0]
            hb = _hidden(backbone(input_ids=b, attention_mask=torch.ones_like(b)))[0, 0]
    except Exception as err:  # noqa: BLE001 - any failure of the user's model is reported with its name
        raise ProbeError(
            f"could not call {type(model).__name__} on a probe sequence to see whether it attends causally "
            f"({type(err).__name__}: {err}); pass causal=True (decoder) or causal=False (encoder)"
        ) from err
    scale = float(ha.abs().max()) or 1.0
    return float((ha - hb).abs().max()) <= _tolerance(ha.dtype) * scale


def check_padding(
    name: str,
    forward: Callable[[Mapping[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    padded: dict[str, Tensor],
    reference: Callable[[], Tensor],
    rows: int | None,
    randomness: str,
    hint: str,
) -> None:
    """The loss's per-sample forward on a padded probe batch equals the model on the unpadded probe.

    Args:
        name: the model's class name, for messages.
        forward: the loss's ``forward(params, sample)`` (one sample, batch dimension removed).
        params: the parameters to call it with.
        padded: the probe batch, ``[2, T]`` entries: the probe padded on the right, then on the left.
        reference: the model's output for the unpadded probe, batch dimension removed.
        rows: compare the first ``rows`` positions (token outputs), or everything (``None``).
        randomness: ``vmap``'s randomness for the loss.
        hint: what the conventions were, for the message.

    Raises:
        ProbeError: when the outputs differ, or the forward fails under ``vmap``.
    """
    try:
        with _quiet():
            want = reference()
            devices = {p.device.type for p in params.values()} or {"cpu"}
            with scope(devices):  # the engine's numerics: autocast off, attention kernels that batch
                got = vmap(lambda sample: forward(params, sample), randomness=randomness)(padded)
    except Exception as err:  # noqa: BLE001 - reported with the model's name and what to do
        text = f"{type(err).__name__}: {err}"
        advice = ""
        if "random" in str(err):
            advice = (
                "; in training mode it draws random numbers in its forward (e.g. LayerDrop in older transformers): "
                "call model.eval(), or pass dropout='train'"
            )
        elif isinstance(err, ValueError) and "Wrong shape for input_ids" in str(err):  # get_extended_attention_mask
            advice = (
                f"; this version of transformers builds {name}'s attention mask with get_extended_attention_mask, "
                "which takes 2-D or 3-D masks only, not the per-sample 4-D mask fisherfunc.hf passes (transformers "
                "5.0 does so for ConvBERT, RoFormer, MPNet, BigBird and other encoders): write the loss with "
                "fisherfunc.losses.custom and a 3-D mask [B, T, T] (1: attend), or use a newer transformers"
            )
        raise ProbeError(
            f"fisherfunc.hf cannot run {name} one sample at a time under torch.func.vmap ({text}){advice}"
        ) from err
    sides = ("right", "left")[: got.shape[0]]
    for k, side in enumerate(sides):
        out = got[k] if rows is None else got[k, :rows]
        ref = want if rows is None else want[:rows]
        scale = float(ref.abs().max()) or 1.0
        difference = float((out.to(ref.dtype) - ref).abs().max()) / scale
        if not difference <= _tolerance(ref.dtype):
            raise ProbeError(
                f"fisherfunc.hf: {name}'s outputs for a sequence padded on the {side} differ from its outputs for "
                f"the unpadded sequence (largest relative difference {difference:.1e}); {hint}. The family does not "
                "build its masks or positions the way fisherfunc.hf assumes: feed it unpadded sequences, or write "
                "the per-sample loss with fisherfunc.losses.custom"
            )
