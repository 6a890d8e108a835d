"""Saving and loading states: safetensors tensors under the stable keys, JSON metadata, atomic writes.

    ff.save("fisher.safetensors", {"math": s1, "code": s2}, params=params)
    states = ff.load("fisher.safetensors", params)          # {"math": FisherState, ...}

**Layout.** Every stored EMA tensor ``m_t`` (raw, not debiased) is a safetensors tensor under its
stable key ``{task}|{param_name}|{group_type}`` (:func:`~fisherfunc.to_keyed`), in its storage
dtype; a float16 state stores the float16 mantissa under the key and the int8 exponent under
``{key}|exponent`` (value = mantissa · 2^exponent, see :mod:`~fisherfunc._state.codec`). The
header's ``__metadata__["fisherfunc"]`` is one JSON document: format and version, fisherfunc and
torch versions, the UTC time, the parameter names and shapes, a SHA-256 seal of the header and of
every tensor's bytes (:mod:`~fisherfunc._state.container`), and per task the keys, the rules
(readable and reconstructible), Fisher kind, decay, step, tokens, samples, skipped batches,
storage dtype and bias correction ``1 − β^t`` (divide a stored tensor by it for the estimate, e.g.
when reading the file with another tool).

**Safety.** A save writes a temporary file next to the target, flushes it to disk (``fsync``) and
renames it over the target (``os.replace``, atomic on POSIX and Windows): a crash leaves either the
old file or the new one, never half of one. A load refuses, with :class:`StateFileError`, a file
that is truncated, corrupted or edited (the seal covers the header and every tensor byte: a step
count changed by hand is refused like a flipped bit), or not a fisherfunc state;
and refuses, with :class:`~fisherfunc.SpecError`, params that differ from those the state was
made for, naming the first differing parameter. No code is ever executed from a file: rules are
rebuilt from their class name, among the rule classes already defined.

``safetensors`` is an optional dependency: ``pip install 'fisherfunc[io]'``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optree
import torch
from torch import Tensor

from .._naming import path_name
from .._spec.resolve import ResolvedSpec, named_rules, resolve_spec
from .._spec.rules import Rule, SpecError
from .._version import __version__
from . import container
from .codec import STORAGE_DTYPES, Scaled
from .ema import bias_correction
from .keys import SEPARATOR
from .state import FisherState

__all__ = ["save", "load", "StateFileError", "FORMAT", "FORMAT_VERSION", "rule_name"]

StateFileError = container.StateFileError
FORMAT = "fisherfunc.state"
#: 2: the header is sealed with the tensors (version 1 files are read too).
FORMAT_VERSION = 2
_META_KEY = "fisherfunc"
_EXPONENT = SEPARATOR + "exponent"
_DTYPES = {str(d).removeprefix("torch."): d for d in (*STORAGE_DTYPES, torch.int8)}


# --- writing --------------------------------------------------------------------------------------


def rule_name(cls: type) -> str:
    """The stable name a rule class is saved under: ``fisherfunc.Channel`` for the built-in rules."""
    import fisherfunc

    if getattr(fisherfunc, cls.__name__, None) is cls:
        return f"fisherfunc.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _rule_json(rule: Rule, name: str) -> dict[str, Any]:
    fields = {f.name: getattr(rule, f.name) for f in dataclasses.fields(rule) if f.init}
    try:
        json.dumps(fields)
    except TypeError as err:
        raise TypeError(f"parameter '{name}': the fields of {rule!r} cannot be saved as JSON ({err})") from None
    return {"type": rule_name(type(rule)), "fields": fields}


def _param_table(params: Any) -> tuple[list[str], list[list[int]], optree.PyTreeSpec]:
    paths, leaves, treespec = optree.tree_flatten_with_path(params)
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, Tensor):
            raise SpecError(f"parameter '{path_name(path)}' is a {type(leaf).__name__}, not a torch.Tensor")
    return [path_name(p) for p in paths], [list(leaf.shape) for leaf in leaves], treespec


def _stored_tensor(value: Any, seen: set[int]) -> Tensor:
    t = value.detach().to("cpu").contiguous()
    # safetensors refuses views into a larger storage and tensors saved twice (one state under two
    # tasks); copy only those.
    storage = t.untyped_storage()
    if storage.nbytes() != t.numel() * t.element_size() or storage.data_ptr() in seen:
        t = t.clone()
    seen.add(t.untyped_storage().data_ptr())
    return t


def save(
    path: str | os.PathLike[str], states: FisherState | Mapping[str, FisherState], *, params: Any, task: str = "default"
) -> Path:
    """Save a state, or a ``{task: state}`` dict, to a safetensors file, atomically.

    Args:
        path: the file to write (replaced atomically if it exists).
        states: a :class:`~fisherfunc.FisherState` or a mapping ``task -> FisherState``.
        params: the params the states were made for (their names and shapes are recorded, and
            each state is checked against them first).
        task: the task name a single state is saved under.

    Returns:
        The path written.

    Raises:
        ImportError: if ``safetensors`` is not installed.
        SpecError: if a state does not fit ``params`` (naming the parameter).

    >>> import tempfile, torch, fisherfunc as ff
    >>> params = {"w": torch.zeros(3, 2)}
    >>> state = ff.init_state(params, spec=ff.Channel(), decay=0.9)
    >>> path = ff.save(tempfile.mkdtemp() + "/fisher.safetensors", state, params=params)
    >>> ff.load(path, params).ema["w"]
    tensor([0., 0., 0.])
    """
    safetensors = container.safetensors_module()
    single = isinstance(states, FisherState)
    mapping: Any = {task: states} if single else states
    if not isinstance(mapping, Mapping) or not mapping:
        raise TypeError("save needs a FisherState or a non-empty {task: FisherState} mapping")
    names, shapes, _ = _param_table(params)
    tensors: dict[str, Tensor] = {}
    tasks: dict[str, Any] = {}
    seen: set[int] = set()
    for name_of_task, state in mapping.items():
        if not isinstance(state, FisherState):
            raise TypeError(f"task {name_of_task!r}: expected a FisherState, got {type(state).__name__}")
        if not isinstance(name_of_task, str) or not name_of_task or SEPARATOR in name_of_task:
            raise ValueError(f"task {name_of_task!r} must be a non-empty string without '{SEPARATOR}'")
        resolved = _check_fits(state, params, f"task {name_of_task!r}")
        keys = []
        values = resolved.treespec.flatten_up_to(state.ema)
        for i in resolved.active:
            name, rule, value = resolved.names[i], resolved.rules[i], values[i]
            key = SEPARATOR.join((name_of_task, name, rule.group_type))
            if isinstance(value, Scaled):
                tensors[key] = _stored_tensor(value.mantissa, seen)
                tensors[key + _EXPONENT] = _stored_tensor(value.exponent, seen)
            else:
                tensors[key] = _stored_tensor(value, seen)
            keys.append(key)
        tasks[name_of_task] = {
            "keys": keys,
            "rules": {n: repr(r) for n, r in zip(resolved.names, resolved.rules)},
            "spec": {n: _rule_json(r, n) for n, r in zip(resolved.names, resolved.rules)},
            "kind": state.kind,
            "decay": state.decay,
            "step": state.step,
            "tokens": state.tokens,
            "samples": state.samples,
            "skipped": state.skipped,
            "bias_correction": bias_correction(state.decay, state.step) if state.step else None,
        }
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "single": single,
        "values": "raw EMA m_t, not debiased: estimate = tensor / bias_correction; float16 values are "
        f"mantissa (key) * 2 ** exponent (key + '{_EXPONENT}')",
        "library": {
            "fisherfunc": __version__,
            "torch": torch.__version__,
            "safetensors": safetensors.__version__,
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "params": {"names": names, "shapes": shapes},
        "tasks": tasks,
    }
    return container.write(path, tensors, meta, key=_META_KEY)


def _check_fits(state: FisherState, params: Any, what: str) -> ResolvedSpec:
    """Resolve the state's rules against ``params``; refuse a state made for other parameters."""
    made_for = named_rules(state.spec)
    names, _, treespec = _param_table(params)
    for name in [*names, *made_for]:
        if (name in names) != (name in made_for):
            where = "params" if name in names else "the state"
            raise SpecError(f"{what}: parameter '{name}' is only in {where}")
    resolved = resolve_spec(optree.tree_unflatten(treespec, [made_for[n] for n in names]), params)
    leaves = treespec.flatten_up_to(state.ema)
    for i, name in enumerate(resolved.names):
        value, expected = leaves[i], resolved.group_shapes[i]
        shape = None if value is None else tuple(value.shape)
        if shape != (None if expected is None else tuple(expected)):
            raise SpecError(
                f"{what}: parameter '{name}' has groups {shape}, but its rule gives {tuple(expected or ())}"
            )
    return resolved


