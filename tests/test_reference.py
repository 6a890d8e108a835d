"""fisherfunc agrees with an independent naive per-sample loop (``tests/reference.py``).

The reference calls each module on one sample at a time, differentiates that sample's summed loss
with ``torch.autograd.grad`` and sums the squares into groups with explicit loops. Relative error
is ``max|a − b| / max|b|`` per parameter:

* float64 models: ``≤ 1e-10`` (the library and the reference differ only in summation order);
* float32 models: ``≤ 1e-5`` against the reference on a float64 copy of the same model (float32
  rounding through these few layers measures 6e-8 … 9e-7; 1e-5 leaves a margin above 10×, and a
  genuine error — a wrong group, a missing token, a wrong normaliser — is O(1)).

Every library call runs on both computation paths (``path="auto"``: output probes where a weight
qualifies; ``path="direct"``: ``vmap(grad)`` of every parameter).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from reference import (
    SampleLoss,
    assert_groups_close,
    assert_rel_close,
    cast_batch,
    causal_cross_entropy,
    count_tokens,
    cross_entropy_sum,
    full_spec,
    gaussian_nll_sum,
    reduce_groups,
    reference_fisher,
    reference_per_sample,
    to_float64,
    token_cross_entropy,
)
from torch import nn

import fisherfunc as ff
from fisherfunc.testing import cases

F64_TOL = 1e-10
F32_TOL = 1e-5
# torch.func has no batching rule for a few ops (EmbeddingBag, CPU flash attention) and falls back
# to a correct but slower loop with a UserWarning; the library silences it inside its engine, and
# warnings are errors here, so a leak would fail these tests.


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


# --- cases: registry models, each with the reference's own per-sample loss ------------------------


def _classify(m: nn.Module, s: tuple) -> tuple[torch.Tensor, float]:
    return cross_entropy_sum(m(s[0]), s[1])


def _tokens(m: nn.Module, s: dict) -> tuple[torch.Tensor, float]:
    return token_cross_entropy(m(s["input_ids"]), s["labels"], s["attention_mask"])


def _tokens_ignore(m: nn.Module, s: dict) -> tuple[torch.Tensor, float]:
    return token_cross_entropy(m(s["input_ids"]), s["labels"], None, ignore_index=-1)


def _causal_labels(m: nn.Module, s: dict) -> tuple[torch.Tensor, float]:
    return causal_cross_entropy(m(s["input_ids"]), s["labels"], s["attention_mask"])


def _causal_ids(m: nn.Module, s: dict) -> tuple[torch.Tensor, float]:
    return causal_cross_entropy(m(s["input_ids"]), s["input_ids"], s["attention_mask"])


def _encoder(m: nn.Module, s: dict) -> tuple[torch.Tensor, float]:
    return causal_cross_entropy(m(s["input_ids"], s["attention_mask"]), s["input_ids"], s["attention_mask"])


def _gaussian(variance: float) -> SampleLoss:
    return lambda m, s: gaussian_nll_sum(m(s[0]), s[1], variance)


def _cross(m: nn.Module, s: dict) -> tuple[torch.Tensor, float]:
    return gaussian_nll_sum(m(s["q"], s["k"], s["v"]), s["y"], 0.5)


def _log_cosh_library(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    # log cosh(d) = d + softplus(−2d) − log 2; one "token" per output.
    d = pred - y
    return (d + F.softplus(-2.0 * d) - math.log(2.0)).sum(), y.numel()


def _log_cosh(m: nn.Module, s: tuple) -> tuple[torch.Tensor, float]:
    return torch.log(torch.cosh(m(s[0]) - s[1])).sum(), float(s[1][0].numel())


@dataclasses.dataclass(frozen=True)
class Family:
    """A registry case (entry, seed, sizes) with the matching reference loss.

    Attributes:
        entry: the registry entry (``fisherfunc.testing.cases``).
        sizes: its sizes; a tuple ``batch`` gives several batches (different sizes and padding).
        ref_loss: the reference per-sample loss ``(model, one_sample_batch) -> (loss_sum, n)``.
        seed: the case's seed.
        make_loss: builds the library's loss for the model, instead of the entry's own.
    """

    entry: str
    sizes: dict[str, Any]
    ref_loss: SampleLoss
    seed: int = 0
    make_loss: Callable[[nn.Module], Any] | None = None

    def build(self, dtype: torch.dtype = torch.float32, spec: Any = None, **sizes: Any) -> Case:
        case = cases.case(self.entry, seed=self.seed, dtype=dtype, **(self.sizes | sizes))
        loss = case.loss if self.make_loss is None else self.make_loss(case.model)
        return Case(case.model, loss, self.ref_loss, list(case.batches), spec)


@dataclasses.dataclass
class Case:
    """A model with its library loss, the matching reference loss, and a few batches.

    Attributes:
        model: the module (eval mode).
        loss: the library's per-sample loss of ``model``.
        ref_loss: the reference per-sample loss ``(model, one_sample_batch) -> (loss_sum, n)``.
        batches: a list of batches (different sizes, different padding).
        spec: the spec given to both (``None``: inferred).
    """

    model: nn.Module
    loss: Any
    ref_loss: SampleLoss
    batches: list[Any]
    spec: Any = None

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.named_parameters()}


TOKENS = {"vocab": 13, "dim": 8, "hidden": 16, "padding_idx": True}  # Embedding → LayerNorm → residual MLP → head
MLP = {"features": 6, "hidden": (10, 10), "activation": ("tanh", "gelu")}
REGRESSION = {"features": 5, "hidden": (8, 8), "activation": ("tanh", "gelu"), "outputs": 3, "batch": (5, 4)}

FAMILIES: dict[str, Family] = {
    "mlp": Family("mlp", MLP | {"classes": 5, "batch": (5, 3)}, _classify, seed=0),
    "cnn": Family("conv_stack", {"batch": (4, 3)}, _classify, seed=1),
    "conv_transpose": Family("deconv_stack", {"batch": (4, 3)}, _classify, seed=2),
    "tokens_masked": Family(
        "token_classification",
        TOKENS | {"classes": 13, "batch": (5, 4), "seq_len": (7, 6), "ignore_frac": 0.2},
        _tokens,
        3,
    ),
    # a non-default ignore_index and no padding mask
    "tokens_ignore_index": Family(
        "token_classification",
        TOKENS | {"classes": 13, "batch": (4, 4), "seq_len": 6, "mask": False, "ignore_index": -1, "ignore_frac": 0.4},
        _tokens_ignore,
        4,
    ),
    # causal LM with labels (holding ignore_index) and a padding mask
    "causal_lm_labels": Family(
        "causal_lm",
        TOKENS | {"labels": True, "ignore_frac": 0.2, "batch": (5, 3), "seq_len": (7, 5)},
        _causal_labels,
        5,
    ),
    # causal LM whose targets are the input ids themselves, with a padding mask
    "causal_lm_ids": Family("causal_lm", TOKENS | {"batch": (4, 4), "seq_len": (7, 5)}, _causal_ids, 6),
    # post-LN and pre-LN encoder layers, key padding mask, random norm affine parameters
    "transformer_encoder": Family(
        "transformer",
        {"vocab": 11, "heads": 2, "head_dim": 4, "norm_first": (False, True), "batch": (4, 3), "seq_len": (6, 5)},
        _encoder,
        7,
    ),
    "mha_fused": Family("self_attention", {"variance": 0.7, "batch": (4, 3)}, _gaussian(0.7), 8),
    "mha_fused_bias_kv": Family(
        "self_attention",
        {"heads": 4, "bias_kv": True, "need_weights": False, "variance": 1.3, "batch": (4, 3)},
        _gaussian(1.3),
        9,
    ),
    "mha_kdim_vdim_bias_kv": Family("cross_attention", {"batch": (4, 3)}, _cross, 10),
    "embedding_bag": Family("embedding_bag", {"batch": (5, 3)}, _classify, 11),
    "norms": Family("norms", {"batch": (4, 3)}, _classify, 12),
    "regression": Family("regression", REGRESSION | {"variance": 0.5}, _gaussian(0.5), 13),
    "custom": Family("regression", REGRESSION, _log_cosh, 14, lambda m: ff.losses.custom(m, _log_cosh_library)),
}

#: A sequence classifier with an Embedding, Linears and an attention layer: a target for every rule.
RULES = Family("sequence_classifier", {"batch": (4, 3)}, _classify, 15)


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]


@pytest.fixture(params=["auto", "direct"])
def path(request: pytest.FixtureRequest) -> str:
    """The library's computation path: output probes where possible, or ``vmap(grad)`` throughout."""
    return request.param


