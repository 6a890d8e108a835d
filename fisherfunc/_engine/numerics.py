"""The engine's numerics: which dtype the per-sample computation runs in, and the scope it runs under.

Two precision policies (``precision=`` of every estimate):

| policy        | forward and backward in                        | parameters        | squares, sums |
|---------------|------------------------------------------------|-------------------|---------------|
| ``"float32"`` | float32 (float64 for float64 ones), no autocast | a float32 copy    | float32 (64)  |
| ``"model"``   | the model's dtype, under the caller's autocast  | as they are       | float32 (64)  |

``prepare`` flattens the params once per call: leaves are detached, and under ``"float32"`` floating
ones are cast to the compute dtype — float64 if any differentiated parameter is float64, else
float32, whatever the model's dtype (DESIGN §5). Under ``"model"`` nothing is cast; the compute
dtype (the dtype of the probes added to layer outputs, and of floating inputs) is the caller's
autocast dtype where autocast is on for the params' device, else the narrowest floating dtype of
the differentiated parameters. Float16 is refused under ``"model"``: a per-sample gradient below
6e-8 would flush to zero, silently; bfloat16 has float32's range. Inputs are cast to the compute dtype chunk by chunk
(:func:`~fisherfunc._engine.batches.cast_floating`); under ``"model"`` that never widens them past
what the model computes in. Squares and sums are widened to float32 where the per-sample values
come narrower (:func:`~fisherfunc._engine.group_sums.widen`).

A params dict holding only some of a model's parameters (only the attention, only some layers,
only LoRA adapters) is completed with the model's other parameters, detached (and cast under
``"float32"``), so the forward sees one model in one dtype and nothing outside the dict is
differentiated or tracked by autograd.

``scope`` is entered around every vectorised call. Under ``"float32"`` results must not depend on
an outer autocast, so autocast is disabled on the params' device types; under ``"model"`` the
caller's autocast is kept. torch's notice that ``vmap`` falls back to a loop for an operator
without a batching rule (CPU flash attention, EmbeddingBag) is silenced: the result is exact either
way. Where torch has no batching rule at all for the fused attention kernel it would pick (torch
2.1–2.2 on CPU), attention runs through the math kernel, which batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import optree
import torch
from torch import Tensor

from .._naming import path_name
from .._spec.rules import SpecError
from .attention import fused_attention_batches, math_attention

__all__ = [
    "Precision",
    "PRECISIONS",
    "check_precision",
    "Prepared",
    "prepare",
    "compute_dtype",
    "autocast_dtype",
    "scope",
]

#: ``"float32"``: forward and backward in float32 (float64 for float64 parameters), parameters cast;
#: ``"model"``: in the model's own dtype, under the caller's autocast, nothing cast.
Precision = Literal["float32", "model"]
PRECISIONS: tuple[str, ...] = ("float32", "model")


def check_precision(precision: Any) -> None:
    """Raise ``ValueError`` naming ``precision=`` unless it is ``"float32"`` or ``"model"``."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(
            f"precision must be 'float32' (forward and backward in float32; the default) or 'model' (in the "
            f"model's own dtype, e.g. bfloat16, with float32 squares and sums), got {precision!r}"
        )


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the caller's autocast on ``device_type``, or ``None`` where autocast is off."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None


def compute_dtype(leaves: Sequence[Tensor], precision: Precision = "float32") -> torch.dtype:
    """The dtype the per-sample computation runs in, for the differentiated floating ``leaves``.

    ``"float32"``: float64 if any of ``leaves`` is float64, else float32 (whatever the model's
    dtype). ``"model"``: the caller's autocast dtype if autocast is on for the leaves' device, else
    the narrowest dtype of ``leaves`` (float32 if there are none).
    """
    if precision == "float32":
        return torch.float64 if any(x.dtype == torch.float64 for x in leaves) else torch.float32
    for device_type in sorted({x.device.type for x in leaves}):
        dtype = autocast_dtype(device_type)
        if dtype is not None:
            return dtype
    if not leaves:
        return torch.float32
    return min((x.dtype for x in leaves), key=lambda d: torch.finfo(d).bits)


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """Params flattened once: detached leaves, floating ones cast to the compute dtype under ``"float32"``.

    Attributes:
        treespec: the params' tree structure.
        names: dotted name of each leaf, in flattening order.
        leaves: the leaves (under ``"float32"`` floating ones in ``dtype``), detached.
        dtype: the compute dtype (of probes and floating inputs).
        device_types: device types of the params (for the numerics scope).
        precision: the precision policy.
        rest: the model's parameters the params dict does not hold, detached (cast like the leaves),
            added to the tree the loss sees (see :func:`prepare`).
        copied_bytes: bytes of the copies the cast made (``0`` under ``"model"``).
    """

    treespec: optree.PyTreeSpec
    names: tuple[str, ...]
    leaves: tuple[Tensor, ...]
    dtype: torch.dtype
    device_types: frozenset[str]
    precision: Precision = "float32"
    rest: Mapping[str, Tensor] = dataclasses.field(default_factory=dict)
    copied_bytes: int = 0

    @property
    def device(self) -> torch.device:
        """The device of the first leaf (where the per-sample work runs)."""
        return self.leaves[0].device

    def tree(self, replace: Mapping[int, Tensor] | None = None) -> Any:
        """The params tree, with the leaves at the indices of ``replace`` replaced."""
        leaves = list(self.leaves)
        for i, value in (replace or {}).items():
            leaves[i] = value
        tree = optree.tree_unflatten(self.treespec, leaves)
        return {**self.rest, **tree} if self.rest else tree


