"""One flat numbering of all groups of a spec, with each group's size; eligibility by name or rule.

Every rule sums a parameter-shaped tensor into groups, so each parameter entry belongs to exactly
one group (:meth:`~fisherfunc.Rule.membership` says which). :class:`GroupIndex` numbers the groups
of all non-skipped parameters of a spec ``0 … G−1`` in flattening order (each parameter's groups in
row-major order of its group shape), with the number of parameter entries of each group,
``n_g = rule.reduce(ones(shape))``. :mod:`fisherfunc.perturb` chooses groups on this numbering.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .resolve import ResolvedSpec, resolve_spec
from .rules import Rule, SpecError

__all__ = ["GroupIndex", "group_index", "Where", "broadcast"]

#: Which groups are eligible: a name glob or several (``fnmatch`` over dotted parameter names), a
#: rule class or tuple of them (e.g. ``ff.Heads``), or a callable ``(name, rule) -> bool``.
Where = str | Sequence[str] | type | tuple[type, ...] | Callable[[str, Rule], bool] | None


def _matcher(where: Where) -> Callable[[str, Rule], bool]:
    if where is None:
        return lambda name, rule: True
    if isinstance(where, str):
        where = (where,)
    if isinstance(where, type) or (isinstance(where, tuple) and all(isinstance(w, type) for w in where)):
        classes = where
        return lambda name, rule: isinstance(rule, classes)
    if callable(where):
        return where
    patterns = tuple(cast(Sequence[str], where))
    return lambda name, rule: any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclasses.dataclass(frozen=True, eq=False)
class GroupIndex:
    """All groups of a spec numbered ``0 … G−1``.

    Attributes:
        spec: the resolved spec.
        offsets: ``[len(spec.active) + 1]`` start of each active leaf's groups in the flat numbering
            (leaf ``spec.active[j]`` owns groups ``offsets[j] … offsets[j+1] − 1``).
        sizes: ``[G]`` float64, ``n_g``: the number of parameter entries in group ``g``.
    """

    spec: ResolvedSpec
    offsets: tuple[int, ...]
    sizes: Tensor

    @property
    def num_groups(self) -> int:
        """``G``, the number of groups over all non-skipped parameters."""
        return self.offsets[-1]

    def flatten(self, tree: Any, what: str = "group tree") -> Tensor:
        """A group tree as one float64 vector ``[G]`` (skipped leaves have no entries)."""
        leaves = self.spec.flatten_groups(tree, what)
        return torch.cat([v.detach().to("cpu", torch.float64).reshape(-1) for v in leaves])

    def unflatten(self, flat: Tensor) -> Any:
        """A vector ``[G]`` as a group tree (``None`` for skipped leaves)."""
        parts = [
            flat[a:b].reshape(self.spec.groups_of(i))
            for i, a, b in zip(self.spec.active, self.offsets[:-1], self.offsets[1:])
        ]
        return self.spec.unflatten_groups(parts)

    def leaf_of(self, groups: Tensor) -> Tensor:
        """``[k]`` position in ``spec.active`` of the leaf owning each flat group id in ``groups``."""
        bounds = torch.tensor(self.offsets[1:-1], dtype=torch.long)
        return torch.bucketize(groups.to(torch.long).cpu(), bounds, right=True)

    def eligible(self, where: Where = None) -> Tensor:
        """``[G]`` bool: the groups of the parameters ``where`` selects (all when ``None``)."""
        match = _matcher(where)
        mask = torch.zeros(self.num_groups, dtype=torch.bool)
        for i, a, b in zip(self.spec.active, self.offsets[:-1], self.offsets[1:]):
            mask[a:b] = bool(match(self.spec.names[i], self.spec.rules[i]))
        if not mask.any():
            raise SpecError(f"where={where!r} selects no group (parameters: {', '.join(self.spec.names)})")
        return mask


def group_index(spec: Any, params: Any) -> GroupIndex:
    """Number the groups of ``spec`` (a spec, or a :class:`ResolvedSpec`) over ``params``.

    ``n_g`` is the rule's own reduction of ones: ``sizes = rule.reduce(ones(shape))``, flattened.

    >>> import torch, fisherfunc as ff
    >>> index = group_index(ff.Channel(0), {"w": torch.zeros(3, 5), "b": torch.zeros(3)})
    >>> index.num_groups, index.sizes.tolist()
    (6, [1.0, 1.0, 1.0, 5.0, 5.0, 5.0])
    """
    resolved = spec if isinstance(spec, ResolvedSpec) else resolve_spec(spec, params)
    sizes, offsets = [], [0]
    for i in resolved.active:
        ones = torch.ones(resolved.shapes[i], dtype=torch.float64)
        sizes.append(resolved.rules[i].reduce(ones).reshape(-1))
        offsets.append(offsets[-1] + sizes[-1].numel())
    return GroupIndex(spec=resolved, offsets=tuple(offsets), sizes=torch.cat(sizes))


def broadcast(groups: Any, spec: Any, params: Any, *, density: bool = True) -> Any:
    """Group values spread back onto the parameters' entries: a tree shaped like ``params``.

    Entry ``i`` of a parameter gets its group's value ``F_g`` (``density=False``) or the group's
    density ``F_g / n_g`` (``density=True``, the default: a group's ``n_g`` entries then sum to its
    value, the per-entry diagonal that group Fisher implies when the entries of a group share it
    equally). Used where a per-weight Fisher is needed — EWC penalties, Fisher merging — and only
    group Fisher was kept. Skipped parameters (``None`` in ``groups``) stay ``None``.

    Args:
        groups: a group tree made with ``spec`` (leaves ``[*group_shape]``), e.g. from
            :func:`fisherfunc.fisher` or :func:`fisherfunc.estimate`.
        spec: the spec (or resolved spec) the groups were made with.
        params: the parameters (only their structure and shapes are read).
        density: spread ``F_g / n_g`` (default) or ``F_g`` itself.

    Returns:
        A tree with ``params``' structure: tensors of each parameter's shape (the groups' dtype and
        device), ``None`` for skipped parameters.

    >>> import torch, fisherfunc as ff
    >>> params = {"w": torch.zeros(2, 3)}
    >>> broadcast({"w": torch.tensor([3.0, 6.0])}, ff.Channel(0), params)["w"]
    tensor([[1., 1., 1.],
            [2., 2., 2.]])
    """
    resolved = spec if isinstance(spec, ResolvedSpec) else resolve_spec(spec, params)
    values = resolved.flatten_groups(groups, "groups")
    out: list[Any] = []
    for i, value in zip(resolved.active, values):
        rule, shape = resolved.rules[i], resolved.shapes[i]
        owner = rule.membership(shape, device=value.device).reshape(-1)
        flat = value.reshape(-1)
        if density:
            sizes = torch.bincount(owner, minlength=flat.numel()).to(flat.dtype)
            flat = flat / sizes.clamp_min(1)
        out.append(flat[owner].reshape(shape))
    return resolved.unflatten_groups(out)
