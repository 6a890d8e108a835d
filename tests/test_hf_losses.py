"""Hugging Face losses for every family: no ``causal=``, positions as each family counts them, seq2seq.

Each family is a tiny random model (hidden 16, 2 layers, vocabulary 100) in float64, built from a
config as ``transformers`` builds it (training mode; models whose LayerDrop draws a random number in
every training-mode forward are put in eval mode, see ``test_layerdrop_in_training_mode``). The
batch holds sequences of lengths 6, 4 and 2 padded to 7 on the right or on the left.

The reference is a naive loop, written here without any fisherfunc code: each sample's **unpadded**
tokens are fed alone to an eval-mode copy of the model as a user would (``model(input_ids,
attention_mask=ones)``; for seq2seq ``model(input_ids, attention_mask, labels=...)``, whose mean
loss times the label count is the summed loss), the loss is summed over the sample's tokens with
``torch.nn.functional``, and ``torch.autograd.grad`` gives the gradient, squared entry by entry.
The library's per-sample Fisher with ``spec=ff.Elementwise()`` must equal it to ``≤ 1e-10``
relative per tensor, and its token counts must equal the reference's, for every padding side — so a
padded sample's Fisher is the unpadded sample's.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import fisherfunc as ff
from fisherfunc.hf._align import align

transformers = pytest.importorskip("transformers", reason="fisherfunc[hf] (transformers) is not installed")

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10
VOCAB, T = 100, 7
LENGTHS = (6, 4, 2)
SIDES = ("right", "left")
PEFT = importlib.util.find_spec("peft") is not None

# family -> (config class, config fields, class-name prefix); hidden 16, 2 layers, 4 heads, vocab 100.
FAMILIES: dict[str, tuple[str, dict[str, Any], str]] = {
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "intermediate_size": 32, "rotary_pct": 0.5, "pad_token_id": 0}, "GPTNeoX"),
    "opt": ("OPTConfig", {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 32,
                          "word_embed_proj_dim": 16, "pad_token_id": 1}, "OPT"),
    "falcon": ("FalconConfig", {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "multi_query": True, "pad_token_id": 0}, "Falcon"),
    "falcon_new": ("FalconConfig", {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "new_decoder_architecture": True, "num_kv_heads": 2, "pad_token_id": 0}, "Falcon"),
    "falcon_alibi": ("FalconConfig", {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "alibi": True, "multi_query": False, "pad_token_id": 0}, "Falcon"),
    "phi": ("PhiConfig", {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "intermediate_size": 32, "partial_rotary_factor": 0.5, "pad_token_id": 0}, "Phi"),
    "phi3": ("Phi3Config", {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "intermediate_size": 32, "pad_token_id": 0,
                            "bos_token_id": 1, "eos_token_id": 1}, "Phi3"),
    "gptj": ("GPTJConfig", {"n_embd": 16, "n_layer": 2, "n_head": 4, "rotary_dim": 2, "n_positions": 32,
                            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}, "GPTJ"),
    "codegen": ("CodeGenConfig", {"n_embd": 16, "n_layer": 2, "n_head": 4, "rotary_dim": 2, "n_positions": 32,
                                  "n_ctx": 32, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}, "CodeGen"),
    "bloom": ("BloomConfig", {"hidden_size": 16, "n_layer": 2, "n_head": 4, "pad_token_id": 0}, "Bloom"),
    "llama": ("LlamaConfig", {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "intermediate_size": 32, "pad_token_id": 0,
                              "bos_token_id": 1, "eos_token_id": 1}, "Llama"),
    "roberta": ("RobertaConfig", {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "intermediate_size": 32, "max_position_embeddings": 40, "pad_token_id": 1},
                "Roberta"),
    "xlm_roberta": ("XLMRobertaConfig", {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                                         "intermediate_size": 32, "max_position_embeddings": 40, "pad_token_id": 1},
                    "XLMRoberta"),
    "camembert": ("CamembertConfig", {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "intermediate_size": 32, "max_position_embeddings": 40, "pad_token_id": 1},
                  "Camembert"),
    "distilbert": ("DistilBertConfig", {"dim": 16, "n_layers": 2, "n_heads": 4, "hidden_dim": 32,
                                        "pad_token_id": 0}, "DistilBert"),
    "t5": ("T5Config", {"d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 2, "num_heads": 4, "pad_token_id": 0,
                        "eos_token_id": 1, "decoder_start_token_id": 0, "relative_attention_num_buckets": 8}, "T5"),
    "bart": ("BartConfig", {"d_model": 16, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
                            "decoder_attention_heads": 4, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
                            "max_position_embeddings": 32, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
                            "decoder_start_token_id": 2}, "Bart"),
}  # fmt: skip
HEADS = {
    "lm": "ForCausalLM",
    "mlm": "ForMaskedLM",
    "cls": "ForSequenceClassification",
    "tok": "ForTokenClassification",
    "seq2seq": "ForConditionalGeneration",
}
# transformers 5.0 draws LayerDrop's random number in every training-mode forward, which vmap refuses
# (test_layerdrop_in_training_mode); newer versions draw it only when layerdrop > 0.
LAYERDROP = {"opt", "bart"}
# families whose attention has no sdpa path in some supported transformers version
EAGER_ONLY = {"bloom", "gptj", "codegen", "t5"}


def tiny(family: str, head: str = "lm", impl: str | None = None) -> nn.Module:
    """A float64 tiny model of ``family`` with ``head``, as ``transformers`` builds it (training mode)."""
    config_name, fields, prefix = FAMILIES[family]
    impl = impl or ("eager" if family in EAGER_ONLY else "sdpa")
    config = getattr(transformers, config_name)(vocab_size=VOCAB, attn_implementation=impl, num_labels=3, **fields)
    torch.manual_seed(0)
    model = getattr(transformers, prefix + HEADS[head])(config).double()
    return model.eval() if family in LAYERDROP else model


def padded(lengths: tuple[int, ...], side: str, pad: int, seed: int = 0) -> dict[str, Tensor]:
    """``input_ids``/``attention_mask [B, T]``: random ids in ``[3, VOCAB)`` padded with ``pad`` on ``side``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), T), pad)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        span = slice(0, n) if side == "right" else slice(T - n, T)
        ids[b, span] = torch.randint(3, VOCAB, (n,), generator=generator)
        mask[b, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


def with_token_labels(batch: dict[str, Tensor], classes: int | None = None) -> dict[str, Tensor]:
    """MLM labels (the ids; ``classes``: random classes) on every other real token, -100 elsewhere."""
    generator = torch.Generator().manual_seed(1)
    real = batch["attention_mask"] != 0
    values = batch["input_ids"] if classes is None else torch.randint(0, classes, real.shape, generator=generator)
    keep = real & (real.long().cumsum(1) % 2 == 1)
    return {**batch, "labels": torch.where(keep, values, torch.full_like(values, -100))}


def pad_of(model: nn.Module) -> int:
    return int(model.config.pad_token_id)


# --- the naive loop -----------------------------------------------------------------------------------

SampleLoss = Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, int]]


