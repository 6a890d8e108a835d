"""One seeded registry of test cases: a model, its per-sample loss, params, batches and a spec, by name.

>>> from fisherfunc.testing import cases
>>> c = cases.case("mlp", seed=3, hidden=8)
>>> c.model
Sequential(
  (0): Linear(in_features=4, out_features=8, bias=True)
  (1): Tanh()
  (2): Linear(in_features=8, out_features=3, bias=True)
)
>>> c.batch[0].shape, c.batch[0].dtype, c.spec["0.weight"]
(torch.Size([8, 4]), torch.float64, Channel(axis=0, groups=1))
>>> "mlp" in cases.names("classification") and cases.case("mlp", seed=3, hidden=8).batch[0].equal(c.batch[0])
True

:func:`case` builds an entry under ``torch.random.fork_rng`` from ``torch.manual_seed(seed)``
(the caller's RNG state is untouched; the same arguments give the same case), in float32, then
casts to ``dtype`` (default float64) and moves to ``device``; the model comes back in eval mode.
Builders initialise the model, then draw the batches, then give norm layers random affine
parameters (and BatchNorm random running statistics), so no norm sits at its identity. Every
model of fisherfunc's own classes counts its forward calls in ``model.calls``. Sizes are
keyword arguments, each with a default; ``batch`` (and ``seq_len`` where there is one) may be a
tuple, one entry per batch, giving ``Case.batches``; ``Case.rebuild(**changes)`` builds the same
entry and seed with other sizes. :func:`names` selects entries by tag for
``pytest.mark.parametrize``; :func:`register` adds an entry (a builder returning :class:`Built`).
The tags used here: ``hypothesis`` (drawn by :func:`fisherfunc.testing.strategies.model_cases`),
``classification``, ``regression``, ``token``, ``causal``, ``mlp``, ``conv``, ``embedding``,
``attention``, ``transformer``, ``norm`` (has norm layers), ``callable`` (the loss is a plain
callable), ``special`` (hand-built for one property) and ``hf`` (needs ``transformers``, imported
only when the case is built).

Batches: ``(x, y)`` tuples for classification and regression (``x [B, ...]`` from ``N(0, 1)``,
``y [B]`` class indices or ``[B, outputs]``); right-padded token dicts ``{"input_ids", "labels",
"attention_mask"}`` ``[B, T]`` for token models. The spec is ``fisherfunc.infer_spec(model)``
unless the table says otherwise (``spec="mixed"`` where offered).

Models and losses (every loss a ``fisherfunc.losses`` builder unless it says otherwise):

| name                       | model                                              | loss                          |
|----------------------------|----------------------------------------------------|-------------------------------|
| mlp                        | Linear → act [→ LayerNorm] [→ Dropout] … → Linear  | classification (or per token) |
| regression                 | the mlp network with a Gaussian output             | regression(variance)          |
| cnn1d                      | grouped Conv1d → Tanh → Flatten → Linear           | classification                |
| cnn2d                      | grouped Conv2d → GroupNorm → Tanh → mean → Linear  | classification                |
| conv_transpose             | grouped ConvTranspose1d/2d → Tanh → Linear         | classification                |
| token_classification       | Embedding [→ LayerNorm] [→ residual MLP] → Linear  | token_classification          |
| causal_lm                  | the same, optionally tied or causal-mean           | causal_lm [, labels]          |
| transformer                | Embedding → TransformerEncoderLayer(s) → Linear    | causal_lm                     |
| conv_stack                 | Conv2d plain/grouped/depthwise → Conv1d same       | classification                |
| deconv_stack               | ConvTranspose1d/2d/3d, groups 1, 2, 3, depthwise   | classification                |
| embedding_bag              | EmbeddingBag mean and sum → Linear                 | classification                |
| norms                      | InstanceNorm, BatchNorm2d/1d, GroupNorm, RMSNorm   | classification                |
| sequence_classifier        | Embedding → Linear → MHA [→ LayerNorm] → Linear    | classification                |
| self_attention             | MultiheadAttention, fused [, bias_kv]              | regression(variance)          |
| cross_attention            | MultiheadAttention with kdim/vdim and bias_kv      | regression of q, k, v         |
| attention_classifier       | MHA blocks or TransformerEncoderLayers → Linear    | classification                |
| encoder_decoder            | TransformerEncoderLayer → DecoderLayer → Linear    | classification                |
| per_sample_attention       | MHA on one sample (self / kv / qkv inputs)         | plain callable                |
| conv_tagger                | Conv1d (k 3) → Tanh → Conv1d (1×1)                 | token_classification          |
| causal_attention           | causal single-head attention → Linear              | token_classification          |
| conv_patches               | Conv (stride or dilation 2) → Tanh → Conv → Linear | classification                |
| reused_weight              | one Linear used twice (or in a matmul) → Linear    | classification                |
| conv1d_linear              | one GPT-2 Conv1D (addmm, weight [in, out])         | classification                |
| index_net                  | Linear and an int64 parameter order                | classification                |
| functional_dropout         | SDPA and F.dropout(training=True)                  | classification                |
| hf_causal_lm               | tiny GPT-2 / Llama / Mistral / Qwen2               | hf.causal_lm                  |
| hf_masked_lm               | tiny BERT                                          | hf.masked_lm                  |
| hf_sequence_classification | tiny BERT / GPT-2 / Llama                          | hf.sequence_classification    |
| nested_params              | none: a nested params tree                         | plain callable                |
| linear_scores              | none: L_b = a·x_b + b·z_b                          | plain callable                |
| scaled_gradients           | none: gradients ~1e-15 and ~1e15                   | plain callable                |

Batches, specs and tags (``inferred*``: or ``spec='mixed'``; tags ending in … have more, see
:func:`entry`):

| name                       | batch                          | spec          | tags                                   |
|----------------------------|--------------------------------|---------------|----------------------------------------|
| mlp                        | (x [B, f], y [B]) or per token | inferred*     | hypothesis, classification, mlp        |
| regression                 | (x [B, f], y [B, outputs])     | inferred      | hypothesis, regression, mlp            |
| cnn1d                      | (x [B, C, L], y [B])           | inferred      | hypothesis, classification, conv       |
| cnn2d                      | (x [B, C, L, L], y [B])        | inferred      | hypothesis, classification, conv, norm |
| conv_transpose             | (x [B, C, L(, L)], y [B])      | inferred      | hypothesis, classification, conv       |
| token_classification       | padded tokens                  | inferred*     | hypothesis, token, embedding, norm     |
| causal_lm                  | padded tokens, ≥ 2 real each   | inferred*     | hypothesis, token, causal, …           |
| transformer                | padded tokens, ≥ 2 real each   | inferred      | hypothesis, token, causal, …           |
| conv_stack                 | (x [B, 3, 7, 7], y [B])        | inferred      | classification, conv                   |
| deconv_stack               | (x [B, 6, 3, 3, 3], y [B])     | inferred      | classification, conv                   |
| embedding_bag              | (ids [B, bag], y [B])          | inferred      | classification, embedding              |
| norms                      | (x [B, 3, 6, 6], y [B])        | inferred      | classification, conv, norm             |
| sequence_classifier        | (ids [B, T], y [B])            | inferred      | classification, embedding, attention   |
| self_attention             | (x [B, T, E], y [B, T, E])     | inferred      | regression, attention                  |
| cross_attention            | {q, k, v, y}                   | inferred      | regression, attention                  |
| attention_classifier       | (x [B, T, E], y [B])           | inferred      | classification, attention, …           |
| encoder_decoder            | (x [B, T, E], y [B])           | inferred      | classification, attention, …           |
| per_sample_attention       | (x [B, T, E], mask [B, T], y)  | inferred      | classification, attention, callable    |
| conv_tagger                | (x [B, 3, T], labels, mask)    | inferred      | token, conv                            |
| causal_attention           | (x [B, T, d], y [B, T])        | inferred      | token, attention                       |
| conv_patches               | (x [B, 2, 6, 6], y) or 1-D     | inferred      | classification, conv                   |
| reused_weight              | (x [B, d], y [B])              | inferred      | classification                         |
| conv1d_linear              | (x [B, f], y [B])              | Channel 1/0   | classification                         |
| index_net                  | (x [B, d], y [B])              | order: Skip   | classification, special                |
| functional_dropout         | (x [B, T, E], y [B])           | inferred      | classification, attention, special     |
| hf_causal_lm               | {input_ids, attention_mask}    | inferred      | hf, token, causal, attention, …        |
| hf_masked_lm               | + MLM labels [B, T]            | inferred      | hf, token, attention, transformer      |
| hf_sequence_classification | + labels [B]                   | inferred      | hf, classification, attention, …       |
| nested_params              | (x [B, f], y [B])              | prefix rules  | classification, callable, special      |
| linear_scores              | (x [B, 3], z [B, 2])           | Elementwise() | callable, special                      |
| scaled_gradients           | (x [B, 3], z [B, 2])           | per parameter | callable, special                      |

Each builder's docstring gives its sizes and defaults (``cases.entry(name).defaults``). The
hypothesis families (:data:`FAMILIES`) are rebuilt from the integers a strategy draws with
:func:`build_case`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ._batches import padded_token_batch
from ._builders import MODEL_CASES
from ._families import FAMILY_CASES
from ._hf import HF_CASES
from ._registry import Built, Case, Entry, case, entry, names, register
from ._special import SPECIAL_CASES

__all__ = [
    "FAMILIES",
    "Built",
    "Case",
    "Entry",
    "build_case",
    "case",
    "entry",
    "names",
    "padded_token_batch",
    "register",
]

#: The entries :func:`fisherfunc.testing.strategies.model_cases` draws from (tag ``hypothesis``).
FAMILIES: tuple[str, ...] = tuple(names("hypothesis"))

assert set(FAMILY_CASES + MODEL_CASES + SPECIAL_CASES + HF_CASES) == set(names()), "every entry is listed by its module"


def build_case(family: str, seed: int, sizes: Mapping[str, Any], dtype: torch.dtype = torch.float64) -> Case:
    """Build one case of ``family`` deterministically from ``seed`` and ``sizes``: :func:`case` by another name.

    ``sizes`` may hold sizes the family does not take (the strategies draw one set for several
    families); they are ignored.
    """
    known = entry(family).defaults
    return case(family, seed=seed, dtype=dtype, **{k: v for k, v in sizes.items() if k in known})
