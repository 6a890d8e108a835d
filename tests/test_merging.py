"""Fisher-weighted model merging (``fisherfunc.merging``): the formula, its properties, names, files, the search.

The reference is the module's equation written out by hand in float64 — elementwise Fisher as
given, group Fisher spread onto entries by hand (not by ``broadcast``), the normaliser and the
floor computed from the concatenated entries — and every merge must match it to ``1e-12``
relative. Models come from the registry (``cases.case("mlp", ...)``, float64).
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import io
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fisherfunc as ff
import fisherfunc.merging as fm
from fisherfunc.testing import cases
from fisherfunc.testing import strategies as fst

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-12
PROPS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- the reference: the equation by hand, float64 ------------------------------------------------


def spread(rule: Any, value: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """Group Fisher as a density on a parameter's entries, by hand, for the rules the tests use."""
    value = value.double()
    if isinstance(rule, ff.Skip):
        return None
    if isinstance(rule, ff.Elementwise):
        return value
    if isinstance(rule, ff.Whole):
        return value.expand(shape) / math.prod(shape)
    if isinstance(rule, ff.Channel) and rule.axis == 0 and rule.groups == 1:
        rest = math.prod(shape[1:])
        return value.reshape(-1, *([1] * (len(shape) - 1))).expand(shape) / rest
    if isinstance(rule, ff.Heads) and rule.axis == 0 and rule.parts == 1:
        rows = shape[0] // rule.num_heads
        per_row = value.repeat_interleave(rows) / (rows * math.prod(shape[1:]))
        return per_row.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)
    raise NotImplementedError(rule)


