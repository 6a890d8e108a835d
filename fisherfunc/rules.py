"""Group rules: how one parameter's squared gradient is summed into groups.

A rule is a frozen dataclass (a pytree *leaf*, never a node). Every rule maps a tensor ``x`` of the
parameter's shape to a tensor of its :meth:`~Rule.group_shape` by **summing** entries, so
conservation holds for every rule::

    rule.reduce(x).sum() == x.sum()

``reduce`` is called inside ``torch.func.vmap`` on one sample's squared gradient, so it only uses
shape-static tensor operations (reshape, sum, index_add).

| rule            | typical parameter                               | result shape              |
|-----------------|-------------------------------------------------|---------------------------|
| ``Channel``     | Linear/Conv weight rows, biases, norms           | ``[size(axis)]``          |
| ``Heads``       | attention Q/K/V rows, O columns, fused QKV       | ``[heads]``/``[parts, heads]`` |
| ``Rows``        | Embedding weight, one value per token id         | ``[vocab]``               |
| ``Buckets``     | Embedding weight, token ids binned               | ``[n]``                   |
| ``Elementwise`` | the full diagonal                                | the parameter's shape     |
| ``Whole``       | one number per tensor                            | ``[]``                    |
| ``Skip``        | excluded: its gradient is never computed         | —                         |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Rule", "Channel", "Heads", "Rows", "Buckets", "Elementwise", "Whole", "Skip", "is_rule"]


class SpecError(ValueError):
    """A spec or rule does not fit the parameters it is applied to."""


def _normalise_axis(axis: int, ndim: int, name: str, rule: Rule) -> int:
    if not -ndim <= axis < ndim:
        raise SpecError(
            f"parameter '{name}': {rule!r} uses axis {axis}, but the parameter has {ndim} "
            f"dimension{'s' if ndim != 1 else ''} (valid axes: {-ndim}..{ndim - 1})"
        )
    return axis % ndim


def _sum_except(x: Tensor, keep: Sequence[int]) -> Tensor:
    dims = [d for d in range(x.ndim) if d not in keep]
    return x.sum(dim=dims) if dims else x


@dataclasses.dataclass(frozen=True)
class Rule:
    """Base class of all group rules.

    Subclasses implement :meth:`group_shape` (which also validates) and :meth:`reduce`.
    """

    #: Suffix of the flat key ``{task}|{param}|{group_type}``.
    group_type: str = dataclasses.field(default="", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        """The shape of the reduced groups for a parameter of ``shape``.

        Raises:
            SpecError: if the rule cannot apply to ``shape``; the message names ``name``.
        """
        raise NotImplementedError

    def reduce(self, x: Tensor) -> Tensor:
        """Sum ``x`` (shape: the parameter's) into groups (shape: :meth:`group_shape`)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Channel(Rule):
    """One value per index along ``axis``: ``F[i] = Σ_{entries with index i on axis} x``.

    Args:
        axis: the channel axis. 0 for ``nn.Linear``/``nn.Conv*`` weights, biases and norms; 1 for
            GPT-2 ``Conv1D`` (stored ``(in, out)``) and ``nn.ConvTranspose*`` (stored
            ``(in, out / groups, *kernel)``).
        groups: for grouped ``nn.ConvTranspose*``: output channel ``c`` of group ``g`` lives in
            rows ``g·in/groups … (g+1)·in/groups`` of axis 0 at index ``c mod (out/groups)`` on
            ``axis``. With ``groups > 1`` the result has ``groups · size(axis)`` entries, ordered
            like the layer's output channels. Leave at 1 everywhere else.
    """

    axis: int = 0
    groups: int = 1
    group_type: str = dataclasses.field(default="channel", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        axis = _normalise_axis(self.axis, len(shape), name, self)
        if self.groups < 1:
            raise SpecError(f"parameter '{name}': {self!r} needs groups >= 1")
        if self.groups > 1:
            if axis == 0:
                raise SpecError(f"parameter '{name}': {self!r}: groups > 1 needs a channel axis other than 0")
            if shape[0] % self.groups:
                raise SpecError(
                    f"parameter '{name}' of shape {tuple(shape)}: {self!r}: groups={self.groups} "
                    f"does not divide size {shape[0]} of axis 0"
                )
        return torch.Size([self.groups * shape[axis]])

    def reduce(self, x: Tensor) -> Tensor:
        axis = self.axis % x.ndim
        if self.groups == 1:
            return _sum_except(x, [axis])
        # [in, ...] -> [groups, in/groups, ...]; channel axis shifts by one.
        xg = x.reshape(self.groups, x.shape[0] // self.groups, *x.shape[1:])
        return _sum_except(xg, [0, axis + 1]).reshape(-1)


@dataclasses.dataclass(frozen=True)
class Heads(Rule):
    """One value per attention head along ``axis`` (``parts`` fused blocks, e.g. Q, K, V).

    The axis of size ``D`` is read as ``[parts, num_heads, D / (parts · num_heads)]`` (the layout of
    ``nn.MultiheadAttention.in_proj_weight``, GPT-2 ``c_attn`` and per-head projections)::

        F[p, h] = Σ_{j in block (p, h)} Σ_{other axes} x

    Args:
        num_heads: heads per part (for grouped-query K/V projections: the key-value heads).
        axis: 0 for Q/K/V rows (``nn.Linear`` layout), 1 for output-projection columns.
        parts: number of fused blocks along the axis (3 for a fused QKV projection).
    """

    num_heads: int
    axis: int = 0
    parts: int = 1
    group_type: str = dataclasses.field(default="head", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        axis = _normalise_axis(self.axis, len(shape), name, self)
        if self.num_heads < 1 or self.parts < 1:
            raise SpecError(f"parameter '{name}': {self!r} needs num_heads >= 1 and parts >= 1")
        blocks = self.num_heads * self.parts
        if shape[axis] % blocks:
            raise SpecError(
                f"parameter '{name}' of shape {tuple(shape)}: {self!r}: {self.parts} part(s) × "
                f"{self.num_heads} heads = {blocks} does not divide size {shape[axis]} of axis {axis}"
            )
        return torch.Size([self.num_heads] if self.parts == 1 else [self.parts, self.num_heads])

    def reduce(self, x: Tensor) -> Tensor:
        axis = self.axis % x.ndim
        per_block = _sum_except(x, [axis]).reshape(self.parts, self.num_heads, -1).sum(-1)
        return per_block[0] if self.parts == 1 else per_block


@dataclasses.dataclass(frozen=True)
class Rows(Rule):
    """One value per row of an embedding table (per token id): ``F[v] = Σ_j x[v, j]``."""

    group_type: str = dataclasses.field(default="token", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        if len(shape) < 1:
            raise SpecError(f"parameter '{name}': Rows() needs at least one dimension, got a scalar")
        return torch.Size([shape[0]])

    def reduce(self, x: Tensor) -> Tensor:
        return _sum_except(x, [0])


@dataclasses.dataclass(frozen=True)
class Buckets(Rule):
    """Embedding rows summed into buckets: ``F[k] = Σ_{v: bucket(v) = k} Σ_j x[v, j]``.

    Args:
        num_buckets: number of buckets ``n``. Without ``mapping``, row ``v`` of a table with ``V``
            rows goes to bucket ``⌊v · n / V⌋`` (contiguous, near-equal ranges of ids).
        mapping: optional explicit bucket of every row (length ``V``, values in ``[0, n)``).
            ``num_buckets`` defaults to ``max(mapping) + 1`` when given a mapping.
    """

    num_buckets: int | None = None
    mapping: tuple[int, ...] | None = None
    group_type: str = dataclasses.field(default="bucket", init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mapping is not None:
            object.__setattr__(self, "mapping", tuple(int(v) for v in self.mapping))
            if self.num_buckets is None and self.mapping:
                object.__setattr__(self, "num_buckets", max(self.mapping) + 1)
        if self.num_buckets is None:
            raise SpecError("Buckets needs num_buckets or a mapping")

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        assert self.num_buckets is not None
        if len(shape) < 1:
            raise SpecError(f"parameter '{name}': {self!r} needs at least one dimension")
        if self.num_buckets < 1:
            raise SpecError(f"parameter '{name}': Buckets needs num_buckets >= 1, got {self.num_buckets}")
        if self.mapping is not None:
            if len(self.mapping) != shape[0]:
                raise SpecError(
                    f"parameter '{name}' has {shape[0]} rows but the Buckets mapping has {len(self.mapping)} entries"
                )
            bad = [v for v in self.mapping if not 0 <= v < self.num_buckets]
            if bad:
                raise SpecError(f"parameter '{name}': Buckets mapping value {bad[0]} outside [0, {self.num_buckets})")
        return torch.Size([self.num_buckets])

    def bucket_of_rows(self, num_rows: int, device: torch.device | None = None) -> Tensor:
        """The bucket index of every row, shape ``[num_rows]`` (int64)."""
        assert self.num_buckets is not None
        if self.mapping is not None:
            return torch.tensor(self.mapping, dtype=torch.long, device=device)
        rows = torch.arange(num_rows, device=device)
        return torch.div(rows * self.num_buckets, num_rows, rounding_mode="floor")

    def reduce(self, x: Tensor) -> Tensor:
        assert self.num_buckets is not None
        per_row = _sum_except(x, [0])
        index = self.bucket_of_rows(x.shape[0], device=x.device)
        return per_row.new_zeros(self.num_buckets).index_add(0, index, per_row)


@dataclasses.dataclass(frozen=True)
class Elementwise(Rule):
    """No reduction: the full diagonal, one value per parameter entry."""

    group_type: str = dataclasses.field(default="param", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        return torch.Size(shape)

    def reduce(self, x: Tensor) -> Tensor:
        return x


@dataclasses.dataclass(frozen=True)
class Whole(Rule):
    """One number per tensor: ``F = Σ x``."""

    group_type: str = dataclasses.field(default="tensor", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        return torch.Size([])

    def reduce(self, x: Tensor) -> Tensor:
        return x.sum()


@dataclasses.dataclass(frozen=True)
class Skip(Rule):
    """Exclude the parameter: its gradient is not computed and its group tree entry is ``None``."""

    group_type: str = dataclasses.field(default="", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        raise SpecError(f"parameter '{name}' is skipped and has no groups")

    def reduce(self, x: Tensor) -> Tensor:
        raise SpecError("Skip() has no groups")


def is_rule(x: object) -> bool:
    """Whether ``x`` is a group rule (a spec leaf)."""
    return isinstance(x, Rule)
