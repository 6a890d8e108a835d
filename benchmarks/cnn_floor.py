"""How fast can any ``vmap``-based exact per-sample method be on the CNN workload? A measured floor.

The CNN of ``run.py`` (two 3×3 convolutions, max-pooling, a linear head; B = 64, 3×32×32) is the one
workload where ``fisher_step`` stays above 1.2× a forward+backward on the CPU. This script measures,
interleaved within each repeat and as ratios to the same forward+backward:

- **backbone**: ``vmap(grad)`` of the per-sample loss with respect to the *biases only* — it forms
  every per-sample output gradient (a bias gradient is the spatial sum of one) and no weight
  gradient: the part of the work any exact per-sample method built on ``vmap`` must do;
- **per-sample conv weight gradients**: for each convolution, ``G_b = Σ_t d_bt ⊗ patches(x_b)_t`` on
  tensors of the layer's shapes, by three forms — the grouped convolution backward ``vmap`` runs
  (64 groups), a convolution of the inputs with the output gradients as kernels, and one batched
  product of the input's patches with the output gradients — the fastest counted (the batch's
  weight gradient beside them);
- **floor** = backbone + the per-sample conv weight gradients (the linear head's per-sample gradients
  and every square and sum left out, so it is a lower bound);
- the hand-written direct path (``vmap(grad)`` of every parameter, squared, summed per output
  channel), the same with the first convolution probed (its per-sample output gradients had from a
  zero probe on its output, its weight's per-sample gradients then formed by the patches form
  outside ``vmap``: what factorising that layer could give at best), and fisherfunc's
  ``fisher_step``, for comparison;
- **per-sample weight gradients by shape**: the grouped and patches forms against the batch's
  weight gradient on five convolution shapes (the CNN's two, a CIFAR first layer, a ResNet stem and
  a ResNet 3×3 layer), each form checked against the grouped one;
- **per call**, the same network on two 3×4×4 images, where every operator takes microseconds: the
  Python and dispatch work of a forward+backward, of ``vmap(grad)`` and of ``fisher_step``, which
  the floor leaves out.

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


def _grouped(x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 1) -> torch.Tensor:
    """Per-sample weight gradients ``[B, O, C, k, k]`` by the grouped convolution backward (``vmap``'s rule)."""
    b = x.shape[0]
    xg, dg = x.reshape(1, -1, *x.shape[2:]), d.reshape(1, -1, *d.shape[2:])
    wg = weight.repeat(b, 1, 1, 1)
    _, gw, _ = torch.ops.aten.convolution_backward(
        dg, xg, wg, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], b, [False, True, False]
    )
    return gw.reshape(b, *weight.shape)


def _batch(x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 1) -> torch.Tensor:
    """The batch's weight gradient ``[O, C, k, k]`` (what a forward+backward computes for the layer)."""
    _, gw, _ = torch.ops.aten.convolution_backward(
        d, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, [False, True, False]
    )
    return gw


