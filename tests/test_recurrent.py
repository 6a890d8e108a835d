"""Recurrent layers: per-sample Fisher of ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` (and their cells), exactly.

The reference is a naive loop: each sample alone (its padding cut off) through the module itself,
``torch.autograd.grad`` of its summed loss, squared, and summed into hidden units by loops written
here from torch's layout — hidden unit ``j`` owns rows ``j, H + j, …, (gates − 1)·H + j`` of
``weight_ih``, ``weight_hh`` and the biases, and column ``j`` of an LSTM's ``weight_hr``. Everything
runs in float64 and must agree to 1e-10 on both paths (``"auto"``: output probes on every recurrent
weight; ``"direct"``: ``vmap(grad)`` of the weights).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc._engine.group_sums import find_sites
from fisherfunc._engine.numerics import prepare
from fisherfunc._engine.recurrent import Recurrent
from fisherfunc._spec.resolve import resolve_spec

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
FEATURES, HIDDEN, CLASSES = 3, 4, 3
PATHS = ("auto", "direct")

# --- the reference: a naive loop, and group sums written from torch's layout ----------------------


def unit_sums(g2: Tensor, gates: int, per_gate: bool = False) -> Tensor:
    """Rows of a ``[gates·H, ...]`` square summed per hidden unit: unit ``j`` owns rows ``k·H + j``."""
    hidden = g2.shape[0] // gates
    table = torch.zeros(gates, hidden, dtype=g2.dtype)
    for k in range(gates):
        for j in range(hidden):
            table[k, j] = g2[k * hidden + j].sum()
    return table if per_gate else table.sum(0)


def column_sums(g2: Tensor) -> Tensor:
    """An LSTM's ``weight_hr [P, H]``: unit ``j`` owns column ``j``."""
    return torch.stack([g2[:, j].sum() for j in range(g2.shape[1])])


def hand_groups(model: nn.Module, name: str, g2: Tensor, rule: ff.Rule) -> Tensor:
    """One parameter's squared gradient summed into the groups ``rule`` asks for, by loops."""
    if isinstance(rule, ff.Elementwise):
        return g2
    owner = model.get_submodule(name.rpartition(".")[0])
    if isinstance(rule, ff.Units):
        gates = GATES[type(owner).__name__.removesuffix("Cell")]
        return (
            column_sums(g2) if name.rpartition(".")[2].startswith("weight_hr") else unit_sums(g2, gates, rule.per_gate)
        )
    if isinstance(rule, ff.Rows):  # embedding: one value per token id
        return torch.stack([g2[v].sum() for v in range(g2.shape[0])])
    assert isinstance(rule, ff.Channel) and rule.axis == 0, rule
    return torch.stack([g2[i].sum() for i in range(g2.shape[0])])


SampleLoss = Callable[[nn.Module, int], tuple[Tensor, int]]


def naive(model: nn.Module, size: int, sample_loss: SampleLoss, spec: dict[str, ff.Rule]) -> tuple[dict, Tensor]:
    """Per-sample groups ``[B, ...]`` and tokens ``[B]`` by a loop of ``torch.autograd.grad`` calls."""
    params = dict(model.named_parameters())
    per_sample: dict[str, list[Tensor]] = {n: [] for n in spec}
    tokens = []
    for b in range(size):
        value, n = sample_loss(model, b)
        grads = torch.autograd.grad(value, [params[n] for n in spec], allow_unused=True)
        for (name, rule), g in zip(spec.items(), grads):
            g2 = torch.zeros_like(params[name]) if g is None else g.detach().square()
            per_sample[name].append(hand_groups(model, name, g2, rule))
        tokens.append(n)
    return {n: torch.stack(v) for n, v in per_sample.items()}, torch.tensor(tokens, dtype=torch.float64)


def assert_fisher_matches(loss, model: nn.Module, batch, sample_loss: SampleLoss, spec, size: int) -> None:
    """``fisher`` and ``per_sample_fisher`` on both paths equal the naive loop (relative 1e-10 per tensor)."""
    expected, tokens = naive(model, size, sample_loss, spec)
    params = {k: v.detach() for k, v in model.named_parameters()}
    for path in PATHS:
        got = ff.per_sample_fisher(loss, params, batch, spec=spec, path=path)
        assert torch.equal(got.tokens.double(), tokens), path
        total = ff.fisher(loss, params, batch, spec=spec, path=path)
        for name, ref in expected.items():
            scale = ref.abs().max()
            if scale == 0:  # e.g. W_hh over one step from a zero state: then exactly zero
                assert not got.groups[name].any() and not total[name].any(), f"{path} {name}: expected zeros"
                continue
            err = (got.groups[name] - ref).abs().max() / scale
            assert err <= TOL, f"{path} {name}: per-sample relative error {err:.2e}"
            err = (total[name] - ref.sum(0) / tokens.sum()).abs().max() / scale
            assert err <= TOL, f"{path} {name}: batch relative error {err:.2e}"


