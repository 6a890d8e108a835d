"""Selection of groups by Fisher density (Gumbel-top-k) and allocation of an energy over them.

``k`` groups are drawn without replacement with weights ``w_g = (f_g + ε₀)^{1/τ}``: each draw picks
one of the groups not yet chosen with probability ``w_g / Σ_{not yet chosen} w``. The Gumbel-top-k
trick does this in one pass: with ``G_g = −log(−log U_g)``, ``U_g ~ U(0, 1)`` independent, the
indices of the ``k`` largest ``log w_g + G_g`` have exactly that law. Weights are handled in log
space, ``log w_g = log(f_g + ε₀) / τ``, so no power of a density overflows or underflows.
Used by :mod:`fisherfunc.perturb`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["Target", "select", "allocate"]

#: ``"high"``: favour dense groups; ``"low"``: sparse ones.
Target = Literal["high", "low"]


def _default_eps0(f: Tensor) -> float:
    """``ε₀ = 10⁻⁶ · mean(f)``: negligible next to typical densities, and scale-free."""
    mean = float(f.mean()) if f.numel() else 0.0
    return 1e-6 * mean if mean > 0 else 1.0


def select(
    density: Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    target: Target = "high",
    eligible: Tensor | None = None,
    eps0: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose ``k`` groups without replacement with weights ``w_g = (f_g + ε₀)^{±1/τ}`` (Gumbel-top-k).

    ``keys = log w + Gumbel`` and the ``k`` largest keys are chosen, which is exactly sampling
    ``k`` times without replacement, each draw with probability ``w_g / Σ_{not yet chosen} w``.

    Args:
        density: ``[..., G]`` densities ``f_g ≥ 0``; leading dimensions are independent draws.
        k: number of groups to choose, ``1 ≤ k ≤`` the number of eligible groups.
        temperature: ``τ ≥ 0``; ``0`` is the deterministic top-k (ties by lower index, no
            randomness), ``math.inf`` uniform.
        target: ``"high"`` favours dense groups, ``"low"`` sparse ones (``w_g = (f_g + ε₀)^{−1/τ}``).
        eligible: ``[G]`` bool, the groups that may be chosen (default all).
        eps0: ``ε₀`` (default ``10⁻⁶ · mean(f)`` over the eligible groups).
        generator: source of the Gumbel noise (required unless ``temperature == 0``).

    Returns:
        ``[..., k]`` int64 indices into the last dimension of ``density``, largest key first.
    """
    f = density.to(torch.float64)
    mask = torch.ones(f.shape[-1], dtype=torch.bool) if eligible is None else eligible.to(torch.bool).cpu()
    if not 1 <= k <= int(mask.sum()):
        raise ValueError(f"k must be in [1, {int(mask.sum())}] (the eligible groups), got {k}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: top-k, inf: uniform), got {temperature}")
    if target not in ("high", "low"):
        raise ValueError(f"target must be 'high' or 'low', got {target!r}")
    if bool((f < 0).any()) or not bool(torch.isfinite(f).all()):
        raise ValueError("densities must be finite and >= 0")
    eps0 = _default_eps0(f[..., mask.to(f.device)]) if eps0 is None else eps0
    sign = 1.0 if target == "high" else -1.0
    log_f = sign * torch.log(f + eps0)  # log w = ±log(f + ε₀) / τ
    if temperature == 0:
        keys = log_f
    else:
        if generator is None:
            raise ValueError("select needs an explicit torch.Generator unless temperature == 0")
        log_w = torch.zeros_like(log_f) if math.isinf(temperature) else log_f / temperature
        u = torch.rand(f.shape, generator=generator, dtype=torch.float64, device=generator.device).to(f.device)
        u = u.clamp(min=torch.finfo(torch.float64).tiny)
        keys = log_w - torch.log(-torch.log(u))
    keys = keys.masked_fill(~mask.to(keys.device), -math.inf)
    return torch.argsort(keys, dim=-1, descending=True, stable=True)[..., :k]


def allocate(density: Tensor, energy: float, *, power: float | None = None, eps0: float | None = None) -> Tensor:
    """Shares ``e_g`` of the energy ``E`` over the chosen groups.

    ``e_g = E / k`` (``power=None``), or ``e_g = E (f_g + ε₀)^p / Σ_j (f_j + ε₀)^p`` (``power=p``).

    Args:
        density: ``[k]`` densities of the chosen groups.
        energy: ``E = ε² > 0``.
        power: ``p``, or ``None`` for equal shares.
        eps0: ``ε₀`` (default ``10⁻⁶ · mean(f)``).

    Returns:
        ``[k]`` float64 shares, summing to ``E``.
    """
    if not energy > 0:
        raise ValueError(f"energy must be > 0, got {energy}")
    f = density.to(torch.float64)
    if power is None:
        return torch.full_like(f, energy / f.numel())
    eps0 = _default_eps0(f) if eps0 is None else eps0
    log_w = power * torch.log(f + eps0)
    return energy * torch.softmax(log_w, dim=0)
