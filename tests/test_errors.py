"""Bad input gets a clear error, raised before any heavy work, and never a half-updated state.

Every case asserts the exception type and that the message names the culprit (the parameter,
the batch entry, the shape or the value at fault). "Before heavy work" is checked with models
whose ``forward`` counts its calls: the counter must still be 0 after the error. Every error
raised inside ``fisher_step`` must leave the input state's tensors bitwise unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc.testing import cases

# --- counting models: registry cases, whose models count their forward calls in ``model.calls`` -----

#: The registry MLP ``x [.., 4] -> logits [.., 3]``: Linear ``0`` (6 × 4) → Tanh → Linear ``2`` (3 × 6).
MLP_SPEC = {"0.weight": ff.Channel(), "0.bias": ff.Channel(), "2.weight": ff.Channel(), "2.bias": ff.Skip()}


def mlp(batch_size: int = 5) -> tuple[nn.Module, dict[str, Tensor], tuple[Tensor, Tensor]]:
    case = cases.case("mlp", batch=batch_size, features=4, hidden=6, classes=3, dtype=torch.float32)
    return case.model, case.params, case.batch


def tokens(batch_size: int = 3, length: int = 5) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor]]:
    """A token LM ``input_ids [.., T] -> logits [.., T, 10]`` (embedding of 10 rows) and a padded batch."""
    case = cases.case("causal_lm", batch=batch_size, seq_len=length, vocab=10, dim=6, dtype=torch.float32)
    return case.model, case.params, case.batch


def stepped_state(
    fisher_step: ff.FisherStep, params: Any, batch: Any
) -> ff.FisherState:  # a state with nonzero EMA, so "unchanged" is a real check
    return fisher_step(params, batch, fisher_step.init(params))


# --- state snapshots ------------------------------------------------------------------------------


def _tensors(state: ff.FisherState) -> list[Tensor]:
    return [x for x in optree.tree_leaves(state.ema) if isinstance(x, Tensor)]


def snapshot(state: ff.FisherState) -> tuple[list[Tensor], list[int], tuple]:
    tensors = _tensors(state)
    scalars = (state.step, state.tokens, state.samples, state.decay, state.spec)
    return [t.clone() for t in tensors], [t._version for t in tensors], scalars


def assert_state_unchanged(state: ff.FisherState, snap: tuple[list[Tensor], list[int], tuple]) -> None:
    clones, versions, scalars = snap
    tensors = _tensors(state)
    assert len(tensors) == len(clones)
    for t, c, v in zip(tensors, clones, versions, strict=True):
        assert t.dtype == c.dtype and t.shape == c.shape
        assert torch.equal(t, c), "fisher_step modified the input state's tensors"
        assert t._version == v, "fisher_step wrote into the input state's tensors in place"
    assert (state.step, state.tokens, state.samples, state.decay, state.spec) == scalars


def assert_step_refuses(
    fisher_step: Any,
    params: Any,
    batch: Any,
    state: ff.FisherState,
    exc: type[BaseException],
    match: str,
    model: nn.Module | None = None,
    computes: bool = False,
) -> None:
    """``fisher_step(params, batch, state)`` raises; no state comes back; ``state`` is untouched."""
    snap = snapshot(state)
    calls = getattr(model, "calls", 0)
    result = None
    with pytest.raises(exc, match=match):
        result = fisher_step(params, batch, state)
    assert result is None
    assert_state_unchanged(state, snap)
    if model is not None and not computes:
        assert model.calls == calls, "the error came after a model call"


# --- spec does not match the params ---------------------------------------------------------------

BAD_SPECS = [
    pytest.param(
        {"0.weight": ff.Channel(), "0.bias": ff.Channel(), "2.weight": ff.Channel()},
        r"parameter '2\.bias' has no rule",
        id="missing-entry",
    ),
    pytest.param(
        {**MLP_SPEC, "fc3.weight": ff.Channel()},
        r"spec entry 'fc3\.weight' matches no parameter",
        id="extra-entry",
    ),
    pytest.param(
        [ff.Channel(), ff.Channel(), ff.Channel(), ff.Channel()],
        r"parameter '\d\.(weight|bias)' has no rule.*spec entries matching no parameter: '0', '1', '2', '3'",
        id="wrong-structure-list",
    ),
    pytest.param(
        {"0": {"weight": ff.Channel(), "bias": ff.Channel()}, "2": {"weight": ff.Channel(), "bias": ff.Skip()}},
        r"parameter '\d\.(weight|bias)' has no rule.*matching no parameter: .*'0\.weight'",
        id="wrong-structure-nested",
    ),
    pytest.param({**MLP_SPEC, "2.bias": "channel"}, r"spec entry '2\.bias' is a str, not a group rule", id="str-leaf"),
    pytest.param({**MLP_SPEC, "0.weight": 0}, r"spec entry '0\.weight' is a int, not a group rule", id="int-leaf"),
    pytest.param(
        {**MLP_SPEC, "0.weight": ff.Channel},
        r"spec entry '0\.weight' is the class Channel, not a group rule",
        id="class-leaf",
    ),
    pytest.param(ff.Channel, r"spec is the rule class Channel.*instance", id="class-as-spec"),
    pytest.param(ff.Whole, r"spec is the rule class Whole.*instance", id="class-as-spec-whole"),
    pytest.param({**MLP_SPEC, "2.bias": None}, r"spec entry '2\.bias' is None.*Skip\(\)", id="none-leaf"),
    pytest.param(lambda params: {**MLP_SPEC, "2.bias": None}, r"spec entry '2\.bias' is None", id="callable"),
    pytest.param(ff.Skip(), r"every parameter is Skip\(\)", id="all-skipped"),
]

BAD_RULES = [
    pytest.param({**MLP_SPEC, "0.weight": ff.Channel(axis=2)}, r"'0\.weight'.*axis 2.*2 dimensions", id="channel-axis"),
    pytest.param(
        {**MLP_SPEC, "0.bias": ff.Channel(axis=-2)}, r"'0\.bias'.*axis -2.*1 dimension", id="channel-neg-axis"
    ),
    pytest.param({**MLP_SPEC, "0.weight": ff.Heads(2, axis=2)}, r"'0\.weight'.*axis 2", id="heads-axis"),
    pytest.param(
        {**MLP_SPEC, "0.weight": ff.Heads(4)},
        r"'0\.weight' of shape \(6, 4\).*4 heads = 4 does not divide size 6 of axis 0",
        id="heads-divide",
    ),
    pytest.param(
        {**MLP_SPEC, "0.weight": ff.Heads(1, axis=1, parts=3)},
        r"'0\.weight' of shape \(6, 4\).*3 part\(s\).*does not divide size 4 of axis 1",
        id="heads-parts-divide",
    ),
    pytest.param({**MLP_SPEC, "0.weight": ff.Heads(0)}, r"'0\.weight'.*num_heads >= 1", id="heads-zero"),
    pytest.param(
        {**MLP_SPEC, "0.weight": ff.Channel(axis=1, groups=4)},
        r"'0\.weight'.*groups=4 does not divide size 6 of axis 0",
        id="channel-groups",
    ),
    pytest.param(MLP_SPEC, None, id="valid-control"),
]


def _spec_entry_points() -> list[Any]:
    def run_fisher(loss, params, batch, spec):
        return ff.fisher(loss, params, batch, spec=spec)

    def run_per_sample(loss, params, batch, spec):
        return ff.per_sample_fisher(loss, params, batch, spec=spec)

    def run_init_state(loss, params, batch, spec):
        return ff.init_state(params, spec=spec)

    def run_step_init(loss, params, batch, spec):
        return ff.make_fisher_step(loss, spec=spec).init(params)

    def run_step_call(loss, params, batch, spec):
        good = ff.init_state(params, spec=MLP_SPEC, decay=0.5)
        return ff.make_fisher_step(loss, spec=spec, decay=0.5)(params, batch, good)

    return [
        pytest.param(f, id=f.__name__.removeprefix("run_"))
        for f in (run_fisher, run_per_sample, run_init_state, run_step_init, run_step_call)
    ]


@pytest.mark.parametrize("entry", _spec_entry_points())
@pytest.mark.parametrize(("spec", "match"), BAD_SPECS + BAD_RULES)
def test_spec_errors_name_the_entry(entry: Callable, spec: Any, match: str | None) -> None:
    model, params, batch = mlp()
    loss = ff.losses.classification(model)
    if match is None:  # the control case works, so the others fail for their stated reason
        entry(loss, params, batch, spec)
        return
    with pytest.raises(ff.SpecError, match=match):
        entry(loss, params, batch, spec)
    assert model.calls == 0


def test_spec_error_in_fisher_step_leaves_state_intact() -> None:
    model, params, batch = mlp()
    loss = ff.losses.classification(model)
    state = stepped_state(ff.make_fisher_step(loss, spec=MLP_SPEC, decay=0.5), params, batch)
    model.calls = 0
    bad = ff.make_fisher_step(loss, spec={**MLP_SPEC, "0.weight": ff.Heads(4)}, decay=0.5)
    assert_step_refuses(bad, params, batch, state, ff.SpecError, r"'0\.weight'", model)


def test_spec_error_lists_at_most_a_few_names() -> None:
    params = {f"p{i}": torch.zeros(2) for i in range(20)}
    with pytest.raises(
        ff.SpecError,
        match=r"parameter 'p0' has no rule.*nor those of 'p1', .* and 14 more\); "
        r"spec entries matching no parameter: 'q0'$",
    ) as info:
        ff.init_state(params, spec={"q0": ff.Channel()})
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(
    ("mapping", "num_buckets", "match"),
    [
        pytest.param((0, 1) * 3, None, r"'emb\.weight' has 10 rows but the Buckets mapping has 6 entries", id="short"),
        pytest.param((0, 1) * 6, None, r"'emb\.weight' has 10 rows but the Buckets mapping has 12 entries", id="long"),
        pytest.param(
            (0, 1, 2, 0, 1, 2, 0, 1, 2, 0), 2, r"'emb\.weight'.*mapping value 2 outside \[0, 2\)", id="too-big"
        ),
        pytest.param(
            (0, 1, -1, 0, 1, 0, 0, 1, 0, 0), None, r"'emb\.weight'.*mapping value -1 outside \[0, 2\)", id="neg"
        ),
    ],
)
def test_buckets_mapping_errors(mapping: tuple[int, ...], num_buckets: int | None, match: str) -> None:
    model, params, batch = tokens()
    spec = {**ff.infer_spec(model), "emb.weight": ff.Buckets(num_buckets, mapping=mapping), "head.bias": ff.Skip()}
    with pytest.raises(ff.SpecError, match=match):
        ff.fisher(ff.losses.causal_lm(model, inputs="input_ids"), params, batch, spec=spec)
    assert model.calls == 0


def test_buckets_without_size_or_mapping() -> None:
    with pytest.raises(ff.SpecError, match="num_buckets or a mapping"):
        ff.Buckets()


# --- batches --------------------------------------------------------------------------------------


def _mlp_step(decay: float = 0.5) -> tuple[nn.Module, dict, tuple, ff.FisherStep, ff.FisherState]:
    model, params, batch = mlp()
    fisher_step = ff.make_fisher_step(
        ff.losses.classification(model, inputs="x", targets="y"), spec=MLP_SPEC, decay=decay
    )
    state = stepped_state(fisher_step, params, {"x": batch[0], "y": batch[1]})
    model.calls = 0
    return model, params, batch, fisher_step, state


def test_batch_sizes_differ_names_both_entries() -> None:
    model, params, _, fisher_step, state = _mlp_step()
    batch = {"x": torch.randn(5, 4), "y": torch.randint(0, 3, (4,))}
    match = r"different batch sizes.*'x': 5.*'y': 4"
    with pytest.raises(ff.BatchError, match=match):
        ff.fisher(fisher_step.loss, params, batch, spec=MLP_SPEC)
    with pytest.raises(ff.BatchError, match=match):
        ff.per_sample_fisher(fisher_step.loss, params, batch, spec=MLP_SPEC)
    assert_step_refuses(fisher_step, params, batch, state, ff.BatchError, match, model)
    assert model.calls == 0


def test_tuple_batch_sizes_differ_names_both_entries() -> None:
    model, params, (x, y) = mlp()
    with pytest.raises(ff.BatchError, match=r"'0': 5.*'1': 3"):
        ff.fisher(ff.losses.classification(model), params, (x, y[:3]), spec=MLP_SPEC)
    assert model.calls == 0


def test_empty_batch() -> None:
    model, params, _, fisher_step, state = _mlp_step()
    batch = {"x": torch.randn(0, 4), "y": torch.randint(0, 3, (0,))}
    for run in (ff.fisher, ff.per_sample_fisher):
        with pytest.raises(ff.BatchError, match=r"empty \(batch size 0\)"):
            run(fisher_step.loss, params, batch, spec=MLP_SPEC)
    assert_step_refuses(fisher_step, params, batch, state, ff.BatchError, r"batch size 0", model)
    assert model.calls == 0


def test_no_batches_at_all() -> None:
    model, params, _ = mlp()
    with pytest.raises(ff.BatchError, match="no batches"):
        ff.fisher(ff.losses.classification(model), params, [], spec=MLP_SPEC)


def test_scalar_batch_entry_is_named() -> None:
    model, params, _, fisher_step, state = _mlp_step()
    batch = {"x": torch.randn(5, 4), "y": torch.tensor(1)}
    assert_step_refuses(fisher_step, params, batch, state, ff.BatchError, r"'y' is a scalar", model)


@pytest.mark.parametrize(
    ("builder", "batch_fn"),
    [
        pytest.param(
            lambda m: ff.losses.token_classification(m, inputs="input_ids", targets="labels"),
            lambda b: {**b, "labels": torch.full_like(b["input_ids"], -100)},
            id="token-all-ignored",
        ),
        pytest.param(
            lambda m: ff.losses.token_classification(m, inputs="input_ids", targets="labels", ignore_index=7),
            lambda b: {**b, "labels": torch.full_like(b["input_ids"], 7)},
            id="token-all-custom-ignore",
        ),
        pytest.param(
            lambda m: ff.losses.token_classification(m, inputs="input_ids", targets="labels", mask="attention_mask"),
            lambda b: {**b, "attention_mask": torch.zeros_like(b["attention_mask"])},
            id="token-all-masked",
        ),
        pytest.param(
            lambda m: ff.losses.causal_lm(m, inputs="input_ids", mask="attention_mask"),
            lambda b: {**b, "attention_mask": torch.zeros_like(b["attention_mask"])},
            id="causal-all-masked",
        ),
        pytest.param(
            lambda m: ff.losses.causal_lm(m, inputs="input_ids", mask="attention_mask"),
            lambda b: {**b, "attention_mask": torch.tensor([[1, 0, 0, 0, 0]] * 3)},  # only position 0: never a target
            id="causal-only-first-token",
        ),
        pytest.param(
            lambda m: ff.losses.causal_lm(m, inputs="input_ids", labels="labels"),
            lambda b: {**b, "labels": torch.full_like(b["input_ids"], -100)},
            id="causal-labels-ignored",
        ),
        pytest.param(
            lambda m: ff.losses.causal_lm(m, inputs="input_ids"),
            lambda b: {"input_ids": b["input_ids"][:, :1]},  # one token: nothing to predict
            id="causal-length-one",
        ),
    ],
)
def test_batch_without_tokens(builder: Callable, batch_fn: Callable) -> None:
    model, params, good = tokens()
    batch = batch_fn(good)
    loss = builder(model)
    spec = ff.infer_spec(model)
    match = r"no tokens"
    with pytest.raises(ff.BatchError, match=match):
        ff.fisher(loss, params, batch, spec=spec)
    with pytest.raises(ff.BatchError, match=match):
        ff.per_sample_fisher(loss, params, batch, spec=spec)
    fisher_step = ff.make_fisher_step(loss, spec=spec, decay=0.5)
    state = stepped_state(fisher_step, params, good)
    model.calls = 0
    assert_step_refuses(fisher_step, params, batch, state, ff.BatchError, match, model)
    assert model.calls == 0


def _zero_token_custom(model: nn.Module) -> Any:
    return ff.losses.custom(model, lambda pred, y: (F.cross_entropy(pred, y, reduction="sum"), 0.0))


def _zero_token_callable(model: nn.Module) -> Any:
    def loss(params: dict[str, Tensor], sample: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
        x, y = sample
        logits = torch.func.functional_call(model, params, (x[None],))[0]
        return F.cross_entropy(logits, y, reduction="sum"), 0

    return loss


@pytest.mark.parametrize("make_loss", [_zero_token_custom, _zero_token_callable], ids=["custom", "callable"])
def test_loss_returning_zero_tokens(make_loss: Callable) -> None:
    # Only detectable after the compute: it must still raise, and leave the state as it was.
    model, params, batch = mlp()
    loss = make_loss(model)
    with pytest.raises(ff.BatchError, match=r"no tokens.*num_tokens summing to 0"):
        ff.fisher(loss, params, batch, spec=MLP_SPEC)
    fisher_step = ff.make_fisher_step(loss, spec=MLP_SPEC, decay=0.5)
    ok = ff.make_fisher_step(ff.losses.classification(model), spec=MLP_SPEC, decay=0.5)
    state = stepped_state(ok, params, batch)
    assert_step_refuses(
        fisher_step, params, batch, state, ff.BatchError, r"num_tokens summing to 0", model, computes=True
    )
    assert model.calls > 0  # it did compute: this error cannot come earlier


@pytest.mark.parametrize(
    ("loss_fn", "batch", "match"),
    [
        pytest.param(
            lambda m: ff.losses.classification(m, inputs="x", targets="label"),
            {"x": torch.randn(5, 4), "y": torch.randint(0, 3, (5,))},
            r"no target entry 'label' \(it has \['x', 'y'\]\)",
            id="target-key",
        ),
        pytest.param(
            lambda m: ff.losses.classification(m, inputs="inputs", targets="y"),
            {"x": torch.randn(5, 4), "y": torch.randint(0, 3, (5,))},
            r"no input entry 'inputs'",
            id="input-key",
        ),
        pytest.param(
            lambda m: ff.losses.classification(m, inputs={"x": "features"}, targets="y"),
            {"x": torch.randn(5, 4), "y": torch.randint(0, 3, (5,))},
            r"no input entry 'features'",
            id="keyword-input-key",
        ),
        pytest.param(
            lambda m: ff.losses.classification(m, inputs=0, targets=2),
            (torch.randn(5, 4), torch.randint(0, 3, (5,))),
            r"no target entry 2 \(it has 2 entries\)",
            id="tuple-index",
        ),
        pytest.param(
            lambda m: ff.losses.regression(m, inputs="x", targets="t"),
            {"x": torch.randn(5, 4), "y": torch.randn(5, 3)},
            r"no target entry 't'",
            id="regression-target",
        ),
    ],
)
def test_missing_batch_key(loss_fn: Callable, batch: Any, match: str) -> None:
    model, params, _ = mlp()
    loss = loss_fn(model)
    for run in (ff.fisher, ff.per_sample_fisher):
        with pytest.raises(ff.BatchError, match=match):
            run(loss, params, batch, spec=MLP_SPEC)
    fisher_step = ff.make_fisher_step(loss, spec=MLP_SPEC, decay=0.5)
    assert_step_refuses(fisher_step, params, batch, fisher_step.init(params), ff.BatchError, match, model)
    assert model.calls == 0


def test_missing_mask_key() -> None:
    model, params, batch = tokens()
    for loss in (
        ff.losses.causal_lm(model, inputs="input_ids", mask="padding_mask"),
        ff.losses.token_classification(model, inputs="input_ids", targets="labels", mask="padding_mask"),
    ):
        have = r"\['input_ids', 'labels', 'attention_mask'\]"
        with pytest.raises(ff.BatchError, match=r"no mask entry 'padding_mask' \(it has " + have + r"\)"):
            ff.fisher(loss, params, batch, spec=ff.Channel())
    assert model.calls == 0


# --- decay, chunk_size, dtype ---------------------------------------------------------------------

BAD_DECAYS = [-0.1, 1.0, 1.5, math.nan, math.inf, True, False, "0.9", None, torch.tensor(0.9)]


@pytest.mark.parametrize("decay", BAD_DECAYS, ids=repr)
def test_decay_outside_unit_interval(decay: Any) -> None:
    model, params, _ = mlp()
    match = r"decay must be a number in \[0, 1\), got " + re.escape(repr(decay))
    with pytest.raises(ValueError, match=match):
        ff.make_fisher_step(ff.losses.classification(model), spec=MLP_SPEC, decay=decay)
    with pytest.raises(ValueError, match=match):
        ff.init_state(params, spec=MLP_SPEC, decay=decay)
    assert model.calls == 0


@pytest.mark.parametrize("decay", [0, 0.0, 0.5, 0.999999])
def test_decay_in_unit_interval_is_accepted(decay: float) -> None:
    _, params, _ = mlp()
    assert ff.init_state(params, spec=MLP_SPEC, decay=decay).decay == decay


@pytest.mark.parametrize("chunk_size", [0, -1, -8, True, 1.5, "4"], ids=repr)
def test_bad_chunk_size(chunk_size: Any) -> None:
    model, params, batch = mlp()
    loss = ff.losses.classification(model)
    match = r"chunk_size must be a positive int or None, got " + re.escape(repr(chunk_size))
    with pytest.raises(ValueError, match=match):
        ff.fisher(loss, params, batch, spec=MLP_SPEC, chunk_size=chunk_size)
    with pytest.raises(ValueError, match=match):
        ff.per_sample_fisher(loss, params, batch, spec=MLP_SPEC, chunk_size=chunk_size)
    with pytest.raises(ValueError, match=match):
        ff.make_fisher_step(loss, spec=MLP_SPEC, chunk_size=chunk_size)
    assert model.calls == 0


def test_parameters_on_the_meta_device_are_refused_by_name_before_any_call() -> None:
    model, params, batch = mlp()
    loss = ff.losses.classification(model)
    meta = {**params, "0.weight": params["0.weight"].to("meta")}
    for call in (
        lambda: ff.fisher(loss, meta, batch, spec=MLP_SPEC),
        lambda: ff.per_sample_fisher(loss, meta, batch, spec=MLP_SPEC),
    ):
        with pytest.raises(ValueError, match=r"parameter '0\.weight' is on the 'meta' device"):
            call()
    assert model.calls == 0


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_state_dtype_must_be_floating(dtype: torch.dtype) -> None:
    model, params, _ = mlp()
    with pytest.raises(ValueError, match=r"floating-point dtype, got " + re.escape(str(dtype))):
        ff.init_state(params, spec=MLP_SPEC, dtype=dtype)
    with pytest.raises(ValueError, match=re.escape(str(dtype))):
        ff.make_fisher_step(ff.losses.classification(model), spec=MLP_SPEC).init(params, dtype=dtype)


# --- parameters and models ------------------------------------------------------------------------


def test_non_floating_parameter_needs_skip() -> None:
    case = cases.case("index_net", dtype=torch.float32)  # a Linear(4, 3) and an int64 parameter 'order'
    model, params, batch, loss = case.model, case.params, case.batch, case.loss
    match = r"parameter 'order' has dtype torch\.int64.*Skip\(\)"
    for run in (ff.fisher, ff.per_sample_fisher):
        with pytest.raises(ff.SpecError, match=match):
            run(loss, params, batch, spec=ff.Channel())
    with pytest.raises(ff.SpecError, match=match):
        ff.init_state(params, spec=ff.Channel())
    with pytest.raises(ff.SpecError, match=r"cannot place 1 parameter\(s\).*'order'"):
        ff.fisher(loss, params, batch)  # spec=None: infer_spec has no rule for it either
    assert model.calls == 0

    spec = case.spec
    assert spec == {"lin.weight": ff.Channel(), "lin.bias": ff.Channel(), "order": ff.Skip()}
    result = ff.fisher(loss, params, batch, spec=spec)
    assert result["order"] is None and result["lin.weight"].shape == (3,)
    fisher_step = ff.make_fisher_step(loss, spec=spec, decay=0.5)
    state = fisher_step(params, batch, fisher_step.init(params))
    assert state.step == 1 and state.ema["order"] is None
    assert ff.fisher(loss, params, batch, spec=ff.infer_spec(model, overrides={"order": ff.Skip()}))["order"] is None


def test_non_tensor_parameter_is_named() -> None:
    with pytest.raises(ff.SpecError, match=r"parameter 'scale' is a float, not a torch\.Tensor"):
        ff.init_state({"w": torch.zeros(3, 2), "scale": 0.5}, spec=ff.Channel())


BN_MATCH = r"BatchNorm layer 'bn2' is in training mode.*mixes the samples.*model\.eval\(\)"


def _bn() -> tuple[nn.Module, dict[str, Tensor], tuple[Tensor, Tensor], dict]:
    """The registry's norm model (BatchNorm2d 'bn2' first, BatchNorm1d 'bn1' later), in training mode."""
    case = cases.case("norms", batch=5, dtype=torch.float32)
    model = case.model.train()
    spec = {name: ff.Channel() for name in case.params}
    return model, case.params, case.batch, spec


