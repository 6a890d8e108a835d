"""Memory and low-precision arithmetic of the engine's reductions.

**Squares and sums are float32 whatever the gradients' dtype** (DESIGN §5). A model run in
bfloat16 hands the engine bfloat16 per-sample gradients (direct path) and bfloat16 probe factors
``a``, ``d`` (factorised path); the group sums must be float32 and equal the float32 (here
float64) reduction of those same gradients. The test model is built so that its bfloat16 forward
and backward are *exact*: weights and inputs in ``{-1, 0, 1}``, widths and lengths small enough
that every partial sum is an integer of magnitude ≤ 256 (bfloat16 holds those exactly). Then the
engine's bfloat16 gradients equal the float64 ones entry by entry, and the only place rounding can
enter is the squaring and summing — which, done in bfloat16, would round squares such as
``35² = 1225`` (11 significant bits) and every sum past 256. The float64 reference is a naive
per-sample ``torch.autograd`` loop with per-group sums written here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import fisherfunc as ff
from fisherfunc._engine.group_sums import GroupSums
from fisherfunc._engine.numerics import prepare
from fisherfunc._spec.resolve import resolve_spec

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, DIM, HIDDEN, OUT = 13, 8, 8, 6


def integer_params(seed: int) -> dict[str, Tensor]:
    """Weights in ``{-1, 0, 1}`` (float64): embedding ``[13, 8]``, ``w1 [8, 8]`` + ``b1``, ``w2 [6, 8]``."""
    g = torch.Generator().manual_seed(seed)

    def ternary(*shape: int) -> Tensor:
        return torch.randint(-1, 2, shape, generator=g).double()

    return {"emb": ternary(VOCAB, DIM), "w1": ternary(HIDDEN, DIM), "b1": ternary(HIDDEN), "w2": ternary(OUT, HIDDEN)}


def integer_loss(params: dict[str, Tensor], sample: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``L = Σ_t y_t · (W2 relu(W1 e_t + b1))`` with ``e_t = emb[id_t]``: gradients are integers."""
    ids, y = sample["ids"], sample["y"]
    e = F.embedding(ids, params["emb"])  # [T, DIM]
    h = F.linear(e, params["w1"], params["b1"]).relu()  # [T, HIDDEN]
    out = F.linear(h, params["w2"])  # [T, OUT]
    return (out * y).sum(), torch.tensor(float(ids.shape[0]))


SPEC = {"emb": ff.Rows(), "w1": ff.Channel(1), "b1": ff.Elementwise(), "w2": ff.Heads(3, axis=0)}


