"""The registry behind :mod:`fisherfunc.testing.cases`: entries, seeded building, the :class:`Case` value.

An entry is a *builder*, a function of keyword-only sizes (each with a default) that returns
:class:`Built` parts: a float32 model, its per-sample loss, one or more batches and optionally a
spec and params. :func:`case` runs the builder under ``torch.random.fork_rng`` with the global
RNG seeded, then casts and moves the result, so a case is a pure function of
``(name, seed, sizes)`` and the caller's RNG state is left as it was.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import optree
import torch
from torch import Tensor, nn

from .. import infer_spec

__all__ = ["Built", "Case", "Entry", "case", "entry", "names", "register"]

Loss = Callable[[Any, Any], tuple[Tensor, Any]]
Builder = Callable[..., "Built"]
B = TypeVar("B", bound=Builder)

#: Keyword arguments of :func:`case` that are not sizes.
RESERVED = ("seed", "dtype", "device")


@dataclasses.dataclass(frozen=True, eq=False)
class Built:
    """What a builder returns: float32 parts, before the cast to the requested dtype and device.

    Attributes:
        model: the module (an empty ``nn.Module()`` for a plain-callable loss).
        loss: the per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        batches: one or more batches, each with a leading batch dimension.
        spec: the case's spec; ``None`` means ``fisherfunc.infer_spec(model)``.
        params: the params tree; ``None`` means ``dict(model.named_parameters())``.
    """

    model: nn.Module
    loss: Loss
    batches: list[Any]
    spec: Any = None
    params: Any = None


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """A model with a matching per-sample loss, its params, its batches and a spec.

    Attributes:
        model: the module, in eval mode, in the case's dtype and on its device (an empty
            ``nn.Module()`` when the loss is a plain callable of the params).
        loss: the per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``; usually a
            :class:`~fisherfunc.losses.ModelLoss` of ``model``.
        params: ``dict(model.named_parameters())`` (tied parameters once, the module's own
            tensors), or the entry's params tree for a plain-callable loss.
        batch: the first batch (``batches[0]``), leading dimension ``B``.
        spec: the entry's spec for ``params`` (by default ``fisherfunc.infer_spec(model)``).
        name: the registry entry (one of :func:`names`).
        seed: the seed the weights and data were drawn from.
        sizes: every size of the entry (defaults filled in): ``case(name, seed=seed, **sizes)``
            rebuilds the case.
        batches: every batch the entry drew (one per entry of a tuple ``batch=`` size), a list:
            ``fisherfunc.fisher(case.loss, case.params, case.batches)`` runs over all of them.
        tags: the entry's tags.
    """

    model: nn.Module
    loss: Loss
    params: Any
    batch: Any
    spec: Any
    name: str
    seed: int
    sizes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    batches: list[Any] = dataclasses.field(default_factory=list)
    tags: frozenset[str] = frozenset()

    @property
    def family(self) -> str:
        """The entry's name (the word the hypothesis strategies use)."""
        return self.name

    def rebuild(self, **changes: Any) -> Case:
        """The same entry and seed with some sizes (or ``seed``, ``dtype``, ``device``) changed."""
        first = optree.tree_leaves(self.params)
        dtype = next((t.dtype for t in first if isinstance(t, Tensor) and t.is_floating_point()), torch.float64)
        device = next((t.device for t in first if isinstance(t, Tensor)), torch.device("cpu"))
        sizes = {**self.sizes, **changes}
        seed, dtype, device = sizes.pop("seed", self.seed), sizes.pop("dtype", dtype), sizes.pop("device", device)
        return case(self.name, seed=seed, dtype=dtype, device=device, **sizes)

    def __repr__(self) -> str:
        def shapes(tree: Any) -> str:
            if isinstance(tree, Tensor):
                return "x".join(map(str, tree.shape)) or "scalar"
            if isinstance(tree, Mapping):
                return "{" + ", ".join(f"{k}: {shapes(v)}" for k, v in tree.items()) + "}"
            return "(" + ", ".join(shapes(v) for v in tree) + ")"

        return (
            f"Case(name={self.name!r}, seed={self.seed}, sizes={dict(self.sizes)!r}, "
            f"batch={shapes(self.batch)}, params={len(optree.tree_leaves(self.params))})"
        )


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered entry.

    Attributes:
        name: the entry's name.
        builder: ``builder(**sizes) -> Built``.
        tags: words to select entries by (see :func:`names`).
        defaults: every size the builder takes, with its default.
        summary: the first line of the builder's docstring.
    """

    name: str
    builder: Builder
    tags: frozenset[str]
    defaults: Mapping[str, Any]
    summary: str


_ENTRIES: dict[str, Entry] = {}


def _defaults(name: str, builder: Builder) -> dict[str, Any]:
    defaults = {}
    for p in inspect.signature(builder).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
            raise TypeError(f"builder of {name!r}: every size must be keyword-only with a default, not {p.name!r}")
        if p.name in RESERVED:
            raise TypeError(f"builder of {name!r}: {p.name!r} is not a size (it is an argument of case())")
        defaults[p.name] = p.default
    return defaults


def register(name: str, *, tags: Iterable[str] = (), builder: B | None = None) -> Any:
    """Register a builder under ``name``; with no ``builder``, a decorator that registers one.

    Args:
        name: the entry's name; an entry of that name must not exist yet.
        tags: words to select the entry by in :func:`names`.
        builder: ``builder(*, size=default, ...) -> Built``, run with the global RNG seeded; every
            size keyword-only with a default. It builds in float32 on the CPU (:func:`case` casts).

    Returns:
        ``builder`` (registered), or a decorator that registers and returns its function.

    Raises:
        ValueError: if ``name`` is taken.
        TypeError: if a builder argument is not a keyword-only size with a default.

    Example::

        @register("wide_mlp", tags=("classification",))
        def wide_mlp(*, batch: int = 8) -> Built:
            model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
            data = (torch.randn(batch, 4), torch.randint(0, 3, (batch,)))
            return Built(model, fisherfunc.losses.classification(model), [data])
    """

    def add(fn: B) -> B:
        if name in _ENTRIES:
            raise ValueError(f"a test case named {name!r} is already registered")
        doc = inspect.getdoc(fn) or ""
        _ENTRIES[name] = Entry(name, fn, frozenset(tags), _defaults(name, fn), doc.split("\n", 1)[0])
        return fn

    return add if builder is None else add(builder)


def entry(name: str) -> Entry:
    """The registered entry ``name``.

    Raises:
        KeyError: for an unknown name, listing the known ones.
    """
    if name not in _ENTRIES:
        raise KeyError(f"no test case named {name!r}; registered: {', '.join(_ENTRIES)}")
    return _ENTRIES[name]


def names(*tags: str) -> list[str]:
    """Names of the entries carrying every one of ``tags``, in registration order.

    For ``pytest.mark.parametrize("name", names("token"))``; with no tags, every entry.
    """
    wanted = set(tags)
    return [n for n, e in _ENTRIES.items() if wanted <= e.tags]


def _cast(tree: Any, dtype: torch.dtype, device: torch.device | str) -> Any:
    """Floating tensors to ``dtype``, every tensor to ``device``; other leaves as they are."""

    def one(x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)

    return optree.tree_map(one, tree, none_is_leaf=True)


def case(
    name: str, *, seed: int = 0, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu", **sizes: Any
) -> Case:
    """Build the registered case ``name`` deterministically from ``seed`` and ``sizes``.

    The builder runs under ``torch.random.fork_rng(devices=[])`` with ``torch.manual_seed(seed)``:
    the caller's RNG state is untouched and the same arguments give the same case. It builds in
    float32; the model, the params and the floating-point batch entries are then cast to ``dtype``
    (so a case's weights in any dtype are its float32 weights rounded) and moved to ``device``.
    The model is returned in eval mode (call ``.train()`` for training-mode behaviour).

    Args:
        name: a registered entry (see :func:`names`).
        seed: the seed of the weights and the data.
        dtype: the floating dtype of the model, the params and the float inputs.
        device: where the model, params and batches live.
        **sizes: the entry's sizes (see its builder's docstring); the others keep their defaults.

    Returns:
        The :class:`Case`.

    Raises:
        KeyError: for an unknown ``name``.
        TypeError: for a size the entry does not take, naming the ones it takes.
    """
    found = entry(name)
    unknown = sorted(set(sizes) - set(found.defaults))
    if unknown:
        raise TypeError(f"test case {name!r} takes no size(s) {unknown}; its sizes are {sorted(found.defaults)}")
    merged = {**found.defaults, **sizes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = found.builder(**merged)
    model = built.model.to(device=device, dtype=dtype).eval()
    batches = [_cast(b, dtype, device) for b in built.batches]
    params = dict(model.named_parameters()) if built.params is None else _cast(built.params, dtype, device)
    spec = infer_spec(model) if built.spec is None else built.spec
    return Case(
        model=model,
        loss=built.loss,
        params=params,
        batch=batches[0],
        spec=spec,
        name=name,
        seed=seed,
        sizes=merged,
        batches=batches,
        tags=found.tags,
    )
