"""Recurrent layers' groups: one value per hidden unit of ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``.

torch stacks a recurrent layer's gates along the rows of its weights, each gate a block of ``H``
(``hidden_size``) rows in a fixed order; layer ``k`` has these parameters per direction (suffix
``_reverse`` for the backward direction of a bidirectional layer)::

    weight_ih_l{k}  [gates·H, in]       in = input_size (layer 0) or directions · H_out
    weight_hh_l{k}  [gates·H, H_out]    H_out = proj_size if > 0 else H
    bias_ih_l{k}, bias_hh_l{k}  [gates·H]
    weight_hr_l{k}  [proj_size, H]      LSTM with proj_size > 0: h_t = W_hr (o ⊙ tanh c_t)

| module                   | gates | row blocks (torch's order)        |
|--------------------------|-------|-----------------------------------|
| ``nn.LSTM``              | 4     | input, forget, cell, output       |
| ``nn.GRU``               | 3     | reset, update, new                |
| ``nn.RNN`` (tanh, relu)  | 1     | —                                 |

Hidden unit ``j`` owns rows ``j, H + j, …, (gates − 1)·H + j`` of ``W_ih``, ``W_hh`` and the biases —
every weight that computes its pre-activations — and column ``j`` of ``W_hr`` (where its cell output
goes). :class:`Units` sums one parameter's squared gradient into those groups::

    Units(gates):                 F[j]    = Σ_k Σ_cols x[k·H + j, :]     shape [H]
    Units(gates, per_gate=True):  F[k, j] = Σ_cols x[k·H + j, :]         shape [gates, H]
    Units(axis=1) (W_hr):         F[j]    = Σ_rows x[:, j]                shape [H]

:func:`recurrent_rules` gives every parameter of a layer the per-unit rule with the gates summed, so
each of a layer-direction's parameters has groups ``[H]`` indexed by the same units, and the Fisher
of unit ``j`` of layer ``k`` is the sum of those parameters' values at ``j``. The gate breakdown
stays one override away: ``Units(gates, per_gate=True)`` (``[gates, H]``) or ``Elementwise()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .rules import Rule, SpecError, SquareSums

__all__ = ["Units", "GATES", "recurrent_rules"]

#: Gate blocks along the rows of a recurrent layer's weights, by ``nn.RNNBase.mode``.
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


@dataclasses.dataclass(frozen=True)
class Units(Rule):
    """One value per hidden unit of a recurrent layer, along ``axis`` read as ``[gates, H]``.

    Row ``r`` of axis 0 belongs to gate ``r // H`` and unit ``r mod H`` (torch's stacking of gates;
    see the module docstring)::

        F[j] = Σ_k Σ_{other axes} x[k·H + j]          (per_gate=False, shape [H])
        F[k, j] = Σ_{other axes} x[k·H + j]           (per_gate=True, shape [gates, H])

    Args:
        gates: gate blocks along ``axis`` (4 LSTM, 3 GRU, 1 RNN and ``W_hr``).
        axis: 0 for ``W_ih``, ``W_hh`` and biases (rows), 1 for an LSTM's ``W_hr`` (columns).
        per_gate: keep the gates apart (``[gates, H]``) instead of summing them (``[H]``).

    >>> import torch, fisherfunc as ff
    >>> from fisherfunc._spec.recurrent import Units
    >>> Units(gates=2).reduce(torch.arange(4.0)).tolist()       # rows [g0 u0, g0 u1, g1 u0, g1 u1]
    [2.0, 4.0]
    """

    gates: int = 1
    axis: int = 0
    per_gate: bool = False
    group_type: str = dataclasses.field(default="unit", init=False, repr=False)

    def group_shape(self, shape: torch.Size, name: str = "<param>") -> torch.Size:
        """``[H]``, or ``[gates, H]`` with ``per_gate``; ``H = shape[axis] / gates``."""
        if not -len(shape) <= self.axis < len(shape):
            raise SpecError(f"parameter '{name}' of shape {tuple(shape)}: {self!r} has no axis {self.axis}")
        size = shape[self.axis % len(shape)]
        if self.gates < 1 or size % self.gates:
            raise SpecError(
                f"parameter '{name}' of shape {tuple(shape)}: {self!r}: {self.gates} gate(s) do not divide "
                f"size {size} of axis {self.axis}"
            )
        units = size // self.gates
        return torch.Size([self.gates, units] if self.per_gate else [units])

    def reduce(self, x: Tensor) -> Tensor:
        """``x`` (the parameter's shape) summed into the units (see the class docstring)."""
        axis = self.axis % x.ndim
        dims = [d for d in range(x.ndim) if d != axis]
        per_row = x.sum(dim=dims) if dims else x
        blocks = per_row.reshape(self.gates, -1)  # [gate, unit]
        return blocks if self.per_gate else blocks.sum(0)

    def membership(self, shape: torch.Size | Sequence[int], device: torch.device | str | None = None) -> Tensor:
        """Entry ``i`` of axis ``axis`` is in group ``i`` (per gate: flat ``k·H + j``) or ``i mod H``."""
        shape = torch.Size(shape)
        groups = self.group_shape(shape)
        axis = self.axis % len(shape)
        index = torch.arange(shape[axis], device=device)
        if not self.per_gate:
            index = index % groups[-1]
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return index.reshape(view).expand(shape).contiguous()

    def square_sums(self, shape: torch.Size | Sequence[int]) -> SquareSums:
        """Rows (``axis=0``) or columns (``axis=1``) of ``G ⊙ G``: each lies in one unit."""
        shape = torch.Size(shape)
        if len(shape) != 2:
            raise SpecError(f"{self!r}: square sums are defined for 2-D weights, got shape {tuple(shape)}")
        self.group_shape(shape)
        return "rows" if self.axis % 2 == 0 else "cols"

    def from_square_sums(self, shape: torch.Size | Sequence[int], sums: SquareSums) -> Callable[[Tensor], Tensor]:
        """Row sums ``[n0]`` (``axis=0``) or column sums ``[n1]`` (``axis=1``) reduce as ``G ⊙ G`` does."""
        expected = self.square_sums(shape)
        if sums == "full":
            return self.reduce
        if sums != expected:
            raise SpecError(f"{self!r} on axis {self.axis}: its units are not made of {sums} sums")
        return lambda values: self.reduce(values.unsqueeze(1 if sums == "rows" else 0))


def _gates(module: nn.Module) -> int | None:
    """The gate blocks of a recurrent module (``nn.RNNBase`` by its ``mode``, cells by their class)."""
    if isinstance(module, nn.RNNBase):
        return GATES.get(module.mode)
    for cls, gates in ((nn.LSTMCell, 4), (nn.GRUCell, 3), (nn.RNNCell, 1)):
        if isinstance(module, cls):
            return gates
    return None


def _layout(module: nn.RNNBase | nn.RNNCellBase, name: str, gates: int) -> tuple[Units, tuple[int, ...]] | None:
    """The rule of parameter ``name`` and the shape torch's layout gives it, or ``None`` if not in it."""
    hidden = module.hidden_size
    out = int(getattr(module, "proj_size", 0)) or hidden
    cell = not isinstance(module, nn.RNNBase)  # one layer, names without "_l{k}"
    first = cell or name.removesuffix("_reverse").endswith("_l0")
    directions = 2 if getattr(module, "bidirectional", False) else 1
    inputs = module.input_size if first else directions * out
    if name.startswith("weight_ih"):
        return Units(gates), (gates * hidden, inputs)
    if name.startswith("weight_hh"):
        return Units(gates), (gates * hidden, out)
    if name.startswith(("bias_ih", "bias_hh")):
        return Units(gates), (gates * hidden,)
    if name.startswith("weight_hr"):
        return Units(1, axis=1), (out, hidden)
    return None


def recurrent_rules(module: nn.Module, path: str = "") -> dict[str, Rule | SpecError]:
    """Per-unit rules for the parameters of a recurrent module (names relative to it).

    ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and the cells ``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell``
    (the same layout: one layer, names without the ``_l{k}`` suffix). Each parameter's live shape is
    checked against torch's layout before its rule is given.

    Args:
        module: the recurrent module.
        path: its dotted name in the model (for messages).

    Returns:
        ``{parameter name: Units(...)}`` with the gates summed (``[H]`` per parameter). A parameter
        the layout does not describe maps to a :class:`SpecError` naming it, which
        :func:`~fisherfunc.infer_spec` raises unless an override covers the parameter. Empty for
        modules that are not recurrent.
    """
    gates = _gates(module)
    if gates is None or not isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return {}
    rules: dict[str, Rule | SpecError] = {}
    for name, param in module.named_parameters(recurse=False):
        layout = _layout(module, name, gates)
        if layout is not None and tuple(param.shape) == layout[1]:
            rules[name] = layout[0]
            continue
        full = f"{path}.{name}" if path else name
        expected = f"torch's layout gives {layout[1]}" if layout is not None else "torch's layout has no such parameter"
        rules[name] = SpecError(
            f"{type(module).__name__} parameter '{full}' has shape {tuple(param.shape)}, but {expected} "
            f"({gates} gate(s) × hidden_size={module.hidden_size} along the rows), so it gets no per-unit rule; "
            f"give it one with overrides=, e.g. overrides={{'{full}': fisherfunc.Elementwise()}}"
        )
    return rules