def reference(
    models: list[dict[str, torch.Tensor]],
    fishers: list[dict[str, torch.Tensor | None]] | None,
    lam: list[float],
    *,
    floor: float = 1e-8,
    normalize: str | None = "l2",
    exclude: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """``θ = Σ λ_i (F_i/s_i + ε) θ_i / Σ λ_i (F_i/s_i + ε)``, ``ε = floor · mean(F/s)``; excluded: models[0]."""
    names = [n for n in models[0] if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    if fishers is None:
        fishers = [dict.fromkeys(names) for _ in models]
    scaled = []
    for f in fishers:
        present = [f[n].double().reshape(-1) for n in names if f.get(n) is not None]
        flat = torch.cat(present) if present else torch.zeros(0, dtype=torch.float64)
        s = {None: torch.tensor(1.0), "l2": flat.norm(), "mean": flat.mean()}[normalize] if present else 1.0
        scaled.append({n: (None if f.get(n) is None else f[n].double() / s) for n in names})
    everything = [v.reshape(-1) for f in scaled for v in f.values() if v is not None]
    total = torch.cat(everything) if everything else torch.zeros(0, dtype=torch.float64)
    eps = floor * (total.mean() if total.numel() and total.sum() > 0 else 1.0)
    out = {}
    for n in models[0]:
        if n not in names:
            out[n] = models[0][n]
            continue
        weights = [lam[i] * ((0.0 if scaled[i][n] is None else scaled[i][n]) + eps) for i in range(len(models))]
        num = sum(w * m[n].double() for w, m in zip(weights, models))
        den = sum(weights)
        out[n] = (num / den).to(models[0][n].dtype)
    return out


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = RTOL) -> None:
    assert list(actual) == list(expected)
    for n in expected:
        a, e = actual[n].double(), expected[n].double()
        assert a.shape == e.shape, n
        scale = e.abs().max().clamp_min(1e-300)
        assert float((a - e).abs().max() / scale) <= rtol, (n, float((a - e).abs().max() / scale))


def three_models(spec: str = "inferred") -> tuple[list[Any], list[dict[str, torch.Tensor]]]:
    """Three mlp cases of one architecture (seeds 1–3), float64, and their params.

    ``"inferred"``: 4-5-3, every parameter ``Channel(0)``. ``"mixed"``: 4-6-4-3 with ``Heads(2)``, ``Skip()``,
    ``Whole()``, ``Channel(0)`` and ``Elementwise()``.
    """
    hidden = 5 if spec == "inferred" else (6, 4)
    made = [cases.case("mlp", seed=s, hidden=hidden, spec=spec) for s in (1, 2, 3)]
    return made, [{k: v.detach() for k, v in c.params.items()} for c in made]


def group_fishers(made: list[Any], params: list[dict[str, torch.Tensor]], *, zero: str | None = None) -> list[Any]:
    """Each case's Fisher under its spec; ``zero`` names a parameter whose Fisher is set to 0 in every model."""
    out = []
    for c, p in zip(made, params):
        F = ff.fisher(c.loss, p, c.batch, spec=c.spec)
        if zero is not None:
            F = {**F, zero: torch.zeros_like(F[zero])}
        out.append(F)
    return out


# --- the formula ---------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [None, "l2", "mean"])
@pytest.mark.parametrize("floor", [1e-8, 1e-2])
@pytest.mark.parametrize("exclude", [(), ("2.*",)])
def test_elementwise_merge_equals_the_formula(normalize, floor, exclude):
    made, params = three_models()
    F = [ff.fisher(c.loss, p, c.batch, spec=ff.Elementwise()) for c, p in zip(made, params)]
    F = [{**f, "0.bias": torch.zeros_like(f["0.bias"])} for f in F]  # no model has Fisher there: the floor decides
    F[1]["0.weight"] = F[1]["0.weight"] * (torch.arange(5) >= 2)[:, None]  # one model without Fisher on two rows
    lam = [0.2, 0.5, 1.3]
    merged = fm.merge_models(params, F, coefficients=lam, floor=floor, normalize=normalize, exclude=exclude)
    expected = reference(params, F, lam, floor=floor, normalize=normalize, exclude=exclude)
    assert_close(merged, expected)
    plain = sum(c * p["0.bias"] for c, p in zip(lam, params)) / sum(lam)
    torch.testing.assert_close(merged["0.bias"], plain, rtol=1e-12, atol=0)  # a zero Fisher: λ-weighted average


@pytest.mark.parametrize("normalize", [None, "l2", "mean"])
@pytest.mark.parametrize("exclude", [(), ("2.weight",)])
def test_group_merge_equals_the_formula_with_every_rule(normalize, exclude):
    # spec="mixed": Heads(2), Skip() (no Fisher anywhere: plain average), Whole(), Channel(0), Elementwise()
    made, params = three_models(spec="mixed")
    spec = made[0].spec
    assert {type(r) for r in spec.values()} == {ff.Heads, ff.Skip, ff.Whole, ff.Channel, ff.Elementwise}
    F = group_fishers(made, params, zero="2.bias")
    lam = [1.0, 0.25, 2.0]
    merged = fm.merge_models(params, F, spec=spec, coefficients=lam, normalize=normalize, exclude=exclude, floor=1e-3)
    by_hand = [
        {n: spread(spec[n], f[n], p[n].shape) if f[n] is not None else None for n in p} for f, p in zip(F, params)
    ]
    assert_close(merged, reference(params, by_hand, lam, floor=1e-3, normalize=normalize, exclude=exclude))
    # the group tree, the state holding it, and the elementwise tree spread by broadcast: one merge
    steps = [ff.make_fisher_step(c.loss, spec=spec, decay=0.0) for c in made]
    states = [s(p, c.batch, s.init(p)) for s, p, c in zip(steps, params, made)]
    unzeroed = fm.merge_models(params, group_fishers(made, params), spec=spec, normalize=normalize, exclude=exclude)
    assert_close(fm.merge_models(params, states, normalize=normalize, exclude=exclude), unzeroed)


def test_no_fisher_is_the_weighted_plain_average():
    _, params = three_models()
    lam = [3.0, 1.0, 0.0]
    merged = fm.merge_models(params, None, coefficients=lam)
    assert_close(merged, {n: (3 * params[0][n] + params[1][n]) / 4 for n in params[0]})
    assert_close(fm.merge_models(params, None), {n: sum(p[n] for p in params) / 3 for n in params[0]})


def test_a_model_with_coefficient_zero_counts_for_nothing_and_one_model_is_itself():
    made, params = three_models()
    F = [ff.fisher(c.loss, p, c.batch, spec=ff.Elementwise()) for c, p in zip(made, params)]
    alone = fm.merge_models(params, F, coefficients=[0.0, 1.0, 0.0])
    assert_close(alone, params[1])
    assert_close(fm.merge_models(params[:1], F[:1]), params[0])


# --- properties ----------------------------------------------------------------------------------


def _random_models(seed: int, count: int, zero: float) -> tuple[list[dict], list[dict], list[float]]:
    """``count`` random float64 models ``{"w": [3, 4], "b": [3]}``, elementwise Fishers (a ``zero`` share of
    entries exactly 0, scales over 6 decades) and coefficients."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (3, 4), "b": (3,)}
    models = [{k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()} for _ in range(count)]
    fishers = []
    for _ in range(count):
        f = {}
        for k, s in shapes.items():
            value = torch.rand(s, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-3, 3, s, generator=g)
            f[k] = torch.where(torch.rand(s, generator=g, dtype=torch.float64) < zero, 0.0, value)
        fishers.append(f)
    lam = (torch.rand(count, generator=g, dtype=torch.float64) + 0.05).tolist()
    return models, fishers, lam


models_and_options = st.tuples(
    fst.seeds(), st.integers(1, 4), st.sampled_from([0.0, 0.3]), st.sampled_from([None, "l2", "mean"])
)


@PROPS
@given(drawn=models_and_options)
def test_merging_identical_models_returns_the_model(drawn):
    seed, count, zero, normalize = drawn
    models, fishers, lam = _random_models(seed, count, zero)
    same = [models[0]] * count
    assert_close(fm.merge_models(same, fishers, coefficients=lam, normalize=normalize), models[0])


@PROPS
@given(drawn=models_and_options, factor=st.sampled_from([1e-6, 0.5, 3.0, 1e8]))
def test_scaling_every_coefficient_changes_nothing(drawn, factor):
    seed, count, zero, normalize = drawn
    models, fishers, lam = _random_models(seed, count, zero)
    once = fm.merge_models(models, fishers, coefficients=lam, normalize=normalize)
    scaled = fm.merge_models(models, fishers, coefficients=[factor * c for c in lam], normalize=normalize)
    assert_close(scaled, once)


@PROPS
@given(drawn=models_and_options, factor=st.sampled_from([1e-20, 1e-3, 7.0, 1e20]))
def test_scaling_every_fisher_by_one_constant_changes_nothing(drawn, factor):
    # the floor is relative to the mean Fisher entry, so token-normalised Fisher needs no unit
    seed, count, zero, normalize = drawn
    models, fishers, lam = _random_models(seed, count, zero)
    once = fm.merge_models(models, fishers, coefficients=lam, normalize=normalize, floor=1e-3)
    bigger = [{k: factor * v for k, v in f.items()} for f in fishers]
    assert_close(fm.merge_models(models, bigger, coefficients=lam, normalize=normalize, floor=1e-3), once)


@PROPS
@given(drawn=models_and_options)
def test_zero_fisher_falls_back_to_the_weighted_plain_average(drawn):
    seed, count, _, normalize = drawn
    models, fishers, lam = _random_models(seed, count, 0.0)
    zeros = [{**f, "b": torch.zeros(3, dtype=torch.float64)} for f in fishers]  # "b": no model has Fisher
    merged = fm.merge_models(models, zeros, coefficients=lam, normalize=normalize)
    plain = sum(c * m["b"] for c, m in zip(lam, models)) / sum(lam)
    assert float((merged["b"] - plain).abs().max()) <= RTOL * float(plain.abs().max())
    if normalize is None:  # every Fisher zero: the whole merge is the plain one
        all_zero = [{k: torch.zeros_like(v) for k, v in f.items()} for f in fishers]
        assert_close(fm.merge_models(models, all_zero, coefficients=lam, normalize=None), reference(models, None, lam))


@PROPS
@given(drawn=models_and_options, data=st.data())
def test_merging_is_equivariant_in_the_model_order(drawn, data):
    seed, count, zero, normalize = drawn
    models, fishers, lam = _random_models(seed, count, zero)
    order = data.draw(st.permutations(range(count)), label="order")
    once = fm.merge_models(models, fishers, coefficients=lam, normalize=normalize)
    permuted = fm.merge_models(
        [models[i] for i in order],
        [fishers[i] for i in order],
        coefficients=[lam[i] for i in order],
        normalize=normalize,
    )
    assert_close(permuted, once)


@PROPS
@given(drawn=models_and_options)
def test_merge_equals_the_formula_on_random_models(drawn):
    seed, count, zero, normalize = drawn
    models, fishers, lam = _random_models(seed, count, zero)
    merged = fm.merge_models(models, fishers, coefficients=lam, normalize=normalize, floor=1e-4)
    assert_close(merged, reference(models, fishers, lam, normalize=normalize, floor=1e-4))


# --- purity, dtypes, exclusion -------------------------------------------------------------------


def test_inputs_are_untouched_and_the_result_is_new_detached_tensors_in_the_base_dtype():
    made, _ = three_models()
    params = [dict(c.params) for c in made]  # requires_grad, as named_parameters gives them
    params[0] = {k: v.float() for k, v in params[0].items()}  # the base is float32, the others float64
    F = [ff.fisher(c.loss, {k: v.detach() for k, v in c.params.items()}, c.batch) for c in made]
    before = [[t.detach().clone() for t in p.values()] for p in params] + [[t.clone() for t in f.values()] for f in F]
    merged = fm.merge_models(params, F, spec=made[0].spec, exclude="2.bias")
    after = [list(p.values()) for p in params] + [list(f.values()) for f in F]
    assert all(torch.equal(a, b) for x, y in zip(before, after) for a, b in zip(x, y))
    inputs = {t.untyped_storage().data_ptr() for p in params for t in p.values()}
    for name, value in merged.items():
        assert value.dtype == torch.float32 and not value.requires_grad and value.grad_fn is None, name
        assert value.untyped_storage().data_ptr() not in inputs, name
    assert torch.equal(merged["2.bias"], params[0]["2.bias"].detach())


def test_excluded_parameters_come_from_the_base_model_whatever_the_others_have():
    _, params = three_models()
    other_head = {**params[1], "2.weight": torch.zeros(7, 5, dtype=torch.float64), "2.bias": torch.zeros(7)}
    del other_head["2.bias"]  # a head of another size, and one parameter missing altogether
    models = [params[0], other_head]
    merged = fm.merge_models(models, None, exclude=["2.*"])
    assert torch.equal(merged["2.weight"], params[0]["2.weight"]) and torch.equal(merged["2.bias"], params[0]["2.bias"])
    torch.testing.assert_close(
        merged["0.weight"], (params[0]["0.weight"] + params[1]["0.weight"]) / 2, rtol=RTOL, atol=0
    )
    from_second = fm.merge_models(models, None, exclude=["2.*"], base=1)
    assert list(from_second) == list(other_head) and torch.equal(from_second["2.weight"], other_head["2.weight"])
    assert torch.equal(from_second["0.weight"], merged["0.weight"])
    with pytest.raises(ff.SpecError, match=r"exclude pattern 'head\.\*' matches no parameter of the base model"):
        fm.merge_models(params, None, exclude="head.*")


# --- names: prefixes, and clear errors before any arithmetic ------------------------------------


def test_models_with_prefixed_names_are_matched_by_name():
    made, params = three_models()
    F = [ff.fisher(c.loss, p, c.batch, spec=ff.Elementwise()) for c, p in zip(made, params)]
    plain = fm.merge_models(params, F, coefficients=[1, 2, 3])

    def prefixed(tree, prefix):
        return {prefix + k: v for k, v in tree.items()}

    prefixes = ["module.", "base_model.model.", "_orig_mod.module."]
    models = [prefixed(p, x) for p, x in zip(params, prefixes)]
    fishers = [prefixed(f, x) for f, x in zip(F, prefixes)]  # each Fisher in its own model's names
    merged = fm.merge_models(models, fishers, coefficients=[1, 2, 3])
    assert list(merged) == [f"module.{n}" for n in plain]  # the base model's names
    assert all(torch.equal(merged["module." + n], plain[n]) for n in plain)
    second = fm.merge_models(models, fishers, coefficients=[1, 2, 3], base=1, exclude="2.*")
    assert list(second) == [f"base_model.model.{n}" for n in plain]
    # a prefix is removed only when every name of the model has it
    partial = {**params[1], "module.extra": torch.zeros(1)}
    with pytest.raises(ff.SpecError, match=r"models\[1\]'s 'module.extra' missing from models\[0\]"):
        fm.merge_models([params[0], partial], None)


class _Forbidden:
    """Stands in for a merging step that must not run."""

    def __init__(self, what: str):
        self.what = what

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{self.what} ran before the mismatch was reported")


@pytest.fixture
def nothing_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if the merge reads a file, spreads group Fisher, or estimates a state."""
    monkeypatch.setattr(fm, "broadcast", _Forbidden("broadcast"))
    monkeypatch.setattr(fm, "load", _Forbidden("load"))
    monkeypatch.setattr(fm, "estimate", _Forbidden("estimate"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: {k: v for k, v in p.items() if k != "0.bias"}, r"models\[0\]'s '0\.bias' missing from models\[1\]"),
        (lambda p: {**p, "3.weight": torch.zeros(2)}, r"models\[1\]'s '3\.weight' missing from models\[0\]"),
        (lambda p: {**p, "2.weight": torch.zeros(4, 5)}, r"'2\.weight' has shape \(4, 5\) in models\[1\] but \(3, 5\)"),
        (lambda p: {"module." + k: v for k, v in p.items() if k != "2.bias"}, r"after removing 'module\.'"),
        (lambda p: {**p, "0.bias": torch.zeros(5, dtype=torch.int64)}, r"'0\.bias' of models\[1\] is torch\.int64"),
    ],
)
def test_model_mismatches_are_named_before_anything_is_computed(change, message, nothing_computed, tmp_path):
    made, params = three_models()
    spec = made[0].spec
    F = [ff.fisher(c.loss, p, c.batch, spec=spec) for c, p in zip(made, params)]
    models = [params[0], change(params[1])]
    fishers = [str(tmp_path / "not-read.safetensors"), F[1]]  # reading the file would be computing something
    with pytest.raises(ff.SpecError, match=message):
        fm.merge_models(models, fishers, spec=spec)
    with pytest.raises(ff.SpecError, match=message):
        fm.search_coefficients(models, fishers, lambda p: 0.0, spec=spec)