# --- reading --------------------------------------------------------------------------------------


def _rule_classes() -> dict[str, type]:
    """Every rule class defined in this process, by its saved name (and, for built-ins, the 0.1 name)."""
    found: dict[str, type] = {}
    todo: list[type] = [Rule]
    while todo:
        cls = todo.pop()
        found[rule_name(cls)] = cls
        found[f"{cls.__module__}.{cls.__qualname__}"] = cls
        if rule_name(cls).startswith("fisherfunc.") and "." not in rule_name(cls)[len("fisherfunc.") :]:
            found[f"fisherfunc.rules.{cls.__name__}"] = cls  # files written by fisherfunc 0.1 (format 1)
        todo.extend(cls.__subclasses__())
    return found


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def _rule_from_json(entry: Any, name: str, bad: Any) -> Rule:
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("type"), str)
        or not isinstance(entry.get("fields"), dict)
    ):
        raise bad(f"the rule of parameter '{name}' is malformed")
    cls = _rule_classes().get(entry["type"])
    if cls is None:
        raise bad(f"parameter '{name}' uses the rule class {entry['type']}, which is not defined in this process "
                  "(import the module that defines it before loading)")  # fmt: skip
    try:
        return cls(**{k: _as_tuples(v) for k, v in entry["fields"].items()})
    except Exception as err:
        raise bad(f"the rule of parameter '{name}' cannot be rebuilt: {err}") from None


