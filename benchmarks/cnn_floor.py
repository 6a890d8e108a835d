"""How fast can any ``vmap``-based exact per-sample method be on the CNN workload? A measured floor.

The CNN of ``run.py`` (two 3×3 convolutions, max-pooling, a linear head; B = 64, 3×32×32) is the one
workload where ``fisher_step`` stays above 1.2× a forward+backward on the CPU. This script measures,
interleaved within each repeat and as ratios to the same forward+backward:

- **backbone**: ``vmap(grad)`` of the per-sample loss with respect to the *biases only* — it forms
  every per-sample output gradient (a bias gradient is the spatial sum of one) and no weight
  gradient: the part of the work any exact per-sample method built on ``vmap`` must do;
- **per-sample conv weight gradients**: for each convolution, ``G_b = Σ_t d_bt ⊗ patches(x_b)_t`` on
  tensors of the layer's shapes, by torch's two fastest forms on a CPU — the grouped convolution
  backward ``vmap`` runs (64 groups) and a convolution of the inputs with the output gradients as
  kernels — the faster of the two counted (the batch's weight gradient beside them);
- **floor** = backbone + the per-sample conv weight gradients (the linear head's per-sample gradients
  and every square and sum left out, so it is a lower bound);
- the hand-written direct path (``vmap(grad)`` of every parameter, squared, summed per output
  channel) and fisherfunc's ``fisher_step``, for comparison.

Command: ``python benchmarks/cnn_floor.py --repeats 21 --threads 1``
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import run  # benchmarks/run.py: the workloads
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import fisherfunc as ff


def _grouped(x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients ``[B, O, C, k, k]`` by the grouped convolution backward (``vmap``'s rule)."""
    b = x.shape[0]
    xg, dg = x.reshape(1, -1, *x.shape[2:]), d.reshape(1, -1, *d.shape[2:])
    wg = weight.repeat(b, 1, 1, 1)
    _, gw, _ = torch.ops.aten.convolution_backward(
        dg, xg, wg, None, [1, 1], [1, 1], [1, 1], False, [0, 0], b, [False, True, False]
    )
    return gw.reshape(b, *weight.shape)


def _batch(x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The batch's weight gradient ``[O, C, k, k]`` (what a forward+backward computes for the layer)."""
    _, gw, _ = torch.ops.aten.convolution_backward(
        d, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )
    return gw


def _as_convolution(x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same gradients as a convolution: the inputs ``[C, B, H, W]`` correlated with ``d_b`` as kernels."""
    b, o = d.shape[:2]
    out = F.conv2d(x.transpose(0, 1), d.reshape(b * o, 1, *d.shape[2:]), padding=1, groups=b)  # [C, B·O, k, k]
    return out.reshape(x.shape[1], b, o, *weight.shape[2:]).permute(1, 2, 0, 3, 4).contiguous()


def measure(repeats: int) -> list[tuple[str, float]]:
    """``(row, median ms)`` for each row of the table."""
    torch.manual_seed(0)
    w = run.workloads(torch.device("cpu"))["cnn"]()
    model = w.model
    x, y = w.batch
    params = {k: v.detach() for k, v in model.named_parameters()}

    def per_sample_loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xb[None],)), yb[None], reduction="sum")

    biases = {k: v for k, v in params.items() if k.endswith("bias")}
    weights = {k: v for k, v in params.items() if not k.endswith("bias")}

    def backbone() -> object:
        def loss_of_biases(b: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return per_sample_loss({**weights, **b}, xb, yb)

        return vmap(grad(loss_of_biases), in_dims=(None, 0, 0))(biases, x, y)

    def direct() -> object:
        g = vmap(grad(per_sample_loss), in_dims=(None, 0, 0))(params, x, y)
        return {k: v.square().reshape(v.shape[0], v.shape[1], -1).sum((0, 2)) for k, v in g.items()}

    # the convolutions' inputs, and output gradients of their shapes
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    inputs: list[torch.Tensor] = []
    h = x
    for m in model:
        if isinstance(m, torch.nn.Conv2d):
            inputs.append(h)
        h = m(h).detach()
    layers = []
    for conv, xin in zip(convs, inputs):
        d = torch.randn(xin.shape[0], conv.out_channels, *xin.shape[2:])
        a, b = _grouped(xin, d, conv.weight.detach()), _as_convolution(xin, d, conv.weight.detach())
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max())), "the two forms disagree"
        layers.append((conv, xin, d))

    step = ff.make_fisher_step(w.loss, spec=ff.infer_spec(model))
    state = step.init(params)
    fns: dict[str, Callable[[], object]] = {"forward+backward": lambda: run._forward_backward(w)}
    fns["backbone: vmap(grad) of the biases only"] = backbone
    for i, (conv, xin, d) in enumerate(layers):
        cw = conv.weight.detach()
        fns[f"conv{i + 1} batch weight gradient (for comparison)"] = functools.partial(_batch, xin, d, cw)
        fns[f"conv{i + 1} per-sample weight gradients, grouped"] = functools.partial(_grouped, xin, d, cw)
        fns[f"conv{i + 1} per-sample weight gradients, as a convolution"] = functools.partial(
            _as_convolution, xin, d, cw
        )
    fns["direct path by hand: vmap(grad) of every parameter, squared, summed"] = direct
    fns["fisherfunc fisher_step"] = lambda: step(params, w.batch, state)
    for f in fns.values():
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for k in run.shuffled_repeats(list(fns), repeats):  # interleaved, in a random order per repeat
        t = time.perf_counter()
        fns[k]()
        times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    floor = med["backbone: vmap(grad) of the biases only"] + sum(
        min(med[f"conv{i + 1} per-sample weight gradients, grouped"],
            med[f"conv{i + 1} per-sample weight gradients, as a convolution"])
        for i in range(len(layers))
    )  # fmt: skip
    rows = list(med.items())
    rows.insert(len(rows) - 2, ("floor: backbone + the faster form of each conv's per-sample weight gradients", floor))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args.repeats)
    fb = rows[0][1]
    print("| part | median ms | × fwd+bwd |")
    print("|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms / fb:.2f}× |")


if __name__ == "__main__":
    main()
