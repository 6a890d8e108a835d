"""Algebraic properties of the Fisher computation, checked by hypothesis over random models and specs.

Every model is float64 and every comparison uses ``RTOL = 1e-12`` (norm-wise per parameter, see
:mod:`fisherfunc.testing.invariants`); the rules' conservation is checked to ``1e-12`` relative to
``Σ|x|``. Examples are derandomized and no database is written, so a run is reproducible and CI
sees the same examples every time; a failure prints the ``Case`` (name, seed, sizes) that
``fisherfunc.testing.cases.case(name, seed=seed, **sizes)`` rebuilds (the drawn families are the
registry's ``hypothesis`` entries).
"""

from __future__ import annotations

import optree
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch.func import vmap

import fisherfunc as ff
from fisherfunc._engine.batches import batch_size, take
from fisherfunc._spec.resolve import resolve_spec
from fisherfunc.testing import cases as registry
from fisherfunc.testing import invariants as inv
from fisherfunc.testing import strategies as fst

RTOL = 1e-12  # relative, float64 everywhere

# Derandomized and database-less: the same examples on every machine and every run.
BASE = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FAST = settings(BASE, max_examples=60)  # no model involved
MODELS = settings(BASE, max_examples=10)  # per family; a few Fisher passes per example

cases = fst.model_cases


def draw_case(family, data, batch_size=None):
    """A case of ``family`` and a random spec for its params, or ``None`` (inferred from the model)."""
    case = data.draw(cases([family], batch_size=batch_size), label="case")
    spec = data.draw(st.one_of(st.none(), fst.specs(case.params)), label="spec")
    event("inferred spec" if spec is None else "drawn spec")
    return case, spec


# --- rules ----------------------------------------------------------------------------------------

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)


@FAST
@given(shape=shapes, data=st.data(), seed=fst.seeds(), exponent=st.integers(-30, 30))
def test_conservation_of_every_rule(shape, data, seed, exponent):
    rule = data.draw(fst.rules(shape), label="rule")
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 10.0**exponent  # non-negative, any scale
    inv.check_conservation(rule, x, rtol=RTOL)
    assert (rule.reduce(x) >= 0).all()


