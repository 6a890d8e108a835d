"""Time and check group Fisher against a forward+backward, a naive loop and the peer libraries.

For each workload, in one process: every method runs on the same model and batch; results are
checked against the naive per-sample ``torch.autograd`` loop first (a peer that disagrees or
silently skips parameters is reported); then methods are timed **interleaved** within each repeat,
in a random (seeded) order per repeat (so machine drift hits all alike, and no method always runs
right after the same one: on the CPU the call after a forward+backward measured up to 0.4 ms slower
than the same call elsewhere in the order), and the median over repeats is reported as a ratio to the
forward+backward median. With ``--memory``, each method also runs in a fresh subprocess that
reports its peak memory increase over the set-up model and batch, again as a ratio to a
forward+backward's: the tensors' bytes at their peak (CUDA: peak allocated; CPU: the same count
by fisherfunc's ``LiveBytes``) and, on CPU, the peak resident set (tensors plus the allocator's
overhead and kernels' scratch).

    python benchmarks/run.py                           # CPU workloads, markdown on stdout
    python benchmarks/run.py --workloads mlp --repeats 5 --memory
    python benchmarks/run.py --device cuda --workloads gpu-encoder
    python benchmarks/run.py --workloads llm llm-bf16 --repeats 5 --memory   # Llama-shaped LMs (llm.py)
    python benchmarks/run.py --device cuda --workloads llm-1b --memory        # ~1B parameters, bf16

The language-model workloads (``llm``, ``llm-bf16``, ``llm-1b``; see ``llm.py``) run their own
methods: per step, one-shot, one-sample chunks and (bf16) the ``precision="model"`` policy, each
a ratio to a forward+backward of the same batch (one-sample chunks' memory: of the longest sample
alone), checked against a naive float64 loop over the unpadded samples.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import functools
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch import nn

import fisherfunc as ff
from fisherfunc._engine import group_sums

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm  # noqa: E402
from peers import PEERS  # noqa: E402


@dataclass
class Workload:
    """A model, one batch, fisherfunc's per-sample loss and plain-torch losses for the others.

    ``batch_loss(model, batch)`` is the summed loss (forward+backward, BackPACK, Opacus, naive
    loop on one-sample slices); ``per_sample_losses(model, batch)`` is ``[B]`` (nngeometry).
    """

    name: str
    model: nn.Module
    batch: Any  # a tuple of tensors, or a dict (Hugging Face workloads)
    loss: Any
    batch_loss: Callable[[nn.Module, Any], torch.Tensor]
    per_sample_losses: Callable[[nn.Module, Any], torch.Tensor]
    shape: llm.LlamaShape | None = None  # a language-model workload: llm.py's methods and checks


class TinyLM(nn.Module):
    """Embedding + ``layers`` pre-LN ``nn.TransformerEncoderLayer`` s + a linear head."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.Sequential(
            *[
                nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
                for _ in range(layers)
            ]
        )
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.embed(ids)))


def _classification(name: str, model: nn.Module, x: torch.Tensor, classes: int) -> Workload:
    y = torch.randint(0, classes, (x.shape[0],), device=x.device)
    return Workload(
        name,
        model,
        (x, y),
        ff.losses.classification(model),
        lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="sum"),
        lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
    )


def _causal_lm(name: str, model: nn.Module, ids: torch.Tensor) -> Workload:
    # position t predicts token t + 1; per-sample loss = sum over the sequence
    def per_sample(m: nn.Module, b: Any) -> torch.Tensor:
        logits = m(b[0])[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2), b[0][:, 1:], reduction="none").sum(1)

    return Workload(
        name,
        model,
        (ids,),
        ff.losses.causal_lm(model),
        lambda m, b: F.cross_entropy(m(b[0])[:, :-1].transpose(1, 2), b[0][:, 1:], reduction="sum"),
        per_sample,
    )


