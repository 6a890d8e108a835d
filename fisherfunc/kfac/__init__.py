"""Kronecker-factored Fisher: K-FAC and eigenvalue-corrected EK-FAC, from output probes (hook-free).

Diagonal and group Fisher (:func:`fisherfunc.fisher`) ignore correlations inside a layer;
K-FAC keeps the dominant ones as ``F_layer ≈ G ⊗ A`` (Martens & Grosse 2015), EK-FAC replaces
K-FAC's eigenvalues by the exact second moments in its eigenbasis (George et al. 2018). Both
cover linear-like layers (``F.linear``, GPT-2 ``Conv1D`` via ``torch.addmm``) and get each
layer's inputs and output gradients from the same zero probes as the group-Fisher fast path.

Reading order: :mod:`~fisherfunc.kfac.layers` (which layers, and how ``a``/``d`` are had) →
:mod:`~fisherfunc.kfac.capture` (per-sample capture, chunk by chunk) →
:mod:`~fisherfunc.kfac.factors` (``A``, ``G``; one-shot, merge and EMA state) →
:mod:`~fisherfunc.kfac.eigen` (EK-FAC) → :mod:`~fisherfunc.kfac.ops` (products, inverses,
diagonals, dense blocks) → :mod:`~fisherfunc.kfac.io` (save/load). See ``docs/kfac.md``.

    F = ff.kfac.kfac(loss, params, batches)                  # factors A, G per layer
    E = ff.kfac.ekfac(loss, params, batches, F)              # + exact scaling in F's eigenbasis
    step = ff.kfac.inverse_mvp(E, grads, damping=1e-3)       # natural-gradient direction
    importance = ff.kfac.group_diagonal(F, params, ff.infer_spec(model))
"""

from .eigen import EKFAC as EKFAC
from .eigen import eigendecompose as eigendecompose
from .eigen import ekfac as ekfac
from .factors import KFAC as KFAC
from .factors import KFACState as KFACState
from .factors import KFACStep as KFACStep
from .factors import estimate as estimate
from .factors import kfac as kfac
from .factors import make_kfac_step as make_kfac_step
from .factors import merge as merge
from .io import load as load
from .io import save as save
from .layers import Layer as Layer
from .ops import dense as dense
from .ops import diagonal as diagonal
from .ops import group_diagonal as group_diagonal
from .ops import inverse_mvp as inverse_mvp
from .ops import mvp as mvp

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
