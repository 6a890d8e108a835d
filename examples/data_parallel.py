"""Data-parallel Fisher collection: each process folds its shard of every batch into one shared state.

    torchrun --nproc-per-node 2 examples/data_parallel.py fisher.safetensors

Every process holds the same model and a replica of the state. Per step each computes the exact
group sums of its own shard, one all-reduce adds them up, and every replica takes the same EMA
update — so the state equals the one a single process would reach on the whole batches. The
state is stored in bfloat16 on the CPU, whatever device the model runs on; rank 0 saves it.
With GPUs: ``init_process_group("nccl")`` and the model on ``cuda:{local_rank}``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

import fisherfunc as ff

BATCH, STEPS = 64, 10


def problem() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The same model and data stream on every process (seeded)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(BATCH, 20, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(STEPS)]
    return model, batches


def main(path: str) -> None:
    dist.init_process_group("gloo")  # env:// — torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    model, batches = problem()
    params = {k: v.detach() for k, v in model.named_parameters()}

    fisher_step = ff.distributed.data_parallel(ff.make_fisher_step(ff.losses.classification(model), decay=0.9))
    state = fisher_step.init(params, dtype=torch.bfloat16, device="cpu")
    for x, y in batches:  # in practice: a DataLoader with a DistributedSampler
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        state = fisher_step(params, (x[shard], y[shard]), state)  # identical on every process

    if rank == 0:
        ff.save(path, state, params=params, task="classifier")
        top = ff.estimate(state)["0.weight"].topk(3).indices.tolist()
        print(f"{world} processes, {state.samples} samples: most important hidden units {top}; saved {path}")
    dist.barrier()  # no process tears down while another is still saving or communicating
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fisher.safetensors")
