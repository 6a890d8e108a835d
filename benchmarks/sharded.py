"""What stops per-sample Fisher on sharded or offloaded models today: each attempt's outcome, printed.

Two CPU processes over ``gloo`` (``torchrun``-free: this script spawns them), a tiny model (two
Linear layers and a Llama-shaped decoder), and for each way of not holding the whole model in one
place, ``torch.func.vmap(torch.func.grad(...))`` and ``ff.fisher`` are tried and compared with a
naive per-sample loop on the unsharded model:

1. DTensor parameters (``distribute_tensor(..., [Shard(0)])``) passed to ``functional_call``;
2. FSDP2 (``fully_shard``) on the module, then fisherfunc on its (DTensor) parameters;
3. the same with the sharded parameters gathered per layer by the user (``full_tensor()``) — the
   layer-streamed plan in its simplest form;
4. accelerate's ``cpu_offload`` (weights on the "meta" device, moved in by module hooks).

    python benchmarks/sharded.py          # prints one line per attempt: ok (with the error) or the exception
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, grad, vmap

import fisherfunc as ff


def tiny() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    return model, (torch.randn(6, 8), torch.randint(0, 4, (6,)))


def naive(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for x, y in zip(*batch):
        loss = nn.functional.cross_entropy(model(x[None]), y[None], reduction="sum")
        for k, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            out[k] += g.square()
    return out


def vmap_grad(model: nn.Module, params: dict[str, Any], batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    def loss(p: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (x[None],)), y[None], reduction="sum")

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, *batch)
    return {k: g.square().sum(0) for k, g in grads.items()}


def compare(result: dict[str, Any], reference: dict[str, torch.Tensor]) -> str:
    worst = 0.0
    for k, ref in reference.items():
        value = result[k]
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        worst = max(worst, float((value - ref).abs().max() / ref.abs().max()))
    return f"ok, max rel. error {worst:.1e}"


def attempt(name: str, fn: Callable[[], str], rank: int) -> None:
    try:
        verdict = fn()
    except Exception as exc:  # noqa: BLE001 - the exception is the finding
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = "/".join(frame.filename.split(os.sep)[-3:]) + f":{frame.lineno}"
        verdict = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''} (raised in {where})"
    if rank == 0:
        print(f"- {name}: {verdict}", flush=True)


def worker(rank: int, world: int, store: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model, batch = tiny()
    reference = naive(model, batch)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def dtensor_vmap() -> str:
        sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in params.items()}
        return compare(vmap_grad(model, sharded, batch), reference)

    def dtensor_inputs_vmap() -> str:
        sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in params.items()}
        inputs = (distribute_tensor(batch[0], mesh, [Replicate()]), distribute_tensor(batch[1], mesh, [Replicate()]))
        return compare(vmap_grad(model, sharded, inputs), reference)

    def replicated_vmap() -> str:
        replicated = {k: distribute_tensor(v, mesh, [Replicate()]) for k, v in params.items()}
        inputs = (distribute_tensor(batch[0], mesh, [Replicate()]), distribute_tensor(batch[1], mesh, [Replicate()]))
        return compare(vmap_grad(model, replicated, inputs), reference)

    def fsdp2_vmap() -> str:
        shard_model, _ = tiny()
        fully_shard(shard_model, mesh=mesh)
        shard_params = {k: v.detach() for k, v in shard_model.named_parameters()}
        return compare(vmap_grad(shard_model, shard_params, batch), reference)

    def dtensor_fisher() -> str:
        sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in params.items()}
        acc = ff.accumulate(ff.losses.classification(model), sharded, batch, spec=ff.Elementwise())
        return compare(acc.sums, reference)

    def dtensor_inputs_fisher() -> str:
        sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in params.items()}
        inputs = (distribute_tensor(batch[0], mesh, [Replicate()]), distribute_tensor(batch[1], mesh, [Replicate()]))
        acc = ff.accumulate(ff.losses.classification(model), sharded, inputs, spec=ff.Elementwise())
        return compare(acc.sums, reference)

    def dtensor_inputs_direct() -> str:
        sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in params.items()}
        inputs = (distribute_tensor(batch[0], mesh, [Replicate()]), distribute_tensor(batch[1], mesh, [Replicate()]))
        loss = ff.losses.classification(model)
        acc = ff.accumulate(loss, sharded, inputs, spec=ff.Elementwise(), path="direct")
        return compare(acc.sums, reference)

    def accelerate_vmap() -> str:
        from accelerate import cpu_offload

        off_model, _ = tiny()
        cpu_offload(off_model, execution_device=torch.device("cpu"))
        return compare(vmap_grad(off_model, {k: v.detach() for k, v in off_model.named_parameters()}, batch), reference)

    def fsdp2_fisher() -> str:
        shard_model, _ = tiny()
        fully_shard(shard_model, mesh=mesh)
        shard_params = {k: v.detach() for k, v in shard_model.named_parameters()}
        acc = ff.accumulate(ff.losses.classification(shard_model), shard_params, batch, spec=ff.Elementwise())
        return compare(acc.sums, reference)

    def gathered_per_layer() -> str:
        # the user gathers each sharded weight to a full tensor before use (here all at once):
        # per-sample gradients are then ordinary tensors on every rank
        sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in params.items()}
        full = {k: v.full_tensor() for k, v in sharded.items()}
        acc = ff.accumulate(ff.losses.classification(model), full, batch, spec=ff.Elementwise())
        return compare(acc.sums, reference)

    def accelerate_offload() -> str:
        from accelerate import cpu_offload

        off_model, _ = tiny()
        cpu_offload(off_model, execution_device=torch.device("cpu"))
        off_params = {k: v.detach() for k, v in off_model.named_parameters()}
        acc = ff.accumulate(ff.losses.classification(off_model), off_params, batch, spec=ff.Elementwise())
        return compare(acc.sums, reference)

    for name, fn in [
        ("DTensor (Shard(0)) params, vmap(grad(functional_call))", dtensor_vmap),
        ("DTensor (Shard(0)) params and Replicate() inputs, vmap(grad(functional_call))", dtensor_inputs_vmap),
        ("DTensor Replicate() params and inputs, vmap(grad(functional_call))", replicated_vmap),
        ("DTensor (Shard(0)) params, ff.accumulate", dtensor_fisher),
        ("DTensor (Shard(0)) params and Replicate() inputs, ff.accumulate", dtensor_inputs_fisher),
        ('... the same, path="direct" (no probes)', dtensor_inputs_direct),
        ("FSDP2 fully_shard, vmap(grad(functional_call)) on its parameters", fsdp2_vmap),
        ("FSDP2 fully_shard, ff.accumulate on its parameters", fsdp2_fisher),
        ("DTensor gathered by the user (full_tensor), ff.accumulate", gathered_per_layer),
        ("accelerate cpu_offload (meta weights, hooks), vmap(grad(functional_call))", accelerate_vmap),
        ("accelerate cpu_offload (meta weights, hooks), ff.accumulate", accelerate_offload),
    ]:
        attempt(name, fn, rank)
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 2 CPU processes over gloo", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(2, os.path.join(folder, "store")), nprocs=2, join=True)


if __name__ == "__main__":
    sys.exit(main())
