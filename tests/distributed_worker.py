"""One process of the two-process ``gloo`` test in ``test_distributed.py`` (run as a script).

    python tests/distributed_worker.py RANK WORLD_SIZE STORE_FILE OUT_DIR

Builds the same seeded token-classification problem as the test (a registry case), takes its half of every batch
(``shard``), runs each scenario and saves plain results (tensors, numbers, strings) to
``OUT_DIR/rank{RANK}.pt``. Importing this module runs nothing.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

import fisherfunc as ff
from fisherfunc._engine.batches import take
from fisherfunc.testing import cases

BATCH, LENGTH, VOCAB, CLASSES, STEPS = 6, 5, 11, 4, 4
CHUNK = 2
POISON = VOCAB - 1  # a token id no batch uses, whose embedding row the NaN scenario sets to NaN


def problem() -> tuple[Any, dict[str, Tensor], list[dict[str, Tensor]]]:
    """Loss, params and ``STEPS`` right-padded batches; the halves have different token counts.

    The registry's token tagger ``input_ids [.., T] -> logits [.., T, CLASSES]`` (an embedding and
    a head, float32) on batches ``{"input_ids", "labels", "attention_mask"}`` whose ids never
    include ``POISON`` (the vocabulary's last id is reserved).
    """
    case = cases.case(
        "token_classification", vocab=VOCAB, dim=8, classes=CLASSES, norm=False, batch=(BATCH,) * STEPS,
        seq_len=LENGTH, reserved_ids=1, dtype=torch.float32,
    )  # fmt: skip
    params = {k: v.detach() for k, v in case.params.items()}
    return case.loss, params, list(case.batches)


def shard(batch: dict[str, Tensor], rank: int, world: int) -> dict[str, Tensor]:
    """This process's contiguous part of ``batch``."""
    return take(batch, rank * BATCH // world, (rank + 1) * BATCH // world)


def plain(state: ff.FisherState) -> dict[str, Any]:
    return {"ema": state.ema, "step": state.step, "tokens": state.tokens, "samples": state.samples,
            "skipped": state.skipped}  # fmt: skip


def failure(call: Any) -> tuple[str, str, tuple, tuple]:
    try:
        call()
    except Exception as err:  # recorded for the test to check, on every process
        return type(err).__name__, str(err), getattr(err, "parameters", ()), getattr(err, "samples", ())
    return "none", "", (), ()


def main(rank: int, world: int, store_file: str, out: Path) -> None:
    store = dist.FileStore(store_file, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    loss, params, batches = problem()
    mine = [shard(b, rank, world) for b in batches]
    results: dict[str, Any] = {}

    results["fisher"] = ff.distributed.fisher(loss, params, mine[:2], chunk_size=CHUNK)
    acc = ff.distributed.all_reduce(ff.accumulate(loss, params, mine[0]))
    results["accumulator"] = {"sums": acc.sums, "tokens": acc.tokens, "samples": acc.samples}

    skipping = ff.distributed.data_parallel(ff.make_fisher_step(loss, decay=0.8, chunk_size=CHUNK, nonfinite="skip"))
    state = skipping.init(params)
    for batch in mine:
        state = skipping(params, batch, state)
    results["ema"] = plain(state)

    # A NaN on the last process's shard only (its last sample): everybody skips, or everybody raises.
    bad = {k: v.clone() for k, v in mine[0].items()}
    nan_params = {k: v.clone() for k, v in params.items()}
    nan_params["emb.weight"][POISON, 0] = float("nan")  # a row no token uses ...
    if rank == world - 1:
        bad["input_ids"][-1, 0] = POISON  # ... but the first token of this process's last sample
    results["skipped"] = plain(skipping(nan_params, bad, state))
    raising = ff.distributed.data_parallel(ff.make_fisher_step(loss, decay=0.8, chunk_size=CHUNK))
    results["raised"] = failure(lambda: raising(nan_params, bad, state))

    # Any other failure on one process: it raises its own error, the others a DistributedError.
    broken = {k: (v[:-1] if k == "labels" and rank == 0 else v) for k, v in mine[1].items()}
    results["error"] = failure(lambda: raising(params, broken, state))

    # The collectives are still aligned: a normal step works and agrees everywhere.
    results["after"] = plain(raising(params, mine[1], state))

    # kind=ff.MC(seed=3): each process draws its own labels (stream = rank).
    mc = ff.make_fisher_step(loss, decay=0.8, kind=ff.MC(seed=3))
    results["mc_same_data"] = mc.batch_sums(params, batches[0], mc.init(params), stream=rank).sums
    results["mc"] = plain(ff.distributed.data_parallel(mc)(params, mine[0], mc.init(params)))
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()  # every process has saved its results
    # gloo's teardown (destroy_process_group, or the interpreter's own at exit) intermittently hangs
    # on this class of machine, on every torch tried (2.1–2.13): the results are saved, so leave
    # without it rather than let the harness wait out its time limit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