def test_fisher_mismatches_are_named_before_any_merge_arithmetic():
    made, params = three_models()
    F = [ff.fisher(c.loss, p, c.batch, spec=ff.Elementwise()) for c, p in zip(made, params)]
    bad_shape = [F[0], {**F[1], "2.weight": torch.ones(3)}, F[2]]
    with pytest.raises(ff.SpecError, match=r"fishers\[1\] does not fit models\[1\].*'2\.weight' should have shape"):
        fm.merge_models(params, bad_shape)
    partial = [F[0], {**F[1], "0.bias": None}, F[2]]
    with pytest.raises(ff.SpecError, match=r"'0\.bias' has Fisher in models \[0, 2\] but not in \[1\]"):
        fm.merge_models(params, partial)
    none_anywhere = [{**f, "0.bias": None} for f in F]  # then it is averaged plainly
    plain = sum(p["0.bias"] for p in params) / 3
    torch.testing.assert_close(fm.merge_models(params, none_anywhere)["0.bias"], plain, rtol=RTOL, atol=0)
    with pytest.raises(ff.SpecError, match=r"fishers\[2\] does not have the structure of models\[2\]"):
        fm.merge_models(params, [F[0], F[1], {"0.weight": F[2]["0.weight"]}])
    with pytest.raises(ff.SpecError, match=r"fishers\[0\] does not fit models\[0\]"):
        fm.merge_models(params, F, spec=ff.Heads(4))
    negative = [F[0], {**F[1], "2.bias": -F[1]["2.bias"] - 1}, F[2]]
    with pytest.raises(ValueError, match=r"fishers\[1\]: parameter '2\.bias' has negative or non-finite Fisher"):
        fm.merge_models(params, negative)
    nan = [{**F[0], "0.weight": F[0]["0.weight"] * float("nan")}, F[1], F[2]]
    with pytest.raises(ValueError, match=r"fishers\[0\]: parameter '0\.weight' has negative or non-finite"):
        fm.merge_models(params, nan)
    zero = [F[0], {k: torch.zeros_like(v) for k, v in F[1].items()}, F[2]]
    with pytest.raises(ValueError, match=r"fishers\[1\] is zero on every merged parameter"):
        fm.merge_models(params, zero)
    assert fm.merge_models(params, zero, normalize=None)["0.weight"].isfinite().all()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"coefficients": [1.0, 2.0]}, ValueError, "coefficients has 2 entries for 3 models"),
        ({"coefficients": [1.0, -1.0, 1.0]}, ValueError, "finite, non-negative and not all zero"),
        ({"coefficients": [0.0, 0.0, 0.0]}, ValueError, "not all zero"),
        ({"floor": 0.0}, ValueError, "floor must be a positive number"),
        ({"floor": float("inf")}, ValueError, "floor must be a positive number"),
        ({"normalize": "max"}, ValueError, "normalize must be None or one of"),
        ({"base": 3}, ValueError, "base=3 is not the index"),
        ({"task": ["a", "b"]}, ValueError, "task has 2 entries for 3 models"),
    ],
)
def test_bad_options_are_refused(options, error, message):
    made, params = three_models()
    F = [ff.fisher(c.loss, p, c.batch) for c, p in zip(made, params)]
    with pytest.raises(error, match=message):
        fm.merge_models(params, F, spec=made[0].spec, **options)