def unpadded(batch: dict[str, Tensor], b: int) -> dict[str, Tensor]:
    """Sample ``b`` without its padding: ``[1, n]`` token entries, the other entries as ``[1, ...]``."""
    keep = batch["attention_mask"][b] != 0
    return {k: (v[b : b + 1, keep] if v.ndim == 2 and v.shape[1] == keep.shape[0] else v[b : b + 1]) for k, v in
            batch.items()}  # fmt: skip


def as_user(model: nn.Module, sample: dict[str, Tensor]) -> Tensor:
    ids = sample["input_ids"]
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]


def next_token(model: nn.Module, sample: dict[str, Tensor]) -> tuple[Tensor, int]:
    ids = sample["input_ids"][0]
    return F.cross_entropy(as_user(model, sample)[:-1], ids[1:], reduction="sum"), ids.numel() - 1


def labelled_tokens(model: nn.Module, sample: dict[str, Tensor]) -> tuple[Tensor, int]:
    y = sample["labels"][0]
    keep = y != -100
    return F.cross_entropy(as_user(model, sample)[keep], y[keep], reduction="sum"), int(keep.sum())


def one_label(model: nn.Module, sample: dict[str, Tensor]) -> tuple[Tensor, int]:
    logits = model(input_ids=sample["input_ids"], attention_mask=torch.ones_like(sample["input_ids"])).logits
    return F.cross_entropy(logits, sample["labels"], reduction="sum"), 1


