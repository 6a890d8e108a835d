"""Does the group Fisher predict the damage of a concentration-controlled perturbation?

An MLP (64-64-10, tanh) is trained on scikit-learn's ``load_digits`` (1797 images, bundled with
scikit-learn, no download) until the training loss is nearly stationary. Its exact Fisher
(``kind="exact"``) is computed on the training set per channel (``infer_spec``) and per entry
(``Elementwise``). Then, for every concentration ``C``, temperature ``τ``, target (high/low
density), energy ``E = ε²`` and seed, :mod:`fisherfunc.perturb` plans and draws a perturbation
and we compare

* predicted: ``E[ΔL̂] = ½ Σ_g e_g f_g`` (group Fisher only) and ``ΔL̂ = ½ Σ_i F_i δ_i²`` (realised δ);
* measured: the increase of the mean training loss per sample (the Fisher's own scale), one-sided
  ``L(θ+δ) − L(θ)`` and symmetrised ``(L(θ+δ) + L(θ−δ))/2 − L(θ)`` (which cancels the first-order
  term that a not-quite-stationary θ leaves);

reporting, per ε, Spearman correlations between predicted and measured, the median ratio
measured / predicted, and how the stressed fraction (share of the energy on groups above the 0.9
density quantile) ranks the measured damage.

    pip install scikit-learn matplotlib      # scikit-learn is needed; matplotlib only for the plot
    python benchmarks/perturbation.py --write    # ~1 min on 2 CPU cores; writes perturbation.md/.png
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fisherfunc as ff

HERE = Path(__file__).resolve().parent

READING = """## Reading the tables

- **Ranking configurations** (60 of them: C × τ × target, averaged over seeds): the group-Fisher
  expectation E[ΔL̂] = ½ Σ_g e_g f_g, known before any noise is drawn, ranks the measured
  (symmetrised) damage with Spearman ρ above the 0.9 goal at every ε.
- **Ranking single runs** (realised δ, diagonal Fisher): ρ ≈ 0.84, below the goal. The limit is the
  diagonal, not the Fisher: the full-Fisher quadratic form ½ δᵀ F δ (a Jacobian-vector product per
  run) ranks the KL with ρ ≈ 1.00 and the measured loss with ρ ≈ 0.96. Within a channel the Gaussian
  direction is isotropic, so the off-diagonal Fisher terms vanish in expectation (which is why
  E[ΔL̂] is exact in expectation) but not for one draw.
