"""The ``nn.Module`` classes of the test-case registry (:mod:`fisherfunc.testing.cases`).

Every class here counts its forward calls in ``self.calls`` (a plain int, incremented once per
call, so once per vectorised chunk under ``vmap``): a test can check that an error was raised
before any model call. Shapes are written for a batch ``B``; the library calls the modules on one
sample at a time with a batch dimension of 1 (or none, see :class:`PerSampleAttention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "AttentionClassifier",
    "Bags",
    "CausalAttention",
    "Conv1D",
    "ConvStack",
    "ConvTagger",
    "DeconvStack",
    "EncoderDecoder",
    "FunctionalDropout",
    "IndexNet",
    "MeanPool",
    "NormNet",
    "PerSampleAttention",
    "ReusedWeight",
    "SelfAttention",
    "SequenceClassifier",
    "Sequential",
    "TokenModel",
    "Transformer",
    "randomise_norms",
]

#: Activation modules by name (``mlp``'s ``activation=``).
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


class Sequential(nn.Sequential):
    """``nn.Sequential`` that counts its forward calls in ``calls``."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layers in order."""
        self.calls += 1
        return super().forward(x)


class MeanPool(nn.Module):
    """Mean over every axis after the channel axis: ``[B, C, *spatial] -> [B, C]``."""

    def forward(self, x: Tensor) -> Tensor:
        """Average the spatial positions."""
        return x.flatten(2).mean(-1)


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D``: a linear layer stored ``weight [in, out]``, applied with ``torch.addmm``.

    ``weight ~ 0.3·N(0, 1)``, ``bias ~ 0.1·N(0, 1)``; ``[..., in] -> [..., out]``.
    """

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.weight = nn.Parameter(torch.randn(in_features, out_features) * 0.3)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        """``bias + x @ weight`` over the last axis."""
        self.calls += 1
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.reshape(*x.shape[:-1], self.out_features)


class TokenModel(nn.Module):
    """A per-token model: ``input_ids [B, T] -> logits [B, T, classes]``.

    ``h = emb(ids)``; with ``causal_mean`` position ``t`` is the running mean of positions ``≤ t``;
    ``h = norm(h)`` (LayerNorm, optional); ``h = h + down(tanh(up(h)))`` (a residual block of width
    ``hidden``, optional; ``up`` is a GPT-2 :class:`Conv1D` with ``conv1d``); ``logits = head(h)``.
    With ``tied`` the head's weight is the embedding's (``classes == vocab``, no head bias).
    """

    def __init__(
        self,
        vocab: int,
        dim: int,
        classes: int,
        *,
        hidden: int | None = None,
        norm: bool = True,
        tied: bool = False,
        padding_idx: int | None = None,
        conv1d: bool = False,
        causal_mean: bool = False,
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(dim) if norm else None
        self.up: nn.Module | None = None
        self.down: nn.Module | None = None
        if hidden:
            self.up = Conv1D(hidden, dim) if conv1d else nn.Linear(dim, hidden)
            self.down = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, classes, bias=not tied)
        if tied:
            self.head.weight = self.emb.weight
        self.causal_mean = causal_mean
        self.calls = 0

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``[..., T, classes]`` of ids ``[..., T]``."""
        self.calls += 1
        h = self.emb(input_ids)
        if self.causal_mean:
            steps = torch.arange(1, input_ids.shape[-1] + 1, dtype=h.dtype, device=h.device).unsqueeze(-1)
            h = h.cumsum(-2) / steps
        if self.norm is not None:
            h = self.norm(h)
        if self.up is not None and self.down is not None:
            h = h + self.down(torch.tanh(self.up(h)))
        return self.head(h)