def naive_loop(
    model: nn.Module, samples: list[dict[str, Tensor]], loss: SampleLoss, names: list[str] | None = None
) -> tuple[dict[str, Tensor], list[int]]:
    """``g_b ⊙ g_b`` per parameter (``[B, *shape]``) and ``n_b``, the model called on each sample alone."""
    reference = copy.deepcopy(model).eval()
    params = {n: p for n, p in reference.named_parameters() if names is None or n in names}
    squares: dict[str, list[Tensor]] = {n: [] for n in params}
    tokens = []
    for sample in samples:
        value, n = loss(reference, sample)
        grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
        for name, p, g in zip(params, params.values(), grads):
            squares[name].append(torch.zeros_like(p) if g is None else g.square())
        tokens.append(n)
    return {n: torch.stack(s) for n, s in squares.items()}, tokens


def assert_matches(got: ff.PerSampleFisher, want: tuple[dict[str, Tensor], list[int]], what: str = "") -> None:
    """Per-tensor relative error ``≤ TOL`` (scale: the tensor's largest value, floored by ``1e-20 ×`` the
    largest of all, for tensors whose exact Fisher is 0), and equal token counts."""
    squares, tokens = want
    assert got.tokens.tolist() == [float(n) for n in tokens], f"{what}: tokens {got.tokens.tolist()} != {tokens}"
    assert set(got.groups) == set(squares), f"{what}: parameters differ"
    largest = max(float(s.abs().max()) for s in squares.values())
    assert largest > 0
    for name, ref in squares.items():
        value = got.groups[name]
        assert value.shape == ref.shape, f"{what}{name}: shape {tuple(value.shape)} != {tuple(ref.shape)}"
        err = float((value - ref).abs().max()) / max(float(ref.abs().max()), 1e-20 * largest)
        assert err <= TOL, f"{what}{name}: relative error {err:.2e}"


def library(loss: Any, model: nn.Module, batch: dict[str, Tensor], **options: Any) -> ff.PerSampleFisher:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return ff.per_sample_fisher(loss, params, batch, spec=ff.Elementwise(), **options)


def check(model: nn.Module, loss: Any, batch: dict[str, Tensor], ref: SampleLoss, what: str = "") -> None:
    samples = [unpadded(batch, b) for b in range(batch["input_ids"].shape[0])]
    assert_matches(library(loss, model, batch), naive_loop(model, samples, ref), what)


# --- RoBERTa-style positions -----------------------------------------------------------------------------

ROBERTA_LIKE = ("roberta", "xlm_roberta", "camembert")


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("family", ROBERTA_LIKE)
def test_roberta_style_masked_lm_is_exact_on_either_side(family: str, side: str) -> None:
    model = tiny(family, "mlm")
    batch = with_token_labels(padded(LENGTHS, side, pad_of(model)))
    check(model, ff.hf.masked_lm(model), batch, labelled_tokens, f"{family} {side}: ")


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("family", ROBERTA_LIKE)
def test_roberta_style_sequence_classification_is_exact_on_either_side(family: str, side: str) -> None:
    # The classifier reads the first slot: with left padding that is padding unless the sample is aligned.
    model = tiny(family, "cls")
    batch = {**padded(LENGTHS, side, pad_of(model)), "labels": torch.tensor([0, 2, 1])}
    check(model, ff.hf.sequence_classification(model), batch, one_label, f"{family} {side}: ")


