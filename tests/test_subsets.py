"""Parameter subsets at no cost: ``Skip()`` rules, and a params dict holding only some parameters.

Either way the parameters left out get no probe site and no gradient: the test counts, inside the
per-sample function, which leaves ``torch.func`` tracks gradients of, and the probe sites discovery
finds, and the live-bytes tracker shows the memory of the per-sample gradients that are not formed.
References are naive float64 loops over the module itself (:mod:`tests.reference`).
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from typing import Any

import pytest
import torch
from reference import assert_groups_close, cross_entropy_sum, reference_fisher
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc._engine.group_sums import find_sites
from fisherfunc._engine.memory import LiveBytes
from fisherfunc._engine.numerics import prepare
from fisherfunc._spec.resolve import resolve_spec

pytestmark = pytest.mark.usefixtures("one_thread")

PEFT = importlib.util.find_spec("peft") is not None and importlib.util.find_spec("transformers") is not None


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 5)).double()


def data(size: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(size, 16, generator=g, dtype=torch.float64), torch.randint(0, 5, (size,), generator=g)


def tracked(model: nn.Module) -> tuple[Any, list[set[str]]]:
    """A classification loss that records, per call, the names of the parameters ``torch.func`` differentiates."""
    inner = ff.losses.classification(model)
    seen: list[set[str]] = []

    def loss(params: dict, sample: Any) -> tuple[Tensor, Tensor]:
        seen.append({n for n, p in params.items() if torch._C._functorch.is_gradtrackingtensor(p)})
        return inner(params, sample)

    loss.model = model  # type: ignore[attr-defined]  # as a fisherfunc.losses loss knows its model
    return loss, seen


def reference(model: nn.Module, batch: tuple[Tensor, Tensor], names: list[str]) -> dict[str, Tensor]:
    spec = {n: ff.Channel(0) if n in names else ff.Skip() for n, _ in model.named_parameters()}
    full = reference_fisher(copy.deepcopy(model), batch, lambda m, s: cross_entropy_sum(m(s[0]), s[1]), spec)
    return {n: full[n] for n in names}


def test_skip_rules_differentiate_only_the_rest_and_probe_only_the_rest() -> None:
    model, batch = mlp(), data()
    params = dict(model.named_parameters())
    kept = ["4.weight", "4.bias"]
    spec = {n: ff.Channel(0) if n in kept else ff.Skip() for n in params}
    loss, seen = tracked(model)
    direct = ff.fisher(loss, params, batch, spec=spec, path="direct")
    assert set(kept) in seen and all(s <= set(kept) for s in seen)
    assert_groups_close({n: direct[n] for n in kept}, reference(model, batch, kept), 1e-10)
    assert all(direct[n] is None for n in params if n not in kept)
    # the probe path: the one kept weight is probed, the bias differentiated, nothing else
    seen.clear()
    auto = ff.fisher(loss, params, batch, spec=spec)
    assert {"4.bias"} in seen and all(s <= {"4.bias"} for s in seen)  # (discovery's forward tracks nothing)
    resolved = resolve_spec(spec, params)
    sites = find_sites(loss, prepare(params, differentiated=resolved.active), resolved, (batch[0][0], batch[1][0]))
    assert [resolved.names[s.leaf] for s in sites] == ["4.weight"]
    assert_groups_close({n: auto[n] for n in kept}, reference(model, batch, kept), 1e-10)


def test_a_params_dict_of_a_subset_is_the_skip_spec_without_tracking_the_rest() -> None:
    model, batch = mlp(), data()
    full = dict(model.named_parameters())
    subset = {n: p for n, p in full.items() if n.startswith("2.")}
    loss, seen = tracked(model)
    for path in ("auto", "direct"):
        seen.clear()
        got = ff.fisher(loss, subset, batch, spec=ff.Channel(0), path=path)
        assert set(got) == set(subset)
        assert seen and all(s <= set(subset) for s in seen)
        for value in got.values():  # the model's other parameters (requires_grad=True) left no autograd graph
            assert not value.requires_grad and value.grad_fn is None
        assert_groups_close(got, reference(model, batch, list(subset)), 1e-10)
    per = ff.per_sample_fisher(loss, subset, batch, spec=ff.Channel(0))
    assert set(per.groups) == set(subset)
    step = ff.make_fisher_step(loss, spec=ff.Channel(0), decay=0.0)
    state = step(subset, batch, step.init(subset))
    assert_groups_close(ff.estimate(state), reference(model, batch, list(subset)), 1e-10)


@pytest.mark.parametrize("precision", ["float32", "model"])
def test_a_subset_of_a_bfloat16_model_runs_in_one_dtype(precision: str) -> None:
    """The model's other parameters are cast with the subset under "float32" (before, a dtype mismatch)."""
    model = mlp().float().to(torch.bfloat16)
    x, y = data()
    batch = (x.to(torch.bfloat16), y)
    subset = {n: p for n, p in model.named_parameters() if n.startswith("4.")}
    got = ff.fisher(ff.losses.classification(model), subset, batch, spec=ff.Channel(0), precision=precision)
    expected = reference(model.double(), (x.to(torch.bfloat16).double(), y), list(subset))
    tol = 1e-5 if precision == "float32" else 25 * 2.0**-8
    assert_groups_close(got, expected, tol)


