"""Fisher-guided perturbations (fisherfunc.perturb, on the group numbering of the spec and rule membership).

Sampling law of the Gumbel-top-k selection (k = 1 and k = 2, with computed tolerances), top-k in
the τ → 0 limit, energies exact, bitwise reproducibility, inputs untouched, and two ground truths:
a linear regression at its optimum (predicted = actual loss increase) and the KL of a classifier
under a single-coordinate perturbation (→ ½ δᵀ diag(F) δ).
"""

from __future__ import annotations

import itertools
import math

import optree
import pytest
import torch
from torch import nn

import fisherfunc as ff
from fisherfunc.testing import cases

# --- sampling law -----------------------------------------------------------------------------------


def _chi2_quantile(df: int, z: float) -> float:
    """Wilson–Hilferty approximation of the chi-square quantile at standard-normal quantile ``z``."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _check_frequencies(counts: torch.Tensor, probs: torch.Tensor, n: int) -> float:
    """Per-cell binomial bound (5σ) and a chi-square bound; returns the chi-square statistic."""
    expected = n * probs
    sigma = torch.sqrt(n * probs * (1 - probs))
    assert bool(((counts - expected).abs() <= 5 * sigma + 1).all()), (counts, expected)
    return float(((counts - expected) ** 2 / expected).sum())


F_LAW = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0, 0.0], dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 0.5, math.inf])
def test_k1_inclusion_is_proportional_to_weights(temperature: float) -> None:
    n = 40_000
    eps0 = 1e-3
    log_w = torch.zeros(6, dtype=torch.float64) if math.isinf(temperature) else torch.log(F_LAW + eps0) / temperature
    probs = torch.softmax(log_w, 0)
    g = torch.Generator().manual_seed(123)
    chosen = ff.perturb.select(F_LAW.expand(n, 6), 1, temperature=temperature, eps0=eps0, generator=g)
    counts = torch.bincount(chosen[:, 0], minlength=6).to(torch.float64)
    chi2 = _check_frequencies(counts, probs, n)
    assert chi2 < _chi2_quantile(5, 4.0), chi2  # z = 4: a false alarm has probability ~3e-5
    # The test has power: the same counts are far from a wrong law.
    wrong = torch.full((6,), 1 / 6, dtype=torch.float64) if not math.isinf(temperature) else torch.softmax(F_LAW, 0)
    assert float(((counts - n * wrong) ** 2 / (n * wrong)).sum()) > 10 * _chi2_quantile(5, 4.0)


def test_k2_inclusion_matches_sampling_without_replacement() -> None:
    # Successive sampling: Pr(i then j) = w_i / W · w_j / (W − w_i); inclusion of g sums pairs containing g.
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    total = float(w.sum())
    inclusion = torch.zeros(4, dtype=torch.float64)
    for i, j in itertools.permutations(range(4), 2):
        p = w[i] / total * w[j] / (total - w[i])
        inclusion[i] += p
        inclusion[j] += p
    n = 40_000
    g = torch.Generator().manual_seed(7)
    chosen = ff.perturb.select(w.expand(n, 4), 2, temperature=1.0, eps0=0.0, generator=g)
    assert bool((chosen[:, 0] != chosen[:, 1]).all())  # without replacement
    counts = torch.bincount(chosen.reshape(-1), minlength=4).to(torch.float64)
    _check_frequencies(counts, inclusion, n)  # Bernoulli per cell: inclusion probability in each draw


def test_temperature_to_zero_is_top_k() -> None:
    f = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    top = torch.topk(f, 7).indices
    assert torch.equal(ff.perturb.select(f, 7, temperature=0), top)
    for seed in range(5):
        picked = ff.perturb.select(f, 7, temperature=1e-6, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(picked, top)
    low = ff.perturb.select(f, 7, temperature=0, target="low")
    assert torch.equal(low, torch.topk(f, 7, largest=False).indices)


def test_select_respects_eligibility_and_refuses_bad_input() -> None:
    f = torch.arange(10, dtype=torch.float64)
    eligible = torch.zeros(10, dtype=torch.bool)
    eligible[:4] = True
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert set(ff.perturb.select(f, 3, eligible=eligible, generator=g).tolist()) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="k must be"):
        ff.perturb.select(f, 5, eligible=eligible, generator=g)
    with pytest.raises(ValueError, match="Generator"):
        ff.perturb.select(f, 2)
    with pytest.raises(ValueError, match="target"):
        ff.perturb.select(f, 2, temperature=0, target="middle")  # type: ignore[arg-type]


# --- a model with every rule --------------------------------------------------------------------------


# A sequence classifier: Embedding(9, 8) → Linear(8, 8) (read as 4 heads) → Tanh → LayerNorm → Linear(8, 3), mean.
MIXED = {"vocab": 9, "dim": 8, "width": 8, "heads": 0, "norm": True, "classes": 3, "seq_len": 5, "batch": 12}

SPEC = {
    "emb.weight": ff.Buckets(3),
    "lin.weight": ff.Heads(4),
    "lin.bias": ff.Elementwise(),
    "norm.weight": ff.Channel(0),
    "norm.bias": ff.Whole(),
    "head.weight": ff.Channel(0),
    "head.bias": ff.Skip(),
}


def _mixed(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], object]:
    case = cases.case("sequence_classifier", **MIXED, dtype=dtype)
    params = {k: v.detach() for k, v in case.params.items()}
    fisher = ff.fisher(case.loss, params, case.batch, spec=SPEC, kind="exact")
    return params, fisher


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("power", [None, 1.0])
def test_energies_exact(dtype: torch.dtype, rtol: float, power: float | None) -> None:
    params, fisher = _mixed(dtype)
    energy = 0.37
    plan = ff.perturb.plan(
        fisher, SPEC, params, concentration=0.3, energy=energy, power=power, generator=torch.Generator().manual_seed(0)
    )
    assert plan.groups.numel() == math.ceil(0.3 * plan.index.num_groups)
    torch.testing.assert_close(plan.shares.sum(), torch.tensor(energy, dtype=torch.float64), rtol=1e-14, atol=0)
    if power is not None:
        f = plan.density[plan.groups]
        torch.testing.assert_close(plan.shares / plan.shares.sum(), f / f.sum(), rtol=1e-4, atol=0)
    new, record = ff.perturb.perturb(params, plan, generator=torch.Generator().manual_seed(1))
    spec = plan.index.spec
    exact = ff.perturb.delta(params, record)
    expected = torch.zeros(plan.index.num_groups, dtype=torch.float64)
    expected[plan.groups] = plan.shares

    def group_energies(tree: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat(
            [spec.rules[i].reduce(tree[spec.names[i]].to(torch.float64).square()).reshape(-1) for i in spec.active]
        )

    # δ itself: exact to the params' float precision (zero outside the chosen groups)
    torch.testing.assert_close(group_energies(exact), expected, rtol=rtol, atol=0)
    # new − old also carries the rounding of θ + δ to the params' dtype (~|θ|·2⁻²⁴ for float32)
    difference = {k: new[k].to(torch.float64) - params[k].to(torch.float64) for k in params}
    tol = rtol if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(group_energies(difference), expected, rtol=tol, atol=tol * energy / expected.numel())
    assert torch.equal(new["head.bias"], params["head.bias"])  # skipped: untouched
    assert not exact["head.bias"].any()


def test_same_seed_same_perturbation_and_inputs_unchanged() -> None:
    params, fisher = _mixed(torch.float32)
    before = {k: v.clone() for k, v in params.items()}
    fisher_before = optree.tree_map(lambda t: t.clone(), fisher)

    def run(seed: int) -> tuple[dict[str, torch.Tensor], ff.perturb.Record]:
        plan = ff.perturb.plan(
            fisher, SPEC, params, concentration=0.5, energy=1.0, generator=torch.Generator().manual_seed(seed)
        )
        return ff.perturb.perturb(params, plan, generator=torch.Generator().manual_seed(seed + 100))

    a, record = run(3)
    b, _ = run(3)
    c, _ = run(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    replayed = ff.perturb.replay(params, record)
    assert all(torch.equal(a[k], replayed[k]) for k in a)
    assert record.seed == 103
    assert all(torch.equal(params[k], before[k]) for k in params)
    assert all(torch.equal(x, y) for x, y in zip(optree.tree_leaves(fisher), optree.tree_leaves(fisher_before)))


def test_where_selects_heads_only() -> None:
    params, fisher = _mixed(torch.float64)
    plan = ff.perturb.plan(
        fisher, SPEC, params, concentration=0.5, energy=1.0, where=ff.Heads, generator=torch.Generator().manual_seed(0)
    )
    assert plan.groups.numel() == 2  # ⌈0.5 · 4 heads⌉
    spec = plan.index.spec
    leaves = plan.index.leaf_of(plan.groups)
    assert all(spec.names[spec.active[j]] == "lin.weight" for j in leaves.tolist())
    by_name = ff.perturb.plan(fisher, SPEC, params, concentration=1.0, energy=1.0, where="norm.*", temperature=0)
    assert by_name.groups.numel() == 9  # 8 channels of norm.weight + norm.bias as a whole
    index = plan.index
    assert torch.equal(index.eligible(["norm.*"]), index.eligible(lambda name, rule: name.startswith("norm.")))
    assert int(index.eligible((ff.Buckets, ff.Whole)).sum()) == 3 + 1
    with pytest.raises(ff.SpecError, match="selects no group"):
        index.eligible("decoder.*")


def test_risk() -> None:
    params, fisher = _mixed(torch.float64)
    plan = ff.perturb.plan(fisher, SPEC, params, concentration=0.2, energy=2.0, temperature=0)
    r = ff.perturb.risk(plan)
    assert r.threshold == pytest.approx(float(torch.quantile(plan.density, 0.9)))
    # Top 20% by density with equal shares: every group above the 0.9 quantile is chosen, 1/k of E each.
    stressed = int((plan.density > r.threshold).sum())
    assert 0 < stressed < plan.groups.numel()
    assert r.stressed_fraction == pytest.approx(stressed / plan.groups.numel())
    assert int(r.stressed.sum()) == stressed
    low = ff.perturb.plan(fisher, SPEC, params, concentration=0.2, energy=2.0, temperature=0, target="low")
    assert ff.perturb.risk(low).stressed_fraction == 0.0
    assert ff.perturb.risk(plan, threshold=-1.0).stressed_fraction == 1.0
    torch.testing.assert_close(r.contributions, 0.5 * plan.shares * plan.density[plan.groups])
    assert r.expected_increase == pytest.approx(ff.perturb.expected_increase(plan))


# --- ground truth ---------------------------------------------------------------------------------------


def test_linear_regression_at_optimum_predicted_equals_actual() -> None:
    # L̄(W) = (1/B) Σ_b ‖W x_b − y_b‖² / (2σ²): its Hessian is diagonal in W_ij with entries
    # (1/B) Σ_b x_bj² / σ² when the columns of X are orthogonal, and the gradient is zero at the
    # least-squares optimum, so L̄(W + δ) − L̄(W) = ½ Σ H_ii δ_i² exactly. The exact (Gaussian) Fisher
    # is Jᵀ J / σ² per sample = the same Hessian (f is linear in W); the empirical Fisher is
    # (1/B) Σ_b r_bi² x_bj² / σ⁴, which depends on the residuals and is not the Hessian.
    torch.manual_seed(0)
    batch, d_in, d_out, sigma2 = 32, 5, 3, 0.5
    q, _ = torch.linalg.qr(torch.randn(batch, batch, dtype=torch.float64))
    x = q[:, :d_in] * torch.tensor([3.0, 1.0, 0.3, 2.0, 0.1], dtype=torch.float64)  # orthogonal columns
    y = x @ torch.randn(d_in, d_out, dtype=torch.float64) + 0.3 * torch.randn(batch, d_out, dtype=torch.float64)
    model = nn.Linear(d_in, d_out, bias=False).to(torch.float64)
    w_opt = torch.linalg.lstsq(x, y).solution.T
    params = {"weight": w_opt}
    loss = ff.losses.regression(model, variance=sigma2)

    def mean_loss(p: dict[str, torch.Tensor]) -> float:
        return float((x @ p["weight"].T - y).square().sum() / (2 * sigma2) / batch)

    spec = ff.Channel(1)  # input columns: the Fisher is constant within each group
    groups = ff.fisher(loss, params, (x, y), spec=spec, kind="exact")
    diag = ff.fisher(loss, params, (x, y), spec=ff.Elementwise(), kind="exact")
    torch.testing.assert_close(diag["weight"][0], (x.square().sum(0) / sigma2 / batch), rtol=1e-12, atol=0)
    for seed in range(4):
        plan = ff.perturb.plan(
            groups, spec, params, concentration=0.4, energy=0.05, generator=torch.Generator().manual_seed(seed)
        )
        new, _ = ff.perturb.perturb(params, plan, generator=torch.Generator().manual_seed(seed))
        actual = mean_loss(new) - mean_loss(params)
        delta = {"weight": new["weight"] - params["weight"]}
        assert ff.perturb.predicted_increase(diag, delta) == pytest.approx(actual, rel=1e-9)
        assert ff.perturb.expected_increase(plan) == pytest.approx(actual, rel=1e-9)
    empirical = ff.fisher(loss, params, (x, y), spec=ff.Elementwise(), kind="empirical")
    assert not torch.allclose(empirical["weight"], diag["weight"], rtol=0.1)


def test_kl_over_half_fisher_tends_to_one() -> None:
    # Mean over samples of KL(p_θ ‖ p_{θ+δ}) = ½ δᵀ F δ + O(‖δ‖³), with F the exact Fisher normalised
    # by tokens (one per sample here, so per sample): for δ = h e_i the ratio is 1 + O(h).
    # This model and these inputs are kept as they are: at h = 0.1 the remainder of these three
    # coordinates is already in its O(h) regime, which the rate check below relies on (it is not
    # for every random MLP: for some, h = 0.1 is still pre-asymptotic).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(64, 4, dtype=torch.float64)
    batch = (x, torch.zeros(64, dtype=torch.long))  # labels are not used by the exact Fisher
    diag = ff.fisher(ff.losses.classification(model), params, batch, spec=ff.Elementwise(), kind="exact")
    logp = torch.func.functional_call(model, params, (x,)).log_softmax(-1)

    def mean_kl(p: dict[str, torch.Tensor]) -> float:
        logq = torch.func.functional_call(model, p, (x,)).log_softmax(-1)
        return float((logp.exp() * (logp - logq)).sum(-1).mean())

    for name, entry in [("0.weight", (2, 1)), ("2.weight", (1, 4)), ("2.bias", (0,))]:
        errors = []
        for h in [1e-1, 1e-2, 1e-3]:
            delta = {k: torch.zeros_like(v) for k, v in params.items()}
            delta[name][entry] = h
            new = {k: params[k] + delta[k] for k in params}
            errors.append(abs(mean_kl(new) / ff.perturb.predicted_increase(diag, delta) - 1))
        assert errors[-1] < 1e-3, (name, errors)
        assert errors[0] > 5 * errors[1] > 25 * errors[2], (name, errors)  # the O(h) remainder shrinks with h