def reference_groups(name: str, g: Tensor) -> Tensor:
    """Per-group sums of ``g ⊙ g`` written from each rule's layout (float64)."""
    s = g.square()
    if name == "emb":  # Rows: one value per token id
        return s.sum(1)
    if name == "w1":  # Channel(1): one value per input column
        return s.sum(0)
    if name == "b1":  # Elementwise
        return s
    return s.sum(1).reshape(3, OUT // 3).sum(1)  # Heads(3, axis=0): rows [h·2, h·2 + 2)


def reference(
    params: dict[str, Tensor], batch: dict[str, Tensor], dtype: torch.dtype = torch.float64
) -> dict[str, Tensor]:
    """``Σ_b`` of the per-group squared per-sample gradients, by a naive float64 autograd loop.

    The gradients are float64; ``dtype`` is the dtype they are squared and summed in.
    """
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    total = {k: torch.zeros((), dtype=dtype) for k in params}
    for b in range(batch["ids"].shape[0]):
        value, _ = integer_loss(leaves, {k: v[b] for k, v in batch.items()})
        grads = torch.autograd.grad(value, list(leaves.values()))
        for (name, _), g in zip(leaves.items(), grads):
            total[name] = total[name] + reference_groups(name, g.to(dtype))
    return total


def assert_exact_in_bfloat16(params: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
    """Every partial sum of the forward and backward is an integer of magnitude ≤ 256.

    A partial sum of ``Σ_k x_k y_k`` is bounded by ``Σ_k |x_k| |y_k|``: the same computation on
    absolute values (``relu`` of a non-negative value is the identity, and its derivative is at
    most 1) bounds every activation and gradient the real one forms.
    """
    absolute = {k: v.abs().requires_grad_(True) for k, v in params.items()}
    for b in range(batch["ids"].shape[0]):
        sample = {"ids": batch["ids"][b], "y": batch["y"][b].abs()}
        e = F.embedding(sample["ids"], absolute["emb"])
        h = F.linear(e, absolute["w1"], absolute["b1"])
        value, _ = integer_loss(absolute, sample)
        bounds = [F.linear(h, absolute["w2"]), *torch.autograd.grad(value, list(absolute.values()))]
        assert max(float(x.detach().max()) for x in bounds) <= 256, "the test model left exact bfloat16"


def integer_batch(seed: int, batch: int, length: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    if length > 1:
        ids[:, -1] = ids[:, 0]  # a repeated id inside each sequence
    return {"ids": ids, "y": torch.randint(-3, 4, (batch, length, OUT), generator=g).double()}


def engine_sums(params: dict[str, Tensor], batch: dict[str, Tensor], path: str, dtype: torch.dtype) -> dict[str, Any]:
    """The engine's chunk sums with every leaf (and input) in ``dtype``: gradients arrive in ``dtype``."""
    resolved = resolve_spec(SPEC, params)
    prepared = prepare(params)
    low = dataclasses.replace(prepared, leaves=tuple(x.to(dtype) for x in prepared.leaves), dtype=dtype)
    fns = GroupSums(integer_loss, low, resolved, path)(batch)  # type: ignore[arg-type]
    sums, tokens = fns.sums(batch)
    per_sample, _ = fns.per_sample(batch)
    names = [resolved.names[i] for i in resolved.active]
    return {"sums": dict(zip(names, sums)), "per_sample": dict(zip(names, per_sample)), "tokens": tokens}


def cpu_matmul(dtype: torch.dtype) -> bool:
    """Whether this torch multiplies ``dtype`` matrices on the CPU (float16: torch 2.2 and later)."""
    try:
        torch.nn.functional.linear(torch.ones(1, 2, dtype=dtype), torch.ones(2, 2, dtype=dtype))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["auto", "direct"])
@pytest.mark.parametrize("length", [1, 2, 4])  # one vector (chunk-level product), Gram form, direct form
def test_low_precision_gradients_square_and_sum_in_float32(dtype: torch.dtype, path: str, length: int) -> None:
    if not cpu_matmul(dtype):
        pytest.skip(f"torch {torch.__version__} has no {dtype} matrix product on the CPU (float16 needs torch >= 2.2)")
    params = integer_params(seed=length)
    batch = integer_batch(seed=10 + length, batch=16, length=length)
    assert_exact_in_bfloat16(params, batch)
    expected = reference(params, batch)
    got = engine_sums(params, batch, path, dtype)
    assert got["tokens"].dtype == torch.float32
    assert torch.equal(got["tokens"], torch.full((16,), float(length)))
    low = reference(params, batch, dtype)  # the same gradients squared and summed in the low dtype
    assert any(not torch.equal(low[k].double(), v) for k, v in expected.items()), "the test could not fail"
    for name, want in expected.items():
        for form in ("sums", "per_sample"):
            value = got[form][name]
            assert value.dtype == torch.float32, (form, name, value.dtype)
            summed = value if form == "sums" else value.sum(0)
            # integers below 2**24: exact in float32, so equal, not close
            assert torch.equal(summed.double(), want), (form, name, (summed.double() - want).abs().max())


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(1, 6),
    n0=st.integers(1, 40),
    n1=st.integers(1, 6),
    sums=st.sampled_from(["rows", "cols", "full"]),
    seed=st.integers(0, 2**16),
)
def test_square_sums_in_blocks_of_bfloat16_factors_equal_the_whole_square(
    t: int, n0: int, n1: int, sums: str, seed: int
) -> None:
    """Row (column) sums formed block by block from bfloat16 factors equal ``(uᵀ v)²`` summed, in float32.

    ``n0`` up to 40 against ``n1`` up to 6 gives up to 8 blocks, in the Gram and the direct form. The
    direct and full forms form ``G`` in bfloat16, as the model's backward does: each entry rounded to
    bfloat16, within two units of its last place (2 · 2⁻⁹ relative; CPU kernels were seen to round an
    entry up to 1.5 units off), so its square and a row sum of squares (positive terms) within
    ``(1 + 2⁻⁸)² − 1``; the Gram form is float32 throughout.
    """
    from fisherfunc._engine.group_sums import _square_sums

    g = torch.Generator().manual_seed(seed)
    u = torch.randn(t, n0, generator=g).bfloat16()
    v = torch.randn(t, n1, generator=g).bfloat16()
    full = (u.double().t() @ v.double()).square()  # products of bfloat16 values, exact in float64
    want = {"rows": full.sum(1), "cols": full.sum(0), "full": full}[sums]
    got = _square_sums(u, v, sums)  # type: ignore[arg-type]
    assert got.dtype == torch.float32 and got.shape == want.shape
    rtol = (1 + 2.0**-8) ** 2 - 1 + 1e-5  # two bfloat16 roundings of G, squared; float32 sums
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-6 * float(want.abs().max()))


# --- peak memory against a plain forward+backward -------------------------------------------------


