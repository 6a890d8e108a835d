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
from fisherfunc.per_sample import prepare
from fisherfunc.probes import discover_sites
from fisherfunc.spec import resolve_spec

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
    return {resolved.names[s.leaf]: (s.op, s.need) for s in discover_sites(loss, prepare(resolved, params), sample)}


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
    from fisherfunc.probes import _square_sums

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
    # feed-forward sublayers take the probes; attention projections (inside
    # F.multi_head_attention_forward) are differentiated directly.
    assert {"0.linear1.weight", "0.linear2.weight", "2.weight"} <= set(sites)
    assert "0.self_attn.in_proj_weight" not in sites and "0.self_attn.out_proj.weight" not in sites
    _assert_paths_agree(loss, params, batch, spec)


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