def _gpt2(name: str, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Workload:
    # a right-padded batch with a per-sample attention mask: position t − 1 predicts token t, and
    # the target counts when both are real tokens (fisherfunc.hf.causal_lm's L_b); every method
    # gets the same padded batch and the same summed loss
    def per_sample(m: nn.Module, b: Any) -> torch.Tensor:
        ids, mask = b["input_ids"], b["attention_mask"]
        logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1]
        valid = mask[:, :-1] * mask[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return (nll * valid).sum(1)

    return Workload(
        name,
        model,
        {"input_ids": ids, "attention_mask": mask},
        ff.hf.causal_lm(model),
        lambda m, b: per_sample(m, b).sum(),
        per_sample,
    )


def workloads(device: torch.device) -> dict[str, Callable[[], Workload]]:
    """Workload builders by key (built lazily, seeded)."""

    def mlp() -> Workload:
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        return _classification("MLP 784-512-512-10, B=128", model.to(device), torch.randn(128, 784, device=device), 10)

    def cnn() -> Workload:
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
        )  # fmt: skip
        x = torch.randn(64, 3, 32, 32, device=device)
        return _classification("CNN conv(32,64)+linear, 3x32x32, B=64", model.to(device), x, 10)

    def transformer() -> Workload:
        model = TinyLM(1000, 256, 4).to(device).eval()
        ids = torch.randint(0, 1000, (16, 64), device=device)
        return _causal_lm("Embedding + pre-LN layer d=256, 4 heads, T=64, B=16", model, ids)

    def encoder() -> Workload:
        layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
        model = nn.Sequential(layer, nn.Flatten(), nn.Linear(128 * 32, 10)).to(device).eval()
        x = torch.randn(32, 32, 128, device=device)
        return _classification("nn.TransformerEncoderLayer d=128, 4 heads, T=32, B=32", model, x, 10)

    def gpu_encoder() -> Workload:
        model = TinyLM(8192, 768, 12, layers=12).to(device).eval()
        ids = torch.randint(0, 8192, (32, 256), device=device)
        return _causal_lm("12-layer pre-LN LM d=768, 12 heads, T=256, B=32", model, ids)

    def gpt2() -> Workload:
        import transformers

        config = transformers.GPT2Config(
            vocab_size=2000, n_positions=128, n_embd=256, n_layer=2, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=1,
            attn_implementation="sdpa",
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config).to(device).eval()
        ids = torch.randint(1, 2000, (8, 128), device=device)
        lengths = torch.tensor([128, 120, 112, 96, 80, 64, 48, 32], device=device)
        mask = (torch.arange(128, device=device) < lengths.unsqueeze(1)).long()
        name = "HF GPT-2 2 layers d=256, 4 heads, V=2000, T=128 right-padded, B=8"
        return _gpt2(name, model, ids.masked_fill(mask == 0, 0), mask)

    def language_model(key: str) -> Callable[[], Workload]:
        def make() -> Workload:
            shape = llm.SHAPES[key]
            model, batch = llm.build(shape, device)
            return Workload(shape.name(), model, batch, None, llm.summed_loss, _no_per_sample, shape)

        return make

    return {
        "mlp": mlp,
        "cnn": cnn,
        "transformer": transformer,
        "encoder": encoder,
        "gpt2": gpt2,
        "gpu-encoder": gpu_encoder,
        **{key: language_model(key) for key in llm.SHAPES},
    }


def _no_per_sample(model: nn.Module, batch: Any) -> torch.Tensor:
    raise NotImplementedError("the language-model workloads run no peers")


# --- methods ---------------------------------------------------------------------------------------


def _naive(w: Workload) -> dict[str, torch.Tensor]:
    params = dict(w.model.named_parameters())
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(optree.tree_leaves(w.batch)[0].shape[0]):
        sample = optree.tree_map(lambda t: t[i : i + 1], w.batch)  # noqa: B023 - used at once
        for k, g in zip(params, torch.autograd.grad(w.batch_loss(w.model, sample), list(params.values()))):
            out[k] += g.square()
    return out


def shuffled_repeats(names: list[str], repeats: int, seed: int = 0) -> Iterator[str]:
    """The methods' names, ``repeats`` times, each repeat in a fresh random order (seeded).

    Interleaving spreads machine drift over every method alike; shuffling each repeat keeps any
    method from always following the same one (a call right after a forward+backward runs with
    the caches that one left).
    """
    rng = random.Random(seed)
    for _ in range(repeats):
        order = list(names)
        rng.shuffle(order)
        yield from order


def _forward_backward(w: Workload) -> None:
    w.model.zero_grad(set_to_none=True)
    w.batch_loss(w.model, w.batch).backward()