@pytest.mark.parametrize("side", SIDES)
def test_roberta_position_rows_are_the_ones_the_model_uses(side: str) -> None:
    # RoBERTa counts positions from padding_idx + 1: a 5-token sequence uses rows 2..6 (pad id 1).
    model = tiny("roberta", "mlm")
    batch = with_token_labels(padded((5,), side, pad_of(model)))
    loss = ff.hf.masked_lm(model)
    rows = library(loss, model, batch).groups["roberta.embeddings.position_embeddings.weight"][0].sum(1)
    assert (rows != 0).nonzero().flatten().tolist() == [2, 3, 4, 5, 6]


def test_roberta_sdpa_and_eager_agree_with_the_naive_loop() -> None:
    for impl in ("sdpa", "eager"):
        model = tiny("roberta", "mlm", impl=impl)
        batch = with_token_labels(padded(LENGTHS, "left", pad_of(model)))
        check(model, ff.hf.masked_lm(model), batch, labelled_tokens, f"{impl}: ")


def test_token_classification_is_exact() -> None:
    model = tiny("roberta", "tok")
    batch = with_token_labels(padded(LENGTHS, "left", pad_of(model)), classes=3)
    check(model, ff.hf.token_classification(model), batch, labelled_tokens)


# --- decoders: no causal=, ALiBi ------------------------------------------------------------------------

DECODERS = ("gpt_neox", "opt", "falcon", "falcon_new", "falcon_alibi", "phi", "phi3", "gptj", "codegen", "bloom")


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_families_need_no_causal_and_are_exact(family: str) -> None:
    model = tiny(family)
    loss = ff.hf.causal_lm(model)  # no causal=
    layout = loss.prepare.layout
    assert layout.causal and "causal-LM family" in layout.source and "confirmed on the live model" in layout.source
    check(model, loss, padded(LENGTHS, "left", pad_of(model)), next_token, f"{family}: ")


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("family", ["bloom", "falcon_alibi"])
def test_alibi_families_are_exact_with_padding(family: str, side: str) -> None:
    model = tiny(family)
    loss = ff.hf.causal_lm(model)
    assert loss.prepare.pass_mask is False  # ALiBi is built from the mask the model gets: it gets none
    check(model, loss, padded(LENGTHS, side, pad_of(model)), next_token, f"{family} {side}: ")


def test_bloom_classifier_is_exact_with_left_padding() -> None:
    model = tiny("bloom", "cls")
    batch = {**padded(LENGTHS, "left", pad_of(model)), "labels": torch.tensor([1, 0, 2])}
    check(model, ff.hf.sequence_classification(model), batch, one_label)


def test_bloom_is_called_with_its_gelu_in_plain_autograd_and_left_untouched() -> None:
    model = tiny("bloom")
    loss = ff.hf.causal_lm(model)
    mlp, called = model.transformer.h[0].mlp, loss.model.transformer.h[0].mlp
    assert type(mlp.gelu_impl).__name__ == "BloomGelu" and type(called.gelu_impl).__name__ != "BloomGelu"
    assert called.dense_h_to_4h is mlp.dense_h_to_4h  # parameters and other modules are the user's own
    assert dict(loss.model.named_parameters()).keys() == dict(model.named_parameters()).keys()


# --- encoders ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
def test_distilbert_masked_lm_needs_no_causal(side: str) -> None:
    model = tiny("distilbert", "mlm")
    loss = ff.hf.masked_lm(model)
    assert loss.prepare.layout.causal is False and "distilbert" in loss.prepare.layout.source
    check(model, loss, with_token_labels(padded(LENGTHS, side, pad_of(model))), labelled_tokens)


