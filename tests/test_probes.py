"""The factorised output-probe path equals the direct ``vmap(grad)`` path, exactly.

The direct path is checked against a naive per-sample autograd loop in ``test_reference.py``;
here ``path="auto"`` (probes where a weight qualifies) is checked against ``path="direct"`` in
float64 for every form the probe path has (one vector per sample, Gram and direct sequence forms,
row / column / full sums, embeddings with repeated ids and ``padding_idx``, GPT-2 ``Conv1D``
through ``torch.addmm``), and against the naive loop where the probe path alone is at stake.
Every case also asserts which weights took the probe path, so a silent fallback to the direct
path cannot pass as a probe result.
"""

from __future__ import annotations

import optree
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherfunc as ff
from fisherfunc._engine.group_sums import find_sites
from fisherfunc._engine.numerics import prepare
from fisherfunc._spec.resolve import resolve_spec

torch.manual_seed(0)


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D``: a linear layer stored ``(in, out)``, applied with ``torch.addmm``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


class TokenModel(nn.Module):
    def __init__(self, vocab: int = 13, d: int = 6, hidden: int = 5, tied: bool = False, conv1d: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.up = Conv1D(hidden, d) if conv1d else nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(torch.tanh(self.up(h)))
        return self.head(self.norm(h))


def _token_batch(batch: int, length: int, vocab: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    ids[:, length // 2] = ids[:, 0]  # repeated ids inside a sequence
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        pad = int(torch.randint(0, max(length // 2, 1), (1,), generator=g))
        if pad:
            ids[b, -pad:] = 0
            mask[b, -pad:] = 0
    return ids, mask


def _sites(loss, params, spec, batch) -> dict[str, tuple[str, str]]:
    resolved = resolve_spec(spec, params)
    sample = optree.tree_map(lambda x: x[0], batch)
    return {resolved.names[s.leaf]: (s.op, s.sums) for s in find_sites(loss, prepare(params, differentiated=resolved.active), resolved, sample)}


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
        k: (ff.Heads(v.shape[0], axis=0) if v.ndim == 2 and k != "embed.weight" else ff.Whole())
        for k, v in params.items()
    },
    "buckets": lambda params: {k: (ff.Buckets(4) if k == "embed.weight" else ff.Whole()) for k, v in params.items()},
}


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("length", [1, 3, 12])  # one vector per sample; Gram form; direct form
def test_token_model_probe_path_matches_direct(spec_name: str, length: int) -> None:
    model = TokenModel().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    spec = SPECS[spec_name] or ff.infer_spec(model)
    ids, mask = _token_batch(5, length)
    loss = ff.losses.token_classification(model, inputs=0, targets=0, mask=1)
    if length == 1:
        ids[:, 0] = torch.arange(1, 6)  # no padding-only samples
        mask[:] = 1
    sites = _sites(loss, params, spec, (ids, mask))
    assert {"embed.weight", "up.weight", "down.weight", "head.weight"} <= set(sites)
    _assert_paths_agree(loss, params, (ids, mask), spec)


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
    model = TokenModel(conv1d=True).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    spec = {**ff.infer_spec(model, overrides={"up.weight": ff.Channel(1), "up.bias": ff.Channel(0)})}
    ids, mask = _token_batch(4, 7)
    loss = ff.losses.causal_lm(model, inputs=0, mask=1)
    assert _sites(loss, params, spec, (ids, mask))["up.weight"] == ("addmm", "cols")
    _assert_paths_agree(loss, params, (ids, mask), spec)
    _assert_paths_agree(loss, params, (ids, mask), ff.Elementwise())


def test_tied_weight_is_not_factorised_and_stays_exact() -> None:
    model = TokenModel(tied=True).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    assert "head.weight" not in params  # tied: one parameter
    ids, mask = _token_batch(4, 6)
    loss = ff.losses.causal_lm(model, inputs=0, mask=1)
    spec = ff.infer_spec(model)
    sites = _sites(loss, params, spec, (ids, mask))
    assert "embed.weight" not in sites and "up.weight" in sites
    _assert_paths_agree(loss, params, (ids, mask), spec)
    # and against a naive loop: the tied table's Fisher has the cross terms of both uses
    ref = torch.zeros(params["embed.weight"].shape[0], dtype=torch.float64)
    for b in range(ids.shape[0]):
        logits = model(ids[b : b + 1])[0, :-1]
        targets = ids[b, 1:]
        keep = mask[b, 1:].bool()
        value = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
        (g,) = torch.autograd.grad(value, [model.embed.weight])
        ref += g.square().sum(1)
    got = ff.fisher(loss, params, (ids, mask), spec=spec)["embed.weight"]
    assert torch.allclose(got, ref / mask[:, 1:].sum(), rtol=1e-10, atol=0)


def test_weight_used_twice_falls_back_to_direct() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.lin(torch.tanh(self.lin(x))))

    class Other(nn.Module):  # the weight also reaches a function the probes do not handle
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.lin(x) + x @ self.lin.weight.t())

    for cls in (Twice, Other):
        model = cls().double()
        params = {k: v.detach() for k, v in model.named_parameters()}
        batch = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
        loss = ff.losses.classification(model)
        sites = _sites(loss, params, ff.infer_spec(model), batch)
        assert "lin.weight" not in sites and "out.weight" in sites, cls.__name__
        _assert_paths_agree(loss, params, batch, ff.infer_spec(model))


def test_mlp_per_sample_and_chunks() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(11, 6, dtype=torch.float64), torch.randint(0, 3, (11,)))
    loss = ff.losses.classification(model)
    spec = ff.infer_spec(model)
    assert set(_sites(loss, params, spec, batch)) == {"0.weight", "2.weight", "4.weight"}
    _assert_paths_agree(loss, params, batch, spec, chunk_size=4)
    _assert_paths_agree(loss, params, batch, ff.Elementwise(), chunk_size=3)


def test_transformer_encoder_layer_linear_sublayers_probe() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double().eval()
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(8 * 5, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(4, 5, 8, dtype=torch.float64), torch.randint(0, 3, (4,)))
    loss = ff.losses.classification(model)
    spec = ff.infer_spec(model)
    sites = _sites(loss, params, spec, batch)
    # feed-forward sublayers and the attention projections (seen inside
    # F.multi_head_attention_forward) take the probes
    assert {"0.linear1.weight", "0.linear2.weight", "2.weight"} <= set(sites)
    assert sites["0.self_attn.in_proj_weight"] == ("linear", "rows")  # fused QKV, Heads(parts=3)
    assert sites["0.self_attn.out_proj.weight"] == ("linear", "cols")
    _assert_paths_agree(loss, params, batch, spec)
    _assert_sums_agree(loss, params, batch, spec)
    _assert_paths_agree(loss, params, batch, ff.Elementwise())
    _assert_sums_agree(loss, params, batch, ff.Elementwise())


def test_batches_of_different_lengths_in_one_call() -> None:
    # The per-call cache of the probe computation is keyed by sample shapes: batches of another
    # sequence length must get their own probe shapes, and repeated shapes reuse theirs exactly.
    model = TokenModel().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = ff.losses.causal_lm(model, inputs=0, mask=1)
    batches = [_token_batch(3, 5), _token_batch(4, 8), _token_batch(2, 5)]
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
    return {resolved.names[s.leaf] for s in sites if contracted_per_chunk(s)}


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_mlp_batch_level_sums(spec_name: str) -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(11, 6, dtype=torch.float64), torch.randint(0, 3, (11,)))
    loss = ff.losses.classification(model)
    spec = SPECS[spec_name] or ff.infer_spec(model)
    if spec_name in ("heads", "buckets"):
        spec = ff.infer_spec(model)
    assert _batch_level(loss, params, spec, batch) == {"0.weight", "2.weight", "4.weight"}
    _assert_sums_agree(loss, params, batch, spec)
    _assert_sums_agree(loss, params, batch, spec, chunk_size=4)


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("length", [1, 3, 12])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_token_model_batch_level_sums(spec_name: str, length: int, conv1d: bool) -> None:
    # embeddings with repeated ids and padding_idx (full square and row sums at batch level), and
    # linear / Conv1D (addmm) weights with one vector per sample (length 1)
    model = TokenModel(conv1d=conv1d).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    conv1d_rules = {"up.weight": ff.Channel(1), "up.bias": ff.Channel(0)} if conv1d else None
    spec = SPECS[spec_name] or ff.infer_spec(model, overrides=conv1d_rules)
    ids, mask = _token_batch(5, length)
    if length == 1:
        ids[:, 0] = torch.tensor([1, 2, 1, 0, 3])  # a repeated id across samples, and the padding id
        mask[:] = 1
    loss = ff.losses.token_classification(model, inputs=0, targets=0, mask=1)
    level = _batch_level(loss, params, spec, (ids, mask))
    if spec_name in ("elementwise", "inferred", "buckets"):  # the embedding's rule reads full squares or rows
        assert "embed.weight" in level
    if length == 1:
        assert {"up.weight", "down.weight", "head.weight"} <= level
    _assert_sums_agree(loss, params, (ids, mask), spec)
    _assert_sums_agree(loss, params, (ids, mask), spec, chunk_size=2)