def methods(
    w: Workload, max_memory: str | None = None
) -> tuple[dict[str, Callable[[], Any]], dict[str, str], dict[str, str]]:
    """Callables to time, the methods that could not run (and why), and each method's memory baseline.

    Times are ratios to the forward+backward; peak memory to the baseline method (the
    forward+backward, or for the language models' one-sample chunks a one-sample forward+backward).
    """
    if w.shape is not None:
        return llm.methods(w.model, w.batch, w.shape, max_memory=max_memory)
    fns, failed = _general_methods(w)
    return fns, failed, {m: "forward+backward" for m in fns}


def _discovering(w: Workload, params: dict[str, torch.Tensor], spec: Any) -> Any:
    """A one-shot call that finds no sites kept (the memos emptied first): it discovers them."""
    group_sums._ONE_SHOT.clear()
    return ff.accumulate(w.loss, params, w.batch, spec=spec)


def _general_methods(w: Workload) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """Callables to time (fisherfunc's and each peer that sets up) and the peers that could not."""
    params = {k: v.detach() for k, v in w.model.named_parameters()}
    spec = ff.infer_spec(w.model)
    out: dict[str, Callable[[], Any]] = {
        "forward+backward": lambda: _forward_backward(w),
        "naive per-sample loop": lambda: _naive(w),
        # one-shot calls keep the discovered sites per loss: the second call on reuses them ...
        "fisherfunc group (auto: probes)": lambda: ff.accumulate(w.loss, params, w.batch, spec=spec),
        # ... a loss built anew for every call finds them too (kept on the model, by the loss's options) ...
        "fisherfunc group, loss built anew each call": lambda: ff.accumulate(
            copy.copy(w.loss), params, w.batch, spec=spec
        ),
        # ... and a call that finds nothing kept pays discovery (one sample's forward)
        "fisherfunc group, nothing kept (discovers)": functools.partial(_discovering, w, params, spec),
        "fisherfunc group (direct vmap(grad))": lambda: ff.accumulate(
            w.loss, params, w.batch, spec=spec, path="direct"
        ),
        "fisherfunc elementwise (auto)": lambda: ff.accumulate(w.loss, params, w.batch, spec=ff.Elementwise()),
    }
    # a training loop's steady state: the whole fisher_step call (EMA update included), from its
    # second call on (the step keeps the discovered probe sites); checked on the batch's sums
    step = ff.make_fisher_step(w.loss, spec=spec)
    state = step.init(params)

    def fisher_step() -> Any:
        return step(params, w.batch, state)

    fisher_step.check = lambda: step.batch_sums(params, w.batch, state)  # type: ignore[attr-defined]
    out["fisherfunc group (fisher_step, sites kept)"] = fisher_step
    failed: dict[str, str] = {}
    for name, (adapter, takes) in PEERS.items():
        try:
            out[name] = adapter(w.model, w.batch, w.batch_loss if takes == "batch" else w.per_sample_losses)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot even set up is a result
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}" if str(exc) else type(exc).__name__
    return out, failed


def check(name: str, fn: Callable[[], Any], reference: dict[str, torch.Tensor], spec: dict[str, ff.Rule]) -> str:
    """Compare a method's ``Σ_b g_b²`` with the naive loop's; say what differs or is missing."""
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001
        return f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
    if name.startswith("fisherfunc"):
        result = result.sums
        if "group" in name:  # the reference summed into the same groups
            reference = {k: spec[k].reduce(v) for k, v in reference.items()}
    if not isinstance(result, dict):
        return "ok"
    missing = [k for k in reference if k not in result]
    worst = max(
        (float((result[k] - reference[k]).abs().max() / reference[k].abs().max().clamp_min(1e-30)) for k in result),
        default=0.0,
    )
    verdict = f"max rel. error {worst:.1e}" + (" (DISAGREES)" if worst > 1e-3 else "")
    if missing:
        verdict += f"; skips {len(missing)} of {len(reference)} tensors"
    return verdict


