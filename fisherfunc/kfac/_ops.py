"""What users do with K-FAC / EK-FAC: products, damped inverse products, diagonals, dense blocks.

A layer's parameters are handled as the augmented matrix ``V = [W | b]`` (``[out, in(+1)]``;
for ``torch.addmm`` layers ``W`` is stored ``[in, out]`` and enters transposed, a convolution's
``[out, C, *k]`` enters as ``[out, C·Πk]``). With row-major
``vec`` and symmetric factors::

    (G ⊗ A) vec V = vec(G V A)
    ((G ⊗ A) + λI)⁻¹ vec V = vec(Q_G [(Q_Gᵀ V Q_A) / (λ_G λ_Aᵀ + λ)] Q_Aᵀ)
    EK-FAC:  F vec V = vec(Q_G [(Q_Gᵀ V Q_A) ⊙ S] Q_Aᵀ),  inverse: ⊘ (S + λ)
    diag(G ⊗ A) = diag(G) diag(A)ᵀ,   diag(EK-FAC) = (Q_G ⊙ Q_G) S (Q_A ⊙ Q_A)ᵀ

Vectors are pytrees of tensors named like the params (e.g. ``dict(model.named_parameters())``
or a dict of gradients); results are flat ``{parameter name: tensor}`` dicts holding the
parameters K-FAC covers (weights and their biases) — others are not in the result.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import Tensor

from .._naming import path_name
from .._spec.resolve import resolve_spec
from ._eigen import EKFAC, eigenbasis
from ._factors import KFAC
from ._layers import Layer

__all__ = ["mvp", "inverse_mvp", "diagonal", "group_diagonal", "dense", "own_order"]

Approximation = KFAC | EKFAC


def _named(tree: Any) -> dict[str, Tensor]:
    paths, leaves, _ = optree.tree_flatten_with_path(tree)
    return {path_name(p): x for p, x in zip(paths, leaves)}


def _to_matrix(layer: Layer, named: dict[str, Tensor]) -> Tensor:
    """``V = [W | b]`` (``[out, in(+1)]``) of one layer from a named vector."""
    for name in (layer.name, layer.bias_name):
        if name is not None and name not in named:
            raise KeyError(f"the vector has no entry for parameter '{name}', which K-FAC covers")
    w = named[layer.name]
    if tuple(w.shape) != layer.weight_shape:
        raise ValueError(
            f"parameter '{layer.name}': the vector has shape {tuple(w.shape)}, expected {layer.weight_shape}"
        )
    w = w.t() if layer.op == "addmm" else w.reshape(layer.out_features, layer.in_features)
    if layer.bias_name is None:
        return w
    b = named[layer.bias_name]
    if tuple(b.shape) != (layer.out_features,):
        raise ValueError(
            f"parameter '{layer.bias_name}': the vector has shape {tuple(b.shape)}, expected ({layer.out_features},)"
        )
    return torch.cat([w, b.unsqueeze(1)], dim=1)


def _from_matrix(layer: Layer, v: Tensor) -> dict[str, Tensor]:
    """Split ``[W | b]`` back into the parameters' own shapes."""
    w = v[:, : layer.in_features]
    out = {layer.name: w.t().contiguous() if layer.op == "addmm" else w.reshape(layer.weight_shape)}
    if layer.bias_name is not None:
        out[layer.bias_name] = v[:, layer.in_features]
    return out