def test_train_mode_batchnorm() -> None:
    model, params, batch, spec = _bn()
    loss = ff.losses.classification(model)
    running = model.bn2.running_mean.clone()
    with pytest.raises(ValueError, match=BN_MATCH):
        ff.infer_spec(model)
    for run in (ff.fisher, ff.per_sample_fisher):
        with pytest.raises(ValueError, match=BN_MATCH):
            run(loss, params, batch, spec=spec)  # explicit spec: the check is the loss's, not infer_spec's
        with pytest.raises(ValueError, match=BN_MATCH):
            run(loss, params, batch)
    with pytest.raises(ValueError, match=BN_MATCH):
        ff.make_fisher_step(loss).init(params)
    model.eval()
    fisher_step = ff.make_fisher_step(loss, spec=spec, decay=0.5)
    state = stepped_state(fisher_step, params, batch)
    model.calls = 0
    model.train()
    assert_step_refuses(fisher_step, params, batch, state, ValueError, BN_MATCH, model)
    assert model.calls == 0
    assert torch.equal(model.bn2.running_mean, running)  # no running-statistics update either
    model.eval()
    assert set(ff.infer_spec(model)) == set(params)


def test_train_mode_batchnorm_nested_name() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.BatchNorm1d(6)), nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"BatchNorm layer '1\.0' is in training mode"):
        ff.infer_spec(model)


