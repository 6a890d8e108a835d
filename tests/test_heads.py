"""Attention-head importance (``ff.head_importance``): the matrix equals sums written out by hand.

For each layout — separate Q/K/V projections (BERT, Llama), a fused QKV (GPT-2 ``c_attn``, torch's
``in_proj_weight``), grouped-query attention (Llama with 2 key-value heads for 4 query heads),
self- and cross-attention in one model — the matrix is compared with the group values added up by
hand, and the grouped-query convention (query head ``h`` reads key-value head ``h // r``) is checked
on the live model: changing one key-value head's keys changes exactly the outputs of the query
heads the convention assigns to it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import fisherfunc as ff
from fisherfunc._spec.resolve import resolve_spec
from fisherfunc.testing import cases


def _known_values(model: nn.Module) -> dict[str, Tensor | None]:
    """A group tree for ``infer_spec(model)`` with distinct known values: entry i of leaf j is 1000·j + i."""
    params = dict(model.named_parameters())
    resolved = resolve_spec(ff.infer_spec(model), params)
    values = [
        1000.0 * j + torch.arange(resolved.groups_of(i).numel(), dtype=torch.float64).reshape(resolved.groups_of(i))
        for j, i in enumerate(resolved.active)
    ]
    return resolved.unflatten_groups(values)


def _check_views(imp: ff.HeadImportance, total: float) -> None:
    assert torch.allclose(imp.parts["q"] + imp.parts["k"] + imp.parts["v"] + imp.parts["o"], imp.matrix)
    assert torch.isclose(imp.matrix.sum(), torch.tensor(total, dtype=torch.float64))
    assert torch.isclose(imp.kv_groups.sum(), torch.tensor(total, dtype=torch.float64))


def test_torch_encoder_fused_in_projection_by_hand() -> None:
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2).eval()
    F_ = _known_values(model)
    imp = ff.head_importance(F_, model)
    assert imp.layers == ("layers.0.self_attn", "layers.1.self_attn") and (imp.heads, imp.kv_heads) == (2, 2)
    for layer in range(2):
        p = f"layers.{layer}.self_attn."
        w, b, o = F_[p + "in_proj_weight"], F_[p + "in_proj_bias"], F_[p + "out_proj.weight"]
        for h in range(2):  # Q, K, V rows of head h (fused parts 0, 1, 2) and its output columns
            by_hand = w[0, h] + w[1, h] + w[2, h] + b[0, h] + b[1, h] + b[2, h] + o[h]
            assert imp.matrix[layer, h] == by_hand
    assert torch.equal(imp.matrix, imp.kv_groups)  # multi-head: one key-value head per query head
    heads_ruled = sum(
        float(F_[n].sum()) for n in F_ if n.endswith(("in_proj_weight", "in_proj_bias", "out_proj.weight"))
    )
    _check_views(imp, heads_ruled)


def test_torch_decoder_self_and_cross_attention_are_separate_matrices() -> None:
    model = nn.TransformerDecoderLayer(8, 4, 16, dropout=0.0, batch_first=True).eval()
    F_ = _known_values(model)
    own, cross = ff.head_importance(F_, model), ff.head_importance(F_, model, attention="cross")
    assert own.layers == ("self_attn",) and cross.layers == ("multihead_attn",)
    for imp, p in ((own, "self_attn."), (cross, "multihead_attn.")):
        w, b, o = F_[p + "in_proj_weight"], F_[p + "in_proj_bias"], F_[p + "out_proj.weight"]
        assert torch.equal(imp.matrix[0], w.sum(0) + b.sum(0) + o)


hf = pytest.importorskip("transformers", reason="fisherfunc[hf] (transformers) is not installed")


def _hf(family: str, head: str = "lm", **sizes: Any) -> nn.Module:
    from fisherfunc.testing._hf import hf_model

    torch.manual_seed(0)
    return hf_model(family, head, dropout=0.0, **sizes).double().eval()


def test_llama_grouped_query_by_hand() -> None:
    model = _hf("llama", heads=4, kv_heads=2, layers=2)
    F_ = _known_values(model)
    imp = ff.head_importance(F_, model)
    assert (imp.heads, imp.kv_heads) == (4, 2) and imp.matrix.shape == (2, 4) and imp.kv_groups.shape == (2, 2)
    for layer in range(2):
        p = f"model.layers.{layer}.self_attn."
        q = F_[p + "q_proj.weight"] + F_[p + "q_proj.bias"]
        k = F_[p + "k_proj.weight"] + F_[p + "k_proj.bias"]
        v = F_[p + "v_proj.weight"] + F_[p + "v_proj.bias"]
        o = F_[p + "o_proj.weight"]
        # r = 4 / 2 = 2 query heads read each key-value head: heads 0, 1 read 0; heads 2, 3 read 1
        expected = torch.stack([q[h] + o[h] + (k[h // 2] + v[h // 2]) / 2 for h in range(4)])
        assert torch.allclose(imp.matrix[layer], expected, rtol=1e-15, atol=0)
        groups = torch.stack([k[g] + v[g] + q[2 * g] + q[2 * g + 1] + o[2 * g] + o[2 * g + 1] for g in range(2)])
        assert torch.allclose(imp.kv_groups[layer], groups, rtol=1e-15, atol=0)
    # every attention parameter with a per-head rule; o_proj's bias is one value per output channel
    total = sum(float(F_[n].sum()) for n in F_ if ".self_attn." in n and not n.endswith("o_proj.bias"))
    _check_views(imp, total)


def test_gpt2_fused_qkv_by_hand() -> None:
    model = _hf("gpt2", heads=4, layers=2)
    F_ = _known_values(model)
    imp = ff.head_importance(F_, model)
    for layer in range(2):
        p = f"transformer.h.{layer}.attn."
        w, b, o = F_[p + "c_attn.weight"], F_[p + "c_attn.bias"], F_[p + "c_proj.weight"]
        assert w.shape == (3, 4)  # [Q, K, V] × heads
        expected = torch.stack([w[0, h] + w[1, h] + w[2, h] + b[0, h] + b[1, h] + b[2, h] + o[h] for h in range(4)])
        assert torch.equal(imp.matrix[layer], expected)
    assert torch.equal(
        imp.parts["q"][1], F_["transformer.h.1.attn.c_attn.weight"][0] + F_["transformer.h.1.attn.c_attn.bias"][0]
    )


def test_bert_separate_projections_by_hand() -> None:
    model = _hf("bert", heads=4, layers=2)
    F_ = _known_values(model)
    imp = ff.head_importance(F_, model)
    for layer in range(2):
        p = f"bert.encoder.layer.{layer}.attention."
        parts = [F_[p + f"self.{n}.{w}"] for n in ("query", "key", "value") for w in ("weight", "bias")]
        expected = sum(parts) + F_[p + "output.dense.weight"]
        assert torch.equal(imp.matrix[layer], expected)


def test_gpt2_cross_attention_is_its_own_matrix() -> None:
    transformers = hf
    config = transformers.GPT2Config(
        n_embd=8, n_layer=2, n_head=2, n_positions=8, vocab_size=20, add_cross_attention=True
    )
    model = transformers.GPT2LMHeadModel(config).double().eval()
    F_ = _known_values(model)
    cross = ff.head_importance(F_, model, attention="cross")
    assert cross.layers == ("transformer.h.0.crossattention", "transformer.h.1.crossattention")
    p = "transformer.h.0.crossattention."
    kv, q = F_[p + "c_attn.weight"] + F_[p + "c_attn.bias"], F_[p + "q_attn.weight"] + F_[p + "q_attn.bias"]
    assert kv.shape == (2, 2)  # [K, V] × heads
    assert torch.equal(cross.matrix[0], q + kv[0] + kv[1] + F_[p + "c_proj.weight"])
    assert ff.head_importance(F_, model).layers == ("transformer.h.0.attn", "transformer.h.1.attn")


class _Capture(TorchFunctionMode):
    """Records the input of the ``F.linear`` call whose weight is ``weight`` (an attention's output projection)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = weight
        self.seen: Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            self.seen = args[0]
        return func(*args, **kwargs)


def test_the_grouped_query_convention_holds_on_the_live_model() -> None:
    """Scaling key-value head g's key rows changes exactly query heads {h : h // r = g}'s outputs."""
    model = _hf("llama", heads=4, kv_heads=2, layers=1, head_dim=6)
    attn = model.model.layers[0].self_attn
    ids = torch.randint(2, 40, (1, 7))

    def head_outputs() -> Tensor:  # [T, heads, head_dim]: o_proj's input, split by head
        mode = _Capture(attn.o_proj.weight)
        with torch.no_grad(), mode:
            model(input_ids=ids)
        assert mode.seen is not None
        return mode.seen.reshape(7, 4, 6)

    base = head_outputs()
    for g in range(2):
        with torch.no_grad():
            rows = slice(6 * g, 6 * (g + 1))
            saved = attn.k_proj.weight[rows].clone()
            attn.k_proj.weight[rows] *= 3.0
            changed = (head_outputs() - base).abs().amax(dim=(0, 2)) > 1e-9
            attn.k_proj.weight[rows] = saved
        assert changed.tolist() == [h // 2 == g for h in range(4)], (g, changed)


def test_state_and_computed_fisher_of_a_grouped_query_model() -> None:
    case = cases.case("hf_causal_lm", family="llama", layers=2)
    step = ff.make_fisher_step(case.loss, spec=case.spec, decay=0.0)
    state = step(case.params, case.batch, step.init(case.params))
    from_state = ff.head_importance(state, case.model)
    from_tree = ff.head_importance(ff.fisher(case.loss, case.params, case.batch, spec=case.spec), case.model)
    assert torch.allclose(from_state.matrix, from_tree.matrix, rtol=1e-5, atol=0)
    assert from_state.matrix.shape == (2, 4) and bool((from_state.matrix > 0).all())


def test_errors_name_what_is_wrong() -> None:
    model = _hf("llama", heads=4, kv_heads=2, layers=1)
    params = dict(model.named_parameters())
    tree = {n: torch.zeros(p.shape[0], dtype=torch.float64) for n, p in params.items()}  # Channel(0) shapes
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.(q|k|v)_proj.(weight|bias)'.*not one per head"):
        ff.head_importance(tree, model)
    with pytest.raises(ValueError, match="no cross-attention module"):
        ff.head_importance(_known_values(model), model, attention="cross")
    with pytest.raises(ValueError, match="attention must be 'self' or 'cross'"):
        ff.head_importance(_known_values(model), model, attention="both")
    with pytest.raises(ValueError, match="no self-attention module"):
        ff.head_importance({}, nn.Linear(2, 2))


def test_per_sample_groups_give_per_sample_heads() -> None:
    case = cases.case("hf_causal_lm", family="llama", layers=2)
    ps = ff.per_sample_fisher(case.loss, case.params, case.batch, spec=case.spec)
    per_sample = ff.head_importance(ps.groups, case.model)
    whole = ff.head_importance(ff.fisher(case.loss, case.params, case.batch, spec=case.spec), case.model)
    batch = ps.tokens.shape[0]
    assert per_sample.matrix.shape == (batch, 2, 4) and per_sample.kv_groups.shape == (batch, 2, 2)
    # Σ_b per-sample heads / Σ_b n_b is the batch's heads: the matrix is linear in the group values
    mean = per_sample.matrix.sum(0) / float(ps.tokens.sum())
    assert torch.allclose(mean, whole.matrix, rtol=1e-10, atol=0)


def test_the_documented_worked_example() -> None:
    """docs/transformers.md and the module docstring: H = 4, KV = 2, Q = [1, 2, 3, 4], K = [10, 20], V = O = 0."""
    model = _hf("llama", heads=4, kv_heads=2, layers=1)
    F_ = {n: torch.zeros_like(v) for n, v in _known_values(model).items() if v is not None}
    p = "model.layers.0.self_attn."
    F_[p + "q_proj.weight"] = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    F_[p + "k_proj.weight"] = torch.tensor([10.0, 20.0], dtype=torch.float64)
    imp = ff.head_importance(F_, model)
    assert imp.matrix[0].tolist() == [6.0, 7.0, 13.0, 14.0]
    assert imp.kv_groups[0].tolist() == [13.0, 27.0]