- **Scale**: KL / ΔL̂ ≈ 1.04 (the exact Fisher is the KL's curvature, the Gauss-Newton matrix),
  while the training-loss increase is ≈ 1.7 × ΔL̂: the loss Hessian adds the residual term
  Σ_b Σ_k (p_bk − y_bk) ∇²f_bk, which near this almost interpolating fit is about 0.7 × the
  Gauss-Newton term along these directions (the ratio is flat in ε, so it is curvature, not higher
  orders). ΔL̂ ranks damage; on the training labels it underestimates its size by that factor.
- **One-sided** increases at small ε are dominated by the first-order term gᵀδ (the data-loss gradient
  is not zero: the model is stationary for the L2-regularised objective), hence the symmetrised
  measure, which cancels every odd order.
- **Stressed fraction** S: runs that put half or more of the energy on the top-10% density groups
  do about 2× the average damage, runs with S = 0 about 0.55×; per configuration S alone ranks
  the damage with ρ ≈ 0.93–0.95.
"""


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation with average ranks for ties."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):  # average ties
            tie = x == v
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(np.asarray(a)), ranks(np.asarray(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def train(seed: int, steps: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 0.1)
    y = torch.tensor(digits.target, dtype=torch.long)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    # finish with L-BFGS to make the gradient small (the prediction is second order at a minimum)
    lbfgs = torch.optim.LBFGS(model.parameters(), max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        out = nn.functional.cross_entropy(model(x), y) + 5e-4 * sum(p.square().sum() for p in model.parameters())
        out.backward()
        return out

    lbfgs.step(closure)
    return model, x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="perturbation seeds per configuration")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps before L-BFGS")
    parser.add_argument("--write", action="store_true", help="write benchmarks/perturbation.md (and .png)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()

    model, x, y = train(0, args.steps)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = ff.losses.classification(model)

    def mean_loss(p: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            logits = torch.func.functional_call(model, p, (x,))
            return float(nn.functional.cross_entropy(logits.double(), y))

    with torch.no_grad():
        base_logp = torch.func.functional_call(model, params, (x,)).double().log_softmax(-1)

    def mean_kl(p: dict[str, torch.Tensor]) -> float:
        """Mean over samples of KL(p_θ ‖ p_{θ+δ}): the loss increase in expectation over y ~ p_θ."""
        with torch.no_grad():
            logq = torch.func.functional_call(model, p, (x,)).double().log_softmax(-1)
            return float((base_logp.exp() * (base_logp - logq)).sum(-1).mean())

    def full_fisher_form(delta: dict[str, torch.Tensor]) -> float:
        """½ δᵀ F δ with the full (not diagonal) exact Fisher: mean_b ½ uᵀ (diag p − p pᵀ) u, u = J_b δ."""
        _, u = torch.func.jvp(lambda p: torch.func.functional_call(model, p, (x,)), (params,), (delta,))
        u, prob = u.double(), base_logp.exp()
        return float(0.5 * ((prob * u.square()).sum(-1) - (prob * u).sum(-1).square()).mean())

    # the gradient the first-order term would see (the training objective had a small L2 term)
    p_grad = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    logits = torch.func.functional_call(model, p_grad, (x,))
    grads = torch.autograd.grad(nn.functional.cross_entropy(logits, y), list(p_grad.values()))
    grad_norm = float(torch.sqrt(sum(g.square().sum() for g in grads)))
    base = mean_loss(params)
    accuracy = float((torch.func.functional_call(model, params, (x,)).argmax(-1) == y).float().mean())

    spec = ff.infer_spec(model)
    group_fisher = ff.fisher(loss, params, (x, y), spec=spec, kind="exact", chunk_size=256)
    diag = ff.fisher(loss, params, (x, y), spec=ff.Elementwise(), kind="exact", chunk_size=256)
    fisher_s = time.perf_counter() - start
    index, f = ff.perturb.density(group_fisher, spec, params)
    theta_norm = math.sqrt(sum(float(v.square().sum()) for v in params.values()))

    concentrations = [0.02, 0.05, 0.1, 0.25, 0.5, 1.0]
    temperatures = [0.0, 0.5, 1.0, 2.0, math.inf]
    targets = ["high", "low"]
    epsilons = [0.03, 0.1, 0.3, 1.0]
    rows = []
    for eps in epsilons:
        for c in concentrations:
            for tau in temperatures:
                for target in targets:
                    for seed in range(args.seeds if tau > 0 else 1):
                        sel = torch.Generator().manual_seed(1000 * seed + 1)
                        plan = ff.perturb.plan(
                            group_fisher,
                            index.spec,
                            params,
                            concentration=c,
                            energy=eps**2,
                            temperature=tau,
                            target=target,
                            generator=sel,
                        )
                        # with τ = 0 the selection is fixed; draw several noise directions instead
                        for noise_seed in range(args.seeds if tau == 0 else 1):
                            noise = torch.Generator().manual_seed(1000 * seed + 2 + 7 * noise_seed)
                            new, _ = ff.perturb.perturb(params, plan, generator=noise)
                            delta = {k: new[k] - params[k] for k in params}
                            minus = {k: params[k] - delta[k] for k in params}
                            up, down = mean_loss(new), mean_loss(minus)
                            kl = mean_kl(new)
                            r = ff.perturb.risk(plan)
                            rows.append(
                                dict(
                                    eps=eps,
                                    c=c,
                                    tau=tau,
                                    target=target,
                                    expected=ff.perturb.expected_increase(plan),
                                    realised=ff.perturb.predicted_increase(diag, delta),
                                    measured=up - base,
                                    symmetric=(up + down) / 2 - base,
                                    kl=kl,
                                    full=full_fisher_form(delta),
                                    stressed=r.stressed_fraction,
                                )
                            )
    elapsed = time.perf_counter() - start

    def col(sub: list[dict], key: str) -> np.ndarray:
        return np.array([r[key] for r in sub])

    def per_config(sub: list[dict], key: str) -> np.ndarray:
        configs = sorted({(r["c"], r["tau"], r["target"]) for r in sub})
        return np.array([np.mean([r[key] for r in sub if (r["c"], r["tau"], r["target"]) == k]) for k in configs])

    predict = [
        "| ε = ‖δ‖ | ε / ‖θ‖ | runs | ρ(ΔL̂, sym.) | ρ(ΔL̂, one-sided) | ρ(ΔL̂, KL) | configs "
        "| ρ(E[ΔL̂], sym.) | ρ(E[ΔL̂], KL) | median sym. / ΔL̂ | median KL / ΔL̂ | ρ(½δᵀFδ, sym.) | ρ(½δᵀFδ, KL) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stress = [
        "| ε = ‖δ‖ | ρ(S, sym.) per run | ρ(S, sym.) per config | sym. ÷ mean, runs with S = 0 | 0 < S < ½ | S ≥ ½ |",
        "|---|---|---|---|---|---|",
    ]
    for eps in epsilons:
        sub = [r for r in rows if r["eps"] == eps]
        d, m, s, k, st, full = (
            col(sub, key) for key in ("realised", "measured", "symmetric", "kl", "stressed", "full")
        )
        ce, cs, ck, cst = (per_config(sub, key) for key in ("expected", "symmetric", "kl", "stressed"))
        predict.append(
            f"| {eps:g} | {eps / theta_norm:.1e} | {len(sub)} | {spearman(d, s):.3f} | {spearman(d, m):.3f} "
            f"| {spearman(d, k):.3f} | {len(ce)} | {spearman(ce, cs):.3f} | {spearman(ce, ck):.3f} "
            f"| {np.median(s / d):.3f} | {np.median(k / d):.3f} | {spearman(full, s):.3f} | {spearman(full, k):.3f} |"
        )
        bins = [s[st == 0], s[(st > 0) & (st < 0.5)], s[st >= 0.5]]
        by_bin = " | ".join(f"{b.mean() / s.mean():.2f} ({len(b)})" if len(b) else "—" for b in bins)
        stress.append(f"| {eps:g} | {spearman(st, s):.3f} | {spearman(cst, cs):.3f} | {by_bin} |")
    table = "\n".join(predict) + "\n\n" + "\n".join(stress)
    header = (
        f"MLP 64-64-10 (tanh) on load_digits (1797 samples), trained with a small L2 term (5e-4 ‖θ‖²) to a "
        f"stationary point of that objective: training loss {base:.4f} per sample, accuracy {accuracy:.3f}, "
        f"data-loss gradient ‖∇L̄‖ = {grad_norm:.1e}, ‖θ‖ = {theta_norm:.2f}; G = {index.num_groups} groups "
        f"(per channel). Exact Fisher in {fisher_s:.1f} s; {len(rows)} perturbations; {elapsed:.1f} s in all."
    )
    print(header)
    print()
    print(table)

    if args.write:
        command = "python benchmarks/perturbation.py --write"
        cpu = platform.processor() or "unknown processor"
        if Path("/proc/cpuinfo").exists():
            names = [
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ]
            cpu = names[0] if names else cpu
        machine = f"{cpu} ({platform.machine()}), {os.cpu_count()} cores, torch using {torch.get_num_threads()} threads"
        md = HERE / "perturbation.md"
        plot_line = ""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(5.5, 5))
            for eps in epsilons:
                sub = [r for r in rows if r["eps"] == eps]
                ax.scatter(col(sub, "realised"), col(sub, "symmetric"), s=4, alpha=0.5, label=f"ε = {eps:g}")
            lo = min(r["realised"] for r in rows)
            hi = max(r["realised"] for r in rows)
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = predicted")
            ax.set(xscale="log", yscale="log", xlabel="predicted ΔL̂ = ½ Σ F_i δ_i² (per sample)")
            ax.set_ylabel("measured increase of mean loss (symmetrised)")
            ax.set_title("load_digits MLP: measured vs predicted damage")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(HERE / "perturbation.png", dpi=120)
            plot_line = "\n![measured vs predicted](perturbation.png)\n"
        except ImportError:
            pass
        md.write_text(
            "# Fisher-guided perturbations: predicted vs measured damage\n\n"
            f"Command: `{command}`  \n"
            f"Machine: {machine}; torch {torch.__version__}, "
            f"Python {platform.python_version()}; run on {datetime.date.today().isoformat()}.\n\n"
            f"{header}\n\n"
            f"Sweep: C ∈ {concentrations}, τ ∈ {{0, 0.5, 1, 2, ∞}}, target ∈ {{high, low}}, "
            f"{args.seeds} seeds (for τ = 0, {args.seeds} noise draws of the fixed top-k). ρ is Spearman's "
            "rank correlation over all runs at that ε; ΔL̂ the realised prediction ½ Σ_i F_i δ_i² (elementwise "
            "exact Fisher), E[ΔL̂] = ½ Σ_g e_g f_g (group Fisher only); meas. = L̄(θ+δ) − L̄(θ), "
            "sym. = (L̄(θ+δ) + L̄(θ−δ))/2 − L̄(θ), both per sample; S the stressed fraction (energy share on "
            "groups above the 0.9 density quantile), last column the mean measured damage of runs with S = 0, "
            "0 < S < ½ and S ≥ ½ relative to the mean at that ε (run counts in brackets).\n\n"
            f"{table}\n{plot_line}\n{READING}",
            encoding="utf-8",
        )
        print(f"wrote {md.relative_to(HERE.parent)}", file=sys.stderr)


if __name__ == "__main__":
    main()