# --- states ---------------------------------------------------------------------------------------


def test_state_with_different_decay() -> None:
    model, params, batch, _, state = _mlp_step(decay=0.5)
    other = ff.make_fisher_step(ff.losses.classification(model, inputs="x", targets="y"), spec=MLP_SPEC, decay=0.9)
    batch = {"x": batch[0], "y": batch[1]}
    assert_step_refuses(other, params, batch, state, ff.SpecError, r"state has decay 0\.5.*uses decay 0\.9", model)


def test_state_for_other_parameter_names() -> None:
    model, params, batch, fisher_step, state = _mlp_step()
    renamed = {("layer1." + k if k.startswith("0.") else k): v for k, v in params.items()}
    spec = {("layer1." + k if k.startswith("0.") else k): r for k, r in MLP_SPEC.items()}

    def loss(p: dict[str, Tensor], sample: Any) -> tuple[Tensor, int]:
        original = {(k.removeprefix("layer1.")): v for k, v in p.items()}
        return fisher_step.loss(original, sample)

    other = ff.make_fisher_step(loss, spec=spec, decay=0.5)
    assert_step_refuses(
        other,
        renamed,
        {"x": batch[0], "y": batch[1]},
        state,
        ff.SpecError,
        r"other parameters: params have 'layer1\.0\.bias', 'layer1\.0\.weight' that the state lacks; "
        r"the state has '0\.bias', '0\.weight' that params lack",
        model,
    )


