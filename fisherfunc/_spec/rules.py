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


@dataclasses.dataclass(frozen=True, repr=False)
class Heads(_Broadcast):
    """One value per attention head along ``axis`` (``parts`` fused blocks, e.g. Q, K, V).

    The axis of size ``D`` holds ``parts`` blocks: part 0 (the queries, or the only part) has
    ``H = num_heads`` heads, every later part ``KV = kv_heads`` (default ``H``) heads, all of width
    ``d = D / (H + (parts − 1)·KV)``. How they are laid out along the axis, outermost first:

    | layout            | the axis, outermost first                      | e.g.                                  |
    |-------------------|------------------------------------------------|---------------------------------------|
    | ``"blocked"``     | ``[part 0: H·d │ part 1: KV·d │ …]``            | ``in_proj`` of MHA, GPT-2, Phi-3      |
    | ``"interleaved"`` | ``[KV, r + parts − 1, d]``, ``r = H / KV``     | GPT-NeoX, Bloom: ``[H, 3, d]``        |
    | ``shards = S``    | ``[S, part 0: H·d/S │ part 1: KV·d/S │ …]``     | CodeGen (``S = 4``)                   |

    Blocked: each part's heads one after another (Falcon's and GPT-BigCode's multi-query
    ``[Q: H·d │ K: d │ V: d]`` too). Interleaved: for key-value head ``g``, its ``r`` query heads,
    then its head of every later part (Falcon's new decoder architecture; ``r = 1`` is the
    ``[H, parts, d]`` of GPT-NeoX, Bloom and GPT-BigCode). Sharded: the blocked layout cut into ``S``
    shards, each part's pieces concatenated in shard order.

    Every entry of part ``p``, head ``h`` goes to one group::

        F[p, h] = Σ_{j in block (p, h)} Σ_{other axes} x

    Args:
        num_heads: ``H``, heads of part 0 (for a separate grouped-query K/V projection: its
            key-value heads).
        axis: 0 for Q/K/V rows (``nn.Linear`` layout), 1 for output-projection columns.
        parts: number of fused blocks along the axis (3 for a fused QKV projection).
        kv_heads: ``KV``, heads of parts 1, 2, … when fewer than ``H`` (a fused projection with
            grouped- or multi-query keys and values); ``None``: ``H``.
        layout: ``"blocked"`` or ``"interleaved"`` (the table above).
        shards: ``S`` for a blocked layout split across shards; 1 otherwise.

    The groups have shape ``[H]`` for one part, ``[parts, H]`` when every part has ``H`` heads, and
    ``[H + (parts − 1)·KV]`` (part 0's heads, then part 1's, …) when ``KV ≠ H``.

    >>> import torch, fisherfunc as ff
    >>> ff.Heads(2, parts=3, layout="interleaved").membership((6, 1)).flatten().tolist()  # [heads, 3, d=1]
    [0, 2, 4, 1, 3, 5]
    >>> ff.Heads(2, parts=3, kv_heads=1).group_shape(torch.Size([4, 8]))                  # [Q0 Q1 | K | V]
    torch.Size([4])
    """

    num_heads: int
    axis: int = 0
    parts: int = 1
    kv_heads: int | None = dataclasses.field(default=None, kw_only=True)
    layout: Literal["blocked", "interleaved"] = dataclasses.field(default="blocked", kw_only=True)
    shards: int = dataclasses.field(default=1, kw_only=True)
    group_type: str = dataclasses.field(default="head", init=False, repr=False)

    def __repr__(self) -> str:
        extra = "".join(
            f", {f}={getattr(self, f)!r}"
            for f, default in (("kv_heads", None), ("layout", "blocked"), ("shards", 1))
            if getattr(self, f) != default
        )
        return f"Heads(num_heads={self.num_heads}, axis={self.axis}, parts={self.parts}{extra})"

    def _counts(self) -> list[int]:
        """Heads of every part: ``[H, KV, KV, …]``."""
        kv = self.num_heads if self.kv_heads is None else self.kv_heads
        return [self.num_heads] + [kv] * (self.parts - 1)

    def _check(self, name: str) -> None:
        problem = None
        if self.num_heads < 1 or self.parts < 1 or self.shards < 1:
            problem = "needs num_heads >= 1, parts >= 1 and shards >= 1"
        elif self.layout not in ("blocked", "interleaved"):
            problem = f"has layout {self.layout!r}; choose 'blocked' or 'interleaved'"
        elif self.kv_heads is not None and (self.kv_heads < 1 or self.parts < 2):
            problem = "needs kv_heads >= 1, and parts >= 2 (key-value heads are those of the parts after the first)"
        elif self.layout == "interleaved" and (self.shards != 1 or self.num_heads % self._counts()[-1]):
            problem = "interleaves whole key-value groups: it needs shards = 1 and kv_heads dividing num_heads"
        if problem is not None:
            raise SpecError(f"parameter '{name}': {self!r} {problem}")

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        axis = _normalise_axis(self.axis, len(shape), name, self)
        self._check(name)
        counts = self._counts()
        blocks = sum(counts)
        if shape[axis] % blocks or any((n * (shape[axis] // blocks)) % self.shards for n in counts):
            heads = (
                f"{self.parts} part(s) × {self.num_heads} heads"
                if len(set(counts)) == 1
                else " + ".join(map(str, counts)) + " heads"
            )
            shards = f" (in {self.shards} shards)" if self.shards > 1 else ""
            raise SpecError(
                f"parameter '{name}' of shape {tuple(shape)}: {self!r}: {heads} = {blocks}{shards} does not divide "
                f"size {shape[axis]} of axis {axis}"
            )
        if self.parts == 1:
            return torch.Size([self.num_heads])
        return torch.Size([self.parts, self.num_heads] if len(set(counts)) == 1 else [blocks])

    def _part_heads(self, v: Tensor) -> list[Tensor]:
        """The axis ``v`` (``[D]``) as every part's ``[heads, d]`` block, rows in head order."""
        counts = self._counts()
        d = v.shape[0] // sum(counts)
        if self.layout == "interleaved" and self.parts > 1:  # [KV, r + parts - 1, d]
            kv = counts[1]
            r = self.num_heads // kv
            grouped = v.reshape(kv, r + self.parts - 1, d)
            return [grouped[:, :r].reshape(self.num_heads, d)] + [grouped[:, r + p - 1] for p in range(1, self.parts)]
        widths = [n * d // self.shards for n in counts]
        blocks = v.reshape(self.shards, -1).split(widths, dim=1)  # [S, width / S] per part, shard-major
        return [block.reshape(n, d) for block, n in zip(blocks, counts)]

    def _join(self, per_part: list[Tensor]) -> Tensor:
        if self.parts == 1:
            return per_part[0]
        return torch.stack(per_part) if len(set(self._counts())) == 1 else torch.cat(per_part)

    def reduce(self, x: Tensor) -> Tensor:
        axis = self.axis % x.ndim
        return self._join([block.sum(-1) for block in self._part_heads(_sum_except(x, [axis]))])

    def membership(self, shape: torch.Size | Sequence[int], device: Device = None) -> Tensor:
        shape = torch.Size(shape)
        self.group_shape(shape)
        axis = self.axis % len(shape)
        stored = self._part_heads(torch.arange(shape[axis], device=device))  # stored index of each (part, head, j)
        owner = torch.empty(shape[axis], dtype=torch.long, device=device)
        first = 0
        for block in stored:  # group of (p, h): first_p + h, with first_p = heads of the parts before p
            heads = torch.arange(block.shape[0], device=device).unsqueeze(1).expand_as(block)
            owner[block.reshape(-1)] = first + heads.reshape(-1)
            first += block.shape[0]
        return _along(owner, axis, shape)

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
