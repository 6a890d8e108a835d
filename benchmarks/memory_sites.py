"""Where a group Fisher call's memory goes, per site, next to a plain forward+backward of the same batch.

Each method runs in a **fresh process** on the same model and batch (a Hugging Face model built from
its config, random weights, ``sdpa``, right-padded):

* ``forward+backward``: the summed loss of the batch (the same loss ``fisherfunc.hf`` computes),
  ``.backward()``; with ``--chunk-size 1`` its one-sample version (the longest sample) too;
* ``ff.fisher``: ``ff.accumulate`` with ``ff.infer_spec(model)``, the library's ``fisherfunc.hf``
  loss and ``path="auto"`` (``--chunk-size`` passed through).

Two measures of each, both above what the process holds once the model and batch are loaded:

* **VmHWM**: the resident-set high-water mark (``/proc/self/clear_refs`` reset just before the call)
  of a first call in the fresh process, and of a second one after ``malloc_trim`` gave back what the
  allocator kept: what the operating system saw, allocator caches and library scratch included (a
  first call also loads code: ``torch.func``'s, the engine's). The children run with glibc's
  ``MALLOC_MMAP_THRESHOLD_=131072``: every tensor of 128 KiB or more is mapped on allocation and
  unmapped when freed, so the resident set follows the live tensors. Under glibc's default, a
  threshold that rises with every freed block, freed tensors stay in the heap, and the high-water
  mark then measures fragmentation — it read 1.3–1.5× the live bytes of the same ``ff.fisher``
  call (``--glibc-default`` to see it);
* **live tensor bytes** at the peak of a second call, counted by a dispatch mode that sees every
  storage torch allocates and frees (the method of ``fisherfunc._engine.memory.LiveBytes``), each
  allocation labelled with the **site** that made it, read off the Python stack:

  ==============================  ==================================================================
  site                            allocated by
  ==============================  ==================================================================
  attention masks, positions      ``fisherfunc.hf._masks`` (the per-sample 4-D masks, position ids)
  attention (sdpa, softmax)       ``scaled_dot_product_attention`` / eager softmax in the model
  loss: logits, log-softmax       ``cross_entropy`` and the logits it reads
  activations (forward)           any other op of the model's forward (layer outputs, norms, ...)
  backward: gradients, ...        the backward pass: gradients flowing, their temporaries, and a
                                  forward+backward's parameter ``.grad``
  square sums (probe reductions)  ``fisherfunc._engine.group_sums`` (Gram / direct forms, in the backward)
  engine, other                   the rest of ``fisherfunc`` (probes, chunk sums, casts)
  ==============================  ==================================================================

Run (2-core CPU, one thread; every figure below is from this command)::

    python benchmarks/memory_sites.py --family llama --T 512 --B 4
    python benchmarks/memory_sites.py --family gpt2 --T 2048 --B 1 --chunk-size 1

Options: ``--family {llama,gpt2,bert}``, ``--T``, ``--B``, ``--d`` (256), ``--layers`` (4),
``--heads`` (4), ``--vocab`` (2000), ``--chunk-size``, ``--dtype {float32,bfloat16}``,
``--no-sites`` (VmHWM only: faster), ``--device cuda`` (the peak of ``torch.cuda.max_memory_allocated``
above the loaded model instead of VmHWM; not run here: no GPU this session), e.g.::

    python benchmarks/memory_sites.py --device cuda --family llama --d 2048 --layers 16 --heads 32 \
        --vocab 32000 --dtype bfloat16 --T 1024 --B 8 --no-sites

With ``--dtype bfloat16`` the group Fisher runs with ``precision="model"`` (the model's own dtype).
The table it prints is what ``benchmarks/README.md`` and ``docs/scale.md`` quote.

Measured (2-core CPU, torch 2.13, transformers 5.24; models of 4 layers, d = 256, 4 heads (Llama: 2
key-value heads), V = 2000, float32, sdpa; fresh processes; VmHWM of the first call above the loaded
model, forward+backward → group Fisher, and the ratio). "Before": the engine of commit 2c2173f;
"after": this one. ``chunk=1`` compares ``chunk_size=1`` with a forward+backward of one sample::

    family  T     batch      before                      after
    llama   512   B=1        73 → 214 MiB  (2.93×)       73 → 70 MiB    (0.96×)
    llama   512   B=4        287 → 672 MiB (2.34×)       287 → 265 MiB  (0.92×)
    llama   512   chunk=1    73 → 214 MiB  (2.95×)       72 → 70 MiB    (0.97×)
    llama   2048  B=1        263 → 855 MiB (3.25×)       263 → 269 MiB  (1.02×)
    llama   2048  B=4        1312 → 2725 MiB (2.08×)     1312 → 1054 MiB (0.80×)
    llama   2048  chunk=1    263 → 857 MiB (3.25×)       263 → 272 MiB  (1.03×)
    gpt2    512   B=1        83 → 166 MiB  (1.99×)       83 → 76 MiB    (0.91×)
    gpt2    512   B=4        318 → 542 MiB (1.70×)       318 → 288 MiB  (0.91×)
    gpt2    512   chunk=1    83 → 167 MiB  (2.00×)       83 → 77 MiB    (0.92×)
    gpt2    2048  B=1        302 → 659 MiB (2.18×)       302 → 306 MiB  (1.02×)
    gpt2    2048  B=4        1432 → 2181 MiB (1.52×)     1432 → 1156 MiB (0.81×)
    gpt2    2048  chunk=1    301 → 661 MiB (2.19×)       302 → 308 MiB  (1.02×)
    bert    512   B=1        58 → 122 MiB  (2.09×)       58 → 54 MiB    (0.92×)
    bert    512   B=4        214 → 358 MiB (1.68×)       213 → 199 MiB  (0.93×)
    bert    512   chunk=1    58 → 122 MiB  (2.12×)       58 → 55 MiB    (0.95×)
    bert    2048  B=1        197 → 481 MiB (2.44×)       197 → 205 MiB  (1.04×)
    bert    2048  B=4        1009 → 1445 MiB (1.43×)     1009 → 785 MiB (0.78×)
    bert    2048  chunk=1    197 → 483 MiB (2.45×)       197 → 207 MiB  (1.05×)

    llama   256   B=4 bf16   102 → 356 MiB (3.50×)       102 → 95 MiB   (0.93×)
    llama   256   B=2 bf16, V=32000 (live bytes)         217 → 123 MiB  (0.57×; 1.15× before the
                                                         head's square sums were formed in blocks)

    issue 14's model (--d 512 --layers 8 --heads 8 --vocab 8000 --T 512; FFN 2048 here, 1408 there)
    llama   512   B=4        1080 → 2618 MiB (2.42×)     1080 → 1043 MiB (0.97×)
    llama   512   B=1        265 → 830 MiB (3.13×)       265 → 268 MiB  (1.01×)
    llama   512   chunk=1    265 → 832 MiB (3.14×)       265 → 270 MiB  (1.02×)

(bf16: the model stored in bfloat16; before, ``ff.fisher`` made float32 copies and computed in
float32, after it runs ``precision="model"``. Llama runs with no mask: its own causal ``sdpa``;
GPT-2, which reads its ids when given none, gets the shared causal mask, 16 MiB at T = 2048.) Where the extra went
before, per site (Llama, T = 512, B = 1, live bytes at the peak): backward intermediates 98 MiB
against 8 (``torch.func.grad``'s ``create_graph=True`` kept every one alive), engine 57 MiB against 0
(every probed layer's ``[T, out]`` output gradient and ``[T, in]`` input held to the end of the
backward, ``[T, out]`` zero probes); 3.3× in all. After, the differences left are GPT-2's mask (the
shared ``[T, T]``), ``vmap``'s loop over the fused attention kernel, which keeps
its stacked output beside the per-sample one (+2 MiB per layer at T = 2048), and the running sums;
a forward+backward's batched boolean mask, copied to float in every layer, and its parameter
``.grad`` (which a group Fisher never makes) are why batches of 4 come out below 1×.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import functools
import gc
import inspect
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

SITES = (
    "attention masks, positions",
    "attention (sdpa, softmax)",
    "loss: logits, log-softmax",
    "activations (forward)",
    "backward: gradients, intermediates",
    "square sums (probe reductions)",
    "engine, other",
)


# --- the workload ---------------------------------------------------------------------------------


def build(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Tensor]]:
    """The model (eval mode, random weights, ``sdpa``) and its right-padded batch."""
    import transformers

    torch.manual_seed(0)
    d, layers, heads, vocab, t = args.d, args.layers, args.heads, args.vocab, args.T
    if args.family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=t,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa",
        )  # fmt: skip
        model: nn.Module = transformers.LlamaForCausalLM(config)
    elif args.family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_embd=d, n_layer=layers, n_head=heads, n_positions=t, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, attn_implementation="sdpa",
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(
            vocab_size=vocab, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=t, attn_implementation="sdpa",
        )  # fmt: skip
        model = transformers.BertForMaskedLM(config)
    model = model.to(getattr(torch, args.dtype)).eval()
    ids = torch.randint(3, vocab, (args.B, t))
    lengths = torch.tensor([t - i * (t // 8) for i in range(args.B)])
    mask = (torch.arange(t) < lengths.unsqueeze(1)).long()
    batch = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    if args.family == "bert":  # 15% of the real tokens are labelled
        chosen = (torch.rand(args.B, t) < 0.15) & (mask == 1)
        batch["labels"] = torch.where(chosen, ids, torch.full_like(ids, -100))
    return model.to(args.device), {k: v.to(args.device) for k, v in batch.items()}


def summed_loss(family: str, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``Σ_b L_b`` of the batch, as ``fisherfunc.hf`` defines ``L_b`` (causal or masked LM)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits
    if family == "bert":
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum")
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")
    return (nll * (mask[:, :-1] * mask[:, 1:])).sum()


def method_call(args: argparse.Namespace, method: str, model: nn.Module, batch: dict[str, Tensor]) -> Any:
    """The callable a child measures."""
    import fisherfunc as ff

    if method.startswith("forward+backward"):
        data = {k: v[:1] for k, v in batch.items()} if method.endswith("one sample") else batch

        def forward_backward() -> None:
            summed_loss(args.family, model, data).backward()
            model.zero_grad(set_to_none=True)

        return forward_backward
    loss = ff.hf.masked_lm(model) if args.family == "bert" else ff.hf.causal_lm(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    spec = ff.infer_spec(model)
    low = args.dtype != "float32" and "precision" in inspect.signature(ff.accumulate).parameters
    extra = {"precision": "model"} if low else {}  # the model's own dtype, float32 squares and sums
    return functools.partial(ff.accumulate, loss, params, batch, spec=spec, chunk_size=args.chunk_size, **extra)


# --- measures --------------------------------------------------------------------------------------


def _trim() -> None:
    """Return the C allocator's free memory to the system (glibc), so a high-water mark starts clean."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