# --- the reference itself -------------------------------------------------------------------------


def test_reference_reducer_hand_values() -> None:
    """The hand-written reducer on a tiny tensor whose group sums are worked out by hand."""
    x = torch.arange(24, dtype=torch.float64).reshape(6, 4)  # rows 0..5, entries 4r + c
    row = [4 * r * 4 + 6 for r in range(6)]  # Σ_c (4r + c) = 16r + 6
    col = [sum(4 * r + c for r in range(6)) for c in range(4)]  # 60 + 6c
    assert reduce_groups(ff.Channel(0), x).tolist() == row
    assert reduce_groups(ff.Channel(1), x).tolist() == col
    assert reduce_groups(ff.Channel(-1), x).tolist() == col
    assert reduce_groups(ff.Rows(), x).tolist() == row
    assert reduce_groups(ff.Whole(), x).item() == 276
    assert reduce_groups(ff.Heads(3), x).tolist() == [row[0] + row[1], row[2] + row[3], row[4] + row[5]]
    assert reduce_groups(ff.Heads(2, axis=1), x).tolist() == [col[0] + col[1], col[2] + col[3]]
    # parts=3, 1 head: blocks of 2 rows; parts=1 vs 3 only reshapes.
    assert reduce_groups(ff.Heads(1, parts=3), x).tolist() == [[row[0] + row[1]], [row[2] + row[3]], [row[4] + row[5]]]
    # Buckets(4) over 6 rows: ⌊v·4/6⌋ = 0,0,1,2,2,3.
    assert reduce_groups(ff.Buckets(4), x).tolist() == [row[0] + row[1], row[2], row[3] + row[4], row[5]]
    mapping = (2, 0, 2, 1, 0, 2)
    assert reduce_groups(ff.Buckets(mapping=mapping), x).tolist() == [row[1] + row[4], row[3], row[0] + row[2] + row[5]]
    # ConvTranspose layout, weight [in=6, out/G=4] with G=2: channel g·4 + j sums rows 3g..3g+2 at column j.
    grouped = reduce_groups(ff.Channel(1, groups=2), x).tolist()
    assert grouped == [sum(4 * r + j for r in range(3 * g, 3 * g + 3)) for g in range(2) for j in range(4)]
    assert reduce_groups(ff.Skip(), x) is None


