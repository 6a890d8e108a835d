"""Rules own their geometry: membership, square sums and their reduction, stated and derived alike.

Each built-in rule states its geometry directly; the base class derives it from ``reduce`` alone
(membership is the transpose of the summation). Both must agree for every rule and shape, and a
user's own ``Rule`` subclass — which states nothing but ``group_shape`` and ``reduce`` — must work
everywhere a built-in does: ``fisher`` on both paths, the step, ``perturb``, keys and files.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc._engine.group_sums import find_sites
from fisherfunc._engine.numerics import prepare
from fisherfunc._spec.groups import group_index
from fisherfunc._spec.resolve import resolve_spec
from fisherfunc.testing import assert_fisher_close, cases


@dataclasses.dataclass(frozen=True)
class RowBlocks(ff.Rule):
    """A user's rule: contiguous blocks of ``size`` rows (axis 0), summed over everything else."""

    size: int = 2
    group_type: str = dataclasses.field(default="block", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        if len(shape) < 1 or shape[0] % self.size:
            raise ff.SpecError(f"parameter '{name}': {self!r} needs rows divisible by {self.size}, got {tuple(shape)}")
        return torch.Size([shape[0] // self.size])

    def reduce(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0] // self.size, -1).sum(1)


@dataclasses.dataclass(frozen=True)
class Parity(ff.Rule):
    """A user's rule whose groups mix rows and columns: entry (i, j) of a matrix in group (i + j) mod 2."""

    group_type: str = dataclasses.field(default="parity", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        if len(shape) != 2:
            raise ff.SpecError(f"parameter '{name}': Parity() needs a matrix, got {tuple(shape)}")
        return torch.Size([2])

    def reduce(self, x: Tensor) -> Tensor:
        i = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
        j = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        odd = ((i + j) % 2).to(x.dtype)
        return torch.stack([(x * (1 - odd)).sum(), (x * odd).sum()])


@dataclasses.dataclass(frozen=True)
class Doubled(ff.Rule):
    """Not a partition: every entry counted twice. Its geometry must be refused, not guessed."""

    group_type: str = dataclasses.field(default="doubled", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        return torch.Size([])

    def reduce(self, x: Tensor) -> Tensor:
        return 2 * x.sum()


BUILT_IN = [
    (ff.Channel(0), (4, 3, 2)),
    (ff.Channel(1), (4, 3)),
    (ff.Channel(-1), (4, 3)),
    (ff.Channel(axis=1, groups=2), (6, 3, 2)),
    (ff.Channel(axis=1, groups=2), (6, 3)),
    (ff.Heads(2), (8, 3)),
    (ff.Heads(2, axis=1), (3, 8)),
    (ff.Heads(2, parts=3), (12, 5)),
    (ff.Heads(2, axis=-1, parts=2), (5, 12)),
    (ff.Rows(), (7, 3)),
    (ff.Buckets(3), (7, 2)),
    (ff.Buckets(mapping=(2, 0, 0, 1, 2)), (5, 3)),
    (ff.Elementwise(), (3, 4)),
    (ff.Whole(), (3, 4)),
    (ff.Whole(), ()),
    (RowBlocks(2), (6, 3)),
    (Parity(), (3, 5)),
]
IDS = [f"{r!r}-{s}" for r, s in BUILT_IN]


@pytest.mark.parametrize(("rule", "shape"), BUILT_IN, ids=IDS)
def test_stated_membership_is_the_derived_one(rule: ff.Rule, shape: tuple[int, ...]) -> None:
    stated = rule.membership(shape)
    derived = ff.Rule.membership(rule, shape)  # the base class: transpose of reduce
    assert stated.dtype == torch.long and torch.equal(stated, derived)


@pytest.mark.parametrize(("rule", "shape"), BUILT_IN, ids=IDS)
def test_membership_scatter_is_reduce(rule: ff.Rule, shape: tuple[int, ...]) -> None:
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    owner = rule.membership(shape)
    assert owner.shape == torch.Size(shape) and owner.dtype == torch.long
    size = rule.group_shape(torch.Size(shape)).numel()
    scattered = torch.zeros(size, dtype=torch.float64).index_add(0, owner.reshape(-1), x.reshape(-1))
    torch.testing.assert_close(scattered, rule.reduce(x).reshape(-1), rtol=1e-12, atol=0)
    # the group numbering perturb chooses on counts the same members
    sizes = group_index(rule, {"p": torch.zeros(shape)}).sizes
    assert torch.equal(sizes, torch.bincount(owner.reshape(-1), minlength=size).to(torch.float64))


def test_skip_has_no_geometry() -> None:
    with pytest.raises(ff.SpecError, match="belong to none"):
        ff.Skip().membership(torch.Size([3]))


MATRICES = [(r, s) for r, s in BUILT_IN if len(s) == 2]


@pytest.mark.parametrize(("rule", "shape"), MATRICES, ids=[f"{r!r}-{s}" for r, s in MATRICES])
def test_square_sums_reduce_to_the_groups(rule: ff.Rule, shape: tuple[int, ...]) -> None:
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = rule.reduce(g * g)
    which = rule.square_sums(shape)
    assert which == ff.Rule.square_sums(rule, shape), "stated and derived square sums differ"
    sums = {"rows": (g * g).sum(1), "cols": (g * g).sum(0), "full": g * g}[which]
    for to_groups in (rule.from_square_sums(shape, which), ff.Rule.from_square_sums(rule, shape, which)):
        torch.testing.assert_close(to_groups(sums), expected, rtol=1e-12, atol=0)


def test_what_each_rule_needs_from_a_weight() -> None:
    shape = (6, 4)
    needs = {r: r.square_sums(shape) for r in (ff.Channel(0), ff.Channel(1), ff.Heads(2), ff.Heads(2, axis=1))}
    assert list(needs.values()) == ["rows", "cols", "rows", "cols"]
    assert RowBlocks(3).square_sums(shape) == "rows" and Parity().square_sums(shape) == "full"
    assert ff.Elementwise().square_sums(shape) == "full" and ff.Channel(axis=1, groups=2).square_sums(shape) == "full"


def test_a_rule_that_is_not_a_partition_is_refused() -> None:
    with pytest.raises(ff.SpecError, match="exactly one group"):
        Doubled().membership((3, 2))
    with pytest.raises(ff.SpecError, match="exactly one group"):
        Doubled().square_sums((3, 2))


# --- a user's rule, end to end --------------------------------------------------------------------


def _case() -> tuple[nn.Module, ff.losses.ModelLoss, dict[str, Tensor], tuple[Tensor, Tensor], dict[str, ff.Rule]]:
    case = cases.case("mlp", features=5, hidden=6, classes=4, batch=7)  # Linear(5, 6) → Tanh → Linear(6, 4)
    params = {k: v.detach() for k, v in case.params.items()}
    spec = {"0.weight": RowBlocks(3), "0.bias": RowBlocks(2), "2.weight": Parity(), "2.bias": ff.Channel()}
    return case.model, case.loss, params, case.batch, spec


def _naive(model: nn.Module, params: dict[str, Tensor], batch: tuple[Tensor, Tensor], spec: dict) -> dict:
    """Σ_b rule.reduce(g_b²) / B from a per-sample autograd loop."""
    total: dict[str, Tensor] = {}
    x, y = batch
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    for b in range(x.shape[0]):
        out = torch.func.functional_call(model, leaves, (x[b : b + 1],))
        loss = nn.functional.cross_entropy(out, y[b : b + 1], reduction="sum")
        grads = torch.autograd.grad(loss, list(leaves.values()))
        for name, g in zip(leaves, grads):
            total[name] = total.get(name, 0) + spec[name].reduce(g * g)
    return {k: v / x.shape[0] for k, v in total.items()}


def test_a_user_rule_works_in_fisher_on_both_paths() -> None:
    model, loss, params, batch, spec = _case()
    resolved = resolve_spec(spec, params)
    sites = find_sites(loss, prepare(params, differentiated=resolved.active), resolved, (batch[0][0], batch[1][0]))
    assert {resolved.names[s.leaf]: s.sums for s in sites} == {"0.weight": "rows", "2.weight": "full"}
    expected = _naive(model, params, batch, spec)
    for path in ("auto", "direct"):
        assert_fisher_close(ff.fisher(loss, params, batch, spec=spec, path=path), expected, what=path)
        per_sample = ff.per_sample_fisher(loss, params, batch, spec=spec, path=path)
        assert per_sample.groups["0.weight"].shape == (7, 2)


def test_a_user_rule_works_in_the_step_keys_files_and_perturb(tmp_path) -> None:
    model, loss, params, batch, spec = _case()
    step = ff.make_fisher_step(loss, spec=spec, decay=0.0)
    state = step(params, batch, step.init(params))
    assert_fisher_close(ff.estimate(state), ff.fisher(loss, params, batch, spec=spec))
    keyed = ff.to_keyed(state, task="t")
    assert "t|0.weight|block" in keyed and "t|2.weight|parity" in keyed
    loaded = ff.load(ff.save(tmp_path / "state.safetensors", state, params=params), params)
    assert loaded.spec == state.spec and all(torch.equal(loaded.ema[k], state.ema[k]) for k in state.ema)
    plan = ff.perturb.plan(
        ff.estimate(state), spec, params, concentration=0.5, energy=1e-2, temperature=0, where=RowBlocks
    )
    chosen = {plan.index.spec.names[plan.index.spec.active[int(j)]] for j in plan.index.leaf_of(plan.groups)}
    assert chosen <= {"0.weight", "0.bias"}
    new, record = ff.perturb.perturb(params, plan, generator=torch.Generator().manual_seed(0))
    delta = ff.perturb.delta(params, record)
    for name in ("0.weight", "0.bias"):  # δ lives on whole blocks: each chosen block has energy e_g
        energy = spec[name].reduce(delta[name].square())
        assert torch.all((energy == 0) | torch.isclose(energy, plan.shares[0].to(energy.dtype), rtol=1e-6))
    assert torch.allclose(sum(d.square().sum() for d in delta.values()), torch.tensor(1e-2, dtype=torch.float64))


@pytest.mark.parametrize(("rule", "shape"), BUILT_IN, ids=IDS)
def test_broadcast_spreads_each_group_over_its_entries(rule: ff.Rule, shape: tuple[int, ...]) -> None:
    from fisherfunc._spec.groups import broadcast

    params = {"p": torch.zeros(shape, dtype=torch.float64)}
    groups = {
        "p": torch.rand(
            rule.group_shape(torch.Size(shape)), dtype=torch.float64, generator=torch.Generator().manual_seed(3)
        )
    }
    owner = rule.membership(shape)
    spread = broadcast(groups, rule, params, density=False)["p"]
    assert spread.shape == torch.Size(shape) and torch.equal(spread, groups["p"].reshape(-1)[owner])
    # densities: each group's entries share its value equally, so reducing them gives the groups back
    density = broadcast(groups, rule, params)["p"]
    torch.testing.assert_close(rule.reduce(density), groups["p"], rtol=1e-12, atol=0)