_REDUCTIONS = ("_reducer", "_square_sums", "_factors", "_site_sums", "_site_parts", "_contract", "_embedding_d")
_ATTENTION = ("sdpa_attention_forward", "eager_attention_forward", "scaled_dot_product_attention")
_LOSS = ("cross_entropy", "_token_sum", "nll")


def _site(frames: list[tuple[str, str]]) -> str:
    """The site of an allocation: the first frame of its Python stack (innermost first) that names one."""
    for path, function in frames:
        if path.endswith("hf/_masks.py"):
            return "attention masks, positions"
        if path.endswith("group_sums.py") and function in _REDUCTIONS:
            return "square sums (probe reductions)"
        if "torch/autograd" in path and function in ("backward", "grad", "_engine_run_backward"):
            return "backward: gradients, intermediates"
        if function in _LOSS:
            return "loss: logits, log-softmax"
        if function in _ATTENTION:
            return "attention (sdpa, softmax)"
        if "/transformers/" in path:
            return "activations (forward)"
    return "engine, other"


class Sites(TorchDispatchMode):
    """Live tensor storage bytes by site; at the peak, a copy of the per-site counts."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[int, str]] = {}
        self.by_site: collections.Counter[str] = collections.Counter()
        self.current = self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.keep: list[Any] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs: set[int] | None = None
        for leaf in optree.tree_leaves(out):
            if not isinstance(leaf, Tensor) or type(leaf) not in (Tensor, nn.Parameter) or leaf.is_meta:
                continue
            storage = leaf.untyped_storage()
            key = storage._cdata
            if key in self.live:
                continue
            if inputs is None:
                leaves = optree.tree_leaves((args, kwargs or {}))  # type: ignore[arg-type]
                inputs = {x.untyped_storage()._cdata for x in leaves if isinstance(x, Tensor) and not x.is_meta}
            if key in inputs:
                continue
            self._add(storage, key, self._where())
        return out

    @staticmethod
    def _where() -> str:
        frames, frame = [], sys._getframe(2)
        while frame is not None:
            frames.append((frame.f_code.co_filename, frame.f_code.co_name))
            frame = frame.f_back
        return _site(frames)

    def _add(self, storage: torch.UntypedStorage, key: int, site: str) -> None:
        size = storage.nbytes()
        self.live[key] = (size, site)
        self.keep.append(weakref.ref(storage, functools.partial(self._free, key)))
        self._change(site, size)

    def _free(self, key: int, _ref: Any = None) -> None:
        held = self.live.pop(key, None)
        if held is not None:
            self._change(held[1], -held[0])

    def _change(self, site: str, delta: int) -> None:
        self.current += delta
        self.by_site[site] += delta
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = dict(self.by_site)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One method in this (fresh) process: VmHWM of a cold call, then the per-site peak of a second."""
    torch.set_num_threads(args.threads)
    model, batch = build(args)
    call = method_call(args, args.child, model, batch)
    result: dict[str, Any] = {}
    cuda = args.device.startswith("cuda")
    for run in ("cold", "warm"):  # a first call, then a second once the allocator gave back what it kept
        gc.collect()
        if cuda:  # the caching allocator's own account: the peak of allocated bytes
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            result[run] = torch.cuda.max_memory_allocated() - base
            continue
        _trim()
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS")
        call()
        result[run] = (_status_kib("VmHWM") - base) * 1024
    if not args.no_sites:
        gc.collect()
        sites = Sites()
        with sites:
            call()
        result.update(live=sites.peak, sites=dict(sites.at_peak))
    return result


