"""Mixtures of experts: per-expert and per-expert-channel Fisher, and the router's, against a naive loop.

Tiny float64 Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE models (hidden 16, 2 layers, 4 experts, top-2,
vocabulary 100) are built offline from configs. The reference is a plain loop over the **unpadded**
samples of a padded batch: an eval-mode copy of the model, with ``transformers``' own ``eager``
experts (the loop over the experts hit), called one sample at a time, differentiated with
``torch.autograd.grad``; its squared gradients are summed into groups here, by hand, from the
layouts stated in ``docs/experts.md``::

    gate_up_proj [E, 2I, H]:  F[e, c] = Σ_h g²[e, c, h]      down_proj [E, H, I]:  F[e, c] = Σ_i g²[e, c, i]
    one number per expert:    F[e]    = Σ g²[e]              router weight [E, H]:  F[e]    = Σ_h g²[e, h]

The library computes the same numbers through ``fisherfunc.hf.causal_lm(model)`` as a user calls
it (no ``causal=``; the loss runs the experts in their dense, verified form itself), on right- and left-padded
batches, on both paths of the engine: ``"direct"`` (``vmap(grad)`` of every parameter) and
``"auto"``, where the router's ``F.linear`` weight is factorised by output probes and the 3-D expert
tensors — never a probe site — are differentiated directly. Agreement: ≤ 1e-10 relative
per parameter (seen: ~1e-15).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc._engine.experts import check_jitter, dense_experts
from fisherfunc._engine.group_sums import find_sites
from fisherfunc._engine.numerics import prepare
from fisherfunc._spec.expert_layout import SELF_TEST_TOL, dense_forward, expert_layout
from fisherfunc._spec.experts import placements
from fisherfunc._spec.resolve import resolve_spec

transformers = pytest.importorskip("transformers", reason="fisherfunc[hf] (transformers) is not installed")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

TOL = 1e-10
E, K, H, V = 4, 2, 16, 100
LENGTHS = (7, 5, 3)
SIDES = ("right", "left")
PATHS = ("auto", "direct")
COMMON = dict(
    vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=12, max_position_embeddings=64, num_experts_per_tok=K,
)  # fmt: skip
#: family -> (config class name, its own options): every layer sparse, 4 experts.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", {"num_local_experts": E}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {"num_experts": E, "moe_intermediate_size": 6, "shared_expert_intermediate_size": 10, "decoder_sparse_step": 1},
    ),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": E, "moe_intermediate_size": 6, "decoder_sparse_step": 1}),
    "olmoe": ("OlmoeConfig", {"num_experts": E}),
    # PhiMoE's sparse mixer drops experts whose logit trails the best by 2·eps (relative); with the default
    # eps (0.01) only the best survives its softmax, the routing weight is exactly 1 and the router's gradient 0
    "phimoe": ("PhimoeConfig", {"num_local_experts": E, "router_jitter_noise": 1.0}),
}
#: Families whose router samples its experts in training mode (PhiMoE's sparse mixer): built in eval mode.
SAMPLING = ("phimoe",)


@pytest.fixture(autouse=True)
def quiet_transformers() -> Any:
    """Silence transformers' notices about the tiny configs."""
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(before)


# --- tiny models and batches ----------------------------------------------------------------------


def config_class(family: str) -> type:
    name = FAMILIES[family][0]
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"{family}: transformers {transformers.__version__} has no {name}")
    return cls


def build(family: str, seed: int = 0, **extra: Any) -> nn.Module:
    """A float64 tiny causal LM of ``family``, weights N(0, 0.2²), in training mode (as ``from_config`` builds it)
    — eval mode for the families of ``SAMPLING`` — skipped where ``transformers`` lacks it or it is refused."""
    cls = config_class(family)
    config = cls(**COMMON, **FAMILIES[family][1], **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)  # routing that differs from token to token, away from ties
    if family == "phimoe" and dense_routing_weights(model):
        pytest.skip(
            f"transformers {transformers.__version__}: PhiMoE's router returns [tokens, experts] routing weights, "
            "which its own eager experts index by top-k position: refused (test_phimoe_dense_routing_is_refused)"
        )
    return model.eval() if family in SAMPLING else model.train()