def test_state_for_other_parameter_shapes() -> None:
    model, params, batch, fisher_step, state = _mlp_step()
    torch.manual_seed(1)
    wide = cases.case("mlp", batch=5, features=4, hidden=8, classes=3, seed=1, dtype=torch.float32)
    wider, wide_params = wide.model, wide.params
    other = ff.make_fisher_step(ff.losses.classification(wider, inputs="x", targets="y"), spec=MLP_SPEC, decay=0.5)
    assert_step_refuses(
        other,
        wide_params,
        {"x": batch[0], "y": batch[1]},
        state,
        ff.SpecError,
        r"state\.ema: entry '0\.(weight|bias)' should have shape \(8,\), got \(6,\)",
        wider,
    )


def test_state_for_other_rules() -> None:
    model, params, batch, fisher_step, state = _mlp_step()
    other = ff.make_fisher_step(fisher_step.loss, spec={**MLP_SPEC, "2.weight": ff.Whole()}, decay=0.5)
    assert_step_refuses(
        other,
        params,
        {"x": batch[0], "y": batch[1]},
        state,
        ff.SpecError,
        r"parameter '2\.weight': the state was made with Channel\(axis=0, groups=1\), .*uses Whole\(\)",
        model,
    )


def test_state_for_other_structure() -> None:
    model, params, batch, fisher_step, state = _mlp_step()
    nested = {
        "0": {"weight": params["0.weight"], "bias": params["0.bias"]},
        "2.weight": params["2.weight"],
        "2.bias": params["2.bias"],
    }

    def loss(p: dict[str, Any], sample: Any) -> tuple[Tensor, int]:
        flat = {
            "0.weight": p["0"]["weight"],
            "0.bias": p["0"]["bias"],
            "2.weight": p["2.weight"],
            "2.bias": p["2.bias"],
        }
        return fisher_step.loss(flat, sample)

    spec = {"0": ff.Channel(), "2.weight": ff.Channel(), "2.bias": ff.Skip()}
    other = ff.make_fisher_step(loss, spec=spec, decay=0.5)
    assert_step_refuses(other, nested, {"x": batch[0], "y": batch[1]}, state, ff.SpecError, r"tree structure", model)


