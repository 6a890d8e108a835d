"""Attention under ``vmap`` on the CPU, and full squares of sequence layers contracted per chunk.

- :class:`~fisherfunc._engine.attention.BatchedAttention` routes a small CPU attention call to the
  math kernel (which batches) and leaves a large one to torch's choice; which kernel ran is read
  from the profiler, and both kernels must give the same values.
- :func:`~fisherfunc._engine.attention.in_projection_packed` (the per-sample copy of
  ``F.multi_head_attention_forward`` splits its packed projection by views) gives torch's values
  and leaves every other call to torch's helper.
- Group Fisher and the elementwise diagonal of an ``nn.TransformerEncoderLayer`` model (attention,
  sequence layers with ``T > 1``, whose full squares ``Σ_b G_b ⊙ G_b`` are now summed sample by
  sample outside ``vmap``) against a naive ``torch.autograd`` loop in float64.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import assert_groups_close, cross_entropy_sum, reference_fisher, to_float64
from torch import Tensor, nn
from torch.func import vmap

import fisherfunc as ff
from fisherfunc._engine import attention
from fisherfunc._engine.group_sums import Site, contracted_per_chunk, find_sites, full_squares
from fisherfunc._engine.numerics import prepare
from fisherfunc._spec.resolve import resolve_spec

pytestmark = pytest.mark.usefixtures("one_thread")

needs_kernels = pytest.mark.skipif(
    not attention.math_kernel_batches(),
    reason="needs torch.nn.attention (torch >= 2.2) and a math kernel that batches under vmap (not torch 2.4)",
)
FLASH = "_scaled_dot_product_flash_attention_for_cpu"


def kernels_run(fn) -> set[str]:
    """The attention kernels (aten op names) ``fn()`` runs."""
    from torch.profiler import profile

    with profile() as prof, warnings.catch_warnings():  # vmap's note on the flash kernel's per-sample loop
        warnings.filterwarnings("ignore", message="There is a performance drop")
        fn()
    return {e.key for e in prof.key_averages() if "attention" in e.key}


def per_sample_attention(q: Tensor) -> Tensor:
    mode = attention.batched_attention(q.device)
    with mode if mode is not None else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, q, q)


@needs_kernels
def test_small_attention_batches_with_the_math_kernel() -> None:
    q = torch.randn(6, 1, 2, 16, 8)  # 6 samples of [1, 2 heads, 16 positions, d_head 8]: 16 ≤ 2 · 8 keys per query
    batched = vmap(per_sample_attention)
    default = kernels_run(lambda: vmap(lambda x: F.scaled_dot_product_attention(x, x, x))(q))
    assert any(FLASH in k for k in default), default  # without the mode: torch's flash kernel, per sample
    ran = kernels_run(lambda: batched(q))
    assert not any(FLASH in k for k in ran), ran
    expected = torch.stack([F.scaled_dot_product_attention(x, x, x) for x in q])
    torch.testing.assert_close(batched(q), expected, rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize(
    ("shape", "max_scores"),
    [((3, 1, 2, 16, 8), 100), ((3, 1, 2, 17, 8), None)],
    ids=["more scores than MAX_SCORES", "more keys than 2 d_head per query"],
)
def test_large_attention_keeps_torchs_kernel(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], max_scores: int | None
) -> None:
    if max_scores is not None:
        monkeypatch.setattr(attention, "MAX_SCORES", max_scores)  # 2 · 16 · 16 = 512 > 100
    q = torch.randn(*shape)
    default = kernels_run(lambda: vmap(lambda x: F.scaled_dot_product_attention(x, x, x))(q))
    ran = kernels_run(lambda: vmap(per_sample_attention)(q))
    assert ran == default  # the mode changed nothing
    assert any(FLASH in k for k in default), default  # torch's own choice is the flash kernel here


def test_the_mode_is_a_no_op_off_the_cpu_or_without_a_batching_math_kernel() -> None:
    assert not isinstance(attention.batched_attention(torch.device("meta")), attention.BatchedAttention)
    on_cpu = isinstance(attention.batched_attention(torch.device("cpu")), attention.BatchedAttention)
    assert on_cpu == attention.math_kernel_batches()


@pytest.mark.skipif(not hasattr(F, "_in_projection_packed"), reason="this torch has no packed in-projection helper")
@pytest.mark.parametrize("bias", [True, False])
def test_packed_in_projection_splits_one_sequence_by_views(bias: bool) -> None:
    torch.manual_seed(0)
    w, b = torch.randn(12, 4), torch.randn(12) if bias else None
    x = torch.randn(5, 1, 4)  # one sequence: [T, N = 1, E]
    ours, torchs = attention.in_projection_packed(x, x, x, w, b), F._in_projection_packed(x, x, x, w, b)
    for mine, theirs in zip(ours, torchs, strict=True):
        assert torch.equal(mine, theirs)
        assert mine.view(5, 2, 2).shape == (5, 2, 2)  # reshapes as MHA reshapes it ([T, N·heads, d_head])
    # views of one projection, so the backward is one stack, not three zero-filled copies
    assert ours[0]._base is ours[1]._base is ours[2]._base is not None
    # a batch of sequences, or cross-attention: torch's own helper, the same values
    for q, k in ((torch.randn(5, 3, 4),) * 2, (x, torch.randn(6, 1, 4))):
        got = attention.in_projection_packed(q, k, k, w, b)
        for mine, theirs in zip(got, F._in_projection_packed(q, k, k, w, b), strict=True):
            assert torch.equal(mine, theirs)


def test_the_transparent_attention_body_uses_the_view_split() -> None:
    from fisherfunc._engine.probes import transparent

    body = transparent(F.multi_head_attention_forward)
    assert body is not None
    expected = attention.in_projection_packed if hasattr(F, "_in_projection_packed") else None
    assert body.__globals__.get("_in_projection_packed", None) is expected
    # torch's module is left alone
    assert getattr(F, "_in_projection_packed", None) is not attention.in_projection_packed


class Encoder(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2, t: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, heads, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d * t, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).flatten(1))


def sample_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, float]:
    x, y = batch
    return cross_entropy_sum(model(x), y)


@pytest.mark.parametrize("spec", [None, ff.Elementwise()], ids=["inferred groups", "elementwise"])
def test_encoder_fisher_matches_a_naive_loop(spec: ff.Rule | None) -> None:
    torch.manual_seed(0)
    model = to_float64(Encoder().eval())
    x = torch.randn(7, 5, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    loss = ff.losses.classification(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    got = ff.fisher(loss, params, (x, y), spec=spec, chunk_size=3)
    expected = reference_fisher(model, (x, y), sample_loss, spec)
    assert_groups_close(got, expected, 1e-10)


def test_sequence_layers_full_squares_leave_vmap() -> None:
    torch.manual_seed(0)
    model = Encoder().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = ff.losses.classification(model)
    resolved = resolve_spec(ff.Elementwise(), params)
    prepared = prepare(params)
    x, y = torch.randn(2, 5, 8), torch.randint(0, 3, (2,))
    sites = {resolved.names[s.leaf]: s for s in find_sites(loss, prepared, resolved, (x[0], y[0]))}
    # T = 5 tokens: T (n0 + n1) ≤ n0 n1 for the feed-forward layers (5 · 24 ≤ 128) ...
    assert contracted_per_chunk(sites["layer.linear1.weight"], (16, 8))
    # ... and the head sees one vector per sample
    assert contracted_per_chunk(sites["head.weight"], (3, 40))
    # a sequence site whose factors outgrow one G_b keeps the per-sample square
    wide = Site(leaf=0, op="linear", out_shape=(64, 4), sums="full")
    assert not contracted_per_chunk(wide, (4, 4))


@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 4), t=st.integers(1, 6), n0=st.integers(1, 7), n1=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_full_squares_sum_every_samples_square(c: int, t: int, n0: int, n1: int, seed: int) -> None:

    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(c, t, n0, generator=gen, dtype=torch.float64)
    v = torch.randn(c, t, n1, generator=gen, dtype=torch.float64)
    expected = sum(((u[b].t() @ v[b]) ** 2 for b in range(c)), torch.zeros(n0, n1, dtype=torch.float64))
    torch.testing.assert_close(full_squares(u, v), expected, rtol=1e-12, atol=0)