def test_masked_lm_never_asks_for_causal() -> None:
    assert "causal" not in inspect.signature(ff.hf.masked_lm).parameters
    with pytest.raises(ValueError, match=r"LlamaForCausalLM attends causally .*use fisherfunc\.hf\.causal_lm") as err:
        ff.hf.masked_lm(tiny("llama"))
    assert "causal=" not in str(err.value)


# --- causality: config and live model ---------------------------------------------------------------------


def test_a_config_that_contradicts_the_live_model_is_refused() -> None:
    model = tiny("llama")
    model.config.model_type = "bert"  # the config now claims a masked-LM family, encoder (is_decoder False)
    with pytest.raises(ValueError, match=r"config says it attends both ways.*does not change.*causal=True"):
        ff.hf.causal_lm(model)
    assert ff.hf.causal_lm(model, causal=True).prepare.layout.source == "causal=True given"  # the override


def test_an_unknown_family_is_decided_by_its_class_name_or_on_the_live_model() -> None:
    model = tiny("llama")
    model.config.model_type = "mystery"  # in neither of transformers' tables
    assert ff.hf.attention_layout(model).source == "the class name LlamaForCausalLM; confirmed on the live model"
    layout = ff.hf.attention_layout(model.model)  # LlamaModel: not even the class name says
    assert layout.causal and "observed on the live model: it attends causally" in layout.source
    encoder = tiny("distilbert", "mlm")
    encoder.config.model_type = "mystery"
    layout = ff.hf.attention_layout(encoder.distilbert)
    assert not layout.causal and "observed on the live model: it attends both ways" in layout.source


def test_a_causal_family_that_builds_positions_from_the_2d_mask_needs_no_table_when_given_no_mask() -> None:
    # OPT counts positions from its 2-D attention_mask; under another name the table does not know to pass
    # them. A causal model gets no mask: its own all-ones one counts the front-aligned real tokens from 0, and
    # the live padding check (padded samples against the unpadded one, under vmap) passes when the loss is built.
    model = tiny("opt")
    model.config.model_type = "mystery"
    assert ff.hf.causal_lm(model).prepare.form == "none"