_TOKEN_SIZES = {"vocab": 7, "dim": 4, "classes": 3, "heads": 2, "head_dim": 2, "seq_len": 5, "norm_first": True}
_FAMILY_SIZES = {
    "mlp": {"batch": 6, "features": 5, "hidden": 4, "classes": 3, "outputs": 2, "variance": 1.0},
    "regression": {"batch": 6, "features": 5, "hidden": 4, "classes": 3, "outputs": 2, "variance": 0.5},
    "token_classification": {**_TOKEN_SIZES, "batch": 4, "lengths": [5, 1, 3, 2], "tied": False, "padding_idx": True},
    "causal_lm": {**_TOKEN_SIZES, "batch": 4, "lengths": [5, 2, 3, 2], "tied": True, "padding_idx": True},
    "transformer": {**_TOKEN_SIZES, "batch": 4, "lengths": [5, 2, 3, 4], "tied": False, "padding_idx": False},
}


@pytest.mark.parametrize("family", list(_FAMILY_SIZES))
def test_model_families_batch_level_sums(family: str) -> None:
    from fisherfunc.testing.strategies import build_case

    case = build_case(family, 3, _FAMILY_SIZES[family])
    params = {k: v.detach() for k, v in case.params.items()}
    for spec in (ff.infer_spec(case.model), ff.Elementwise()):
        _assert_sums_agree(case.loss, params, case.batch, spec)
        _assert_sums_agree(case.loss, params, case.batch, spec, chunk_size=3)


