"""``infer_spec``: the rule and group shape of every module type in ``fisherfunc/infer.py``'s table.

Expected rules and group shapes are written out by hand from the layers' weight layouts
(``Linear``/``Conv`` weight ``[out, in/groups, *k]``, ``ConvTranspose`` weight
``[in, out/groups, *k]``, MHA ``in_proj_weight [3E, E]``...), not computed by the library.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fisherfunc as ff
from fisherfunc._spec.resolve import resolve_spec
from fisherfunc.testing import cases

Expected = dict[str, tuple[ff.Rule, tuple[int, ...]]]


def _mha_fused() -> tuple[nn.Module, Expected]:
    return nn.MultiheadAttention(8, 2), {
        "in_proj_weight": (ff.Heads(2, axis=0, parts=3), (3, 2)),
        "in_proj_bias": (ff.Heads(2, axis=0, parts=3), (3, 2)),
        "out_proj.weight": (ff.Heads(2, axis=1), (2,)),
        "out_proj.bias": (ff.Channel(0), (8,)),
    }


def _mha_separate() -> tuple[nn.Module, Expected]:
    return nn.MultiheadAttention(8, 4, kdim=6, vdim=5, add_bias_kv=True), {
        "q_proj_weight": (ff.Heads(4, axis=0), (4,)),
        "k_proj_weight": (ff.Heads(4, axis=0), (4,)),
        "v_proj_weight": (ff.Heads(4, axis=0), (4,)),
        "in_proj_bias": (ff.Heads(4, axis=0, parts=3), (3, 4)),
        "bias_k": (ff.Heads(4, axis=2), (4,)),
        "bias_v": (ff.Heads(4, axis=2), (4,)),
        "out_proj.weight": (ff.Heads(4, axis=1), (4,)),
        "out_proj.bias": (ff.Channel(0), (8,)),
    }


def _mha_no_bias() -> tuple[nn.Module, Expected]:
    return nn.MultiheadAttention(6, 3, bias=False), {
        "in_proj_weight": (ff.Heads(3, axis=0, parts=3), (3, 3)),
        "out_proj.weight": (ff.Heads(3, axis=1), (3,)),
    }


def _channel(out: int, bias: bool = True) -> Expected:
    spec: Expected = {"weight": (ff.Channel(0), (out,))}
    if bias:
        spec["bias"] = (ff.Channel(0), (out,))
    return spec


def _transposed(groups: int, out: int) -> Expected:
    return {"weight": (ff.Channel(1, groups=groups), (out,)), "bias": (ff.Channel(0), (out,))}


# (id, module factory, expected {local name: (rule, group shape)})
TABLE: list[tuple[str, object, Expected]] = [
    ("Linear", lambda: nn.Linear(4, 3), _channel(3)),
    ("Linear-nobias", lambda: nn.Linear(4, 3, bias=False), _channel(3, bias=False)),
    ("Conv1d", lambda: nn.Conv1d(4, 6, 3), _channel(6)),
    ("Conv1d-groups", lambda: nn.Conv1d(4, 6, 3, groups=2), _channel(6)),
    ("Conv2d-depthwise", lambda: nn.Conv2d(5, 5, 3, groups=5), _channel(5)),
    ("Conv3d", lambda: nn.Conv3d(2, 4, 2), _channel(4)),
    ("ConvTranspose1d-groups", lambda: nn.ConvTranspose1d(4, 6, 3, groups=2), _transposed(2, 6)),  # w [4, 3, 3]
    ("ConvTranspose2d", lambda: nn.ConvTranspose2d(4, 5, 3), _transposed(1, 5)),  # w [4, 5, 3, 3]
    ("ConvTranspose2d-groups", lambda: nn.ConvTranspose2d(6, 9, 3, groups=3), _transposed(3, 9)),  # w [6, 3, 3, 3]
    ("ConvTranspose3d-depthwise", lambda: nn.ConvTranspose3d(4, 4, 2, groups=4), _transposed(4, 4)),  # w [4, 1, ...]
    ("Embedding", lambda: nn.Embedding(10, 4), {"weight": (ff.Rows(), (10,))}),
    ("Embedding-padding", lambda: nn.Embedding(10, 4, padding_idx=0), {"weight": (ff.Rows(), (10,))}),
    ("EmbeddingBag", lambda: nn.EmbeddingBag(7, 3, mode="sum"), {"weight": (ff.Rows(), (7,))}),
    ("LayerNorm", lambda: nn.LayerNorm(5), _channel(5)),
    ("LayerNorm-nobias", lambda: nn.LayerNorm(5, bias=False), _channel(5, bias=False)),
    ("GroupNorm", lambda: nn.GroupNorm(2, 6), _channel(6)),
    ("RMSNorm", lambda: nn.RMSNorm(5), {"weight": (ff.Channel(0), (5,))}),
    ("BatchNorm1d", lambda: nn.BatchNorm1d(3).eval(), _channel(3)),
    ("BatchNorm2d", lambda: nn.BatchNorm2d(3).eval(), _channel(3)),
    ("BatchNorm3d", lambda: nn.BatchNorm3d(3).eval(), _channel(3)),
    ("SyncBatchNorm", lambda: nn.SyncBatchNorm(3).eval(), _channel(3)),
    ("InstanceNorm1d", lambda: nn.InstanceNorm1d(3, affine=True), _channel(3)),
    ("InstanceNorm2d", lambda: nn.InstanceNorm2d(3, affine=True), _channel(3)),
    ("InstanceNorm3d", lambda: nn.InstanceNorm3d(3, affine=True), _channel(3)),
    ("LocalResponseNorm", lambda: nn.LocalResponseNorm(2), {}),  # no parameters
    ("MultiheadAttention-fused", lambda: _mha_fused()[0], _mha_fused()[1]),
    ("MultiheadAttention-kdim-vdim-bias-kv", lambda: _mha_separate()[0], _mha_separate()[1]),
    ("MultiheadAttention-nobias", lambda: _mha_no_bias()[0], _mha_no_bias()[1]),
]


class Holder(nn.Module):
    """Nests a module two levels deep beside a Linear, so names carry a prefix."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 3)
        self.block = nn.ModuleDict({"inner": inner})


