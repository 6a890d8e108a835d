"""K-FAC / EK-FAC agree with the peers where they compute the same quantity (float64, tiny models).

Peers: curvlinops (``KFACLinearOperator``, ``EKFACLinearOperator``) and nngeometry (``PMatKFAC``,
``PMatEKFAC``). Every comparison is of dense per-layer blocks in the parameter order
``[weight.reshape(-1), bias]`` — :func:`fisherfunc.kfac.dense`'s order, and the order both peers
use when weight and bias are treated jointly (curvlinops ``separate_weight_and_bias=False``,
nngeometry ``to_torch(split_weight_bias=True)``).

The conventions that have to be matched, per peer (``N`` samples, ``T`` positions, all valid):

* fisherfunc: ``A = Σ ã ãᵀ / positions`` and ``G = Σ d dᵀ / Σ tokens`` with ``d = ∂L_b/∂y`` of the
  **summed** per-sample loss, so ``G ⊗ A`` is the token-normalised Fisher's K-FAC.
* curvlinops: ``A`` is the same average (``N·T`` positions for expand, ``N`` for reduce). ``G`` is
  built from the gradients of the *batch* loss and rescaled by its ``reduction``: ``"mean"``
  turns them back into per-sample-sum gradients and divides by ``N·T`` — identical to ours;
  ``"sum"`` does not normalise at all, so it is ours times ``N·T``. ``MSELoss`` is ``Σ (f − y)²``
  (no ½), i.e. ``regression(variance=0.5)``; with ``"mean"`` curvlinops additionally divides
  ``G`` by the output dimension ``C``. ``fisher_type="type-2"`` backpropagates the columns of a
  square root of the loss Hessian: the exact Fisher (``kind="exact"``) for one prediction per
  sample, and for sequences where each layer output reaches only its own position's loss. Otherwise
  (reduce, or attention's key/value projections) curvlinops mixes different positions' square roots
  and is not ``E_y[g gᵀ]``; its own ``fisher_type="mc"`` converges to ours (the two ``type2`` tests).
* nngeometry: ``A = Σ ã ãᵀ / N · √K`` and ``G = Σ_k Σ g gᵀ / (N √K)`` over the ``K`` outputs of its
  ``function`` (1 for a per-sample loss, giving the empirical Fisher; ``C − 1`` for
  ``FIM(variant="classif_logits")``, a Cholesky factor of ``diag(p) − p pᵀ``: the exact Fisher);
  the ``√K`` cancels in ``G ⊗ A``, which is what we compare. Its linear layers take 2-D inputs
  only, so it has no sequence case.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc.testing import cases

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10  # float64, same arithmetic up to summation order


class _ChannelsSecond(nn.Module):
    """``[B, T, C] -> [B, C, T]``: the logits layout ``nn.CrossEntropyLoss`` (hence curvlinops) wants."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


MLP = {"features": 6, "hidden": (5, 4)}  # Linear(6, 5) → Tanh → Linear(5, 4) → Tanh → Linear(4, 3)


def _classification(seed: int = 0, batch: int = 16) -> tuple[nn.Sequential, tuple[Tensor, Tensor]]:
    case = cases.case("mlp", **MLP, classes=3, batch=batch, seed=seed)
    return case.model, case.batch


def _sequence(seed: int = 0, batch: int = 8, positions: int = 5) -> tuple[nn.Sequential, tuple[Tensor, Tensor]]:
    """The same MLP applied to every position of ``[B, T, 6]`` inputs, one label per position (all valid)."""
    case = cases.case("mlp", **MLP, classes=3, batch=batch, positions=positions, seed=seed)
    return case.model, case.batch


def _regression(variance: float) -> tuple[nn.Sequential, ff.losses.ModelLoss, tuple[Tensor, Tensor]]:
    """The same MLP with 3 outputs, ``(x [16, 6], y [16, 3])`` and a Gaussian loss of ``variance``."""
    case = cases.case("regression", **MLP, outputs=3, variance=variance, batch=16, seed=3)
    return case.model, case.loss, case.batch


def _layer_slices(model: nn.Module) -> Iterator[tuple[str, slice]]:
    """``(weight name, slice of [w0, b0, w1, b1, ...] flat)`` for each linear layer, in order."""
    start = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            size = module.weight.numel() + module.bias.numel()
            yield f"{name}.weight", slice(start, start + size)
            start += size


def _assert_blocks(dense: Tensor, ours: ff.kfac.KFAC | ff.kfac.EKFAC, model: nn.Module, scale: float = 1.0) -> None:
    """Each layer's block of the peer's dense matrix, divided by ``scale``, equals ours."""
    names = [x.name for x in ours.layers]
    seen = []
    for name, s in _layer_slices(model):
        expected = ff.kfac.dense(ours, name)
        got = dense[s, s] / scale
        err = float((got - expected).abs().max() / expected.abs().max())
        assert err < TOL, f"{name}: relative error {err:.2e}"
        seen.append(name)
    assert seen == names