def _saved_params(meta: dict[str, Any], bad: Any) -> dict[str, tuple[int, ...]]:
    """The recorded ``{parameter name: shape}`` table of a file."""
    table = meta.get("params")
    if (
        not isinstance(table, dict)
        or not isinstance(table.get("names"), list)
        or not isinstance(table.get("shapes"), list)
    ):
        raise bad("its parameter table is malformed")
    return dict(zip(table["names"], (tuple(s) for s in table["shapes"])))


def _check_params(meta: dict[str, Any], params: Any, bad: Any) -> None:
    """Refuse params that differ from the recorded ones, naming the first differing parameter."""
    saved = _saved_params(meta, bad)
    names, shapes, _ = _param_table(params)
    given = dict(zip(names, (tuple(s) for s in shapes)))
    for name, shape in saved.items():
        if name not in given:
            raise SpecError(f"the file's parameter '{name}' {shape} is not in params")
        if given[name] != shape:
            raise SpecError(f"parameter '{name}' has shape {given[name]} in params, but {shape} in the file")
    extra = [n for n in names if n not in saved]
    if extra:
        raise SpecError(f"parameter '{extra[0]}' of params is not in the file")


def _field(entry: dict[str, Any], name: str, kind: type | tuple[type, ...], bad: Any) -> Any:
    value = entry.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise bad(f"field {name!r} is missing or malformed")
    return value