def test_bad_inputs_are_refused():
    made, params = three_models()
    F = [ff.fisher(c.loss, p, c.batch) for c, p in zip(made, params)]
    with pytest.raises(TypeError, match="models must be a non-empty list"):
        fm.merge_models(params[0], None)
    with pytest.raises(TypeError, match="models must be a non-empty list"):
        fm.merge_models([], None)
    with pytest.raises(TypeError, match="fishers must be None or a list with one Fisher per model"):
        fm.merge_models(params, F[:2], spec=made[0].spec)
    with pytest.raises(TypeError, match=r"models\[1\] must be a non-empty params tree"):
        fm.merge_models([params[0], {}], None)
    with pytest.raises(TypeError, match=r"models\[1\]: parameter 'w' is a float"):
        fm.merge_models([params[0], {"w": 1.0}], None)


# --- Fisher from state files ---------------------------------------------------------------------


def test_fisher_from_state_files_round_trips(tmp_path):
    pytest.importorskip("safetensors")
    made, params = three_models(spec="mixed")
    steps = [ff.make_fisher_step(c.loss, spec=c.spec, decay=0.5) for c in made]
    states = []
    for step, p, c in zip(steps, params, made):
        state = step.init(p)
        for batch in (c.batch, c.batch):
            state = step(p, batch, state)
        states.append(state)
    from_states = fm.merge_models(params, states, coefficients=[1, 2, 3], exclude="4.*")
    paths = [ff.save(tmp_path / f"model{i}.safetensors", s, params=p) for i, (s, p) in enumerate(zip(states, params))]
    from_files = fm.merge_models(params, paths, coefficients=[1, 2, 3], exclude="4.*")
    assert all(torch.equal(from_files[n], from_states[n]) for n in from_states)
    # one file, one task per model; str paths and a single task name for every file
    both = ff.save(tmp_path / "tasks.safetensors", {"a": states[0], "b": states[1]}, params=params[0])
    pair = fm.merge_models(params[:2], [str(both), str(both)], task=["a", "b"], exclude="4.*")
    assert_close(pair, fm.merge_models(params[:2], states[:2], exclude="4.*"))
    same = fm.merge_models(params[:2], [both, both], task="a")
    assert_close(same, fm.merge_models(params[:2], [states[0], states[0]]))
    with pytest.raises(ValueError, match=r"fishers\[0\]: the file holds tasks \['a', 'b'\]; pass task="):
        fm.merge_models(params[:2], [both, both])
    prefixed = {"module." + k: v for k, v in params[1].items()}
    with pytest.raises(ff.SpecError, match=r"the file's parameter '0\.bias'.*is not in params"):
        fm.merge_models([params[0], prefixed], [paths[0], paths[0]])  # a file is read in its own model's names


