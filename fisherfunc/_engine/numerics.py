"""The engine's numerics: which dtype the per-sample computation runs in, and the scope it runs under.

``prepare`` flattens the params once per call: leaves are detached, and floating ones are cast to
the compute dtype — float64 if any differentiated parameter is float64, else float32, whatever the
model's dtype (DESIGN §5: squares, sums and states are float32 or wider). Inputs are cast the same
way chunk by chunk (:func:`~fisherfunc._engine.batches.cast_floating`).

``scope`` is entered around every vectorised call. Results must not depend on an outer autocast,
so autocast is disabled on the params' device types. torch's notice that ``vmap`` falls back to a
loop for an operator without a batching rule (CPU flash attention, EmbeddingBag) is silenced: the
result is exact either way. Where torch has no batching rule at all for the fused attention
kernel it would pick (torch 2.1–2.2 on CPU), attention runs through the math kernel, which batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from .._naming import path_name
from .._spec.rules import SpecError

__all__ = ["Prepared", "prepare", "compute_dtype", "scope"]


def compute_dtype(leaves: Sequence[Tensor]) -> torch.dtype:
    """float64 if any of ``leaves`` is float64, else float32 (whatever the model's dtype)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in leaves) else torch.float32


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """Params flattened once: detached leaves, floating ones cast to the compute dtype.

    Attributes:
        treespec: the params' tree structure.
        names: dotted name of each leaf, in flattening order.
        leaves: the leaves (floating ones in ``dtype``), detached.
        dtype: the compute dtype.
        device_types: device types of the params (for the numerics scope).
    """

    treespec: optree.PyTreeSpec
    names: tuple[str, ...]
    leaves: tuple[Tensor, ...]
    dtype: torch.dtype
    device_types: frozenset[str]

    @property
    def device(self) -> torch.device:
        """The device of the first leaf (where the per-sample work runs)."""
        return self.leaves[0].device

    def tree(self, replace: Mapping[int, Tensor] | None = None) -> Any:
        """The params tree, with the leaves at the indices of ``replace`` replaced."""
        leaves = list(self.leaves)
        for i, value in (replace or {}).items():
            leaves[i] = value
        return optree.tree_unflatten(self.treespec, leaves)


def prepare(params: Any, *, differentiated: Sequence[int] | None = None) -> Prepared:
    """Flatten ``params`` and cast floating leaves to the compute dtype (the caller's tensors are untouched).

    Args:
        params: pytree of parameter tensors.
        differentiated: indices of the leaves whose gradients are taken; the compute dtype is
            float64 if any of them (default: any floating leaf) is float64.

    Raises:
        SpecError: for an empty tree or a leaf that is not a tensor, naming it.
    """
    paths, leaves, treespec = optree.tree_flatten_with_path(params)
    if not leaves:
        raise SpecError("params is an empty tree: there is nothing to compute Fisher information of")
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, Tensor):
            raise SpecError(f"parameter '{path_name(path)}' is a {type(leaf).__name__}, not a torch.Tensor")
    chosen = [leaves[i] for i in differentiated] if differentiated is not None else leaves
    dtype = compute_dtype([x for x in chosen if x.is_floating_point()])
    cast = tuple(x.detach().to(dtype) if x.is_floating_point() else x.detach() for x in leaves)
    return Prepared(
        treespec=treespec,
        names=tuple(path_name(p) for p in paths),
        leaves=cast,
        dtype=dtype,
        device_types=frozenset(x.device.type for x in leaves),
    )


@functools.cache
def _fused_attention_batches() -> bool:
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


def _math_attention() -> contextlib.AbstractContextManager[Any]:
    """Attention through the math kernel only (torch's own switch, for the releases that lack a batching rule)."""
    if hasattr(torch.nn, "attention") and hasattr(torch.nn.attention, "sdpa_kernel"):
        return torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH])
    return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)


@contextlib.contextmanager
def scope(device_types: frozenset[str] | set[str]) -> Iterator[None]:
    """The engine's numerics scope: autocast off, vmap's fallback notice silenced, attention that batches."""
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        for device_type in sorted(device_types):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        if "cpu" in device_types and not _fused_attention_batches():
            stack.enter_context(_math_attention())
        yield
