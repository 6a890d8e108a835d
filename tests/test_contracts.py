"""Contract tests run over every public function (optax-style).

- every public name imports;
- ``fisher``, ``per_sample_fisher``, ``fisher_step``, ``init_state``, ``estimate``, ``to_keyed``,
  ``clear`` (and ``infer_spec``, ``from_keyed``) leave params, batch and state tensors bitwise
  unchanged, never write into them, and change neither ``requires_grad``, ``.grad`` nor model mode;
- ``FisherState`` is a NamedTuple that passes through optree and ``torch.utils._pytree``;
- output dtype: float32 for float32/float16/bfloat16 params, float64 for float64 params;
  output device: the params' device;
- group trees have the params' structure, with ``None`` for ``Skip()``;
- ``to_keyed``/``from_keyed`` round-trip exactly; keys are sorted and hierarchical;
- ``clear`` returns a new dict and leaves the old states intact;
- empty params trees raise a clear error.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc.testing import cases
from fisherfunc.testing.cases import Case


# torch's own pytree, through the calls every supported torch has (2.1 lacks tree_leaves and
# tree_structure, and its tree_map takes one tree): the property tested is the same.
def _torch_leaves(tree: Any) -> list[Any]:
    return torch_pytree.tree_flatten(tree)[0]


def _torch_structure(tree: Any) -> Any:
    return torch_pytree.tree_flatten(tree)[1]


def _torch_map(fn: Callable, *trees: Any) -> Any:
    leaves = [torch_pytree.tree_flatten(t)[0] for t in trees]
    return torch_pytree.tree_unflatten([fn(*xs) for xs in zip(*leaves, strict=True)], _torch_structure(trees[0]))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _all_modules() -> list[str]:
    import pkgutil

    return sorted(m.name for m in pkgutil.walk_packages(ff.__path__, "fisherfunc.") if m.name != "fisherfunc.__main__")


ALL_MODULES = _all_modules()

# --- cases ----------------------------------------------------------------------------------------


def mlp_case(dtype: torch.dtype = torch.float32, device: str = "cpu", train: bool = True) -> Case:
    """Linear → Tanh → LayerNorm → Linear, with a spec mixing Heads, Skip, Whole and Elementwise."""
    case = cases.case("mlp", batch=6, features=5, hidden=8, norm=True, spec="mixed", dtype=dtype, device=device)
    case.model.train(train)
    return case


def token_case(dtype: torch.dtype = torch.float32, device: str = "cpu", train: bool = True) -> Case:
    """A residual token LM with padding, Buckets(4) on the embedding and a skipped bias."""
    case = cases.case(
        "causal_lm", batch=4, seq_len=7, vocab=11, dim=6, hidden=6, spec="mixed", dtype=dtype, device=device
    )
    case.model.train(train)
    return case


def nested_case() -> Case:
    """Params as a nested pytree (dict of dict and tuple), with a plain-callable loss."""
    return cases.case("nested_params", dtype=torch.float32)


CASES = {"mlp": mlp_case, "tokens": token_case}


# --- public names ---------------------------------------------------------------------------------


def test_every_public_name_exists() -> None:
    assert len(ff.__all__) == len(set(ff.__all__)), "duplicate names in fisherfunc.__all__"
    for name in ff.__all__:
        assert getattr(ff, name, None) is not None, f"fisherfunc.{name} is in __all__ but missing"
    namespace: dict[str, Any] = {}
    exec("from fisherfunc import *", namespace)
    assert set(ff.__all__) <= set(namespace)


def test_design_names_exist() -> None:
    # The core of DESIGN.md §7 (save/load/merge, distributed and plot are not part of the core yet).
    core = [
        "Channel", "Heads", "Rows", "Buckets", "Elementwise", "Whole", "Skip", "infer_spec", "losses", "fisher",
        "per_sample_fisher", "FisherState", "make_fisher_step", "init_state", "estimate", "to_keyed", "from_keyed",
    ]  # fmt: skip
    assert set(core) <= set(ff.__all__)


@pytest.mark.parametrize("module", ALL_MODULES)
def test_module_all_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__doc__, f"{module} has no module docstring"
    for name in getattr(mod, "__all__", []):
        assert hasattr(mod, name), f"{module}.__all__ names {name!r}, which it does not define"


@pytest.mark.parametrize("name", sorted(ff.__all__))
def test_public_names_are_documented(name: str) -> None:
    obj = getattr(ff, name)
    assert inspect.getdoc(obj), f"fisherfunc.{name} has no docstring"


@pytest.mark.parametrize(
    "fn", [ff.fisher, ff.per_sample_fisher, ff.make_fisher_step, ff.init_state, ff.to_keyed, ff.from_keyed]
)
def test_configuration_is_keyword_only(fn: Callable) -> None:
    # STYLE: configuration is keyword-only; only the data (loss, params, batches, tree) is positional.
    positional = [
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    assert set(positional) <= {"loss", "params", "batches", "batch", "tree", "keyed"}, positional


def test_rules_are_frozen_leaves() -> None:
    rules = [ff.Channel(), ff.Heads(2), ff.Rows(), ff.Buckets(3), ff.Elementwise(), ff.Whole(), ff.Skip()]
    for rule in rules:
        assert dataclasses.is_dataclass(rule) and isinstance(rule, ff.Rule)
        with pytest.raises(dataclasses.FrozenInstanceError):
            rule.group_type = "x"  # type: ignore[misc]
        assert optree.tree_leaves(rule) == [rule]
        assert _torch_leaves(rule) == [rule]
        assert rule == type(rule)(**{f.name: getattr(rule, f.name) for f in dataclasses.fields(rule) if f.init})
        hash(rule)


# --- purity ---------------------------------------------------------------------------------------


class Snapshot:
    """Everything a pure function must leave alone: tensors (values, versions, flags) and model mode."""

    def __init__(self, model: nn.Module, *trees: Any) -> None:
        self.model = model
        self.trees = trees
        self.tensors = [t for tree in trees for t in optree.tree_leaves(tree) if isinstance(t, Tensor)]
        self.tensors += list(model.parameters()) + list(model.buffers())
        self.clones = [t.detach().clone() for t in self.tensors]
        self.versions = [t._version for t in self.tensors]
        self.flags = [(t.requires_grad, t.grad is None, t.dtype, t.device, t.shape) for t in self.tensors]
        self.modes = [m.training for m in model.modules()]
        self.named = dict(model.named_parameters())
        self.structures = [optree.tree_structure(tree, none_is_leaf=True) for tree in trees]

    def check(self) -> None:
        for t, c, v, f in zip(self.tensors, self.clones, self.versions, self.flags, strict=True):
            assert (t.requires_grad, t.grad is None, t.dtype, t.device, t.shape) == f
            assert torch.equal(t.detach(), c), "an input tensor changed"
            assert t._version == v, "an input tensor was written in place"
        assert [m.training for m in self.model.modules()] == self.modes, "model mode changed"
        now = dict(self.model.named_parameters())
        assert now.keys() == self.named.keys() and all(now[k] is self.named[k] for k in now)
        assert [optree.tree_structure(tree, none_is_leaf=True) for tree in self.trees] == self.structures


def _state_and_step(case: Case) -> tuple[ff.FisherStep, ff.FisherState]:
    fisher_step = ff.make_fisher_step(case.loss, spec=case.spec, decay=0.8)
    return fisher_step, fisher_step(case.params, case.batch, fisher_step.init(case.params))


OPERATIONS: dict[str, Callable[[Case], tuple[tuple, Callable[[], Any]]]] = {}


def operation(fn: Callable[[Case], tuple[tuple, Callable[[], Any]]]) -> Callable:
    """Register ``case -> (inputs to snapshot, call)``."""
    OPERATIONS[fn.__name__] = fn
    return fn


@operation
def fisher(case: Case) -> tuple[tuple, Callable]:
    return (case.params, case.batch), lambda: ff.fisher(case.loss, case.params, case.batch, spec=case.spec)


@operation
def fisher_chunked_batches(case: Case) -> tuple[tuple, Callable]:
    batches = [case.batch, case.batch]
    return (case.params, batches), lambda: ff.fisher(case.loss, case.params, batches, spec=case.spec, chunk_size=4)


@operation
def fisher_inferred_spec(case: Case) -> tuple[tuple, Callable]:
    return (case.params, case.batch), lambda: ff.fisher(case.loss, case.params, case.batch)


@operation
def per_sample_fisher(case: Case) -> tuple[tuple, Callable]:
    return (case.params, case.batch), lambda: ff.per_sample_fisher(
        case.loss, case.params, case.batch, spec=case.spec, chunk_size=3
    )


@operation
def fisher_step(case: Case) -> tuple[tuple, Callable]:
    step, state = _state_and_step(case)
    return (case.params, case.batch, state), lambda: step(case.params, case.batch, state)


@operation
def init_state(case: Case) -> tuple[tuple, Callable]:
    return (case.params,), lambda: ff.init_state(case.params, spec=case.spec, decay=0.5)


@operation
def estimate(case: Case) -> tuple[tuple, Callable]:
    _, state = _state_and_step(case)
    return (state,), lambda: ff.estimate(state)


@operation
def to_keyed_state(case: Case) -> tuple[tuple, Callable]:
    _, state = _state_and_step(case)
    return (state,), lambda: ff.to_keyed(state, task="t")


@operation
def to_keyed_tree(case: Case) -> tuple[tuple, Callable]:
    tree = ff.fisher(case.loss, case.params, case.batch, spec=case.spec)
    return (tree,), lambda: ff.to_keyed(tree, task="t", spec=case.spec)


@operation
def from_keyed(case: Case) -> tuple[tuple, Callable]:
    keyed = ff.to_keyed(ff.fisher(case.loss, case.params, case.batch, spec=case.spec), task="t", spec=case.spec)
    return (keyed, case.params), lambda: ff.from_keyed(keyed, task="t", like=case.params)


@operation
def clear(case: Case) -> tuple[tuple, Callable]:
    _, state = _state_and_step(case)
    states = {"a": state, "b": state._replace(step=2)}
    return (states,), lambda: ff.clear(states, "a")


@operation
def infer_spec(case: Case) -> tuple[tuple, Callable]:
    return (), lambda: ff.infer_spec(case.model)


@pytest.mark.parametrize("op", sorted(OPERATIONS))
@pytest.mark.parametrize("case_name", sorted(CASES))
@pytest.mark.parametrize(("train", "frozen"), [(True, False), (False, True)], ids=["train", "eval-frozen"])
def test_inputs_are_not_modified(op: str, case_name: str, train: bool, frozen: bool) -> None:
    case = CASES[case_name](train=train)
    if frozen:  # some parameters do not require grad: they must stay so, and still get Fisher
        for p in list(case.params.values())[::2]:
            p.requires_grad_(False)
    inputs, call = OPERATIONS[op](case)
    snap = Snapshot(case.model, *inputs)
    first = call()
    snap.check()
    second = call()
    snap.check()
    # Same inputs, same outputs: nothing carried over between calls.
    assert optree.tree_structure(first, none_is_leaf=True) == optree.tree_structure(second, none_is_leaf=True)
    for a, b in zip(optree.tree_leaves(first), optree.tree_leaves(second), strict=True):
        assert torch.equal(a, b) if isinstance(a, Tensor) else a == b


def test_nested_params_are_not_modified() -> None:
    case = nested_case()
    snap = Snapshot(case.model, case.params, case.batch)
    ff.fisher(case.loss, case.params, case.batch, spec=case.spec)
    ff.per_sample_fisher(case.loss, case.params, case.batch, spec=case.spec)
    fisher_step = ff.make_fisher_step(case.loss, spec=case.spec, decay=0.5)
    fisher_step(case.params, case.batch, fisher_step.init(case.params))
    snap.check()


def test_outputs_do_not_alias_params() -> None:
    # Elementwise has the parameter's shape: the result must still be a new tensor.
    case = mlp_case()
    out = ff.fisher(case.loss, case.params, case.batch, spec=ff.Elementwise())
    for name, p in case.params.items():
        assert out[name].untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
        assert not out[name].requires_grad


def test_fisher_step_returns_new_state() -> None:
    case = mlp_case()
    fisher_step = ff.make_fisher_step(case.loss, spec=case.spec, decay=0.8)
    state0 = fisher_step.init(case.params)
    state1 = fisher_step(case.params, case.batch, state0)
    state2 = fisher_step(case.params, case.batch, state1)
    assert state0.step == 0 and state1.step == 1 and state2.step == 2
    assert all(float(t.abs().sum()) == 0 for t in optree.tree_leaves(state0.ema))
    for a, b in zip(optree.tree_leaves(state1.ema), optree.tree_leaves(state2.ema), strict=True):
        assert a is not b and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


def test_step_updates_its_own_sums_in_place_and_never_a_callers_accumulator() -> None:
    # __call__ forms X_t in place on the sums it just computed; update(state, acc) is handed the
    # caller's accumulator, which must come back as it was; both give the same state, bit for bit
    case = mlp_case()
    fisher_step = ff.make_fisher_step(case.loss, spec=ff.Elementwise(), decay=0.8)
    state1 = fisher_step(case.params, case.batch, fisher_step.init(case.params))
    acc = fisher_step.batch_sums(case.params, case.batch, state1)
    before = [t.clone() for t in optree.tree_leaves(acc.sums)]
    by_update = fisher_step.update(state1, acc)
    for t, b in zip(optree.tree_leaves(acc.sums), before, strict=True):
        assert torch.equal(t, b)
    by_call = fisher_step(case.params, case.batch, state1)
    for a, b in zip(optree.tree_leaves(by_update.ema), optree.tree_leaves(by_call.ema), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("divisor", [1.0, 7.0])
@pytest.mark.parametrize("decay", [0.0, 0.9])
@pytest.mark.parametrize("stored", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_ema_in_place_on_owned_scratch_equals_the_copying_form(
    divisor: float, decay: float, stored: torch.dtype
) -> None:
    from fisherfunc._state.codec import decode, encode
    from fisherfunc._state.ema import ema

    gen = torch.Generator().manual_seed(0)
    m = encode(torch.rand(4, 5, generator=gen, dtype=torch.float64), dtype=stored)
    x = torch.rand(4, 5, generator=gen)
    expected = ema(m, x.clone(), decay, divisor)
    scratch = x.clone()
    got = ema(m, scratch, decay, divisor, owned=True)
    assert torch.equal(decode(got), decode(expected))
    # the scratch is overwritten exactly when it is of the working dtype (float32 unless the storage
    # is float64); with β = 0 and no divisor, X is the scratch itself and nothing changes
    overwritten = stored != torch.float64 and not (decay == 0.0 and divisor == 1.0)
    assert torch.equal(scratch, x) != overwritten
    strided = x.clone().t()  # not contiguous: copied first, whatever owned says
    m_t = encode(decode(m).t().contiguous(), dtype=stored)
    assert torch.equal(decode(ema(m_t, strided, decay, divisor, owned=True)), decode(ema(m_t, x.t(), decay, divisor)))
    assert torch.equal(strided, x.t())


@pytest.mark.parametrize("divisor", [1.0, 7.0])
@pytest.mark.parametrize("decay", [0.0, 0.9])
@pytest.mark.parametrize("stored", [torch.float32, torch.float64, torch.bfloat16, torch.float16, None])
@pytest.mark.parametrize("owned", [True, False])
def test_ema_of_a_list_equals_ema_of_each_pair(
    divisor: float, decay: float, stored: torch.dtype | None, owned: bool
) -> None:
    # ema_all (the step's update: torch._foreach_* over the list where every pair qualifies) gives
    # what ema gives pair by pair, bit for bit; stored=None mixes storages (the pair-by-pair form)
    from fisherfunc._state.codec import decode, encode
    from fisherfunc._state.ema import ema, ema_all

    gen = torch.Generator().manual_seed(1)
    kinds = [stored] * 4 if stored is not None else [torch.float32, torch.float16, torch.float64, torch.float32]
    shapes = [(4, 5), (3,), (), (2, 3, 2)]
    ms = [encode(torch.rand(s, generator=gen, dtype=torch.float64) * 9, dtype=k) for s, k in zip(shapes, kinds)]
    wide = [torch.float64 if k == torch.float64 else torch.float32 for k in kinds]
    xs = [torch.rand(s, generator=gen, dtype=w) * 5 for s, w in zip(shapes, wide)]
    before = [decode(m).clone() for m in ms]
    expected = [ema(m, x.clone(), decay, divisor) for m, x in zip(ms, xs)]
    got = ema_all(ms, [x.clone() for x in xs], decay, divisor, owned=owned)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert torch.equal(decode(g), decode(e)) and decode(g).dtype == decode(e).dtype
    # the state's own tensors are never written
    for m, b in zip(ms, before):
        assert torch.equal(decode(m), b)


# --- FisherState is a pytree ----------------------------------------------------------------------


def _state() -> tuple[Case, ff.FisherState]:
    case = mlp_case()
    return case, _state_and_step(case)[1]


def _tensor_leaves(tree: Any, leaves: Callable[[Any], list]) -> list[Tensor]:
    return [x for x in leaves(tree) if isinstance(x, Tensor)]


def test_state_is_a_named_tuple() -> None:
    _, state = _state()
    assert isinstance(state, tuple) and type(state) is ff.FisherState
    assert ff.FisherState._fields[:6] == ("ema", "step", "tokens", "samples", "decay", "spec")
    assert "kind" in ff.FisherState._fields
    assert state._replace(step=7).step == 7 and state.step == 1


@pytest.mark.parametrize(
    ("tree_map", "leaves", "flatten", "unflatten"),
    [
        pytest.param(
            optree.tree_map,
            optree.tree_leaves,
            optree.tree_flatten,
            lambda spec, lv: optree.tree_unflatten(spec, lv),
            id="optree",
        ),
        pytest.param(
            _torch_map,
            _torch_leaves,
            torch_pytree.tree_flatten,
            lambda spec, lv: torch_pytree.tree_unflatten(lv, spec),
            id="torch-pytree",
        ),
    ],
)
def test_state_passes_through_tree_map(
    tree_map: Callable, leaves: Callable, flatten: Callable, unflatten: Callable
) -> None:
    _, state = _state()
    ema = [t for t in optree.tree_leaves(state.ema)]
    # The tensor leaves of a state are exactly its EMA tensors (no copies, no extras).
    assert {id(t) for t in _tensor_leaves(state, leaves)} == {id(t) for t in ema}
    assert len(_tensor_leaves(state, leaves)) == len(ema)

    # A map over the tensor leaves (other leaves — counts, decay, rules, and under torch's pytree
    # the None of Skip() entries — passed through) returns a FisherState.
    doubled = tree_map(lambda x: x * 2 if isinstance(x, Tensor) else x, state)
    assert type(doubled) is ff.FisherState
    assert (doubled.step, doubled.tokens, doubled.samples, doubled.decay, doubled.spec) == (
        state.step, state.tokens, state.samples, state.decay, state.spec,
    )  # fmt: skip
    for name, m in state.ema.items():
        assert (doubled.ema[name] is None) if m is None else torch.equal(doubled.ema[name], 2 * m)
    assert ff.estimate(doubled)["3.weight"].shape == (3,)

    # Flatten / unflatten round trip.
    flat, spec = flatten(state)
    back = unflatten(spec, flat)
    assert type(back) is ff.FisherState and back.spec == state.spec and back.ema.keys() == state.ema.keys()

    # Two states of the same params map together.
    summed = tree_map(lambda a, b: a + b if isinstance(a, Tensor) else a, state, doubled)
    assert torch.equal(summed.ema["3.weight"], 3 * state.ema["3.weight"])


def test_state_is_an_input_to_torch_func() -> None:
    _, state = _state()
    w = state.ema["3.weight"]
    out = torch.func.vmap(lambda x, s: x * s.ema["3.weight"].sum(), in_dims=(0, None))(torch.arange(3.0), state)
    assert torch.equal(out, torch.arange(3.0) * w.sum())


def test_state_tensors_live_in_ema_and_metadata_is_plain() -> None:
    # By design the state's only tensors are the EMA leaves; step/tokens/samples/decay are Python
    # numbers and spec holds rules, so tensor-only maps go over ``state.ema`` (documented).
    _, state = _state()
    zeros = state._replace(ema=optree.tree_map(torch.zeros_like, state.ema))
    assert all(torch.equal(z, torch.zeros_like(z)) for z in optree.tree_leaves(zeros.ema))
    assert isinstance(state.step, int) and isinstance(state.samples, int)
    assert isinstance(state.tokens, float) and isinstance(state.decay, float)
    assert all(isinstance(r, ff.Rule) for r in optree.tree_leaves(state.spec, is_leaf=lambda x: isinstance(x, ff.Rule)))


# --- dtype and device -----------------------------------------------------------------------------

DTYPES = [
    pytest.param(torch.float32, torch.float32, id="float32"),
    pytest.param(torch.float16, torch.float32, id="float16"),
    pytest.param(torch.bfloat16, torch.float32, id="bfloat16"),
    pytest.param(torch.float64, torch.float64, id="float64"),
]


def _outputs(case: Case) -> dict[str, Any]:
    fisher_step = ff.make_fisher_step(case.loss, spec=case.spec, decay=0.8)
    state = fisher_step(case.params, case.batch, fisher_step.init(case.params))
    per_sample = ff.per_sample_fisher(case.loss, case.params, case.batch, spec=case.spec)
    return {
        "fisher": ff.fisher(case.loss, case.params, case.batch, spec=case.spec),
        "per_sample_fisher": per_sample.groups,
        "per_sample_tokens": per_sample.tokens,
        "init_state": ff.init_state(case.params, spec=case.spec).ema,
        "state": state.ema,
        "estimate": ff.estimate(state),
        "to_keyed": ff.to_keyed(state, task="t"),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "expected"), DTYPES)
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_output_dtype_and_device(case_name: str, dtype: torch.dtype, expected: torch.dtype, device: str) -> None:
    case = CASES[case_name](dtype=dtype, device=device)
    device_of_params = {p.device for p in case.params.values()}
    for what, tree in _outputs(case).items():
        leaves = optree.tree_leaves(tree)
        assert leaves, what
        for leaf in leaves:
            assert leaf.dtype == expected, f"{what}: {leaf.dtype} for {dtype} params"
            assert {leaf.device} == device_of_params, f"{what}: on {leaf.device}"
            assert torch.isfinite(leaf).all(), what
    # Every param keeps its dtype.
    assert {p.dtype for p in case.params.values()} == {dtype}


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        pytest.param(torch.bfloat16, torch.bfloat16, id="bfloat16"),
        pytest.param(torch.float64, torch.float64, id="float64"),
    ],
)
def test_state_storage_dtype_is_kept(dtype: torch.dtype, expected: torch.dtype) -> None:
    case = mlp_case()
    fisher_step = ff.make_fisher_step(case.loss, spec=case.spec, decay=0.8)
    state = fisher_step(case.params, case.batch, fisher_step.init(case.params, dtype=dtype))
    assert {t.dtype for t in optree.tree_leaves(state.ema)} == {expected}


# --- group trees have the params' structure -------------------------------------------------------


def _structure_cases() -> list[Any]:
    return [
        pytest.param(mlp_case, id="mlp"),
        pytest.param(token_case, id="tokens"),
        pytest.param(nested_case, id="nested"),
    ]


@pytest.mark.parametrize("make", _structure_cases())
def test_group_trees_have_params_structure(make: Callable[[], Case]) -> None:
    case = make()
    resolved = ff.init_state(case.params, spec=case.spec).spec  # the full rule tree
    param_paths = optree.tree_flatten_with_path(case.params)[0]
    rule_leaves = optree.tree_leaves(resolved, is_leaf=lambda x: isinstance(x, ff.Rule))
    rules = dict(zip(param_paths, rule_leaves, strict=True))
    fisher_step = ff.make_fisher_step(case.loss, spec=case.spec, decay=0.5)
    state = fisher_step(case.params, case.batch, fisher_step.init(case.params))
    batch_size = optree.tree_leaves(case.batch)[0].shape[0]
    trees = {
        "fisher": (ff.fisher(case.loss, case.params, case.batch, spec=case.spec), ()),
        "per_sample_fisher": (
            ff.per_sample_fisher(case.loss, case.params, case.batch, spec=case.spec).groups,
            (batch_size,),
        ),
        "init_state": (ff.init_state(case.params, spec=case.spec).ema, ()),
        "state": (state.ema, ()),
        "estimate": (ff.estimate(state), ()),
        "rules": (resolved, None),
    }
    params_structure = optree.tree_structure(case.params, none_is_leaf=True)
    params_paths, params_leaves, _ = optree.tree_flatten_with_path(case.params, none_is_leaf=True)
    for what, (tree, lead) in trees.items():
        is_leaf = (lambda x: isinstance(x, ff.Rule)) if lead is None else None
        assert optree.tree_structure(tree, none_is_leaf=True, is_leaf=is_leaf) == params_structure, what
        assert _torch_structure(tree) == _torch_structure(case.params), what
        paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True, is_leaf=is_leaf)
        assert paths == params_paths, what
        if lead is None:
            continue
        for path, leaf, param in zip(paths, leaves, params_leaves, strict=True):
            rule = rules[path]
            if isinstance(rule, ff.Skip):
                assert leaf is None, f"{what}: skipped {path} should be None"
            else:
                assert leaf.shape == (*lead, *rule.group_shape(param.shape)), f"{what}: {path}"
    # Containers keep their types and key order.
    fisher = trees["fisher"][0]
    assert type(fisher) is type(case.params) and list(fisher) == list(case.params)


def test_nested_skip_is_none() -> None:
    case = nested_case()
    out = ff.fisher(case.loss, case.params, case.batch, spec=case.spec)
    assert isinstance(out["head"], tuple) and out["head"][1] is None and out["head"][0].shape == (3, 6)
    assert out["enc"]["w"].shape == (6,) and out["enc"]["b"].shape == (6,) and out["scale"].shape == ()


# --- keys -----------------------------------------------------------------------------------------


def _group_type(rule: ff.Rule) -> str:
    return {
        ff.Channel: "channel", ff.Heads: "head", ff.Rows: "token", ff.Buckets: "bucket", ff.Elementwise: "param",
        ff.Whole: "tensor",
    }[type(rule)]  # fmt: skip


def _assert_identical(a: Any, b: Any) -> None:
    assert optree.tree_structure(a, none_is_leaf=True) == optree.tree_structure(b, none_is_leaf=True)
    for x, y in zip(optree.tree_leaves(a, none_is_leaf=True), optree.tree_leaves(b, none_is_leaf=True), strict=True):
        if x is None or y is None:
            assert x is None and y is None
        else:
            assert x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)


def _assert_hierarchical(keys: list[str]) -> None:
    assert keys == sorted(keys), "keys are not sorted"
    parts = [k.split("|") for k in keys]
    assert all(len(p) == 3 and all(p) for p in parts)
    assert len(set(keys)) == len(keys)
    # Hierarchical: the keys of one task, and of one (task, parameter), are contiguous.
    for depth in (1, 2):
        prefixes = ["|".join(p[:depth]) for p in parts]
        seen: set[str] = set()
        for i, prefix in enumerate(prefixes):
            if i and prefix != prefixes[i - 1]:
                assert prefix not in seen, f"keys of {prefix!r} are not contiguous"
            seen.add(prefix)


@pytest.mark.parametrize("make", _structure_cases())
def test_keyed_round_trip(make: Callable[[], Case]) -> None:
    case = make()
    tree = ff.fisher(case.loss, case.params, case.batch, spec=case.spec)
    full_spec = ff.init_state(case.params, spec=case.spec).spec
    keyed = ff.to_keyed(tree, task="math", spec=full_spec)
    _assert_hierarchical(list(keyed))

    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    rules = optree.tree_leaves(full_spec, is_leaf=lambda x: isinstance(x, ff.Rule))
    expected = {
        "math|" + ".".join(map(str, path)) + "|" + _group_type(rule): leaf
        for path, leaf, rule in zip(paths, leaves, rules, strict=True)
        if leaf is not None
    }
    assert keyed.keys() == expected.keys()
    for k, v in keyed.items():
        assert v is expected[k]  # documented: values are the tree's tensors, not copies

    # Without like=: a flat {param_name: tensor} per task.
    flat = ff.from_keyed(keyed, task="math")
    assert list(flat) == [k.split("|")[1] for k in keyed]
    assert all(flat[k.split("|")[1]] is v for k, v in keyed.items())
    again = ff.to_keyed(flat, task="math", spec={k.split("|")[1]: _rule_of(full_spec, k) for k in keyed})
    assert list(again) == list(keyed) and all(again[k] is keyed[k] for k in keyed)

    # With like= (the params, or the rule tree): the original tree, None for Skip() included.
    _assert_identical(ff.from_keyed(keyed, task="math", like=case.params), tree)
    _assert_identical(ff.from_keyed(keyed, task="math", like=full_spec), tree)

    # Several tasks in one dict.
    other = ff.to_keyed(optree.tree_map(lambda t: t * 2, tree), task="code", spec=full_spec)
    both = ff.from_keyed({**keyed, **other}, like=case.params)
    assert set(both) == {"math", "code"}
    _assert_identical(both["math"], tree)
    _assert_identical(both["code"], optree.tree_map(lambda t: t * 2, tree))
    _assert_hierarchical(sorted({**keyed, **other}))


def _rule_of(full_spec: Any, key: str) -> ff.Rule:
    name = key.split("|")[1]
    paths, rules, _ = optree.tree_flatten_with_path(full_spec, is_leaf=lambda x: isinstance(x, ff.Rule))
    return dict(zip([".".join(map(str, p)) for p in paths], rules, strict=True))[name]


def test_keyed_state_is_its_estimate() -> None:
    case = token_case()
    _, state = _state_and_step(case)
    keyed = ff.to_keyed(state, task="t")
    direct = ff.to_keyed(ff.estimate(state), task="t", spec=state.spec)
    assert keyed.keys() == direct.keys()
    assert all(torch.equal(keyed[k], direct[k]) for k in keyed)
    _assert_identical(ff.from_keyed(keyed, task="t", like=case.params), ff.estimate(state))
    assert {k.split("|")[2] for k in keyed} == {"bucket", "channel"}
    assert not any("up.bias" in k for k in keyed)  # Skip() has no key


def test_single_rule_spec_keys() -> None:
    tree = {"b": torch.ones(2), "a": torch.zeros(3)}
    keyed = ff.to_keyed(tree, task="t", spec=ff.Channel())
    assert list(keyed) == ["t|a|channel", "t|b|channel"]
    _assert_identical(ff.from_keyed(keyed, task="t", like=tree), tree)


def test_keys_never_collide() -> None:
    # {"a": {"b": .}} and {"a.b": .} have the same dotted name: refused, never overwritten.
    tree = {"a": {"b": torch.ones(1)}, "a.b": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"two entries map to the key 't\|a\.b\|channel'"):
        ff.to_keyed(tree, task="t", spec=ff.Channel())


# --- clear ----------------------------------------------------------------------------------------


def test_clear_returns_new_dict_and_keeps_old_states() -> None:
    case = mlp_case()
    fisher_step, state_a = _state_and_step(case)
    state_b = fisher_step(case.params, case.batch, state_a)
    states = {"a": state_a, "b": state_b}
    snap = Snapshot(case.model, states)

    cleared = ff.clear(states, "a")
    snap.check()
    assert cleared is not states and states == {"a": state_a, "b": state_b}
    assert states["a"] is state_a and states["a"].step == 1 and states["b"].step == 2
    assert cleared["b"] is state_b
    fresh = cleared["a"]
    assert (fresh.step, fresh.tokens, fresh.samples) == (0, 0.0, 0)
    assert (fresh.decay, fresh.spec) == (state_a.decay, state_a.spec)
    for name, m in state_a.ema.items():
        if m is None:
            assert fresh.ema[name] is None
        else:
            z = fresh.ema[name]
            assert z is not m and z.dtype == m.dtype and z.shape == m.shape and not z.any()
    # The cleared state is a working fresh state.
    assert fisher_step(case.params, case.batch, fresh).step == 1

    for tasks in (None, ["a", "b"], ("b", "a")):
        every = ff.clear(states, tasks)
        snap.check()
        assert every is not states and all(s.step == 0 for s in every.values())
    assert ff.clear(states, []) == states and ff.clear(states, []) is not states


# --- empty trees ----------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [{}, [], (), {"a": {}}, {"a": [], "b": ()}], ids=repr)
def test_empty_params_raise(params: Any) -> None:
    case = mlp_case()
    match = r"params is an empty tree"
    for spec in (ff.Channel(), None):
        with pytest.raises(ff.SpecError, match=match):
            ff.fisher(case.loss, params, case.batch, spec=spec)
        with pytest.raises(ff.SpecError, match=match):
            ff.per_sample_fisher(case.loss, params, case.batch, spec=spec)
        with pytest.raises(ff.SpecError, match=match):
            ff.make_fisher_step(case.loss, spec=spec).init(params)
    with pytest.raises(ff.SpecError, match=match):
        ff.init_state(params, spec=ff.Channel())
    state = ff.init_state(case.params, spec=case.spec, decay=0.5)
    with pytest.raises(ff.SpecError, match=match):
        ff.make_fisher_step(case.loss, spec=case.spec, decay=0.5)(params, case.batch, state)


def test_empty_group_tree_keys() -> None:
    assert ff.to_keyed({}, task="t", spec={}) == {}
    assert ff.from_keyed({}) == {}


def test_fisher_step_takes_a_dataloader_batch() -> None:
    # DataLoader's default collate yields one batch as a list [x, y]; a step takes it as one batch.
    from torch.utils.data import DataLoader, TensorDataset

    case = cases.case("mlp", batch=10, dtype=torch.float32)
    params = {k: v.detach() for k, v in case.params.items()}
    data = TensorDataset(*case.batch)
    fisher_step = ff.make_fisher_step(case.loss, decay=0.0)
    (listed,) = list(DataLoader(data, batch_size=10))
    assert isinstance(listed, list)
    from_list = fisher_step(params, listed, fisher_step.init(params))
    from_tuple = fisher_step(params, tuple(data.tensors), fisher_step.init(params))
    assert from_list.samples == 10
    for name in params:
        assert torch.equal(from_list.ema[name], from_tuple.ema[name])
    loader_fisher = ff.fisher(case.loss, params, DataLoader(data, batch_size=4))
    assert all(torch.allclose(loader_fisher[k], from_tuple.ema[k], rtol=1e-6) for k in params)


def test_a_mapping_that_is_not_a_dict_is_a_batch() -> None:
    # Hugging Face's BatchEncoding is a UserDict: a Mapping that optree does not walk into.
    from collections import UserDict

    case = cases.case("mlp", hidden=(), batch=6, dtype=torch.float32)  # a single Linear(4, 3)
    params = {k: v.detach() for k, v in case.params.items()}
    loss = ff.losses.classification(case.model, inputs="x", targets="y")
    plain = {"x": case.batch[0], "y": case.batch[1]}
    wrapped = UserDict(plain)
    expected = ff.fisher(loss, params, plain)
    assert all(torch.equal(ff.fisher(loss, params, wrapped)[k], expected[k]) for k in params)
    per_sample = ff.per_sample_fisher(loss, params, wrapped)
    assert all(torch.allclose(per_sample.groups[k].sum(0) / 6, expected[k]) for k in params)
    step = ff.make_fisher_step(loss, decay=0.0)
    state = step(params, wrapped, step.init(params))
    assert all(torch.equal(state.ema[k], expected[k]) for k in params)