# --- nn.MultiheadAttention: the projections inside F.multi_head_attention_forward ------------------


class Attention(nn.Module):
    """``nn.MultiheadAttention`` on a batch of one (``batch_first`` or not), mean-pooled to classes.

    ``inputs``: ``"self"`` (q = k = v: one fused in-projection call), ``"kv"`` (k = v ≠ q: the fused
    weight is split, so it is used more than once), ``"qkv"`` (all different: chunked).
    """

    def __init__(self, *, batch_first: bool, need_weights: bool, inputs: str, kdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(8, 3)
        self.batch_first, self.need_weights, self.inputs = batch_first, need_weights, inputs
        self.kv = nn.Linear(8, kdim) if kdim is not None else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: [T, 8] (one sample), mask: [T]; a batch dimension of one is added here
        x = x.unsqueeze(0 if self.batch_first else 1)
        q = x
        k = v = x if self.inputs == "self" else torch.tanh(x)
        if self.inputs == "qkv":
            v = torch.sin(x)
        if self.kv is not None:
            k, v = self.kv(k), self.kv(v) if self.inputs == "qkv" else self.kv(k)
        out, _ = self.attn(q, k, v, key_padding_mask=(mask == 0).unsqueeze(0), need_weights=self.need_weights)
        return self.head(out.mean(1 if self.batch_first else 0).squeeze(0))


def _attention_loss(model: nn.Module):
    def loss(params, sample):
        x, mask, y = sample
        logits = torch.func.functional_call(model, params, (x, mask))
        return F.cross_entropy(logits, y, reduction="sum"), 1

    return loss


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("inputs", ["self", "kv", "qkv"])
def test_multihead_attention_projections_probe(batch_first: bool, need_weights: bool, inputs: str) -> None:
    model = Attention(batch_first=batch_first, need_weights=need_weights, inputs=inputs).double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 6, 8, dtype=torch.float64, generator=g)
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[1, 4:], mask[3, 2:] = 0, 0  # key padding
    batch = (x, mask, torch.randint(0, 3, (5,), generator=g))
    loss = _attention_loss(model)
    spec = ff.infer_spec(model)
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
    model = Attention(batch_first=True, need_weights=False, inputs="kv", kdim=5).double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(8)
    batch = (torch.randn(4, 6, 8, dtype=torch.float64, generator=g), torch.ones(4, 6, dtype=torch.long))
    batch = (*batch, torch.randint(0, 3, (4,), generator=g))
    loss = _attention_loss(model)
    spec = ff.infer_spec(model)
    sites = _sites(loss, params, spec, batch)
    assert {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj.weight"} <= set(sites)
    _assert_paths_agree(loss, params, batch, spec)
    _assert_sums_agree(loss, params, batch, ff.Elementwise())


# --- a FisherStep keeps the discovered sites across calls -------------------------------------------


def test_fisher_step_discovers_once_per_shape_and_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    calls: list[tuple] = []

    def counting(loss, prepared, spec, sample):
        calls.append(tuple(sample[0].shape))
        return find_sites(loss, prepared, spec, sample)

    monkeypatch.setattr(sys.modules["fisherfunc._engine.group_sums"], "find_sites", counting)
    model = TokenModel().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = ff.losses.causal_lm(model, inputs=0, mask=1)
    step = ff.make_fisher_step(loss, decay=0.5)
    direct = ff.make_fisher_step(loss, decay=0.5, path="direct")
    state, reference = step.init(params), direct.init(params)
    for batch in (_token_batch(3, 5), _token_batch(4, 5), _token_batch(2, 8), _token_batch(3, 5)):
        state, reference = step(params, batch, state), direct(params, batch, reference)
    assert calls == [(5,), (8,)]  # once per sequence length
    for name, value in state.ema.items():
        assert torch.allclose(value, reference.ema[name], rtol=1e-12, atol=0), name
    model.eval()  # another mode may call other layers: discovered again
    state = step(params, _token_batch(3, 5), state)
    assert calls == [(5,), (8,), (5,)]
    other = ff.make_fisher_step(loss, decay=0.5)  # a new step starts empty
    other(params, _token_batch(3, 5), other.init(params))
    assert len(calls) == 4
    ff.accumulate(loss, params, _token_batch(3, 5))  # one-shot calls keep nothing
    ff.accumulate(loss, params, _token_batch(3, 5))
    assert len(calls) == 6


@pytest.mark.parametrize("causal", [False, True])
def test_transformer_decoder_self_and_cross_attention(causal: bool) -> None:
    # encoder and decoder self-attention (causal masks) take the probes; the decoder's
    # cross-attention splits its fused in-projection (queries ≠ memory), so that weight is direct
    class EncoderDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[-2], dtype=x.dtype) if causal else None
            memory = self.enc(x, src_mask=mask, is_causal=causal)
            return self.head(self.dec(torch.tanh(x), memory, tgt_mask=mask, tgt_is_causal=causal).mean(-2))

    model = EncoderDecoder().double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(9)
    batch = (torch.randn(5, 6, 8, dtype=torch.float64, generator=g), torch.randint(0, 3, (5,), generator=g))
    loss = ff.losses.classification(model)
    spec = ff.infer_spec(model)
    sites = _sites(loss, params, spec, batch)
    attention = {n for n in sites if "attn" in n}
    assert attention == {
        "enc.self_attn.in_proj_weight", "enc.self_attn.out_proj.weight",
        "dec.self_attn.in_proj_weight", "dec.self_attn.out_proj.weight", "dec.multihead_attn.out_proj.weight",
    }  # fmt: skip
    _assert_paths_agree(loss, params, batch, spec)
    _assert_sums_agree(loss, params, batch, spec)
    _assert_sums_agree(loss, params, batch, ff.Elementwise())