@pytest.mark.parametrize("bad", [None, {}, (1, 2), "state"], ids=repr)
def test_not_a_state(bad: Any) -> None:
    model, params, batch, fisher_step, _ = _mlp_step()
    with pytest.raises(TypeError, match=r"state must be a FisherState.*got " + type(bad).__name__):
        fisher_step(params, {"x": batch[0], "y": batch[1]}, bad)
    assert model.calls == 0


def test_ema_tree_instead_of_state() -> None:
    model, params, batch, fisher_step, state = _mlp_step()
    with pytest.raises(TypeError, match=r"state must be a FisherState.*got dict"):
        fisher_step(params, {"x": batch[0], "y": batch[1]}, state.ema)


def test_estimate_of_fresh_state() -> None:
    _, params, _ = mlp()
    state = ff.init_state(params, spec=MLP_SPEC)
    with pytest.raises(ValueError, match=r"no step yet.*fisher_step\(params, batch, state\)"):
        ff.estimate(state)
    with pytest.raises(ValueError, match="no step yet"):
        ff.to_keyed(state, task="t")  # a state's keyed view is its estimate


def test_clear_unknown_task() -> None:
    _, params, _ = mlp()
    states = {"math": ff.init_state(params, spec=MLP_SPEC), "code": ff.init_state(params, spec=MLP_SPEC)}
    for tasks in ("poetry", ["math", "poetry"]):
        with pytest.raises(KeyError, match=r"no state for task\(s\) \['poetry'\]; tasks are \['code', 'math'\]"):
            ff.clear(states, tasks)
    assert set(states) == {"math", "code"}


