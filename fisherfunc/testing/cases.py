"""Tiny model families with a matching per-sample loss and batch, built from plain integers.

Pure torch, no hypothesis: :mod:`fisherfunc.testing.strategies` draws the integers (sizes and a
seed) and calls :func:`build_case`. Every family is small enough that one Fisher pass over a batch
of a few samples takes milliseconds on a CPU.

| family                  | model                                                  | loss                     |
|-------------------------|--------------------------------------------------------|--------------------------|
| ``mlp``                 | Linear → Tanh → Linear                                 | ``classification``       |
| ``cnn1d``               | grouped Conv1d → Tanh → Flatten → Linear               | ``classification``       |
| ``cnn2d``               | grouped Conv2d → GroupNorm → Tanh → mean pool → Linear | ``classification``       |
| ``conv_transpose``      | grouped ConvTranspose1d/2d → Tanh → Flatten → Linear   | ``classification``       |
| ``token_classification``| Embedding → LayerNorm → Linear, right-padded batch     | ``token_classification`` |
| ``causal_lm``           | Embedding → LayerNorm → Linear (optionally tied)       | ``causal_lm`` with mask  |
| ``transformer``         | Embedding → TransformerEncoderLayer → Linear           | ``causal_lm`` with mask  |
| ``regression``          | Linear → Tanh → Linear                                 | ``regression``           |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import losses
from ..losses import ModelLoss

__all__ = ["FAMILIES", "Case", "build_case", "padded_token_batch"]

FAMILIES = (
    "mlp",
    "cnn1d",
    "cnn2d",
    "conv_transpose",
    "token_classification",
    "causal_lm",
    "transformer",
    "regression",
)


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """A model with a matching per-sample loss, its params and one batch.

    Attributes:
        model: the module (float64 unless asked otherwise).
        loss: a :class:`~fisherfunc.losses.ModelLoss` for ``model`` and ``batch``.
        params: ``dict(model.named_parameters())`` (tied parameters once).
        batch: one batch, leading dimension ``B``.
        family: the family name (one of :data:`FAMILIES`).
        seed: the seed the weights and data were drawn from.
        sizes: the family's sizes; ``build_case(family, seed, sizes, dtype)`` rebuilds the case.
    """

    model: nn.Module
    loss: ModelLoss
    params: dict[str, Tensor]
    batch: Any
    family: str
    seed: int
    sizes: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        def shapes(tree: Any) -> str:
            if isinstance(tree, Tensor):
                return "x".join(map(str, tree.shape)) or "scalar"
            if isinstance(tree, Mapping):
                return "{" + ", ".join(f"{k}: {shapes(v)}" for k, v in tree.items()) + "}"
            return "(" + ", ".join(shapes(v) for v in tree) + ")"

        return (
            f"Case(family={self.family!r}, seed={self.seed}, sizes={dict(self.sizes)!r}, "
            f"batch={shapes(self.batch)}, params={len(self.params)})"
        )


class _TokenModel(nn.Module):
    """Embedding → LayerNorm → Linear head; optionally the head's weight is the embedding's."""

    def __init__(self, vocab: int, dim: int, classes: int, *, tied: bool, padding_idx: int | None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes, bias=not tied)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.norm(self.embed(input_ids)))


class _TinyTransformer(nn.Module):
    """Embedding → one ``nn.TransformerEncoderLayer`` (key padding from the mask) → Linear."""

    def __init__(self, vocab: int, dim: int, heads: int, *, norm_first: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.layer(self.embed(input_ids), src_key_padding_mask=attention_mask == 0))


class _MeanPool(nn.Module):
    """Mean over every axis after the channel axis: ``[N, C, *spatial] -> [N, C]``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2).mean(-1)


def padded_token_batch(
    lengths: list[int], seq_len: int, vocab: int, *, pad_id: int = 0, ignore_index: int = -100
) -> dict[str, Tensor]:
    """Make a right-padded token batch from the global RNG: ``input_ids``, ``labels``, ``attention_mask``.

    Sample ``b`` has ``lengths[b]`` real tokens (ids in ``[1, vocab)``) followed by ``pad_id``;
    ``attention_mask`` is 1 on real tokens; ``labels`` are random classes in ``[0, vocab)`` on real
    tokens and ``ignore_index`` on padding. All three are ``[B, seq_len]`` int64.
    """
    size = len(lengths)
    real = torch.arange(seq_len).expand(size, seq_len) < torch.tensor(lengths).unsqueeze(1)
    ids = torch.randint(1, vocab, (size, seq_len))
    labels = torch.randint(0, vocab, (size, seq_len))
    return {
        "input_ids": torch.where(real, ids, torch.full_like(ids, pad_id)),
        "labels": torch.where(real, labels, torch.full_like(labels, ignore_index)),
        "attention_mask": real.long(),
    }