def _curvlinops_dense(op, model: nn.Module) -> Tensor:
    n = sum(p.numel() for p in model.parameters())
    return op @ torch.eye(n, dtype=torch.float64)


def _curvlinops(cls_name: str, model, loss_func, batch, **kwargs):
    curvlinops = pytest.importorskip("curvlinops")
    cls = getattr(curvlinops, cls_name)
    kwargs.setdefault("separate_weight_and_bias", False)
    return cls(model, loss_func, list(model.parameters()), [batch], check_deterministic=False, **kwargs)


# --- curvlinops ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reduction", "scale"), [("mean", 1.0), ("sum", 16.0)])
def test_curvlinops_kfac_empirical(reduction: str, scale: float) -> None:
    """Empirical K-FAC of a classifier: ``reduction="mean"`` is ours, ``"sum"`` is ours × N (= 16)."""
    model, batch = _classification()
    ours = ff.kfac.kfac(ff.losses.classification(model), dict(model.named_parameters()), batch)
    op = _curvlinops(
        "KFACLinearOperator", model, nn.CrossEntropyLoss(reduction=reduction), batch, fisher_type="empirical"
    )
    _assert_blocks(_curvlinops_dense(op, model), ours, model, scale)


def test_curvlinops_kfac_type2_is_exact() -> None:
    """curvlinops' type-2 Fisher (columns of √H of the loss) is fisherfunc's ``kind="exact"``.

    For cross-entropy ``H = diag(p) − p pᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ``, so backpropagating the
    columns of a square root gives the same ``Σ_b J_bᵀ H_b J_b`` at every layer output as the
    enumeration over classes weighted by ``p_c``.
    """
    model, batch = _classification()
    ours = ff.kfac.kfac(ff.losses.classification(model), dict(model.named_parameters()), batch, kind="exact")
    op = _curvlinops("KFACLinearOperator", model, nn.CrossEntropyLoss(), batch, fisher_type="type-2")
    _assert_blocks(_curvlinops_dense(op, model), ours, model)


def test_curvlinops_kfac_separate_weight_and_bias() -> None:
    """``separate_weight_and_bias=True`` is our joint block with the weight–bias coupling dropped.

    curvlinops then uses ``G ⊗ A_x`` for the weight (``A_x = Σ x xᵀ / N``, our ``A`` without its
    bias row and column) and ``G`` for the bias (our ``A[-1, -1] = 1``), and zero between them.
    """
    model, batch = _classification()
    ours = ff.kfac.kfac(ff.losses.classification(model), dict(model.named_parameters()), batch)
    op = _curvlinops(
        "KFACLinearOperator",
        model,
        nn.CrossEntropyLoss(),
        batch,
        fisher_type="empirical",
        separate_weight_and_bias=True,
    )
    dense = _curvlinops_dense(op, model)
    for name, s in _layer_slices(model):
        joint = ff.kfac.dense(ours, name)
        out, width = ours.G[name].shape[0], ours.A[name].shape[0] - 1
        w = out * width
        expected = joint.clone()
        expected[:w, w:] = 0
        expected[w:, :w] = 0
        err = float((dense[s, s] - expected).abs().max() / expected.abs().max())
        assert err < TOL, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_curvlinops_ekfac(kind: str) -> None:
    """EK-FAC: same eigenbasis (eigenvectors of the same ``A``, ``G``), same exact second moments."""
    model, batch = _classification()
    ours = ff.kfac.ekfac(ff.losses.classification(model), dict(model.named_parameters()), batch, kind=kind)
    fisher_type = {"empirical": "empirical", "exact": "type-2"}[kind]
    op = _curvlinops("EKFACLinearOperator", model, nn.CrossEntropyLoss(), batch, fisher_type=fisher_type)
    _assert_blocks(_curvlinops_dense(op, model), ours, model)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_curvlinops_kfac_sequence_empirical(approx: str) -> None:
    """A per-position MLP on ``[B, T, d]``: expand and reduce both agree (``N·T`` tokens, all valid).

    curvlinops reads the logits as ``[B, C, T]`` (``nn.CrossEntropyLoss``'s layout), so its model is
    ours followed by a transpose; the parameters are the same tensors. Padding would differ:
    curvlinops normalises by ``N·T`` whatever ``ignore_index`` drops, we by the valid tokens.
    """
    model, batch = _sequence()
    ours = ff.kfac.kfac(ff.losses.token_classification(model), dict(model.named_parameters()), batch, approx=approx)
    peer_model = nn.Sequential(model, _ChannelsSecond())
    op = _curvlinops(
        "KFACLinearOperator", peer_model, nn.CrossEntropyLoss(), batch, fisher_type="empirical", kfac_approx=approx
    )
    _assert_blocks(_curvlinops_dense(op, model), ours, model)