# --- keys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["a|b", "|", "", 3, None], ids=repr)
def test_to_keyed_bad_task(task: Any) -> None:
    tree = {"w": torch.ones(2)}
    with pytest.raises(
        ValueError, match=r"task " + re.escape(repr(task)) + r" must be a non-empty string without '\|'"
    ):
        ff.to_keyed(tree, task=task, spec={"w": ff.Channel()})


def test_to_keyed_name_with_separator() -> None:
    with pytest.raises(ValueError, match=r"parameter name 'w\|1' must be .* without '\|'"):
        ff.to_keyed({"w|1": torch.ones(2)}, task="t", spec=ff.Channel())


def test_to_keyed_needs_spec_for_a_tree() -> None:
    with pytest.raises(ValueError, match=r"needs spec="):
        ff.to_keyed({"w": torch.ones(2)}, task="t")
    with pytest.raises(ValueError, match=r"spec has 1 rules but the tree has 2 entries"):
        ff.to_keyed({"w": torch.ones(2), "b": torch.ones(2)}, task="t", spec={"w": ff.Channel()})


@pytest.mark.parametrize("key", ["t|w", "t|w|channel|x", "|w|channel", "t||channel", "t|w|", "tw"])
def test_from_keyed_malformed_key(key: str) -> None:
    keyed = {"t|v|channel": torch.ones(1), key: torch.ones(2)}
    with pytest.raises(
        ValueError, match=r"malformed key " + re.escape(repr(key)) + r".*'task\|param_name\|group_type'"
    ):
        ff.from_keyed(keyed)