def test_convbert_whose_convolution_reads_padding_is_refused_with_the_reason() -> None:
    # ConvBERT's span convolution mixes neighbouring tokens' embeddings, padding included (no mask reaches it),
    # so no mask or position makes a padded sample's outputs the unpadded one's: masked_lm refuses it when built.
    # transformers 5.24 runs the padded probe and finds the difference; 5.0 builds ConvBERT's mask with
    # get_extended_attention_mask, which refuses the per-sample 4-D mask first. (tests/test_families.py shows
    # its per-head Fisher exact on unpadded batches through fisherfunc.losses.custom.)
    config = transformers.ConvBertConfig(vocab_size=VOCAB, hidden_size=16, embedding_size=16, num_hidden_layers=2,
                                         num_attention_heads=4, head_ratio=2, intermediate_size=32,
                                         max_position_embeddings=40, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ConvBertForMaskedLM(config).double()
    with pytest.raises(ValueError, match=r"ConvBertForMaskedLM") as err:
        ff.hf.masked_lm(model)
    message = str(err.value)
    padded_probe = re.search(r"padded on the right differ .*largest relative difference", message)
    mask_shape = re.search(r"get_extended_attention_mask, which takes 2-D or 3-D masks only.*3-D mask", message)
    assert padded_probe or mask_shape, message
    legacy = "get_extended_attention_mask" in inspect.getsource(type(model.convbert).forward)
    assert bool(mask_shape) == legacy, (transformers.__version__, message)  # the reason of the version at hand


# --- wrappers ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not PEFT, reason="peft (fisherfunc[test]) is not installed")
def test_peft_lora_llama_needs_no_causal_and_is_exact() -> None:
    import peft

    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    with warnings.catch_warnings():  # peft asks transformers for a deprecated attribute
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = peft.get_peft_model(tiny("llama"), config)
    loss = ff.hf.causal_lm(wrapped)
    assert loss.prepare.layout.causal and loss.model is wrapped
    batch = padded(LENGTHS, "left", 0)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    samples = [unpadded(batch, b) for b in range(len(LENGTHS))]
    assert_matches(library(loss, wrapped, batch), naive_loop(wrapped, samples, next_token, trainable))


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_compile_and_data_parallel_wrappers_are_seen_through(wrap: str) -> None:
    model = tiny("gpt_neox")
    wrapped = torch.compile(model) if wrap == "compile" else nn.DataParallel(model)
    loss = ff.hf.causal_lm(wrapped)
    assert type(loss.model).__name__ == "_Through"  # the original module is called, not the wrapper's forward
    params = dict(wrapped.named_parameters())
    assert params.keys() == dict(loss.model.named_parameters()).keys()
    batch = padded(LENGTHS, "left", 0)
    got = ff.per_sample_fisher(loss, params, batch, spec=ff.Elementwise())
    want = ff.per_sample_fisher(ff.hf.causal_lm(model), dict(model.named_parameters()), batch, spec=ff.Elementwise())
    prefix = "_orig_mod." if wrap == "compile" else "module."
    for name, value in want.groups.items():
        assert torch.equal(got.groups[prefix + name], value), name


# --- encoder–decoders -------------------------------------------------------------------------------------


def seq2seq_batch(model: nn.Module, side: str) -> dict[str, Tensor]:
    """Encoder ids of lengths 6, 4, 2 padded on ``side``; labels of lengths 3, 5, 2 padded with -100 on the right."""
    batch = padded(LENGTHS, side, pad_of(model))
    labels = torch.full((len(LENGTHS), 5), -100)
    generator = torch.Generator().manual_seed(2)
    for b, n in enumerate((3, 5, 2)):
        labels[b, :n] = torch.randint(3, VOCAB, (n,), generator=generator)
    return {**batch, "labels": labels}


def seq2seq_reference(model: nn.Module, sample: dict[str, Tensor]) -> tuple[Tensor, int]:
    """The model's own loss (a mean over the labels, decoder inputs made by the model) times the label count."""
    labels = sample["labels"][:, sample["labels"][0] != -100]
    ids = sample["input_ids"]
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    return out.loss * labels.shape[1], labels.shape[1]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_lm_is_exact(family: str, side: str) -> None:
    model = tiny(family, "seq2seq")
    check(model, ff.hf.seq2seq_lm(model), seq2seq_batch(model, side), seq2seq_reference, f"{family} {side}: ")


def test_seq2seq_lm_with_a_decoder_mask_aligns_the_labels() -> None:
    # Labels padded on the left, with decoder_attention_mask: the decoder sees the unpadded labels.
    model = tiny("bart", "seq2seq", impl="eager")
    batch = seq2seq_batch(model, "right")
    valid = batch["labels"] != -100
    order = torch.argsort(valid.long(), dim=1, stable=True)  # real labels last
    batch["labels"] = batch["labels"].gather(1, order)
    batch["decoder_attention_mask"] = valid.gather(1, order).long()
    loss = ff.hf.seq2seq_lm(model, inputs=("input_ids", "attention_mask", "decoder_attention_mask"))
    check(model, loss, batch, seq2seq_reference)


def test_seq2seq_lm_with_input_features_is_exact() -> None:
    # Whisper-like: the encoder reads features [mel bins, frames], no padding; the decoder inputs are
    # made the standard way (Whisper has no prepare_decoder_input_ids_from_labels).
    config = transformers.WhisperConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=8,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).double().eval()  # LayerDrop: see below
    batch = {
        "input_features": torch.randn(3, 8, 16, dtype=torch.float64),
        "labels": seq2seq_batch(model, "right")["labels"],
    }

    def reference(model: nn.Module, sample: dict[str, Tensor]) -> tuple[Tensor, int]:
        labels = sample["labels"][:, sample["labels"][0] != -100]
        return model(input_features=sample["input_features"], labels=labels).loss * labels.shape[1], labels.shape[1]

    loss = ff.hf.seq2seq_lm(model, inputs=("input_features",))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]  # not the sinusoidal positions
    samples = [{k: v[b : b + 1] for k, v in batch.items()} for b in range(3)]
    assert_matches(library(loss, model, batch), naive_loop(model, samples, reference, trainable))