# --- a recurrent classifier over every configuration ---------------------------------------------


class Classifier(nn.Module):
    """``x [N, T, F]`` → a recurrent layer → a linear head on the last step's output and ``h_n[-1]``.

    The batch always stores ``x`` batch-first; with ``batch_first=False`` the model transposes it.
    With ``state=True`` the initial state comes from the batch (``h0 [N, L·D, H_out]``, and
    ``c0 [N, L·D, H]`` for LSTM), else the module builds its own zeros.
    """

    def __init__(
        self, kind: str, layers: int, bidirectional: bool, batch_first: bool, bias: bool, proj: int, state: bool
    ):
        super().__init__()
        extra = {"proj_size": proj} if proj else {}
        self.rnn = getattr(nn, kind)(
            FEATURES,
            HIDDEN,
            num_layers=layers,
            bidirectional=bidirectional,
            batch_first=batch_first,
            bias=bias,
            **extra,
        )
        out = proj or HIDDEN
        self.head = nn.Linear((2 if bidirectional else 1) * out + out, CLASSES)
        self.kind, self.batch_first, self.state = kind, batch_first, state

    def forward(self, x: Tensor, h0: Tensor | None = None, c0: Tensor | None = None) -> Tensor:
        hx: Tensor | tuple[Tensor, Tensor] | None = None
        if self.state:
            assert h0 is not None
            hx = h0.transpose(0, 1).contiguous()
            if self.kind == "LSTM":
                assert c0 is not None
                hx = (hx, c0.transpose(0, 1).contiguous())
        y, hn = self.rnn(x if self.batch_first else x.transpose(0, 1), hx)
        last = y[:, -1] if self.batch_first else y[-1]
        h_n = hn[0] if isinstance(hn, tuple) else hn
        return self.head(torch.cat([last, h_n[-1]], dim=-1))


def classifier_case(kind, layers, bidirectional, batch_first, bias, proj, state, batch=3, length=4, seed=0):
    """The model (float64), its loss, a batch and the reference's per-sample loss."""
    torch.manual_seed(seed)
    model = Classifier(kind, layers, bidirectional, batch_first, bias, proj, state).double()
    x = torch.randn(batch, length, FEATURES, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (batch,))
    entries = [x]
    if state:
        rows = layers * (2 if bidirectional else 1)
        entries.append(torch.randn(batch, rows, proj or HIDDEN, dtype=torch.float64))
        if kind == "LSTM":
            entries.append(torch.randn(batch, rows, HIDDEN, dtype=torch.float64))
    data = (*entries, y)
    inputs = tuple(range(len(entries)))
    loss = ff.losses.classification(model, inputs=inputs if len(inputs) > 1 else 0, targets=len(entries))

    def sample_loss(m: nn.Module, b: int) -> tuple[Tensor, int]:
        logits = m(*(e[b : b + 1] for e in entries))
        return F.cross_entropy(logits, y[b : b + 1], reduction="sum"), 1

    return model, loss, data, sample_loss


CONFIGS = [  # (layers, bidirectional, batch_first, bias, proj, state)
    (1, False, True, True, 0, False),
    (2, True, False, True, 0, True),
    (2, False, True, False, 0, True),
    (1, True, True, True, 0, False),
    (2, True, True, False, 0, False),
]
LSTM_PROJ = [(2, True, False, True, 2, True), (1, False, True, False, 2, False)]


@pytest.mark.parametrize(
    ("kind", "config"),
    [(k, c) for k in GATES for c in CONFIGS] + [("LSTM", c) for c in LSTM_PROJ],
    ids=lambda v: v if isinstance(v, str) else "L{}-bi{}-bf{}-bias{}-proj{}-h0{}".format(*map(int, v)),
)
def test_units_and_diagonal_equal_the_naive_loop(kind: str, config: tuple) -> None:
    model, loss, batch, sample_loss = classifier_case(kind, *config)
    spec = ff.infer_spec(model)
    assert all(isinstance(spec[n], ff.Units) for n in spec if n.startswith("rnn."))
    assert_fisher_matches(loss, model, batch, sample_loss, spec, 3)
    diagonal = {n: ff.Elementwise() for n in spec}
    assert_fisher_matches(loss, model, batch, sample_loss, diagonal, 3)