# --- the coefficient search ----------------------------------------------------------------------


def test_simplex_grid():
    assert fm.simplex_grid(2) == tuple((k / 10, (10 - k) / 10) for k in range(11))
    three = fm.simplex_grid(3, steps=11)
    assert len(three) == 66 and len(set(three)) == 66 and list(three) == sorted(three)
    assert all(abs(sum(p) - 1.0) <= 1e-15 and min(p) >= 0 for p in three)
    assert fm.simplex_grid(1) == ((1.0,),)
    with pytest.raises(ValueError, match="steps >= 2"):
        fm.simplex_grid(2, steps=1)


@pytest.mark.parametrize("count", [2, 3])
def test_search_returns_the_argmax_of_the_score_over_its_grid(count):
    made, params = three_models()
    params, made = params[:count], made[:count]
    F = [ff.fisher(c.loss, p, c.batch, kind="exact") for c, p in zip(made, params)]
    x, y = made[0].batch

    def score(p: dict[str, torch.Tensor]) -> float:  # validation accuracy-like: minus the mean loss
        return -float(torch.nn.functional.cross_entropy(torch.func.functional_call(made[0].model, p, (x,)), y))

    found = fm.search_coefficients(params, F, score, spec=made[0].spec, steps=6)
    grid = fm.simplex_grid(count, steps=6)
    assert [lam for lam, _ in found.scores] == list(grid)
    by_hand = [score(fm.merge_models(params, F, spec=made[0].spec, coefficients=lam)) for lam in grid]
    assert [s for _, s in found.scores] == pytest.approx(by_hand, rel=1e-12)
    best = max(range(len(grid)), key=lambda i: (by_hand[i], -i))  # the first maximum in grid order
    assert found.coefficients == grid[best] and found.score == pytest.approx(by_hand[best], rel=1e-12)
    assert_close(found.params, fm.merge_models(params, F, spec=made[0].spec, coefficients=grid[best]))


