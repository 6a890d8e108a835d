"""Attention that batches under ``vmap`` on the CPU: the math kernel for small score matrices.

``F.scaled_dot_product_attention`` on the CPU picks torch's flash kernel, which has no ``vmap``
batching rule: inside the per-sample computation it runs as a loop over the chunk's samples, one
kernel call per sample per layer (in the forward and again in the backward). The math kernel,
``softmax(q kᵀ / √d + mask) v`` written with matrix products, batches like any product — at the
price of the per-sample score matrix ``[heads, L, S]`` that flash attention never forms (saved for
the backward, once per layer).

:class:`BatchedAttention` is a scoped ``TorchFunctionMode`` entered inside the per-sample function
(nothing is attached to the model) under which a CPU attention call runs the math kernel when its
score matrix is small: at most :data:`SCORES_PER_QUERY` times the size of the queries (``S ≤ 2·d_head``
keys per query, so the scores it saves for the backward add no more than the queries, keys, values
and output the attention holds anyway) and at most :data:`MAX_SCORES` elements per sample. Other
calls keep torch's choice, so a long-sequence language model's memory is that of flash attention.
Both kernels compute the same function (the results agree to rounding; ``tests/test_attention.py``).

Measured on the benchmarks' small transformers (``benchmarks/README.md``): the per-sample loop of
flash calls was the largest single cost of ``nn.TransformerEncoderLayer`` at ``T = 32`` under ``vmap``.
Where ``vmap(grad)`` through the fused kernel raises instead (torch 2.1, 2.2), the engine's scope
runs every CPU attention call through the math kernel (:func:`fused_attention_batches`,
:func:`math_attention`). Torch before 2.2 has no ``torch.nn.attention``, and in some versions
(2.4) the math kernel has no batching rule either: whether it batches is tried once per process on
a tiny input (:func:`math_kernel_batches`), and where it does not the mode is a no-op.

**The packed in-projection of** ``nn.MultiheadAttention`` (any device). torch's
``F.multi_head_attention_forward`` splits its one ``[T, N, 3E]`` projection into ``q, k, v`` by
copying it whole (``.contiguous()``) and indexing the copy three times, whose backward writes three
full-size zero tensors and adds them. The probe mode runs that function's body per sample
(:func:`~fisherfunc._engine.probes.transparent`) with :func:`in_projection_packed` in place of
torch's helper: the same ``F.linear`` call, split by views (``unbind``), whose backward is one
``stack``. Only self-attention of one sequence (``q is k is v``, ``N = 1``: what every per-sample
call is) takes it; the views then reshape exactly as torch's contiguous copies do, and the values
are the same (``tests/test_attention.py``). Measured on ``nn.TransformerEncoderLayer`` at ``T = 32``:
4–7% of a per-sample Fisher call.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .modes import Part

__all__ = [
    "BatchedAttention",
    "MAX_SCORES",
    "SCORES_PER_QUERY",
    "batched_attention",
    "math_kernel_batches",
    "fused_attention_batches",
    "math_attention",
    "in_projection_packed",
    "attention_replacements",
]

#: The largest per-sample score matrix ``heads · L · S`` (elements) that takes the math kernel:
#: 256 KiB in float32 per layer and sample, e.g. 4 heads of 128 × 128 positions.
MAX_SCORES = 1 << 16

#: The most keys per query, in units of the head dimension, for the math kernel (see above).
SCORES_PER_QUERY = 2

try:  # torch >= 2.2
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - the torch 2.1 floor
    SDPBackend = sdpa_kernel = None  # type: ignore[assignment,misc]


@functools.cache
def fused_attention_batches() -> bool:
    """Whether ``vmap(grad)`` runs through the fused attention kernel torch picks on the CPU.

    torch 2.1 and 2.2 have no batching rule for ``_scaled_dot_product_flash_attention`` and raise;
    later releases fall back to a loop. Probed once per process on tiny tensors.
    """
    q = torch.zeros(2, 1, 1, 2, 4)  # per sample [1, heads, T, D]: the 4-D, unmasked case torch 2.1 sends to flash

    def attend(x: Tensor) -> Tensor:
        return torch.nn.functional.scaled_dot_product_attention(x, x, x).sum()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.func.vmap(torch.func.grad(attend))(q)
    except RuntimeError:
        return False
    return True


def math_attention() -> contextlib.AbstractContextManager[Any]:
    """Attention through the math kernel only (torch's own switch, for the releases that lack a batching rule)."""
    if hasattr(torch.nn, "attention") and hasattr(torch.nn.attention, "sdpa_kernel"):
        return torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH])
    return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)