def dense_routing_weights(model: nn.Module) -> bool:
    """Whether the first layer's router returns routing weights ``[tokens, experts]`` rather than ``[tokens, k]``."""
    with torch.no_grad():
        *_, weights, _indices = router_module(model, 0).eval()(torch.randn(3, H, dtype=torch.float64))
    return weights.shape == (3, E)


def router_module(model: nn.Module, layer: int) -> nn.Module:
    mlp = model.model.layers[layer].mlp
    return getattr(mlp, "router", None) or mlp.gate


def padded_batch(side: str, seed: int = 1) -> dict[str, Tensor]:
    """``input_ids``/``attention_mask`` ``[3, 7]`` for sequences of ``LENGTHS``, padded on ``side`` with id 0."""
    generator = torch.Generator().manual_seed(seed)
    t = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(LENGTHS):
        real = slice(0, n) if side == "right" else slice(t - n, t)
        ids[b, real] = torch.randint(1, V, (n,), generator=generator)
        mask[b, real] = 1
    return {"input_ids": ids, "attention_mask": mask}


def moe_names(model: nn.Module) -> list[str]:
    """The experts' and routers' parameter names."""
    routers = ("mlp.gate.weight", "mlp.router.weight")
    return [n for n, _ in model.named_parameters() if ".experts." in n or n.endswith(routers)]


def eager_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy running ``transformers``' own eager experts (the loop over the experts hit)."""
    reference = copy.deepcopy(model).eval()
    reference.config._experts_implementation = "eager"
    return reference


# --- the reference: a naive loop over unpadded samples, groups by hand -----------------------------


def naive_squares(
    model: nn.Module, batch: dict[str, Tensor], names: list[str]
) -> tuple[list[dict[str, Tensor]], Tensor]:
    """Per-sample ``g ⊙ g`` of ``names`` and the token counts, one unpadded sample at a time."""
    reference = eager_copy(model)
    params = dict(reference.named_parameters())
    squares, tokens = [], []
    for b in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][b, batch["attention_mask"][b] != 0].unsqueeze(0)
        logits = reference(input_ids=ids).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        squares.append({n: g.square() for n, g in zip(names, grads, strict=True)})
        tokens.append(ids.shape[1] - 1)
    return squares, torch.tensor(tokens, dtype=torch.float64)


def per_expert_channel(g2: Tensor) -> Tensor:
    """``F[e, c] = Σ g²[e, c, :]`` (axis 1 holds each expert's output channels)."""
    return torch.stack([torch.stack([g2[e, c].sum() for c in range(g2.shape[1])]) for e in range(g2.shape[0])])


def per_expert(g2: Tensor) -> Tensor:
    """``F[e] = Σ g²[e]``: every entry of expert ``e`` (the router: its row ``e``)."""
    return torch.stack([g2[e].sum() for e in range(g2.shape[0])])


def by_hand(name: str, g2: Tensor, experts_whole: bool) -> Tensor:
    if ".experts." in name and not experts_whole:
        return per_expert_channel(g2)
    return per_expert(g2)


def reference_groups(
    model: nn.Module, batch: dict[str, Tensor], experts_whole: bool
) -> tuple[dict[str, Tensor], Tensor]:
    names = moe_names(model)
    squares, tokens = naive_squares(model, batch, names)
    groups = {n: torch.stack([by_hand(n, s[n], experts_whole) for s in squares]) for n in names}
    return groups, tokens


def moe_spec(model: nn.Module, experts_whole: bool) -> dict[str, ff.Rule]:
    """``infer_spec``'s rules for experts and routers (``Channel(0)`` experts if ``experts_whole``); rest skipped."""
    overrides: dict[str, ff.Rule] = {"*.experts.*": ff.Channel(0)} if experts_whole else {}
    inferred = infer(model, **overrides)
    keep = set(moe_names(model))
    return {n: (rule if n in keep else ff.Skip()) for n, rule in inferred.items()}


def infer(model: nn.Module, **overrides: ff.Rule) -> dict[str, ff.Rule]:
    """``infer_spec`` with attention skipped: its per-head rules (and refusals) are not this file's subject."""
    return ff.infer_spec(model, overrides={**overrides, "*.self_attn.*": ff.Skip()})