def _hf_case(family: str, length: int, batch: int) -> tuple[torch.nn.Module, dict[str, Tensor]]:
    """A tiny random Llama or GPT-2 (causal LMs) or BERT (masked LM), ``sdpa``, right-padded: activations dominate."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=length, pad_token_id=0, attn_implementation="sdpa",
        )  # fmt: skip
        model: torch.nn.Module = transformers.LlamaForCausalLM(config)
    elif family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=length, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, attn_implementation="sdpa",
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=length, attn_implementation="sdpa",
        )  # fmt: skip
        model = transformers.BertForMaskedLM(config)
    ids = torch.randint(3, 100, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1:, length // 2 :] = 0  # every sample but the first is half padding
    data = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    if family == "bert":
        data["labels"] = torch.where((torch.rand(batch, length) < 0.3) & (mask == 1), ids, -100)
    return model.eval(), data


def _summed_loss(family: str, model: torch.nn.Module, data: dict[str, Tensor]) -> Tensor:
    """``Σ_b L_b`` of the batch in one plain forward, as ``fisherfunc.hf``'s loss defines ``L_b``."""
    ids, mask = data["input_ids"], data["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits
    if family == "bert":
        return F.cross_entropy(logits.flatten(0, 1), data["labels"].flatten(), reduction="sum")
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return (nll * (mask[:, :-1] * mask[:, 1:])).sum()


def _peak(call: Any) -> int:
    """Peak live tensor bytes of ``call()`` (its second run: the first discovers and warms caches)."""
    from fisherfunc._engine.memory import LiveBytes

    call()
    with LiveBytes() as live:
        call()
    return live.peak


@pytest.mark.parametrize(("family", "mask"), [("llama", "none"), ("gpt2", "causal"), ("bert", "keys")])
def test_group_fisher_peak_memory_within_a_forward_backward(
    family: str, mask: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peak live tensor bytes of a group Fisher call ≤ 1.3× a plain forward+backward's, batch and one sample.

    These layers are tiny, so by default their probe factors are kept to the end of the backward
    (``group_sums.KEPT_FACTOR_BYTES`` per sample; the next test bounds that). A layer at scale is
    past that budget on its own and is reduced in the backward; the budget is set to 0 here so every
    layer is, as at scale.

    Before the engine kept memory at the floor this read 2.3× (Llama) and 1.9× (BERT) with the batch,
    3.2× and 2.7× with one-sample chunks, on the same models: every backward intermediate alive until
    ``grad`` returned (its ``create_graph=True``), every probed layer's input and output gradient held
    to the end, a float copy of a per-sample boolean ``[T, T]`` mask in every attention layer. After:
    0.88–0.92× with the batch, 1.07–1.18× with one-sample chunks (no parameter ``.grad`` is made). The
    mask each loss passes is the least that keeps the samples exact (:mod:`fisherfunc.hf._losses`):
    none for Llama, the shared causal mask for GPT-2 (which reads its ids when given none), the
    keys' mask for BERT.
    """
    import fisherfunc as ff
    from fisherfunc._engine import group_sums

    monkeypatch.setattr(group_sums, "KEPT_FACTOR_BYTES", 0)
    model, data = _hf_case(family, length=128, batch=2)
    loss = ff.hf.masked_lm(model) if family == "bert" else ff.hf.causal_lm(model)
    assert loss.prepare.form == mask  # type: ignore[union-attr]
    params = {k: v.detach() for k, v in model.named_parameters()}
    spec = ff.infer_spec(model)

    def forward_backward(part: dict[str, Tensor]) -> None:
        _summed_loss(family, model, part).backward()
        model.zero_grad(set_to_none=True)

    one = {k: v[:1] for k, v in data.items()}  # the full-length sample
    batch_fb, one_fb = _peak(lambda: forward_backward(data)), _peak(lambda: forward_backward(one))
    batch_ff = _peak(lambda: ff.accumulate(loss, params, data, spec=spec))
    chunk_ff = _peak(lambda: ff.accumulate(loss, params, data, spec=spec, chunk_size=1))
    assert batch_ff <= 1.3 * batch_fb, (batch_ff / batch_fb, batch_ff, batch_fb)
    assert chunk_ff <= 1.3 * one_fb, (chunk_ff / one_fb, chunk_ff, one_fb)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_kept_probe_factors_cost_at_most_their_budget_per_sample(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small layers' factors kept to the end of the backward add at most ``KEPT_FACTOR_BYTES`` per sample.

    The same calls as above with the default budget (every site of these small models kept) and with
    none (every site reduced in the backward): the peaks differ by at most the budget times the
    samples in a chunk, and the values are the same.
    """
    import fisherfunc as ff
    from fisherfunc._engine import group_sums

    model, data = _hf_case(family, length=128, batch=2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    spec = ff.infer_spec(model)
    budget = group_sums.KEPT_FACTOR_BYTES
    peaks, values = {}, {}
    for kept in (budget, 0):
        monkeypatch.setattr(group_sums, "KEPT_FACTOR_BYTES", kept)
        loss = ff.hf.masked_lm(model) if family == "bert" else ff.hf.causal_lm(model)
        peaks[kept] = (
            _peak(lambda: ff.accumulate(loss, params, data, spec=spec)),  # noqa: B023 - called at once
            _peak(lambda: ff.accumulate(loss, params, data, spec=spec, chunk_size=1)),  # noqa: B023
        )
        values[kept] = ff.fisher(loss, params, data, spec=spec)
    (batch_kept, one_kept), (batch_reduced, one_reduced) = peaks[budget], peaks[0]
    assert one_kept > one_reduced  # the budget is in use here: these sites are kept
    assert batch_kept - batch_reduced <= 2 * budget, (batch_kept, batch_reduced)
    assert one_kept - one_reduced <= budget, (one_kept, one_reduced)
    for name, value in values[budget].items():
        torch.testing.assert_close(values[0][name], value, rtol=1e-6, atol=0)