class Transformer(nn.Module):
    """Embedding → ``nn.TransformerEncoderLayer`` s (key padding from the mask) → Linear.

    ``input_ids [B, T]``, ``attention_mask [B, T]`` (1 = real token) ``-> logits [B, T, vocab]``.
    One layer per entry of ``norm_first`` (post-LN for ``False``, pre-LN for ``True``), each with
    ``heads`` heads, feed-forward width ``2·dim`` and no dropout.
    """

    def __init__(self, vocab: int, dim: int, heads: int, norm_first: tuple[bool, ...]) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=first)
            for first in norm_first
        )
        self.head = nn.Linear(dim, vocab)
        self.calls = 0

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``[B, T, vocab]``; padded positions are masked out of attention."""
        self.calls += 1
        h, pad = self.emb(input_ids), attention_mask == 0
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad)
        return self.head(h)


class ConvStack(nn.Module):
    """Conv2d (plain, grouped, depthwise) into Conv1d (plain, grouped, depthwise), then a classifier.

    ``x [B, 3, 7, 7] -> logits [B, 4]``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, groups=3)
        self.c3 = nn.Conv2d(6, 6, 3, groups=6, padding=1)  # depthwise
        self.d1 = nn.Conv1d(6, 8, 3)
        self.d2 = nn.Conv1d(8, 8, 3, groups=4)
        self.d3 = nn.Conv1d(8, 8, 3, groups=8, padding=1)  # depthwise
        self.fc = nn.Linear(8, 4)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, 4]``."""
        self.calls += 1
        h = torch.tanh(self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x))))))  # [B, 6, 5, 5]
        h = h.flatten(2)  # [B, 6, 25]
        h = torch.tanh(self.d3(torch.tanh(self.d2(torch.tanh(self.d1(h))))))  # [B, 8, 21]
        return self.fc(h.mean(-1))


class DeconvStack(nn.Module):
    """ConvTranspose1d/2d/3d with groups 1, 2, 3 and depthwise, then a classifier.

    ``x [B, 6, 3, 3, 3] -> logits [B, 5]``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.t1 = nn.ConvTranspose1d(6, 4, 3, groups=2, stride=2)  # weight [6, 2, 3]
        self.t2a = nn.ConvTranspose2d(6, 6, 2)  # weight [6, 6, 2, 2]
        self.t2b = nn.ConvTranspose2d(6, 9, 3, groups=3, stride=2)  # weight [6, 3, 3, 3]
        self.t3 = nn.ConvTranspose3d(6, 6, 2, groups=6)  # weight [6, 1, 2, 2, 2]
        self.fc = nn.Linear(4 + 9 + 6, 5)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, 5]``."""
        self.calls += 1
        a = torch.tanh(self.t1(x.flatten(2))).mean(-1)
        b = torch.tanh(self.t2b(torch.tanh(self.t2a(x[..., 0])))).mean((-2, -1))
        c = torch.tanh(self.t3(x)).mean((-3, -2, -1))
        return self.fc(torch.cat([a, b, c], -1))


class Bags(nn.Module):
    """Two ``nn.EmbeddingBag`` (mean and sum) over fixed-length bags: ``ids [B, L] -> logits [B, 3]``."""

    def __init__(self, vocab: int = 12, dim: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.mean = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.sum = nn.EmbeddingBag(vocab, dim, mode="sum")
        self.head = nn.Linear(2 * dim, classes)
        self.calls = 0

    def forward(self, ids: Tensor) -> Tensor:
        """Logits ``[B, classes]``."""
        self.calls += 1
        return self.head(torch.cat([self.mean(ids), self.sum(ids)], -1))


class NormNet(nn.Module):
    """InstanceNorm2d (affine), Conv2d, BatchNorm2d, GroupNorm, Linear, BatchNorm1d, RMSNorm, Linear.

    ``x [B, 3, 6, 6] -> logits [B, 3]``. The BatchNorm layers need eval mode (running statistics).
    Before torch 2.4 (no ``nn.RMSNorm``) ``rms`` is a LayerNorm without bias: the same parameter.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inorm = nn.InstanceNorm2d(3, affine=True)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn2 = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 4 * 4, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.rms = nn.RMSNorm(6) if hasattr(nn, "RMSNorm") else nn.LayerNorm(6, bias=False)
        self.out = nn.Linear(6, 3)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, 3]``."""
        self.calls += 1
        h = self.gn(torch.relu(self.bn2(self.conv(self.inorm(x)))))  # [B, 4, 4, 4]
        return self.out(self.rms(self.bn1(self.fc(h.flatten(1)))))


class SequenceClassifier(nn.Module):
    """A sequence classifier: ``ids [B, T] -> logits [B, classes]`` (mean over positions).

    ``h = tanh(lin(emb(ids)))``; ``h = h + attn(h, h, h)`` (``nn.MultiheadAttention`` with
    ``heads`` heads, if ``heads > 0``); ``h = norm(h)`` (LayerNorm, optional); ``head(h).mean(-2)``.
    """

    def __init__(self, vocab: int, dim: int, width: int, heads: int, classes: int, *, norm: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lin = nn.Linear(dim, width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True) if heads else None
        self.norm = nn.LayerNorm(width) if norm else None
        self.head = nn.Linear(width, classes)
        self.calls = 0

    def forward(self, ids: Tensor) -> Tensor:
        """Logits ``[B, classes]``."""
        self.calls += 1
        h = torch.tanh(self.lin(self.emb(ids)))
        if self.attn is not None:
            h = h + self.attn(h, h, h, need_weights=False)[0]
        if self.norm is not None:
            h = self.norm(h)
        return self.head(h).mean(-2)


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (fused in-projection) used directly: ``x [B, T, dim] -> [B, T, dim]``."""

    def __init__(self, dim: int, heads: int, *, bias_kv: bool, need_weights: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, add_bias_kv=bias_kv)
        self.need_weights = need_weights
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention output ``[B, T, dim]``."""
        self.calls += 1
        return self.attn(x, x, x, need_weights=self.need_weights)[0]


class CrossAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate q/k/v projections (``kdim``, ``vdim``) and ``bias_k/v``.

    ``q [B, S, dim]``, ``k [B, T, kdim]``, ``v [B, T, vdim] -> [B, S, dim]``.
    """

    def __init__(self, dim: int, heads: int, kdim: int, vdim: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, kdim=kdim, vdim=vdim, batch_first=True, add_bias_kv=True)
        self.calls = 0

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of the queries over the keys and values, ``[B, S, dim]``."""
        self.calls += 1
        return self.attn(q, k, v, need_weights=False)[0]


class AttentionClassifier(nn.Module):
    """Attention blocks over float sequences, mean-pooled to classes: ``x [B, T, dim] -> [B, classes]``.

    ``block="mha"``: ``h = h + MultiheadAttention(h, h, h)`` per layer; ``block="encoder"``: an
    ``nn.TransformerEncoderLayer`` (feed-forward ``2·dim``, dropout ``dropout``) per layer. With
    ``batch_first=False`` the layers are built and called sequence-first (``[T, B, dim]`` inside).
    """

    def __init__(
        self, dim: int, heads: int, classes: int, *, layers: int, block: str, dropout: float, batch_first: bool
    ) -> None:
        super().__init__()
        if block not in ("mha", "encoder"):
            raise ValueError(f"block must be 'mha' or 'encoder', got {block!r}")

        def make() -> nn.Module:
            if block == "mha":
                return nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=batch_first)
            return nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=dropout, batch_first=batch_first)

        self.layers = nn.ModuleList(make() for _ in range(layers))
        self.head = nn.Linear(dim, classes)
        self.block, self.batch_first = block, batch_first
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, classes]``."""
        self.calls += 1
        h = x if self.batch_first else x.transpose(0, 1)
        for layer in self.layers:
            h = h + layer(h, h, h, need_weights=False)[0] if self.block == "mha" else layer(h)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h.mean(-2))


