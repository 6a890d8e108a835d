"""Check ``max_memory=``: the chunk it plans, the call's peak against the budget, the result against ``chunk_size``.

A Llama-shaped model from a ``LlamaConfig`` (random weights) and a right-padded batch. For each
budget: a ``make_fisher_step`` with ``max_memory`` folds the batch; reported are the planned chunk
(``fisher_step.chunk_plans``), the step's peak above what was allocated before it
(``torch.cuda.max_memory_allocated`` on CUDA, the live-bytes tracker on CPU) and the largest relative
difference from ``ff.fisher(..., chunk_size=<that chunk>)``.

    python benchmarks/budget_check.py --device cpu --budgets 64MiB 256MiB
    python benchmarks/budget_check.py --device cuda --dtype bfloat16 --precision model --d 2048 \
        --layers 16 --heads 16 --kv-heads 4 --vocab 32000 --tokens 1024 --batch 16 --budgets 4GiB 16GiB
"""

from __future__ import annotations

import argparse

import torch

import fisherfunc as ff
from fisherfunc._engine.budget import BudgetError, measure, parse_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--precision", default="float32", choices=["float32", "model"])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budgets", nargs="+", default=["64MiB", "256MiB"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d,
        intermediate_size=int(args.d * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.tokens,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval().to(device=device, dtype=getattr(torch, args.dtype))
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), device=device)
    mask = torch.ones_like(ids)
    for b in range(args.batch):
        mask[b, args.tokens - (b % 8) * (args.tokens // 8) :] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    loss, params, spec = ff.hf.causal_lm(model), dict(model.named_parameters()), ff.infer_spec(model)
    size = sum(p.numel() for p in params.values()) / 1e6
    print(f"{size:.1f}M parameters, {args.dtype}, precision={args.precision!r}, batch {tuple(ids.shape)} on {device}")
    for budget in args.budgets:
        step = ff.make_fisher_step(loss, spec=spec, decay=0.0, precision=args.precision, max_memory=budget)
        state = step.init(params)
        try:
            state, peak = measure(lambda: step(params, batch, state), device)  # noqa: B023
        except BudgetError as err:
            print(f"  max_memory={budget}: refused: {err}")
            continue
        (chunk,) = step.chunk_plans.values()
        same = ff.fisher(loss, params, batch, spec=spec, precision=args.precision, chunk_size=chunk)
        got = ff.estimate(state)
        diff = max(float((got[n] - same[n]).abs().max() / same[n].abs().max()) for n in same if same[n] is not None)
        within = "within" if peak <= parse_bytes(budget) else "ABOVE"
        print(f"  max_memory={budget}: chunk {chunk}, peak {peak / 2**20:.1f} MiB ({within} the budget), "
              f"max rel. diff from chunk_size={chunk}: {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
