"""``infer_spec``: group rules from module types.

Every parameter of ``model.named_parameters()`` (tied parameters appear once) gets a rule from
the module that owns it:

| module                                   | parameter                         | rule                              |
|------------------------------------------|-----------------------------------|-----------------------------------|
| ``nn.Linear``, ``nn.Conv{1,2,3}d``       | weight ``[out, in/groups, *k]``, bias | ``Channel(0)``                |
| ``nn.ConvTranspose{1,2,3}d``             | weight ``[in, out/groups, *k]``   | ``Channel(1, groups=groups)``     |
|                                          | bias ``[out]``                    | ``Channel(0)``                    |
| ``nn.Embedding``, ``nn.EmbeddingBag``    | weight ``[vocab, dim]``           | ``Rows()``                        |
| LayerNorm, GroupNorm, RMSNorm, BatchNorm, InstanceNorm | weight, bias         | ``Channel(0)``                    |
| ``nn.MultiheadAttention``                | ``in_proj_weight/bias`` (fused QKV) | ``Heads(h, 0, parts=3)``        |
|                                          | ``q/k/v_proj_weight``             | ``Heads(h, 0)``                   |
|                                          | ``bias_k``, ``bias_v`` ``[1,1,E]`` | ``Heads(h, 2)``                  |
|                                          | ``out_proj.weight`` (input columns) | ``Heads(h, 1)``                 |
|                                          | ``out_proj.bias``                 | ``Channel(0)``                    |
| ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and   | ``weight_ih_l{k}`` ``[g·H, in]``  | ``Units(g)``: per hidden unit,    |
| their cells; ``g`` = 4, 3, 1 gates       | ``weight_hh_l{k}`` ``[g·H, P or H]`` | its ``g`` gate rows summed        |
| (also ``*_reverse``; ``recurrent.py``)   | ``bias_ih/bias_hh_l{k}`` ``[g·H]`` | ``Units(g)``                     |
|                                          | LSTM ``weight_hr_l{k}`` ``[P, H]`` | ``Units(1, axis=1)`` (columns)   |

Hugging Face ``transformers`` layers take their rules from the family table (``_spec/families.py``), which win
over the table above: per-head rules for BERT-, GPT-2- and Llama-like attention (head counts from
the config, key-value heads for grouped-query attention), ``Conv1D`` and norms. A tied parameter
(GPT-2's ``wte``/``lm_head``) is one parameter with one rule.

``overrides`` maps name patterns (``fnmatch`` globs over the dotted name, ``*`` crosses dots) to
rules; the first matching pattern wins over the table, and a pattern that matches nothing is an
error (it is almost always a typo).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from torch import nn

from .._model_check import check_model
from .experts import placements as expert_placements
from .families import placements as hf_placements
from .recurrent import recurrent_rules
from .rules import Channel, Heads, Rows, Rule, SpecError

__all__ = ["infer_spec"]

_CHANNEL_OUT = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EMBEDDING = (nn.Embedding, nn.EmbeddingBag)
_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _attention_rules(mha: nn.MultiheadAttention) -> dict[str, Rule]:
    h = mha.num_heads
    return {
        "in_proj_weight": Heads(h, axis=0, parts=3),
        "in_proj_bias": Heads(h, axis=0, parts=3),
        "q_proj_weight": Heads(h, axis=0),
        "k_proj_weight": Heads(h, axis=0),
        "v_proj_weight": Heads(h, axis=0),
        "bias_k": Heads(h, axis=2),
        "bias_v": Heads(h, axis=2),
        "out_proj.weight": Heads(h, axis=1),
        "out_proj.bias": Channel(0),
    }


def _module_rules(module: nn.Module, path: str) -> dict[str, Rule | SpecError]:
    """Rules for the parameters owned directly by ``module`` (at ``path``; names relative to it)."""
    if isinstance(module, nn.MultiheadAttention):
        return dict(_attention_rules(module))
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return recurrent_rules(module, path)
    if isinstance(module, _TRANSPOSED):
        return {"weight": Channel(axis=1, groups=module.groups), "bias": Channel(0)}
    if isinstance(module, _CHANNEL_OUT) or isinstance(module, _NORMS):
        return {"weight": Channel(0), "bias": Channel(0)}
    if isinstance(module, _EMBEDDING):
        return {"weight": Rows()}
    return {}


def _parameter(module: nn.Module, path: str) -> nn.Parameter | None:
    """``module``'s parameter at a dotted ``path``, or ``None`` if it has none there (e.g. ``bias=False``)."""
    try:
        return module.get_parameter(path)
    except AttributeError:
        return None


def infer_spec(model: nn.Module, *, overrides: Mapping[str, Rule] | None = None) -> dict[str, Rule]:
    """Build a spec ``{name: rule}`` for ``dict(model.named_parameters())`` from module types.

    Args:
        model: the model. BatchNorm layers must be in eval mode.
        overrides: ``{pattern: rule}``; ``fnmatch`` patterns over dotted parameter names, tried in
            order before the module table (use ``Skip()`` to exclude parameters).

    Returns:
        A dict with one rule per parameter, in ``named_parameters()`` order.

    Raises:
        SpecError: for parameters no rule covers (naming them), or an override matching nothing.
        ValueError: for a BatchNorm layer in training mode.

    >>> import torch, fisherfunc as ff
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    >>> ff.infer_spec(net, overrides={"*.bias": ff.Skip()})
    {'0.weight': Channel(axis=0, groups=1), '0.bias': Skip(), '1.weight': Channel(axis=0, groups=1), '1.bias': Skip()}
    """
    check_model(model)
    overrides = dict(overrides or {})
    for pattern, rule in overrides.items():
        if not isinstance(rule, Rule):
            raise SpecError(f"override {pattern!r} maps to a {type(rule).__name__}, not a group rule")

    # Rules keyed by parameter identity, so a tied parameter is placed whichever name it is listed under.
    table: dict[int, Rule | SpecError] = {}
    for path, module in model.named_modules():
        for local, module_rule in _module_rules(module, path).items():
            param = _parameter(module, local)
            if param is not None:
                table.setdefault(id(param), module_rule)

    def overridden(name: str) -> bool:  # attention the user declared needs no warning
        return any(fnmatch.fnmatchcase(name, p) for p in overrides)

    for path, hf_rule in hf_placements(model, overridden=overridden).items():  # HF heads, Conv1D, norms win
        table[id(model.get_parameter(path))] = hf_rule
    table.update({id(model.get_parameter(path)): rule for path, rule in expert_placements(model).items()})  # MoE

    spec: dict[str, Rule] = {}
    used: set[str] = set()  # patterns matching some parameter, whether or not an earlier one won
    unplaced: list[str] = []
    for name, param in model.named_parameters():
        matching = [p for p in overrides if fnmatch.fnmatchcase(name, p)]
        used.update(matching)
        placed = table.get(id(param))
        if matching:
            spec[name] = overrides[matching[0]]
        elif isinstance(placed, SpecError):
            raise placed
        elif placed is not None:
            spec[name] = placed
        else:
            unplaced.append(name)
    unused = [p for p in overrides if p not in used]
    if unused:
        raise SpecError(f"override pattern(s) {unused} match no parameter of {type(model).__name__}")
    if unplaced:
        listing = ", ".join(repr(n) for n in unplaced[:10]) + (" ..." if len(unplaced) > 10 else "")
        raise SpecError(
            f"infer_spec cannot place {len(unplaced)} parameter(s) of {type(model).__name__}: {listing}. "
            "Give them rules with overrides=, e.g. overrides={'" + unplaced[0] + "': fisherfunc.Elementwise()}"
        )
    return spec
