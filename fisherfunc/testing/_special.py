"""Hand-built entries of the test-case registry: plain-callable losses of a params tree, no module.

Each has a single property a test needs (nested params, gradients equal to the inputs, gradients
of 1e-15 and 1e15); the model is an empty ``nn.Module()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import Channel, Elementwise, Skip, Whole
from ._batches import per_batch
from ._registry import Built, register

__all__ = ["SPECIAL_CASES"]

Sizes = int | Sequence[int]


@register("nested_params", tags=("classification", "callable", "special"))
def nested_params(*, batch: Sizes = 5, features: int = 4, hidden: int = 6, classes: int = 3) -> Built:
    """Params as a nested pytree (a dict of a dict, a tuple and a scalar) and a plain-callable loss.

    ``params = {"enc": {"w": [hidden, features], "b": [hidden]}, "head": ([classes, hidden],
    [classes]), "scale": []}``; ``h = scale · tanh(w x + b)``, logits ``head[0] h + head[1]``,
    cross-entropy, one token per sample. Spec: ``{"enc": Channel(), "head": (Elementwise(),
    Skip()), "scale": Whole()}`` (a prefix rule for ``enc``).

    Args:
        batch: ``B``, or one ``B`` per batch: ``(x [B, features], y [B])``.
        features: input width.
        hidden: width of ``enc``.
        classes: number of classes.
    """
    params = {
        "enc": {"w": torch.randn(hidden, features), "b": torch.randn(hidden)},
        "head": (torch.randn(classes, hidden), torch.randn(classes)),
        "scale": torch.tensor(1.5),
    }

    def loss(p: Any, sample: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
        x, y = sample
        h = torch.tanh(p["enc"]["w"] @ x + p["enc"]["b"]) * p["scale"]
        z = p["head"][0] @ h + p["head"][1]
        return F.cross_entropy(z[None], y[None], reduction="sum"), 1

    batches = [(torch.randn(size, features), torch.randint(0, classes, (size,))) for size in per_batch(batch)]
    spec = {"enc": Channel(), "head": (Elementwise(), Skip()), "scale": Whole()}
    return Built(nn.Module(), loss, batches, spec, params)


@register("linear_scores", tags=("callable", "special"))
def linear_scores(*, batch: Sizes = 6) -> Built:
    """``L_b = a·x_b + b·z_b``: per-sample gradients ``∇_a = x_b``, ``∇_b = z_b`` are the inputs.

    ``params = {"a": [0.5, −1, 2], "b": [1.5, 0.25]}`` (fixed, whatever the seed); one token per
    sample; spec ``Elementwise()``. A value planted in ``x`` (``z``) reaches ``a`` (``b``) and that
    sample only.

    Args:
        batch: ``B``, or one ``B`` per batch: ``(x [B, 3], z [B, 2])`` from ``N(0, 1)``.
    """
    params = {"a": torch.tensor([0.5, -1.0, 2.0]), "b": torch.tensor([1.5, 0.25])}

    def loss(p: dict[str, Tensor], sample: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
        x, z = sample
        return p["a"] @ x + p["b"] @ z, 1

    batches = [(torch.randn(size, 3), torch.randn(size, 2)) for size in per_batch(batch)]
    return Built(nn.Module(), loss, batches, Elementwise(), params)


@register("scaled_gradients", tags=("callable", "special"))
def scaled_gradients(*, batch: Sizes = 4) -> Built:
    """``L_b = tiny·x_b + huge·z_b + Σ off``: gradients ~1e-15 and ~1e15, and a skipped ``off``.

    ``params = {"tiny": ones(3), "huge": ones(2), "off": ones(1)}`` (fixed); spec ``{"tiny":
    Elementwise(), "huge": Channel(), "off": Skip()}``: Fisher values near 1e-30 and 1e30.

    Args:
        batch: ``B``, or one ``B`` per batch: ``(1e-15·(1 + U[B, 3]), 1e15·(1 + U[B, 2]))``.
    """
    params = {"tiny": torch.ones(3), "huge": torch.ones(2), "off": torch.ones(1)}

    def loss(p: dict[str, Tensor], sample: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
        x, z = sample
        return p["tiny"] @ x + p["huge"] @ z + p["off"].sum(), 1

    batches = [(1e-15 * (1 + torch.rand(size, 3)), 1e15 * (1 + torch.rand(size, 2))) for size in per_batch(batch)]
    spec = {"tiny": Elementwise(), "huge": Channel(), "off": Skip()}
    return Built(nn.Module(), loss, batches, spec, params)


SPECIAL_CASES = ("nested_params", "linear_scores", "scaled_gradients")
