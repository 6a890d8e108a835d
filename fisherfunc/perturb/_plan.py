"""Fisher-guided perturbations: concentration, temperature, predicted damage and the stressed fraction.

Pure functions of (group Fisher, spec, params, generator). For every group ``g`` of the spec
(numbered ``0 … G−1`` by the spec's group index, ``Plan.index``): Fisher ``F_g`` (the sum over
its ``n_g`` parameter entries) and density ``f_g = F_g / n_g``.

1. **Selection** (:func:`select`) with concentration ``C ∈ (0, 1]`` and temperature ``τ``: choose
   ``k = ⌈C·G⌉`` of the ``G`` eligible groups without replacement, with weights
   ``w_g = (f_g + ε₀)^{1/τ}``, computed as ``log w_g = log(f_g + ε₀) / τ``. Gumbel-top-k gives
   exact sampling without replacement (successive draws with probability ``w_g / Σ_{remaining} w``):
   ``chosen = top-k of log w_g + G_g`` with ``G_g = −log(−log U_g)``, ``U_g ~ U(0, 1)``.
   ``τ = 0`` is the deterministic top-k by density, ``τ = ∞`` uniform; ``target="low"`` uses
   ``w_g = (f_g + ε₀)^{−1/τ}``.
2. **Allocation** (:func:`allocate`) of the total energy ``E = ε²`` (squared L2 norm of the whole
   perturbation): ``e_g = E / k`` (equal), or ``e_g = E (f_g + ε₀)^p / Σ_{chosen} (f + ε₀)^p``.
3. **Perturbation** (:func:`perturb`; :func:`replay`, :func:`delta`): ``δ_g = √e_g · z_g / ‖z_g‖``
   with ``z ~ N(0, I)`` over the entries of each chosen group, ``δ = 0`` elsewhere, so
   ``‖δ_g‖² = e_g`` and ``‖δ‖² = E``.
4. **Predicted loss increase**, second order with the Fisher as curvature: for the realised ``δ``
   and the elementwise Fisher, ``ΔL̂ = ½ Σ_i F_i δ_i²`` (:func:`predicted_increase`); from the group
   Fisher alone, its expectation over ``z``: ``δ_g`` is uniform on the sphere of radius ``√e_g``,
   so ``E[δ_i²] = e_g / n_g`` and ``E[ΔL̂] = ½ Σ_g e_g f_g`` (:func:`expected_increase`).
5. **Stressed fraction** (:func:`risk`), a pre-perturbation risk score in ``[0, 1]``: the share of
   the energy on groups whose density exceeds a threshold ``t`` (default: the 0.9 quantile of
   ``f`` over all ``G`` groups), ``S = Σ_{chosen, f_g > t} e_g / E``.

**Loss scale.** fisherfunc's Fisher is token-normalised, ``F = Σ_b g_b ⊙ g_b / Σ_b n_b``, so it
is the curvature of the **mean loss per token**, ``L̄(θ) = Σ_b L_b(θ) / Σ_b n_b`` (for one label
per example: the mean loss per sample). ``ΔL̂`` predicts ``L̄(θ + δ) − L̄(θ)`` at a minimum (where
the first-order term vanishes) in the units of ``L̄``. Use ``kind="exact"`` (or ``"mc"``): the
true Fisher is the expected Hessian of the negative log-likelihood (for classification, the
expected KL: ``KL(p_θ ‖ p_{θ+δ}) ≈ ½ δᵀ F δ``); the empirical Fisher is not.

A worked example is in :mod:`fisherfunc.perturb`'s documentation.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from .._spec.groups import GroupIndex, Where, group_index
from ._selection import Target, allocate, select

__all__ = [
    "Plan",
    "Record",
    "Risk",
    "density",
    "select",
    "allocate",
    "plan",
    "perturb",
    "replay",
    "delta",
    "expected_increase",
    "predicted_increase",
    "risk",
]

Params = Any


class Plan(NamedTuple):
    """Which groups are perturbed and with how much energy (decided before any noise is drawn).

    Attributes:
        index: the flat numbering of the spec's groups (``G`` of them).
        density: ``[G]`` float64, ``f_g = F_g / n_g``.
        groups: ``[k]`` int64 flat ids of the chosen groups, in selection order.
        shares: ``[k]`` float64 energies ``e_g`` of the chosen groups; ``shares.sum() == energy``.
        energy: ``E = ε²``, the squared L2 norm of the whole perturbation.
    """

    index: GroupIndex  # type: ignore[assignment]  # a field named like tuple.index, kept for users
    density: Tensor
    groups: Tensor
    shares: Tensor
    energy: float


class Record(NamedTuple):
    """What reproduces a perturbation bitwise (:func:`replay`).

    Attributes:
        plan: the plan (chosen groups and their shares).
        generator_state: the noise generator's ``get_state()`` before the draw (a ``[n]`` uint8 tensor).
        seed: the generator's ``initial_seed()`` (for reports; the state is what replays).
        device: the generator's device.
    """

    plan: Plan
    generator_state: Tensor
    seed: int
    device: str


class Risk(NamedTuple):
    """Pre-perturbation risk of a plan (:func:`risk`).

    Attributes:
        stressed_fraction: ``S ∈ [0, 1]``, the share of the energy on groups with ``f_g > t``.
        threshold: ``t``.
        stressed: ``[k]`` bool, whether each chosen group is stressed.
        contributions: ``[k]`` float64 predicted contributions ``½ e_g f_g`` (for plotting).
        expected_increase: ``Σ contributions = ½ Σ_g e_g f_g``.
    """

    stressed_fraction: float
    threshold: float
    stressed: Tensor
    contributions: Tensor
    expected_increase: float


def density(fisher: Any, spec: Any, params: Params) -> tuple[GroupIndex, Tensor]:
    """Group densities ``f_g = F_g / n_g``.

    Args:
        fisher: group Fisher tree (e.g. from :func:`fisherfunc.fisher` with the same ``spec``).
        spec: the spec the Fisher was reduced with (or its resolved form).
        params: the parameters.

    Returns:
        The group numbering and ``[G]`` float64 densities.
    """
    index = group_index(spec, params)
    return index, index.flatten(fisher, "fisher") / index.sizes


def plan(
    fisher: Any,
    spec: Any,
    params: Params,
    *,
    concentration: float,
    energy: float,
    temperature: float = 1.0,
    target: Target = "high",
    where: Where = None,
    power: float | None = None,
    eps0: float | None = None,
    generator: torch.Generator | None = None,
) -> Plan:
    """Select ``k = ⌈C·G⌉`` groups (:func:`select`) and allocate ``E`` over them (:func:`allocate`).

    Args:
        fisher: group Fisher tree, reduced with ``spec``.
        spec: the spec (or resolved spec).
        params: the parameters (only their structure and shapes are read).
        concentration: ``C ∈ (0, 1]``, the fraction of eligible groups perturbed.
        energy: ``E = ε²``.
        temperature: ``τ`` of the selection (``0`` top-k, ``math.inf`` uniform).
        target: ``"high"`` or ``"low"`` density first.
        where: which groups are eligible (``G`` counts only these): a name glob or several, a rule
            class such as ``ff.Heads``, or a callable ``(name, rule) -> bool``; ``None`` for all.
        power: allocation power ``p`` (``None``: equal shares).
        eps0: ``ε₀`` of selection and allocation (default ``10⁻⁶ · mean(f)``).
        generator: randomness of the selection (required unless ``temperature == 0``).
    """
    if not 0 < concentration <= 1:
        raise ValueError(f"concentration must be in (0, 1], got {concentration}")
    index, f = density(fisher, spec, params)
    eligible = index.eligible(where)
    num = int(eligible.sum())
    k = max(1, math.ceil(round(concentration * num, 9)))  # round: 0.7 · 10 is 7.000000000000001
    groups = select(f, k, temperature=temperature, target=target, eligible=eligible, eps0=eps0, generator=generator)
    shares = allocate(f[groups], energy, power=power, eps0=eps0)
    return Plan(index=index, density=f, groups=groups, shares=shares, energy=float(energy))


def _noise(params: Params, plan: Plan, generator: torch.Generator) -> list[Tensor | None]:
    """``δ`` for every active leaf (``None`` where no group is chosen), drawing from ``generator``.

    ``z ~ N(0, I)`` is drawn for every active leaf in flattening order, whatever is chosen, so a
    group's noise direction does not depend on which other groups are chosen.
    """
    index = plan.index
    spec = index.spec
    leaves: list[Tensor] = spec.leaves_of(params)
    scale = torch.zeros(index.num_groups, dtype=torch.float64)
    scale[plan.groups] = plan.shares  # e_g, then √(e_g / ‖z_g‖²)
    out: list[Tensor | None] = []
    for j, i in enumerate(spec.active):
        p = leaves[i]
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        z = torch.randn(p.shape, generator=generator, dtype=dtype, device=generator.device).to(p.device)
        a, b = index.offsets[j], index.offsets[j + 1]
        share = scale[a:b]
        if not bool((share > 0).any()):
            out.append(None)
            continue
        member = spec.rules[i].membership(p.shape, device=p.device)
        sq = spec.rules[i].reduce(z.to(torch.float64).square()).reshape(-1).cpu()  # ‖z_g‖²
        factor = torch.where(share > 0, torch.sqrt(share / sq), torch.zeros_like(share))
        out.append(z * factor.to(p.device, dtype)[member])
    return out


def perturb(params: Params, plan: Plan, *, generator: torch.Generator) -> tuple[Params, Record]:
    """Add ``δ`` (``‖δ_g‖² = e_g`` on the chosen groups, zero elsewhere) to ``params``.

    Args:
        params: the parameters; not modified.
        plan: from :func:`plan`.
        generator: source of the Gaussian directions ``z`` (its state is recorded, then advanced).

    Returns:
        New params (leaves with no chosen group are the input tensors themselves, untouched) in the
        params' dtype, and the :class:`Record` that :func:`replay` reproduces them from bitwise.
    """
    record = Record(
        plan=plan, generator_state=generator.get_state(), seed=generator.initial_seed(), device=str(generator.device)
    )
    return _apply(params, plan, generator), record


def _apply(params: Params, plan: Plan, generator: torch.Generator) -> Params:
    spec = plan.index.spec
    leaves: list[Tensor] = spec.leaves_of(params)
    with torch.no_grad():
        for i, d in zip(spec.active, _noise(params, plan, generator)):
            if d is not None:
                leaves[i] = (leaves[i].detach() + d).to(leaves[i].dtype)
    return optree.tree_unflatten(spec.treespec, leaves)


def replay(params: Params, record: Record) -> Params:
    """The params :func:`perturb` returned for ``record``, bitwise (on the generator's device)."""
    generator = torch.Generator(device=record.device)
    generator.set_state(record.generator_state)
    return _apply(params, record.plan, generator)


def delta(params: Params, record: Record) -> Params:
    """The exact ``δ`` of a recorded perturbation, before it was added to (and rounded with) the params.

    Returns:
        A tree with the params' structure: ``δ`` in float32 (float64 for float64 params), zeros on
        the leaves with no chosen group and on skipped ones.
    """
    spec = record.plan.index.spec
    generator = torch.Generator(device=record.device)
    generator.set_state(record.generator_state)
    leaves: list[Tensor] = spec.leaves_of(params)
    out = [torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32) for p in leaves]
    for i, d in zip(spec.active, _noise(params, record.plan, generator)):
        if d is not None:
            out[i] = d
    return optree.tree_unflatten(spec.treespec, out)