def test_curvlinops_kfac_sequence_type2_expand() -> None:
    """Type-2 expand on a per-position MLP is our exact kind (no position reaches another's output)."""
    model, batch = _sequence()
    ours = ff.kfac.kfac(ff.losses.token_classification(model), dict(model.named_parameters()), batch, kind="exact")
    peer_model = nn.Sequential(model, _ChannelsSecond())
    op = _curvlinops("KFACLinearOperator", peer_model, nn.CrossEntropyLoss(), batch, fisher_type="type-2")
    _assert_blocks(_curvlinops_dense(op, model), ours, model)


def test_curvlinops_type2_reduce_is_not_the_expected_fisher() -> None:
    """For sequences, curvlinops' type-2 *reduce* ``G`` is not ``E_y[d̄ d̄ᵀ]``; ours (``kind="exact"``) is.

    curvlinops backpropagates column ``c`` of every position's ``√H_t`` in one pass, so the pooled
    gradient is ``ḡ_c = Σ_t J_tᵀ S_tc`` and ``Σ_c ḡ_c ḡ_cᵀ`` carries cross terms
    ``J_tᵀ S_t S_t'ᵀ J_t'`` (``t ≠ t'``). The expectation over the model's labels has none:
    ``E[d_t d_t'ᵀ] = E[d_t] E[d_t']ᵀ = 0`` (scores have mean zero, positions are independent given
    ``x``), which our enumeration over (position, class) respects. curvlinops' own Monte-Carlo
    reduce ``G`` (many samples) converges to ours, not to its type-2 one. ``A`` is unaffected.
    """
    model, batch = _sequence()
    ours = ff.kfac.kfac(
        ff.losses.token_classification(model), dict(model.named_parameters()), batch, approx="reduce", kind="exact"
    )
    peer_model = nn.Sequential(model, _ChannelsSecond())
    common = {"kfac_approx": "reduce"}
    type2 = _curvlinops("KFACLinearOperator", peer_model, nn.CrossEntropyLoss(), batch, fisher_type="type-2", **common)
    mc = _curvlinops(
        "KFACLinearOperator",
        peer_model,
        nn.CrossEntropyLoss(),
        batch,
        fisher_type="mc",
        mc_samples=1000,
        seed=0,
        **common,
    )
    dense_type2, dense_mc = _curvlinops_dense(type2, model), _curvlinops_dense(mc, model)
    for name, s in _layer_slices(model):
        # A is the same in all three (checked by the expand/reduce tests), so the relative
        # Frobenius error of the G ⊗ A blocks is that of G.
        ours_block = ff.kfac.dense(ours, name)

        def rel(peer: Tensor, s: slice = s, ours_block: Tensor = ours_block) -> float:
            return float((peer[s, s] - ours_block).norm() / ours_block.norm())

        assert rel(dense_mc) < 0.1, name  # 1000 draws × 40 positions: ~2 % noise
        assert rel(dense_type2) > 1.0, name  # the cross terms: ≈ (T − 1) = 4 times G here


def test_curvlinops_type2_expand_with_attention_is_not_the_expected_fisher() -> None:
    """The same cross terms hit type-2 *expand* where a layer's output reaches several positions' losses.

    The key and value projections' output at position ``t`` feeds the logits of every ``t' ≥ t``,
    so curvlinops' ``g_tc = Σ_t' J_{t'←t}ᵀ S_t'c`` mixes the square roots of different positions;
    the query projection and the head reach only their own position, and there it agrees with
    ours exactly. Its Monte-Carlo ``G`` converges to ours for every layer.
    """
    # one causal single-head attention (nn.Linear q/k/v) and a linear head, per sequence
    case = cases.case("causal_attention", batch=8, seq_len=5, dim=4, classes=3)
    model, batch = case.model, case.batch
    ours = ff.kfac.kfac(case.loss, case.params, batch, kind="exact")
    peer_model = nn.Sequential(model, _ChannelsSecond())
    type2 = _curvlinops("KFACLinearOperator", peer_model, nn.CrossEntropyLoss(), batch, fisher_type="type-2")
    mc = _curvlinops(
        "KFACLinearOperator", peer_model, nn.CrossEntropyLoss(), batch, fisher_type="mc", mc_samples=1000, seed=0
    )
    dense_type2, dense_mc = _curvlinops_dense(type2, model), _curvlinops_dense(mc, model)
    for name, s in _layer_slices(model):
        ours_block = ff.kfac.dense(ours, name)

        def rel(peer: Tensor, s: slice = s, ours_block: Tensor = ours_block) -> float:
            return float((peer[s, s] - ours_block).norm() / ours_block.norm())

        assert rel(dense_mc) < 0.1, name
        if name in ("k.weight", "v.weight"):
            assert rel(dense_type2) > 0.2, name
        else:
            assert rel(dense_type2) < TOL, name