def test_layerdrop_in_training_mode() -> None:
    # Training-mode OPT: exact where transformers draws LayerDrop's number only when layerdrop > 0;
    # refused when the loss is built, with what to do, where it draws one in every forward (5.0).
    model = tiny("opt").train()
    try:
        loss = ff.hf.causal_lm(model)
    except ValueError as err:
        assert "random" in str(err) and "call model.eval(), or pass dropout='train'" in str(err)
        return
    check(model, loss, padded(LENGTHS, "left", pad_of(model)), next_token)


# --- errors -----------------------------------------------------------------------------------------------


def test_errors_name_the_model_and_the_way_out() -> None:
    with pytest.raises(ValueError, match=r"T5ForConditionalGeneration is an encoder-decoder.*seq2seq_lm"):
        ff.hf.causal_lm(tiny("t5", "seq2seq"))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM is not an encoder-decoder.*causal_lm"):
        ff.hf.seq2seq_lm(tiny("llama"))
    with pytest.raises(ValueError, match=r"ALiBi.*causal=False"):
        ff.hf.causal_lm(tiny("bloom"), causal=False)
    classifier = tiny("llama", "cls")
    classifier.config.pad_token_id = None
    with pytest.raises(ValueError, match=r"pools the last token that is not config.pad_token_id, which is None"):
        ff.hf.sequence_classification(classifier)
    with pytest.raises(ValueError, match=r"'labels' are the loss's targets"):
        ff.hf.seq2seq_lm(tiny("t5", "seq2seq"), inputs=("input_ids", "labels"))
    with pytest.raises(ValueError, match=r"Sequential inside DataParallel is not a Hugging Face transformers model"):
        ff.hf.causal_lm(nn.DataParallel(nn.Sequential(nn.Linear(2, 2))))


# --- front alignment and what it keeps ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=12))
def test_alignment_moves_the_real_tokens_to_the_front_in_order(flags: list[bool]) -> None:
    mask = torch.tensor(flags, dtype=torch.long)
    x = torch.arange(len(flags)) * 10
    out = align(x, mask)
    n = int(mask.sum())
    assert out[:n].tolist() == x[mask == 1].tolist()  # real tokens first, in order
    assert out[n:].tolist() == x[mask == 0].tolist()  # then padding, in order
    assert align(mask, mask).tolist() == [1] * n + [0] * (len(flags) - n)
    embedded = torch.stack([x, -x], dim=-1)  # trailing dimensions move with their token
    assert torch.equal(align(embedded, mask)[:, 0], out)


def test_mc_fisher_is_the_same_for_either_padding_side() -> None:
    # The label sets are drawn per aligned position, so a sample's draws do not depend on its padding side.
    model = tiny("roberta", "mlm")
    loss = ff.hf.masked_lm(model)
    params = dict(model.named_parameters())
    results = []
    for side in SIDES:
        batch = with_token_labels(padded(LENGTHS, side, pad_of(model)))
        results.append(ff.fisher(loss, params, batch, kind=ff.MC(samples=2, seed=5)))
    for name, value in results[0].items():
        assert torch.allclose(results[1][name], value, rtol=1e-10, atol=0), name
