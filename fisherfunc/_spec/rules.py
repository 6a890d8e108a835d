"""Group rules: how one parameter's squared gradient is summed into groups, and the geometry behind it.

A rule is a frozen dataclass (a pytree *leaf*, never a node). Every rule maps a tensor ``x`` of the
parameter's shape to a tensor of its :meth:`~Rule.group_shape` by **summing** entries: each entry
of the parameter belongs to exactly one group, so conservation holds for every rule::

    rule.reduce(x).sum() == x.sum()

A rule owns its geometry — everything the engine, the perturbations and the keys ask of it:

| method                    | answers                                                           |
|---------------------------|-------------------------------------------------------------------|
| ``group_shape(shape)``    | the groups' shape (and whether the rule fits the parameter)       |
| ``reduce(x)``             | ``Σ`` of the entries of each group (called inside ``vmap``)        |
| ``membership(shape)``     | the flat group index of every entry                               |
| ``square_sums(shape)``    | for a 2-D weight ``G``: which sums of ``G ⊙ G`` fix the groups     |
|                           | (``"rows"`` ``Σ_j G_ij²``, ``"cols"`` ``Σ_i G_ij²``, or ``"full"``)|
| ``from_square_sums(...)`` | the groups from those sums (the factorised path, K-FAC diagonals)  |

A new rule is one subclass with ``group_type``, ``group_shape`` and ``reduce``: the base class
derives the rest from ``reduce`` (``membership`` is the transpose of the summation applied to the
group numbers, and ``square_sums`` reads off whether membership depends on rows or columns only).
The built-in rules state their geometry directly, and the tests check it against the derived one.

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
import math
from collections.abc import Callable, Sequence
from typing import Literal, cast

import torch
from torch import Tensor

__all__ = [
    "Rule",
    "Channel",
    "Heads",
    "Rows",
    "Buckets",
    "Elementwise",
    "Whole",
    "Skip",
    "SpecError",
    "SquareSums",
    "is_rule",
]

#: Which sums of a 2-D weight gradient's square ``G ⊙ G`` a rule's groups are made of.
SquareSums = Literal["rows", "cols", "full"]
Device = torch.device | str | None


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


def _along(values: Tensor, axis: int, shape: torch.Size) -> Tensor:
    """Broadcast ``values`` (``[shape[axis]]``) along ``axis`` to ``shape``."""
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return values.reshape(view).expand(shape).contiguous()


def _check_2d(shape: torch.Size, rule: Rule) -> None:
    if len(shape) != 2:
        raise SpecError(f"{rule!r}: square sums are defined for 2-D weights, got shape {tuple(shape)}")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Base class of all group rules.

    Subclasses set ``group_type`` and implement :meth:`group_shape` (which also validates) and
    :meth:`reduce`; the other methods have exact defaults derived from :meth:`reduce`.
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

    def membership(self, shape: torch.Size | Sequence[int], device: Device = None) -> Tensor:
        """The flat group index of every entry of a parameter of ``shape``.

        The default is the transpose of the summation: ``reduce`` is linear, ``reduce(x) = R x``
        with ``R[g, i] = [entry i is in group g]``, so ``Rᵀ c`` with ``c_g = g`` gives every entry
        its group, and ``Rᵀ 1 = 1`` checks that each entry is in exactly one group.

        Args:
            shape: the parameter's shape.
            device: device of the result.

        Returns:
            int64 tensor of ``shape``; entry ``i`` holds the index of its group in the flattened
            (row-major) group shape, in ``[0, prod(group_shape))``.

        Raises:
            SpecError: if the rule does not fit ``shape``, or its ``reduce`` is not a sum over a
                partition of the entries.

        >>> import fisherfunc as ff
        >>> ff.Heads(2, axis=1).membership((1, 4)).tolist()
        [[0, 0, 1, 1]]
        """
        shape = torch.Size(shape)
        groups = self.group_shape(shape)
        _, transpose = cast(
            tuple[Tensor, Callable[[Tensor], tuple[Tensor]]],
            torch.func.vjp(self.reduce, torch.zeros(shape, dtype=torch.float64, device=device)),
        )
        (owner,) = transpose(torch.arange(math.prod(groups), dtype=torch.float64, device=device).reshape(groups))
        (count,) = transpose(torch.ones(groups, dtype=torch.float64, device=device))
        if not bool((count == 1).all()):
            raise SpecError(
                f"{self!r}: reduce must sum every entry of a {tuple(shape)} parameter into exactly one group "
                "(a partition), so that groups have members; it does not"
            )
        return owner.round().to(torch.long)

    def square_sums(self, shape: torch.Size | Sequence[int]) -> SquareSums:
        """For a 2-D weight with gradient ``G``: which sums of ``G ⊙ G`` determine the groups.

        ``"rows"`` when every row lies in one group (``Σ_j G_ij²`` suffices), ``"cols"`` when every
        column does, else ``"full"``. The default reads it off :meth:`membership`.
        """
        shape = torch.Size(shape)
        _check_2d(shape, self)
        owner = self.membership(shape)
        if bool((owner == owner[:, :1]).all()):
            return "rows"
        if bool((owner == owner[:1, :]).all()):
            return "cols"
        return "full"

    def from_square_sums(self, shape: torch.Size | Sequence[int], sums: SquareSums) -> Callable[[Tensor], Tensor]:
        """A function from the sums of :meth:`square_sums` to the groups, prepared once per shape.

        The function maps row sums ``[n0]``, column sums ``[n1]`` or the full square ``[n0, n1]`` to
        ``reduce(G ⊙ G)`` and runs inside ``vmap``. The default scatters the sums into the groups
        by :meth:`membership` (computed here, outside the vectorised code).
        """
        shape = torch.Size(shape)
        _check_2d(shape, self)
        if sums == "full":
            return self.reduce
        groups = self.group_shape(shape)
        owner = self.membership(shape)
        index = owner[:, 0] if sums == "rows" else owner[0, :]
        size = math.prod(groups)

        def reduce_sums(values: Tensor) -> Tensor:
            return values.new_zeros(size).index_add(0, index.to(values.device), values).reshape(groups)

        return reduce_sums


class _Broadcast(Rule):
    """A built-in rule whose ``reduce`` sums over any axis of size 1 as well: square sums pass as is.

    ``reduce(rows[:, None])`` sums row sums exactly as ``reduce`` sums the rows of ``G ⊙ G``.
    """

    def from_square_sums(self, shape: torch.Size | Sequence[int], sums: SquareSums) -> Callable[[Tensor], Tensor]:
        _check_2d(torch.Size(shape), self)
        if sums == "rows":
            return lambda values: self.reduce(values.unsqueeze(1))
        if sums == "cols":
            return lambda values: self.reduce(values.unsqueeze(0))
        return self.reduce


@dataclasses.dataclass(frozen=True)
class Channel(_Broadcast):
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

    def membership(self, shape: torch.Size | Sequence[int], device: Device = None) -> Tensor:
        shape = torch.Size(shape)
        self.group_shape(shape)
        axis = self.axis % len(shape)
        index = _along(torch.arange(shape[axis], device=device), axis, shape)
        if self.groups > 1:  # output channel c of row block r: r · size(axis) + c
            block = torch.div(torch.arange(shape[0], device=device), shape[0] // self.groups, rounding_mode="floor")
            index = _along(block, 0, shape) * shape[axis] + index
        return index

    def square_sums(self, shape: torch.Size | Sequence[int]) -> SquareSums:
        _check_2d(torch.Size(shape), self)
        if self.groups > 1:  # a row block and a column together make a channel
            return "full"
        return "rows" if self.axis % 2 == 0 else "cols"


@dataclasses.dataclass(frozen=True)
class Heads(_Broadcast):
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

    def membership(self, shape: torch.Size | Sequence[int], device: Device = None) -> Tensor:
        shape = torch.Size(shape)
        self.group_shape(shape)
        axis = self.axis % len(shape)
        width = shape[axis] // (self.parts * self.num_heads)  # block (p, h) is at flat p · heads + h
        block = torch.div(torch.arange(shape[axis], device=device), width, rounding_mode="floor")
        return _along(block, axis, shape)

    def square_sums(self, shape: torch.Size | Sequence[int]) -> SquareSums:
        _check_2d(torch.Size(shape), self)
        return "rows" if self.axis % 2 == 0 else "cols"


@dataclasses.dataclass(frozen=True)
class Rows(_Broadcast):
    """One value per row of an embedding table (per token id): ``F[v] = Σ_j x[v, j]``."""

    group_type: str = dataclasses.field(default="token", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        if len(shape) < 1:
            raise SpecError(f"parameter '{name}': Rows() needs at least one dimension, got a scalar")
        return torch.Size([shape[0]])

    def reduce(self, x: Tensor) -> Tensor:
        return _sum_except(x, [0])

    def membership(self, shape: torch.Size | Sequence[int], device: Device = None) -> Tensor:
        shape = torch.Size(shape)
        self.group_shape(shape)
        return _along(torch.arange(shape[0], device=device), 0, shape)

    def square_sums(self, shape: torch.Size | Sequence[int]) -> SquareSums:
        _check_2d(torch.Size(shape), self)
        return "rows"


@dataclasses.dataclass(frozen=True)
class Buckets(_Broadcast):
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

    @property
    def buckets(self) -> int:
        """``n``, the number of buckets."""
        assert self.num_buckets is not None  # set by __post_init__
        return self.num_buckets

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        if len(shape) < 1:
            raise SpecError(f"parameter '{name}': {self!r} needs at least one dimension")
        if self.buckets < 1:
            raise SpecError(f"parameter '{name}': Buckets needs num_buckets >= 1, got {self.num_buckets}")
        if self.mapping is not None:
            if len(self.mapping) != shape[0]:
                raise SpecError(
                    f"parameter '{name}' has {shape[0]} rows but the Buckets mapping has {len(self.mapping)} entries"
                )
            bad = [v for v in self.mapping if not 0 <= v < self.buckets]
            if bad:
                raise SpecError(f"parameter '{name}': Buckets mapping value {bad[0]} outside [0, {self.num_buckets})")
        return torch.Size([self.buckets])

    def bucket_of_rows(self, num_rows: int, device: Device = None) -> Tensor:
        """The bucket index of every row, shape ``[num_rows]`` (int64)."""
        if self.mapping is not None:
            return torch.tensor(self.mapping, dtype=torch.long, device=device)
        rows = torch.arange(num_rows, device=device)
        return torch.div(rows * self.buckets, num_rows, rounding_mode="floor")

    def reduce(self, x: Tensor) -> Tensor:
        per_row = _sum_except(x, [0])
        index = self.bucket_of_rows(x.shape[0], device=x.device)
        return per_row.new_zeros(self.buckets).index_add(0, index, per_row)

    def membership(self, shape: torch.Size | Sequence[int], device: Device = None) -> Tensor:
        shape = torch.Size(shape)
        self.group_shape(shape)
        return _along(self.bucket_of_rows(shape[0], device=device), 0, shape)

    def square_sums(self, shape: torch.Size | Sequence[int]) -> SquareSums:
        _check_2d(torch.Size(shape), self)
        return "rows"


@dataclasses.dataclass(frozen=True)
class Elementwise(_Broadcast):
    """No reduction: the full diagonal, one value per parameter entry."""

    group_type: str = dataclasses.field(default="param", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        return torch.Size(shape)

    def reduce(self, x: Tensor) -> Tensor:
        return x

    def membership(self, shape: torch.Size | Sequence[int], device: Device = None) -> Tensor:
        shape = torch.Size(shape)
        return torch.arange(shape.numel(), device=device).reshape(shape)

    def square_sums(self, shape: torch.Size | Sequence[int]) -> SquareSums:
        _check_2d(torch.Size(shape), self)
        return "full"


@dataclasses.dataclass(frozen=True)
class Whole(_Broadcast):
    """One number per tensor: ``F = Σ x``."""

    group_type: str = dataclasses.field(default="tensor", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        return torch.Size([])

    def reduce(self, x: Tensor) -> Tensor:
        return x.sum()

    def membership(self, shape: torch.Size | Sequence[int], device: Device = None) -> Tensor:
        return torch.zeros(torch.Size(shape), dtype=torch.long, device=device)

    def square_sums(self, shape: torch.Size | Sequence[int]) -> SquareSums:
        _check_2d(torch.Size(shape), self)
        return "rows"


@dataclasses.dataclass(frozen=True)
class Skip(Rule):
    """Exclude the parameter: its gradient is not computed and its group tree entry is ``None``."""

    group_type: str = dataclasses.field(default="", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        raise SpecError(f"parameter '{name}' is skipped and has no groups")

    def reduce(self, x: Tensor) -> Tensor:
        raise SpecError("Skip() has no groups")

    def membership(self, shape: torch.Size | Sequence[int], device: Device = None) -> Tensor:
        raise SpecError("Skip() has no groups, so its entries belong to none")


def is_rule(x: object) -> bool:
    """Whether ``x`` is a group rule (a spec leaf)."""
    return isinstance(x, Rule)