def test_from_keyed_unknown_task_or_name() -> None:
    keyed = {"t|w|channel": torch.ones(2)}
    with pytest.raises(KeyError, match=r"no keys for task 'u'; tasks are \['t'\]"):
        ff.from_keyed(keyed, task="u")
    with pytest.raises(ValueError, match=r"key parameter 'w' is not in the given structure"):
        ff.from_keyed(keyed, task="t", like={"v": torch.ones(2)})


# --- spec=None needs a model ----------------------------------------------------------------------


def test_spec_none_with_plain_callable() -> None:
    model, params, batch = mlp()

    def loss(p: dict[str, Tensor], sample: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
        x, y = sample
        return F.cross_entropy(torch.func.functional_call(model, p, (x[None],)), y[None], reduction="sum"), 1

    match = r"spec=None needs a loss built by fisherfunc\.losses.*pass spec="
    for run in (ff.fisher, ff.per_sample_fisher):
        with pytest.raises(ff.SpecError, match=match):
            run(loss, params, batch)
    fisher_step = ff.make_fisher_step(loss, decay=0.5)
    with pytest.raises(ff.SpecError, match=match):
        fisher_step.init(params)
    ok = ff.make_fisher_step(loss, spec=MLP_SPEC, decay=0.5)
    state = stepped_state(ok, params, batch)
    model.calls = 0
    assert_step_refuses(fisher_step, params, batch, state, ff.SpecError, match, model)
    assert model.calls == 0


def test_error_types_are_value_errors() -> None:
    # Callers that catch ValueError for bad input catch fisherfunc's own errors too.
    assert issubclass(ff.SpecError, ValueError) and issubclass(ff.BatchError, ValueError)


def test_bad_dropout_option_is_refused_by_every_builder() -> None:
    model, _, _ = mlp()
    builders: list[Callable[..., Any]] = [
        ff.losses.classification,
        ff.losses.token_classification,
        ff.losses.causal_lm,
        ff.losses.regression,
        lambda m, **kw: ff.losses.custom(m, lambda p, y: p.sum(), **kw),
    ]
    for build in builders:
        for bad in ("training", True, None):
            with pytest.raises(ValueError, match=r"dropout must be 'eval' or 'train', got " + re.escape(repr(bad))):
                build(model, dropout=bad)
    assert model.calls == 0


def test_train_dropout_on_an_eval_mode_model_is_refused_before_any_forward() -> None:
    # dropout="train" keeps the model's own dropout; with every module in eval mode nothing would
    # be dropped, which is almost surely a mistake.
    case = cases.case("mlp", batch=5, dropout=0.3, dtype=torch.float32)  # Linear → Tanh → Dropout → Linear
    model, (x, y), params = case.model.eval(), case.batch, case.params
    loss = ff.losses.classification(model, dropout="train")
    with pytest.raises(ValueError, match=r"dropout='train'.*Sequential.*eval mode.*model\.train\(\)"):
        ff.fisher(loss, params, (x, y))
    assert model.calls == 0
    assert not any(m.training for m in model.modules())  # the check changes nothing
    ff.fisher(ff.losses.classification(model), params, (x, y))  # the default (eval semantics) works
    assert model.calls > 0


def test_bare_tensor_batch_for_a_model_loss() -> None:
    model, params, (x, _) = mlp()
    with pytest.raises(ff.BatchError, match="tuple or a mapping of tensors.*got a Tensor"):
        ff.fisher(ff.losses.classification(model), params, x)
    assert model.calls == 0


def test_keys_sort_hierarchically_not_as_strings() -> None:
    tree = {"w": torch.ones(2), "w2": torch.ones(2)}
    spec = {"w": ff.Channel(0), "w2": ff.Channel(0)}
    keyed = {**ff.to_keyed(tree, task="math-hard", spec=spec), **ff.to_keyed(tree, task="math", spec=spec)}
    ordered = list(ff.to_keyed(tree, task="math", spec=spec)) + list(ff.to_keyed(tree, task="math-hard", spec=spec))
    assert ordered == ["math|w|channel", "math|w2|channel", "math-hard|w|channel", "math-hard|w2|channel"]
    assert sorted(keyed, key=lambda k: k.split("|")) == ordered
