"""Hugging Face ``transformers`` models: head-level specs, per-sample attention masks and losses.

* :mod:`~fisherfunc.hf.spec`: the rules :func:`fisherfunc.infer_spec` uses for BERT-, GPT-2- and
  Llama-like attention (per head, grouped-query aware), GPT-2 ``Conv1D`` and norms;
* :mod:`~fisherfunc.hf.masks`: a sample's 2-D padding mask → the 4-D attention mask the model would
  build, and position ids counted over real tokens (so the padding side does not matter);
* :mod:`~fisherfunc.hf.losses`: :func:`causal_lm`, :func:`masked_lm`, :func:`sequence_classification`.

Nothing here imports ``transformers``: models are recognised by their classes' modules and configs.

Per-head importance of a masked LM, in a few lines (``batch`` holds ``input_ids``,
``attention_mask`` and MLM ``labels``)::

    loss = ff.hf.masked_lm(model)
    F = ff.fisher(loss, dict(model.named_parameters()), batch, spec=ff.infer_spec(model))
    F["bert.encoder.layer.0.attention.output.dense.weight"]     # [num_heads]
"""

from . import masks as masks
from . import spec as spec
from .losses import HFInputs as HFInputs
from .losses import causal_lm as causal_lm
from .losses import masked_lm as masked_lm
from .losses import sequence_classification as sequence_classification
from .masks import AttentionLayout as AttentionLayout
from .masks import attention_layout as attention_layout
from .masks import attention_mask as attention_mask
from .masks import position_ids as position_ids
from .spec import hf_rules as hf_rules

__all__ = [
    "AttentionLayout",
    "HFInputs",
    "attention_layout",
    "attention_mask",
    "causal_lm",
    "hf_rules",
    "masked_lm",
    "masks",
    "position_ids",
    "sequence_classification",
    "spec",
]
