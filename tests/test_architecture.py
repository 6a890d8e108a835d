"""The architecture as a contract: private layers, explicit public namespaces, one error type per failure.

- every module is either private (an underscore in its path) or one of the public namespaces;
- no underscore name is imported from (or read off) another module of the package: shared
  internals are underscore *modules*, imported as modules;
- no function shadows a module (``import fisherfunc.x`` never changes what ``fisherfunc.x`` is);
- every public module: a docstring; every public callable: a docstring, configuration keyword-only;
- one error type per failure kind, from every entry point (group Fisher, the step, K-FAC, EK-FAC).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fisherfunc as ff

PACKAGE = Path(ff.__file__).parent
PUBLIC = {
    "fisherfunc",
    "fisherfunc.cli",
    "fisherfunc.cli.demo",
    "fisherfunc.compat",
    "fisherfunc.distributed",
    "fisherfunc.dropout",
    "fisherfunc.ewc",
    "fisherfunc.heads",
    "fisherfunc.hf",
    "fisherfunc.kfac",
    "fisherfunc.losses",
    "fisherfunc.merging",
    "fisherfunc.perturb",
    "fisherfunc.plot",
    "fisherfunc.storage",
    "fisherfunc.testing",
    "fisherfunc.testing.cases",
    "fisherfunc.testing.invariants",
    "fisherfunc.testing.strategies",
}


def _modules() -> list[str]:
    found = [m.name for m in pkgutil.walk_packages(ff.__path__, "fisherfunc.") if m.name != "fisherfunc.__main__"]
    return sorted(["fisherfunc", *found])


MODULES = _modules()


def _private(name: str) -> bool:
    return any(part.startswith("_") for part in name.split("."))


def test_every_module_is_private_or_a_public_namespace() -> None:
    stray = [m for m in MODULES if not _private(m) and m not in PUBLIC]
    assert not stray, f"modules that are neither private nor public namespaces: {stray}"
    missing = sorted(PUBLIC - set(MODULES))
    assert not missing, f"public namespaces that do not exist: {missing}"


def test_no_public_name_is_a_mechanism() -> None:
    for name in ("probes", "per_sample", "codec", "membership", "selection", "nonfinite", "estimate_module"):
        assert not isinstance(getattr(ff, name, None), type(ff)), f"fisherfunc.{name} is a public module"


def _source(module: str) -> Path:
    path = PACKAGE.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` in ``module`` imports from."""
    if not node.level:
        return node.module or ""
    package = module if _source(module).name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


@pytest.mark.parametrize("module", MODULES)
def test_no_underscore_name_crosses_a_module_boundary(module: str) -> None:
    tree = ast.parse(_source(module).read_text(encoding="utf-8"))
    imported_modules: dict[str, str] = {}  # local name -> fisherfunc module it is bound to
    bad: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            if not source.startswith("fisherfunc"):
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if full in MODULES or f"{full}" in sys.modules and isinstance(sys.modules.get(full), type(ff)):
                    imported_modules[alias.asname or alias.name] = full
                elif alias.name.startswith("_") and not alias.name.startswith("__"):
                    bad.append(f"from {source} import {alias.name} (line {node.lineno})")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported_modules:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                bad.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    assert not bad, f"{module} reaches into other modules' private names: {bad}"


@pytest.mark.parametrize("module", MODULES)
def test_no_function_shadows_a_module(module: str) -> None:
    parent, _, name = module.rpartition(".")
    if not parent:
        return
    importlib.import_module(module)
    bound = getattr(sys.modules[parent], name, None)
    assert bound is None or bound is sys.modules[module], (
        f"{parent}.{name} is a {type(bound).__name__}, shadowing the module {module}"
    )


# --- every public module: documented, keyword-only configuration ---------------------------------

#: Parameters that may stay positional: the data a function is about, never configuration.
DATA = {
    "loss", "params", "batches", "batch", "tree", "keyed", "state", "states", "first", "others", "path", "value",
    "fisher", "spec", "factors", "F", "vector", "damping", "layer", "plan", "record", "delta", "groups", "a", "b",
    "result", "density", "k", "energy", "fisher_step", "acc", "argv", "args", "items", "example", "x", "dtype",
    "shape", "model", "rule", "names", "source", "decay", "step", "mask", "layout", "tasks", "stored", "tensors",
    "keyed_or_state", "lengths", "seq_len", "vocab", "family", "seed", "sizes", "check", "what", "actual", "expected",
    "families",  # testing.model_cases(families): which model families to draw from, the strategy's subject
}  # fmt: skip


def _public_callables() -> list[tuple[str, Any]]:
    out = []
    for module in sorted(PUBLIC):
        mod = importlib.import_module(module)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if (
                callable(obj)
                and not isinstance(obj, type(ff))
                and getattr(obj, "__module__", "").startswith("fisherfunc")
            ):
                out.append((f"{module}.{name}", obj))
    return out