# --- every family, float64 and float32 ------------------------------------------------------------


def test_family_float64(family: Family, path: str) -> None:
    case = family.build(torch.float64)
    got = ff.fisher(case.loss, case.params, case.batches, spec=case.spec, path=path)
    ref = reference_fisher(case.model, case.batches, case.ref_loss, case.spec)
    assert all(v.dtype == torch.float64 for v in got.values() if v is not None)
    assert_groups_close(got, ref, F64_TOL)


def test_family_float32(family: Family, path: str) -> None:
    case = family.build(torch.float32)
    got = ff.fisher(case.loss, case.params, case.batches, spec=case.spec, path=path)
    ref = reference_fisher(
        to_float64(case.model), [cast_batch(b, torch.float64) for b in case.batches], case.ref_loss, case.spec
    )
    assert all(v.dtype == torch.float32 for v in got.values() if v is not None)
    assert_groups_close(got, ref, F32_TOL)


# --- every rule -----------------------------------------------------------------------------------

_MAPPING = (3, 1, 0, 2, 2, 1, 0, 3, 3, 1, 0, 0)
RULE_CASES: list[tuple[str, ff.Rule]] = [
    ("lin.weight", ff.Channel(0)),
    ("lin.weight", ff.Channel(1)),
    ("lin.weight", ff.Channel(-1)),
    ("lin.weight", ff.Channel(-2)),
    ("lin.bias", ff.Channel(-1)),
    ("lin.weight", ff.Heads(3)),
    ("lin.weight", ff.Heads(3, axis=1)),
    ("lin.weight", ff.Heads(2, axis=0, parts=3)),
    ("lin.weight", ff.Heads(1, axis=-1, parts=3)),
    ("attn.in_proj_weight", ff.Heads(2, axis=0, parts=3)),
    ("attn.in_proj_weight", ff.Heads(2, axis=1, parts=3)),
    ("attn.in_proj_bias", ff.Heads(2, parts=3)),
    ("attn.out_proj.weight", ff.Heads(2, axis=1)),
    ("attn.out_proj.weight", ff.Heads(4, axis=0)),
    ("emb.weight", ff.Rows()),
    ("emb.weight", ff.Buckets(4)),
    ("emb.weight", ff.Buckets(5)),  # 12 rows into 5 uneven buckets
    ("emb.weight", ff.Buckets(mapping=_MAPPING)),
    ("emb.weight", ff.Buckets(num_buckets=6, mapping=_MAPPING)),  # buckets 4 and 5 stay empty
    ("emb.weight", ff.Elementwise()),
    ("head.weight", ff.Elementwise()),
    ("attn.in_proj_weight", ff.Whole()),
    ("head.bias", ff.Whole()),
    ("lin.weight", ff.Skip()),
    ("attn.out_proj.bias", ff.Skip()),
]


