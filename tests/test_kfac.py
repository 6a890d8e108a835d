"""K-FAC and EK-FAC (fisherfunc.kfac) against independent references.

References never call fisherfunc's capture: per-sample gradients come from a plain loop with
``torch.autograd.grad`` over the module itself, and layer inputs / output gradients from a
hand-written forward whose intermediates are differentiated directly. Everything is float64.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc._state.ema import bias_correction
from fisherfunc.kfac._ops import own_order
from fisherfunc.testing import cases
from fisherfunc.testing.cases import Case

TOL = 1e-10


def _mlp(*, seed: int = 0, batch: int | tuple[int, ...] = 5, positions: int | None = None, **sizes) -> Case:
    """Linear(4, 5) → Tanh → Linear(5, 3) on ``x [B, 4]``, or on every position of ``x [B, T, 4]``.

    With ``positions`` the labels ``y [B, T]`` are ``-100`` with probability 0.2 (fewer tokens than
    positions) and the loss is ``token_classification``; otherwise ``classification``.
    """
    ignore = {"ignore_frac": 0.2} if positions else {}
    sizes = {"features": 4, "hidden": 5, "classes": 3, **ignore, **sizes}
    return cases.case("mlp", seed=seed, batch=batch, positions=positions, **sizes)


def _per_sample_grads(model: nn.Module, xs: Tensor, ys: Tensor) -> list[dict[str, Tensor]]:
    """``∇_θ L_b`` for each sample by a loop (sum loss over the sample's positions)."""
    params = dict(model.named_parameters())
    out = []
    for b in range(xs.shape[0]):
        logits = model(xs[b : b + 1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys[b : b + 1].reshape(-1), reduction="sum")
        out.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    return out


def _dense_fisher(grads: list[dict[str, Tensor]], weight: str, bias: str | None, tokens: float) -> Tensor:
    """``Σ_b v_b v_bᵀ / n`` over ``v_b = [vec W, b]`` (the exact token-normalised block)."""
    vs = [torch.cat([g[weight].reshape(-1)] + ([g[bias]] if bias else [])) for g in grads]
    return sum(torch.outer(v, v) for v in vs) / tokens


# --- exactness where K-FAC is exact ----------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_one_example_one_token_is_exact(bias: bool, approx: str) -> None:
    case = _mlp(seed=1, batch=1, bias=bias)
    model, (x, y) = case.model, case.batch
    K = ff.kfac.kfac(case.loss, case.params, (x, y), approx=approx)
    grads = _per_sample_grads(model, x, y)
    for layer in K.layers:
        exact = _dense_fisher(grads, layer.name, layer.bias_name, tokens=1.0)
        assert (ff.kfac.dense(K, layer.name) - exact).abs().max() <= TOL * exact.abs().max()
    assert [x.bias_name for x in K.layers] == ([None, None] if not bias else ["0.bias", "2.bias"])


def test_gpt2_conv1d_one_token_is_exact_and_tied_head_is_not_covered() -> None:
    pytest.importorskip("transformers")
    tiny = {"family": "gpt2", "vocab": 11, "dim": 8, "layers": 1, "heads": 2, "positions": 8, "dropout": 0.0}
    case = cases.case("hf_causal_lm", lengths=(2,), seq_len=2, **tiny)  # one sequence of 2 tokens
    params, batch, loss = case.params, case.batch, case.loss
    K = ff.kfac.kfac(loss, params, batch)
    names = [x.name for x in K.layers]
    assert names == [f"transformer.h.0.{m}.weight" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert all(x.op == "addmm" for x in K.layers)
    # one predicted token (position 0 predicts position 1): the EK-FAC scaling is the exact
    # Fisher's diagonal in the K-FAC eigenbasis, through GPT-2's transposed (addmm) layout
    value, n = loss(params, {k: v[0] for k, v in batch.items()})
    g = dict(zip(params, torch.autograd.grad(value, list(params.values()))))
    E = ff.kfac.ekfac(loss, params, batch, K)
    for layer in K.layers:
        w = g[layer.name].t()  # [out, in]
        v = torch.cat([w, g[layer.bias_name].unsqueeze(1)], 1).reshape(-1)
        q = torch.kron(E.QG[layer.name], E.QA[layer.name])
        in_basis = torch.diagonal(q.t() @ torch.outer(v, v) @ q) / float(n)
        assert (E.scale[layer.name].reshape(-1) - in_basis).abs().max() <= TOL * in_basis.abs().max()


def test_gpt2_single_position_factor_product_is_the_fisher() -> None:
    pytest.importorskip("transformers")
    tiny = {"family": "gpt2", "vocab": 11, "dim": 8, "layers": 1, "heads": 2, "positions": 8, "dropout": 0.0}
    case = cases.case("hf_sequence_classification", lengths=(1,), seq_len=1, **tiny)  # one token
    params, batch, loss = case.params, case.batch, case.loss
    K = ff.kfac.kfac(loss, params, batch)
    (value, n) = loss(params, {k: v[0] for k, v in batch.items()})
    g = dict(zip(params, torch.autograd.grad(value, list(params.values()))))
    assert K.layers, "GPT-2's Conv1D layers are covered"
    for layer in K.layers:
        exact = _dense_fisher([g], layer.name, layer.bias_name, float(n))
        assert (ff.kfac.dense(K, layer.name) - exact).abs().max() <= TOL * exact.abs().max(), layer.name


# --- factors against their definitions (sequences, both conventions) -------------------------------


def _reference_factors(model: nn.Sequential, x: Tensor, y: Tensor, approx: str) -> dict[str, tuple[Tensor, Tensor]]:
    """``A``, ``G`` of both layers from a hand-written forward, by their definitions."""
    lin0, lin1 = model[0], model[2]
    A = {"0.weight": 0.0, "2.weight": 0.0}
    G = {"0.weight": 0.0, "2.weight": 0.0}
    positions = {"0.weight": 0.0, "2.weight": 0.0}
    tokens = 0.0
    for b in range(x.shape[0]):
        a0 = x[b]
        z = lin0(a0)
        a1 = torch.tanh(z)
        out = lin1(a1)
        valid = y[b] != -100
        loss = F.cross_entropy(out[valid], y[b][valid], reduction="sum")
        d0, d1 = torch.autograd.grad(loss, [z, out])
        tokens += float(valid.sum())
        for name, a, d in (("0.weight", a0, d0), ("2.weight", a1, d1)):
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1).detach()
            if approx == "reduce":
                a, d = a.mean(0, keepdim=True), d.sum(0, keepdim=True)
            A[name] = A[name] + a.t() @ a
            G[name] = G[name] + d.t() @ d
            positions[name] += a.shape[0]
    return {k: (A[k] / positions[k], G[k] / tokens) for k in A}


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_sequence_factors_match_definitions(approx: str, chunk_size: int | None) -> None:
    case = _mlp(seed=2, positions=4)
    model, (x, y), loss = case.model, case.batch, case.loss
    K = ff.kfac.kfac(loss, case.params, (x, y), approx=approx, chunk_size=chunk_size)
    reference = _reference_factors(model, x, y, approx)
    for name, (A, G) in reference.items():
        assert (K.A[name] - A).abs().max() <= TOL * A.abs().max()
        assert (K.G[name] - G).abs().max() <= TOL * G.abs().max()
    assert K.tokens == float((y != -100).sum())
    assert K.positions["0.weight"] == (x.shape[0] * x.shape[1] if approx == "expand" else x.shape[0])


def test_ekfac_scale_is_the_exact_diagonal_in_its_eigenbasis() -> None:
    """``S = diag((Q_G ⊗ Q_A)ᵀ F (Q_G ⊗ Q_A))`` for the exact token-normalised Fisher block."""
    case = _mlp(seed=2, positions=4)
    model, (x, y), loss, params = case.model, case.batch, case.loss, case.params
    K = ff.kfac.kfac(loss, params, (x, y))
    E = ff.kfac.ekfac(loss, params, (x, y), K)
    tokens = float((y != -100).sum())
    grads = []
    for b in range(x.shape[0]):
        out = model(x[b])
        valid = y[b] != -100
        value = F.cross_entropy(out[valid], y[b][valid], reduction="sum")
        grads.append(dict(zip(params, torch.autograd.grad(value, list(params.values())))))
    for layer in E.layers:
        exact = torch.zeros(layer.out_features * layer.a_dim, layer.out_features * layer.a_dim, dtype=torch.float64)
        for g in grads:  # vec of [W | b] in row-major order
            v = torch.cat([g[layer.name], g[layer.bias_name].unsqueeze(1)], 1).reshape(-1)
            exact += torch.outer(v, v) / tokens
        q = torch.kron(E.QG[layer.name], E.QA[layer.name])
        in_basis = torch.diagonal(q.t() @ exact @ q)
        assert (E.scale[layer.name].reshape(-1) - in_basis).abs().max() <= TOL * in_basis.abs().max()
        # Frobenius-optimal among matrices diagonal in that basis: never farther than K-FAC
        own = _dense_fisher(grads, layer.name, layer.bias_name, tokens)
        err_e = torch.linalg.norm(ff.kfac.dense(E, layer.name) - own)
        err_k = torch.linalg.norm(ff.kfac.dense(K, layer.name) - own)
        assert err_e <= err_k + 1e-12


def test_ekfac_with_one_position_uses_the_same_scaling() -> None:
    case = _mlp(seed=3, batch=7)
    model, (x, y), loss, params = case.model, case.batch, case.loss, case.params
    E = ff.kfac.ekfac(loss, params, (x, y))
    E2 = ff.kfac.ekfac(loss, params, (x.unsqueeze(1), y.unsqueeze(1)), ff.kfac.kfac(loss, params, (x, y)))
    # the token form of the same data (T = 1) goes through the per-sample einsum instead of (d̃²)ᵀ(ã²)
    loss_t = ff.losses.token_classification(model)
    E3 = ff.kfac.ekfac(loss_t, params, (x.unsqueeze(1).expand(7, 2, 4), torch.stack([y, torch.full_like(y, -100)], 1)))
    for name in E.scale:
        assert (E.scale[name] - E2.scale[name]).abs().max() <= TOL * E.scale[name].abs().max()
        assert E3.scale[name].shape == E.scale[name].shape


# --- kinds ----------------------------------------------------------------------------------------


def test_exact_kind_g_is_the_expectation_over_classes() -> None:
    case = _mlp(seed=4, batch=6)
    model, (x, y), params = case.model, case.batch, case.params
    K = ff.kfac.kfac(case.loss, params, (x, y), kind="exact")
    G = torch.zeros(3, 3, dtype=torch.float64)
    for b in range(6):
        logits = model(x[b : b + 1])[0]
        p = logits.softmax(-1).detach()
        for c in range(3):  # d = ∂(−log p_c)/∂z = p − e_c
            d = p - F.one_hot(torch.tensor(c), 3).double()
            G += p[c] * torch.outer(d, d)
    G /= 6
    assert (K.G["2.weight"] - G).abs().max() <= TOL * G.abs().max()
    assert K.kind == "exact"


def test_mc_kind_is_reproducible_and_converges_to_exact() -> None:
    case = _mlp(seed=5, batch=4)
    (x, y), loss, params = case.batch, case.loss, case.params
    a = ff.kfac.kfac(loss, params, (x, y), kind=ff.MC(samples=3, seed=7))
    b = ff.kfac.kfac(loss, params, (x, y), kind=ff.MC(samples=3, seed=7))
    assert all(torch.equal(a.G[k], b.G[k]) for k in a.G)
    many = ff.kfac.kfac(loss, params, (x, y), kind=ff.MC(samples=4000, seed=1))
    exact = ff.kfac.kfac(loss, params, (x, y), kind="exact")
    for k in exact.G:  # Monte Carlo error ~ 1/sqrt(4000) of the scale
        assert (many.G[k] - exact.G[k]).abs().max() <= 0.08 * exact.G[k].abs().max()
        assert torch.equal(many.A[k], exact.A[k])  # A does not depend on the targets


# --- operations -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def estimates() -> tuple[Case, dict[str, Tensor], ff.kfac.KFAC, ff.kfac.EKFAC]:
    case = _mlp(seed=6, positions=4)
    params = {k: v.detach() for k, v in case.params.items()}
    K = ff.kfac.kfac(case.loss, params, case.batch)
    return case, params, K, ff.kfac.ekfac(case.loss, params, case.batch, K)


def _flat(layer: ff.kfac.Layer, named: dict[str, Tensor]) -> Tensor:
    return torch.cat([named[layer.name].reshape(-1), named[layer.bias_name]])


@pytest.mark.parametrize("which", ["kfac", "ekfac"])
def test_products_inverses_and_diagonals_match_the_dense_matrix(estimates, which: str) -> None:
    _, params, K, E = estimates
    approx = K if which == "kfac" else E
    torch.manual_seed(8)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    Fv = ff.kfac.mvp(approx, v)
    damping = 1e-2
    inv = ff.kfac.inverse_mvp(approx, v, damping)
    diag = ff.kfac.diagonal(approx)
    for layer in approx.layers:
        M = ff.kfac.dense(approx, layer.name)
        vec = _flat(layer, v)
        assert (_flat(layer, Fv) - M @ vec).abs().max() <= TOL * (M @ vec).abs().max()
        solved = torch.linalg.solve(M + damping * torch.eye(M.shape[0], dtype=M.dtype), vec)
        assert (_flat(layer, inv) - solved).abs().max() <= 1e-9 * solved.abs().max()
        assert (_flat(layer, diag) - torch.diagonal(M)).abs().max() <= TOL * torch.diagonal(M).abs().max()
    assert set(Fv) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_group_diagonal_is_the_rule_reduction_and_matches_fisher_when_exact() -> None:
    case = _mlp(seed=9, batch=1)
    (x, y), loss, params, spec = case.batch, case.loss, case.params, case.spec
    K = ff.kfac.kfac(loss, params, (x, y))
    groups = ff.kfac.group_diagonal(K, params, spec)
    diag = ff.kfac.diagonal(K)
    for name, value in groups.items():
        assert torch.equal(value, spec[name].reduce(diag[name]))
    exact = ff.fisher(loss, params, (x, y), spec=spec)  # one example: K-FAC is exact, so is its diagonal
    for name in groups:
        assert (groups[name] - exact[name]).abs().max() <= TOL * exact[name].abs().max()


def test_addmm_layout_round_trips_through_the_operations() -> None:
    case = cases.case("conv1d_linear", seed=10)  # GPT-2's Conv1D: y = b + x W with W [in, out]
    model, (x, y), params = case.model, case.batch, case.params
    assert params["weight"].shape == (4, 3)
    K = ff.kfac.kfac(case.loss, params, (x, y))
    assert K.layers[0].op == "addmm"
    value = F.cross_entropy(model(x), y, reduction="sum")
    g = dict(zip(params, torch.autograd.grad(value, list(params.values()))))
    v = torch.cat([g["weight"].reshape(-1), g["bias"]])
    assert (ff.kfac.dense(K, "weight") - torch.outer(v, v)).abs().max() <= TOL * v.square().max()
    torch.manual_seed(11)
    u = {k: torch.randn_like(p) for k, p in params.items()}
    out = ff.kfac.mvp(K, u)
    assert out["weight"].shape == (4, 3)
    expected = torch.outer(v, v) @ torch.cat([u["weight"].reshape(-1), u["bias"]])
    assert (torch.cat([out["weight"].reshape(-1), out["bias"]]) - expected).abs().max() <= TOL * expected.abs().max()


# --- one-shot, merge, EMA, save --------------------------------------------------------------------


def test_batches_chunks_and_merge_give_the_same_factors() -> None:
    case = _mlp(seed=2, positions=4, batch=6)
    (x, y), loss, params = case.batch, case.loss, case.params
    whole = ff.kfac.kfac(loss, params, (x, y))
    split = ff.kfac.kfac(loss, params, [(x[:2], y[:2]), (x[2:], y[2:])], chunk_size=3)
    merged = ff.kfac.merge(ff.kfac.kfac(loss, params, (x[:4], y[:4])), ff.kfac.kfac(loss, params, (x[4:], y[4:])))
    for other in (split, merged):
        assert other.tokens == whole.tokens and other.samples == whole.samples
        for k in whole.A:
            assert (other.A[k] - whole.A[k]).abs().max() <= TOL * whole.A[k].abs().max()
            assert (other.G[k] - whole.G[k]).abs().max() <= TOL * whole.G[k].abs().max()
    with pytest.raises(ValueError, match="approx"):
        ff.kfac.merge(whole, ff.kfac.kfac(loss, params, (x, y), approx="reduce"))


def test_ema_state_is_pure_and_debiased() -> None:
    case = _mlp(seed=2, positions=4, batch=(5, 5))
    ((x, y), (x2, y2)), loss, params = case.batches, case.loss, case.params
    one_shot = ff.kfac.kfac(loss, params, (x, y))
    step = ff.kfac.make_kfac_step(loss, decay=0.9)
    state = step.init(params, (x, y))
    s1 = step(params, (x, y), state)
    s3 = step(params, (x, y), step(params, (x, y), s1))
    assert state.step == 0 and all(float(v.abs().max()) == 0 for v in state.A.values())  # untouched
    for s in (s1, s3):  # a constant batch: the debiased EMA is the batch's factors
        est = ff.kfac.estimate(s)
        for k in one_shot.A:
            assert (est.A[k] - one_shot.A[k]).abs().max() <= 1e-12 * one_shot.A[k].abs().max()
            assert (est.G[k] - one_shot.G[k]).abs().max() <= 1e-12 * one_shot.G[k].abs().max()
    two = step(params, (x2, y2), s1)
    other = ff.kfac.kfac(loss, params, (x2, y2))
    k = "2.weight"
    expected = (0.9 * 0.1 * one_shot.G[k] + 0.1 * other.G[k]) / bias_correction(0.9, 2)
    assert (ff.kfac.estimate(two).G[k] - expected).abs().max() <= 1e-12 * expected.abs().max()
    assert two.step == 2 and two.tokens == s1.tokens + other.tokens
    with pytest.raises(ValueError, match="no step"):
        ff.kfac.estimate(state)
    with pytest.raises(ValueError, match="decay"):
        ff.kfac.make_kfac_step(loss, decay=0.5)(params, (x, y), state)


@pytest.mark.parametrize("which", ["kfac", "ekfac", "state"])
def test_save_and_load_round_trip_bitwise(tmp_path, which: str) -> None:
    pytest.importorskip("safetensors")
    case = _mlp(seed=2, positions=4)
    (x, y), loss, params = case.batch, case.loss, case.params
    if which == "kfac":
        value = ff.kfac.kfac(loss, params, (x, y), approx="reduce")
    elif which == "ekfac":
        value = ff.kfac.ekfac(loss, params, (x, y))
    else:
        step = ff.kfac.make_kfac_step(loss, decay=0.8)
        value = step(params, (x, y), step.init(params, (x, y)))
    path = ff.kfac.save(tmp_path / "k.safetensors", value)
    back = ff.kfac.load(path)
    assert type(back) is type(value)
    for field, item in value._asdict().items():
        if isinstance(item, dict) and item and isinstance(next(iter(item.values())), Tensor):
            assert all(torch.equal(item[k], getattr(back, field)[k]) for k in item), field
        else:
            assert getattr(back, field) == item, field
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ff.StateFileError, match="checksum|corrupted"):
        ff.kfac.load(path)


# --- coverage and errors --------------------------------------------------------------------------


def test_tied_and_reused_weights_are_not_covered() -> None:
    case = cases.case("reused_weight", use="twice", batch=3, seed=12)  # out(tanh(lin(tanh(lin(x)))))
    K = ff.kfac.kfac(case.loss, case.params, case.batch)
    assert [layer.name for layer in K.layers] == ["out.weight"]


def test_layer_patterns_select_and_errors_name_the_fault() -> None:
    case = _mlp(batch=3)
    (x, y), loss, params = case.batch, case.loss, case.params
    K = ff.kfac.kfac(loss, params, (x, y), layers=["2.*"])
    assert [layer.name for layer in K.layers] == ["2.weight"]
    with pytest.raises(ValueError, match="'nope.*'"):
        ff.kfac.kfac(loss, params, (x, y), layers=["nope.*"])
    with pytest.raises(ValueError, match="approx"):
        ff.kfac.kfac(loss, params, (x, y), approx="mean")
    with pytest.raises(ValueError, match="damping"):
        ff.kfac.inverse_mvp(K, params, damping=-1.0)
    with pytest.raises(KeyError, match="'2.bias'"):
        ff.kfac.mvp(K, {"2.weight": params["2.weight"]})
    with pytest.raises(ValueError, match=r"'2.weight'.*\(3, 4\)"):
        ff.kfac.mvp(K, {"2.weight": torch.zeros(3, 4), "2.bias": torch.zeros(3)})
    with pytest.raises(KeyError, match="no K-FAC layer named '0.bias'"):
        ff.kfac.dense(K, "0.bias")
    with pytest.raises(ValueError, match="reads the batches twice"):
        ff.kfac.ekfac(loss, params, iter([(x, y)]))
    with pytest.raises(ValueError, match="kind='mc' draws labels at random"):
        ff.kfac.kfac(loss, params, (x, y), kind="mc")  # mc needs a seed or generator
    assert math.isclose(K.tokens, 3.0)


def test_padding_is_left_out_of_a_when_the_loss_knows_the_mask() -> None:
    """A right-padded batch with its mask has the factors of the unpadded sequences."""
    lengths = [4, 2, 3, 1]
    T = max(lengths)
    case = _mlp(seed=13, positions=T, batch=len(lengths), ignore_frac=0.0)  # every position labelled
    model, (x, y) = case.model, case.batch
    mask = (torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    x = x * mask.unsqueeze(-1) + 7.0 * (1 - mask.unsqueeze(-1))  # padded inputs: far from the data
    params = case.params
    masked = ff.losses.token_classification(model, inputs="x", targets="y", mask="mask")
    plain = ff.losses.token_classification(model, inputs="x", targets="y")
    unpadded = [{"x": x[b : b + 1, :n], "y": y[b : b + 1, :n]} for b, n in enumerate(lengths)]  # T differs per batch
    for approx in ("expand", "reduce"):
        padded = ff.kfac.kfac(masked, params, {"x": x, "y": y, "mask": mask}, approx=approx)
        reference = ff.kfac.kfac(plain, params, unpadded, approx=approx)
        assert padded.positions == reference.positions and padded.tokens == reference.tokens == sum(lengths)
        for k in padded.A:
            assert (padded.A[k] - reference.A[k]).abs().max() <= TOL * reference.A[k].abs().max()
            assert (padded.G[k] - reference.G[k]).abs().max() <= TOL * reference.G[k].abs().max()
    E = ff.kfac.ekfac(plain, params, unpadded)  # batches of different lengths in the scaling pass too
    assert all(torch.isfinite(s).all() for s in E.scale.values())


# --- convolutions (unfolded inputs, Grosse & Martens 2016) ----------------------------------------


@pytest.mark.parametrize("dims", [1, 2])
def test_convolution_factors_and_scaling_match_per_sample_gradients(dims: int) -> None:
    """``A``/``G`` from unfolded patches by their definition; EK-FAC scaling exact in its basis."""
    # Conv(2 → 3, k 3, padding 1, stride 2 in 2-D / dilation 2 in 1-D) → Tanh → Conv(3 → 4, k 2, no bias) → Linear
    case = cases.case("conv_patches", dims=dims, batch=5, seed=15)
    model, (x, y), loss = case.model, case.batch, case.loss
    assert x.shape == (5, 2, *((6, 6) if dims == 2 else (9,)))
    params = {k: v.detach() for k, v in case.params.items()}
    K = ff.kfac.kfac(loss, params, (x, y))
    assert [(layer.name, layer.op) for layer in K.layers] == [
        ("0.weight", f"conv{dims}d"),
        ("2.weight", f"conv{dims}d"),
        ("4.weight", "linear"),
    ]
    # reference: patches by explicit loops over output positions (no F.unfold), gradients by autograd
    conv0, conv2 = model[0], model[2]
    A0 = torch.zeros(2 * 9 + 1, 2 * 9 + 1, dtype=torch.float64) if dims == 2 else torch.zeros(7, 7, dtype=torch.float64)
    G0 = torch.zeros(3, 3, dtype=torch.float64)
    positions = 0
    grads = []
    for b in range(5):
        xb = x[b : b + 1]
        z0 = conv0(xb)
        out = model[4](model[3](conv2(torch.tanh(z0))))
        value = F.cross_entropy(out, y[b : b + 1], reduction="sum")
        (d0,) = torch.autograd.grad(value, [z0], retain_graph=True)
        grads.append(dict(zip(params, torch.autograd.grad(value, list(model.parameters())))))
        padded = F.pad(xb[0], (1, 1, 1, 1) if dims == 2 else (1, 1))
        for pos in torch.cartesian_prod(*[torch.arange(n) for n in z0.shape[2:]]).reshape(-1, dims):
            if dims == 2:
                i, j = 2 * pos[0], 2 * pos[1]
                patch = padded[:, i : i + 3, j : j + 3].reshape(-1)
                dv = d0[0, :, pos[0], pos[1]]
            else:
                i = pos[0]
                patch = padded[:, i : i + 5 : 2].reshape(-1)  # kernel 3, dilation 2
                dv = d0[0, :, pos[0]]
            patch = torch.cat([patch, torch.ones(1, dtype=torch.float64)])
            A0 += torch.outer(patch, patch)
            G0 += torch.outer(dv, dv)
            positions += 1
    assert K.positions["0.weight"] == positions
    assert (K.A["0.weight"] - A0 / positions).abs().max() <= TOL * A0.abs().max() / positions
    assert (K.G["0.weight"] - G0 / 5).abs().max() <= TOL * G0.abs().max() / 5
    E = ff.kfac.ekfac(loss, params, (x, y), K)
    for layer in E.layers:
        exact = _dense_fisher(grads, layer.name, layer.bias_name, 5.0)
        # the basis in the parameters' own order (weight row-major, then bias), like dense()
        q = torch.kron(E.QG[layer.name], E.QA[layer.name])[own_order(layer)]
        in_basis = torch.diagonal(q.t() @ exact @ q)
        assert (E.scale[layer.name].reshape(-1) - in_basis).abs().max() <= TOL * in_basis.abs().max(), layer.name
        err_e = torch.linalg.norm(ff.kfac.dense(E, layer.name) - exact)
        err_k = torch.linalg.norm(ff.kfac.dense(K, layer.name) - exact)
        assert err_e <= err_k + 1e-12, layer.name
    # products in the conv weight's own shape
    v = {k: torch.randn_like(p) for k, p in params.items()}
    out = ff.kfac.mvp(E, v)
    assert out["0.weight"].shape == params["0.weight"].shape
    M = ff.kfac.dense(E, "0.weight")
    vec = torch.cat([v["0.weight"].reshape(-1), v["0.bias"]])
    assert (torch.cat([out["0.weight"].reshape(-1), out["0.bias"]]) - M @ vec).abs().max() <= TOL * (
        M @ vec
    ).abs().max()


def test_one_image_one_position_conv_is_exact() -> None:
    # a 3×3 convolution (padding 1) of a 1×1 image: one output position; one image
    case = cases.case("cnn2d", groups=1, in_per_group=2, out_per_group=3, length=1, batch=1, seed=16)
    model, (x, y), params = case.model, case.batch, case.params
    K = ff.kfac.kfac(case.loss, params, (x, y))
    assert [layer.name for layer in K.layers][0] == "0.weight" and K.positions["0.weight"] == 1
    value = F.cross_entropy(model(x), y, reduction="sum")
    g = dict(zip(params, torch.autograd.grad(value, list(params.values()))))
    exact = _dense_fisher([g], "0.weight", "0.bias", 1.0)
    assert (ff.kfac.dense(K, "0.weight") - exact).abs().max() <= TOL * exact.abs().max()


def test_grouped_convolutions_are_not_covered() -> None:
    # grouped Conv2d → GroupNorm → Tanh → mean → Linear: only the Linear is covered
    case = cases.case("cnn2d", groups=2, in_per_group=1, out_per_group=2, length=4, batch=2, seed=17)
    K = ff.kfac.kfac(case.loss, {k: v.detach() for k, v in case.params.items()}, case.batch)
    assert isinstance(case.model[0], nn.Conv2d) and case.model[0].groups == 2
    assert [layer.name for layer in K.layers] == ["4.weight"]


def test_eigendecompose_is_the_same_operator_and_bases_can_be_reused(estimates) -> None:
    case, params, K, E = estimates
    D = ff.kfac.eigendecompose(K)
    torch.manual_seed(18)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    for name in K.A:
        assert (ff.kfac.dense(D, name) - ff.kfac.dense(K, name)).abs().max() <= 1e-12 * ff.kfac.dense(
            K, name
        ).abs().max()
    a, b = ff.kfac.inverse_mvp(K, v, 1e-2), ff.kfac.inverse_mvp(D, v, 1e-2)
    assert all((a[k] - b[k]).abs().max() <= 1e-10 * a[k].abs().max() for k in a)
    again = ff.kfac.ekfac(case.loss, params, case.batch, E)  # reuse E's bases: the same scaling on the same data
    for name in E.scale:
        assert torch.equal(again.QA[name], E.QA[name])
        assert (again.scale[name] - E.scale[name]).abs().max() <= 1e-12 * E.scale[name].abs().max()


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_projections_are_covered_and_ekfac_is_exact_in_its_basis(batch_first: bool) -> None:
    """``nn.TransformerEncoderLayer``: the fused in-projection and out-projection inside
    ``F.multi_head_attention_forward`` are covered; EK-FAC's scaling is the exact diagonal."""
    case = cases.case("attention_classifier", block="encoder", seq_len=3, batch=4, batch_first=batch_first, seed=19)
    model, (x, y), loss = case.model, case.batch, case.loss
    params = {k: v.detach() for k, v in case.params.items()}
    K = ff.kfac.kfac(loss, params, (x, y))
    prefix = "layers.0."
    names = [layer.name for layer in K.layers]
    assert prefix + "self_attn.in_proj_weight" in names and prefix + "self_attn.out_proj.weight" in names
    E = ff.kfac.ekfac(loss, params, (x, y), K)
    grads = []
    for b in range(4):
        value = F.cross_entropy(model(x[b : b + 1]), y[b : b + 1], reduction="sum")
        grads.append(dict(zip(params, torch.autograd.grad(value, list(model.parameters())))))
    for entry in E.layers:
        exact = _dense_fisher(grads, entry.name, entry.bias_name, 4.0)
        q = torch.kron(E.QG[entry.name], E.QA[entry.name])[own_order(entry)]
        in_basis = torch.diagonal(q.t() @ exact @ q)
        assert (E.scale[entry.name].reshape(-1) - in_basis).abs().max() <= TOL * in_basis.abs().max(), entry.name


def test_digits_example_runs_and_both_steps_descend(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "kfac_digits.py"
    spec = importlib.util.spec_from_file_location("kfac_digits", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(steps=100)
    assert "Spearman" in capsys.readouterr().out
    for k, e in out["spearman"].values():
        assert -1.0 <= k <= 1.0 and -1.0 <= e <= 1.0
    # a small step along a descent direction lowers the loss (the trust region keeps it small)
    assert out["natural (EK-FAC)"] < out["before"] and out["plain gradient"] < out["before"]


def test_non_finite_batches_raise_naming_the_layers_and_leave_the_state_alone() -> None:
    case = _mlp(seed=2, positions=4)
    (x, y), loss = case.batch, case.loss
    params = {k: v.detach() for k, v in case.params.items()}
    step = ff.kfac.make_kfac_step(loss, decay=0.9)
    state = step(params, (x, y), step.init(params, (x, y)))
    before = {k: v.clone() for k, v in state.A.items()}
    bad = x.clone()
    bad[1, 2, 0] = float("nan")  # one input value of one sample: every layer downstream sees it
    with pytest.raises(ff.NonFiniteError, match=r"'A\[0.weight\]' at samples \[1\].*'A\[2.weight\]'") as err:
        step(params, (bad, y), state)
    assert err.value.samples == (1,) and "G[0.weight]" in err.value.parameters
    with pytest.raises(ff.NonFiniteError, match="batch 1 has non-finite values.*nothing was updated"):
        ff.kfac.kfac(loss, params, [(x, y), (bad, y)])
    with pytest.raises(ff.NonFiniteError, match="scale\\[0.weight\\]"):  # EK-FAC's pass is screened too
        ff.kfac.ekfac(loss, params, (bad, y), ff.kfac.kfac(loss, params, (x, y)))
    skipping = ff.kfac.make_kfac_step(loss, decay=0.9, nonfinite="skip")
    assert skipping(params, (bad, y), state) is state
    assert state.step == 1 and all(torch.equal(state.A[k], before[k]) for k in before)


# --- steady state: amortised refreshes, remembered shapes, the symmetric product ---------------------


def _same_state(a: ff.kfac.KFACState, b: ff.kfac.KFACState, *, but: tuple[str, ...] = ()) -> None:
    """Every field equal, tensors bitwise, except the fields in ``but``."""
    for field, item in a._asdict().items():
        if field in but:
            continue
        other = getattr(b, field)
        if isinstance(item, dict) and item and isinstance(next(iter(item.values())), Tensor):
            assert item.keys() == other.keys() and all(torch.equal(item[k], other[k]) for k in item), field
        else:
            assert item == other, field


@pytest.mark.parametrize("kind", ["empirical", ff.MC(samples=2, seed=3)], ids=["empirical", "mc"])
def test_update_every_refreshes_on_every_kth_call_only(kind) -> None:
    case = _mlp(seed=4, positions=4, batch=(5,) * 7)
    loss, params, batches = case.loss, case.params, case.batches
    amortised = ff.kfac.make_kfac_step(loss, decay=0.8, kind=kind, update_every=3)
    every = ff.kfac.make_kfac_step(loss, decay=0.8, kind=kind)
    state = amortised.init(params, batches[0])
    reference = every.init(params, batches[0])
    for call, batch in enumerate(batches):
        before = state
        # a call between refreshes reads neither params nor batch: None for both proves it
        state = amortised(params, batch, state) if call % 3 == 0 else amortised(None, None, state)
        if call % 3 == 0:
            reference = every(params, batch, reference)
        else:
            _same_state(state, before, but=("calls",))
            assert all(state.A[k] is before.A[k] for k in state.A)  # returned as they were, not copied
        assert state.calls == call + 1 and reference.calls == call // 3 + 1
        _same_state(state, reference, but=("calls",))
    assert state.step == 3 and state.samples == 15
    est, ref = ff.kfac.estimate(state), ff.kfac.estimate(reference)  # bias correction by refreshes: 1 − β³
    assert all(torch.equal(est.A[k], ref.A[k]) and torch.equal(est.G[k], ref.G[k]) for k in est.A)


def test_update_every_one_is_the_ema_of_one_shot_factors() -> None:
    case = _mlp(seed=5, positions=4, batch=(5, 4, 6))
    loss, params, batches = case.loss, case.params, case.batches
    step = ff.kfac.make_kfac_step(loss, decay=0.7, update_every=1)
    default = ff.kfac.make_kfac_step(loss, decay=0.7)
    state = step.init(params, batches[0])
    plain = default.init(params, batches[0])
    A = {k: torch.zeros_like(v) for k, v in state.A.items()}
    G = {k: torch.zeros_like(v) for k, v in state.G.items()}
    for t, batch in enumerate(batches, 1):
        state, plain = step(params, batch, state), default(params, batch, plain)
        _same_state(state, plain)  # update_every=1 is the step as it was
        one = ff.kfac.kfac(loss, params, batch)
        for k in A:  # m_t = β m_{t−1} + (1 − β) X_t, X_t the batch's one-shot factors
            A[k], G[k] = 0.7 * A[k] + 0.3 * one.A[k], 0.7 * G[k] + 0.3 * one.G[k]
            assert (state.A[k] - A[k]).abs().max() <= 1e-15 * A[k].abs().max()
            assert (state.G[k] - G[k]).abs().max() <= 1e-15 * G[k].abs().max()
        assert state.step == state.calls == t
    assert state.samples == 15 and state.tokens == sum(float((y != -100).sum()) for _, y in batches)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3", None])
def test_update_every_is_refused_before_any_work(bad) -> None:
    case = _mlp(seed=2)
    (x, y), loss, params = case.batch, case.loss, case.params
    good = ff.kfac.make_kfac_step(loss, decay=0.9)
    state = good(params, (x, y), good.init(params, (x, y)))
    snapshot = {k: v.clone() for k, v in state.A.items()}
    calls = case.model.calls
    with pytest.raises(ValueError, match="update_every"):
        ff.kfac.make_kfac_step(loss, decay=0.9, update_every=bad)
    with pytest.raises(ValueError, match="update_every"):
        ff.kfac.KFACStep(loss, 0.9, "expand", None, None, ff.Empirical(), "raise", bad)
    assert case.model.calls == calls  # the model was not run
    assert state.calls == state.step == 1 and all(torch.equal(state.A[k], snapshot[k]) for k in snapshot)


def test_step_remembers_the_layers_shapes_and_rediscovers_when_they_may_change() -> None:
    case = _mlp(seed=6, positions=4, batch=(5, 5))
    loss, params, model = case.loss, case.params, case.model
    (x, y), (x2, y2) = case.batches
    step = ff.kfac.make_kfac_step(loss, decay=0.5)
    state = step.init(params, (x, y))  # discovery: one forward
    calls = model.calls
    fresh = ff.kfac.make_kfac_step(loss, decay=0.5)
    for batch in ((x, y), (x2, y2)):
        remembered, rediscovered = step(params, batch, state), fresh(params, batch, state)
        _same_state(remembered, rediscovered)
    assert model.calls - calls == 2 + 3  # the step: one forward per call; a fresh step: discovery too
    calls = model.calls
    longer = (torch.cat([x, x], 1), torch.cat([y, y], 1))  # a new sample shape: discovered once
    for _ in range(2):
        step(params, longer, state)
    assert model.calls - calls == 3
    calls = model.calls
    model.train()  # training flags may change the calls: discovered again
    try:
        step(params, (x, y), state)
    finally:
        model.eval()
    assert model.calls - calls == 2


def test_ekfac_reuses_bases_and_discovers_the_layers_once() -> None:
    case = _mlp(seed=7, positions=4)
    (x, y), loss, params, model = case.batch, case.loss, case.params, case.model
    calls = model.calls
    first = ff.kfac.ekfac(loss, params, (x, y))  # one discovery forward, then the factors' and the scaling's
    assert model.calls - calls == 3
    calls = model.calls
    again = ff.kfac.ekfac(loss, params, (x, y), first)  # bases given, shapes kept for this loss: one pass
    assert model.calls - calls == 1
    calls = model.calls
    ff.kfac.kfac(loss, params, (x, y))  # a one-shot call with the same loss: no discovery either
    assert model.calls - calls == 1
    factors = ff.kfac.kfac(loss, params, (x, y))
    for k in first.scale:
        assert again.QA[k] is first.QA[k] and again.QG[k] is first.QG[k]  # reused, not copied
        assert torch.equal(again.scale[k], first.scale[k])
        assert torch.equal(first.QA[k], ff.kfac.eigendecompose(factors).QA[k])


@pytest.mark.parametrize("width", [5, 191, 192, 385, 450])
def test_gram_is_the_symmetric_product(monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    from fisherfunc.kfac import _factors

    monkeypatch.setattr(_factors, "GRAM_ROWS", 1)  # split whatever the thread count
    x = torch.randn(40, width, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
    reference = torch.einsum("mi,mj->ij", x, x)
    out = _factors.gram(x)
    assert (out - reference).abs().max() <= 1e-13 * reference.abs().max()
    h = width // 2
    if width >= _factors.GRAM_SPLIT:  # split: the lower-left block is the upper-right's copy
        assert torch.equal(out[h:, :h], out[:h, h:].t())
    assert torch.equal(_factors.gram(x[:, :0]), torch.zeros(0, 0, dtype=torch.float64))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_input_factor_of_a_padded_batch_with_an_empty_sample_is_its_definition(approx: str) -> None:
    """``A`` of the first layer (its input is the data) from the definition, a sample with no real position included."""
    lengths = [3, 0, 1]
    case = _mlp(seed=14, positions=3, batch=len(lengths), ignore_frac=0.0)
    (x, y), params = case.batch, case.params
    mask = (torch.arange(3).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    y = y.masked_fill(mask == 0, -100)
    loss = ff.losses.token_classification(case.model, inputs="x", targets="y", mask="mask")
    A = ff.kfac.kfac(loss, params, {"x": x, "y": y, "mask": mask}, approx=approx).A["0.weight"]
    aug, m = torch.cat([x, torch.ones_like(x[..., :1])], -1), mask.to(x.dtype).unsqueeze(-1)  # ã = [x, 1]
    if approx == "reduce":  # ā_b = Σ_t m_t ã_t / max(Σ_t m_t, 1), averaged over the B samples
        pooled = (aug * m).sum(1) / m.sum(1).clamp_min(1.0)
        reference = sum(torch.outer(r, r) for r in pooled) / len(lengths)
    else:  # Σ over the real positions / their number
        reference = sum(torch.outer(r, r) for r in aug[mask.bool()]) / sum(lengths)
    assert (A - reference).abs().max() <= TOL * reference.abs().max()
    assert A[-1, -1] == (2 / 3 if approx == "reduce" else 1.0)  # the bias entry counts samples with positions


@pytest.mark.parametrize("positions", [2, 3, 64, 70])
def test_squared_gradients_in_blocks_are_the_sum_of_squared_per_sample_gradients(positions: int) -> None:
    from fisherfunc.kfac._eigen import squared_gradients

    g = torch.Generator().manual_seed(positions)
    pd = torch.randn(5, positions, 3, dtype=torch.float64, generator=g)
    pa = torch.randn(5, positions, 4, dtype=torch.float64, generator=g)
    reference = sum(torch.square(pd[b].t() @ pa[b]) for b in range(5))  # Σ_b (Σ_t d̃_bt ã_btᵀ)²
    out = squared_gradients(pd, pa)
    assert (out - reference).abs().max() <= TOL * reference.abs().max()


class _Reuses(nn.Module):
    """``a`` (4 → 5), ``c`` (5 → 5), ``b`` (5 → 3); with ``twice`` the forward calls ``c`` twice.

    ``change`` names another way the forward comes to use ``c`` besides its call: ``"matmul"`` its
    weight, ``"bias"`` its bias.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.b = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.twice = False
        self.change: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c(torch.tanh(self.a(x))))
        if self.twice:
            h = torch.tanh(self.c(h))
        if self.change == "matmul":
            h = h + torch.tanh(h @ self.c.weight.T)
        elif self.change == "bias":
            h = h * self.c.bias
        return self.b(h)


def _small_problem(cls: type[nn.Module], seed: int) -> tuple[nn.Module, dict[str, Tensor], Any, Any]:
    """A float64 eval-mode ``cls()``, its params, a batch of 6 and its classification loss (seeded)."""
    torch.manual_seed(seed)
    model = cls().double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    return model, params, batch, ff.losses.classification(model)


def _keeps_nothing(loss: Any) -> Any:
    """``loss`` as a plain callable, which finds nothing kept by earlier calls (no memo is shared with it)."""

    def plain(params: Any, sample: Any) -> Any:
        return loss(params, sample)

    return plain


class _GradDependent(nn.Module):
    """Uses ``a``'s weight a second time only when gradients are enabled (discovery runs without)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if torch.is_grad_enabled():
            h = h + 0.5 * x @ self.a.weight.T
        return self.b(torch.tanh(h))


@pytest.mark.parametrize("call", ["kfac", "kfac over an iterator", "ekfac"])
def test_layers_stale_right_after_discovery_are_refused_by_name(call: str) -> None:
    # the vectorised forward uses a.weight outside its layer's call, which discovery never saw:
    # K-FAC has no direct path to fall back on, so it refuses, naming the weight and the way out
    model, params, batch, loss = _small_problem(_GradDependent, seed=17)
    run = {
        "kfac": lambda layers: ff.kfac.kfac(loss, params, batch, layers=layers),
        "kfac over an iterator": lambda layers: ff.kfac.kfac(loss, params, iter([batch]), layers=layers),
        "ekfac": lambda layers: ff.kfac.ekfac(loss, params, batch, layers=layers),
    }[call]
    with pytest.raises(ValueError, match="cannot cover 'a.weight'.*layers="):
        run(None)
    assert [x.name for x in run(["b.*"]).layers] == ["b.weight"]  # left out: the rest is covered


@pytest.mark.parametrize("change", ["matmul", "bias"])
def test_kept_layers_used_another_way_are_discovered_again(change: str) -> None:
    # a covered layer's weight (or folded bias) comes to be used outside its call: its factors from
    # the kept layers would miss that use, so the call discovers again and agrees with a loss that
    # keeps nothing (a plain callable: a loss built anew would share the model's memo)
    model, params, batch, loss = _small_problem(_Reuses, seed=16)
    step = ff.kfac.make_kfac_step(loss, decay=0.5)
    state = step(params, batch, step.init(params, batch))
    E = ff.kfac.ekfac(loss, params, batch)
    before = ff.kfac.kfac(loss, params, batch)
    assert {x.name: x.bias_name for x in before.layers}["c.weight"] == "c.bias"
    model.change = change
    with pytest.raises(ValueError, match="c.weight.*not used the same way"):  # the state's layers: refused
        step(params, batch, state)
    with pytest.raises(ValueError, match="c.weight.*not used the same way"):  # the bases' layers: refused
        ff.kfac.ekfac(loss, params, batch, E)
    one_shot = ff.kfac.kfac(loss, params, batch)
    fresh = ff.kfac.kfac(_keeps_nothing(loss), params, batch)
    assert [x.to_json() for x in one_shot.layers] == [x.to_json() for x in fresh.layers]
    covered = {x.name: x.bias_name for x in fresh.layers}
    assert covered == ({"a.weight": "a.bias", "b.weight": "b.bias"} if change == "matmul" else
                       {"a.weight": "a.bias", "b.weight": "b.bias", "c.weight": None})  # fmt: skip
    assert all(torch.equal(one_shot.A[k], fresh.A[k]) and torch.equal(one_shot.G[k], fresh.G[k]) for k in fresh.A)


def test_kept_layers_that_went_stale_are_discovered_again_or_refused() -> None:
    model, params, batch, loss = _small_problem(_Reuses, seed=15)
    step = ff.kfac.make_kfac_step(loss, decay=0.5)
    state = step(params, batch, step.init(params, batch))
    E = ff.kfac.ekfac(loss, params, batch)
    assert {x.name for x in ff.kfac.kfac(loss, params, batch).layers} == {"a.weight", "b.weight", "c.weight"}
    model.twice = True  # c is now used twice: one probe would give a wrong G, so it may not be covered
    one_shot = ff.kfac.kfac(loss, params, batch)  # kept layers went stale: this call discovered again
    fresh = ff.kfac.kfac(_keeps_nothing(loss), params, batch)  # nothing kept
    assert [x.name for x in one_shot.layers] == [x.name for x in fresh.layers]
    assert {x.name for x in fresh.layers} == {"a.weight", "b.weight"}
    assert all(torch.equal(one_shot.A[k], fresh.A[k]) and torch.equal(one_shot.G[k], fresh.G[k]) for k in fresh.A)
    with pytest.raises(ValueError, match="c.weight.*not used the same way"):  # the state's layers: refused
        step(params, batch, state)
    with pytest.raises(ValueError, match="c.weight.*not used the same way"):  # the bases' layers: refused
        ff.kfac.ekfac(loss, params, batch, E)