def _available(name: str) -> list[pytest.MarkDecorator]:
    """``nn.RMSNorm`` arrived in torch 2.4; the oldest supported torch (2.1) has none to place."""
    return [pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="torch < 2.4 has no nn.RMSNorm")] * (
        name == "RMSNorm"
    )


@pytest.mark.parametrize(("make", "expected"), [pytest.param(m, e, id=i, marks=_available(i)) for i, m, e in TABLE])
@pytest.mark.parametrize("nested", [False, True], ids=["top", "nested"])
def test_infer_rule_and_group_shape(make, expected: Expected, nested: bool) -> None:
    module = make()
    model = Holder(module) if nested else module
    prefix = "block.inner." if nested else ""
    want = {prefix + k: v for k, v in expected.items()}
    if nested:
        want = {"stem.weight": (ff.Channel(0), (3,)), "stem.bias": (ff.Channel(0), (3,)), **want}

    spec = ff.infer_spec(model)
    # One rule per parameter, in named_parameters() order, and exactly the expected rules.
    assert list(spec) == [n for n, _ in model.named_parameters()]
    assert spec == {n: rule for n, (rule, _) in want.items()}
    params = dict(model.named_parameters())
    if not params:
        return
    resolved = resolve_spec(spec, params)
    shapes = dict(zip(resolved.names, resolved.group_shapes, strict=True))
    for name, (_, shape) in want.items():
        assert tuple(shapes[name]) == shape, name


