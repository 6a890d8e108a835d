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

F64_TOL = 1e-10
F32_TOL = 1e-5
# torch.func has no batching rule for a few ops (EmbeddingBag, CPU flash attention) and falls back
# to a correct but slower loop with a UserWarning; the library silences it inside its engine, and
# warnings are errors here, so a leak would fail these tests.


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


# --- models ---------------------------------------------------------------------------------------


class MLP(nn.Module):
    """A small classifier / regressor: Linear → Tanh → Linear → GELU → Linear."""

    def __init__(self, d_in: int = 6, hidden: int = 10, d_out: int = 5) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, d_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    """Conv2d (plain, grouped, depthwise) into Conv1d (plain, grouped, depthwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, groups=3)
        self.c3 = nn.Conv2d(6, 6, 3, groups=6, padding=1)  # depthwise
        self.d1 = nn.Conv1d(6, 8, 3)
        self.d2 = nn.Conv1d(8, 8, 3, groups=4)
        self.d3 = nn.Conv1d(8, 8, 3, groups=8, padding=1)  # depthwise
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 3, 7, 7]
        h = torch.tanh(self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x))))))  # [B, 6, 5, 5]
        h = h.flatten(2)  # [B, 6, 25]
        h = torch.tanh(self.d3(torch.tanh(self.d2(torch.tanh(self.d1(h))))))  # [B, 8, 21]
        return self.fc(h.mean(-1))


class DeconvNet(nn.Module):
    """ConvTranspose1d/2d/3d, with groups 1, 2, 3 and depthwise (groups = in_channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.t1 = nn.ConvTranspose1d(6, 4, 3, groups=2, stride=2)  # weight [6, 2, 3]
        self.t2a = nn.ConvTranspose2d(6, 6, 2)  # weight [6, 6, 2, 2]
        self.t2b = nn.ConvTranspose2d(6, 9, 3, groups=3, stride=2)  # weight [6, 3, 3, 3]
        self.t3 = nn.ConvTranspose3d(6, 6, 2, groups=6)  # weight [6, 1, 2, 2, 2]
        self.fc = nn.Linear(4 + 9 + 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 6, 3, 3, 3]
        a = torch.tanh(self.t1(x.flatten(2))).mean(-1)
        b = torch.tanh(self.t2b(torch.tanh(self.t2a(x[..., 0])))).mean((-2, -1))
        c = torch.tanh(self.t3(x)).mean((-3, -2, -1))
        return self.fc(torch.cat([a, b, c], -1))


class TokenMLP(nn.Module):
    """Per-token model: Embedding (padding_idx 0) → LayerNorm → Linear → GELU → Linear."""

    def __init__(self, vocab: int = 13, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(self.norm(self.emb(ids)))))