@settings(deadline=None, derandomize=True, database=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(sorted(GATES)),
    layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    proj=st.sampled_from([0, 0, 2]),
    state=st.booleans(),
    batch=st.integers(1, 3),
    length=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_any_configuration_matches_per_gate(
    kind, layers, bidirectional, batch_first, bias, proj, state, batch, length, seed
):
    proj = proj if kind == "LSTM" else 0
    model, loss, data, sample_loss = classifier_case(
        kind, layers, bidirectional, batch_first, bias, proj, state, batch=batch, length=length, seed=seed
    )
    per_gate = {
        n: (ff.Units(GATES[kind], per_gate=True) if n.startswith("rnn.") and "weight_hr" not in n else r)
        for n, r in ff.infer_spec(model).items()
    }
    assert_fisher_matches(loss, model, data, sample_loss, per_gate, batch)


def test_gate_breakdown_sums_to_the_unit_values() -> None:
    model, loss, batch, _ = classifier_case("LSTM", 2, True, True, True, 0, False)
    params = {k: v.detach() for k, v in model.named_parameters()}
    units = ff.fisher(loss, params, batch)
    gates = ff.fisher(
        loss,
        params,
        batch,
        spec={n: ff.Units(4, per_gate=True) if n.startswith("rnn.") else r for n, r in ff.infer_spec(model).items()},
    )
    for name in (n for n in params if n.startswith("rnn.")):
        assert gates[name].shape == (4, HIDDEN)
        assert torch.allclose(gates[name].sum(0), units[name], rtol=1e-12, atol=0)


# --- a recurrent layer inside a user's model, on padded batches ------------------------------------


class Tagger(nn.Module):
    """Embedding → LSTM → linear head; classifies a sequence by its last real token's output.

    ``ids [N, T]`` right-padded with 0, ``lengths [N]``. Unidirectional, so the positions after a
    sequence's end never reach the prediction: the padded batch computes what the unpadded one does.
    """

    def __init__(self, vocab: int = 11, dim: int = 4, hidden: int = 5, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(ids))
        last = out[torch.arange(ids.shape[0]), lengths - 1]
        return self.head(last)


def padded_ids(lengths: list[int], vocab: int = 11, seed: int = 0) -> Tensor:
    torch.manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(1, vocab, (n,))
    return ids


def test_user_model_with_padding_equals_unpadded_samples() -> None:
    torch.manual_seed(1)
    model = Tagger().double()
    lengths = [5, 2, 4, 1]
    ids, sizes = padded_ids(lengths), torch.tensor(lengths)
    y = torch.tensor([0, 2, 1, 2])
    loss = ff.losses.classification(model, inputs=(0, 1), targets=2)
    spec = ff.infer_spec(model)
    assert spec["embed.weight"] == ff.Rows() and spec["head.weight"] == ff.Channel(0)
    assert spec["lstm.weight_hh_l1"] == ff.Units(4) and spec["lstm.bias_ih_l0"] == ff.Units(4)

    def unpadded(m: nn.Module, b: int) -> tuple[Tensor, int]:  # the sample alone, its padding cut off
        n = lengths[b]
        logits = m(ids[b : b + 1, :n], torch.tensor([n]))
        return F.cross_entropy(logits, y[b : b + 1], reduction="sum"), 1

    assert_fisher_matches(loss, model, (ids, sizes, y), unpadded, spec, len(lengths))


def test_token_loss_with_mask_on_a_gru() -> None:
    torch.manual_seed(2)
    model = nn.Sequential()
    model.add_module("embed", nn.Embedding(11, 4))
    model.add_module("gru", nn.GRU(4, 5, batch_first=True))
    model.add_module("pick", Output())
    model.add_module("head", nn.Linear(5, 7))
    model = model.double()
    lengths = [4, 2, 3]
    ids = padded_ids(lengths, seed=3)
    mask = (ids != 0).long()
    labels = torch.randint(0, 7, ids.shape)
    loss = ff.losses.token_classification(model, inputs=0, targets=1, mask=2)

    def unpadded(m: nn.Module, b: int) -> tuple[Tensor, int]:
        n = lengths[b]
        logits = m(ids[b : b + 1, :n])[0]
        return F.cross_entropy(logits, labels[b, :n], reduction="sum"), n

    assert_fisher_matches(loss, model, (ids, labels, mask), unpadded, ff.infer_spec(model), len(lengths))


class Output(nn.Module):
    """A recurrent layer's output sequence (its first result)."""

    def forward(self, result: tuple[Tensor, Tensor]) -> Tensor:
        return result[0]


class CellLoop(nn.Module):
    """A user's own loop over time with an ``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell``."""

    def __init__(self, kind: str):
        super().__init__()
        self.cell = getattr(nn, f"{kind}Cell")(FEATURES, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h)


@pytest.mark.parametrize("kind", sorted(GATES))
def test_cells_in_a_user_loop(kind: str) -> None:
    torch.manual_seed(4)
    model = CellLoop(kind).double()
    x, y = torch.randn(3, 4, FEATURES, dtype=torch.float64), torch.tensor([0, 1, 2])
    loss = ff.losses.classification(model)
    spec = ff.infer_spec(model)
    assert spec["cell.weight_ih"] == spec["cell.weight_hh"] == ff.Units(GATES[kind])

    def sample_loss(m: nn.Module, b: int) -> tuple[Tensor, int]:
        return F.cross_entropy(m(x[b : b + 1]), y[b : b + 1], reduction="sum"), 1

    assert_fisher_matches(loss, model, (x, y), sample_loss, spec, 3)


class LearnedStart(nn.Module):
    """A bidirectional 2-layer GRU on one unbatched sequence ``[T, F]``, from a learned initial state."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(FEATURES, HIDDEN, num_layers=2, bidirectional=True)
        self.h0 = nn.Parameter(torch.randn(4, HIDDEN))
        self.head = nn.Linear(2 * HIDDEN, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.gru(x, self.h0)
        return self.head(y[-1])


def test_unbatched_input_and_learned_state_in_a_plain_callable() -> None:
    torch.manual_seed(8)
    model = LearnedStart().double()
    x, y = torch.randn(3, 5, FEATURES, dtype=torch.float64), torch.tensor([2, 0, 1])

    def loss(params, sample):  # any (params, sample) -> (loss_sum, tokens) callable
        logits = torch.func.functional_call(model, params, (sample[0],))
        return F.cross_entropy(logits[None], sample[1][None], reduction="sum"), torch.ones(())

    def sample_loss(m: nn.Module, b: int) -> tuple[Tensor, int]:
        return F.cross_entropy(m(x[b])[None], y[b : b + 1], reduction="sum"), 1

    spec = ff.infer_spec(model, overrides={"h0": ff.Elementwise()})
    assert_fisher_matches(loss, model, (x, y), sample_loss, spec, 3)


def test_exact_kind_on_both_paths() -> None:
    model, loss, batch, _ = classifier_case("GRU", 2, True, True, True, 0, False)
    x = batch[0]
    params = dict(model.named_parameters())
    spec = ff.infer_spec(model)
    expected = {n: torch.zeros(()) for n in spec}
    for b in range(x.shape[0]):  # Σ_c p_c (∇ −log p_c)², summed into units by hand
        logits = model(x[b : b + 1])
        probs = logits.softmax(-1).detach()[0]
        for c in range(CLASSES):
            grads = torch.autograd.grad(
                F.cross_entropy(logits, torch.tensor([c])), list(params.values()), retain_graph=True
            )
            for name, g in zip(params, grads):
                expected[name] = expected[name] + probs[c] * hand_groups(model, name, g.square(), spec[name])
    detached = {k: v.detach() for k, v in params.items()}
    for path in PATHS:
        got = ff.fisher(loss, detached, batch, spec=spec, kind="exact", path=path)
        for name, ref in expected.items():
            ref = ref / x.shape[0]
            assert ((got[name] - ref).abs().max() / ref.abs().max()) <= TOL, (path, name)


# --- the engine: the functional recurrence, the factorised sites, the module untouched ------------


@pytest.mark.parametrize("kind", sorted(GATES))
def test_the_functional_recurrence_computes_what_the_module_does(kind: str) -> None:
    torch.manual_seed(5)
    for layers, bidirectional, batch_first, bias, proj, state in itertools.product(
        (1, 2), (False, True), (False, True), (False, True), (0, 2), (False, True)
    ):
        if proj and kind != "LSTM":
            continue
        extra = {"proj_size": proj} if proj else {}
        if kind == "RNN":
            extra["nonlinearity"] = "relu" if layers == 2 else "tanh"
        rnn = getattr(nn, kind)(
            3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias, **extra
        ).double()
        x = torch.randn(2, 5, 3, dtype=torch.float64)
        x = x if batch_first else x.transpose(0, 1)
        rows = layers * (2 if bidirectional else 1)
        hx = None
        if state:
            h0 = torch.randn(rows, 2, proj or 4, dtype=torch.float64)
            hx = (h0, torch.randn(rows, 2, 4, dtype=torch.float64)) if kind == "LSTM" else h0
        expected = rnn(x, hx)
        with Recurrent():
            got = rnn(x, hx)
        flat_e = [expected[0], *(expected[1] if kind == "LSTM" else (expected[1],))]
        flat_g = [got[0], *(got[1] if kind == "LSTM" else (got[1],))]
        for e, g in zip(flat_e, flat_g):
            assert e.shape == g.shape and torch.allclose(e, g, rtol=1e-13, atol=1e-14)


def test_every_recurrent_weight_takes_the_factorised_path() -> None:
    length = 4
    model, loss, batch, _ = classifier_case("LSTM", 2, True, True, True, 2, False, length=length)
    params = {k: v.detach() for k, v in model.named_parameters()}
    resolved = resolve_spec(ff.infer_spec(model), params)
    sample = tuple(e[0] for e in batch)
    sites = {
        resolved.names[s.leaf]: s
        for s in find_sites(loss, prepare(params, differentiated=resolved.active), resolved, sample)
    }
    for name in params:
        if name.startswith("rnn.weight_ih"):  # one call over the whole sequence
            assert sites[name].uses == 1 and sites[name].sums == "rows", name
        elif name.startswith(("rnn.weight_hh", "rnn.weight_hr")):  # one call per step
            assert sites[name].uses == length, name
            assert sites[name].sums == ("cols" if "weight_hr" in name else "rows"), name
        elif name.startswith("rnn.bias"):
            assert name not in sites, name  # biases take the direct path


def test_model_is_not_modified() -> None:
    model, loss, batch, _ = classifier_case("GRU", 2, True, False, True, 0, False)
    before = {k: v for k, v in model.named_parameters()}
    values = {k: v.detach().clone() for k, v in before.items()}
    output = model(batch[0])
    ff.fisher(loss, {k: v.detach() for k, v in before.items()}, batch)
    after = dict(model.named_parameters())
    assert all(after[k] is before[k] and torch.equal(after[k], values[k]) for k in before)
    # (torch's own cache of the weights, RNNBase._flat_weights, follows any functional_call and is
    # rebuilt by the module's next forward: torch's behaviour, the same without fisherfunc)
    assert not model.rnn._forward_hooks and not model.rnn._forward_pre_hooks and not model.rnn._backward_hooks
    assert torch.equal(model(batch[0]), output)


def test_dropout_between_layers() -> None:
    """A training-mode module's dropout: off under ``dropout="eval"`` (the default), drawn under ``"train"``."""
    torch.manual_seed(6)
    model = Classifier("LSTM", 2, False, True, True, 0, False).double()
    model.rnn.dropout = 0.5
    model.train()
    x, y = torch.randn(4, 3, FEATURES, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    params = {k: v.detach() for k, v in model.named_parameters()}
    spec = ff.infer_spec(model)
    evaluated = ff.fisher(ff.losses.classification(model), params, (x, y), spec=spec)
    reference = ff.fisher(ff.losses.classification(model.eval()), params, (x, y), spec=spec)
    assert all(torch.equal(evaluated[k], reference[k]) for k in spec)
    model.train()
    torch.manual_seed(7)
    drawn = ff.fisher(ff.losses.classification(model, dropout="train"), params, (x, y), spec=spec)
    assert not torch.allclose(drawn["rnn.weight_ih_l1"], evaluated["rnn.weight_ih_l1"])


# --- infer_spec rules and the Units rule ------------------------------------------------------------


def test_infer_spec_rules_per_module() -> None:
    model = nn.ModuleDict(
        {
            "lstm": nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2),
            "gru": nn.GRU(3, 5, bias=False),
            "rnn": nn.RNN(3, 2, nonlinearity="relu"),
            "cell": nn.LSTMCell(3, 4),
        }
    )
    spec = ff.infer_spec(model)
    for suffix in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        for part in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            assert spec[f"lstm.{part}{suffix}"] == ff.Units(4)
        assert spec[f"lstm.weight_hr{suffix}"] == ff.Units(1, axis=1)
    assert {k: v for k, v in spec.items() if k.startswith("gru.")} == {
        "gru.weight_ih_l0": ff.Units(3),
        "gru.weight_hh_l0": ff.Units(3),
    }
    assert spec["rnn.weight_hh_l0"] == spec["rnn.bias_ih_l0"] == ff.Units(1)
    assert spec["cell.weight_ih"] == spec["cell.bias_hh"] == ff.Units(4)
    params = dict(model.named_parameters())
    for name, rule in spec.items():
        assert rule.group_shape(params[name].shape, name) == (model[name.partition(".")[0]].hidden_size,)


def test_a_parameter_off_the_layout_is_refused_by_name_unless_overridden() -> None:
    model = nn.Sequential(nn.GRU(3, 4))
    model[0].weight_hh_l0 = nn.Parameter(torch.zeros(12, 5))
    with pytest.raises(ff.SpecError, match=r"'0\.weight_hh_l0' has shape \(12, 5\).*overrides=\{'0\.weight_hh_l0'"):
        ff.infer_spec(model)
    assert ff.infer_spec(model, overrides={"0.weight_hh_l0": ff.Elementwise()})["0.weight_hh_l0"] == ff.Elementwise()


def test_packed_sequences_are_refused_with_a_clear_error() -> None:
    from torch.nn.utils.rnn import pack_padded_sequence

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
            _, h = self.gru(pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False))
            return self.head(h[-1])

    model = Packed().double()
    loss = ff.losses.classification(model, inputs=(0, 1), targets=2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(2, 4, 3, dtype=torch.float64), torch.tensor([4, 2]), torch.tensor([0, 1]))
    for path in PATHS:
        with pytest.raises(ValueError, match="PackedSequence.*pad"):
            ff.fisher(loss, params, batch, path=path)