def run_child(args: argparse.Namespace, method: str) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", method, *sys.argv[1:]]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if not args.glibc_default:  # every block of 128 KiB or more is its own mapping, unmapped when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(args: argparse.Namespace) -> str:
    """The per-site table of both methods (MiB) and the ratios."""
    one = args.chunk_size == 1
    base = "forward+backward, one sample" if one else "forward+backward"
    fisher = f"ff.fisher chunk_size={args.chunk_size}" if args.chunk_size else "ff.fisher"
    got = {base: run_child(args, base), fisher: run_child(args, fisher)}
    mib = 2**20
    lines = [
        f"{args.family}: {args.layers} layers d={args.d} heads={args.heads} V={args.vocab} {args.dtype} sdpa "
        f"T={args.T} B={args.B} right-padded",
        f"| site | {base} | {fisher} |",
        "|---|---|---|",
    ]
    if not args.no_sites:
        for site in SITES:
            a, b = (got[m]["sites"].get(site, 0) / mib for m in (base, fisher))
            if a or b:
                lines.append(f"| {site} | {a:.1f} MiB | {b:.1f} MiB |")
        a, b = got[base]["live"] / mib, got[fisher]["live"] / mib
        lines.append(f"| **live tensor bytes at the peak** | {a:.1f} MiB | {b:.1f} MiB ({b / a:.2f}×) |")
    measure = "CUDA peak allocated" if args.device.startswith("cuda") else "VmHWM"
    for run, when in (("cold", "first call"), ("warm", "second call")):
        a, b = got[base][run] / mib, got[fisher][run] / mib
        lines.append(f"| **{measure} above the loaded model, {when}** | {a:.1f} MiB | {b:.1f} MiB ({b / a:.2f}×) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("llama", "gpt2", "bert"), default="llama")
    parser.add_argument("--T", type=int, default=512)
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (VmHWM) or cuda (torch.cuda.max_memory_allocated)")
    parser.add_argument("--no-sites", action="store_true", help="VmHWM only (no per-site accounting)")
    parser.add_argument("--glibc-default", action="store_true", help="glibc's dynamic mmap threshold (see above)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    print(table(args))


if __name__ == "__main__":
    main()