def rel_err(actual: Tensor, expected: Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert float(expected.abs().max()) > 0, "a reference that is all zeros tests nothing"
    return float((actual - expected).abs().max() / expected.abs().max())


# --- conventions on the live models ---------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_infer_spec_places_expert_channels_and_router_rows(family: str) -> None:
    model = build(family)
    spec = infer(model)
    for layer in range(2):
        mlp = f"model.layers.{layer}.mlp"
        assert spec[f"{mlp}.experts.gate_up_proj"] == ff.ExpertChannels(1)
        assert spec[f"{mlp}.experts.down_proj"] == ff.ExpertChannels(1)
        router = "router" if family == "phimoe" else "gate"
        assert spec[f"{mlp}.{router}.weight"] == ff.Channel(0)
        assert router_module(model, layer).weight.shape == (E, H)
        experts = model.get_submodule(f"{mlp}.experts")
        assert tuple(experts.gate_up_proj.shape)[:2] == (E, 2 * expert_layout(experts).intermediate)
        assert tuple(experts.down_proj.shape)[:2] == (E, H)
    shapes = {n: spec[n].group_shape(p.shape, n) for n, p in model.named_parameters() if n in moe_names(model)}
    assert shapes["model.layers.0.mlp.experts.down_proj"] == torch.Size([E, H])
    assert shapes[f"model.layers.0.mlp.{router}.weight"] == torch.Size([E])


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_experts_compute_the_models_own_outputs(family: str) -> None:
    """Whole model: logits with the dense experts equal those of transformers' eager experts (≤ 1e-12)."""
    model = build(family).eval()
    reference = eager_copy(model)
    ids = padded_batch("right")["input_ids"][:1]
    with torch.no_grad():
        own = reference(input_ids=ids).logits
        with dense_experts(model):
            dense = model(input_ids=ids).logits
    assert rel_err(dense, own) <= SELF_TEST_TOL
    assert all("forward" not in m.__dict__ for m in model.modules()), "the swap outlived its scope"


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), tokens=st.integers(1, 9))
def test_dense_form_equals_the_modules_eager_forward_for_any_routing(seed: int, tokens: int) -> None:
    """Any top-k choice and weights: the dense form is the module's own function (Mixtral's experts)."""
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    experts = build("mixtral").model.layers[0].mlp.experts
    layout = expert_layout(experts)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=generator, dtype=torch.float64)
    index = torch.stack([torch.randperm(E, generator=generator)[:K] for _ in range(tokens)])
    weights = torch.rand(tokens, K, generator=generator, dtype=torch.float64)
    eager = (
        type(experts).forward.__wrapped__ if hasattr(type(experts).forward, "__wrapped__") else type(experts).forward
    )
    with torch.no_grad():
        own = eager(experts, x, index, weights)
        dense = dense_forward(experts, layout, x, index, weights)
    assert rel_err(dense, own) <= SELF_TEST_TOL


def test_the_self_test_runs_inside_vmap_too() -> None:
    """A block first entered inside a vectorised function verifies there (no random op) and is exact."""
    experts = build("olmoe").eval().model.layers[0].mlp.experts
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, H, generator=generator, dtype=torch.float64)
    index = torch.stack([torch.randperm(E, generator=generator)[:K] for _ in range(6)])
    weights = torch.rand(6, K, generator=generator, dtype=torch.float64)

    def one(tokens: Tensor) -> Tensor:
        with dense_experts(experts):
            return experts(tokens, index, weights)

    got = torch.func.vmap(one)(x)
    eager = getattr(type(experts).forward, "__wrapped__", type(experts).forward)
    want = torch.stack([eager(experts, x[b], index, weights) for b in range(3)])
    assert rel_err(got.detach(), want.detach()) <= SELF_TEST_TOL


# --- exactness: per expert, per expert channel, router; both paths, both paddings ------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", SIDES)
def test_expert_channels_and_router_equal_a_naive_loop(family: str, side: str) -> None:
    model = build(family)
    batch = padded_batch(side)
    expected, tokens = reference_groups(model, batch, experts_whole=False)
    spec = moe_spec(model, experts_whole=False)
    params = dict(model.named_parameters())
    loss = ff.hf.causal_lm(model)  # it runs the experts densely itself
    runs = {
        path: (
            ff.per_sample_fisher(loss, params, batch, spec=spec, path=path),
            ff.fisher(loss, params, batch, spec=spec, path=path),
        )
        for path in PATHS
    }
    for path, (got, one_shot) in runs.items():
        assert torch.equal(got.tokens.double(), tokens)
        for name, ref in expected.items():
            err = rel_err(got.groups[name], ref)
            assert err <= TOL, f"{family} {side} {path} {name}: relative error {err:.2e}"
        for name, ref in expected.items():
            assert rel_err(one_shot[name], ref.sum(0) / tokens.sum()) <= TOL, f"{family} {side} {path} {name}"


