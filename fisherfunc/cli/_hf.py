"""The command's Hugging Face job: a local checkpoint and a text file, as a causal or a masked LM.

The objective is read off the checkpoint — ``config.architectures`` naming a ``…ForMaskedLM`` head
means a masked LM (BERT, RoBERTa, MiniLM), anything else a causal LM — unless ``--objective``
says otherwise. A masked LM's batches are masked as in pre-training (15% of the tokens, seeded
with ``--seed``: ``transformers``' ``DataCollatorForLanguageModeling``; a batch that draws no
masked token is left out), and the Fisher is that of predicting them
(:func:`fisherfunc.hf.masked_lm`); a causal LM's is that of next-token prediction
(:func:`fisherfunc.hf.causal_lm`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from .._state.keys import SEPARATOR

__all__ = ["hf_job", "JobError"]


class JobError(Exception):
    """A checkpoint or text the job cannot use (reported by the command as a one-line usage error)."""


def _lines(text: Path) -> list[str]:
    lines = [line.strip() for line in text.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not lines:
        raise JobError(f"--text {str(text)!r} has no non-empty lines")
    return lines


def _masked(config: Any, objective: str) -> bool:
    if objective != "auto":
        return objective == "masked"
    return any(str(a).endswith("ForMaskedLM") for a in getattr(config, "architectures", None) or [])


def hf_job(args: argparse.Namespace) -> tuple[Any, Any, list[Any], str, str]:
    """``(model, loss, batches, description, task)`` for ``--model DIR --text FILE``.

    Raises:
        JobError: the folder, the file or the checkpoint cannot be used (the message says why).
    """
    folder, text = Path(args.model), Path(args.text)
    if not folder.is_dir():
        raise JobError(f"--model {args.model!r} is not a directory")
    if not (folder / "config.json").is_file():
        raise JobError(f"--model {args.model!r} has no config.json: not a Hugging Face checkpoint directory")
    if not text.is_file():
        raise JobError(f"--text {args.text!r}: no such file")
    try:
        import transformers
    except ImportError:
        raise JobError('--model needs transformers: pip install "fisherfunc[hf]"') from None
    from .. import hf

    lines = _lines(text)
    what = "a causal LM"
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        masked = _masked(config, args.objective)
        what = "a masked LM" if masked else "a causal LM"
        auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
        dtype = getattr(torch, getattr(args, "dtype", None) or "float32")
        model = auto.from_pretrained(
            folder, config=config, local_files_only=True, attn_implementation="sdpa", dtype=dtype
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise JobError(f"--model {args.model!r} cannot be loaded as {what}: {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if masked and tokenizer.mask_token is None:
        raise JobError(f"--model {args.model!r} is a masked LM, but its tokenizer has no mask token")
    model.eval()
    size = args.batch_size or 8
    collate = (
        transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=args.seed)
        if masked
        else None
    )
    batches = []
    for i in range(0, len(lines), size):
        chunk = lines[i : i + size]
        if collate is not None:  # masked as in pre-training; labels hold the masked tokens' ids
            enc = tokenizer(chunk, truncation=True, max_length=args.max_length)
            examples = [
                {"input_ids": ids, "attention_mask": mask} for ids, mask in zip(enc["input_ids"], enc["attention_mask"])
            ]
            batch = collate(examples)
            if bool((batch["labels"] != -100).any()):  # a short batch may draw no masked token at all
                batches.append({k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
        else:
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
            batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    if not batches:
        raise JobError(f"--text {args.text!r}: no token was masked in any batch (too little text for masked-LM Fisher)")
    loss = hf.masked_lm(model) if masked else hf.causal_lm(model)
    kind = "masked LM" if masked else "causal LM"
    description = f"{config.model_type} {kind} from {folder.name} on {len(lines)} lines of {text.name}"
    return model, loss, batches, description, folder.name.replace(SEPARATOR, "_") or "model"
