"""``precision="float32"`` and ``precision="model"``: the dtype the forward and backward run in.

References are the naive per-sample float64 loop of :mod:`tests.reference` over the unpadded
samples, on the same weights. ``"model"`` on a bfloat16 model is held to bfloat16's precision:
bfloat16 keeps 8 significant bits (unit roundoff ``u = 2⁻⁸ ≈ 3.9e-3``); a gradient through a few
layers accumulates some tens of roundings, so each tensor's groups must agree with the float64
reference to ``BF16_TOL = 25 u`` of the tensor's largest group, and their rankings must correlate
(Spearman ≥ 0.9) — docs/precision.md measures the actual errors on larger models.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import assert_groups_close, reference_fisher, rel_err, token_cross_entropy
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc._engine.memory import LiveBytes

pytestmark = pytest.mark.usefixtures("one_thread")

BF16_TOL = 25 * 2.0**-8
VOCAB, T, B = 40, 7, 5


def tiny_lm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(VOCAB, 16), nn.LayerNorm(16), nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, VOCAB))


def token_batch(seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g), torch.randint(0, VOCAB, (B, T), generator=g)


def reference(model: nn.Module, batch: tuple[Tensor, Tensor], spec: ff.Rule) -> dict:
    """Naive float64 loop on a float64 copy of ``model``'s weights (as stored: bf16 weights stay bf16-valued)."""
    model64 = copy.deepcopy(model).double()
    return reference_fisher(model64, batch, lambda m, s: token_cross_entropy(m(s[0]), s[1]), spec)


