"""Kronecker-factored Fisher: K-FAC and eigenvalue-corrected EK-FAC, from output probes (hook-free).

Diagonal and group Fisher (:func:`fisherfunc.fisher`) ignore correlations inside a layer;
K-FAC keeps the dominant ones as ``F_layer ≈ G ⊗ A`` (Martens & Grosse 2015), EK-FAC replaces
K-FAC's eigenvalues by the exact second moments in its eigenbasis (George et al. 2018). Both
cover linear-like layers (``F.linear``, GPT-2 ``Conv1D`` via ``torch.addmm``, ``F.conv1d``/``F.conv2d``)
and get each layer's inputs and output gradients from the engine's one probe mechanism — the same
as the group-Fisher factorised path — through the same chunk loop, EMA and non-finite policy.

Reading order: ``_layers`` (which layers) → ``_capture`` (per-sample ``a`` and ``d``) →
``_factors`` (``A``, ``G``; one-shot, merge and EMA state) → ``_eigen`` (EK-FAC) → ``_ops``
(products, inverses, diagonals, dense blocks) → ``_files`` (save/load). See ``docs/kfac.md``.

    F = ff.kfac.kfac(loss, params, batches)                  # factors A, G per layer
    E = ff.kfac.ekfac(loss, params, batches, F)              # + exact scaling in F's eigenbasis
    step = ff.kfac.inverse_mvp(E, grads, damping=1e-3)       # natural-gradient direction
    importance = ff.kfac.group_diagonal(F, params, ff.infer_spec(model))

    step = ff.kfac.make_kfac_step(loss, decay=0.95, update_every=10)  # in a loop: refresh every 10th call
    state = step(params, batch, step.init(params, batch))
"""

from ._eigen import EKFAC as EKFAC
from ._eigen import eigendecompose as eigendecompose
from ._eigen import ekfac as ekfac
from ._factors import KFAC as KFAC
from ._factors import KFACState as KFACState
from ._factors import KFACStep as KFACStep
from ._factors import estimate as estimate
from ._factors import kfac as kfac
from ._factors import make_kfac_step as make_kfac_step
from ._factors import merge as merge
from ._files import load as load
from ._files import save as save
from ._layers import Layer as Layer
from ._ops import dense as dense
from ._ops import diagonal as diagonal
from ._ops import group_diagonal as group_diagonal
from ._ops import inverse_mvp as inverse_mvp
from ._ops import mvp as mvp

__all__ = [
    "EKFAC",
    "KFAC",
    "KFACState",
    "KFACStep",
    "Layer",
    "dense",
    "diagonal",
    "eigendecompose",
    "ekfac",
    "estimate",
    "group_diagonal",
    "inverse_mvp",
    "kfac",
    "load",
    "make_kfac_step",
    "merge",
    "mvp",
    "save",
]