#: The memory probes' glibc maps every allocation of 128 KiB or more on its own and unmaps it when
#: freed, so the resident set follows the live tensors (by default freed blocks stay in the heap and
#: the high-water mark measures fragmentation: 1.3-1.7x the tensors on the language models).
RESIDENT_FOLLOWS_TENSORS = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _minor_faults() -> int:
    """The process's minor page faults so far: pages the kernel mapped in on first touch.

    A CPU allocation that glibc serves with fresh pages (a large block, or after it returned freed
    memory to the kernel) costs one fault per 4 KiB page when first written, whatever the method;
    the count per call shows how much of a method's time is that (benchmarks/README.md).
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


#: A method that faults in more than this many fresh pages per call (10 MiB) is timed apart, see _faulting.
HEAVY_FAULTS = 2560


def _faulting(timed: dict[str, Callable[[], Any]]) -> list[str]:
    """The methods whose every call (two, after a warm-up) faults in more than :data:`HEAVY_FAULTS` fresh pages.

    Methods that materialise every per-sample gradient (hundreds of MiB a call, which glibc maps
    fresh and hands back to the kernel) leave the machine's caches and the kernel's page state to
    whatever runs next: measured on the MLP, interleaving them with the rest spent 17 s in the
    kernel against 0.05 s without them, and moved the forward+backward and every fast method's
    time by 5-20%. They are timed in a second interleaved group with a forward+backward of their
    own, which their ratios divide by (benchmarks/README.md).
    """
    heavy = []
    for m, fn in timed.items():
        if m == "forward+backward":
            continue
        counts = []
        for _ in range(2):  # a method that faults on every call (one call may follow another's frees)
            f0 = _minor_faults()
            fn()
            counts.append(_minor_faults() - f0)
        if min(counts) > HEAVY_FAULTS:
            heavy.append(m)
    return heavy


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_freed_pages() -> None:
    """Return the pages glibc's allocator keeps after ``free`` to the system (``malloc_trim(0)``).

    Without it the warm-up's freed activations stay resident, the measured run reuses them, and
    ``VmHWM − VmRSS`` reads less than the run allocates (a fraction of it at language-model sizes).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the coarser reading
        pass


