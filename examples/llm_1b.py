"""Per-head Fisher of a ~1B-parameter Llama-shaped model stored in bfloat16, next to a plain forward+backward.

A ``LlamaConfig`` with random weights (default: d=2048, 16 layers, 32 query / 8 key-value heads,
MLP 7168, vocabulary 32000: 0.99B parameters, 2.0 GB in bfloat16), 4 right-padded sequences of up to
256 tokens. Two runs, each in a fresh process that builds the model and the batch, resets the
resident-set high-water mark (``VmHWM``) and runs once:

* ``forward+backward``: the summed next-token loss, ``.backward()``, in the compute dtype (the
  model cast to it in place: what a user on this machine would run);
* ``fisherfunc per-head``: ``ff.fisher`` with the attention projections' per-head rules (``Skip()``
  for the rest, which creates no probes or gradients for them) and ``ff.head_importance``.

``--compute float32`` (the default, for CPUs): fisherfunc's float32 policy on the bfloat16 weights,
against a float32 forward+backward. ``--compute model`` (GPUs): ``precision="model"``, against a
bfloat16 forward+backward. The table gives seconds and peak memory above the loaded model, each also
as a ratio to the forward+backward's: the tensors' bytes at their peak (CPU: fisherfunc's
``LiveBytes`` count of storages allocated and not yet freed; CUDA: ``max_memory_allocated`` minus
the allocated bytes) and, on CPU, the resident set (``VmHWM`` minus the resident set after building:
tensors plus the allocator's overhead and kernels' scratch; the runs use glibc's
``MALLOC_MMAP_THRESHOLD_=131072``, so that freed tensors leave the resident set)::

    python examples/llm_1b.py                                   # CPU, ~1B, several GB and minutes
    python examples/llm_1b.py --layers 2 --d 256 --ffn 704 --vocab 2000 --tokens 64   # a quick look
    python examples/llm_1b.py --device cuda --compute model --tokens 1024 --batch 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import fisherfunc as ff
from fisherfunc._engine.memory import LiveBytes

RUNS = ("forward+backward", "fisherfunc per-head")
#: glibc maps every allocation of 128 KiB or more on its own and unmaps it when freed, so the resident
#: set follows the live tensors (by default freed blocks stay in the heap: fragmentation, not tensors)
RESIDENT_FOLLOWS_TENSORS = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def build(args: argparse.Namespace) -> tuple[Any, dict[str, torch.Tensor]]:
    """The bfloat16 model (random weights, built in bfloat16: no float32 copy on the way) and its batch."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=args.tokens,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    device = torch.device(args.device)
    with device:
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, args.vocab, (args.batch, args.tokens), device=device)
    lengths = torch.tensor([args.tokens - i * (args.tokens // 8) for i in range(args.batch)], device=device)
    mask = (torch.arange(args.tokens, device=device) < lengths.unsqueeze(1)).long()
    return model, {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def forward_backward(model: Any, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """The baseline: the summed next-token loss of the batch in ``dtype``, and its backward."""
    model.to(dtype)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    nll = F.cross_entropy(logits.transpose(1, 2).float(), ids[:, 1:], reduction="none")
    (nll * (mask[:, :-1] * mask[:, 1:])).sum().backward()


def per_head(model: Any, batch: dict[str, torch.Tensor], precision: str) -> ff.HeadImportance:
    """``ff.fisher`` over the attention projections' per-head rules, as a ``[layers, heads]`` importance."""
    spec = {k: r if isinstance(r, ff.Heads) else ff.Skip() for k, r in ff.infer_spec(model).items()}
    params = {k: v.detach() for k, v in model.named_parameters()}
    extra = {"precision": precision} if precision != "float32" else {}
    fisher = ff.fisher(ff.hf.causal_lm(model), params, batch, spec=spec, **extra)
    return ff.head_importance(fisher, model)


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build, reset the peak counter, run ``args.measure`` once: seconds and bytes above the loaded model."""
    torch.set_num_threads(args.threads)
    model, batch = build(args)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = _kib("VmRSS") * 1024
    out: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters()), "loaded": base}
    with contextlib.nullcontext() if cuda else LiveBytes() as live:  # CPU: count tensor bytes too
        start = time.perf_counter()
        if args.measure == RUNS[0]:
            forward_backward(model, batch, torch.float32 if args.compute == "float32" else torch.bfloat16)
        else:
            heads = per_head(model, batch, "float32" if args.compute == "float32" else "model")
            out["shape"] = list(heads.matrix.shape)
            out["top"] = [int(i) for i in divmod(int(heads.matrix.argmax()), heads.heads)]
        if cuda:
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - start
    if cuda:
        out["peak"] = out["tensors"] = torch.cuda.max_memory_allocated() - base
    else:
        out["peak"], out["tensors"] = _kib("VmHWM") * 1024 - base, live.peak
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--d", type=int, default=2048, help="hidden size")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=7168, help="MLP width")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=256, help="tokens of the longest sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences (each next one tokens/8 shorter)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compute", choices=["float32", "model"], default="float32", help="see the module docstring")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--measure", choices=RUNS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    argv = list(sys.argv[1:])
    results = {}
    for run in RUNS:
        cmd = [sys.executable, __file__, *argv, "--measure", run]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **RESIDENT_FOLLOWS_TENSORS})
        if res.returncode != 0:
            raise SystemExit(f"{run} failed:\n{res.stderr[-3000:]}")
        results[run] = json.loads(res.stdout.strip().splitlines()[-1])
    base = results[RUNS[0]]
    first = results[RUNS[1]]
    print(
        f"Llama-shaped, {first['params'] / 1e6:,.0f}M parameters stored in bfloat16 "
        f"(resident after building: {first['loaded'] / 2**30:.2f} GiB), {args.layers} layers d={args.d}, "
        f"{args.heads}/{args.kv_heads} heads, {args.batch} sequences of <= {args.tokens} tokens, {args.device}, "
        f"compute {args.compute}, torch {torch.__version__}, {args.threads} threads\n"
    )
    print("| run | seconds | × fwd+bwd | peak tensors (GiB) | × fwd+bwd | peak RSS above loaded (GiB) | × fwd+bwd |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in RUNS:
        r = results[run]
        print(
            f"| {run} | {r['seconds']:.1f} | {r['seconds'] / base['seconds']:.2f}× | {r['tensors'] / 2**30:.2f} "
            f"| {r['tensors'] / base['tensors']:.2f}× | {r['peak'] / 2**30:.2f} | {r['peak'] / base['peak']:.2f}× |"
        )
    print(f"\nper-head Fisher {first['shape']} (layers × heads); the most important head: layer, head = {first['top']}")


if __name__ == "__main__":
    main()
