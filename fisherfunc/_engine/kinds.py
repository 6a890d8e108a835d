"""Fisher kinds: which targets ``y`` the squared per-sample gradients are taken at.

Every kind computes the same token-normalised group Fisher ``Σ_b F_b / Σ_b n_b``; they differ in
the targets of the per-sample loss ``L_b(θ; y)`` whose gradient ``g(y) = ∇_θ L_b(θ; y)`` is squared:

* ``"empirical"``: the dataset's labels, ``F_b = g(y_b) ⊙ g(y_b)``. Cheap (one backward pass),
  but it is *not* the Fisher: far from a minimum, or on mislabeled data, it can be off by orders
  of magnitude either way (Kunstner, Balles & Hennig 2019).
* ``"mc"`` (``MC(samples=k, seed=...)``): labels drawn from the model's own predictive
  distribution, ``y_j ~ p_θ(y | x_b)``, ``k`` draws per example::

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
More than ``Exact(max_classes=...)`` classes (or outputs) is refused, suggesting ``MC``. A causal LM
has no ``"exact"`` kind (see :func:`label_sets`).

A kind is one frozen, validated value — ``Empirical()``, ``MC(samples=k, seed=s)`` or
``MC(samples=k, generator=g)``, ``Exact(max_classes=C)`` — checked when it is built; the strings
``"empirical"`` and ``"exact"`` are shorthands for the defaults (``"mc"`` needs its randomness).

Randomness is explicit: ``MC`` needs a ``torch.Generator`` or an integer seed. All the draws of
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
>>> exact = ff.fisher(loss, params, batch, kind=ff.Exact())
>>> mc = ff.fisher(loss, params, batch, kind=ff.MC(samples=4, seed=0))
>>> exact["weight"].shape == mc["weight"].shape
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from ..losses import ModelLoss

__all__ = [
    "FisherKind",
    "Empirical",
    "MC",
    "Exact",
    "KIND_NAMES",
    "as_kind",
    "kind_name",
    "LabelSets",
    "label_sets",
    "step_generator",
    "sample_categorical",
]

_MASK64 = (1 << 64) - 1


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class FisherKind:
    """Which targets the squared gradients are taken at: :class:`Empirical`, :class:`MC` or :class:`Exact`.

    A frozen value, validated when built. ``name`` is what states, accumulators and files record.
    """

    name: ClassVar[str] = ""

    def draws(self, step: int | None = None, stream: int = 0) -> torch.Generator | None:
        """The generator a computation draws labels from (``None`` for kinds that draw nothing).

        Args:
            step: a ``fisher_step``'s state step ``t`` (``None``: a one-shot call).
            stream: an independent stream for the same step (a data-parallel process's rank).
        """
        return None


@dataclasses.dataclass(frozen=True)
class Empirical(FisherKind):
    """The dataset's labels: ``F_b = g(y_b) ⊙ g(y_b)`` (the default; cheap, and not the Fisher)."""

    name: ClassVar[str] = "empirical"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MC(FisherKind):
    """Labels sampled from the model, ``samples`` draws per example: unbiased for the true Fisher.

    Randomness is explicit, exactly one of:

    Attributes:
        samples: draws per example ``k`` (a positive int).
        seed: an int seed. A one-shot call draws from a fresh generator seeded with it (the same
            call gives the same result); a ``fisher_step`` draws step ``t`` from
            :func:`step_generator` ``(seed, t)``, so the step stays a pure function.
        generator: a ``torch.Generator``, advanced by every call.

    >>> MC(samples=4, seed=0)
    MC(samples=4, seed=0, generator=None)
    """

    name: ClassVar[str] = "mc"
    samples: int = 1
    seed: int | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        _positive_int(self.samples, "MC(samples=...)")
        if self.generator is None and self.seed is None:
            raise ValueError(
                "MC draws labels at random: give it seed=<int> or generator=torch.Generator(), e.g. "
                "kind=fisherfunc.MC(samples=4, seed=0), so the result is reproducible"
            )
        if self.generator is not None and self.seed is not None:
            raise ValueError("MC takes either generator= or seed=, not both")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"MC(generator=...) must be a torch.Generator, got {type(self.generator).__name__}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"MC(seed=...) must be an int, got {type(self.seed).__name__}")

    def draws(self, step: int | None = None, stream: int = 0) -> torch.Generator:  # noqa: D102
        if self.generator is not None:
            return self.generator
        assert self.seed is not None
        if step is None:
            return torch.Generator().manual_seed(self.seed)
        return step_generator(self.seed, step, stream)


#: The default largest number of classes (or Gaussian outputs) :class:`Exact` enumerates.
DEFAULT_MAX_CLASSES = 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class Exact(FisherKind):
    """The expectation over the model's classes, enumerated: ``F_b = Σ_c p(c | x_b) g(c) ⊙ g(c)``.

    Attributes:
        max_classes: the most classes (or Gaussian outputs) enumerated; more is refused (one
            backward pass each, per target position), suggesting :class:`MC`.
    """

    name: ClassVar[str] = "exact"
    max_classes: int = DEFAULT_MAX_CLASSES

    def __post_init__(self) -> None:
        _positive_int(self.max_classes, "Exact(max_classes=...)")


#: The names a kind records, e.g. in ``FisherState.kind``.
KIND_NAMES = (Empirical.name, MC.name, Exact.name)


def as_kind(kind: FisherKind | str) -> FisherKind:
    """A kind value from a kind or a shorthand string (``"empirical"``, ``"exact"``).

    Raises:
        ValueError: for an unknown string, or ``"mc"``, which needs its randomness (``MC(seed=...)``).
        TypeError: for anything else.

    >>> as_kind("exact")
    Exact(max_classes=1024)
    """
    if isinstance(kind, FisherKind):
        return kind
    if kind == Empirical.name:
        return Empirical()
    if kind == Exact.name:
        return Exact()
    if kind == MC.name:
        raise ValueError(
            "kind='mc' draws labels at random: pass kind=fisherfunc.MC(samples=k, seed=<int>) (or "
            "generator=torch.Generator()) so the result is reproducible"
        )
    if isinstance(kind, str):
        raise ValueError(f"kind must be one of {', '.join(repr(k) for k in KIND_NAMES)} or a kind value, got {kind!r}")
    raise TypeError(f"kind must be fisherfunc.Empirical(), MC(...), Exact(...) or a name, got {type(kind).__name__}")


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

    Built by :func:`label_sets`. Each sample gets ``J`` label sets ``y_j`` with weights
    ``w_j`` (``1/k`` for ``k`` draws; the probabilities for ``"exact"``) and
    ``F_b = Σ_j w_j · rule.reduce(g(y_j) ⊙ g(y_j))``.

    Attributes:
        kind: an :class:`MC` or :class:`Exact` value.
        loss: the per-sample loss; its ``distribution``, ``nll``, ``ignore_index``, ``shift`` and
            ``variance`` define the label sets.
    """

    kind: MC | Exact
    loss: ModelLoss

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
        if isinstance(self.kind, Exact):
            return torch.empty(targets.shape[0], 0, dtype=torch.float64, device=targets.device)
        assert generator is not None
        shape = (targets.shape[0], self.kind.samples, *targets.shape[1:])
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
        if isinstance(self.kind, Exact) and num_classes > self.kind.max_classes:
            raise ValueError(
                f"kind='exact' would enumerate {num_classes} classes (one backward pass each, per target "
                f"position), more than max_classes={self.kind.max_classes}; use kind=fisherfunc.MC(samples=k, ...) "
                "(k backward passes), or raise Exact(max_classes=...)"
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
        if isinstance(self.kind, MC):
            k = self.kind.samples
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
        if isinstance(self.kind, MC):
            k = self.kind.samples
            eps = noise.reshape(k, *mean.shape).to(mean.dtype)
            return mean + sigma * eps, torch.full((k,), 1.0 / k, dtype=mean.dtype, device=mean.device)
        if isinstance(self.kind, Exact) and outputs > self.kind.max_classes:
            raise ValueError(
                f"kind='exact' would enumerate {outputs} Gaussian outputs (one backward pass each), more "
                f"than max_classes={self.kind.max_classes}; use kind=fisherfunc.MC(samples=k, ...), or raise "
                "Exact(max_classes=...)"
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
    ) -> tuple[tuple[Tensor, ...], Tensor, Any]:
        """``F_b = Σ_j w_j · reduce(g(y_j) ⊙ g(y_j))`` and ``n_b`` for one sample (inside ``vmap``).

        Args:
            predict: ``(*primals) -> (prediction, aux)``: the model's prediction for ``sample``.
            primals: what is differentiated (the active params, or params and probes).
            reduce: ``(gradients w.r.t. primals, aux) -> squared gradients summed to groups``.
            sample: one sample (batch dimension removed).
            noise: this sample's slice of :meth:`draw`.

        Returns:
            ``(groups, tokens, aux)``: the weighted group sums, ``n_b`` of the dataset targets, and
            ``predict``'s auxiliary output of the one forward (e.g. recorded layer inputs).
        """
        pred, pullback, aux = cast(tuple[Tensor, Callable[..., Any], Any], vjp(predict, *primals, has_aux=True))
        fixed = pred.detach()
        targets, mask = self.loss.targets_of(sample), self.loss.mask_of(sample)
        assert targets is not None  # label sets need a loss with targets (label_sets checks the distribution)
        labels, weights = self.sets(fixed, targets, noise)

        def one(y: Tensor, w: Tensor) -> tuple[Tensor, ...]:
            # the prediction-space cotangent ∂L_b(y)/∂f, pulled back to the primals
            cotangent = grad(lambda f: self.loss.nll(f, y, mask)[0])(fixed)
            with torch.no_grad():  # the backward records no graph of its own (as in _engine/vectorise.py)
                pulled = pullback(cotangent)
            return tuple(w * s for s in reduce(pulled, aux))

        per_set = vmap(one)(labels, weights)  # each [J, *group_shape]
        _, tokens = self.loss.nll(fixed, targets, mask)
        count = torch.as_tensor(tokens, dtype=torch.promote_types(fixed.dtype, torch.float32))  # bf16 counts to 256
        return tuple(s.sum(0) for s in per_set), count, aux


def kind_name(kind: FisherKind | str) -> str:
    """The recorded name of a kind value, or a validated name (``"empirical"``, ``"mc"``, ``"exact"``)."""
    if isinstance(kind, FisherKind):
        return kind.name
    if kind not in KIND_NAMES:
        raise ValueError(f"kind must be one of {', '.join(repr(k) for k in KIND_NAMES)} or a kind value, got {kind!r}")
    return str(kind)


def label_sets(loss: Any, kind: FisherKind) -> LabelSets | None:
    """The label sets of ``kind`` for ``loss``, checked before any model call (``None`` for :class:`Empirical`).

    Raises:
        ValueError: a loss without a known output distribution for :class:`MC` / :class:`Exact`, or
            :class:`Exact` for a causal LM.
    """
    if isinstance(kind, Empirical):
        return None
    if not isinstance(kind, (MC, Exact)):
        raise TypeError(f"unknown Fisher kind {kind!r}")
    distribution = getattr(loss, "distribution", None)
    if not isinstance(loss, ModelLoss) or distribution not in ("categorical", "gaussian"):
        what = (
            "a plain callable"
            if not isinstance(loss, ModelLoss)
            else "a loss with no known output distribution (fisherfunc.losses.custom)"
        )
        raise ValueError(
            f"kind={kind.name!r} takes targets from the model's output distribution, but the loss is {what}; "
            "use fisherfunc.losses.classification, token_classification, causal_lm or regression, or "
            "kind='empirical'"
        )
    if isinstance(kind, Exact) and loss.shift:
        raise ValueError(
            "kind='exact' is not available for a causal LM: its targets are its own inputs shifted by one, "
            "so the model's distribution is over whole sequences (V^T of them), and even the teacher-forced "
            "per-position sum Σ_t Σ_v p(v | x_≤t) g² needs T·V backward passes per sequence (V = vocabulary "
            "size). Use kind=fisherfunc.MC(samples=k, seed=...): it samples each target from the model at the "
            "data's prefix, k backward passes"
        )
    return LabelSets(kind=kind, loss=loss)


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