def _small(args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether one sample's CPU attention call has a small score matrix ``[*heads, L, S]`` (see above)."""
    q = args[0] if args else kwargs.get("query")
    k = args[1] if len(args) > 1 else kwargs.get("key")
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.ndim < 2 or k.ndim < 2:
        return False
    keys = k.shape[-2]
    scores = math.prod(q.shape[:-1]) * keys
    return q.device.type == "cpu" and keys <= SCORES_PER_QUERY * q.shape[-1] and scores <= MAX_SCORES


class BatchedAttention(Part):
    """Runs small CPU attention calls with the math kernel, which batches under ``vmap``."""

    funcs = frozenset({F.scaled_dot_product_attention})

    def handle(self, func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:  # noqa: D102
        if func is F.scaled_dot_product_attention and _small(args, kwargs):
            with sdpa_kernel([SDPBackend.MATH]):
                return self.proceed(func, args, kwargs)
        return self.proceed(func, args, kwargs)


@functools.cache
def math_kernel_batches() -> bool:
    """Whether this torch has the kernel choice and runs the CPU math kernel batched under ``vmap``.

    Tried on a tiny input: ``vmap`` warns when it falls back to a loop over samples.
    """
    if sdpa_kernel is None:
        return False
    q = torch.zeros(2, 1, 1, 2, 8)
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel([SDPBackend.MATH]):
        warnings.simplefilter("always")
        torch.func.vmap(lambda x: F.scaled_dot_product_attention(x, x, x))(q)
    return not any("performance drop" in str(w.message) for w in caught)


def batched_attention(device: torch.device) -> BatchedAttention | None:
    """:class:`BatchedAttention` for a CPU computation where the math kernel batches; else ``None``."""
    if device.type != "cpu" or not math_kernel_batches():
        return None
    return BatchedAttention()


#: torch's own helper (``None`` if this torch has none): the cases :func:`in_projection_packed` leaves to it.
_TORCH_IN_PROJECTION = getattr(F, "_in_projection_packed", None)


def in_projection_packed(q: Tensor, k: Tensor, v: Tensor, w: Tensor, b: Tensor | None = None) -> Any:
    """``q, k, v`` projections of ``F.multi_head_attention_forward``, split by views for one sequence.

    ``(q W_qᵀ + b_q, k W_kᵀ + b_k, v W_vᵀ + b_v)`` with ``W = [W_q; W_k; W_v]`` ``[3E, E]``; for
    self-attention of one sequence (``q is k is v``, ``q [T, 1, E]``) as one ``F.linear`` call whose
    ``[T, 1, 3E]`` output is unbound into three ``[T, 1, E]`` views (see above). Any other call is
    torch's ``F._in_projection_packed``.
    """
    if q is k and k is v and q.ndim == 3 and q.shape[1] == 1:
        return F.linear(q, w, b).unflatten(-1, (3, q.shape[-1])).unbind(-2)
    assert _TORCH_IN_PROJECTION is not None  # only installed where torch has the helper
    return _TORCH_IN_PROJECTION(q, k, v, w, b)


def attention_replacements(func: Any) -> dict[str, Any]:
    """Names replaced in the globals of the per-sample copy of ``func`` (:func:`.probes.transparent`)."""
    if func is F.multi_head_attention_forward and _TORCH_IN_PROJECTION is not None:
        return {"_in_projection_packed": in_projection_packed}
    return {}