@FAST
@given(shape=shapes, data=st.data(), seed=fst.seeds(), batch=st.integers(1, 3))
def test_reduce_under_vmap_equals_reduce_per_sample(shape, data, seed, batch):
    # reduce runs inside vmap on one sample's squared gradient: batching must not change it.
    rule = data.draw(fst.rules(shape), label="rule")
    x = torch.rand((batch, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    batched = vmap(rule.reduce)(x)
    looped = torch.stack([rule.reduce(xi) for xi in x])
    assert batched.shape == (batch, *rule.group_shape(torch.Size(shape)))
    torch.testing.assert_close(batched, looped, rtol=RTOL, atol=0.0)


@FAST
@given(batch=fst.padded_batches(min_length=2))
def test_padded_batches_are_right_padded(batch):
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    lengths = mask.sum(1)
    assert ids.shape == labels.shape == mask.shape and ids.dtype == labels.dtype == mask.dtype == torch.long
    assert (lengths >= 2).all()
    assert torch.equal(mask, (torch.arange(mask.shape[1]) < lengths.unsqueeze(1)).long())  # ones, then zeros
    assert torch.equal(ids == 0, mask == 0) and torch.equal(labels == -100, mask == 0)
    model = torch.nn.Embedding(int(ids.max()) + 1, 2)
    loss = ff.losses.token_classification(model, inputs="input_ids", targets="labels", mask="attention_mask")
    assert torch.equal(loss.count_tokens(batch), lengths)


# --- model properties: every family, a few examples each -----------------------------------------

families = pytest.mark.parametrize("family", fst.FAMILIES)


@families
@MODELS
@given(data=st.data())
def test_drawn_specs_are_valid(family, data):
    case = data.draw(cases([family]), label="case")
    resolved = resolve_spec(data.draw(fst.specs(case.params), label="spec"), case.params)
    assert resolved.active, "specs() must never skip every parameter"


@families
@MODELS
@given(data=st.data())
def test_duplicating_the_batch_leaves_the_fisher_unchanged(family, data):
    case, spec = draw_case(family, data, batch_size=st.integers(1, 3))
    inv.check_token_invariance(case.loss, case.params, case.batch, spec, rtol=RTOL)


@families
@MODELS
@given(data=st.data(), seed=fst.seeds())
def test_permuting_the_batch_leaves_the_fisher_unchanged(family, data, seed):
    case, spec = draw_case(family, data, batch_size=st.integers(2, 4))
    generator = torch.Generator().manual_seed(seed)
    inv.check_permutation_invariance(case.loss, case.params, case.batch, spec, generator=generator, rtol=RTOL)


@families
@MODELS
@given(data=st.data(), chunk_sizes=st.lists(st.integers(1, 5), min_size=1, max_size=2, unique=True))
def test_chunk_size_does_not_change_the_fisher(family, data, chunk_sizes):
    case, spec = draw_case(family, data, batch_size=st.integers(2, 4))
    inv.check_chunk_invariance(case.loss, case.params, case.batch, spec, chunk_sizes=chunk_sizes, rtol=RTOL)


@families
@MODELS
@given(data=st.data())
def test_split_and_merge_are_additive(family, data):
    case, spec = draw_case(family, data, batch_size=st.integers(2, 4))
    size = batch_size(case.batch)
    cut = data.draw(st.integers(1, size - 1), label="cut")
    parts = [take(case.batch, 0, cut), take(case.batch, cut, size)]
    inv.check_split_additivity(case.loss, case.params, parts, spec, rtol=RTOL)


@families
@MODELS
@given(data=st.data(), chunk_size=st.one_of(st.none(), st.integers(1, 3)))
def test_per_sample_fisher_sums_to_the_fisher(family, data, chunk_size):
    case, spec = draw_case(family, data)
    inv.check_per_sample_consistency(case.loss, case.params, case.batch, spec, chunk_size=chunk_size, rtol=RTOL)


@families
@MODELS
@given(data=st.data())
def test_factorised_path_agrees_with_vmap_grad(family, data):
    case, spec = draw_case(family, data)
    inv.check_paths_agree(case.loss, case.params, case.batch, spec, rtol=RTOL)


@pytest.mark.parametrize("family", ["token_classification", "causal_lm", "transformer"])
@MODELS
@given(data=st.data(), extra=st.integers(1, 3))
def test_extra_right_padding_leaves_the_fisher_unchanged(family, data, extra):
    # Padded positions are masked out of the loss (and, in the transformer, out of attention), so
    # padding a batch to a longer length is exact: batches with different padding are comparable.
    case, spec = draw_case(family, data)
    fill = {"input_ids": 0, "labels": -100, "attention_mask": 0}
    longer = {
        k: torch.cat([v, torch.full((v.shape[0], extra), fill[k], dtype=v.dtype)], 1) for k, v in case.batch.items()
    }
    inv.assert_fisher_close(
        ff.fisher(case.loss, case.params, longer, spec=spec),
        ff.fisher(case.loss, case.params, case.batch, spec=spec),
        rtol=RTOL,
        what=f"Fisher with {extra} more padded positions",
    )


# Any decay in [0, 1), with decays near 1 (β = 1 − 10^−u, u up to 15.5) as likely as the rest:
# the bias correction 1 − β^t must stay accurate where it cancels.
decays = st.one_of(
    st.floats(0.0, 1.0, exclude_max=True),
    st.floats(0.0, 15.5).map(lambda u: 1.0 - 10.0**-u).filter(lambda beta: 0.0 <= beta < 1.0),
)


@families
@MODELS
@given(data=st.data(), decay=decays, steps=st.integers(1, 4))
def test_ema_of_a_constant_fisher_is_the_constant(family, data, decay, steps):
    case, spec = draw_case(family, data)
    inv.check_ema_constant(case.loss, case.params, case.batch, spec, decay=decay, steps=steps, rtol=RTOL)


@families
@MODELS
@given(data=st.data())
def test_decay_zero_step_is_the_one_shot_fisher(family, data):
    case, spec = draw_case(family, data, batch_size=st.integers(2, 4))
    warmup = take(case.batch, 0, data.draw(st.integers(1, batch_size(case.batch) - 1), label="warmup"))
    inv.check_decay_zero(case.loss, case.params, case.batch, spec, warmup=warmup, rtol=RTOL)


@families
@MODELS
@given(data=st.data(), decay=decays)
def test_fisher_step_leaves_its_inputs_bitwise_unchanged(family, data, decay):
    case, spec = draw_case(family, data)
    inv.check_pure_step(case.loss, case.params, case.batch, spec, decay=decay)


@families
@settings(BASE, max_examples=2)
@given(data=st.data(), seed=fst.seeds())
def test_check_all_passes(family, data, seed):
    case, spec = draw_case(family, data, batch_size=st.integers(2, 3))
    generator = torch.Generator().manual_seed(seed)
    inv.check_all(case.loss, case.params, case.batch, spec, generator=generator, rtol=RTOL)


# --- keys -----------------------------------------------------------------------------------------

names = st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True)
tensors = st.lists(st.integers(1, 3), max_size=3).map(lambda s: torch.zeros(s, dtype=torch.float64))
param_trees = st.dictionaries(
    names,
    st.recursive(tensors, lambda children: st.dictionaries(names, children, min_size=1, max_size=3), max_leaves=4),
    min_size=1,
    max_size=3,
)
tasks = st.text(min_size=1, max_size=6).filter(lambda t: "|" not in t)


@st.composite
def keyed_trees(draw):
    """(params, full rule tree, group tree) with random values in the active groups."""
    params = draw(st.one_of(param_trees, cases().map(lambda c: c.params)))
    resolved = resolve_spec(draw(fst.specs(params)), params)
    seed = draw(fst.seeds())
    g = torch.Generator().manual_seed(seed)
    values = [torch.rand(resolved.group_shapes[i], generator=g, dtype=torch.float64) for i in resolved.active]
    return params, resolved.rule_tree(), resolved.unflatten_groups(values)


@FAST
@given(tree=keyed_trees(), task=tasks, other=tasks)
def test_to_keyed_from_keyed_round_trip(tree, task, other):
    params, rules, groups = tree
    keyed = ff.to_keyed(groups, task=task, spec=rules)
    assert all(key.split("|")[0] == task and len(key.split("|")) == 3 for key in keyed)
    assert list(keyed) == sorted(keyed, key=lambda key: key.split("|"))  # hierarchical, not string order
    back = ff.from_keyed(keyed, task=task, like=params)
    assert optree.tree_structure(back, none_is_leaf=True) == optree.tree_structure(groups, none_is_leaf=True)
    for got, want in zip(optree.tree_leaves(back), optree.tree_leaves(groups), strict=True):
        assert got is want  # exact: the same tensors, not copies
    # Several tasks in one dict: no key collides, each task's keys stay contiguous once sorted.
    if other != task:
        both = {**keyed, **ff.to_keyed(groups, task=other, spec=rules)}
        assert len(both) == 2 * len(keyed)
        order = [key.split("|")[0] for key in sorted(both)]  # even in plain string order
        assert order == sorted(order, key=lambda t: order.index(t))
        per_task = ff.from_keyed(both, like=params)
        assert set(per_task) == {task, other}


# --- the checks can fail --------------------------------------------------------------------------


def _linear_case():
    """A single Linear(3, 2) classifier (float64) and a batch of 4: the registry's ``mlp`` without hidden layers."""
    case = registry.case("mlp", hidden=(), features=3, classes=2, batch=4)
    return case.model, case.loss, case.params, case.batch


def test_check_conservation_catches_a_rule_that_loses_mass():
    class Halved(ff.Channel):
        def reduce(self, x):
            return super().reduce(x) / 2

    with pytest.raises(AssertionError, match="does not conserve"):
        inv.check_conservation(Halved(0), torch.ones(3, 2, dtype=torch.float64))


def test_check_pure_step_catches_an_in_place_update():
    _, loss, params, batch = _linear_case()

    class MutatingLoss:
        """A loss whose pre-check (run outside torch.func) writes a parameter in place."""

        def __call__(self, p, sample):
            return loss(p, sample)

        def check(self, b):
            with torch.no_grad():
                params["0.bias"].mul_(1.0)  # same values, but an in-place write

    with pytest.raises(AssertionError, match=r"version counter of params '0\.bias'"):
        inv.check_pure_step(MutatingLoss(), params, batch, ff.Channel(0))


VALUE_CHECKS = {
    "token": lambda loss, params, batch: inv.check_token_invariance(loss, params, batch, ff.Channel(0), rtol=RTOL),
    "permutation": lambda loss, params, batch: inv.check_permutation_invariance(
        loss, params, batch, ff.Channel(0), rtol=RTOL
    ),
    "chunks": lambda loss, params, batch: inv.check_chunk_invariance(loss, params, batch, ff.Channel(0), rtol=RTOL),
    "split": lambda loss, params, batch: inv.check_split_additivity(
        loss, params, [take(batch, 0, 2), take(batch, 2, 4)], ff.Channel(0), rtol=RTOL
    ),
    "per-sample": lambda loss, params, batch: inv.check_per_sample_consistency(
        loss, params, batch, ff.Channel(0), rtol=RTOL
    ),
    "paths": lambda loss, params, batch: inv.check_paths_agree(loss, params, batch, ff.Channel(0), rtol=RTOL),
    "ema": lambda loss, params, batch: inv.check_ema_constant(loss, params, batch, ff.Channel(0), rtol=RTOL),
    "decay 0": lambda loss, params, batch: inv.check_decay_zero(loss, params, batch, ff.Channel(0), rtol=RTOL),
}


@pytest.mark.parametrize("check", sorted(VALUE_CHECKS))
def test_value_checks_catch_a_loss_that_drifts_between_calls(check):
    # Each call of the per-sample function (once per vectorised chunk) scales the loss a little
    # more, so any two computations of "the same" Fisher disagree.
    _, loss, params, batch = _linear_case()
    calls = [0]

    def drifting(p, sample):
        calls[0] += 1
        value, tokens = loss(p, sample)
        return value * (1.0 + 1e-3 * calls[0]), tokens

    with pytest.raises(AssertionError, match="differs at group"):
        VALUE_CHECKS[check](drifting, params, batch)


# --- resolving a spec: every parameter gets the rule of the spec entry whose path is its prefix -----

_KEYS = st.sampled_from(["a", "b", "c", "0", "1"])


@FAST
@given(
    param_paths=st.lists(st.lists(_KEYS, min_size=1, max_size=4).map(tuple), min_size=1, max_size=12),
    spec_paths=st.lists(st.lists(_KEYS, min_size=0, max_size=3).map(tuple), min_size=1, max_size=8),
)
def test_spec_entries_are_matched_by_the_first_prefix(param_paths, spec_paths):
    # the dictionary lookup of each path's prefixes against the scan of every entry, in spec order
    # (also for lists of entries that no tree could produce: duplicates, one entry a prefix of another)
    from fisherfunc._spec.resolve import _Prefixes

    prefixes = _Prefixes(spec_paths)
    for path in param_paths:
        naive = next((j for j, sp in enumerate(spec_paths) if path[: len(sp)] == sp), None)
        assert prefixes.first(path) == naive


@FAST
@given(data=st.data())
def test_a_prefix_spec_broadcasts_to_every_parameter_below_it(data):
    # a random nested dict of parameters, and a spec cut from it at random depths
    def tree(depth: int) -> st.SearchStrategy:
        leaf = st.integers(1, 3).map(lambda n: torch.zeros(n, 2))
        if depth == 0:
            return leaf
        return st.one_of(leaf, st.dictionaries(_KEYS, st.deferred(lambda: tree(depth - 1)), min_size=1, max_size=3))

    params = data.draw(st.dictionaries(_KEYS, tree(2), min_size=1, max_size=3))
    rules = [ff.Elementwise(), ff.Whole(), ff.Channel(axis=0)]

    def cut(node, path):  # each subtree: one rule for all of it, or a spec per child
        if isinstance(node, dict) and data.draw(st.booleans()):
            return {k: cut(v, (*path, k)) for k, v in node.items()}
        return data.draw(st.sampled_from(rules))

    spec = cut(params, ())
    resolved = resolve_spec(spec, params)
    for name, rule in zip(resolved.names, resolved.rules, strict=True):
        node, keys = spec, name.split(".")
        while isinstance(node, dict):  # walk the spec down the parameter's own path
            node = node[keys.pop(0)]
        assert rule == node, name