@pytest.mark.parametrize("kind", ["empirical", "exact"])
@pytest.mark.parametrize(("reduction", "scale"), [("sum", 16.0), ("mean", 1 / 3)])
def test_curvlinops_kfac_mse(kind: str, reduction: str, scale: float) -> None:
    """``MSELoss`` is ``Σ (f − y)²`` = our ``regression(variance=0.5)`` (``Σ (f − y)² / (2σ²)``).

    ``"sum"``: curvlinops is ours × N (16). ``"mean"``: curvlinops rescales the averaged loss by
    ``√C`` before squaring, leaving ours / C (C = 3 outputs) — for both kinds, since type-2 uses
    the Hessian ``2I/C`` of the mean loss and the matching correction.
    """
    model, loss, batch = _regression(0.5)
    ours = ff.kfac.kfac(loss, dict(model.named_parameters()), batch, kind=kind)
    fisher_type = {"empirical": "empirical", "exact": "type-2"}[kind]
    op = _curvlinops("KFACLinearOperator", model, nn.MSELoss(reduction=reduction), batch, fisher_type=fisher_type)
    _assert_blocks(_curvlinops_dense(op, model), ours, model, scale)


# --- nngeometry ------------------------------------------------------------------------------------


class _DefaultDtype:
    """``torch.set_default_dtype`` for a block, restored after.

    nngeometry allocates ``PMatKFAC.to_torch``'s output and ``FIM``'s triangular helper with the
    default dtype, so in float32 they silently round (``to_torch``) or fail on a float64 model.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __enter__(self) -> None:
        self.before = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.before)


def _nngeometry_dense(matrix) -> Tensor:
    with _DefaultDtype(torch.float64):
        return matrix.to_torch(split_weight_bias=True)


def _loader(batch):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(*batch), batch_size=batch[0].shape[0])


def test_nngeometry_empirical() -> None:
    """``function`` = per-sample losses (one output) makes nngeometry's K-FAC/EK-FAC the empirical ones."""
    pytest.importorskip("nngeometry")
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.layercollection import LayerCollection
    from nngeometry.object import PMatEKFAC, PMatKFAC

    model, batch = _classification()
    loss, params = ff.losses.classification(model), dict(model.named_parameters())
    generator = TorchHooksJacobianBackend(
        model,
        function=lambda x, y: F.cross_entropy(model(x), y, reduction="none"),
        layer_collection=LayerCollection.from_model(model),
    )
    kfac = PMatKFAC(generator=generator, examples=_loader(batch))
    _assert_blocks(_nngeometry_dense(kfac), ff.kfac.kfac(loss, params, batch), model)
    ekfac = PMatEKFAC(generator=generator, examples=_loader(batch))
    ekfac.update_diag(_loader(batch))  # the scaling in the eigenbasis; before this it is K-FAC's
    _assert_blocks(_nngeometry_dense(ekfac), ff.kfac.ekfac(loss, params, batch), model)


def test_nngeometry_exact_classification() -> None:
    """``FIM(variant="classif_logits")`` (closed-form expectation) is our ``kind="exact"``."""
    pytest.importorskip("nngeometry")
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatEKFAC, PMatKFAC

    model, batch = _classification()
    loss, params = ff.losses.classification(model), dict(model.named_parameters())
    with _DefaultDtype(torch.float64):
        kfac = FIM(model, _loader(batch), PMatKFAC, variant="classif_logits")
        ekfac = FIM(model, _loader(batch), PMatEKFAC, variant="classif_logits")
        ekfac.update_diag(_loader(batch))
    _assert_blocks(_nngeometry_dense(kfac), ff.kfac.kfac(loss, params, batch, kind="exact"), model)
    _assert_blocks(_nngeometry_dense(ekfac), ff.kfac.ekfac(loss, params, batch, kind="exact"), model)


def test_nngeometry_exact_regression() -> None:
    """``FIM(variant="regression")`` is the unit-variance Gaussian: our ``regression(variance=1)``, exact."""
    pytest.importorskip("nngeometry")
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatKFAC

    model, loss, batch = _regression(1.0)
    with _DefaultDtype(torch.float64):
        kfac = FIM(model, _loader(batch), PMatKFAC, variant="regression")
    ours = ff.kfac.kfac(loss, dict(model.named_parameters()), batch, kind="exact")
    _assert_blocks(_nngeometry_dense(kfac), ours, model)