def expected_increase(plan: Plan) -> float:
    """``E[ΔL̂] = ½ Σ_g e_g f_g``: the predicted increase of the mean loss per token, from group Fisher alone."""
    return 0.5 * float((plan.shares * plan.density[plan.groups]).sum())


def predicted_increase(fisher: Any, delta: Any) -> float:
    """``ΔL̂ = ½ Σ_i F_i δ_i²`` for a realised ``δ`` and the elementwise Fisher.

    Args:
        fisher: elementwise Fisher tree (``spec=ff.Elementwise()``; ``None`` leaves are skipped).
        delta: the perturbation, a tree with the params' structure (e.g. ``new − old``).

    Returns:
        The predicted increase of the mean loss per token (float64 arithmetic).
    """
    f_leaves, treespec = optree.tree_flatten(fisher, none_is_leaf=True)
    d_leaves: list[Any] = list(treespec.flatten_up_to(delta))
    total = 0.0
    for f, d in zip(f_leaves, d_leaves):
        if f is None or d is None:
            continue
        if f.shape != d.shape:
            raise ValueError(f"elementwise Fisher of shape {tuple(f.shape)} does not match δ of shape {tuple(d.shape)}")
        total += float((f.to(torch.float64) * d.to(torch.float64).square()).sum())
    return 0.5 * total


def risk(plan: Plan, *, quantile: float = 0.9, threshold: float | None = None) -> Risk:
    """Stressed fraction ``S = Σ_{chosen, f_g > t} e_g / E`` and per-group predicted contributions.

    Args:
        plan: from :func:`plan`.
        quantile: ``t`` is this quantile of ``f`` over all ``G`` groups (default 0.9).
        threshold: an absolute ``t`` instead.
    """
    if threshold is None:
        if not 0 <= quantile <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        threshold = float(torch.quantile(plan.density, quantile))
    f = plan.density[plan.groups]
    stressed = f > threshold
    contributions = 0.5 * plan.shares * f
    fraction = float(plan.shares[stressed].sum() / plan.shares.sum())
    return Risk(
        stressed_fraction=min(max(fraction, 0.0), 1.0),
        threshold=threshold,
        stressed=stressed,
        contributions=contributions,
        expected_increase=float(contributions.sum()),
    )
