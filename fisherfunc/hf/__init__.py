"""Hugging Face ``transformers`` models: per-sample attention masks, losses, and the family rules.

* :func:`causal_lm`, :func:`masked_lm`, :func:`sequence_classification`: per-sample losses that
  take a tokenizer's padded batch as it is (left or right padding, ``sdpa`` or ``eager``);
* :func:`attention_mask`, :func:`position_ids`, :func:`attention_layout`: a sample's 2-D padding
  mask → the 4-D attention mask the model would build, and position ids counted over real tokens
  (so the padding side does not matter);
* :func:`hf_rules`: the per-head rules :func:`fisherfunc.infer_spec` uses for BERT-, GPT-2- and
  Llama-like attention (grouped-query aware), GPT-2 ``Conv1D`` and norms.

Nothing here imports ``transformers``: models are recognised by their classes' modules and configs.

Per-head importance of a masked LM, in a few lines (``batch`` holds ``input_ids``,
``attention_mask`` and MLM ``labels``)::

    loss = ff.hf.masked_lm(model)
    F = ff.fisher(loss, dict(model.named_parameters()), batch, spec=ff.infer_spec(model))
    F["bert.encoder.layer.0.attention.output.dense.weight"]     # [num_heads]
"""

from .._spec.families import hf_rules as hf_rules
from ._losses import HFInputs as HFInputs
from ._losses import HFLoss as HFLoss
from ._losses import causal_lm as causal_lm
from ._losses import masked_lm as masked_lm
from ._losses import sequence_classification as sequence_classification
from ._losses import token_classification as token_classification
from ._masks import AttentionLayout as AttentionLayout
from ._masks import attention_layout as attention_layout
from ._masks import attention_mask as attention_mask
from ._masks import position_ids as position_ids
from ._seq2seq import Seq2SeqInputs as Seq2SeqInputs
from ._seq2seq import seq2seq_lm as seq2seq_lm

__all__ = [
    "AttentionLayout",
    "HFInputs",
    "HFLoss",
    "attention_layout",
    "attention_mask",
    "causal_lm",
    "hf_rules",
    "masked_lm",
    "position_ids",
    "seq2seq_lm",
    "Seq2SeqInputs",
    "sequence_classification",
    "token_classification",
]