def build_case(family: str, seed: int, sizes: Mapping[str, Any], dtype: torch.dtype = torch.float64) -> Case:
    """Build one case of ``family`` deterministically from ``seed`` and ``sizes``.

    The global RNG is seeded inside :func:`torch.random.fork_rng`, so the caller's RNG state is
    left as it was. ``sizes`` holds the family's integers (see the strategies for their ranges).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, loss, batch = _BUILDERS[family](dict(sizes))
        model = model.to(dtype)
        batch = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    params = dict(model.named_parameters())
    return Case(model=model, loss=loss, params=params, batch=batch, family=family, seed=seed, sizes=dict(sizes))


def _labels(size: int, classes: int) -> Tensor:
    return torch.randint(0, classes, (size,))


def _mlp(s: dict[str, Any]) -> tuple[nn.Module, ModelLoss, dict[str, Tensor]]:
    model = nn.Sequential(nn.Linear(s["features"], s["hidden"]), nn.Tanh(), nn.Linear(s["hidden"], s["classes"]))
    batch = {"x": torch.randn(s["batch"], s["features"]), "y": _labels(s["batch"], s["classes"])}
    return model, losses.classification(model, inputs="x", targets="y"), batch


def _cnn1d(s: dict[str, Any]) -> tuple[nn.Module, ModelLoss, dict[str, Tensor]]:
    g, length, k = s["groups"], s["length"], s["kernel"]
    c_in, c_out = g * s["in_per_group"], g * s["out_per_group"]
    model = nn.Sequential(
        nn.Conv1d(c_in, c_out, k, groups=g, padding=k // 2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(c_out * (length + 2 * (k // 2) - k + 1), s["classes"]),
    )
    batch = {"x": torch.randn(s["batch"], c_in, length), "y": _labels(s["batch"], s["classes"])}
    return model, losses.classification(model, inputs="x", targets="y"), batch


def _cnn2d(s: dict[str, Any]) -> tuple[nn.Module, ModelLoss, dict[str, Tensor]]:
    g = s["groups"]
    c_in, c_out = g * s["in_per_group"], g * s["out_per_group"]
    model = nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, groups=g, padding=1),
        nn.GroupNorm(g, c_out),
        nn.Tanh(),
        _MeanPool(),
        nn.Linear(c_out, s["classes"]),
    )
    batch = {"x": torch.randn(s["batch"], c_in, s["length"], s["length"]), "y": _labels(s["batch"], s["classes"])}
    return model, losses.classification(model, inputs="x", targets="y"), batch


def _conv_transpose(s: dict[str, Any]) -> tuple[nn.Module, ModelLoss, dict[str, Tensor]]:
    g, k, stride, length = s["groups"], s["kernel"], s["stride"], s["length"]
    c_in, c_out = g * s["in_per_group"], g * s["out_per_group"]
    out_len = (length - 1) * stride + k
    if s["two_d"]:
        conv: nn.Module = nn.ConvTranspose2d(c_in, c_out, k, stride=stride, groups=g)
        x, flat = torch.randn(s["batch"], c_in, length, length), c_out * out_len * out_len
    else:
        conv = nn.ConvTranspose1d(c_in, c_out, k, stride=stride, groups=g)
        x, flat = torch.randn(s["batch"], c_in, length), c_out * out_len
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(flat, s["classes"]))
    batch = {"x": x, "y": _labels(s["batch"], s["classes"])}
    return model, losses.classification(model, inputs="x", targets="y"), batch


def _token_classification(s: dict[str, Any]) -> tuple[nn.Module, ModelLoss, dict[str, Tensor]]:
    padding_idx = 0 if s["padding_idx"] else None
    model = _TokenModel(s["vocab"], s["dim"], s["classes"], tied=False, padding_idx=padding_idx)
    batch = padded_token_batch(s["lengths"], s["seq_len"], s["vocab"])
    batch["labels"] = torch.where(batch["attention_mask"] == 1, batch["labels"] % s["classes"], batch["labels"])
    loss = losses.token_classification(model, inputs="input_ids", targets="labels", mask="attention_mask")
    return model, loss, batch


def _causal_lm(s: dict[str, Any]) -> tuple[nn.Module, ModelLoss, dict[str, Tensor]]:
    padding_idx = 0 if s["padding_idx"] else None
    model = _TokenModel(s["vocab"], s["dim"], s["vocab"], tied=s["tied"], padding_idx=padding_idx)
    batch = padded_token_batch(s["lengths"], s["seq_len"], s["vocab"])
    return model, losses.causal_lm(model, inputs="input_ids", mask="attention_mask"), batch


def _transformer(s: dict[str, Any]) -> tuple[nn.Module, ModelLoss, dict[str, Tensor]]:
    heads = s["heads"]
    model = _TinyTransformer(s["vocab"], heads * s["head_dim"], heads, norm_first=s["norm_first"])
    batch = padded_token_batch(s["lengths"], s["seq_len"], s["vocab"])
    loss = losses.causal_lm(
        model,
        inputs={"input_ids": "input_ids", "attention_mask": "attention_mask"},
        labels="input_ids",
        mask="attention_mask",
    )
    return model, loss, batch


def _regression(s: dict[str, Any]) -> tuple[nn.Module, ModelLoss, dict[str, Tensor]]:
    model = nn.Sequential(nn.Linear(s["features"], s["hidden"]), nn.Tanh(), nn.Linear(s["hidden"], s["outputs"]))
    batch = {"x": torch.randn(s["batch"], s["features"]), "y": torch.randn(s["batch"], s["outputs"])}
    return model, losses.regression(model, inputs="x", targets="y", variance=s["variance"]), batch


_BUILDERS = {
    "mlp": _mlp,
    "cnn1d": _cnn1d,
    "cnn2d": _cnn2d,
    "conv_transpose": _conv_transpose,
    "token_classification": _token_classification,
    "causal_lm": _causal_lm,
    "transformer": _transformer,
    "regression": _regression,
}