UNIT_RULES = [
    ff.Units(4),
    ff.Units(4, per_gate=True),
    ff.Units(3),
    ff.Units(1, axis=1),
    ff.Units(2, axis=1, per_gate=True),
]


@pytest.mark.parametrize("rule", UNIT_RULES, ids=repr)
def test_units_geometry_equals_the_derived_one(rule: ff.Units) -> None:
    shape = torch.Size([12, 6]) if rule.axis == 0 else torch.Size([5, 8])
    assert torch.equal(rule.membership(shape), ff.Rule.membership(rule, shape))
    sums = rule.square_sums(shape)
    assert sums == ff.Rule.square_sums(rule, shape)
    g = torch.randn(shape, dtype=torch.float64)
    g2 = g * g
    along = g2.sum(1) if sums == "rows" else g2.sum(0)
    assert torch.allclose(rule.from_square_sums(shape, sums)(along), rule.reduce(g2), rtol=1e-13, atol=0)
    assert torch.allclose(rule.from_square_sums(shape, "full")(g2), rule.reduce(g2), rtol=1e-13, atol=0)


@settings(deadline=None, derandomize=True, database=None, max_examples=40)
@given(
    gates=st.integers(1, 4), hidden=st.integers(1, 5), cols=st.integers(1, 4), per_gate=st.booleans(), data=st.data()
)
def test_units_conserve_and_match_the_layout(gates: int, hidden: int, cols: int, per_gate: bool, data) -> None:
    seed = data.draw(st.integers(0, 2**16))
    x = torch.rand(gates * hidden, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    rule = ff.Units(gates, per_gate=per_gate)
    got = rule.reduce(x)
    assert got.shape == rule.group_shape(x.shape)
    assert torch.allclose(got.sum(), x.sum(), rtol=1e-13, atol=0)
    assert torch.allclose(got, unit_sums(x, gates, per_gate), rtol=1e-13, atol=0)


def test_units_refuse_shapes_they_do_not_divide() -> None:
    with pytest.raises(ff.SpecError, match=r"parameter 'w'.*4 gate\(s\) do not divide size 10"):
        ff.Units(4).group_shape(torch.Size([10, 3]), "w")
    with pytest.raises(ff.SpecError, match="has no axis 2"):
        ff.Units(1, axis=2).group_shape(torch.Size([4]), "b")