@pytest.mark.parametrize("family", FAMILIES)
def test_one_number_per_expert_equals_a_naive_loop(family: str) -> None:
    """``Channel(0)`` on a fused expert tensor: one number per expert, both paths, left padding."""
    model = build(family, seed=3)
    batch = padded_batch("left", seed=4)
    expected, tokens = reference_groups(model, batch, experts_whole=True)
    spec = moe_spec(model, experts_whole=True)
    loss = ff.hf.causal_lm(model)  # it runs the experts densely itself
    runs = {path: ff.fisher(loss, dict(model.named_parameters()), batch, spec=spec, path=path) for path in PATHS}
    for path, got in runs.items():
        for name, ref in expected.items():
            assert got[name].shape == (E,)
            err = rel_err(got[name], ref.sum(0) / tokens.sum())
            assert err <= TOL, f"{family} {path} {name}: relative error {err:.2e}"


def test_paths_router_is_factorised_experts_are_direct() -> None:
    """On ``path="auto"`` the router's ``F.linear`` weight is a probe site; 3-D expert tensors never are."""
    model = build("mixtral")
    params = dict(model.named_parameters())
    resolved = resolve_spec(infer(model), params)
    sample = {k: v[0] for k, v in padded_batch("right").items()}
    loss = ff.hf.causal_lm(model)  # it runs the experts densely itself
    sites = {resolved.names[s.leaf] for s in find_sites(loss, prepare(params), resolved, sample)}
    assert "model.layers.0.mlp.gate.weight" in sites
    assert not any(".experts." in name for name in sites)


def test_an_experts_module_replaced_between_calls_runs_dense_too() -> None:
    # the verified layouts are kept per model; an experts module swapped for another object after a
    # first call must be found and run in its dense form as well (patching only the old one would
    # leave the new one in its fused form: double-precision grouped products refuse, and a number
    # computed by a form the engine did not verify would not be ours to trust)
    model = build("mixtral")
    batch = padded_batch("right")
    spec = moe_spec(model, experts_whole=False)
    loss = ff.hf.causal_lm(model)
    before = ff.fisher(loss, dict(model.named_parameters()), batch, spec=spec)
    block = model.model.layers[0].mlp
    replacement = copy.deepcopy(block.experts)  # the same weights in a new module object ...
    if hasattr(replacement, "config"):
        replacement.config = model.config  # ... reading the model's config, as one built from it would
    block.experts = replacement
    after = ff.fisher(loss, dict(model.named_parameters()), batch, spec=spec)
    expected, tokens = reference_groups(model, batch, experts_whole=False)
    for name, ref in expected.items():
        assert rel_err(after[name], ref.sum(0) / tokens.sum()) <= TOL, name
        assert rel_err(after[name], before[name]) <= TOL, name


def test_an_experts_module_resized_in_place_is_verified_again() -> None:
    # a layout is verified for its module's shapes: experts resized in place (a smaller inner size,
    # the module's own forward following) must not be run with the layout found before
    model = build("mixtral")
    batch = padded_batch("right")
    spec = moe_spec(model, experts_whole=False)
    loss = ff.hf.causal_lm(model)
    ff.fisher(loss, dict(model.named_parameters()), batch, spec=spec)
    experts = model.model.layers[0].mlp.experts
    inner = experts.intermediate_dim // 2
    generator = torch.Generator().manual_seed(5)
    experts.intermediate_dim = inner
    experts.gate_up_proj = nn.Parameter(0.2 * torch.randn(E, 2 * inner, H, generator=generator, dtype=torch.float64))
    experts.down_proj = nn.Parameter(0.2 * torch.randn(E, H, inner, generator=generator, dtype=torch.float64))
    spec = moe_spec(model, experts_whole=False)
    after = ff.fisher(loss, dict(model.named_parameters()), batch, spec=spec)
    expected, tokens = reference_groups(model, batch, experts_whole=False)
    for name, ref in expected.items():
        assert rel_err(after[name], ref.sum(0) / tokens.sum()) <= TOL, name


