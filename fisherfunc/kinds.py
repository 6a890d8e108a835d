"""Fisher kinds: which targets ``y`` the squared per-sample gradients are taken at.

Every kind computes the same token-normalised group Fisher ``Σ_b F_b / Σ_b n_b``; they differ in
the targets of the per-sample loss ``L_b(θ; y)`` whose gradient ``g(y) = ∇_θ L_b(θ; y)`` is squared:

* ``"empirical"``: the dataset's labels, ``F_b = g(y_b) ⊙ g(y_b)``. Cheap (one backward pass),
  but it is *not* the Fisher: far from a minimum, or on mislabeled data, it can be off by orders
  of magnitude either way (Kunstner, Balles & Hennig 2019).
* ``"mc"``: labels drawn from the model's own predictive distribution, ``y_j ~ p_θ(y | x_b)``,
  ``k = mc_samples`` draws per example::

      F_b = (1/k) Σ_j g(y_j) ⊙ g(y_j)            (squares of each draw, never (Σ_j g(y_j))²)

  ``E[F_b]`` is the true Fisher: an unbiased estimate for any ``k``.
* ``"exact"``: the expectation itself, enumerated. For one label per example::

      F_b = Σ_c p_θ(c | x_b) · g(c) ⊙ g(c)

  For token classification, with ``ℓ_t(c)`` the loss of position ``t`` alone and ``m_t`` its mask,
  ``L_b(y) = Σ_t m_t ℓ_t(y_t)`` and ``s_t(c) = ∇_θ ℓ_t(c)``::

      E_y[∇L_b ⊙ ∇L_b] = Σ_t Σ_t' m_t m_t' E[s_t(y_t) ⊙ s_t'(y_t')]
                       = Σ_t m_t Σ_c p_tc · s_t(c) ⊙ s_t(c)

  because the model's targets are conditionally independent given ``x`` (each position has its
  own softmax, and the inputs do not contain the targets), so for ``t ≠ t'`` the expectation
  factorises into ``E[s_t] ⊙ E[s_t']``, and the score has mean zero:
  ``E_{y_t}[s_t(y_t)] = −Σ_c p_tc ∇_θ log p_tc = −∇_θ Σ_c p_tc = −∇_θ 1 = 0``; the diagonal
  terms keep ``m_t² = m_t``. A causal LM's ``"mc"`` draws every target ``y_{t+1}`` from the model
  at the data's prefix ``x_≤t`` (teacher forcing), which is the same structure: unbiased for
  ``Σ_t m_t Σ_v p(v | x_≤t) · s_t(v)²``.
  For a Gaussian likelihood ``y = f + σ ε`` (:func:`~fisherfunc.losses.regression`),
  ``g(y) = −Jᵀ ε / σ`` and ``E[ε εᵀ] = I = Σ_k e_k e_kᵀ``, so ``F_b = Σ_k g(f + σ e_k)²
  = Σ_k (∂f_k/∂θ)² / σ²``: one "class" per output.

How it is computed (one forward, several backward passes, all inside ``vmap``): per sample, the
prediction ``f`` and its pullback come from one ``torch.func.vjp``; each *label set* ``y_j`` (a
draw, a class, a (position, class) pair) gives the prediction-space cotangent
``∂L_b(y_j)/∂f`` (the loss's own ``nll`` differentiated, so padding and ``ignore_index`` are
respected exactly as in the empirical loss); an inner ``vmap`` over label sets pulls every
cotangent back and reduces its square to groups at once; the weighted sum over sets leaves the
per-sample function. Per-sample gradient memory is ``chunk_size × J × |θ|`` on the direct path
(``J`` label sets per sample; the probe path keeps only layer-output gradients for the layers it
covers), so lower ``chunk_size`` for large ``J``.

Costs per sample, beyond the shared forward: ``"mc"``: ``k`` backward passes (plus sampling,
``O(T · C)`` per draw); ``"exact"``: ``C`` backward passes for one label per example, ``T · C``
for token classification (one per position and class), ``K`` for a Gaussian with ``K`` outputs.
More than ``max_classes`` classes (or outputs) is refused, suggesting ``"mc"``. A causal LM has no
``"exact"`` kind (see :func:`resolve_kind`).

Randomness is explicit: ``"mc"`` needs a ``torch.Generator`` or an integer seed. All the draws of
a batch are made up front, in sample order (``[B, k, *target_shape]`` uniforms, or standard
normals for a Gaussian, in float64 on the generator's device), and sliced with the batch: so
every sample's labels, and hence the result, do not depend on ``chunk_size`` (up to the rounding
of batched kernels and of adding chunk sums), and the same seed gives the same result bitwise.
A categorical label is drawn by inverting the CDF of the detached probabilities,
``y = #{c : P_c ≤ u · P_{C−1}}`` with ``P = cumsum(p)`` and ``u ~ U[0, 1)``, so
``Pr(y = c) = p_c``; no second model and no second forward are needed.

When to use which: ``"exact"`` whenever the classes (or outputs) are few — no variance, the
quantity EWC, Laplace approximations and Fisher merging call for; ``"mc"`` when they are many
(language models), its variance falling as ``1 / (k · samples)``; ``"empirical"`` for gradient
magnitudes on the data's own labels, or as a cheap proxy near a minimum of a model that fits well.

>>> import torch, fisherfunc as ff
>>> model = torch.nn.Linear(3, 4)
>>> loss, params = ff.losses.classification(model), dict(model.named_parameters())
>>> batch = (torch.randn(8, 3), torch.randint(0, 4, (8,)))
>>> exact = ff.fisher(loss, params, batch, kind="exact")
>>> mc = ff.fisher(loss, params, batch, kind="mc", mc_samples=4, seed=0)
>>> exact["weight"].shape == mc["weight"].shape
True
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from .losses import ModelLoss

__all__ = [
    "FisherKind",
    "LabelSets",
    "DEFAULT_MAX_CLASSES",
    "check_kind",
    "resolve_kind",
    "step_generator",
    "sample_categorical",
]

#: The default largest number of classes (or Gaussian outputs) ``"exact"`` enumerates.
DEFAULT_MAX_CLASSES = 1024


class FisherKind(str, enum.Enum):
    """Which targets the squared gradients are taken at (see :mod:`fisherfunc.kinds`).

    Attributes:
        EMPIRICAL: the dataset's labels (the default; cheap, not the Fisher).
        MC: labels sampled from the model, ``mc_samples`` draws per example (unbiased).
        EXACT: the expectation over the model's classes (classification, token classification,
            Gaussian regression; ``C`` backward passes per target position).
    """

    EMPIRICAL = "empirical"
    MC = "mc"
    EXACT = "exact"


def check_kind(kind: FisherKind | str) -> FisherKind:
    """Validate a Fisher kind: a :class:`FisherKind` or its value (``"empirical"``, ``"mc"``, ``"exact"``)."""
    try:
        return FisherKind(kind)
    except ValueError:
        values = ", ".join(repr(k.value) for k in FisherKind)
        raise ValueError(f"kind must be one of {values}, got {kind!r}") from None


def sample_categorical(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draws from categorical distributions.

    ``y = #{c : P_c ≤ u · P_{C−1}}`` with ``P = cumsum(probs)``: ``y = c`` exactly when
    ``u · P_{C−1} ∈ [P_{c−1}, P_c)``, so ``Pr(y = c) = p_c`` for ``u ~ U[0, 1)`` and a class of
    probability zero is never drawn. Scaling by the last CDF value absorbs rounding of ``Σ_c p_c``.

    Args:
        probs: ``[P, C]`` class probabilities of ``P`` positions.
        u: ``[k, P]`` uniforms in ``[0, 1)``.

    Returns:
        ``[k, P]`` class indices (int64).
    """
    cdf = probs.cumsum(-1)  # [P, C]
    passed = cdf <= (u.unsqueeze(-1) * cdf[:, -1:])  # [k, P, C]
    return passed.sum(-1).clamp_max(probs.shape[-1] - 1)


