"""Language-model workloads for ``run.py``: Llama-shaped models from a ``LlamaConfig``, random weights.

Each workload is a right-padded batch of token ids with its attention mask and the methods that
issue 14 compares, every one measured against the plain forward+backward it should be compared with
(``baseline``):

======================================  ==========================================================
method                                  what runs (``baseline``)
======================================  ==========================================================
forward+backward                        the summed next-token loss of the batch, ``.backward()``
forward+backward, one sample            the same on the longest sample alone (B=1)
fisher_step (sites kept)                a training loop's ``make_fisher_step`` from its second call
ff.fisher one-shot                      ``ff.accumulate`` (``ff.fisher`` without the division)
ff.fisher chunk_size=1                  one sample per vectorised chunk (vs one sample's fwd+bwd)
... precision="model"                   forward and backward in the model's dtype (bf16 models)
ff.fisher max_memory=…                  the chunk picked by a memory budget
======================================  ==========================================================

Rows that need an engine option the installed fisherfunc does not have (``precision``,
``max_memory``) are reported as not run, with the option named. The float32 result is checked
against a naive per-sample ``torch.autograd`` loop over the **unpadded** samples in float64;
a ``precision="model"`` result against the float32 policy's result on the same weights (the
per-group relative error and the Spearman correlation of the group rankings).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fisherfunc as ff

FWD_BWD = "forward+backward"
ONE_SAMPLE = "forward+backward, one sample"


@dataclass(frozen=True)
class LlamaShape:
    """A Llama-shaped configuration (random weights), its batch and its compute dtype."""

    label: str
    d: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    T: int
    B: int
    dtype: torch.dtype = torch.float32

    def lengths(self) -> list[int]:
        """Right-padded lengths: the first sample is full, each next one ``T/8`` shorter."""
        return [self.T - i * (self.T // 8) for i in range(self.B)]

    def name(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"{self.label}: Llama {self.layers} layers d={self.d}, {self.heads}/{self.kv_heads} heads, "
            f"V={self.vocab}, {dtype}, sdpa, T={self.T} right-padded, B={self.B}"
        )


SHAPES = {
    # issue 14's model: 31.8M parameters
    "llm": LlamaShape("llm", d=512, layers=8, heads=8, kv_heads=4, ffn=1408, vocab=8000, T=512, B=4),
    # the same model stored and computed in bfloat16 (precision="model"); on a CPU without bf16 matrix
    # units (no AVX512-BF16/AMX) bf16 matmuls take ~300x float32's time: use llm-bf16-small there
    "llm-bf16": LlamaShape(
        "llm-bf16", d=512, layers=8, heads=8, kv_heads=4, ffn=1408, vocab=8000, T=512, B=4, dtype=torch.bfloat16
    ),
    "llm-bf16-small": LlamaShape(
        "llm-bf16-small", d=256, layers=2, heads=4, kv_heads=2, ffn=704, vocab=2000, T=128, B=4, dtype=torch.bfloat16
    ),
    # ~1.0B parameters, for a GPU (python benchmarks/run.py --device cuda --workloads llm-1b ...)
    "llm-1b": LlamaShape(
        "llm-1b", d=2048, layers=16, heads=32, kv_heads=8, ffn=7168, vocab=32000, T=1024, B=8, dtype=torch.bfloat16
    ),
}


def build(shape: LlamaShape, device: torch.device) -> tuple[nn.Module, dict[str, Tensor]]:
    """The model (eval mode, in ``shape.dtype``) and its right-padded batch, seeded by the caller."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.d, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.T,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa",
    )  # fmt: skip
    with device:  # initialised where it runs (a 1B model's float32 init on a GPU, not on the host)
        model = transformers.LlamaForCausalLM(config)
    model = model.to(dtype=shape.dtype).eval()
    ids = torch.randint(3, shape.vocab, (shape.B, shape.T), device=device)
    lengths = torch.tensor(shape.lengths(), device=device)
    mask = (torch.arange(shape.T, device=device) < lengths.unsqueeze(1)).long()
    return model, {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def summed_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``Σ_b L_b``: position ``t − 1`` predicts token ``t`` where both are real tokens (``hf.causal_lm``'s)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    nll = F.cross_entropy(logits.transpose(1, 2).float(), ids[:, 1:], reduction="none")
    return (nll * (mask[:, :-1] * mask[:, 1:])).sum()


def _forward_backward(model: nn.Module, batch: dict[str, Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    summed_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)


def _engine_has(option: str) -> bool:
    return option in inspect.signature(ff.accumulate).parameters


def methods(
    model: nn.Module, batch: dict[str, Tensor], shape: LlamaShape, *, max_memory: str | None = None
) -> tuple[dict[str, Callable[[], Any]], dict[str, str], dict[str, str]]:
    """``(callables, not_run, baselines)``: each method, why some cannot run, and each one's memory baseline.

    A float32 workload gets the float32 policy's rows; a bf16/fp16 one the ``precision="model"`` rows
    (its float32-policy result is the check's reference, not a timed row).
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = ff.hf.causal_lm(model)
    spec = ff.infer_spec(model)
    one = {k: v[:1] for k, v in batch.items()}  # the longest sample (the first, unpadded)
    low = shape.dtype != torch.float32
    extra: dict[str, Any] = {"precision": "model"} if low else {}
    tag = ', precision="model"' if low else ""
    out: dict[str, Callable[[], Any]] = {
        FWD_BWD: lambda: _forward_backward(model, batch),
        ONE_SAMPLE: lambda: _forward_backward(model, one),
    }
    baselines = {f"fisher_step (sites kept){tag}": FWD_BWD, f"ff.fisher one-shot{tag}": FWD_BWD}
    baselines[f"ff.fisher chunk_size=1{tag}"] = ONE_SAMPLE
    if max_memory is not None:
        baselines[f"ff.fisher max_memory={max_memory}{tag}"] = FWD_BWD
    not_run: dict[str, str] = {}
    if low and not _engine_has("precision"):
        not_run = {m: "this fisherfunc has no precision= option" for m in baselines}
        return out, not_run, {FWD_BWD: FWD_BWD, ONE_SAMPLE: ONE_SAMPLE}
    step = ff.make_fisher_step(loss, spec=spec, **extra)
    state = step.init(params)
    out[f"fisher_step (sites kept){tag}"] = lambda: step.batch_sums(params, batch, state)
    out[f"ff.fisher one-shot{tag}"] = lambda: ff.accumulate(loss, params, batch, spec=spec, **extra)
    out[f"ff.fisher chunk_size=1{tag}"] = lambda: ff.accumulate(loss, params, batch, spec=spec, chunk_size=1, **extra)
    if max_memory is not None:
        name = f"ff.fisher max_memory={max_memory}{tag}"
        if _engine_has("max_memory"):
            out[name] = lambda: ff.accumulate(loss, params, batch, spec=spec, max_memory=max_memory, **extra)
        else:
            not_run[name] = "this fisherfunc has no max_memory= option"
    return out, not_run, {m: baselines.get(m, m) for m in out}


# --- checks ----------------------------------------------------------------------------------------


def naive_sums(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``Σ_b g_b ⊙ g_b`` by ``torch.autograd``, one **unpadded** sample at a time, in float64."""
    import copy

    ref = copy.deepcopy(model).to(torch.float64)
    params = dict(ref.named_parameters())
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for ids, length in zip(batch["input_ids"], batch["attention_mask"].sum(1).tolist()):
        sample = {"input_ids": ids[None, :length], "attention_mask": torch.ones_like(ids[None, :length])}
        for k, g in zip(params, torch.autograd.grad(summed_loss(ref, sample), list(params.values()))):
            out[k] += g.square()
    return out


def relative_error(result: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """``max`` over tensors of ``max |result − reference| / max |reference|``."""
    return max(
        float((result[k].double() - reference[k].double()).abs().max() / reference[k].abs().max().clamp_min(1e-300))
        for k in reference
    )


def _ranks(x: Tensor) -> Tensor:
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[x.argsort()] = torch.arange(x.numel(), dtype=torch.float64, device=x.device)
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two flat tensors (ties broken by position)."""
    ra, rb = _ranks(a.flatten().double()), _ranks(b.flatten().double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def low_precision_error(result: dict[str, Tensor], reference: dict[str, Tensor]) -> str:
    """The per-group relative error and the ranking correlation of ``result`` against ``reference``.

    Relative error per group ``|r − f| / f`` over groups with ``f > 0``: median and 99th percentile;
    Spearman correlation within each tensor's groups (tensors with ≥ 4 groups): the minimum and the
    median over tensors.
    """
    errors, rhos = [], []
    for k, f in reference.items():
        r, f = result[k].double().flatten(), f.double().flatten()
        nonzero = f > 0
        errors.append(((r - f).abs()[nonzero] / f[nonzero]).cpu())
        if f.numel() >= 4:
            rhos.append(spearman(r, f))
    err = torch.cat(errors)
    rho = torch.tensor(rhos)
    return (
        f"vs float32 policy: group rel. error median {err.median():.1e}, p99 {err.quantile(0.99):.1e}; "
        f"Spearman min {rho.min():.4f}, median {rho.median():.4f} over {len(rhos)} tensors"
    )


def verdicts(
    model: nn.Module, batch: dict[str, Tensor], shape: LlamaShape, fns: dict[str, Callable[[], Any]]
) -> dict[str, str]:
    """Each fisherfunc method's check: float32 ones against the naive float64 loop, low-precision
    ones against the float32 policy's result on the same weights (itself checked against the loop)."""
    spec = ff.infer_spec(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    naive = {k: spec[k].reduce(v) for k, v in naive_sums(model, batch).items()}
    out: dict[str, str] = {}
    if shape.dtype != torch.float32:
        float32 = ff.accumulate(ff.hf.causal_lm(model), params, batch, spec=spec).sums
        base = f"float32 policy vs naive loop: max rel. error {relative_error(float32, naive):.1e}"
    for m, fn in fns.items():
        if m in (FWD_BWD, ONE_SAMPLE):
            continue
        try:
            sums = fn().sums
        except Exception as exc:  # noqa: BLE001 - a method that fails is a result
            out[m] = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
            continue
        if shape.dtype == torch.float32:
            err = relative_error(sums, naive)
            out[m] = f"max rel. error {err:.1e} vs naive float64 loop" + (" (DISAGREES)" if err > 1e-5 else "")
        else:
            out[m] = f"{low_precision_error(sums, float32)}; {base}"
    return out


# --- the memory model (docs/scale.md) --------------------------------------------------------------


def layer_bytes_per_token(shape: LlamaShape) -> int:
    """What one decoder layer keeps for the backward, per token (HF Llama, sdpa; docs/scale.md)::

    a = 2·(4 + 2s)·d      two RMSNorms: the float32 input, the normalised and the scaled output (s bytes)
      + 4s·d              q after RoPE, k and v repeated to H heads, the attention output
      + 4s·f              gate, SiLU(gate), up, their product
      + 4·H + 8           sdpa's float32 logsumexp per head, the norms' float32 rsqrt
    """
    s = torch.empty((), dtype=shape.dtype).element_size()
    return 2 * (4 + 2 * s) * shape.d + 4 * s * shape.d + 4 * s * shape.ffn + 4 * shape.heads + 8


def top_bytes_per_token(shape: LlamaShape) -> int:
    """Per token outside the layers: the final norm, the float32 log-softmax kept, and at the start of
    the backward the float32 gradients of the log-softmax and of the logits (and the logits' own
    dtype's copy of the latter when it is not float32)::

        top = (4 + 2s)·d + 4V + 8V (+ s·V if s < 4)
    """
    s = torch.empty((), dtype=shape.dtype).element_size()
    return (4 + 2 * s) * shape.d + 12 * shape.vocab + (s * shape.vocab if s < 4 else 0)


def predicted_peak(shape: LlamaShape, samples: int, *, masked: bool) -> int:
    """Predicted peak tensor bytes of a forward+backward of ``samples`` sequences of ``shape.T`` tokens::

        peak = B·T·(L·a + top) + [masked]·L·B·s·T²

    (the padding mask each layer's sdpa keeps: ``s`` bytes per query-key pair; none for an unpadded
    single sequence, which runs causal). The weights' gradients do not add: they are allocated as
    the activations are freed, after this peak at the start of the backward (true while
    ``s·P < B·T·L·a``; the llm workloads have P·s = 121 MiB against 0.2-0.8 GiB).
    """
    s = torch.empty((), dtype=shape.dtype).element_size()
    tokens = samples * shape.T
    per_token = shape.layers * layer_bytes_per_token(shape) + top_bytes_per_token(shape)
    return tokens * per_token + (shape.layers * samples * s * shape.T**2 if masked else 0)


def fisher_top_bytes_per_token(shape: LlamaShape) -> int:
    """fisherfunc's per-token bytes outside the layers: the final norm, and the loss's log-softmax and
    the gradients of it and of the logits in the compute dtype (``fisherfunc.hf`` does not upcast the
    logits; its square sums widen a ``[T, V]`` gradient block by block)::

        top_f = (4 + 2s)·d + 3s·V
    """
    s = torch.empty((), dtype=shape.dtype).element_size()
    return (4 + 2 * s) * shape.d + 3 * s * shape.vocab


def predicted_fisher_peak(shape: LlamaShape, samples: int) -> int:
    """Predicted peak tensor bytes of a group Fisher call over a chunk of ``samples`` sequences::

        peak = c·T·(L·a + top_f)

    Per sample it keeps the forward's activations (``a``, as a plain forward+backward), and its own
    terms (probe gradients ``T × out``, reduced in the backward as soon as they exist) are allocated
    as those activations are freed. A causal model gets no mask (its own causal attention), so there
    is no ``T²`` term; a bfloat16 model under ``precision="model"`` holds no float32 copies.
    """
    return samples * shape.T * (shape.layers * layer_bytes_per_token(shape) + fisher_top_bytes_per_token(shape))


def predictions(shape: LlamaShape) -> dict[str, int]:
    """The memory model's peak for each method of :func:`methods` that it covers (bytes)."""
    tag = ', precision="model"' if shape.dtype != torch.float32 else ""
    return {
        FWD_BWD: predicted_peak(shape, shape.B, masked=True),
        ONE_SAMPLE: predicted_peak(shape, 1, masked=False),
        f"fisher_step (sites kept){tag}": predicted_fisher_peak(shape, shape.B),
        f"ff.fisher one-shot{tag}": predicted_fisher_peak(shape, shape.B),
        f"ff.fisher chunk_size=1{tag}": predicted_fisher_peak(shape, 1),
    }
