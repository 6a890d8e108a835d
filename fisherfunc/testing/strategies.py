"""Hypothesis strategies for group rules, specs, token batches and tiny model cases.

Use them on your own parameters and models::

    from hypothesis import given
    from fisherfunc.testing import strategies as fst, invariants

    params = dict(my_model.named_parameters())

    @given(spec=fst.specs(params))
    def test_my_model(spec):
        invariants.check_all(my_loss, params, my_batch, spec)

Everything random inside a drawn value (weights, inputs, token ids) comes from a seed that
hypothesis draws, under :func:`torch.random.fork_rng`: examples are reproducible, shrink (towards
small sizes and seed 0), and never touch the caller's RNG state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import optree
import torch
from hypothesis import strategies as st
from torch import Tensor

from .._spec.rules import Buckets, Channel, Elementwise, Heads, Rows, Rule, Skip, Whole
from .cases import FAMILIES, Case, build_case, padded_token_batch

__all__ = ["FAMILIES", "Case", "build_case", "rules", "specs", "padded_batches", "model_cases", "seeds"]

T = TypeVar("T")
IntOrStrategy = int | st.SearchStrategy[int]


def _strategy(value: T | st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    return value if isinstance(value, st.SearchStrategy) else st.just(value)


def seeds() -> st.SearchStrategy[int]:
    """Draw seeds for ``torch.manual_seed``; they shrink towards 0."""
    return st.integers(min_value=0, max_value=2**31 - 1)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _channel(draw: st.DrawFn, shape: tuple[int, ...]) -> Channel:
    ndim = len(shape)
    axis = draw(st.integers(-ndim, ndim - 1))
    # groups > 1 (grouped ConvTranspose layout) needs a channel axis other than 0 and groups | size(0).
    groups = 1
    if axis % ndim != 0 and shape[0] > 0:
        groups = draw(st.sampled_from(_divisors(shape[0])))
    return Channel(axis=axis, groups=groups)


@st.composite
def _heads(draw: st.DrawFn, shape: tuple[int, ...]) -> Heads:
    ndim = len(shape)
    axis = draw(st.integers(-ndim, ndim - 1))
    size = shape[axis]
    # Heads(h, parts=p) needs h·p | size(axis); a zero-size axis admits any h, p.
    blocks = draw(st.sampled_from(_divisors(size))) if size > 0 else draw(st.integers(1, 4))
    parts = draw(st.sampled_from(_divisors(blocks)))
    return Heads(num_heads=blocks // parts, axis=axis, parts=parts)


@st.composite
def _buckets(draw: st.DrawFn, shape: tuple[int, ...]) -> Buckets:
    rows = shape[0]
    if rows > 0 and draw(st.booleans()):
        mapping = draw(st.lists(st.integers(0, rows), min_size=rows, max_size=rows))
        # num_buckets may exceed max(mapping) + 1 (empty buckets are allowed) or default to it.
        extra = draw(st.one_of(st.none(), st.integers(0, 2)))
        return Buckets(mapping=tuple(mapping)) if extra is None else Buckets(max(mapping) + 1 + extra, tuple(mapping))
    return Buckets(draw(st.integers(1, max(rows, 1) + 2)))


def rules(shape: Sequence[int] | torch.Size) -> st.SearchStrategy[Rule]:
    """Draw any group rule valid for a parameter of ``shape`` (never ``Skip()``).

    ``Channel`` (every axis, negative ones included, and ``groups > 1`` where it applies),
    ``Heads`` (``num_heads · parts`` dividing the axis), ``Rows``, ``Buckets`` (a count, or a
    mapping of every row), ``Elementwise`` and ``Whole``. A scalar shape admits only the last two.

    Args:
        shape: the parameter's shape.

    Returns:
        A strategy of rules ``r`` with ``r.group_shape(shape)`` valid.

    Example::

        @given(rules((6, 4)))
        def test_my_rule_sizes(rule):
            assert rule.reduce(torch.ones(6, 4)).shape == rule.group_shape(torch.Size((6, 4)))
    """
    shape = tuple(int(s) for s in shape)
    options: list[st.SearchStrategy[Rule]] = [st.just(Elementwise()), st.just(Whole())]
    if shape:
        options += [_channel(shape), _heads(shape), st.just(Rows()), _buckets(shape)]
    return st.one_of(*options)


def _broadcastable(shapes: list[tuple[int, ...]]) -> st.SearchStrategy[Rule]:
    """Rules valid for every shape in ``shapes`` (one rule broadcast over a whole tree)."""
    options: list[st.SearchStrategy[Rule]] = [st.just(Elementwise()), st.just(Whole())]
    if all(shapes):
        options += [st.just(Channel(0)), st.just(Channel(-1)), st.just(Rows())]
        options += [st.builds(Buckets, st.integers(1, 4))]
    return st.one_of(*options)


def specs(params: Any, *, skip: bool = True, broadcast: bool = True) -> st.SearchStrategy[Any]:
    """Draw valid specs for ``params``: one broadcast rule, a full tree of rules, or a prefix tree.

    Full trees have the params' structure, each leaf drawn from :func:`rules` of its shape; with
    ``skip=True`` some leaves are ``Skip()``, but never all of them. In nested params, some
    subtrees may be replaced by one rule valid for all of their leaves (a prefix spec, broadcast
    when the spec is resolved). Non-floating leaves are always ``Skip()`` (they
    cannot be differentiated).

    Args:
        params: pytree of parameter tensors.
        skip: allow ``Skip()`` entries.
        broadcast: sometimes return a single rule, or prefix rules, valid for several parameters.

    Returns:
        A strategy of specs accepted by ``fisherfunc.fisher(..., spec=...)``.

    Raises:
        ValueError: if ``params`` has no floating-point tensor.
    """
    leaves = optree.tree_leaves(params)
    if not any(isinstance(leaf, Tensor) and leaf.is_floating_point() for leaf in leaves):
        raise ValueError("specs(params) needs at least one floating-point parameter")
    return _specs(params, skip, broadcast)


def _floating(leaves: list[Any]) -> list[bool]:
    return [isinstance(leaf, Tensor) and leaf.is_floating_point() for leaf in leaves]


@st.composite
def _specs(draw: st.DrawFn, params: Any, skip: bool, broadcast: bool) -> Any:
    paths, leaves, treespec = optree.tree_flatten_with_path(params)
    shapes = [tuple(leaf.shape) for leaf in leaves]
    floating = _floating(leaves)
    if broadcast and all(floating) and draw(st.booleans()):
        return draw(_broadcastable(shapes))
    chosen: list[Rule] = [draw(rules(shape)) if ok else Skip() for shape, ok in zip(shapes, floating, strict=True)]
    if skip:
        candidates = [i for i, ok in enumerate(floating) if ok]
        skipped = draw(st.sets(st.sampled_from(candidates), max_size=len(candidates) - 1))
        chosen = [Skip() if i in skipped else r for i, r in enumerate(chosen)]
    if not broadcast:
        return optree.tree_unflatten(treespec, chosen)
    # Prefix spec: a subtree (below the root, all-floating, non-empty) may become one rule. Such a
    # rule is never Skip(), so at least one parameter stays active.
    rule_at = dict(zip(paths, chosen, strict=True))
    collapsed: dict[int, Rule] = {}

    def stop(node: Any) -> bool:
        if node is params or isinstance(node, Tensor):
            return False
        sub = optree.tree_leaves(node)
        if not sub or not all(_floating(sub)) or not draw(st.integers(0, 3)) == 0:
            return False
        collapsed[id(node)] = draw(_broadcastable([tuple(x.shape) for x in sub]))
        return True

    return optree.tree_map_with_path(
        lambda path, node: collapsed[id(node)] if id(node) in collapsed else rule_at[path], params, is_leaf=stop
    )


def padded_batches(
    *,
    batch_size: IntOrStrategy | None = None,
    seq_len: IntOrStrategy | None = None,
    vocab_size: IntOrStrategy | None = None,
    min_length: int = 1,
    pad_id: int = 0,
    ignore_index: int = -100,
) -> st.SearchStrategy[dict[str, Tensor]]:
    """Draw right-padded token batches ``{"input_ids", "labels", "attention_mask"}``, each ``[B, T]``.

    Sample ``b`` has a drawn length ``ℓ_b`` in ``[min_length, T]``: ids in ``[1, vocab)`` then
    ``pad_id``; ``attention_mask[b, t] = [t < ℓ_b]``; ``labels`` random classes in ``[0, vocab)``
    on real tokens and ``ignore_index`` on padding. Lengths are drawn by hypothesis (they shrink
    towards ``min_length``), ids from a drawn seed.

    Args:
        batch_size: ``B``, an int or a strategy (default 1 to 4).
        seq_len: ``T``, an int or a strategy (default ``min_length`` to 6).
        vocab_size: number of token ids, an int or a strategy (default 3 to 12), at least 2.
        min_length: shortest real length (use 2 for causal LM so every sample has a target).
        pad_id: id of the padding token.
        ignore_index: label of padded positions.

    Returns:
        A strategy of batches for ``fisherfunc.losses.token_classification`` or ``causal_lm``
        (``inputs="input_ids"``, ``mask="attention_mask"``).
    """
    return _padded_batches(
        _strategy(st.integers(1, 4) if batch_size is None else batch_size),
        _strategy(st.integers(min_length, max(min_length, 6)) if seq_len is None else seq_len),
        _strategy(st.integers(3, 12) if vocab_size is None else vocab_size),
        min_length,
        pad_id,
        ignore_index,
    )


@st.composite
def _padded_batches(
    draw: st.DrawFn,
    batch_size: st.SearchStrategy[int],
    seq_len: st.SearchStrategy[int],
    vocab_size: st.SearchStrategy[int],
    min_length: int,
    pad_id: int,
    ignore_index: int,
) -> dict[str, Tensor]:
    size, length, vocab = draw(batch_size), draw(seq_len), draw(vocab_size)
    if not (size >= 1 and 1 <= min_length <= length and vocab >= 2):
        raise ValueError(
            f"padded_batches needs B >= 1, 1 <= min_length <= T and vocab >= 2; "
            f"got B={size}, min_length={min_length}, T={length}, vocab={vocab}"
        )
    lengths = draw(st.lists(st.integers(min_length, length), min_size=size, max_size=size))
    seed = draw(seeds())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return padded_token_batch(lengths, length, vocab, pad_id=pad_id, ignore_index=ignore_index)


@st.composite
def _sizes(draw: st.DrawFn, family: str, batch: int) -> dict[str, Any]:
    small = st.integers(1, 3)
    s: dict[str, Any] = {"batch": batch}
    if family in ("mlp", "regression"):
        s.update(features=draw(st.integers(1, 5)), hidden=draw(st.integers(1, 6)))
        s.update(classes=draw(st.integers(2, 4)), outputs=draw(st.integers(1, 3)))
        s["variance"] = draw(st.sampled_from([0.5, 1.0, 3.0]))
    elif family in ("cnn1d", "cnn2d", "conv_transpose"):
        s.update(groups=draw(small), in_per_group=draw(small), out_per_group=draw(small))
        s.update(kernel=draw(st.integers(1, 3)), stride=draw(st.integers(1, 2)), classes=draw(st.integers(2, 3)))
        s.update(length=draw(st.integers(3, 5) if family == "cnn1d" else st.integers(2, 3)))
        s["two_d"] = draw(st.booleans())
    else:
        causal = family != "token_classification"
        s.update(vocab=draw(st.integers(3, 10)), dim=draw(st.integers(2, 6)), classes=draw(st.integers(2, 5)))
        s.update(heads=draw(st.integers(1, 2)), head_dim=draw(st.integers(1, 3)))
        s.update(seq_len=draw(st.integers(2, 5)), tied=draw(st.booleans()), padding_idx=draw(st.booleans()))
        s["norm_first"] = draw(st.booleans())
        s["lengths"] = draw(st.lists(st.integers(2 if causal else 1, s["seq_len"]), min_size=batch, max_size=batch))
    return s


def model_cases(
    families: Sequence[str] | None = None,
    *,
    batch_size: IntOrStrategy | None = None,
    dtype: torch.dtype = torch.float64,
) -> st.SearchStrategy[Case]:
    """Draw tiny random models with a matching loss and batch, one family per example.

    Families (see :data:`FAMILIES`) are the registry entries tagged ``hypothesis`` in
    :mod:`fisherfunc.testing.cases`: ``mlp`` (classification), ``cnn1d`` / ``cnn2d`` (grouped
    convolutions, GroupNorm), ``conv_transpose`` (grouped ConvTranspose1d/2d),
    ``token_classification`` and ``causal_lm`` (Embedding + LayerNorm, right padding with a mask,
    optionally tied weights), ``transformer`` (one ``nn.TransformerEncoderLayer``, causal LM with a
    key-padding mask) and ``regression``. Sizes are drawn small; weights and data come from a
    drawn seed (``cases.case(case.name, seed=case.seed, **case.sizes)`` rebuilds an example).
    Every sample has at least one token, so any split of the batch has tokens.

    Args:
        families: restrict to these families (default: all).
        batch_size: ``B``, an int or a strategy (default 1 to 4); use at least 2 to split a batch.
        dtype: floating dtype of the model and its float inputs (float64 for tight tolerances).

    Returns:
        A strategy of :class:`Case` (``model``, ``loss``, ``params``, ``batch``, ``spec``, ``name``,
        ``seed``, ``sizes``).

    Raises:
        ValueError: for an unknown family.
    """
    names = tuple(families) if families is not None else FAMILIES
    unknown = [f for f in names if f not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown model families {unknown}; choose from {FAMILIES}")
    return _model_cases(names, _strategy(st.integers(1, 4) if batch_size is None else batch_size), dtype)


@st.composite
def _model_cases(
    draw: st.DrawFn, names: tuple[str, ...], batch_size: st.SearchStrategy[int], dtype: torch.dtype
) -> Case:
    family = draw(st.sampled_from(names))
    sizes = draw(_sizes(family, draw(batch_size)))
    return build_case(family, draw(seeds()), sizes, dtype)
