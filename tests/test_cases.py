"""The test-case registry (``fisherfunc.testing.cases``): every entry builds, runs, and is a pure function of its seed.

- every registered case builds in float64 and float32, its loss runs under ``ff.fisher`` with its
  spec, and its params are the model's own tensors in the requested dtype;
- ``case(name, seed=s, **sizes)`` is deterministic, leaves the caller's RNG state alone, differs
  between seeds, and in any dtype holds the float32 weights rounded;
- sizes are validated, tuple ``batch`` sizes give several batches, ``rebuild`` changes sizes;
- ``names(*tags)`` selects by every tag; the module docstring tables every entry with its tags,
  and every builder documents each of its sizes;
- the models of fisherfunc's own classes count their forward calls.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import optree
import pytest
import torch
from torch import Tensor

import fisherfunc as ff
from fisherfunc.testing import cases, strategies

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

HF = set(cases.names("hf"))
NAMES = cases.names()


def _build(name: str, **options) -> cases.Case:
    if name in HF:
        pytest.importorskip("transformers")
    return cases.case(name, **options)


def _floating(tree) -> list[Tensor]:
    return [t for t in optree.tree_leaves(tree) if isinstance(t, Tensor) and t.is_floating_point()]


def _assert_same(a, b) -> None:
    leaves_a, leaves_b = optree.tree_leaves(a), optree.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert torch.equal(x, y) if isinstance(x, Tensor) else x == y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_every_case_builds_and_its_fisher_runs(name: str, dtype: torch.dtype) -> None:
    case = _build(name, dtype=dtype)
    assert case.name == name and case.seed == 0 and case.tags == cases.entry(name).tags
    assert case.batch is case.batches[0] and len(case.batches) >= 1
    assert all(t.dtype == dtype for t in _floating(case.params))
    assert all(t.dtype == dtype for b in case.batches for t in _floating(b))
    if isinstance(case.params, dict) and all(isinstance(k, str) for k in case.params) and "callable" not in case.tags:
        named = dict(case.model.named_parameters())
        assert case.params.keys() == named.keys() and all(case.params[k] is named[k] for k in named)
    assert not any(m.training for m in case.model.modules()), "cases come in eval mode"
    fisher = ff.fisher(case.loss, case.params, case.batches, spec=case.spec)
    leaves = optree.tree_leaves(fisher)
    assert leaves and all(bool(torch.isfinite(t).all()) and t.dtype == dtype for t in leaves)


@pytest.mark.parametrize("name", NAMES)
def test_a_case_is_a_pure_function_of_name_seed_and_sizes(name: str) -> None:
    if name in HF:
        pytest.importorskip("transformers")
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    a, b = cases.case(name, seed=5), cases.case(name, seed=5)
    assert torch.equal(torch.get_rng_state(), before), "building a case moved the caller's RNG"
    _assert_same(a.params, b.params)
    _assert_same(a.batches, b.batches)
    other = cases.case(name, seed=6)
    differs = [not torch.equal(x, y) for x, y in zip(_floating(a.params), _floating(other.params), strict=True)]
    differs += [not torch.equal(x, y) for x, y in zip(_floating(a.batches), _floating(other.batches), strict=True)]
    if name != "linear_scores" and name != "scaled_gradients":  # their params are fixed values by design
        assert any(differs[: len(_floating(a.params))]), "another seed must draw other weights"
    assert any(differs), "another seed must draw other weights or data"
    # In any dtype a case holds its float32 values rounded.
    low = cases.case(name, seed=5, dtype=torch.float32)
    for x, y in zip(_floating(a.params) + _floating(a.batches), _floating(low.params) + _floating(low.batches)):
        assert torch.equal(x, y.double())


def test_sizes_are_validated_and_named() -> None:
    with pytest.raises(TypeError, match=r"'mlp' takes no size\(s\) \['width'\]; its sizes are .*'hidden'"):
        cases.case("mlp", width=3)
    with pytest.raises(KeyError, match=r"no test case named 'nope'; registered: mlp, "):
        cases.case("nope")
    with pytest.raises(ValueError, match="spec must be 'inferred' or 'mixed'"):
        cases.case("mlp", spec="odd")


def test_tuple_sizes_give_several_batches_and_rebuild_changes_sizes() -> None:
    tokens = cases.case("token_classification", batch=(3, 2), seq_len=(5, 7))
    assert [tuple(b["input_ids"].shape) for b in tokens.batches] == [(3, 5), (2, 7)]
    assert all(int(b["attention_mask"][0].sum()) == b["input_ids"].shape[1] for b in tokens.batches)  # first full
    mlp = cases.case("mlp", seed=3, batch=(4, 2), dtype=torch.float32)
    assert [b[0].shape[0] for b in mlp.batches] == [4, 2]
    wider = mlp.rebuild(hidden=8)
    assert wider.params["0.weight"].shape == (8, 4) and wider.params["0.weight"].dtype == torch.float32
    _assert_same(wider.params, cases.case("mlp", seed=3, batch=(4, 2), hidden=8, dtype=torch.float32).params)
    assert mlp.family == "mlp" and "seed=3" in repr(mlp) and "batch=(4x4, 4)" in repr(mlp)


def test_names_select_by_every_tag() -> None:
    assert cases.names() == NAMES and len(set(NAMES)) == len(NAMES)
    assert set(cases.names("token", "causal")) == {
        n for n in NAMES if {"token", "causal"} <= cases.entry(n).tags
    } and "causal_lm" in cases.names("token", "causal")
    assert cases.names("no-such-tag") == []
    assert strategies.FAMILIES == cases.FAMILIES == tuple(cases.names("hypothesis"))


def test_the_module_docstring_tables_every_case_with_its_tags() -> None:
    doc = cases.__doc__
    rows = [line.split("|")[1:-1] for line in doc.splitlines() if re.match(r"\| [a-z]", line)]
    models = {r[0].strip(): r for r in rows if len(r) == 3 and r[0].strip() != "name"}
    batches = {r[0].strip(): r for r in rows if len(r) == 4 and r[0].strip() != "name"}
    assert list(models) == NAMES and list(batches) == NAMES
    for name, row in batches.items():
        listed = row[3].strip()
        tags = [t.strip() for t in listed.removesuffix("…").split(",") if t.strip()]
        assert set(tags) <= cases.entry(name).tags, (name, tags)
        assert listed.endswith("…") or set(tags) == cases.entry(name).tags, name


@pytest.mark.parametrize("name", NAMES)
def test_every_size_is_documented(name: str) -> None:
    entry = cases.entry(name)
    doc = inspect.getdoc(entry.builder) or ""
    assert entry.summary and entry.summary.endswith("."), name
    documented = re.findall(r"^    (\w+):", doc.partition("Args:")[2], flags=re.M)
    assert documented == list(entry.defaults), f"{name}: the Args section must list its sizes in order"


@pytest.mark.parametrize("name", [n for n in NAMES if n not in HF and "callable" not in cases.entry(n).tags])
def test_models_count_their_forward_calls(name: str) -> None:
    case = cases.case(name)
    assert case.model.calls == 0
    ff.fisher(case.loss, case.params, case.batch, spec=case.spec, chunk_size=2)
    assert case.model.calls > 0


def test_registering_a_case() -> None:
    # In a fresh process: the registry is global, and this test's entry must not leak into others.
    code = """
import torch
import fisherfunc as ff
from fisherfunc.testing import cases

@cases.register("wide_mlp", tags=("classification", "mine"))
def wide_mlp(*, batch: int = 8) -> cases.Built:
    '''A wide MLP.'''
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    data = (torch.randn(batch, 4), torch.randint(0, 3, (batch,)))
    return cases.Built(model, ff.losses.classification(model), [data])

case = cases.case("wide_mlp", batch=5, seed=2)
assert cases.names("mine") == ["wide_mlp"] and cases.entry("wide_mlp").summary == "A wide MLP."
assert case.batch[0].shape == (5, 4) and case.params["0.weight"].dtype == torch.float64
assert case.spec == ff.infer_spec(case.model)
for bad in (lambda: cases.register("mlp", builder=wide_mlp), lambda: cases.register("x", builder=lambda n: None)):
    try:
        bad()
    except (ValueError, TypeError) as err:
        print(type(err).__name__, err)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ValueError a test case named 'mlp' is already registered" in done.stdout
    assert "TypeError builder of 'x': every size must be keyword-only with a default, not 'n'" in done.stdout