def test_infer_spec_drives_fisher_shapes() -> None:
    """The inferred spec is usable as is: ``fisher`` returns the expected group shapes."""
    # Conv1d(4, 6, 3, groups=2) → Tanh → Flatten → Linear(·, 3)
    case = cases.case("cnn1d", groups=2, in_per_group=2, out_per_group=3, classes=3, dtype=torch.float32)
    out = ff.fisher(case.loss, {k: v.detach() for k, v in case.params.items()}, case.batch)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "0.weight": (6,),
        "0.bias": (6,),
        "3.weight": (3,),
        "3.bias": (3,),
    }


# --- overrides ------------------------------------------------------------------------------------


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 2)))


def test_override_replaces_table_rule() -> None:
    spec = ff.infer_spec(_net(), overrides={"1.1.weight": ff.Elementwise()})
    assert spec["1.1.weight"] == ff.Elementwise()
    assert spec["0.weight"] == ff.Channel(0)  # untouched


def test_override_first_match_wins() -> None:
    net = _net()
    first = ff.infer_spec(net, overrides={"*.weight": ff.Whole(), "0.weight": ff.Elementwise()})
    assert first["0.weight"] == ff.Whole()
    assert first["1.0.weight"] == ff.Whole() and first["1.1.weight"] == ff.Whole()
    swapped = ff.infer_spec(net, overrides={"0.weight": ff.Elementwise(), "*.weight": ff.Whole()})
    assert swapped["0.weight"] == ff.Elementwise()
    assert swapped["1.1.weight"] == ff.Whole()


def test_override_star_crosses_dots() -> None:
    spec = ff.infer_spec(_net(), overrides={"*bias": ff.Skip()})
    assert [n for n, r in spec.items() if r == ff.Skip()] == ["0.bias", "1.0.bias", "1.1.bias"]


def test_override_matching_nothing_is_an_error() -> None:
    with pytest.raises(ff.SpecError, match="no_such_layer"):
        ff.infer_spec(_net(), overrides={"0.weight": ff.Whole(), "no_such_layer.*": ff.Skip()})


def test_override_that_is_not_a_rule_is_an_error() -> None:
    with pytest.raises(ff.SpecError, match="not a group rule"):
        ff.infer_spec(_net(), overrides={"0.weight": "channel"})


# --- parameters the table does not cover ----------------------------------------------------------


class Mystery(nn.Module):
    """A custom module owning a bare ``nn.Parameter`` (no module type to infer a rule from)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.gain


def test_bare_parameter_is_a_spec_error_naming_it() -> None:
    model = nn.Sequential(nn.Linear(3, 4), Mystery())
    with pytest.raises(ff.SpecError, match=r"1\.gain"):
        ff.infer_spec(model)


def test_bare_parameter_can_be_given_a_rule_by_override() -> None:
    model = nn.Sequential(nn.Linear(3, 4), Mystery())
    spec = ff.infer_spec(model, overrides={"*.gain": ff.Channel(0)})
    assert spec["1.gain"] == ff.Channel(0)
    assert spec["1.proj.weight"] == ff.Channel(0)


def test_tied_parameters_appear_once() -> None:
    model = cases.case("causal_lm", vocab=9, dim=4, norm=False, tied=True).model  # Embedding, head tied to it
    assert model.head.weight is model.emb.weight
    spec = ff.infer_spec(model)
    assert list(spec) == ["emb.weight"]
    assert spec["emb.weight"] == ff.Rows()


def test_tied_parameter_listed_under_a_module_without_rules_is_placed() -> None:
    # BERT's MLM head keeps its output bias as a bare parameter on the head module (listed first)
    # and ties it to the decoder Linear's bias: rules follow the tensor, not the name.
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(9))
            self.decoder = nn.Linear(4, 9)
            self.decoder.bias = self.bias

    spec = ff.infer_spec(Head())
    assert list(spec) == ["bias", "decoder.weight"]
    assert spec["bias"] == ff.Channel(0)


def test_batchnorm_in_training_mode_is_refused() -> None:
    model = cases.case("norms").model.train()  # BatchNorm2d 'bn2' and BatchNorm1d 'bn1'
    with pytest.raises(ValueError, match="'bn2'.*training mode"):
        ff.infer_spec(model)