def test_skipped_parameters_cost_no_gradient_memory() -> None:
    """Direct path: every differentiated weight costs B per-sample gradients; skipping the 256×256 one saves them."""
    model, batch = mlp(), data(8)
    params = dict(model.named_parameters())
    loss = ff.losses.classification(model)
    big = 8 * 256 * 256 * 8  # B per-sample float64 gradients of 2.weight

    def peak(params: dict, spec: Any) -> int:
        with LiveBytes() as live:
            ff.fisher(loss, params, batch, spec=spec, path="direct")
        return live.peak

    everything = peak(params, ff.Channel(0))
    skipped = peak(params, {n: ff.Skip() if n == "2.weight" else ff.Channel(0) for n in params})
    subset = peak({n: p for n, p in params.items() if n != "2.weight"}, ff.Channel(0))
    assert everything - skipped >= big
    assert everything - subset >= big


@pytest.mark.skipif(not PEFT, reason="peft and transformers (fisherfunc[test]) are not installed")
def test_lora_adapters_only() -> None:
    import peft
    from reference import causal_cross_entropy
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, attn_implementation="eager",
    )  # fmt: skip
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    with warnings.catch_warnings():  # peft asks transformers for a deprecated attribute
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.get_peft_model(LlamaForCausalLM(config).double(), lora)
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    lengths = [8, 5, 3]
    ids = torch.randint(0, 60, (3, 8))
    mask = (torch.arange(8) < torch.tensor(lengths).unsqueeze(1)).long()
    loss = ff.hf.causal_lm(model)
    seen: list[set[str]] = []

    def tracking(params: dict, sample: Any) -> tuple[Tensor, Tensor]:
        seen.append({n for n, p in params.items() if torch._C._functorch.is_gradtrackingtensor(p)})
        return loss(params, sample)

    tracking.model = model  # type: ignore[attr-defined]  # what fisherfunc completes the subset from
    got = ff.fisher(tracking, adapters, {"input_ids": ids, "attention_mask": mask}, spec=ff.Channel(0))
    assert set(got) == set(adapters)
    assert seen and all(s <= set(adapters) for s in seen)
    unpadded = [{"input_ids": ids[b : b + 1, : lengths[b]]} for b in range(3)]
    expected = reference_fisher(
        model, unpadded, lambda m, s: causal_cross_entropy(m(**s).logits, s["input_ids"]),
        {n: ff.Channel(0) if n in adapters else ff.Skip() for n, _ in model.named_parameters()},
    )  # fmt: skip
    assert_groups_close(got, {n: expected[n] for n in adapters}, 1e-10)
