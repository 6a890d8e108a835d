"""Flat keys for group trees: ``{task}|{param_name}|{group_type}``.

    to_keyed(tree, spec=spec, task="math")
    # {'math|transformer.h.0.attn.c_attn.weight|head': tensor([...]), ...}

``param_name`` is the dotted pytree path (the ``named_parameters()`` name for the usual flat
dict); ``group_type`` is the rule's (``channel``, ``head``, ``token``, ``bucket``, ``param``,
``tensor``). Keys are sorted, never collide (``|`` is refused in tasks and names) and sort
hierarchically: task, then parameter, then group type. Skipped parameters have no key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optree
from torch import Tensor

from .._naming import path_name
from .._spec.rules import is_rule
from .state import FisherState, estimate

__all__ = ["to_keyed", "from_keyed", "SEPARATOR"]

SEPARATOR = "|"


def _check_part(value: str, what: str) -> str:
    if not isinstance(value, str) or not value or SEPARATOR in value:
        raise ValueError(f"{what} {value!r} must be a non-empty string without '{SEPARATOR}'")
    return value


def to_keyed(tree: Any, *, task: str, spec: Any = None) -> dict[str, Tensor]:
    """Flatten a group tree (or a :class:`FisherState`'s estimate) into ``{key: tensor}``.

    Args:
        tree: a group tree from :func:`~fisherfunc.fisher` / :func:`~fisherfunc.estimate`, or a
            ``FisherState`` (its bias-corrected estimate is used, and its own spec).
        task: the task name (no ``|``).
        spec: the rules that made ``tree`` (a full rule tree, e.g. ``infer_spec(model)``); not
            needed for a ``FisherState``.

    Returns:
        A dict in hierarchical order (by task, then parameter name, then group type — which is
        not plain string order, since ``|`` sorts after letters); values are the tree's tensors
        (not copied), each of its rule's group shape (``[channels]``, ``[heads]`` or
        ``[parts, heads]``, ``[vocab]``, ``[]``, or the parameter's shape for ``Elementwise()``).
    """
    _check_part(task, "task")
    if isinstance(tree, FisherState):
        tree, spec = estimate(tree), tree.spec
    if spec is None:
        raise ValueError("to_keyed needs spec= (the rules that made the tree) to name group types")
    paths, values, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    rule_leaves = optree.tree_flatten(spec, is_leaf=is_rule)[0]
    if is_rule(spec):
        rule_leaves = [spec] * len(values)
    if len(rule_leaves) != len(values):
        raise ValueError(f"spec has {len(rule_leaves)} rules but the tree has {len(values)} entries")
    keyed: dict[str, Tensor] = {}
    for path, value, rule in zip(paths, values, rule_leaves):
        if value is None:
            continue
        name = _check_part(path_name(path), "parameter name")
        key = SEPARATOR.join((task, name, rule.group_type))
        if key in keyed:
            raise ValueError(f"two entries map to the key {key!r}")
        keyed[key] = value
    return dict(sorted(keyed.items(), key=lambda item: item[0].split(SEPARATOR)))


def from_keyed(keyed: Mapping[str, Tensor], *, task: str | None = None, like: Any = None) -> Any:
    """Inverse of :func:`to_keyed`.

    Args:
        keyed: ``{key: tensor}`` as made by :func:`to_keyed` (possibly several tasks).
        task: return only this task's tree; ``None`` returns ``{task: tree}`` for every task.
        like: optional params tree (or spec) giving the structure to rebuild, with ``None`` for
            parameters that have no key; without it each tree is a flat ``{param_name: tensor}``.

    Returns:
        The group tree(s), each value a tensor of its rule's group shape, as :func:`to_keyed` took it.

    Raises:
        ValueError: for a malformed key, or a key not in ``like``.
    """
    per_task: dict[str, dict[str, Tensor]] = {}
    for key, value in keyed.items():
        parts = key.split(SEPARATOR)
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"malformed key {key!r}: expected 'task|param_name|group_type'")
        t, name, _ = parts
        per_task.setdefault(t, {})[name] = value
    if task is not None and task not in per_task:
        raise KeyError(f"no keys for task {task!r}; tasks are {sorted(per_task)}")

    def rebuild(flat: dict[str, Tensor]) -> Any:
        if like is None:
            return flat
        paths, _, treespec = optree.tree_flatten_with_path(like, is_leaf=is_rule)
        names = [path_name(p) for p in paths]
        unknown = sorted(set(flat) - set(names))
        if unknown:
            raise ValueError(f"key parameter {unknown[0]!r} is not in the given structure")
        return optree.tree_unflatten(treespec, [flat.get(n) for n in names])

    if task is not None:
        return rebuild(per_task[task])
    return {t: rebuild(flat) for t, flat in per_task.items()}