@dataclasses.dataclass(frozen=True, eq=False)
class LabelSets:
    """The label sets of the ``"mc"`` and ``"exact"`` kinds, and their weighted squared gradients.

    Built by :func:`resolve_kind`. Each sample gets ``J`` label sets ``y_j`` with weights
    ``w_j`` (``1/k`` for ``k`` draws; the probabilities for ``"exact"``) and
    ``F_b = Σ_j w_j · rule.reduce(g(y_j) ⊙ g(y_j))``.

    Attributes:
        kind: ``FisherKind.MC`` or ``FisherKind.EXACT``.
        loss: the per-sample loss; its ``distribution``, ``nll``, ``ignore_index``, ``shift`` and
            ``variance`` define the label sets.
        mc_samples: draws per example ``k`` (``"mc"``).
        max_classes: the most classes (or Gaussian outputs) ``"exact"`` enumerates.
    """

    kind: FisherKind
    loss: ModelLoss
    mc_samples: int = 1
    max_classes: int = DEFAULT_MAX_CLASSES

    def draw(self, batch: Any, generator: torch.Generator | None) -> Tensor:
        """All the randomness of a batch, drawn up front in sample order.

        Args:
            batch: one batch (leading dimension ``B``).
            generator: the generator to draw from (unused for ``"exact"``).

        Returns:
            ``[B, k, *target_shape]`` float64: uniforms (categorical) or standard normals
            (Gaussian) for ``"mc"``; an empty ``[B, 0]`` for ``"exact"``.
        """
        targets = self.loss.targets_of(batch)
        assert targets is not None
        if self.kind is FisherKind.EXACT:
            return torch.empty(targets.shape[0], 0, dtype=torch.float64, device=targets.device)
        assert generator is not None
        shape = (targets.shape[0], self.mc_samples, *targets.shape[1:])
        draw = torch.rand if self.loss.distribution == "categorical" else torch.randn
        return draw(shape, generator=generator, dtype=torch.float64, device=generator.device).to(targets.device)

    def sets(self, pred: Tensor, targets: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """One sample's label sets and weights (runs inside ``vmap``).

        Args:
            pred: the detached prediction, e.g. logits ``[C]`` or ``[T, C]``, or Gaussian means.
            targets: the sample's dataset targets (their ignored positions stay ignored).
            noise: the sample's slice of :meth:`draw`.

        Returns:
            ``(labels [J, *target_shape], weights [J])``.
        """
        if self.loss.distribution == "gaussian":
            return self._gaussian(pred, noise)
        return self._categorical(pred, targets, noise)

    def _categorical(self, logits: Tensor, targets: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        num_classes = logits.shape[-1]
        if self.kind is FisherKind.EXACT and num_classes > self.max_classes:
            raise ValueError(
                f"kind='exact' would enumerate {num_classes} classes (one backward pass each, per target "
                f"position), more than max_classes={self.max_classes}; use kind='mc' (mc_samples=k costs k "
                "backward passes), or raise max_classes"
            )
        positions = targets.numel()
        z = logits.reshape(-1, num_classes)
        if z.shape[0] != positions:
            raise ValueError(
                f"cannot align the prediction {tuple(logits.shape)} with the targets {tuple(targets.shape)}: "
                f"expected {positions} rows of {num_classes} logits"
            )
        if self.loss.shift:  # row p holds the logits that predict target p (position p − shift)
            z = z.roll(self.loss.shift, 0)
        probs = torch.softmax(z, -1)  # [P, C]
        y0 = targets.reshape(positions)
        valid = y0 != self.loss.ignore_index
        if self.kind is FisherKind.MC:
            k = self.mc_samples
            drawn = sample_categorical(probs, noise.reshape(k, positions).to(probs.dtype))  # [k, P]
            labels = torch.where(valid, drawn, y0)
            return labels.reshape(k, *targets.shape), torch.full((k,), 1.0 / k, dtype=probs.dtype, device=z.device)
        # exact: set (p, c) labels position p with class c and ignores every other position;
        # its weight is p_pc, so Σ_j w_j g_j² = Σ_p Σ_c p_pc s_p(c)².
        pos = torch.arange(positions, device=z.device)
        classes = torch.arange(num_classes, device=z.device, dtype=y0.dtype)
        at = (pos.reshape(-1, 1, 1) == pos.reshape(1, 1, -1)) & valid.reshape(-1, 1, 1)  # [P, 1, P]
        labels = torch.where(at, classes.reshape(1, -1, 1), self.loss.ignore_index)  # [P, C, P]
        return labels.reshape(positions * num_classes, *targets.shape), probs.reshape(-1)

    def _gaussian(self, mean: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        sigma = math.sqrt(self.loss.variance)
        outputs = mean.numel()
        if self.kind is FisherKind.MC:
            k = self.mc_samples
            eps = noise.reshape(k, *mean.shape).to(mean.dtype)
            return mean + sigma * eps, torch.full((k,), 1.0 / k, dtype=mean.dtype, device=mean.device)
        if outputs > self.max_classes:
            raise ValueError(
                f"kind='exact' would enumerate {outputs} Gaussian outputs (one backward pass each), more "
                f"than max_classes={self.max_classes}; use kind='mc', or raise max_classes"
            )
        unit = torch.eye(outputs, dtype=mean.dtype, device=mean.device).reshape(outputs, *mean.shape)
        return mean + sigma * unit, torch.ones(outputs, dtype=mean.dtype, device=mean.device)

    def expected_squares(
        self,
        predict: Callable[..., tuple[Tensor, Any]],
        primals: tuple[Any, ...],
        reduce: Callable[[tuple[Any, ...], Any], tuple[Tensor, ...]],
        sample: Any,
        noise: Tensor,
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """``F_b = Σ_j w_j · reduce(g(y_j) ⊙ g(y_j))`` and ``n_b`` for one sample (inside ``vmap``).

        Args:
            predict: ``(*primals) -> (prediction, aux)``: the model's prediction for ``sample``.
            primals: what is differentiated (the active params, or params and probes).
            reduce: ``(gradients w.r.t. primals, aux) -> squared gradients summed to groups``.
            sample: one sample (batch dimension removed).
            noise: this sample's slice of :meth:`draw`.

        Returns:
            ``(groups, tokens)``: the weighted group sums, and ``n_b`` of the dataset targets.
        """
        pred, pullback, aux = vjp(predict, *primals, has_aux=True)
        fixed = pred.detach()
        targets, mask = self.loss.targets_of(sample), self.loss.mask_of(sample)
        labels, weights = self.sets(fixed, targets, noise)

        def one(y: Tensor, w: Tensor) -> tuple[Tensor, ...]:
            # the prediction-space cotangent ∂L_b(y)/∂f, pulled back to the primals
            cotangent = grad(lambda f: self.loss.nll(f, y, mask)[0])(fixed)
            return tuple(w * s for s in reduce(pullback(cotangent), aux))

        per_set = vmap(one)(labels, weights)  # each [J, *group_shape]
        _, tokens = self.loss.nll(fixed, targets, mask)
        return tuple(s.sum(0) for s in per_set), torch.as_tensor(tokens, dtype=fixed.dtype)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def resolve_kind(
    loss: Any,
    kind: FisherKind | str,
    *,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    max_classes: int = DEFAULT_MAX_CLASSES,
) -> tuple[LabelSets | None, torch.Generator | None]:
    """Validate a Fisher kind and its options, before any model call.

    ``"mc"`` requires explicit randomness — a ``generator`` (advanced by each call) or a ``seed``
    (a fresh CPU generator per call, so the same call gives the same result) — rather than a
    hidden default seed, which would silently give every call the same draws.

    Args:
        loss: the per-sample loss; ``"mc"`` and ``"exact"`` need a :class:`~fisherfunc.losses.ModelLoss`
            that knows its output distribution.
        kind: ``"empirical"``, ``"mc"`` or ``"exact"`` (or a :class:`FisherKind`).
        mc_samples: draws per example for ``"mc"`` (a positive int; only ``"mc"`` takes one).
        generator: the ``torch.Generator`` ``"mc"`` draws from.
        seed: an int seed for ``"mc"`` instead of a generator.
        max_classes: the most classes (or Gaussian outputs) ``"exact"`` may enumerate.

    Returns:
        ``(label_sets, generator)``: ``(None, None)`` for ``"empirical"`` (the dataset labels).

    Raises:
        ValueError: for an unknown kind or bad option, randomness given to a kind that draws none,
            ``"mc"`` without randomness, a loss without a known distribution, or ``"exact"`` for a
            causal LM.
    """
    kind = check_kind(kind)
    mc_samples = _positive_int(mc_samples, "mc_samples")
    max_classes = _positive_int(max_classes, "max_classes")
    if kind is not FisherKind.MC:
        if mc_samples != 1:
            raise ValueError(
                f"mc_samples only applies to kind='mc', got mc_samples={mc_samples} with kind={kind.value!r}"
            )
        if generator is not None or seed is not None:
            raise ValueError(f"generator= and seed= only apply to kind='mc'; kind={kind.value!r} draws nothing")
    else:
        if generator is None and seed is None:
            raise ValueError(
                "kind='mc' draws labels at random: pass seed=<int> or generator=torch.Generator() so the result "
                "is reproducible"
            )
        if generator is not None and seed is not None:
            raise ValueError("pass either generator= or seed= for kind='mc', not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed must be an int, got {type(seed).__name__}")
            generator = torch.Generator().manual_seed(seed)
    if kind is FisherKind.EMPIRICAL:
        return None, None
    distribution = getattr(loss, "distribution", None)
    if not isinstance(loss, ModelLoss) or distribution not in ("categorical", "gaussian"):
        what = (
            "a plain callable"
            if not isinstance(loss, ModelLoss)
            else "a loss with no known output distribution (fisherfunc.losses.custom)"
        )
        raise ValueError(
            f"kind={kind.value!r} takes targets from the model's output distribution, but the loss is {what}; "
            "use fisherfunc.losses.classification, token_classification, causal_lm or regression, or "
            "kind='empirical'"
        )
    if kind is FisherKind.EXACT and loss.shift:
        raise ValueError(
            "kind='exact' is not available for a causal LM: its targets are its own inputs shifted by one, "
            "so the model's distribution is over whole sequences (V^T of them), and even the teacher-forced "
            "per-position sum Σ_t Σ_v p(v | x_≤t) g² needs T·V backward passes per sequence (V = vocabulary "
            "size). Use kind='mc': it samples each target from the model at the data's prefix, k backward "
            "passes for mc_samples=k"
        )
    return LabelSets(kind=kind, loss=loss, mc_samples=mc_samples, max_classes=max_classes), generator


_MASK64 = (1 << 64) - 1


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for step ``step`` of a seeded ``fisher_step``: pure, and new draws each step.

    The seed of step ``t`` is the SplitMix64 hash of ``seed + (t + 1) · φ + s · ψ`` (``φ`` the 64-bit
    golden ratio, ``ψ`` another odd 64-bit constant, ``s`` the stream), so consecutive steps, and
    the processes of a data-parallel step (one stream each), get unrelated draws, and a step is
    reproducible alone.

    Args:
        seed: the step function's seed.
        step: the state's step count ``t``.
        stream: the stream ``s``, e.g. the process's rank (``0``: a single process).
    """
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return torch.Generator().manual_seed(z ^ (z >> 31))
