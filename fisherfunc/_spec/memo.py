"""Resolved specs kept across calls, behind a check of everything resolution depends on.

Resolving a spec walks the params and validates every rule; inferring one (``spec=None``) reads
every module of the model and places its attention heads — 23 ms per call on a 32-layer GPT-2,
more than a small language model's forward and backward on a GPU. A :class:`SpecMemo` (one per
:class:`~fisherfunc.FisherStep`, one per loss for one-shot calls: :mod:`fisherfunc._engine.memos`)
keeps its last result and returns it again while all of this is unchanged, compared on every call:

- the params' tree structure and every leaf's shape and dtype;
- the spec's tree structure and its rules, equal (rules are frozen values, so ``spec=ff.Channel()``
  written anew on every call is the same spec, and a spec edited between calls holds other rules);
  for an inferred spec, the model's modules (names, classes, identities, training flags) and its
  parameters (names, identities, shapes).

A callable spec (``params -> spec``) is called, and its result resolved, on every call.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Hashable
from typing import Any

import optree
from torch import Tensor, nn

from .._engine.memos import one_shot
from .infer import infer_spec
from .resolve import Params, ResolvedSpec, Spec, resolve_spec
from .rules import is_rule

__all__ = ["SpecMemo", "spec_memo"]


def _params_key(params: Params) -> tuple | None:
    """The params' structure, shapes and dtypes; ``None`` if a leaf is not a tensor (resolution says so)."""
    leaves, treespec = optree.tree_flatten(params)
    if not all(isinstance(x, Tensor) for x in leaves):
        return None
    return treespec, tuple((tuple(x.shape), x.dtype) for x in leaves)


def _model_key(model: nn.Module) -> tuple:
    """What :func:`~fisherfunc.infer_spec` reads of a model: its modules and its parameters."""
    modules = tuple((name, type(m), id(m), m.training) for name, m in model.named_modules())
    parameters = tuple((name, id(p), tuple(p.shape)) for name, p in model.named_parameters())
    return modules, parameters


@dataclasses.dataclass(eq=False)
class SpecMemo:
    """The last resolved spec of a step or a loss, with what it was resolved from.

    ``kept`` is ``(key, resolved)``, replaced as one value, so a call on another thread reads a key
    and a resolution that belong together.
    """

    kept: tuple[tuple, ResolvedSpec] | None = None

    def resolve(self, spec: Spec | None, params: Params, model: nn.Module | None = None) -> ResolvedSpec:
        """``resolve_spec(spec or infer_spec(model), params)``, or the kept result if nothing it depends on changed.

        Args:
            spec: a rule, a tree of rules, a callable ``params -> spec``, or ``None`` to infer it.
            params: pytree of parameter tensors.
            model: the model ``spec=None`` infers the rules of.
        """
        key = _key(spec, params, model)
        kept = self.kept
        if key is not None and kept is not None and key == kept[0]:
            return kept[1]
        assert spec is not None or model is not None
        resolved = resolve_spec(infer_spec(model) if spec is None else spec, params)  # type: ignore[arg-type]
        if key is not None:
            self.kept = (key, resolved)
        return resolved


def _key(spec: Spec | None, params: Params, model: nn.Module | None) -> tuple | None:
    """What resolution depends on, compared by equality (rules are frozen values); ``None``: nothing is kept."""
    params_key = _params_key(params)
    if params_key is None:
        return None
    if spec is None:
        return None if model is None else ("inferred", _model_key(model), params_key)
    if callable(spec) and not is_rule(spec):
        return None
    rules, treespec = optree.tree_flatten(spec, is_leaf=is_rule, none_is_leaf=True)
    return ("given", treespec, tuple(rules), params_key)


#: One-shot calls' memos, per loss (or per model and built loss, see :mod:`fisherfunc._engine.memos`).
_BY_LOSS: weakref.WeakKeyDictionary[Any, dict[Hashable, SpecMemo]] = weakref.WeakKeyDictionary()


def spec_memo(loss: Any) -> SpecMemo:
    """The memo one-shot calls with ``loss`` share (a fresh one for a loss that cannot be weakly referenced).

    A loss built anew with the same options for the same model shares it.
    """
    return one_shot(_BY_LOSS, loss, SpecMemo) or SpecMemo()
