"""Mixtures of experts: which parameters are experts and routers, and their group rules.

First version: the placement function ``infer_spec`` applies after the Hugging Face families'
placements. It places nothing yet; the rules, the layout table and its live self-test follow.
"""

from __future__ import annotations

from torch import nn

from .rules import Rule, SpecError

__all__ = ["placements"]


def placements(model: nn.Module) -> dict[str, Rule | SpecError]:
    """Rules for the experts and routers of ``model``, keyed by dotted parameter path (none yet)."""
    del model
    return {}