def _factors_of(F: Approximation, layer: Layer, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
    if isinstance(F, KFAC):
        return F.A[layer.name].to(device, dtype), F.G[layer.name].to(device, dtype)
    return F.QA[layer.name].to(device, dtype), F.QG[layer.name].to(device, dtype), F.scale[layer.name].to(device, dtype)


def _eigen(F: Approximation, layer: Layer, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(Q_A, Q_G, S)``: the approximation as a diagonal ``S`` in the basis ``Q_G ⊗ Q_A``."""
    if isinstance(F, EKFAC):
        qa, qg, s = _factors_of(F, layer, device, dtype)
        return qa, qg, s
    la, qa = eigenbasis(F.A[layer.name].to(device, dtype))
    lg, qg = eigenbasis(F.G[layer.name].to(device, dtype))
    return qa, qg, torch.outer(lg, la)


def _check(F: Approximation) -> None:
    if not isinstance(F, (KFAC, EKFAC)):
        raise TypeError(f"expected a KFAC or EKFAC, got {type(F).__name__}")


def mvp(F: Approximation, vector: Any) -> dict[str, Tensor]:
    """The approximate Fisher times a vector: ``(G ⊗ A) v`` (K-FAC) or ``Q diag(S) Qᵀ v`` (EK-FAC).

    Args:
        F: a :class:`~fisherfunc.kfac.KFAC` or :class:`~fisherfunc.kfac.EKFAC`.
        vector: a pytree of tensors named like the params (at least the covered parameters).

    Returns:
        ``{parameter name: tensor}`` for the covered weights and biases, in their own shapes.
    """
    _check(F)
    named = _named(vector)
    out: dict[str, Tensor] = {}
    for layer in F.layers:
        v = _to_matrix(layer, named)
        if isinstance(F, KFAC):
            a, g = _factors_of(F, layer, v.device, v.dtype)
            r = g @ v @ a
        else:
            qa, qg, s = _factors_of(F, layer, v.device, v.dtype)
            r = qg @ ((qg.t() @ v @ qa) * s) @ qa.t()
        out.update(_from_matrix(layer, r))
    return out


def inverse_mvp(F: Approximation, vector: Any, damping: float) -> dict[str, Tensor]:
    """The damped inverse times a vector: ``(F̃ + λI)⁻¹ v`` for K-FAC or EK-FAC, exactly.

    K-FAC's factors are eigendecomposed on each call (in float64); for repeated solves decompose
    once with :func:`~fisherfunc.kfac.eigendecompose` (the same operator, in eigen form).

    Args:
        F: a :class:`~fisherfunc.kfac.KFAC` or :class:`~fisherfunc.kfac.EKFAC`.
        vector: a pytree of tensors named like the params.
        damping: ``λ > 0`` added to every eigenvalue (``0`` allowed when ``F̃`` is invertible).

    Returns:
        ``{parameter name: tensor}`` for the covered weights and biases, each in its parameter's
        shape (the layer's ``[W | b]`` is solved as one ``[out, in(+1)]`` matrix).
    """
    _check(F)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    named = _named(vector)
    out: dict[str, Tensor] = {}
    for layer in F.layers:
        v = _to_matrix(layer, named)
        qa, qg, s = _eigen(F, layer, v.device, v.dtype)
        r = qg @ ((qg.t() @ v @ qa) / (s + damping)) @ qa.t()
        out.update(_from_matrix(layer, r))
    return out


def diagonal(F: Approximation) -> dict[str, Tensor]:
    """The approximation's diagonal, ``{parameter name: tensor}`` in the parameters' own shapes."""
    _check(F)
    out: dict[str, Tensor] = {}
    for layer in F.layers:
        if isinstance(F, KFAC):
            a, g = F.A[layer.name], F.G[layer.name]
            d = torch.outer(torch.diagonal(g), torch.diagonal(a))
        else:
            qa, qg, s = F.QA[layer.name], F.QG[layer.name], F.scale[layer.name]
            d = qg.square() @ s @ qa.square().t()
        out.update(_from_matrix(layer, d))
    return out


def group_diagonal(F: Approximation, params: Any, spec: Any) -> dict[str, Tensor]:
    """The approximate diagonal summed into groups, comparable with :func:`fisherfunc.fisher`.

    Args:
        F: a K-FAC or EK-FAC.
        params: the params (for resolving ``spec``; only shapes are read).
        spec: group rules, as for :func:`fisherfunc.fisher` (e.g. ``ff.infer_spec(model)``).

    Returns:
        ``{parameter name: rule.reduce(diagonal)}`` for the covered parameters (not ``Skip()``).
    """
    rule_of = resolve_spec(spec, params).rule_of()
    return {name: rule_of[name].reduce(d) for name, d in diagonal(F).items() if name in rule_of}


def own_order(layer: Layer) -> Tensor:
    """Indices into row-major ``vec [W | b]`` of the parameters' own row-major order (weight, then bias)."""
    width = layer.a_dim
    o = torch.arange(layer.out_features)
    i = torch.arange(layer.in_features)
    if layer.op == "addmm":  # W[i, o]
        weight = (o.unsqueeze(0) * width + i.unsqueeze(1)).reshape(-1)
    else:  # W[o, i] (a convolution's [o, c, *k] flattens to the same order)
        weight = (o.unsqueeze(1) * width + i.unsqueeze(0)).reshape(-1)
    if layer.bias is None:
        return weight
    return torch.cat([weight, o * width + layer.in_features])


def dense(F: Approximation, layer: str) -> Tensor:
    """The dense approximate Fisher block of one layer (for tests and inspection; small layers only).

    Rows and columns follow the layer's weight flattened in its own row-major order, then its
    bias: the order of ``torch.cat([weight.reshape(-1), bias])``.

    Args:
        F: a K-FAC or EK-FAC.
        layer: the layer's name (its weight's name).
    """
    _check(F)
    found = {x.name: x for x in F.layers}
    if layer not in found:
        raise KeyError(f"no K-FAC layer named '{layer}'; layers are {list(found)}")
    x = found[layer]
    size = x.out_features * x.a_dim
    if size > 20_000:
        raise ValueError(f"layer '{layer}' has {size} parameters; a dense block is for small layers (<= 20000)")
    if isinstance(F, KFAC):
        full = torch.kron(F.G[layer], F.A[layer])
    else:
        q = torch.kron(F.QG[layer], F.QA[layer])
        full = (q * F.scale[layer].reshape(1, -1)) @ q.t()
    order = own_order(x).to(full.device)
    return full[order][:, order]