def test_padding_does_not_change_the_fisher() -> None:
    model = build("qwen2_moe")
    params = dict(model.named_parameters())
    loss = ff.hf.causal_lm(model)  # it runs the experts densely itself
    right, left = (ff.fisher(loss, params, padded_batch(side), spec=moe_spec(model, False)) for side in SIDES)
    for name in moe_names(model):
        assert rel_err(left[name], right[name]) <= TOL, name


# --- geometry of ExpertChannels -------------------------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    axis_choice=st.integers(0, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_expert_channels_geometry(shape: list[int], axis_choice: int, seed: int) -> None:
    """Sums by hand, conservation, membership stated = derived, per expert = ``Channel(0)``; square sums on 2-D."""
    axis = 1 + axis_choice % (len(shape) - 1)
    rule = ff.ExpertChannels(axis)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    groups = rule.reduce(x)
    assert groups.shape == rule.group_shape(torch.Size(shape)) == (shape[0], shape[axis])
    for e in range(shape[0]):
        for c in range(shape[axis]):
            assert torch.isclose(groups[e, c], x[e].select(axis - 1, c).sum(), rtol=1e-14, atol=0)
    assert torch.isclose(groups.sum(), x.sum(), rtol=1e-13)
    assert torch.allclose(groups.sum(1), ff.Channel(0).reduce(x), rtol=1e-13, atol=0)
    assert torch.equal(rule.membership(shape), ff.Rule.membership(rule, shape))
    if len(shape) == 2:  # a bias [E, out]: the sums it asks for give its groups (the factorised protocol)
        sums = rule.square_sums(shape)
        given_sums = {"rows": x.sum(1), "cols": x.sum(0), "full": x}[sums]
        assert torch.allclose(rule.from_square_sums(shape, sums)(given_sums), groups, rtol=1e-13, atol=0)
    else:  # 3-D expert tensors have no 2-D square sums: they take the direct path
        with pytest.raises(ff.SpecError, match="2-D"):
            rule.square_sums(shape)


def test_expert_channels_refuse_shapes_they_do_not_fit() -> None:
    with pytest.raises(ff.SpecError, match="'w'.*axis 0 is the expert"):
        ff.ExpertChannels(0).group_shape(torch.Size([4, 3, 2]), "w")
    with pytest.raises(ff.SpecError, match="'b'.*2\\+ axes"):
        ff.ExpertChannels(1).group_shape(torch.Size([4]), "b")
    with pytest.raises(ff.SpecError, match="'w'"):
        ff.ExpertChannels(3).group_shape(torch.Size([4, 3, 2]), "w")


def test_expert_channels_keys_and_fisher_on_a_plain_module() -> None:
    """A user's module with a 3-D weight: the rule works in ``fisher`` (direct path) and keys."""

    class Bank(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4, 5, dtype=torch.float64))

        def forward(self, x: Tensor) -> Tensor:
            return torch.einsum("bh,eoh->bo", x, self.w)

    bank = Bank()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randn(6, 4, dtype=torch.float64)
    loss = ff.losses.regression(bank, inputs=0, targets=1)
    got = ff.fisher(loss, dict(bank.named_parameters()), (x, y), spec={"w": ff.ExpertChannels(1)})
    total = torch.zeros(3, 4, dtype=torch.float64)
    for b in range(6):
        (g,) = torch.autograd.grad(((bank(x[b : b + 1]) - y[b : b + 1]) ** 2).sum() / 2, [bank.w])
        total += per_expert_channel(g.square())
    assert rel_err(got["w"], total / 6) <= TOL
    assert list(ff.to_keyed(got, spec={"w": ff.ExpertChannels(1)}, task="t")) == ["t|w|expert_channel"]


# --- refusals -------------------------------------------------------------------------------------