def _detached(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``x`` detached, a floating one cast to ``dtype`` (``None``: as it is)."""
    y = x.detach()
    return y.to(dtype) if dtype is not None and y.is_floating_point() else y


def _rest_of(model: Any, params: Any) -> dict[str, Tensor]:
    """The parameters of ``model`` that a flat params dict (keys among the model's names) does not hold."""
    if not isinstance(model, torch.nn.Module) or not isinstance(params, Mapping) or not params:
        return {}
    named = dict(model.named_parameters())
    if not all(isinstance(k, str) and k in named for k in params):
        return {}
    given = {id(v) for v in params.values()}
    return {k: v for k, v in named.items() if k not in params and id(v) not in given}


def prepare(
    params: Any,
    *,
    differentiated: Sequence[int] | None = None,
    precision: Precision = "float32",
    model: Any = None,
) -> Prepared:
    """Flatten ``params`` and, under ``"float32"``, cast floating leaves to the compute dtype.

    The caller's tensors are untouched.

    Args:
        params: pytree of parameter tensors.
        differentiated: indices of the leaves whose gradients are taken; the compute dtype is
            chosen from them (default: every floating leaf), see :func:`compute_dtype`.
        precision: ``"float32"`` or ``"model"``.
        model: the loss's ``nn.Module``, if known. When ``params`` is a flat dict holding some of its
            parameters (by name), the others are added to the tree the loss sees, detached and
            cast like the leaves: a subset is measured without autograd tracking the rest.

    Raises:
        SpecError: for an empty tree or a leaf that is not a tensor, naming it.
        ValueError: for a ``precision`` other than ``"float32"`` or ``"model"``, ``"model"`` with a
            float16 compute dtype (refused: see the message), or a leaf on the ``meta`` device.
    """
    check_precision(precision)
    paths, leaves, treespec = optree.tree_flatten_with_path(params)
    if not leaves:
        raise SpecError("params is an empty tree: there is nothing to compute Fisher information of")
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, Tensor):
            raise SpecError(f"parameter '{path_name(path)}' is a {type(leaf).__name__}, not a torch.Tensor")
        if leaf.device.type == "meta":
            raise ValueError(
                f"parameter '{path_name(path)}' is on the 'meta' device and holds no values (a model loaded with "
                "device_map/offloading, or built under init_empty_weights): load its weights onto one device first "
                "(see docs/scale.md for models that do not fit one device)"
            )
    chosen = [leaves[i] for i in differentiated] if differentiated is not None else leaves
    dtype = compute_dtype([x for x in chosen if x.is_floating_point()], precision)
    if precision == "model" and dtype == torch.float16:
        raise ValueError(
            "precision='model' refuses float16: a per-sample gradient below float16's smallest value (6e-8) "
            "would be flushed to zero and its Fisher silently lost (squares of float16 gradients underflow "
            "long before the gradients do). Use a bfloat16 model (model.to(torch.bfloat16), or autocast with "
            "dtype=torch.bfloat16), or precision='float32'"
        )
    cast_to = dtype if precision == "float32" else None
    originals = (*leaves, *(rest := _rest_of(model, params)).values())
    copies = (*(_detached(x, cast_to) for x in leaves), *(_detached(x, cast_to) for x in rest.values()))
    copied = sum(y.nbytes for x, y in zip(originals, copies) if y.data_ptr() != x.data_ptr())
    return Prepared(
        treespec=treespec,
        names=tuple(path_name(p) for p in paths),
        leaves=copies[: len(leaves)],
        dtype=dtype,
        device_types=frozenset(x.device.type for x in leaves),
        precision=precision,
        rest=dict(zip(rest, copies[len(leaves) :])),
        copied_bytes=copied,
    )


@contextlib.contextmanager
def scope(of: Prepared | frozenset[str] | set[str]) -> Iterator[None]:
    """The engine's numerics scope: autocast off (kept under ``"model"``), no fallback notice, attention that batches.

    Args:
        of: the prepared params (their devices and precision), or device types (autocast off on them).
    """
    keep_autocast = isinstance(of, Prepared) and of.precision == "model"
    device_types = of.device_types if isinstance(of, Prepared) else of
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        for device_type in sorted(device_types) if not keep_autocast else ():
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        if "cpu" in device_types and not fused_attention_batches():  # torch 2.1/2.2: flash under vmap raises
            stack.enter_context(math_attention())
        yield