def _as_convolution(x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same gradients as a convolution: the inputs ``[C, B, H, W]`` correlated with ``d_b`` as kernels."""
    b, o = d.shape[:2]
    out = F.conv2d(x.transpose(0, 1), d.reshape(b * o, 1, *d.shape[2:]), padding=1, groups=b)  # [C, B·O, k, k]
    return out.reshape(x.shape[1], b, o, *weight.shape[2:]).permute(1, 2, 0, 3, 4).contiguous()


def _as_patches(
    x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 1
) -> torch.Tensor:
    """The same gradients as one batched product: ``G_b = (P_b D_bᵀ)ᵀ``, ``P_b [C·k·k, T]`` the patches, ``D_b [O, T]``.

    The patches are a strided view of the padded input, copied once by the reshape; ``torch.bmm``
    then runs ``B`` products ``[C·k·k, T] × [T, O]``.
    """
    b, c = x.shape[:2]
    o, k, t = d.shape[1], weight.shape[2], d.shape[2] * d.shape[3]
    xp = F.pad(x, (padding,) * 4)
    patches = xp.unfold(2, k, stride).unfold(3, k, stride).permute(0, 1, 4, 5, 2, 3).reshape(b, c * k * k, t)
    g = torch.bmm(patches, d.reshape(b, o, t).transpose(1, 2))  # [B, C·k·k, O]
    return g.transpose(1, 2).reshape(b, o, c, k, k)


#: Convolution shapes for :func:`forms_by_shape`: ``(B, C, O, H, k, stride, padding)``.
SHAPES = {
    "the CNN's conv1: B=64, 3→32, 32×32, 3×3": (64, 3, 32, 32, 3, 1, 1),
    "the CNN's conv2: B=64, 32→64, 16×16, 3×3": (64, 32, 64, 16, 3, 1, 1),
    "CIFAR first layer: B=64, 3→64, 32×32, 3×3": (64, 3, 64, 32, 3, 1, 1),
    "ResNet stem: B=16, 3→64, 224×224, 7×7 stride 2": (16, 3, 64, 224, 7, 2, 3),
    "ResNet 3×3 layer: B=16, 64→64, 56×56": (16, 64, 64, 56, 3, 1, 1),
}


def forms_by_shape(repeats: int) -> list[tuple[str, dict[str, float]]]:
    """Median ms of the batch's weight gradient and the grouped and patches forms, per shape of :data:`SHAPES`."""
    torch.manual_seed(0)
    out = []
    for name, (b, c, o, h, k, stride, padding) in SHAPES.items():
        x, weight = torch.randn(b, c, h, h), torch.randn(o, c, k, k)
        side = (h + 2 * padding - k) // stride + 1
        d = torch.randn(b, o, side, side)
        a, p = _grouped(x, d, weight, stride, padding), _as_patches(x, d, weight, stride, padding)
        assert torch.allclose(a, p, rtol=1e-4, atol=1e-4 * float(a.abs().max())), f"the forms disagree on {name}"
        fns = {
            "batch": functools.partial(_batch, x, d, weight, stride, padding),
            "grouped": functools.partial(_grouped, x, d, weight, stride, padding),
            "patches": functools.partial(_as_patches, x, d, weight, stride, padding),
        }
        for f in fns.values():
            f()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for key in run.shuffled_repeats(list(fns), repeats):
            t = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - t)
        out.append((name, {k: statistics.median(v) * 1e3 for k, v in times.items()}))
    return out


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

    # the direct path with the first convolution probed instead (its output plus a zero probe, whose
    # gradient is the per-sample output gradient d), its weight's per-sample gradients formed from x
    # and d by the patches form outside vmap: what factorising that layer could give at best
    first, rest = model[0], torch.nn.Sequential(*list(model)[1:])
    # the rest's parameters by their names in `rest` ("3.weight" of the model is "2.weight" there)
    renamed = {k: f"{int(k.split('.')[0]) - 1}.{k.split('.', 1)[1]}" for k in params if not k.startswith("0.")}
    rest_params = {renamed[k]: params[k] for k in renamed}

    def probed_loss(
        p: dict[str, torch.Tensor], probe: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor
    ) -> torch.Tensor:
        h = F.conv2d(xb[None], params["0.weight"], p["0.bias"], padding=1) + probe
        return F.cross_entropy(functional_call(rest, p["rest"], (h,)), yb[None], reduction="sum")

    def first_probed() -> object:
        probe = torch.zeros(1, first.out_channels, *x.shape[2:])
        p = {"0.bias": params["0.bias"], "rest": rest_params}
        g, d = vmap(grad(probed_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(p, probe, x, y)
        flat = {"0.bias": g["0.bias"], **{k: g["rest"][renamed[k]] for k in renamed}}
        out = {k: v.square().reshape(v.shape[0], v.shape[1], -1).sum((0, 2)) for k, v in flat.items()}
        g0 = _as_patches(x, d.reshape(x.shape[0], first.out_channels, *x.shape[2:]), params["0.weight"])
        out["0.weight"] = g0.square().reshape(g0.shape[0], g0.shape[1], -1).sum((0, 2))
        return out

    ref, mine = direct(), first_probed()
    for k in ref:
        assert torch.allclose(ref[k], mine[k], rtol=1e-4), f"the probed method disagrees on {k}"

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
        a = _grouped(xin, d, conv.weight.detach())
        for form in (_as_convolution, _as_patches):
            b = form(xin, d, conv.weight.detach())
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max())), f"{form.__name__} disagrees"
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
        fns[f"conv{i + 1} per-sample weight gradients, as patches and bmm"] = functools.partial(_as_patches, xin, d, cw)
    fns["direct path by hand: vmap(grad) of every parameter, squared, summed"] = direct
    fns["direct path, the first convolution probed and its gradients as patches and bmm"] = first_probed
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
        min(med[f"conv{i + 1} per-sample weight gradients, {form}"]
            for form in ("grouped", "as a convolution", "as patches and bmm"))
        for i in range(len(layers))
    )  # fmt: skip
    rows = list(med.items())
    rows.insert(len(rows) - 3, ("floor: backbone + the fastest form of each conv's per-sample weight gradients", floor))
    return rows


def per_call(repeats: int) -> list[tuple[str, float]]:
    """The per-call cost that no operator accounts for: the same CNN on two 3×4×4 images.

    At that size every operator is a few microseconds, so the medians are the Python and dispatch
    work of a call: a forward+backward, a hand-written ``vmap(grad)`` of every parameter, and
    ``fisher_step``. Their differences are what the floor above leaves out besides the squares.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64, 10),
    )  # fmt: skip
    x, y = torch.randn(2, 3, 4, 4), torch.randint(0, 10, (2,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    trainable = {k: v.clone().requires_grad_(True) for k, v in params.items()}

    def forward_backward() -> object:
        loss = F.cross_entropy(functional_call(model, trainable, (x,)), y, reduction="sum")
        return torch.autograd.grad(loss, list(trainable.values()))

    def per_sample_loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xb[None],)), yb[None], reduction="sum")

    per_sample = vmap(grad(per_sample_loss), in_dims=(None, 0, 0))
    step = ff.make_fisher_step(ff.losses.classification(model), spec=ff.infer_spec(model))
    state = step.init(params)
    fns: dict[str, Callable[[], object]] = {
        "forward+backward": forward_backward,
        "vmap(grad) of every parameter": lambda: per_sample(params, x, y),
        "fisherfunc fisher_step": lambda: step(params, (x, y), state),
    }
    for f in fns.values():
        f()
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for k in run.shuffled_repeats(list(fns), 10 * repeats):
        t = time.perf_counter()
        fns[k]()
        times[k].append(time.perf_counter() - t)
    return [(k, statistics.median(v) * 1e3) for k, v in times.items()]


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
    print()
    print("Per call, the same CNN on two 3×4×4 images (no operator's time counts):")
    print()
    print("| call | median ms | × the workload's fwd+bwd |")
    print("|---|---|---|")
    for name, ms in per_call(args.repeats):
        print(f"| {name} | {ms:.2f} | {ms / fb:.3f}× |")
    print()
    print("Per-sample weight gradients by shape (median ms; the batch's weight gradient for comparison):")
    print()
    print("| convolution | batch | grouped | patches and bmm |")
    print("|---|---|---|---|")
    for name, ms in forms_by_shape(max(3, args.repeats // 3)):
        print(f"| {name} | {ms['batch']:.2f} | {ms['grouped']:.2f} | {ms['patches']:.2f} |")


if __name__ == "__main__":
    main()