def permuted_experts(model: nn.Module) -> nn.Module:
    """A copy whose layer-0 experts send token choices to the next expert: a layout the dense form does not have."""
    copy_ = copy.deepcopy(model)
    base = type(copy_.model.layers[0].mlp.experts)

    class ShiftedExperts(base):  # type: ignore[misc, valid-type]
        def forward(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
            return super().forward(hidden, (top_k_index + 1) % self.num_experts, top_k_weights)

    copy_.model.layers[0].mlp.experts.__class__ = ShiftedExperts
    return copy_


def test_a_permuted_expert_layout_is_refused_by_name() -> None:
    model = permuted_experts(build("mixtral"))
    model.config._experts_implementation = "eager"
    bad = "model.layers.0.mlp.experts"
    with pytest.raises(ff.SpecError, match=f"{bad}.gate_up_proj|{bad} \\(ShiftedExperts\\)"):
        infer(model)
    with pytest.raises(ff.SpecError, match=f"{bad} \\(ShiftedExperts\\): its forward differs"), dense_experts(model):
        pytest.fail("the block must not start")
    assert all("forward" not in m.__dict__ for m in model.modules())
    # an override covers the spec, but the experts still cannot run per sample
    spec = infer(model, **{f"{bad}.*": ff.Whole()})
    assert spec[f"{bad}.down_proj"] == ff.Whole()
    assert placements(build("mixtral"))["model.layers.0.mlp.experts.down_proj"] == ff.ExpertChannels(1)


def test_a_router_whose_rows_are_not_the_experts_is_refused() -> None:
    model = build("olmoe")
    router = model.model.layers[1].mlp.gate

    class Reversed(type(router)):  # type: ignore[misc]
        def forward(self, hidden: Tensor) -> Any:
            logits, scores, index = super().forward(hidden)
            return logits, scores, self.num_experts - 1 - index

    router.__class__ = Reversed
    with pytest.raises(ff.SpecError, match="model.layers.1.mlp.gate \\(Reversed\\).*does not choose expert 0"):
        infer(model)
    spec = infer(model, **{"model.layers.1.mlp.gate.weight": ff.Elementwise()})
    assert spec["model.layers.0.mlp.gate.weight"] == ff.Channel(0)


def test_router_jitter_in_training_mode_is_refused_under_eval_dropout() -> None:
    model = build("mixtral", router_jitter_noise=0.1)
    with pytest.raises(ValueError, match="model.layers.0.mlp \\(MixtralSparseMoeBlock\\).*jitter_noise=0.1"):
        check_jitter(model, "eval")
    check_jitter(model, "train")  # the Fisher of the noisy model: each sample draws its own noise
    check_jitter(model.eval(), "eval")


def test_dense_experts_leave_other_models_alone_and_nest() -> None:
    net = nn.Linear(2, 2)
    with dense_experts(net):
        assert "forward" not in net.__dict__
    model = build("qwen3_moe").eval()
    experts = model.model.layers[0].mlp.experts
    with dense_experts(model):
        outer = experts.__dict__["forward"]
        with dense_experts(model):
            assert experts.__dict__["forward"] is not outer
        assert experts.__dict__["forward"] is outer
    assert "forward" not in experts.__dict__


def test_the_swap_is_undone_on_error() -> None:
    model = build("mixtral").eval()
    with pytest.raises(RuntimeError, match="boom"), dense_experts(model):
        assert "forward" in model.model.layers[0].mlp.experts.__dict__
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_phimoe_dense_routing_is_refused() -> None:
    """transformers 5.0's PhiMoE: routing weights ``[tokens, experts]`` are refused with a message, not misread."""
    cls = config_class("phimoe")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**COMMON, **FAMILIES["phimoe"][1])).double().eval()
    if not dense_routing_weights(model):
        pytest.skip(f"transformers {transformers.__version__}: PhiMoE's router returns one weight per chosen expert")
    with pytest.raises(ValueError, match="PhimoeExperts: routing weights of shape \\(\\d+, 4\\).*\\(\\d+, 2\\)"):
        with dense_experts(model):  # the builder's own probes (or the first per-sample call) meet it
            loss = ff.hf.causal_lm(model, causal=True)
            ff.fisher(loss, dict(model.named_parameters()), padded_batch("right"), spec=moe_spec(model, False))


# --- the losses enter dense_experts themselves ----------------------------------------------------


def test_a_model_loss_runs_its_models_experts_dense_by_itself() -> None:
    model = build("mixtral").eval()
    loss = ff.losses.causal_lm(model, inputs="input_ids", output="logits")
    batch = {"input_ids": padded_batch("right")["input_ids"][:, :3]}  # no padding: the generic loss
    params, spec = dict(model.named_parameters()), moe_spec(model, False)
    with dense_experts(model):
        want = ff.fisher(loss, params, batch, spec=spec)
    got = ff.fisher(loss, params, batch, spec=spec)
    for name in moe_names(model):
        assert rel_err(got[name], want[name]) <= TOL, name