def spearman(a: Tensor, b: Tensor) -> float:
    ra, rb = (x.double().flatten().argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


# --- "model" on a float32 model is the float32 policy ---------------------------------------------


@pytest.mark.parametrize("path", ["auto", "direct"])
def test_model_precision_of_a_float32_model_is_the_float32_result(path: str) -> None:
    model, batch = tiny_lm(), token_batch()
    loss, params = ff.losses.token_classification(model), dict(model.named_parameters())
    expected = reference(model, batch, ff.Channel(0))
    f32 = ff.fisher(loss, params, batch, spec=ff.Channel(0), path=path)
    low = ff.fisher(loss, params, batch, spec=ff.Channel(0), path=path, precision="model")
    assert_groups_close(low, expected, 1e-5)
    for name in f32:
        torch.testing.assert_close(low[name], f32[name], rtol=1e-6, atol=0)
    per = ff.per_sample_fisher(loss, params, batch, spec=ff.Channel(0), path=path, precision="model")
    assert_groups_close({k: v.sum(0) / per.tokens.sum() for k, v in per.groups.items()}, expected, 1e-5)


# --- bfloat16 models --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["auto", "direct"])
def test_bfloat16_model_close_to_a_float64_loop_with_float32_result(path: str) -> None:
    model, batch = tiny_lm().to(torch.bfloat16), token_batch()
    loss, params = ff.losses.token_classification(model), dict(model.named_parameters())
    expected = reference(model, batch, ff.Channel(0))
    low = ff.fisher(loss, params, batch, spec=ff.Channel(0), path=path, precision="model")
    f32 = ff.fisher(loss, params, batch, spec=ff.Channel(0), path=path)
    assert_groups_close(f32, expected, 1e-5, "float32 policy on the bf16 weights: ")
    for name, ref in expected.items():
        assert low[name].dtype == torch.float32, name
        assert rel_err(low[name], ref) <= BF16_TOL, (name, rel_err(low[name], ref))
        if ref.numel() > 2:
            assert spearman(low[name], ref) >= 0.9, (name, spearman(low[name], ref))
    # the bf16 arithmetic really ran: not the float32 result to float32's precision
    assert max(rel_err(low[n], expected[n]) for n in expected) > 1e-5


def test_bfloat16_forward_sees_bfloat16_parameters_and_makes_no_float32_copy() -> None:
    """A plain callable loss records the dtypes it is given; the tracker sees no float32 copy of the weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256)).to(torch.bfloat16)
    params = dict(model.named_parameters())
    seen: set[torch.dtype] = set()

    def loss(p: dict, sample: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        seen.update(v.dtype for v in p.values())
        x, y = sample
        h = torch.tanh(F.linear(x, p["0.weight"], p["0.bias"]))
        out = F.linear(h, p["2.weight"], p["2.bias"])
        seen.add(out.dtype)
        return ((out - y) ** 2).sum(), torch.ones(())

    batch = (torch.randn(2, 256).bfloat16(), torch.randn(2, 256).bfloat16())
    copies = sum(p.numel() for p in params.values()) * 4  # what float32 copies of the weights take
    peaks = {}
    for precision in ("float32", "model"):
        seen.clear()
        with LiveBytes() as live:
            result = ff.fisher(loss, params, batch, spec=ff.Channel(0), precision=precision)
        peaks[precision] = live.peak
        assert all(v.dtype == torch.float32 for v in result.values())
        assert seen == ({torch.float32} if precision == "float32" else {torch.bfloat16}), (precision, seen)
    assert peaks["float32"] >= copies
    assert peaks["model"] < copies / 4, peaks  # not even a bf16 copy: small per-sample values only


def test_model_precision_keeps_the_callers_autocast_and_float32_ignores_it() -> None:
    model, batch = tiny_lm(), token_batch()
    params = dict(model.named_parameters())
    seen: list[torch.dtype] = []
    loss = ff.losses.token_classification(model, output=lambda out: (seen.append(out.dtype), out)[1])
    plain = ff.fisher(loss, params, batch, spec=ff.Channel(0))
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f32 = ff.fisher(loss, params, batch, spec=ff.Channel(0))
        assert set(seen) == {torch.float32}
        seen.clear()
        low = ff.fisher(loss, params, batch, spec=ff.Channel(0), precision="model")
        assert set(seen) == {torch.bfloat16}
    for name in plain:
        torch.testing.assert_close(f32[name], plain[name], rtol=1e-6, atol=0)
        assert low[name].dtype == torch.float32
        assert rel_err(low[name], plain[name]) <= BF16_TOL
    assert max(rel_err(low[n], plain[n]) for n in plain) > 1e-5  # autocast's bf16 matmuls did run


def test_llama_bfloat16_per_head_close_to_a_float64_loop_over_unpadded_samples() -> None:
    pytest.importorskip("transformers")
    from reference import causal_cross_entropy
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    lengths = [12, 9, 6]
    ids = torch.randint(0, 100, (3, 12))
    mask = (torch.arange(12) < torch.tensor(lengths).unsqueeze(1)).long()
    spec = ff.infer_spec(model)
    low = ff.fisher(
        ff.hf.causal_lm(model), dict(model.named_parameters()), {"input_ids": ids, "attention_mask": mask},
        spec=spec, precision="model",
    )  # fmt: skip
    model64 = copy.deepcopy(model).double()
    unpadded = [{"input_ids": ids[b : b + 1, : lengths[b]]} for b in range(3)]
    expected = reference_fisher(
        model64, unpadded, lambda m, s: causal_cross_entropy(m(**s).logits, s["input_ids"]), spec
    )
    heads = [n for n in expected if expected[n] is not None and "self_attn" in n]
    assert heads
    for name, ref in expected.items():
        if ref is None:
            assert low[name] is None
            continue
        assert low[name].dtype == torch.float32
        assert rel_err(low[name], ref) <= BF16_TOL, (name, rel_err(low[name], ref))
    everything = torch.cat([low[n].flatten() / expected[n].mean() for n in heads])
    reference_all = torch.cat([expected[n].flatten() / expected[n].mean() for n in heads])
    assert spearman(everything, reference_all) >= 0.9


# --- float16 ------------------------------------------------------------------------------------------


def half_matmul() -> bool:
    """Whether this torch multiplies float16 matrices on the CPU (torch 2.1 does not)."""
    try:
        torch.ones(1, 1, dtype=torch.float16) @ torch.ones(1, 1, dtype=torch.float16)
    except RuntimeError:
        return False
    return True


def test_float16_model_is_refused_before_any_work_and_never_returns_underflowed_zeros() -> None:
    """A float16 model whose per-sample gradients underflow: refused under "model"; float32 is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with torch.no_grad():
        model[1].weight.mul_(1e-4)  # ∂L/∂W0 = W1ᵀ (p − y) xᵀ ~ 1e-4 · 0.5 · 1e-4: below float16's 6e-8
    model = model.half()
    x, y = (1e-4 * torch.randn(3, 8)).half(), torch.randint(0, 4, (3,))
    params = dict(model.named_parameters())
    model64 = copy.deepcopy(model).double()
    # the premise: float16 per-sample gradients of the first weight flush to zero, float64 ones do not
    if half_matmul():
        g16 = torch.autograd.grad(F.cross_entropy(model(x[:1]), y[:1], reduction="sum"), model[0].weight)[0]
        g64 = torch.autograd.grad(F.cross_entropy(model64(x[:1].double()), y[:1], reduction="sum"), model64[0].weight)
        assert g16.abs().max() == 0 and g64[0].abs().min() > 0
    calls = []

    def loss(p: dict, sample: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        calls.append(1)
        h = F.linear(sample[0], p["0.weight"], p["0.bias"])
        return F.cross_entropy(F.linear(h, p["1.weight"], p["1.bias"]), sample[1], reduction="sum"), torch.ones(())

    with pytest.raises(ValueError, match="float16") as err:
        ff.fisher(loss, params, (x, y), spec=ff.Channel(0), precision="model")
    assert "precision='float32'" in str(err.value) and not calls
    exact = ff.fisher(loss, params, (x, y), spec=ff.Channel(0))
    expected = reference_fisher(
        model64, (x.double(), y), lambda m, s: (F.cross_entropy(m(s[0]), s[1], reduction="sum"), 1.0), ff.Channel(0)
    )
    assert_groups_close(exact, expected, 1e-5)
    assert bool((exact["0.weight"] > 0).all())


# --- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["bf16", "float16", None, 32, "Model"])
def test_a_bad_precision_is_refused_before_any_work_naming_the_option(bad: object) -> None:
    model, batch = tiny_lm(), token_batch()
    calls = []

    def loss(p: dict, sample: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        calls.append(1)
        return model(sample[0]).sum(), torch.ones(())

    params = dict(model.named_parameters())
    for call in (
        lambda: ff.fisher(loss, params, batch, spec=ff.Channel(0), precision=bad),
        lambda: ff.accumulate(loss, params, batch, spec=ff.Channel(0), precision=bad),
        lambda: ff.per_sample_fisher(loss, params, batch, spec=ff.Channel(0), precision=bad),
        lambda: ff.make_fisher_step(loss, spec=ff.Channel(0), precision=bad),
    ):
        with pytest.raises(ValueError, match="precision must be"):
            call()
    assert not calls


def test_a_state_continues_under_the_other_policy() -> None:
    model, batch = tiny_lm(), token_batch()
    loss, params = ff.losses.token_classification(model), dict(model.named_parameters())
    f32 = ff.make_fisher_step(loss, spec=ff.Channel(0), decay=0.5)
    low = ff.make_fisher_step(loss, spec=ff.Channel(0), decay=0.5, precision="model")
    both = low(params, batch, f32(params, batch, f32.init(params)))
    twice = f32(params, batch, f32(params, batch, f32.init(params)))
    assert both.step == 2
    for name in twice.ema:
        torch.testing.assert_close(both.ema[name], twice.ema[name], rtol=1e-6, atol=0)


def test_a_bfloat16_models_step_keeps_a_float32_state_close_to_one_shot() -> None:
    model, batch = tiny_lm().to(torch.bfloat16), token_batch()
    loss, params = ff.losses.token_classification(model), dict(model.named_parameters())
    step = ff.make_fisher_step(loss, spec=ff.Channel(0), decay=0.0, precision="model")
    state = step(params, batch, step.init(params))
    once = ff.fisher(loss, params, batch, spec=ff.Channel(0), precision="model")
    for name, value in ff.estimate(state).items():
        assert state.ema[name].dtype == torch.float32 and value.dtype == torch.float32
        torch.testing.assert_close(value, once[name], rtol=1e-6, atol=0)