class EncoderDecoder(nn.Module):
    """``nn.TransformerEncoderLayer`` → ``nn.TransformerDecoderLayer`` (pre-LN) → Linear, mean-pooled.

    ``x [B, T, dim] -> logits [B, classes]``; the decoder reads ``tanh(x)`` against the encoder's
    memory. With ``causal`` both self-attentions get a causal mask.
    """

    def __init__(self, dim: int, heads: int, classes: int, *, causal: bool) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.dec = nn.TransformerDecoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(dim, classes)
        self.causal = causal
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, classes]``."""
        self.calls += 1
        causal = self.causal
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[-2], dtype=x.dtype) if causal else None
        memory = self.enc(x, src_mask=mask, is_causal=causal)
        return self.head(self.dec(torch.tanh(x), memory, tgt_mask=mask, tgt_is_causal=causal).mean(-2))


class PerSampleAttention(nn.Module):
    """``nn.MultiheadAttention`` called on **one** sample (a batch dimension of 1 added inside).

    ``x [T, dim]``, key padding ``mask [T]`` (1 = real) ``-> logits [classes]`` (mean over positions).
    ``inputs``: ``"self"`` (q = k = v: one fused in-projection call), ``"kv"`` (k = v = tanh(x) ≠ q:
    the fused weight is split), ``"qkv"`` (v = sin(x) too: chunked). With ``kdim`` the keys and
    values pass a ``Linear(dim, kdim)`` first, so MHA has separate q/k/v projection weights.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        classes: int,
        *,
        batch_first: bool,
        need_weights: bool,
        inputs: str,
        kdim: int | None,
    ) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(dim, classes)
        self.batch_first, self.need_weights, self.inputs = batch_first, need_weights, inputs
        self.kv = nn.Linear(dim, kdim) if kdim is not None else None
        self.calls = 0

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Logits ``[classes]`` of one sample."""
        self.calls += 1
        x = x.unsqueeze(0 if self.batch_first else 1)
        q = x
        k = v = x if self.inputs == "self" else torch.tanh(x)
        if self.inputs == "qkv":
            v = torch.sin(x)
        if self.kv is not None:
            k, v = self.kv(k), self.kv(v) if self.inputs == "qkv" else self.kv(k)
        out, _ = self.attn(q, k, v, key_padding_mask=(mask == 0).unsqueeze(0), need_weights=self.need_weights)
        return self.head(out.mean(1 if self.batch_first else 0).squeeze(0))


class ConvTagger(nn.Module):
    """A convolutional tagger: ``x [B, 3, T] -> logits [B, classes, T]``.

    Conv1d (kernel 3, padding 1: mixes neighbouring positions) → Tanh → Conv1d (1×1).
    """

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 5, 3, padding=1)
        self.c2 = nn.Conv1d(5, classes, 1)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, classes, T]``."""
        self.calls += 1
        return self.c2(torch.tanh(self.c1(x)))

    def layers(self) -> list[nn.Module]:
        """The layers in order, for a peer library that wants an ``nn.Sequential``."""
        return [self.c1, nn.Tanh(), self.c2]


