"""The built-in default job of the ``fisherfunc`` command: a small MLP trained on scikit-learn's digits.

``load_digits`` (1797 8×8 images of handwritten digits, 10 classes) ships inside scikit-learn, so
the job runs offline. :func:`build` trains a 64-64-32-10 MLP on it in a second or two and returns
what the command needs to collect per-channel Fisher: the model, its per-sample loss and the data
as batches. Needs the ``demo`` extra (``pip install "fisherfunc[demo]"``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import losses
from ..losses import ModelLoss

__all__ = ["Job", "build", "load_digits", "train"]


class Job(NamedTuple):
    """What a Fisher collection needs: a model, its per-sample loss and a list of batches.

    Attributes:
        model: the model (its parameters are read, never changed).
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        batches: the batches to fold into the state, in order: ``(images [B, 64], labels [B])``.
        description: one line saying what was built (printed by the command).
    """

    model: nn.Module
    loss: ModelLoss
    batches: list[tuple[Tensor, Tensor]]
    description: str


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits as ``(x [1797, 64] float32 in [0, 1], y [1797] int64)``.

    Raises:
        ImportError: if scikit-learn is not installed (the message names the extra).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits  # type: ignore[import-untyped]
    except ImportError as err:
        raise ImportError('the default job needs scikit-learn: pip install "fisherfunc[demo]"') from err
    data = sk_load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.int64)
    return x, y


def train(x: Tensor, y: Tensor, *, seed: int = 0, steps: int = 200) -> tuple[nn.Module, float]:
    """Train a 64-64-32-10 ReLU MLP with full-batch Adam; returns the model (eval mode) and its accuracy.

    Args:
        x: ``[N, 64]`` float32 images (pixel values in ``[0, 1]``).
        y: ``[N]`` int64 labels in ``[0, 10)``.
        seed: seeds the initialisation.
        steps: Adam steps over the whole data.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    return model, accuracy


def build(*, seed: int = 0, batch_size: int = 64) -> Job:
    """Train the digits MLP and split the (shuffled) data into batches of ``batch_size``.

    Args:
        seed: seeds the shuffle and the training.
        batch_size: samples per batch.

    Returns:
        A :class:`Job` with a classification loss (``batch = (images, labels)``).
    """
    x, y = load_digits()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    model, accuracy = train(x, y, seed=seed)
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
    description = (
        f"digits MLP 64-64-32-10 trained on scikit-learn's load_digits ({len(y)} images), "
        f"training accuracy {accuracy:.3f}"
    )
    return Job(model=model, loss=losses.classification(model), batches=batches, description=description)