def test_search_ties_go_to_the_first_point_and_bad_scores_are_refused():
    _, params = three_models()
    found = fm.search_coefficients(params[:2], None, lambda p: 1.0, grid=[(0.3, 0.7), (1, 0), (0.5, 0.5)])
    assert found.coefficients == (0.3, 0.7) and [lam for lam, _ in found.scores] == [(0.3, 0.7), (1.0, 0.0), (0.5, 0.5)]
    with pytest.raises(ValueError, match="must return a finite number"):
        fm.search_coefficients(params[:2], None, lambda p: float("nan"))
    with pytest.raises(ValueError, match="the grid is empty"):
        fm.search_coefficients(params[:2], None, lambda p: 0.0, grid=[])
    with pytest.raises(ValueError, match="coefficients has 3 entries for 2 models"):
        fm.search_coefficients(params[:2], None, lambda p: 0.0, grid=[(1, 1, 1)])


# --- the example and the docs --------------------------------------------------------------------


def _example() -> Any:
    path = ROOT / "examples" / "merging_digits.py"
    spec = importlib.util.spec_from_file_location("merging_digits", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_digits_example_and_what_the_docs_say_of_it():
    pytest.importorskip("sklearn")
    example = _example()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        out = example.main()
    runs, text = out["runs"], out["table"]
    assert printed.getvalue().strip() == text
    assert len(runs) == 8 and len(text.splitlines()) == 2 + len(example.ROWS)
    assert all(set(r) == {*example.ROWS, "fine-tunes"} for r in runs)
    for row in example.ROWS:
        assert f"| {row} |" in text
        assert all(0.3 <= r[row][t] <= 1.0 for r in runs for t in "AB"), row

    def mean(row: str, key: str = "mean") -> float:
        return sum(r[row][key] for r in runs) / len(runs)

    fisher, plain = "Fisher, diagonal (default: L2-normalised)", "plain average"
    # docs/merging.md: each fine-tune forgets the other task; merging recovers both
    assert mean("fine-tuned on A", "B") < 0.7 and mean("fine-tuned on B", "A") < 0.7
    assert mean(plain) > 0.93
    # the default Fisher merge beats the plain average on average, and is not worse on any seed
    assert mean(fisher) >= mean(plain) + 0.01
    assert all(r[fisher]["mean"] >= r[plain]["mean"] - 0.003 for r in runs)
    # the unnormalised merge favours task B and loses on task A, and on average to the plain average: A's
    # fine-tune fits more confidently (lower loss) and has the smaller Fisher, on every seed
    notes = [r["fine-tunes"] for r in runs]
    assert all(n["B"] / n["A"] > 1.5 and n["fisher B"] / n["fisher A"] > 2.0 for n in notes)
    unnormalised = "Fisher, diagonal, normalize=None"
    assert mean(unnormalised, "B") > mean(plain, "B") and mean(unnormalised, "A") < mean(plain, "A")
    assert mean(unnormalised) < mean(plain)
    # the per-channel Fisher, spread, sits between the plain average and the diagonal
    assert mean(plain) < mean("Fisher, per channel, spread") < mean(fisher)
    # the λ search on the validation split gains nothing on average here
    assert abs(mean("Fisher, diagonal, λ searched") - mean(fisher)) < 0.005
    # the table in the docs is the one the example prints
    docs = (ROOT / "docs" / "merging.md").read_text()
    assert text in docs and "python examples/merging_digits.py" in docs and "torch 2.13" in docs


def test_the_docs_code_runs(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "merging.md").read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(block, {})