class TinyEncoder(nn.Module):
    """Embedding → two ``nn.TransformerEncoderLayer`` (post- and pre-LN) → Linear, key padding mask."""

    def __init__(self, vocab: int = 11, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(dim, heads, 16, dropout=0.0, batch_first=True),
                nn.TransformerEncoderLayer(
                    dim, heads, 12, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
                ),
            ]
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, pad = self.emb(ids), mask == 0
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad)
        return self.head(h)


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` with a fused in-projection, used directly."""

    def __init__(self, dim: int = 8, heads: int = 2, bias_kv: bool = False, need_weights: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, add_bias_kv=bias_kv)
        self.need_weights = need_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=self.need_weights)[0]


class CrossAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate q/k/v projections (``kdim``, ``vdim``) and ``bias_k/v``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True, add_bias_kv=True)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attn(q, k, v, need_weights=False)[0]


class Bags(nn.Module):
    """Two ``nn.EmbeddingBag`` (mean and sum) over fixed-length bags, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.mean = nn.EmbeddingBag(12, 6, mode="mean")
        self.sum = nn.EmbeddingBag(12, 6, mode="sum")
        self.head = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.mean(ids), self.sum(ids)], -1))


class NormNet(nn.Module):
    """BatchNorm2d/1d (eval), GroupNorm, InstanceNorm2d (affine) and RMSNorm between layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inorm = nn.InstanceNorm2d(3, affine=True)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn2 = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 4 * 4, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.rms = nn.RMSNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 3, 6, 6]
        h = self.gn(torch.relu(self.bn2(self.conv(self.inorm(x)))))  # [B, 4, 4, 4]
        return self.out(self.rms(self.bn1(self.fc(h.flatten(1)))))


class RuleNet(nn.Module):
    """A sequence classifier with an Embedding, Linears and an attention layer: a target for every rule."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.lin = nn.Linear(6, 12)
        self.attn = nn.MultiheadAttention(12, 2, batch_first=True)
        self.head = nn.Linear(12, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(self.emb(ids)))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h).mean(1)


def randomise_norms(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Give norm layers non-trivial affine parameters and running statistics (in place), eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(
                m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.InstanceNorm2d, nn.BatchNorm1d, nn.BatchNorm2d)
            ):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


# --- cases ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """A model with its library loss, the matching reference loss, and a few batches.

    Attributes:
        model: the module (eval mode).
        make_loss: builds the library's per-sample loss for a model.
        ref_loss: the reference per-sample loss ``(model, one_sample_batch) -> (loss_sum, n)``.
        batches: a list of batches (different sizes, different padding).
        spec: the spec given to both (``None``: inferred).
    """

    model: nn.Module
    make_loss: Callable[[nn.Module], ff.losses.ModelLoss]
    ref_loss: SampleLoss
    batches: list[Any]
    spec: Any = None

    def to(self, dtype: torch.dtype) -> Case:
        """A copy with the model and the floating batch entries in ``dtype``."""
        return dataclasses.replace(
            self, model=copy.deepcopy(self.model).to(dtype), batches=[cast_batch(b, dtype) for b in self.batches]
        )

    @property
    def loss(self) -> ff.losses.ModelLoss:
        return self.make_loss(self.model)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.named_parameters()}


def padded_tokens(
    gen: torch.Generator, batch: int, length: int, vocab: int, ignore_index: int = -100, ignore_frac: float = 0.2
) -> dict[str, torch.Tensor]:
    """Token ids right-padded to ``length`` (pad id 0, mask 0), labels with some ``ignore_index``."""
    lengths = torch.randint(2, length + 1, (batch,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (batch, length), generator=gen) * mask
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels = labels.masked_fill(torch.rand(batch, length, generator=gen) < ignore_frac, ignore_index)
    return {"ids": ids, "labels": labels, "mask": mask}


def _classify(x_shape: tuple[int, ...], classes: int, gen: torch.Generator, sizes=(5, 3)) -> list[tuple]:
    return [(torch.randn(b, *x_shape, generator=gen), torch.randint(0, classes, (b,), generator=gen)) for b in sizes]


def mlp_case() -> Case:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(100)
    return Case(
        MLP().eval(),
        lambda m: ff.losses.classification(m),
        lambda m, s: cross_entropy_sum(m(s[0]), s[1]),
        _classify((6,), 5, gen),
    )


def cnn_case() -> Case:
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(101)
    return Case(
        ConvNet().eval(),
        lambda m: ff.losses.classification(m),
        lambda m, s: cross_entropy_sum(m(s[0]), s[1]),
        _classify((3, 7, 7), 4, gen, sizes=(4, 3)),
    )


def deconv_case() -> Case:
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(102)
    return Case(
        DeconvNet().eval(),
        lambda m: ff.losses.classification(m),
        lambda m, s: cross_entropy_sum(m(s[0]), s[1]),
        _classify((6, 3, 3, 3), 5, gen, sizes=(4, 3)),
    )


def token_case() -> Case:
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(103)
    return Case(
        TokenMLP().eval(),
        lambda m: ff.losses.token_classification(m, inputs="ids", targets="labels", mask="mask"),
        lambda m, s: token_cross_entropy(m(s["ids"]), s["labels"], s["mask"]),
        [padded_tokens(gen, 5, 7, 13), padded_tokens(gen, 4, 6, 13)],
    )


def token_ignore_case() -> Case:
    """A non-default ``ignore_index`` and no padding mask."""
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(104)
    batches = [padded_tokens(gen, 4, 6, 13, ignore_index=-1, ignore_frac=0.4) for _ in range(2)]
    return Case(
        TokenMLP().eval(),
        lambda m: ff.losses.token_classification(m, inputs="ids", targets="labels", ignore_index=-1),
        lambda m, s: token_cross_entropy(m(s["ids"]), s["labels"], None, ignore_index=-1),
        batches,
    )


def causal_case() -> Case:
    """Causal LM with labels (holding ``ignore_index``) and a padding mask."""
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(105)
    return Case(
        TokenMLP().eval(),
        lambda m: ff.losses.causal_lm(m, inputs="ids", labels="labels", mask="mask"),
        lambda m, s: causal_cross_entropy(m(s["ids"]), s["labels"], s["mask"]),
        [padded_tokens(gen, 5, 7, 13), padded_tokens(gen, 3, 5, 13)],
    )


def causal_ids_case() -> Case:
    """Causal LM whose targets are the input ids themselves, with a padding mask."""
    torch.manual_seed(6)
    gen = torch.Generator().manual_seed(106)
    return Case(
        TokenMLP().eval(),
        lambda m: ff.losses.causal_lm(m, inputs="ids", mask="mask"),
        lambda m, s: causal_cross_entropy(m(s["ids"]), s["ids"], s["mask"]),
        [padded_tokens(gen, 4, 7, 13), padded_tokens(gen, 4, 5, 13)],
    )


def transformer_case() -> Case:
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(107)
    model = randomise_norms(TinyEncoder(), gen)
    return Case(
        model,
        lambda m: ff.losses.token_classification(m, inputs=("ids", "mask"), targets="labels", mask="mask"),
        lambda m, s: token_cross_entropy(m(s["ids"], s["mask"]), s["labels"], s["mask"]),
        [padded_tokens(gen, 4, 6, 11), padded_tokens(gen, 3, 5, 11)],
    )


def _attention_regression(model: nn.Module, gen: torch.Generator, variance: float) -> Case:
    batches = [(torch.randn(b, 5, 8, generator=gen), torch.randn(b, 5, 8, generator=gen)) for b in (4, 3)]
    return Case(
        model.eval(),
        lambda m: ff.losses.regression(m, variance=variance),
        lambda m, s: gaussian_nll_sum(m(s[0]), s[1], variance),
        batches,
    )


def mha_fused_case() -> Case:
    torch.manual_seed(8)
    return _attention_regression(SelfAttention(), torch.Generator().manual_seed(108), variance=0.7)


def mha_bias_kv_case() -> Case:
    torch.manual_seed(9)
    return _attention_regression(
        SelfAttention(heads=4, bias_kv=True, need_weights=False), torch.Generator().manual_seed(109), variance=1.3
    )


def mha_kdim_vdim_case() -> Case:
    torch.manual_seed(10)
    gen = torch.Generator().manual_seed(110)
    batches = [
        {
            "q": torch.randn(b, 4, 8, generator=gen),
            "k": torch.randn(b, 6, 6, generator=gen),
            "v": torch.randn(b, 6, 5, generator=gen),
            "y": torch.randn(b, 4, 8, generator=gen),
        }
        for b in (4, 3)
    ]
    return Case(
        CrossAttention().eval(),
        lambda m: ff.losses.regression(m, inputs=("q", "k", "v"), targets="y", variance=0.5),
        lambda m, s: gaussian_nll_sum(m(s["q"], s["k"], s["v"]), s["y"], 0.5),
        batches,
    )


def embedding_bag_case() -> Case:
    torch.manual_seed(11)
    gen = torch.Generator().manual_seed(111)
    batches = [(torch.randint(0, 12, (b, 4), generator=gen), torch.randint(0, 3, (b,), generator=gen)) for b in (5, 3)]
    return Case(
        Bags().eval(),
        lambda m: ff.losses.classification(m),
        lambda m, s: cross_entropy_sum(m(s[0]), s[1]),
        batches,
    )


def norms_case() -> Case:
    torch.manual_seed(12)
    gen = torch.Generator().manual_seed(112)
    return Case(
        randomise_norms(NormNet(), gen),
        lambda m: ff.losses.classification(m),
        lambda m, s: cross_entropy_sum(m(s[0]), s[1]),
        _classify((3, 6, 6), 3, gen, sizes=(4, 3)),
    )


def regression_case() -> Case:
    torch.manual_seed(13)
    gen = torch.Generator().manual_seed(113)
    batches = [(torch.randn(b, 5, generator=gen), torch.randn(b, 3, generator=gen)) for b in (5, 4)]
    return Case(
        MLP(5, 8, 3).eval(),
        lambda m: ff.losses.regression(m, variance=0.5),
        lambda m, s: gaussian_nll_sum(m(s[0]), s[1], 0.5),
        batches,
    )


def _log_cosh_library(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    # log cosh(d) = d + softplus(−2d) − log 2; one "token" per output.
    d = pred - y
    return (d + F.softplus(-2.0 * d) - math.log(2.0)).sum(), y.numel()


def custom_case() -> Case:
    torch.manual_seed(14)
    gen = torch.Generator().manual_seed(114)
    batches = [(torch.randn(b, 5, generator=gen), 2 * torch.randn(b, 3, generator=gen)) for b in (5, 4)]

    def ref(m: nn.Module, s: tuple) -> tuple[torch.Tensor, float]:
        return torch.log(torch.cosh(m(s[0]) - s[1])).sum(), float(s[1][0].numel())

    return Case(MLP(5, 8, 3).eval(), lambda m: ff.losses.custom(m, _log_cosh_library), ref, batches)


def rule_case(spec: Any = None) -> Case:
    torch.manual_seed(15)
    gen = torch.Generator().manual_seed(115)
    batches = [(torch.randint(0, 12, (b, 5), generator=gen), torch.randint(0, 4, (b,), generator=gen)) for b in (4, 3)]
    return Case(
        RuleNet().eval(),
        lambda m: ff.losses.classification(m),
        lambda m, s: cross_entropy_sum(m(s[0]), s[1]),
        batches,
        spec,
    )


FAMILIES: dict[str, Callable[[], Case]] = {
    "mlp": mlp_case,
    "cnn": cnn_case,
    "conv_transpose": deconv_case,
    "tokens_masked": token_case,
    "tokens_ignore_index": token_ignore_case,
    "causal_lm_labels": causal_case,
    "causal_lm_ids": causal_ids_case,
    "transformer_encoder": transformer_case,
    "mha_fused": mha_fused_case,
    "mha_fused_bias_kv": mha_bias_kv_case,
    "mha_kdim_vdim_bias_kv": mha_kdim_vdim_case,
    "embedding_bag": embedding_bag_case,
    "norms": norms_case,
    "regression": regression_case,
    "custom": custom_case,
}


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> Case:
    return FAMILIES[request.param]()


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


def test_family_float64(family: Case, path: str) -> None:
    case = family.to(torch.float64)
    got = ff.fisher(case.loss, case.params, case.batches, spec=case.spec, path=path)
    ref = reference_fisher(case.model, case.batches, case.ref_loss, case.spec)
    assert all(v.dtype == torch.float64 for v in got.values() if v is not None)
    assert_groups_close(got, ref, F64_TOL)


def test_family_float32(family: Case, path: str) -> None:
    got = ff.fisher(family.loss, family.params, family.batches, spec=family.spec, path=path)
    ref = reference_fisher(
        to_float64(family.model), [cast_batch(b, torch.float64) for b in family.batches], family.ref_loss, family.spec
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
    base = rule_case()
    spec = {**full_spec(base.model), name: rule}
    case = dataclasses.replace(base, spec=spec).to(torch.float64)
    got = ff.fisher(case.loss, case.params, case.batches, spec=spec, path=path)
    ref = reference_fisher(case.model, case.batches, case.ref_loss, spec)
    if isinstance(rule, ff.Skip):
        assert got[name] is None
    else:
        assert got[name].shape == rule.group_shape(case.params[name].shape)
    assert_groups_close(got, ref, F64_TOL)


@pytest.mark.parametrize("rule", [ff.Elementwise(), ff.Whole(), ff.Channel(0)], ids=repr)
def test_single_rule_spec_broadcasts(rule: ff.Rule, path: str) -> None:
    case = rule_case().to(torch.float64)
    got = ff.fisher(case.loss, case.params, case.batches, spec=rule, path=path)
    assert_groups_close(got, reference_fisher(case.model, case.batches, case.ref_loss, rule), F64_TOL)


def test_conv_transpose_group_layout() -> None:
    """Channel(1, groups=G)'s output channel ``g·(out/G) + j`` is the layer's output channel.

    Perturbing weight entry ``[g·in/G + i, j]`` of a grouped ConvTranspose2d changes only output
    channel ``g·(out/G) + j``: the layout the reference reducer assumes is the layer's own.
    """
    torch.manual_seed(16)
    layer = nn.ConvTranspose2d(6, 9, 3, groups=3).double()
    x = torch.randn(1, 6, 4, 4, dtype=torch.float64)
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
    "tokens_masked": (token_case, lambda b: count_tokens(b["labels"], b["mask"])),
    "causal_lm_labels": (causal_case, lambda b: count_tokens(b["labels"], b["mask"], shift=True)),
    "tokens_ignore_index": (token_ignore_case, lambda b: count_tokens(b["labels"], None, ignore_index=-1)),
    "mlp": (mlp_case, lambda b: [1] * b[0].shape[0]),
}


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("which", list(PER_SAMPLE_CASES))
def test_per_sample_fisher(which: str, chunk_size: int | None, path: str) -> None:
    make, hand_count = PER_SAMPLE_CASES[which]
    case = make().to(torch.float64)
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


@pytest.mark.parametrize("make", [mha_fused_case, mha_bias_kv_case, mha_kdim_vdim_case], ids=lambda f: f.__name__)
def test_heads_are_sums_of_elementwise(make: Callable[[], Case], path: str) -> None:
    case = make().to(torch.float64)
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
    torch.manual_seed(18)
    E, h = 8, 4
    hd = E // h
    if kind == "fused":
        mha = nn.MultiheadAttention(E, h, batch_first=True).double()
        k_in, v_in = E, E
    else:
        mha = nn.MultiheadAttention(E, h, kdim=6, vdim=5, batch_first=True).double()
        k_in, v_in = 6, 5
    q = torch.randn(1, 5, E, dtype=torch.float64)
    k = torch.randn(1, 6, k_in, dtype=torch.float64)
    v = torch.randn(1, 6, v_in, dtype=torch.float64)

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
@pytest.mark.parametrize("make", [mlp_case, token_case, norms_case], ids=lambda f: f.__name__)
def test_low_precision_params(make: Callable[[], Case], dtype: torch.dtype, path: str) -> None:
    case32 = make()
    low = case32.to(dtype)  # weights rounded to dtype; float inputs too
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


@pytest.mark.parametrize("make", [mlp_case, transformer_case, cnn_case], ids=lambda f: f.__name__)
def test_outer_autocast_does_not_change_result(make: Callable[[], Case], path: str) -> None:
    case = make()
    batch = case.batches[0]
    plain = ff.fisher(case.loss, case.params, batch, path=path)
    per_plain = ff.per_sample_fisher(case.loss, case.params, batch, path=path)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # Sanity: the autocast region really does lower this model's precision...
        first = batch[0] if isinstance(batch, tuple) else batch["ids"]
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


@pytest.mark.parametrize("make", [token_case, causal_case, mlp_case], ids=lambda f: f.__name__)
def test_fisher_step_decay_zero_is_one_shot(make: Callable[[], Case], path: str) -> None:
    case = make().to(torch.float64)
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


@pytest.mark.parametrize("make", [token_case, causal_case, transformer_case], ids=lambda f: f.__name__)
def test_fisher_over_batches_is_sum_over_sum(make: Callable[[], Case], path: str) -> None:
    case = make().to(torch.float64)
    gen = torch.Generator().manual_seed(200)
    vocab = case.model.emb.num_embeddings
    batches = [*case.batches, padded_tokens(gen, 2, 4, vocab)]  # different sizes, lengths, padding
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
