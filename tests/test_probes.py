"""The factorised output-probe path equals the direct ``vmap(grad)`` path, exactly.

The direct path is checked against a naive per-sample autograd loop in ``test_reference.py``;
here ``path="auto"`` (probes where a weight qualifies) is checked against ``path="direct"`` in
float64 for every form the probe path has (one vector per sample, Gram and direct sequence forms,
row / column / full sums, embeddings with repeated ids and ``padding_idx``, GPT-2 ``Conv1D``
through ``torch.addmm``), and against the naive loop where the probe path alone is at stake.
Every case also asserts which weights took the probe path, so a silent fallback to the direct
path cannot pass as a probe result. Every case runs twice: with the probed layers' factors kept to
the end of the backward (what these small layers get by default) and with every site reduced inside
the backward by a ``ReducingProbe`` (what layers at scale get: ``group_sums.in_backward``).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import optree
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc._engine import group_sums, probes
from fisherfunc._engine.group_sums import Site, find_sites, in_backward
from fisherfunc._engine.numerics import prepare
from fisherfunc._spec.resolve import resolve_spec
from fisherfunc.testing import cases
from fisherfunc.testing.cases import Case


@pytest.fixture(autouse=True, params=["kept", "reduced"])
def factor_budget(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test with the default budget of kept factors, and with none (every site reduced in the backward)."""
    if request.param == "reduced":
        monkeypatch.setattr(group_sums, "KEPT_FACTOR_BYTES", 0)
    return str(request.param)


def token_case(batch: int | tuple[int, ...], length: int | tuple[int, ...], *, causal: bool = False, **sizes) -> Case:
    """A residual token model (vocab 13, width 6, block 5, ``padding_idx`` 0) on right-padded batches."""
    name, extra = ("causal_lm", {}) if causal else ("token_classification", {"classes": 13})
    common = {"vocab": 13, "dim": 6, "hidden": 5, "padding_idx": True}
    return cases.case(name, batch=batch, seq_len=length, **common, **extra, **sizes)


