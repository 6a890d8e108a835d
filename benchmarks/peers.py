"""Adapters that run the peer libraries on a workload and return ``Σ_b g_b ⊙ g_b`` per parameter.

Every adapter returns ``{param_name: tensor}`` (the elementwise sum of squared per-sample
gradients of the summed loss, the quantity fisherfunc's ``accumulate(..., spec=Elementwise())``
returns) for the parameters the peer covers, and lists the ones it silently leaves out. The
benchmark checks each result against the naive per-sample loop, so a peer that disagrees or skips
parameters is reported, not trusted. Peers are optional: a missing package is reported as such.

| peer | quantity used | notes |
|---|---|---|
| BackPACK ``SumGradSquared`` | ``p.sum_grad_squared`` | extends modules in place; skips modules it has no rule for |
| BackPACK ``BatchGrad`` | ``Σ_b p.grad_batch²`` | per-sample gradients ``[B, *shape]`` materialised |
| Opacus ``GradSampleModule`` | ``Σ_b p.grad_sample²`` | hooks; per-sample gradients materialised |
| nngeometry ``PMatDiag`` | ``n · diag`` of the per-sample losses' Jacobian Gram | empirical Fisher diagonal (hooks) |
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

PeerResult = dict[str, torch.Tensor]
#: ``(model, batch) -> summed loss`` and ``(model, batch) -> per-sample losses [B]``.
BatchLoss = Callable[[nn.Module, Any], torch.Tensor]


def _named(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def backpack_sum_grad_squared(model: nn.Module, batch: Any, batch_loss: BatchLoss) -> Callable[[], PeerResult]:
    """BackPACK's ``SumGradSquared`` on a deep copy of ``model`` (``extend`` mutates modules)."""
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    model = extend(copy.deepcopy(model))

    def run() -> PeerResult:
        model.zero_grad(set_to_none=True)
        with backpack(SumGradSquared()):
            batch_loss(model, batch).backward()
        return {k: p.sum_grad_squared for k, p in _named(model).items() if hasattr(p, "sum_grad_squared")}

    return run


def backpack_batch_grad(model: nn.Module, batch: Any, batch_loss: BatchLoss) -> Callable[[], PeerResult]:
    """BackPACK's ``BatchGrad`` (per-sample gradients), squared and summed."""
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    model = extend(copy.deepcopy(model))

    def run() -> PeerResult:
        model.zero_grad(set_to_none=True)
        with backpack(BatchGrad()):
            batch_loss(model, batch).backward()
        return {k: p.grad_batch.square().sum(0) for k, p in _named(model).items() if hasattr(p, "grad_batch")}

    return run


def opacus_grad_sample(model: nn.Module, batch: Any, batch_loss: BatchLoss) -> Callable[[], PeerResult]:
    """Opacus ``GradSampleModule`` (hooks), per-sample gradients squared and summed."""
    from opacus import GradSampleModule

    inner = copy.deepcopy(model)
    wrapped = GradSampleModule(inner, batch_first=True, loss_reduction="sum")

    def run() -> PeerResult:
        wrapped.zero_grad(set_to_none=True)
        for p in inner.parameters():
            p.grad_sample = None
        batch_loss(wrapped, batch).backward()
        return {
            k: p.grad_sample.square().sum(0)
            for k, p in _named(inner).items()
            if getattr(p, "grad_sample", None) is not None
        }

    return run


def nngeometry_diag(model: nn.Module, batch: Any, per_sample_loss: BatchLoss) -> Callable[[], PeerResult]:
    """nngeometry ``PMatDiag`` of the per-sample losses' Jacobian: ``diag = (1/n) Σ_b g_b²``."""
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.object import PMatDiag
    from nngeometry.object.vector import PVector

    if not isinstance(batch, tuple):
        raise TypeError("nngeometry's examples are a DataLoader over a TensorDataset: tuple batches only")
    model = copy.deepcopy(model)
    size = batch[0].shape[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch), batch_size=size)
    generator = TorchHooksJacobianBackend(model, function=lambda *b: per_sample_loss(model, b).unsqueeze(1))
    modules = dict(model.named_modules())

    def run() -> PeerResult:
        diag = PMatDiag(generator, examples=loader).get_diag() * size
        out: PeerResult = {}
        for layer_id, tensors in PVector(generator.layer_collection, vector_repr=diag).to_dict().items():
            module = modules[layer_id]
            for name, value in zip(("weight", "bias"), tensors):
                if getattr(module, name, None) is not None:
                    out[f"{layer_id}.{name}" if layer_id else name] = value
        return out

    return run


#: name -> (adapter, which loss it takes: "batch" = summed loss, "per_sample" = losses [B]).
PEERS: dict[str, tuple[Callable[..., Callable[[], PeerResult]], str]] = {
    "BackPACK SumGradSquared": (backpack_sum_grad_squared, "batch"),
    "BackPACK BatchGrad": (backpack_batch_grad, "batch"),
    "Opacus GradSampleModule": (opacus_grad_sample, "batch"),
    "nngeometry PMatDiag": (nngeometry_diag, "per_sample"),
}
