"""Does ``torch.compile`` of the vectorised chunk computation pay? Eager and compiled, side by side.

For each workload of ``run.py``: the per-chunk group Fisher function the engine runs for the batch
(``vmap`` over samples of the ``vjp`` w.r.t. direct leaves and output probes, reduced inside ``vmap``
— ``_engine.group_sums``), eager and through ``torch.compile(fullgraph=False)``, interleaved per
repeat with a plain forward+backward; medians as ratios to it. Before timing, the compiled values
must equal the eager ones (relative error printed); the compile time of the first call is printed.

Command: ``python benchmarks/compiled.py --workloads mlp cnn transformer encoder gpt2 --repeats 11 --threads 1``;
on a GPU add ``--device cuda --mode reduce-overhead`` (CUDA graphs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import run  # benchmarks/run.py: the workloads
import torch

import fisherfunc as ff
from fisherfunc._engine.group_sums import GroupSums
from fisherfunc._estimate import prepare_for, resolve_for

HEADER = (
    "| workload | forward+backward ms | eager chunk ms | × fwd+bwd | compiled chunk ms | × fwd+bwd "
    "| compile s | max rel. diff |"
)


def measure(key: str, repeats: int, device: torch.device, mode: str | None) -> str:
    """One workload's table row."""
    torch.manual_seed(0)
    w = run.workloads(device)[key]()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    params = {k: v.detach() for k, v in w.model.named_parameters()}
    resolved = resolve_for(w.loss, params, ff.infer_spec(w.model))
    prepared = prepare_for(w.loss, params, resolved, "float32")
    eager = GroupSums(w.loss, prepared, resolved, "auto")(w.batch).sums
    compiled = torch.compile(eager, fullgraph=False, dynamic=False, mode=mode)
    start = time.perf_counter()
    got = compiled(w.batch)
    sync()
    compile_s = time.perf_counter() - start
    want = eager(w.batch)
    diff = max(float((g - e).abs().max() / e.abs().max().clamp_min(1e-30)) for g, e in zip(got[0], want[0]))
    assert diff < 1e-4, f"{key}: compiled and eager chunk sums differ by {diff:.1e}"
    fns = {
        "fb": lambda: run._forward_backward(w),
        "eager": lambda: eager(w.batch),
        "compiled": lambda: compiled(w.batch),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return (
        f"| {w.name} | {med['fb']:.1f} | {med['eager']:.1f} | {med['eager'] / med['fb']:.2f}× | "
        f"{med['compiled']:.1f} | {med['compiled'] / med['fb']:.2f}× | {compile_s:.1f} | {diff:.1e} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="*", default=["mlp", "transformer", "encoder"])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", default=None, help='torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)')
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}, torch.compile mode={args.mode}\n")
    print(HEADER)
    print("|---|---|---|---|---|---|---|---|")
    for key in args.workloads:
        print(measure(key, args.repeats, device, args.mode), flush=True)


if __name__ == "__main__":
    main()