@pytest.mark.parametrize(("name", "rule"), RULE_CASES, ids=[f"{n}-{r!r}" for n, r in RULE_CASES])
def test_rule_matches_reference(name: str, rule: ff.Rule, path: str) -> None:
    base = RULES.build(torch.float64)
    spec = {**full_spec(base.model), name: rule}
    case = dataclasses.replace(base, spec=spec)
    got = ff.fisher(case.loss, case.params, case.batches, spec=spec, path=path)
    ref = reference_fisher(case.model, case.batches, case.ref_loss, spec)
    if isinstance(rule, ff.Skip):
        assert got[name] is None
    else:
        assert got[name].shape == rule.group_shape(case.params[name].shape)
    assert_groups_close(got, ref, F64_TOL)


@pytest.mark.parametrize("rule", [ff.Elementwise(), ff.Whole(), ff.Channel(0)], ids=repr)
def test_single_rule_spec_broadcasts(rule: ff.Rule, path: str) -> None:
    case = RULES.build(torch.float64)
    got = ff.fisher(case.loss, case.params, case.batches, spec=rule, path=path)
    assert_groups_close(got, reference_fisher(case.model, case.batches, case.ref_loss, rule), F64_TOL)


def test_conv_transpose_group_layout() -> None:
    """Channel(1, groups=G)'s output channel ``g·(out/G) + j`` is the layer's output channel.

    Perturbing weight entry ``[g·in/G + i, j]`` of a grouped ConvTranspose2d changes only output
    channel ``g·(out/G) + j``: the layout the reference reducer assumes is the layer's own.
    """
    layer = cases.case("deconv_stack", seed=16).model.t2b  # ConvTranspose2d(6, 9, 3, groups=3, stride=2)
    assert (layer.in_channels, layer.out_channels, layer.groups) == (6, 9, 3)
    x = torch.randn(1, 6, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    base = layer(x).detach()
    in_per, out_per = 6 // 3, 9 // 3
    for g in range(3):
        for j in range(out_per):
            for i in range(in_per):
                bumped = copy.deepcopy(layer)
                with torch.no_grad():
                    bumped.weight[g * in_per + i, j] += 1.0
                changed = (bumped(x) - base).abs().amax((0, 2, 3)) > 1e-12
                assert changed.nonzero().flatten().tolist() == [g * out_per + j]


# --- Skip is not differentiated -------------------------------------------------------------------


class _RecordingScale(torch.autograd.Function):
    """``x * w``; its backward records ``ctx.needs_input_grad`` so a test can see what was differentiated."""

    generate_vmap_rule = True
    records: list[tuple[bool, ...]] = []

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * w

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, w = ctx.saved_tensors
        _RecordingScale.records.append(tuple(ctx.needs_input_grad))
        gx = grad * w if ctx.needs_input_grad[0] else None
        gw = (grad * x).sum_to_size(w.shape) if ctx.needs_input_grad[1] else None
        return gx, gw


class ProbeNet(nn.Module):
    """MLP with a per-channel ``scale`` parameter that records whether it is being differentiated."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.scale = nn.Parameter(0.5 + torch.rand(4))
        self.head = nn.Linear(4, 3)
        self.tracked: dict[str, list[bool]] = {"scale": [], "lin.weight": []}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inside torch.func.grad a differentiated tensor reports requires_grad=True; a constant does not.
        self.tracked["scale"].append(bool(self.scale.requires_grad))
        self.tracked["lin.weight"].append(bool(self.lin.weight.requires_grad))
        return self.head(_RecordingScale.apply(torch.tanh(self.lin(x)), self.scale))


@pytest.mark.parametrize("api", ["fisher", "per_sample_fisher"])
def test_skip_is_not_differentiated(api: str, path: str) -> None:
    """A ``Skip()`` parameter gives ``None`` and no gradient of it is ever taken.

    Two probes watch ``scale``: the module records whether the tensor it sees is grad-tracked, and
    a custom ``autograd.Function`` records whether its backward is asked for ``scale``'s gradient.
    A control run with a rule on ``scale`` shows both probes do fire when it is differentiated.
    """
    torch.manual_seed(17)
    gen = torch.Generator().manual_seed(117)
    model = ProbeNet().double().eval()
    batch = (torch.randn(5, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen))
    loss = ff.losses.classification(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    ref_loss = lambda m, s: cross_entropy_sum(m(s[0]), s[1])  # noqa: E731

    def run(spec: dict) -> tuple[dict, dict[str, list[bool]], list]:
        for seen in model.tracked.values():
            seen.clear()
        _RecordingScale.records.clear()
        if api == "fisher":
            out = ff.fisher(loss, params, batch, spec=spec, path=path)
        else:
            per = ff.per_sample_fisher(loss, params, batch, spec=spec, path=path)
            out = {k: (None if v is None else v.sum(0) / per.tokens.sum()) for k, v in per.groups.items()}
        return out, {k: list(v) for k, v in model.tracked.items()}, list(_RecordingScale.records)

    # Control: with rules, the probes see `scale` (and, on the direct path, `lin.weight`) differentiated.
    counted = ff.infer_spec(model, overrides={"scale": ff.Channel()})
    got, tracked, records = run(counted)
    assert any(tracked["scale"]) and records and all(r[1] for r in records)
    if path == "direct":
        assert any(tracked["lin.weight"])
    assert_groups_close(got, reference_fisher(model, batch, ref_loss, counted), F64_TOL)

    # Skip(): None in the result, never grad-tracked, never asked for in a backward.
    skipped = ff.infer_spec(model, overrides={"scale": ff.Skip(), "lin.weight": ff.Skip()})
    got, tracked, records = run(skipped)
    assert got["scale"] is None and got["lin.weight"] is None
    assert tracked["scale"] and not any(tracked["scale"]), "the skipped scale was grad-tracked in a forward"
    assert not any(tracked["lin.weight"]), "the skipped lin.weight was grad-tracked in a forward"
    assert records and not any(r[1] for r in records), "the skipped scale's gradient was requested"
    assert_groups_close(got, reference_fisher(model, batch, ref_loss, skipped), F64_TOL)


# --- per-sample Fisher ----------------------------------------------------------------------------

PER_SAMPLE_CASES = {
    "tokens_masked": lambda b: count_tokens(b["labels"], b["attention_mask"]),
    "causal_lm_labels": lambda b: count_tokens(b["labels"], b["attention_mask"], shift=True),
    "tokens_ignore_index": lambda b: count_tokens(b["labels"], None, ignore_index=-1),
    "mlp": lambda b: [1] * b[0].shape[0],
}


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("which", list(PER_SAMPLE_CASES))
def test_per_sample_fisher(which: str, chunk_size: int | None, path: str) -> None:
    hand_count = PER_SAMPLE_CASES[which]
    case = FAMILIES[which].build(torch.float64)
    batch = case.batches[0]
    per = ff.per_sample_fisher(case.loss, case.params, batch, spec=case.spec, chunk_size=chunk_size, path=path)
    ref_groups, ref_tokens = reference_per_sample(case.model, batch, case.ref_loss, case.spec)

    # Tokens: equal to counts made position by position, and to the reference loss's counts.
    assert per.tokens.tolist() == [float(n) for n in hand_count(batch)]
    assert per.tokens.tolist() == ref_tokens.tolist()
    # Each sample's groups equal the naive per-sample values.
    size = per.tokens.shape[0]
    for name, ref in ref_groups.items():
        assert per.groups[name].shape[0] == size
        for b in range(size):
            assert_rel_close(per.groups[name][b], ref[b], F64_TOL, f"{name}[sample {b}]")
    # Σ_b groups / Σ_b n_b is the one-shot Fisher.
    one_shot = ff.fisher(case.loss, case.params, batch, spec=case.spec, path=path)
    summed = {n: g.sum(0) / per.tokens.sum() for n, g in per.groups.items()}
    assert_groups_close(summed, one_shot, 1e-12)


# --- attention heads ------------------------------------------------------------------------------


def _head_sums_from_elementwise(mha: nn.MultiheadAttention, prefix: str, elem: dict) -> dict[str, torch.Tensor]:
    """Per-head sums of the elementwise Fisher, block by block, from MHA's documented layout."""
    E, h = mha.embed_dim, mha.num_heads
    hd = E // h
    out: dict[str, torch.Tensor] = {}

    def q_k_v_rows(x: torch.Tensor) -> torch.Tensor:  # [3E, ...] -> [3, h]
        return torch.tensor([[x[p * E + hh * hd : p * E + (hh + 1) * hd].sum() for hh in range(h)] for p in range(3)])

    def rows(x: torch.Tensor) -> torch.Tensor:  # [E, ...] -> [h]
        return torch.stack([x[hh * hd : (hh + 1) * hd].sum() for hh in range(h)])

    for local in ("in_proj_weight", "in_proj_bias"):
        if prefix + local in elem:
            out[prefix + local] = q_k_v_rows(elem[prefix + local])
    for local in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        if prefix + local in elem:
            out[prefix + local] = rows(elem[prefix + local])
    for local in ("bias_k", "bias_v"):  # [1, 1, E]
        if prefix + local in elem:
            out[prefix + local] = rows(elem[prefix + local][0, 0])
    out[prefix + "out_proj.weight"] = rows(elem[prefix + "out_proj.weight"].T)  # input columns
    return out


@pytest.mark.parametrize("which", ["mha_fused", "mha_fused_bias_kv", "mha_kdim_vdim_bias_kv"])
def test_heads_are_sums_of_elementwise(which: str, path: str) -> None:
    case = FAMILIES[which].build(torch.float64)
    heads = ff.fisher(case.loss, case.params, case.batches, path=path)  # inferred: Heads rules
    elem = ff.fisher(case.loss, case.params, case.batches, spec=ff.Elementwise(), path=path)
    assert_groups_close(elem, reference_fisher(case.model, case.batches, case.ref_loss, ff.Elementwise()), F64_TOL)
    expected = _head_sums_from_elementwise(case.model.attn, "attn.", elem)
    assert len(expected) >= 3
    for name, value in expected.items():
        assert_rel_close(heads[name], value, 1e-12, name)


@pytest.mark.parametrize("kind", ["fused", "separate"])
def test_head_blocks_are_the_layers_heads(kind: str) -> None:
    """Rows ``hh·hd … (hh+1)·hd`` of the Q (or K) projection feed head ``hh`` and no other head.

    This ties the reference's head layout to what ``nn.MultiheadAttention`` does, not to a reading
    of its source: bumping one head's block changes only that head's attention weights.
    """
    E, h = 8, 4
    hd = E // h
    if kind == "fused":
        mha = cases.case("self_attention", heads=h, seed=18).model.attn
        k_in, v_in = E, E
    else:  # separate q/k/v projections (and bias_k, bias_v)
        mha = cases.case("cross_attention", heads=h, kdim=6, vdim=5, seed=18).model.attn
        k_in, v_in = 6, 5
    g = torch.Generator().manual_seed(18)
    q = torch.randn(1, 5, E, dtype=torch.float64, generator=g)
    k = torch.randn(1, 6, k_in, dtype=torch.float64, generator=g)
    v = torch.randn(1, 6, v_in, dtype=torch.float64, generator=g)

    def weights(m: nn.MultiheadAttention) -> torch.Tensor:
        return m(q, k, v, need_weights=True, average_attn_weights=False)[1][0]  # [h, T, S]

    base = weights(mha).detach()
    for part in ("q", "k"):
        for hh in range(h):
            bumped = copy.deepcopy(mha)
            with torch.no_grad():
                if kind == "fused":
                    offset = 0 if part == "q" else E
                    bumped.in_proj_weight[offset + hh * hd : offset + (hh + 1) * hd] += 0.5
                else:
                    getattr(bumped, f"{part}_proj_weight")[hh * hd : (hh + 1) * hd] += 0.5
            changed = (weights(bumped) - base).abs().amax((1, 2)) > 1e-12
            assert changed.nonzero().flatten().tolist() == [hh], (part, hh)


# --- low precision and autocast -------------------------------------------------------------------

# Unit roundoff of the parameter dtype. A half-precision copy holds the float32 weights rounded
# to relative error ≤ u; the Fisher is a smooth (quadratic in the gradient) function of them, so
# it moves by O(κ·u) with κ a small constant for these small, well-conditioned models. 16·u
# (bfloat16: 6.3e-2, float16: 7.8e-3) bounds that; measured errors are a few u.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", ["mlp", "tokens_masked", "norms"])
def test_low_precision_params(which: str, dtype: torch.dtype, path: str) -> None:
    case32 = FAMILIES[which].build(torch.float32)
    low = FAMILIES[which].build(dtype)  # the float32 weights rounded to dtype; float inputs too
    got = ff.fisher(low.loss, low.params, low.batches, path=path)
    assert all(v.dtype == torch.float32 for v in got.values())
    assert all(p.dtype == dtype for p in low.model.parameters()), "the model was modified"

    # (1) Computed in float32 from the rounded weights: agrees with a float64 reference on exactly
    # those weights to float32 precision (half-precision arithmetic would be off by ~u, not 1e-5).
    ref = reference_fisher(to_float64(low.model), [cast_batch(b, torch.float64) for b in low.batches], low.ref_loss)
    assert_groups_close(got, ref, F32_TOL, "vs rounded-weight reference: ")

    # (2) Close to the float32 model's result; the only difference is the rounding of the weights.
    full = ff.fisher(case32.loss, case32.params, case32.batches, path=path)
    assert_groups_close(got, full, 16 * UNIT_ROUNDOFF[dtype], "vs float32 model: ")


@pytest.mark.parametrize("which", ["mlp", "transformer_encoder", "cnn"])
def test_outer_autocast_does_not_change_result(which: str, path: str) -> None:
    case = FAMILIES[which].build(torch.float32)
    batch = case.batches[0]
    plain = ff.fisher(case.loss, case.params, batch, path=path)
    per_plain = ff.per_sample_fisher(case.loss, case.params, batch, path=path)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # Sanity: the autocast region really does lower this model's precision...
        first = batch[0] if isinstance(batch, tuple) else batch["input_ids"]
        if first.is_floating_point():
            assert case.model(first).dtype == torch.bfloat16
        # ... but not the library's computation.
        inside = ff.fisher(case.loss, case.params, batch, path=path)
        per_inside = ff.per_sample_fisher(case.loss, case.params, batch, path=path)
    for name in plain:
        assert inside[name].dtype == torch.float32
        assert torch.equal(inside[name], plain[name]), name
        assert torch.equal(per_inside.groups[name], per_plain.groups[name]), name
    assert torch.equal(per_inside.tokens, per_plain.tokens)


# --- steps and several batches --------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tokens_masked", "causal_lm_labels", "mlp"])
def test_fisher_step_decay_zero_is_one_shot(which: str, path: str) -> None:
    case = FAMILIES[which].build(torch.float64)
    first, second = case.batches[0], case.batches[1]
    fisher_step = ff.make_fisher_step(case.loss, decay=0.0, path=path)
    state0 = fisher_step.init(case.params)
    state1 = fisher_step(case.params, first, state0)
    state2 = fisher_step(case.params, second, state1)

    one_shot1 = ff.fisher(case.loss, case.params, first, path=path)
    one_shot2 = ff.fisher(case.loss, case.params, second, path=path)
    assert_groups_close(ff.estimate(state1), one_shot1, 1e-12, "step 1: ")
    assert_groups_close(ff.estimate(state2), one_shot2, 1e-12, "step 2: ")
    assert_groups_close(ff.estimate(state2), reference_fisher(case.model, second, case.ref_loss), F64_TOL, "ref: ")
    _, tokens1 = reference_per_sample(case.model, first, case.ref_loss)
    _, tokens2 = reference_per_sample(case.model, second, case.ref_loss)
    assert state2.step == 2
    assert state2.tokens == float(tokens1.sum() + tokens2.sum())
    assert state2.samples == len(tokens1) + len(tokens2)


@pytest.mark.parametrize("which", ["tokens_masked", "causal_lm_labels", "transformer_encoder"])
def test_fisher_over_batches_is_sum_over_sum(which: str, path: str) -> None:
    family = FAMILIES[which]
    more = {"batch": (*family.sizes["batch"], 2), "seq_len": (*family.sizes["seq_len"], 4)}
    case = family.build(torch.float64, **more)
    batches = case.batches  # different sizes, lengths, padding
    ref = reference_fisher(case.model, batches, case.ref_loss)
    assert_groups_close(ff.fisher(case.loss, case.params, batches, path=path), ref, F64_TOL, "list: ")
    assert_groups_close(ff.fisher(case.loss, case.params, iter(batches), path=path), ref, F64_TOL, "iterator: ")
    chunked = ff.fisher(case.loss, case.params, batches, chunk_size=3, path=path)
    assert_groups_close(chunked, ref, F64_TOL, "chunked: ")

    # Σ/Σ is not the mean of the per-batch estimates when the batches hold different token counts.
    per_batch = [reference_fisher(case.model, b, case.ref_loss) for b in batches]
    name = "emb.weight"
    mean = sum(f[name] for f in per_batch) / len(per_batch)
    assert (mean - ref[name]).abs().max() > 1e-3 * ref[name].abs().max()