CALLABLES = _public_callables()


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_modules_are_documented(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__doc__ and len(mod.__doc__.strip()) > 40, f"{module} has no real module docstring"
    assert hasattr(mod, "__all__") or module == "fisherfunc.cli.demo", f"{module} has no __all__"


@pytest.mark.parametrize(("name", "obj"), CALLABLES, ids=[n for n, _ in CALLABLES])
def test_public_callables_are_documented(name: str, obj: Any) -> None:
    assert inspect.getdoc(obj), f"{name} has no docstring"


@pytest.mark.parametrize(("name", "obj"), CALLABLES, ids=[n for n, _ in CALLABLES])
def test_configuration_is_keyword_only_everywhere(name: str, obj: Any) -> None:
    if isinstance(obj, type):
        if not dataclass_like(obj):
            return
        return
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return
    positional = [
        p.name
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is not inspect.Parameter.empty
    ]
    options = [p for p in positional if p not in DATA]
    assert not options, f"{name}: options {options} should be keyword-only"


def dataclass_like(cls: type) -> bool:
    return hasattr(cls, "__dataclass_fields__")


def test_kind_values_take_keyword_options_only() -> None:
    for kind in (ff.MC, ff.Exact):
        with pytest.raises(TypeError):
            kind(4)  # type: ignore[misc]


# --- one error type per failure kind, from every entry point -------------------------------------


def _mlp() -> tuple[nn.Module, Any, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    return model, ff.losses.classification(model), {k: v.detach() for k, v in model.named_parameters()}


def _entries() -> dict[str, Callable[..., Any]]:
    def step(loss: Any, params: Any, batch: Any, **options: Any) -> Any:
        fisher_step = ff.make_fisher_step(loss, **options)
        return fisher_step(params, batch, fisher_step.init(params))

    def kfac_step(loss: Any, params: Any, batch: Any, **options: Any) -> Any:
        good = (torch.randn(3, 4), torch.randint(0, 3, (3,)))
        kstep = ff.kfac.make_kfac_step(loss, **options)
        return kstep(params, batch, kstep.init(params, good))

    def ekfac(loss: Any, params: Any, batch: Any, **options: Any) -> Any:
        good = (torch.randn(3, 4), torch.randint(0, 3, (3,)))
        return ff.kfac.ekfac(loss, params, batch, ff.kfac.kfac(loss, params, good), **options)

    return {
        "fisher": ff.fisher,
        "accumulate": ff.accumulate,
        "per_sample_fisher": ff.per_sample_fisher,
        "step": step,
        "kfac": ff.kfac.kfac,
        "kfac_step": kfac_step,
        "ekfac": ekfac,
    }


ENTRIES = _entries()


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_non_finite_values_raise_one_error_type(entry: str) -> None:
    _, loss, params = _mlp()
    x = torch.randn(6, 4)
    x[2, 1] = float("nan")
    with pytest.raises(ff.NonFiniteError, match="samples \\[2\\]") as err:
        ENTRIES[entry](loss, params, (x, torch.randint(0, 3, (6,))))
    assert err.value.samples == (2,)


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_malformed_batches_raise_one_error_type(entry: str) -> None:
    _, loss, params = _mlp()
    with pytest.raises(ff.BatchError, match="different batch sizes"):
        ENTRIES[entry](loss, params, (torch.randn(6, 4), torch.randint(0, 3, (5,))))


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_bad_kinds_raise_one_error_type(entry: str) -> None:
    _, loss, params = _mlp()
    with pytest.raises(ValueError, match="kind='mc' draws labels at random"):
        ENTRIES[entry](loss, params, (torch.randn(6, 4), torch.randint(0, 3, (6,))), kind="mc")


@pytest.mark.parametrize("entry", ["fisher", "accumulate", "per_sample_fisher", "step"])
def test_specs_that_do_not_fit_raise_one_error_type(entry: str) -> None:
    _, loss, params = _mlp()
    with pytest.raises(ff.SpecError, match=r"parameter '0\.(weight|bias)'.*does not divide"):
        ENTRIES[entry](loss, params, (torch.randn(6, 4), torch.randint(0, 3, (6,))), spec=ff.Heads(4))


# --- purity: no entry point writes into what it is given ------------------------------------------


def _snapshot(tree: Any) -> list[torch.Tensor]:
    import optree

    return [t.detach().clone() for t in optree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _same(before: list[torch.Tensor], tree: Any) -> bool:
    import optree

    after = [t for t in optree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
    return len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_entry_points_leave_params_and_batch_untouched(entry: str) -> None:
    model, loss, params = _mlp()
    batch = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    params_before, batch_before = _snapshot(params), _snapshot(batch)
    weights_before = _snapshot(dict(model.named_parameters()))
    ENTRIES[entry](loss, params, batch)
    assert _same(params_before, params) and _same(batch_before, batch)
    assert _same(weights_before, dict(model.named_parameters()))


def test_kfac_step_and_perturb_return_new_values() -> None:
    _, loss, params = _mlp()
    batch = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    kstep = ff.kfac.make_kfac_step(loss, decay=0.5)
    state = kstep(params, batch, kstep.init(params, batch))
    before = _snapshot(state)
    new = kstep(params, batch, state)
    assert _same(before, state) and new is not state and new.step == state.step + 1
    F = ff.fisher(loss, params, batch, kind="exact")
    plan = ff.perturb.plan(F, ff.Channel(0), params, concentration=0.5, energy=1e-2, temperature=0)
    params_before = _snapshot(params)
    perturbed, _ = ff.perturb.perturb(params, plan, generator=torch.Generator().manual_seed(0))
    assert _same(params_before, params) and not _same(params_before, perturbed)


# --- docstrings say the shapes of the tensors they take and return --------------------------------


def _tensor_facing(obj: Any) -> bool:
    """Whether a callable's annotations mention tensors or group trees."""
    try:
        hints = " ".join(str(p.annotation) for p in inspect.signature(obj).parameters.values())
        hints += " " + str(inspect.signature(obj).return_annotation)
    except (TypeError, ValueError):
        return False
    return "Tensor" in hints


@pytest.mark.parametrize(("name", "obj"), CALLABLES, ids=[n for n, _ in CALLABLES])
def test_tensor_facing_docstrings_give_shapes(name: str, obj: Any) -> None:
    if not _tensor_facing(obj):
        return
    doc = inspect.getdoc(obj) or ""
    assert "[" in doc or "shape" in doc, f"{name} takes or returns tensors but its docstring gives no shape"