def repeated(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with position ``T // 2`` repeating position 0's id where both are real tokens."""
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"]
    middle = ids.shape[1] // 2
    ids[:, middle] = torch.where(mask[:, middle] == 1, ids[:, 0], ids[:, middle])
    return {**batch, "input_ids": ids}


def _sites(loss, params, spec, batch) -> dict[str, tuple[str, str]]:
    resolved = resolve_spec(spec, params)
    sample = optree.tree_map(lambda x: x[0], batch)
    return {
        resolved.names[s.leaf]: (s.op, s.sums)
        for s in find_sites(loss, prepare(params, differentiated=resolved.active), resolved, sample)
    }


def _assert_paths_agree(loss, params, batch, spec, chunk_size=None) -> None:
    auto = ff.per_sample_fisher(loss, params, batch, spec=spec, path="auto", chunk_size=chunk_size)
    direct = ff.per_sample_fisher(loss, params, batch, spec=spec, path="direct")
    assert torch.equal(auto.tokens, direct.tokens)
    for name, a in auto.groups.items():
        d = direct.groups[name]
        if d is None:
            assert a is None
            continue
        assert a.shape == d.shape, name
        rel = float((a - d).abs().max() / d.abs().max().clamp_min(1e-300))
        assert rel <= 1e-12, f"{name}: probe path differs from direct path by {rel:.2e}"


SPECS = {
    "inferred": None,
    "elementwise": ff.Elementwise(),
    "columns": lambda params: {k: (ff.Channel(1) if v.ndim == 2 else ff.Whole()) for k, v in params.items()},
    "heads": lambda params: {
        k: (ff.Heads(v.shape[0], axis=0) if v.ndim == 2 and k != "emb.weight" else ff.Whole())
        for k, v in params.items()
    },
    "buckets": lambda params: {k: (ff.Buckets(4) if k == "emb.weight" else ff.Whole()) for k, v in params.items()},
}


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("length", [1, 3, 12])  # one vector per sample; Gram form; direct form
def test_token_model_probe_path_matches_direct(spec_name: str, length: int) -> None:
    case = token_case(5, length)  # every sample has a real token; repeated ids inside a sequence
    params = {k: v.detach() for k, v in case.params.items()}
    spec = SPECS[spec_name] or case.spec
    batch = repeated(case.batch)
    sites = _sites(case.loss, params, spec, batch)
    assert {"emb.weight", "up.weight", "down.weight", "head.weight"} <= set(sites)
    _assert_paths_agree(case.loss, params, batch, spec)


def test_gram_and_direct_forms_both_taken() -> None:
    # T (in + out) < in·out picks the Gram form: true for T=3 with 6→5, false for T=12.
    from fisherfunc._engine.group_sums import _square_sums

    g = torch.Generator().manual_seed(1)
    for t in (1, 3, 40):
        u, v = torch.randn(t, 7, generator=g, dtype=torch.float64), torch.randn(t, 9, generator=g, dtype=torch.float64)
        full = (u.t() @ v).square()
        assert torch.allclose(_square_sums(u, v, "rows"), full.sum(1), rtol=1e-12, atol=0)
        assert torch.allclose(_square_sums(u, v, "cols"), full.sum(0), rtol=1e-12, atol=0)
        assert torch.allclose(_square_sums(u, v, "full"), full, rtol=1e-12, atol=0)


def test_gpt2_conv1d_takes_the_addmm_probe() -> None:
    case = token_case(4, 7, causal=True, conv1d=True)
    params = {k: v.detach() for k, v in case.params.items()}
    spec = case.spec  # up.weight [in, out] by output column, up.bias by channel
    assert (spec["up.weight"], spec["up.bias"]) == (ff.Channel(1), ff.Channel(0))
    batch = repeated(case.batch)
    assert _sites(case.loss, params, spec, batch)["up.weight"] == ("addmm", "cols")
    _assert_paths_agree(case.loss, params, batch, spec)
    _assert_paths_agree(case.loss, params, batch, ff.Elementwise())


def test_tied_weight_is_not_factorised_and_stays_exact() -> None:
    case = token_case(4, 6, causal=True, tied=True)
    model, loss, spec = case.model, case.loss, case.spec
    params = {k: v.detach() for k, v in case.params.items()}
    assert "head.weight" not in params  # tied: one parameter
    batch = repeated(case.batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    sites = _sites(loss, params, spec, batch)
    assert "emb.weight" not in sites and "up.weight" in sites
    _assert_paths_agree(loss, params, batch, spec)
    # and against a naive loop: the tied table's Fisher has the cross terms of both uses
    ref = torch.zeros(params["emb.weight"].shape[0], dtype=torch.float64)
    for b in range(ids.shape[0]):
        logits = model(ids[b : b + 1])[0, :-1]
        targets = ids[b, 1:]
        keep = mask[b, 1:].bool()
        value = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
        (g,) = torch.autograd.grad(value, [model.emb.weight])
        ref += g.square().sum(1)
    got = ff.fisher(loss, params, batch, spec=spec)["emb.weight"]
    assert torch.allclose(got, ref / mask[:, 1:].sum(), rtol=1e-10, atol=0)


def test_weight_used_twice_is_factorised_over_its_uses_and_a_mixed_use_falls_back() -> None:
    # "twice": lin applied twice by the same plain call, so one probe per use (stacked) is exact;
    # "matmul": the weight also reaches a function the probes do not handle, so it takes the direct path
    for use, probed in (("twice", True), ("matmul", False)):
        case = cases.case("reused_weight", use=use)
        params = {k: v.detach() for k, v in case.params.items()}
        sites = _sites(case.loss, params, case.spec, case.batch)
        assert ("lin.weight" in sites) is probed and "out.weight" in sites, use
        _assert_paths_agree(case.loss, params, case.batch, case.spec)


RELU_MLP = {"features": 6, "hidden": (8, 8), "activation": "relu", "classes": 3, "batch": 11}


def test_mlp_per_sample_and_chunks() -> None:
    case = cases.case("mlp", **RELU_MLP)
    loss, batch, spec = case.loss, case.batch, case.spec
    params = {k: v.detach() for k, v in case.params.items()}
    assert set(_sites(loss, params, spec, batch)) == {"0.weight", "2.weight", "4.weight"}
    _assert_paths_agree(loss, params, batch, spec, chunk_size=4)
    _assert_paths_agree(loss, params, batch, ff.Elementwise(), chunk_size=3)


def test_transformer_encoder_layer_linear_sublayers_probe() -> None:
    case = cases.case("attention_classifier", block="encoder", dim=8, heads=2, seq_len=5, batch=4)
    loss, batch, spec = case.loss, case.batch, case.spec
    params = {k: v.detach() for k, v in case.params.items()}
    sites = _sites(loss, params, spec, batch)
    # feed-forward sublayers and the attention projections (seen inside
    # F.multi_head_attention_forward) take the probes
    assert {"layers.0.linear1.weight", "layers.0.linear2.weight", "head.weight"} <= set(sites)
    assert sites["layers.0.self_attn.in_proj_weight"] == ("linear", "rows")  # fused QKV, Heads(parts=3)
    assert sites["layers.0.self_attn.out_proj.weight"] == ("linear", "cols")
    _assert_paths_agree(loss, params, batch, spec)
    _assert_sums_agree(loss, params, batch, spec)
    _assert_paths_agree(loss, params, batch, ff.Elementwise())
    _assert_sums_agree(loss, params, batch, ff.Elementwise())


def test_batches_of_different_lengths_in_one_call() -> None:
    # The per-call cache of the probe computation is keyed by sample shapes: batches of another
    # sequence length must get their own probe shapes, and repeated shapes reuse theirs exactly.
    case = token_case((3, 4, 2), (5, 8, 5), causal=True)
    loss, batches = case.loss, [repeated(b) for b in case.batches]
    params = {k: v.detach() for k, v in case.params.items()}
    together = ff.accumulate(loss, params, batches)
    for name in params:
        alone = sum(ff.accumulate(loss, params, b).sums[name] for b in batches)
        direct = ff.accumulate(loss, params, batches, path="direct").sums[name]
        assert torch.allclose(together.sums[name], alone, rtol=1e-12, atol=0), name
        assert torch.allclose(together.sums[name], direct, rtol=1e-12, atol=0), name


# --- batch-level sums: fisher / accumulate contract some sites outside vmap ------------------------


def _assert_sums_agree(loss, params, batch, spec, chunk_size=None) -> None:
    """``accumulate`` (sums form, batch-level contractions) equals the direct path and the per-sample form summed."""
    auto = ff.accumulate(loss, params, batch, spec=spec, chunk_size=chunk_size).sums
    direct = ff.accumulate(loss, params, batch, spec=spec, path="direct").sums
    per_sample = ff.per_sample_fisher(loss, params, batch, spec=spec, chunk_size=chunk_size).groups
    for name, a in auto.items():
        if a is None:
            assert direct[name] is None
            continue
        for other, what in ((direct[name], "direct path"), (per_sample[name].sum(0), "per-sample form summed")):
            assert a.shape == other.shape, name
            rel = float((a - other).abs().max() / other.abs().max().clamp_min(1e-300))
            assert rel <= 1e-12, f"{name}: batch-level sums differ from the {what} by {rel:.2e}"


def _batch_level(loss, params, spec, batch) -> set[str]:
    from fisherfunc._engine.group_sums import contracted_per_chunk

    resolved = resolve_spec(spec, params)
    sample = optree.tree_map(lambda x: x[0], batch)
    sites = find_sites(loss, prepare(params, differentiated=resolved.active), resolved, sample)
    return {resolved.names[s.leaf] for s in sites if contracted_per_chunk(s, resolved.shapes[s.leaf])}


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_mlp_batch_level_sums(spec_name: str) -> None:
    case = cases.case("mlp", **RELU_MLP)
    loss, batch = case.loss, case.batch
    params = {k: v.detach() for k, v in case.params.items()}
    spec = SPECS[spec_name] or case.spec
    if spec_name in ("heads", "buckets"):
        spec = case.spec
    assert _batch_level(loss, params, spec, batch) == {"0.weight", "2.weight", "4.weight"}
    _assert_sums_agree(loss, params, batch, spec)
    _assert_sums_agree(loss, params, batch, spec, chunk_size=4)


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("length", [1, 3, 12])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_token_model_batch_level_sums(spec_name: str, length: int, conv1d: bool) -> None:
    # embeddings with repeated ids and padding_idx (full square and row sums at batch level), and
    # linear / Conv1D (addmm) weights with one vector per sample (length 1)
    case = token_case(5, length, conv1d=conv1d)
    params = {k: v.detach() for k, v in case.params.items()}
    spec = SPECS[spec_name] or case.spec  # a Conv1D up-projection: by output column
    batch = repeated(case.batch)
    if length == 1:
        ids = torch.tensor([[1], [2], [1], [0], [3]])  # a repeated id across samples, and the padding id
        batch = {**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    loss = case.loss
    level = _batch_level(loss, params, spec, batch)
    if spec_name in ("elementwise", "inferred", "buckets"):  # the embedding's rule reads full squares or rows
        assert "emb.weight" in level
    if length == 1:
        assert {"up.weight", "down.weight", "head.weight"} <= level
    _assert_sums_agree(loss, params, batch, spec)
    _assert_sums_agree(loss, params, batch, spec, chunk_size=2)


_TOKEN_SIZES = {"vocab": 7, "dim": 4, "seq_len": 5, "batch": 4, "padding_idx": True}
_FAMILY_SIZES = {
    "mlp": {"batch": 6, "features": 5, "hidden": 4, "classes": 3},
    "regression": {"batch": 6, "features": 5, "hidden": 4, "outputs": 2, "variance": 0.5},
    "token_classification": {**_TOKEN_SIZES, "classes": 3, "lengths": [5, 1, 3, 2]},
    "causal_lm": {**_TOKEN_SIZES, "lengths": [5, 2, 3, 2], "tied": True},
    "transformer": {"vocab": 7, "heads": 2, "head_dim": 2, "seq_len": 5, "batch": 4, "lengths": [5, 2, 3, 4]},
}


@pytest.mark.parametrize("family", list(_FAMILY_SIZES))
def test_model_families_batch_level_sums(family: str) -> None:
    case = cases.case(family, seed=3, **_FAMILY_SIZES[family])
    params = {k: v.detach() for k, v in case.params.items()}
    for spec in (case.spec, ff.Elementwise()):
        _assert_sums_agree(case.loss, params, case.batch, spec)
        _assert_sums_agree(case.loss, params, case.batch, spec, chunk_size=3)


# --- nn.MultiheadAttention: the projections inside F.multi_head_attention_forward ------------------


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("inputs", ["self", "kv", "qkv"])
def test_multihead_attention_projections_probe(batch_first: bool, need_weights: bool, inputs: str) -> None:
    # MHA called on one sample at a time; samples 1 and 3 have key padding
    case = cases.case("per_sample_attention", seed=7, batch_first=batch_first, need_weights=need_weights, inputs=inputs)
    loss, batch, spec = case.loss, case.batch, case.spec
    params = {k: v.detach() for k, v in case.params.items()}
    assert spec["attn.in_proj_weight"] == ff.Heads(2, axis=0, parts=3)
    sites = _sites(loss, params, spec, batch)
    # discovery (no_grad, eval, batched input) must not take MHA's fast path, which the vmapped
    # computation never takes: the in-projection is seen as the same F.linear call in both
    if inputs == "self":
        assert sites["attn.in_proj_weight"] == ("linear", "rows")
    else:  # the fused weight is split / chunked before use: the direct path
        assert "attn.in_proj_weight" not in sites
    assert sites["attn.out_proj.weight"] == ("linear", "cols")
    for s in (spec, ff.Elementwise()):
        _assert_paths_agree(loss, params, batch, s)
        _assert_sums_agree(loss, params, batch, s, chunk_size=2)


def test_multihead_attention_separate_projections_probe() -> None:
    # kdim != embed_dim: separate q/k/v projection weights, each one F.linear call
    case = cases.case("per_sample_attention", seed=8, batch=4, inputs="kv", kdim=5)
    loss, batch, spec = case.loss, case.batch, case.spec
    params = {k: v.detach() for k, v in case.params.items()}
    sites = _sites(loss, params, spec, batch)
    assert {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj.weight"} <= set(sites)
    _assert_paths_agree(loss, params, batch, spec)
    _assert_sums_agree(loss, params, batch, ff.Elementwise())


# --- a FisherStep keeps the discovered sites across calls -------------------------------------------


def test_fisher_step_discovers_once_per_shape_and_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    calls: list[tuple] = []

    def counting(loss, prepared, spec, sample):
        calls.append(tuple(sample["input_ids"].shape))
        return find_sites(loss, prepared, spec, sample)

    monkeypatch.setattr(sys.modules["fisherfunc._engine.group_sums"], "find_sites", counting)
    case = token_case((3, 4, 2, 3), (5, 5, 8, 5), causal=True)
    model, loss = case.model.train(), case.loss
    params = {k: v.detach() for k, v in case.params.items()}
    step = ff.make_fisher_step(loss, decay=0.5)
    direct = ff.make_fisher_step(loss, decay=0.5, path="direct")
    state, reference = step.init(params), direct.init(params)
    for batch in case.batches:
        state, reference = step(params, batch, state), direct(params, batch, reference)
    assert calls == [(5,), (8,)]  # once per sequence length
    for name, value in state.ema.items():
        assert torch.allclose(value, reference.ema[name], rtol=1e-12, atol=0), name
    model.eval()  # another mode may call other layers: discovered again
    first = case.batches[0]  # 3 samples of length 5
    state = step(params, first, state)
    assert calls == [(5,), (8,), (5,)]
    other = ff.make_fisher_step(loss, decay=0.5)  # a new step starts empty
    other(params, first, other.init(params))
    assert len(calls) == 4
    ff.accumulate(loss, params, first)  # one-shot calls keep sites per loss: the first discovers
    ff.accumulate(loss, params, first)
    ff.fisher(loss, params, first)
    assert len(calls) == 5
    ff.accumulate(copy.copy(loss), params, first)  # the same loss built again: the model's memo, shared
    assert len(calls) == 5
    ff.accumulate(dataclasses.replace(loss, ignore_index=-1), params, first)  # other options: its own
    assert len(calls) == 6

    def plain(p: dict[str, Tensor], sample: object) -> tuple[Tensor, Tensor]:
        return loss(p, sample)

    ff.accumulate(plain, params, first, spec=case.spec)  # a plain callable keeps its own memo
    ff.accumulate(plain, params, first, spec=case.spec)
    assert len(calls) == 7


class Repeat(nn.Module):
    """``x → W x`` once, until ``change`` names another way to use ``W``: its calls change between forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4, dtype=torch.float64)
        self.head = nn.Linear(4, 3, dtype=torch.float64)
        self.change: str | None = None

    def forward(self, x: Tensor) -> Tensor:  # x: [1, 4]
        w, b = self.lin.weight, self.lin.bias
        if self.change == "rows":  # the same F.linear call, with another output shape
            h = torch.tanh(self.lin(torch.cat([x, 0.5 * x]))).sum(0, keepdim=True)
        elif self.change == "addmm":  # another probed kind of call: x W (not x Wᵀ), scaled
            h = torch.tanh(torch.addmm(b, x, w, alpha=2.0))
        else:
            h = torch.tanh(self.lin(x))
        if self.change == "twice":  # called a second time
            h = torch.tanh(self.lin(h))
        elif self.change == "matmul":  # also used outside any probed call
            h = h + torch.tanh(x @ w.T)
        elif self.change == "cat":  # also used inside a list argument
            h = h + x @ torch.cat([w, 2 * w])[:4].T
        return self.head(h)


def _small_problem(cls: type[nn.Module], seed: int) -> tuple[nn.Module, Any, dict[str, Tensor], Any, Any, Any]:
    """``cls()`` (seeded), its classification loss, params, a batch of 5, and a decay-0 step with its state."""
    torch.manual_seed(seed)
    model = cls()
    loss = ff.losses.classification(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    step = ff.make_fisher_step(loss, decay=0.0)
    return model, loss, params, batch, step, step.init(params)


@pytest.mark.parametrize("change", ["twice", "matmul", "cat", "rows", "addmm"])
@pytest.mark.parametrize("how", ["one-shot", "step", "per-sample"])
def test_sites_kept_across_calls_are_rediscovered_when_the_calls_change(how: str, change: str) -> None:
    # discovery saw `lin` called once by F.linear; the model then uses it another way. The kept
    # site is stale (its probe alone would give a wrong G: a second use's share missing, or a
    # probe broadcast over other rows), the probe mode refuses it, and the call discovers again
    model, loss, params, batch, step, state = _small_problem(Repeat, seed=0)

    def run() -> dict[str, Tensor]:
        if how == "one-shot":
            return ff.accumulate(loss, params, batch).sums
        if how == "step":
            return step.batch_sums(params, batch, state).sums
        return {k: v.sum(0) for k, v in ff.per_sample_fisher(loss, params, batch).groups.items()}

    assert "lin.weight" in _sites(loss, params, ff.infer_spec(model), batch)  # probed while called once
    before = run()
    model.change = change
    got = run()
    expected = ff.accumulate(loss, params, batch, path="direct").sums
    assert not torch.allclose(expected["lin.weight"], before["lin.weight"], rtol=1e-3)  # the change matters
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-12, atol=0), name


_USES = ("once", "twice", "matmul", "cat", "rows", "addmm", "unused", "reads")


class Program(nn.Module):
    """Three 4-wide linear layers, each used as ``uses[i]`` says — set between calls (see the property below)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4, dtype=torch.float64) for _ in range(3))
        self.head = nn.Linear(4, 3, dtype=torch.float64)
        self.uses: tuple[str, ...] = ("once",) * 3

    def forward(self, x: Tensor) -> Tensor:  # x: [1, 4]
        for layer, use in zip(self.layers, self.uses):
            w, b = layer.weight, layer.bias
            if use == "unused":
                continue
            if use == "rows":
                h = layer(torch.cat([x, 0.5 * x])).sum(0, keepdim=True)
            elif use == "addmm":
                h = torch.addmm(b, x, w, alpha=2.0)
            else:
                h = layer(x)
            if use == "twice":
                h = layer(torch.tanh(h))
            elif use == "matmul":
                h = h + x @ w.T
            elif use == "cat":
                h = h + x @ torch.cat([w, w])[2:6].T
            elif use == "reads":
                assert w.shape == (4, 4) and w.dtype == torch.float64 and not w.detach().requires_grad
            x = torch.tanh(h)
        return self.head(x)


@settings(max_examples=60, deadline=None)
@given(
    first=st.tuples(*[st.sampled_from(_USES)] * 3),
    then=st.tuples(*[st.sampled_from(_USES)] * 3),
    how=st.sampled_from(["one-shot", "step", "per-sample", "kfac"]),
    elementwise=st.booleans(),
)
def test_kept_sites_never_give_a_stale_number(
    first: tuple[str, ...], then: tuple[str, ...], how: str, elementwise: bool
) -> None:
    # Property: whatever the model does with its weights on one call and on the next (each layer
    # used once, twice, also by a matmul or inside a cat, over two rows, as a scaled addmm, not at
    # all, or only read), the second call — which finds the first call's sites or layers kept —
    # equals a computation that keeps nothing
    torch.manual_seed(3)
    model = Program()
    loss = ff.losses.classification(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    spec = ff.Elementwise() if elementwise else None  # full squares, or per-channel sums
    step = ff.make_fisher_step(loss, spec=spec, decay=0.0)
    state = step.init(params)

    def fresh_loss(p: dict[str, Tensor], sample: object) -> tuple[Tensor, Tensor]:
        return loss(p, sample)  # a new callable: nothing kept for it

    def run(fresh: bool) -> dict[str, Tensor]:
        if how == "kfac":
            k = ff.kfac.kfac(fresh_loss if fresh else copy.copy(loss), params, batch)
            return {f"{n}/{part}": v for part, values in (("A", k.A), ("G", k.G)) for n, v in values.items()}
        if fresh:
            return ff.accumulate(loss, params, batch, spec=spec, path="direct").sums
        if how == "step":
            return step.batch_sums(params, batch, state).sums
        if how == "per-sample":
            return {k: v.sum(0) for k, v in ff.per_sample_fisher(loss, params, batch, spec=spec).groups.items()}
        return ff.accumulate(loss, params, batch, spec=spec).sums

    model.uses = first
    try:
        run(fresh=False)
    except ValueError:
        if how != "kfac":
            raise
        return  # K-FAC found no layer it covers: nothing was kept
    model.uses = then
    try:
        expected = run(fresh=True)
    except ValueError:  # K-FAC covers no layer now: the kept layers must not be used either
        assert how == "kfac"
        with pytest.raises(ValueError):
            run(fresh=False)
        return
    got = run(fresh=False)
    if how == "kfac":  # kept layers are re-checked, never extended: a layer the first call could not
        assert got.keys() <= expected.keys()  # cover (used twice) stays out while the rest holds
    else:
        assert got.keys() == expected.keys()
    for name, value in got.items():
        assert torch.allclose(value, expected[name], rtol=1e-10, atol=1e-12), name


class GradDependent(nn.Module):
    """Uses ``lin``'s weight a second time only when gradients are enabled (discovery runs without)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4, dtype=torch.float64)
        self.head = nn.Linear(4, 3, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        if torch.is_grad_enabled():
            h = h + 0.5 * x @ self.lin.weight.T
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("how", ["one-shot", "step"])
def test_sites_stale_right_after_discovery_fall_back_to_the_direct_path(how: str) -> None:
    # discovery (no gradients) sees lin called once; the vectorised forward also multiplies by its
    # weight: rediscovery cannot help, so those samples take the direct path, exact, with a warning
    model, loss, params, batch, step, state = _small_problem(GradDependent, seed=2)

    def run() -> dict[str, Tensor]:
        if how == "one-shot":
            return ff.accumulate(loss, params, batch).sums
        return step.batch_sums(params, batch, state).sums

    with pytest.warns(RuntimeWarning, match="direct path"):
        got = run()
    expected = ff.accumulate(loss, params, batch, path="direct").sums
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # kept: the next call warns no more
        again = run()
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-12, atol=0), name
        assert torch.equal(again[name], got[name]), name


def test_a_probed_weight_read_without_using_its_values_keeps_its_site(monkeypatch: pytest.MonkeyPatch) -> None:
    # .shape, .dtype and .detach() mention the weight but use none of its values: no rediscovery
    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Repeat()

        def forward(self, x: Tensor) -> Tensor:
            w = self.inner.lin.weight
            assert w.shape == (4, 4) and w.dtype == torch.float64 and w.detach().ndim == 2
            return self.inner(x)

    torch.manual_seed(1)
    model = Reads()
    loss = ff.losses.classification(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    assert "inner.lin.weight" in _sites(loss, params, ff.infer_spec(model), batch)
    calls = []

    def counting(*args: object) -> tuple[Site, ...]:
        calls.append(1)
        return find_sites(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(group_sums, "find_sites", counting)
    first = ff.accumulate(loss, params, batch).sums
    second = ff.accumulate(loss, params, batch).sums
    assert len(calls) == 1  # discovered once, then kept: the reads did not make it stale
    expected = ff.accumulate(loss, params, batch, path="direct").sums
    for name, value in expected.items():
        assert torch.allclose(first[name], value, rtol=1e-12, atol=0) and torch.equal(first[name], second[name])


@pytest.mark.parametrize("causal", [False, True])
def test_transformer_decoder_self_and_cross_attention(causal: bool) -> None:
    # encoder and decoder self-attention (causal masks) take the probes; the decoder's
    # cross-attention splits its fused in-projection (queries ≠ memory), so that weight is direct
    case = cases.case("encoder_decoder", seed=9, causal=causal)
    loss, batch, spec = case.loss, case.batch, case.spec
    params = {k: v.detach() for k, v in case.params.items()}
    sites = _sites(loss, params, spec, batch)
    attention = {n for n in sites if "attn" in n}
    assert attention == {
        "enc.self_attn.in_proj_weight", "enc.self_attn.out_proj.weight",
        "dec.self_attn.in_proj_weight", "dec.self_attn.out_proj.weight", "dec.multihead_attn.out_proj.weight",
    }  # fmt: skip
    _assert_paths_agree(loss, params, batch, spec)
    _assert_sums_agree(loss, params, batch, spec)
    _assert_sums_agree(loss, params, batch, ff.Elementwise())


def test_sites_reduce_in_the_backward_past_the_kept_factor_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """``in_backward`` keeps the smallest sites' factors within the budget; the rest run a ``ReducingProbe``."""

    def site(leaf: int, tokens: int, n_out: int, op: str = "linear", uses: int = 1) -> Site:
        return Site(leaf=leaf, op=op, out_shape=(tokens, n_out), sums="rows", uses=uses)

    shapes = [(8, 4), (16, 4), (4, 32), (8, 4), (50, 8)]  # linear [out, in]; leaf 2 is an addmm [in, out]
    sites = [
        site(0, 10, 8),
        site(1, 10, 16),
        site(2, 10, 32, "addmm"),
        site(3, 10, 8, uses=2),
        site(4, 10, 8, "embedding"),
    ]
    sizes = [10 * (4 + 8) * 4, 10 * (4 + 16) * 4, 10 * (4 + 32) * 4]  # T·(in + out) float32 bytes: 480, 800, 1440
    assert [group_sums.factor_bytes(s, shapes[s.leaf], 4) for s in sites[:3]] == sizes
    # repeated weights and embeddings never reduce in the backward (their factors are needed to the end)
    assert in_backward(sites, shapes, 4, budget=0) == {0, 1, 2}
    assert in_backward(sites, shapes, 4, budget=sum(sizes)) == set()
    assert in_backward(sites, shapes, 4, budget=480 + 800) == {2}  # smallest first
    assert in_backward(sites, shapes, 4, budget=1000) == {1, 2}  # 480 kept; 480 + 800 > 1000
    assert in_backward(sites, shapes, 2, budget=1000) == {2}  # bfloat16 factors: half the bytes (240 + 400 kept)
    # an output gradient per label set (the "mc" kind's samples): 10·(4 + 3·8)·4 = 1120 bytes for leaf 0
    assert group_sums.factor_bytes(sites[0], shapes[0], 4, sets=3) == 1120
    assert in_backward(sites, shapes, 4, budget=1000, sets=3) == {0, 1, 2}
    assert in_backward(sites, shapes, 4, budget=sum(sizes), sets=None) == {0, 1, 2}  # sets not known: all reduce

    # and the probes run accordingly: no ReducingProbe within the budget, one per site past it
    case = token_case(3, 12)
    calls: list[int] = []
    backward = probes.ReducingProbe.backward

    def counted(ctx, d):  # type: ignore[no-untyped-def]
        calls.append(1)
        return backward(ctx, d)

    monkeypatch.setattr(probes.ReducingProbe, "backward", staticmethod(counted))
    monkeypatch.setattr(group_sums, "KEPT_FACTOR_BYTES", 1 << 20)  # whichever budget the fixture set
    kept = ff.fisher(case.loss, case.params, case.batch)
    assert not calls
    monkeypatch.setattr(group_sums, "KEPT_FACTOR_BYTES", 0)
    reduced = ff.fisher(case.loss, case.params, case.batch)
    linear = _sites(case.loss, case.params, ff.infer_spec(case.loss.model), case.batch)
    # one (batched) backward per site: the batch is one chunk
    assert len(calls) == sum(op in ("linear", "addmm") for op, _ in linear.values()) > 0
    for name, value in kept.items():
        torch.testing.assert_close(reduced[name], value, rtol=1e-12, atol=0)
