"""Time group Fisher against a plain forward+backward of the same batch, side by side.

Every method runs on the same model and batch in one process; methods are interleaved within
each repeat (so drift affects all alike) and the median over repeats is reported, as a ratio to
the forward+backward median. fisherfunc's results are checked against the naive per-sample loop
before timing.

    python benchmarks/run.py                  # all CPU workloads, markdown table on stdout
    python benchmarks/run.py --workloads mlp --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fisherfunc as ff


@dataclass
class Workload:
    name: str
    model: nn.Module
    batch: tuple[torch.Tensor, torch.Tensor]
    loss: Any
    batch_loss: Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    sample_loss: Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor], int], torch.Tensor]


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(ids)))


def _classification(name: str, model: nn.Module, x: torch.Tensor, classes: int) -> Workload:
    y = torch.randint(0, classes, (x.shape[0],))
    return Workload(
        name,
        model,
        (x, y),
        ff.losses.classification(model),
        lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="sum"),
        lambda m, b, i: F.cross_entropy(m(b[0][i : i + 1]), b[1][i : i + 1], reduction="sum"),
    )


def workloads() -> dict[str, Callable[[], Workload]]:
    def mlp() -> Workload:
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        return _classification("MLP 784-512-512-10, B=128", model, torch.randn(128, 784), 10)

    def cnn() -> Workload:
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 10),
        )
        return _classification("CNN conv(32,64)+linear, 3x32x32, B=64", model, torch.randn(64, 3, 32, 32), 10)

    def transformer() -> Workload:
        vocab = 1000
        model = TinyLM(vocab, 256, 4).eval()
        ids = torch.randint(0, vocab, (16, 64))
        return Workload(
            "Embedding + pre-LN layer d=256, 4 heads, T=64, B=16",
            model,
            (ids, ids),
            ff.losses.causal_lm(model),
            lambda m, b: F.cross_entropy(m(b[0])[:, :-1].reshape(-1, vocab), b[0][:, 1:].reshape(-1), reduction="sum"),
            lambda m, b, i: F.cross_entropy(m(b[0][i : i + 1])[0, :-1], b[0][i, 1:], reduction="sum"),
        )

    return {"mlp": mlp, "cnn": cnn, "transformer": transformer}


def forward_backward(w: Workload) -> None:
    w.model.zero_grad(set_to_none=True)
    w.batch_loss(w.model, w.batch).backward()


def naive_loop(w: Workload) -> dict[str, torch.Tensor]:
    params = dict(w.model.named_parameters())
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(w.batch[0].shape[0]):
        grads = torch.autograd.grad(w.sample_loss(w.model, w.batch, i), list(params.values()))
        for k, g in zip(params, grads):
            out[k] += g.square()
    return out


def _methods(w: Workload, params: dict[str, torch.Tensor], spec: Any) -> dict[str, Callable[[], Any]]:
    return {
        "forward+backward": lambda: forward_backward(w),
        "naive per-sample loop": lambda: naive_loop(w),
        "fisherfunc group, auto (probes)": lambda: ff.accumulate(w.loss, params, w.batch, spec=spec),
        "fisherfunc group, direct vmap(grad)": lambda: ff.accumulate(w.loss, params, w.batch, spec=spec, path="direct"),
        "fisherfunc elementwise, auto": lambda: ff.accumulate(w.loss, params, w.batch, spec=ff.Elementwise()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="*", default=list(workloads()))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("\n| workload | method | median ms | × forward+backward |\n|---|---|---|---|")
    for key in args.workloads:
        w = workloads()[key]()
        params = {k: v.detach() for k, v in w.model.named_parameters()}
        spec_group = ff.infer_spec(w.model)
        methods = _methods(w, params, spec_group)
        # correctness first: elementwise sums against the naive loop
        ref = naive_loop(w)
        worst = 0.0
        for path in ("auto", "direct"):
            got = ff.accumulate(w.loss, params, w.batch, spec=ff.Elementwise(), path=path).sums
            worst = max([worst] + [float((got[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref])
        assert worst < 1e-4, f"{w.name}: fisherfunc disagrees with the naive loop (rel. error {worst:.2e})"
        times: dict[str, list[float]] = {m: [] for m in methods}
        for fn in methods.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for m, fn in methods.items():
                t0 = time.perf_counter()
                fn()
                times[m].append(time.perf_counter() - t0)
        base = statistics.median(times["forward+backward"])
        for m, ts in times.items():
            med = statistics.median(ts)
            print(f"| {w.name} | {m} | {med * 1e3:.1f} | {med / base:.2f}× |")
        print(f"| {w.name} | (check) max rel. error vs naive loop | {worst:.1e} | |")


if __name__ == "__main__":
    main()
