"""``fisherfunc.compat.FisherCollector``: the collector API, run as its users call it, equals the pure API bitwise.

The usage of issue 16 — EMA collection over several batches, a bias-corrected read, a one-shot
estimate, group access by parameter name and group type, float16 CPU storage, clearing — on a
Hugging Face model (its loss read off its head) and on a plain model with ``fc1`` (``loss=``), each
value compared with ``make_fisher_step`` / ``fisher`` / ``to_keyed`` computed directly.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc.compat import FisherCollector
from fisherfunc.testing import cases


class FC(nn.Module):
    """A user's model with the layer names the collector's docs use."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _batches(n: int = 3) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(n)]


def _pure_ema(model: nn.Module, batches: list, decay: float, dtype: torch.dtype) -> ff.FisherState:
    params = {k: v.detach() for k, v in model.named_parameters()}
    step = ff.make_fisher_step(ff.losses.classification(model), spec=ff.infer_spec(model), decay=decay)
    state = step.init(params, dtype=dtype, device="cpu")
    for batch in batches:
        state = step(params, batch, state)
    return state


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_the_collector_usage_equals_the_pure_api_bitwise() -> None:
    torch.manual_seed(0)
    model = FC()
    batches, eval_batch = _batches(3), _batches(4)[3]
    collector = FisherCollector(reduction="group", storage="cpu_fp16", ema_decay=0.99, loss=ff.losses.classification)
    for batch in batches:
        fisher_ema = collector.collect_fisher(model, batch, task="math", mode="ema")
    corrected = collector.get_bias_corrected_fisher("math")
    fisher_oneshot = collector.collect_fisher(model, eval_batch, task="eval", mode="oneshot")
    math_channels = collector.get_group_fisher("math", param_name="fc1", group_type="channel")

    state = _pure_ema(model, batches, 0.99, torch.float16)
    assert collector.state("math") is not state and collector.state("math").step == 3
    raw = {k: ff.storage.decode(v) for k, v in state.ema.items()}
    _same(fisher_ema, ff.to_keyed(raw, task="math", spec=state.spec))  # the raw EMA m_t
    _same(corrected, ff.to_keyed(state, task="math"))  # m_t / (1 − β^t)
    params = {k: v.detach() for k, v in model.named_parameters()}
    oneshot = ff.fisher(ff.losses.classification(model), params, eval_batch, spec=ff.infer_spec(model))
    stored = {k: ff.storage.decode(ff.storage.encode(v, dtype=torch.float16)) for k, v in oneshot.items()}
    _same(fisher_oneshot, ff.to_keyed(stored, task="eval", spec=ff.infer_spec(model)))
    # fc1's weight and bias both have channel groups: both keys, as the collector's filter gives them
    assert set(math_channels) == {"math|fc1.weight|channel", "math|fc1.bias|channel"}
    assert torch.equal(math_channels["math|fc1.weight|channel"], corrected["math|fc1.weight|channel"])
    single = collector.get_group_fisher("math", param_name="fc1.weight", group_type="channel")
    assert isinstance(single, Tensor) and torch.equal(single, corrected["math|fc1.weight|channel"])
    # fp16 storage on the CPU, with the collector's metadata
    assert {str(m.dtype) for m in collector.state("math").ema.values()} == {"torch.float16"}
    assert collector.get_metadata("math")["storage"] == {"dtypes": ["float16"], "devices": ["cpu"]}
    assert collector.fisher_steps == {"math_steps": 3} and collector.n_samples_seen == {"math": 15}
    assert collector.get_metadata("math")["tokens"] == 15.0
    _same(collector.fisher_ema, fisher_ema)
    _same(collector.fisher_oneshot, fisher_oneshot)
    # clearing: one task, then all
    collector.clear_fisher("math")
    assert "math_steps" not in collector.fisher_steps and set(collector.fisher_oneshot) == set(fisher_oneshot)
    with pytest.raises(KeyError, match="no ema Fisher for task 'math'"):
        collector.get_bias_corrected_fisher("math")
    collector.collect_fisher(model, batches[0], task="math")
    assert collector.fisher_steps == {"math_steps": 1}  # a fresh start after clearing
    collector.clear_fisher()
    assert collector.fisher_ema == {} and collector.fisher_oneshot == {}


def test_a_hugging_face_model_needs_no_loss_argument() -> None:
    pytest.importorskip("transformers")
    case = cases.case("hf_causal_lm", family="gpt2", dtype=torch.float32)
    collector = FisherCollector(storage="cpu_fp32", ema_decay=0.9)
    for _ in range(2):
        collector.collect_fisher(case.model, case.batch, task="lm")
    params = {k: v.detach() for k, v in case.model.named_parameters()}
    step = ff.make_fisher_step(ff.hf.causal_lm(case.model), spec=ff.infer_spec(case.model), decay=0.9)
    state = step.init(params, device="cpu")
    for _ in range(2):
        state = step(params, case.batch, state)
    _same(collector.get_bias_corrected_fisher("lm"), ff.to_keyed(state, task="lm"))
    heads = collector.get_group_fisher("lm", param_name="h.0.attn.c_attn.weight", group_type="head")
    assert isinstance(heads, Tensor) and heads.shape == (3, case.model.config.n_head)


def test_param_reduction_and_errors() -> None:
    torch.manual_seed(0)
    model = FC()
    collector = FisherCollector(reduction="param", storage="cpu_fp32", loss=ff.losses.classification)
    values = collector.collect_fisher(model, _batches(1)[0], task="t", mode="oneshot")
    assert values["t|fc1.weight|param"].shape == (8, 6)
    with pytest.raises(ValueError, match="reduction must be 'group' or 'param'"):
        FisherCollector(reduction="block")
    with pytest.raises(ValueError, match="storage must be"):
        FisherCollector(storage="disk_fp8")
    with pytest.raises(TypeError, match="does not support \\['enable_cross_task_analysis'\\]"):
        FisherCollector(enable_cross_task_analysis=True)
    with pytest.raises(ValueError, match="Unknown mode"):
        collector.collect_fisher(model, _batches(1)[0], task="t", mode="welford")
    with pytest.raises(ValueError, match="cannot tell which loss FC is trained with; pass loss="):
        FisherCollector().collect_fisher(model, _batches(1)[0], task="t")
    with pytest.raises(ValueError, match="decay must be a number in"):
        FisherCollector(ema_decay=1.5)