class CausalAttention(nn.Module):
    """One causal single-head attention (``nn.Linear`` q/k/v) and a head: ``x [B, T, d] -> [B, T, classes]``.

    The key and value projections' output at position ``t`` reaches the logits of every ``t' ≥ t``.
    """

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, T, classes]``."""
        self.calls += 1
        t = x.shape[-2]
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        return self.head(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ self.v(x))


class ReusedWeight(nn.Module):
    """A weight used twice: ``x [B, d] -> logits [B, classes]``.

    ``use="twice"``: ``out(tanh(lin(tanh(lin(x)))))``; ``use="matmul"``: ``out(lin(x) + x @ lin.weightᵀ)``
    (the weight also reaches a plain matrix product).
    """

    def __init__(self, dim: int, classes: int, *, use: str) -> None:
        super().__init__()
        if use not in ("twice", "matmul"):
            raise ValueError(f"use must be 'twice' or 'matmul', got {use!r}")
        self.lin = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, classes)
        self.use = use
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, classes]``."""
        self.calls += 1
        if self.use == "twice":
            return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))
        return self.out(self.lin(x) + x @ self.lin.weight.t())


class IndexNet(nn.Module):
    """A Linear whose outputs are permuted by a non-floating parameter ``order`` (int64, frozen).

    ``x [B, d] -> logits [B, classes]``.
    """

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, classes)
        self.order = nn.Parameter(torch.arange(classes).roll(1), requires_grad=False)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        """Permuted logits ``[B, classes]``."""
        self.calls += 1
        return self.lin(x)[..., self.order]


class FunctionalDropout(nn.Module):
    """Dropout that ignores the module's mode: ``x [B, T, dim] -> logits [B, classes]``.

    ``F.scaled_dot_product_attention`` with ``dropout_p=p`` and ``F.dropout``/``F.dropout2d`` with
    ``training=True`` hard-coded; ``p = 0`` is the deterministic network.
    """

    def __init__(self, dim: int, classes: int, *, p: float) -> None:
        super().__init__()
        self.p = p
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, classes)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, classes]``."""
        self.calls += 1
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p)
        h = F.dropout(h, self.p, training=True) + F.dropout2d(h, p=self.p, training=True)
        return self.out(torch.tanh(h).mean(-2))


_NORMS = ("LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")
_BATCH_NORMS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")


def randomise_norms(model: nn.Module) -> nn.Module:
    """Give norm layers non-trivial affine parameters and running statistics, from the global RNG.

    Weights ``0.5 + U(0, 1)``, biases ``0.3·N(0, 1)``; BatchNorm running means ``0.3·N(0, 1)`` and
    variances ``0.5 + U(0, 1)``. Modules are visited in ``model.modules()`` order; a model without
    norm layers draws nothing. Returns ``model`` (changed in place).
    """
    names = _NORMS + _BATCH_NORMS
    with torch.no_grad():
        for m in model.modules():
            kind = type(m).__name__
            if kind not in names:
                continue
            weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(weight, Tensor):
                weight.copy_(0.5 + torch.rand(weight.shape))
            if isinstance(bias, Tensor):
                bias.copy_(0.3 * torch.randn(bias.shape))
            mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if kind in _BATCH_NORMS and isinstance(mean, Tensor) and isinstance(var, Tensor):
                mean.copy_(0.3 * torch.randn(mean.shape))
                var.copy_(0.5 + torch.rand(var.shape))
    return model