def _state(
    meta: dict[str, Any], task: str, tensors: dict[str, Tensor], params: Any, device: Any, bad: Any
) -> FisherState:
    entry = meta["tasks"][task]
    if not isinstance(entry, dict) or not isinstance(entry.get("spec"), dict):
        raise bad(f"task {task!r}: malformed description")
    names, _, treespec = _param_table(params)
    spec_entries = entry["spec"]
    missing = [n for n in names if n not in spec_entries]
    if missing:
        raise bad(f"task {task!r}: no rule for parameter '{missing[0]}'")
    rules = [_rule_from_json(spec_entries[n], n, bad) for n in names]
    resolved = resolve_spec(optree.tree_unflatten(treespec, rules), params)
    stored: list[Any] = []
    for i in resolved.active:
        name, rule, expected = resolved.names[i], resolved.rules[i], tuple(resolved.group_shapes[i] or ())
        key = SEPARATOR.join((task, name, rule.group_type))
        if key not in tensors:
            raise bad(f"the tensor {key!r} is missing")
        value = tensors[key]
        if tuple(value.shape) != expected or value.dtype not in STORAGE_DTYPES:
            raise bad(
                f"the tensor {key!r} is {value.dtype} {tuple(value.shape)}; expected {expected} in a storage dtype"
            )
        if key + _EXPONENT in tensors:
            exponent = tensors[key + _EXPONENT]
            if exponent.dtype != torch.int8 or tuple(exponent.shape) != expected or value.dtype != torch.float16:
                raise bad(f"the exponent tensor of {key!r} does not match its mantissa")
            stored.append(Scaled(value.to(device), exponent.to(device)))
        else:
            if value.dtype == torch.float16:
                raise bad(f"the float16 tensor {key!r} has no exponent tensor")
            stored.append(value.to(device))
    return FisherState(
        ema=resolved.unflatten_groups(stored),
        step=_field(entry, "step", int, bad),
        tokens=float(_field(entry, "tokens", (int, float), bad)),
        samples=_field(entry, "samples", int, bad),
        decay=float(_field(entry, "decay", (int, float), bad)),
        spec=resolved.rule_tree(),
        kind=_field(entry, "kind", str, bad),
        skipped=_field(entry, "skipped", int, bad),
    )


def load(
    path: str | os.PathLike[str],
    params: Any = None,
    *,
    task: str | None = None,
    device: torch.device | str = "cpu",
) -> FisherState | dict[str, FisherState]:
    """Load states saved by :func:`save`, checked against ``params``.

    Args:
        path: the file.
        params: the params to use the states with (only names and shapes are read); they must
            match the recorded ones exactly, and give the states their tree structure. ``None``
            trusts the file: the states get a flat ``{param_name: ...}`` structure.
        task: load only this task's state.
        device: where to store the loaded values (the storage dtype is the file's).

    Returns:
        What was saved: a :class:`~fisherfunc.FisherState` for a single state (or with ``task=``),
        else a ``{task: FisherState}`` dict.

    Raises:
        ImportError: if ``safetensors`` is not installed.
        FileNotFoundError: if there is no file at ``path``.
        StateFileError: for a truncated, corrupted or foreign file (the message says which).
        SpecError: if ``params`` differ from the recorded params, naming the first differing one.
        KeyError: for an unknown ``task``.
    """
    target = Path(os.fspath(path))
    meta, tensors = container.read(target, key=_META_KEY, format=FORMAT, version=FORMAT_VERSION, what="state")

    def bad(why: str) -> StateFileError:
        return StateFileError(f"{target}: {why}")

    if params is None:
        params = {n: torch.empty(s, device="meta") for n, s in _saved_params(meta, bad).items()}
    else:
        _check_params(meta, params, bad)
    tasks = meta.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise bad("it describes no tasks")
    if task is not None:
        if task not in tasks:
            raise KeyError(f"{target} has no task {task!r}; its tasks are {sorted(tasks)}")
        return _state(meta, task, tensors, params, device, bad)
    states = {t: _state(meta, t, tensors, params, device, bad) for t in tasks}
    if meta.get("single"):
        return next(iter(states.values()))
    return states
