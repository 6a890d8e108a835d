"""Front alignment: a sample's real tokens moved to its first slots, in order, its padding after them.

A Hugging Face model fed one padded sample computes what it computes for the unpadded sample only if
it sees the real tokens where the unpadded sample has them: from slot 0. Models count positions from
their first slot (``arange``, RoBERTa's ``padding_idx + 1 + t``, BART's ``t + 2``), pool the first
slot (BERT's and RoBERTa's classifiers read token 0), or add ALiBi biases that grow with the key's
slot. With left padding each of these differs from the unpadded sample. So, inside the per-sample
function and before anything else, every token-level entry of the sample (ids, masks, labels,
token types) is permuted by the same stable permutation that moves the real tokens to the front::

    c_t    = Σ_{t' ≤ t} m_t'                         (real tokens up to t; n = c_{T−1})
    dest_t = c_t − 1                 if m_t = 1      (the k-th real token goes to slot k − 1)
    dest_t = n + (t + 1 − c_t) − 1   if m_t = 0      (padding keeps its order, after the real tokens)
    aligned[dest_t] = x[t]

Right padding is left as it is (``dest_t = t``). The model then sees the unpadded sequence followed
by padding, which the attention mask hides from every real token (and which a causal model could not
see anyway); the loss reads the labels through the same permutation, so ``L_b`` and ``n_b`` are the
unpadded sample's. Padding in the middle of a sequence is closed up the same way.

>>> import torch
>>> mask = torch.tensor([0, 0, 1, 1, 1])
>>> align(torch.tensor([9, 9, 5, 6, 7]), mask)
tensor([5, 6, 7, 9, 9])
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["source_slots", "align", "align_entries"]


def source_slots(mask: Tensor) -> Tensor:
    """For every slot ``i`` of the aligned sequence, the slot of the original it comes from.

    Args:
        mask: ``[..., T]`` padding mask (nonzero = real token).

    Returns:
        ``[..., T]`` int64 indices ``src`` with ``aligned = x.gather(-1, src)``.
    """
    m = (mask != 0).long()
    real = m.cumsum(-1)  # c_t
    slots = torch.arange(1, m.shape[-1] + 1, device=m.device)  # t + 1
    n = real[..., -1:]
    dest = torch.where(m == 1, real - 1, n + slots - real - 1)
    return torch.zeros_like(dest).scatter(-1, dest, torch.arange(m.shape[-1], device=m.device).expand_as(dest))


def align(x: Tensor, mask: Tensor, src: Tensor | None = None) -> Tensor:
    """``x`` with its real tokens moved to the front (see the module docstring).

    Args:
        x: ``[..., T, *rest]``: a token-level tensor whose leading dimensions are ``mask``'s.
        mask: ``[..., T]`` padding mask.
        src: :func:`source_slots` of ``mask``, if already computed.

    Returns:
        ``x`` permuted along its token dimension, same shape and dtype.
    """
    src = source_slots(mask) if src is None else src
    rest = x.shape[mask.ndim :]
    index = src.reshape(*src.shape, *(1,) * len(rest)).expand(*src.shape, *rest)
    return x.gather(mask.ndim - 1, index)


def align_entries(sample: Any, groups: Sequence[tuple[Hashable, Sequence[Hashable]]]) -> Any:
    """A mapping sample (or batch) with the entries of each group aligned by the group's mask.

    Args:
        sample: a mapping of tensors (one sample, or a batch with a leading dimension).
        groups: ``(mask key, keys)`` pairs: the entries ``keys`` (and the mask itself) are aligned
            by the mask; an entry that is missing, or whose leading dimensions are not the mask's,
            is left as it is.

    Returns:
        A new mapping (the input is not modified); ``sample`` itself if there is nothing to align.
    """
    if not groups or not isinstance(sample, Mapping):
        return sample
    out = dict(sample)
    for mask_key, keys in groups:
        mask = sample.get(mask_key)
        if not isinstance(mask, Tensor) or mask.ndim == 0:
            continue
        src = source_slots(mask)
        for key in (mask_key, *keys):
            x = sample.get(key)
            if isinstance(x, Tensor) and x.shape[: mask.ndim] == mask.shape:
                out[key] = align(x, mask, src)
    return out