def memory_probe(workload: str, method: str, device: torch.device, max_memory: str | None = None) -> None:
    """Print the peak memory increases (bytes) of one method over its set-up model and batch.

    Runs in a fresh process: set up, warm up once, then reset the peak counter and run again.
    ``peak_tensors``: the bytes of tensors allocated by the run, at their peak — CUDA:
    ``max_memory_allocated`` over ``memory_allocated`` before the run; CPU: fisherfunc's
    ``LiveBytes`` count (the same quantity: storages allocated and not yet freed; one more run).
    ``peak_increase``: CPU (Linux) only, the resident-set high-water mark ``VmHWM``, reset by
    writing 5 to ``/proc/self/clear_refs``, over ``VmRSS`` before the run, after the allocator
    returned the warm-up's freed pages: tensors plus the allocator's overhead and kernels' scratch
    (``main`` runs the probes with :data:`RESIDENT_FOLLOWS_TENSORS`).
    """
    torch.manual_seed(0)
    w = workloads(device)[workload]()
    fns, _, _ = methods(w, max_memory)
    fn = fns[method]
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        peak = tensors = torch.cuda.max_memory_allocated(device) - base
    else:
        _release_freed_pages()
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS")
        fn()
        peak = (_status_kib("VmHWM") - base) * 1024
        from fisherfunc._engine.memory import LiveBytes

        with LiveBytes() as live:
            fn()
        tensors = live.peak
    print(json.dumps({"peak_increase": peak, "peak_tensors": tensors}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="*", default=["mlp", "cnn", "transformer", "encoder"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (one subprocess per method)")
    parser.add_argument(
        "--max-memory", default=None, help='language models: also run ff.fisher with this budget, e.g. "1GiB"'
    )
    parser.add_argument("--probe", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.probe:
        memory_probe(args.probe[0], args.probe[1], device, args.max_memory)
        return

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"{datetime.date.today()}, torch {torch.__version__}, {name}, {torch.get_num_threads()} CPU threads\n")
    print(
        "| workload | method | median ms | × fwd+bwd | page faults / call | peak tensors +MiB | × baseline "
        "| peak RSS +MiB | × baseline | check vs naive loop |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    modelled: list[str] = []  # the memory model's rows (language models), printed after the table
    for key in args.workloads:
        torch.manual_seed(0)
        w = workloads(device)[key]()
        fns, failed, baselines = methods(w, args.max_memory)
        if w.shape is not None:
            verdicts = llm.verdicts(w.model, w.batch, w.shape, fns)
        else:
            reference = _naive(w)
            spec = ff.infer_spec(w.model)
            verdicts = {
                m: check(m, getattr(fn, "check", fn), reference, spec)
                for m, fn in fns.items()
                if m != "forward+backward"
            }
        timed = {m: fn for m, fn in fns.items() if not verdicts.get(m, "").startswith("fails")}
        times: dict[str, list[float]] = {m: [] for m in timed}
        faults: dict[str, list[int]] = {m: [] for m in timed}
        for fn in timed.values():  # warm-up
            fn()
        heavy = _faulting(timed)
        groups = [[m for m in timed if m not in heavy]] + ([["forward+backward", *heavy]] if heavy else [])
        heavy_base: list[float] = []  # the forward+backward's times among the faulting methods
        for group in groups:
            for m in shuffled_repeats(group, args.repeats):
                fn = timed[m]
                sync()
                f0, t0 = _minor_faults(), time.perf_counter()
                fn()
                sync()
                elapsed = time.perf_counter() - t0
                if m == "forward+backward" and group is not groups[0]:
                    heavy_base.append(elapsed)
                else:
                    times[m].append(elapsed)
                    faults[m].append(_minor_faults() - f0)
        memory: dict[str, dict[str, float]] = {}
        if args.memory:
            for m in timed:
                cmd = [sys.executable, __file__, "--device", args.device, "--probe", key, m]
                cmd += ["--threads", str(torch.get_num_threads())]
                cmd += ["--max-memory", args.max_memory] if args.max_memory else []
                env = {**os.environ, **RESIDENT_FOLLOWS_TENSORS}
                res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                memory[m] = json.loads(res.stdout.strip().splitlines()[-1])
        bases = {m: statistics.median(heavy_base if m in heavy else times["forward+backward"]) for m in times}
        order = [m for m in fns if m not in heavy] + (["forward+backward, timed with them", *heavy] if heavy else [])
        for m in order:
            if m == "forward+backward, timed with them":
                label = f"forward+backward, timed with the {len(heavy)} methods below"
                cells = [f"{statistics.median(heavy_base) * 1e3:.1f}", "1.00×", "—", "—", "—", "—", "—"]
                print("| " + " | ".join([w.name, label, *cells, "their baseline (timed apart)"]) + " |", flush=True)
                continue
            if m not in times:
                print(f"| {w.name} | {m} | — | — | — | — | — | — | — | {verdicts[m]} |")
                continue
            med, base = statistics.median(times[m]), bases[m]
            cells = []
            for field in ("peak_tensors", "peak_increase"):
                if not memory:
                    cells += ["—", "—"]
                    continue
                ratio = f"{memory[m][field] / max(memory[baselines[m]][field], 1):.2f}×"
                if baselines[m] != "forward+backward":
                    ratio += f" ({baselines[m].removeprefix('forward+backward, ')})"
                cells += [f"{memory[m][field] / 2**20:.0f}", ratio]
            verdict = verdicts.get(m, "baseline" if baselines[m] == m else "—")
            paged = f"{statistics.median(faults[m]):.0f}"
            row = [w.name, m, f"{med * 1e3:.1f}", f"{med / base:.2f}×", paged, *cells, verdict]
            print("| " + " | ".join(row) + " |", flush=True)
        for m, why in failed.items():
            print(f"| {w.name} | {m} | — | — | — | — | — | — | — | not run: {why} |", flush=True)
        if w.shape is not None and memory:
            for m, bytes_ in llm.predictions(w.shape).items():
                if m in memory:
                    tensors, rss = memory[m]["peak_tensors"], memory[m]["peak_increase"]
                    modelled.append(
                        f"| {w.shape.label} | {m} | {bytes_ / 2**20:.0f} | {tensors / 2**20:.0f} | "
                        f"{bytes_ / max(tensors, 1):.2f} | {rss / 2**20:.0f} | {bytes_ / max(rss, 1):.2f} |"
                    )
    if modelled:
        print("\nThe memory model (docs/scale.md, benchmarks/llm.py: predictions) against the measured peaks\n")
        print("| workload | method | predicted MiB | tensors MiB | predicted / tensors | RSS MiB | predicted / RSS |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(modelled))


if __name__ == "__main__":
    main()
