"""Recurrent layers per sample: ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` as plain torch functions.

Under ``vmap`` a per-sample forward sees one sample, and two things go wrong in torch's own
recurrent kernels (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``, ``torch.rnn_relu``, which the
modules call): the zero initial state a module builds when none is passed (``torch.zeros`` from the
per-sample input's shape) is not batched, and the kernel writes batched states into it (``RuntimeError:
output with shape [1, H] doesn't match the broadcast shape [B, 1, H]``); and where a kernel is
reached at all, torch may pick an implementation without a batching rule (oneDNN for float32 LSTM
on the CPU, cuDNN), which ``vmap`` runs as a loop over samples, or refuses.

:class:`Recurrent` is a scoped ``torch.overrides.TorchFunctionMode``, entered *inside* the
per-sample function (nothing is attached to the module, and the module is not modified), under
which those four calls run :func:`run`: the same equations written with ``F.linear`` and elementwise
ops, which batch everywhere. For each layer ``l`` and direction, with ``x_t`` the layer's input at
step ``t`` and gates stacked in torch's row order::

    RNN:   h_t = φ(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)                     (φ = tanh or relu)
    GRU:   [r, z, n̂] = W_ih x_t + b_ih,  [r', z', n̂'] = W_hh h_{t-1} + b_hh
           r = σ(r + r'),  z = σ(z + z'),  n = tanh(n̂ + r ⊙ n̂'),  h_t = (1 − z) ⊙ n + z ⊙ h_{t-1}
    LSTM:  [i, f, g, o] = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh
           c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g),  h_t = σ(o) ⊙ tanh(c_t)   (then h_t = W_hr h_t with proj_size)

Every weight is used by ``F.linear`` calls only, so the output-probe mechanism
(:mod:`~fisherfunc._engine.probes`, entered below this mode) factorises them all exactly. The input
projection ``W_ih x_t + b_ih`` is one call over the whole sequence: ``G_ih = Σ_t d_t x_tᵀ``, with
``d_t`` the gradient of the gates' pre-activation at step ``t``. ``W_hh`` (and ``W_hr``) are called
once per step, ``T`` times with equal shapes: one probe per step gives ``d_t`` and the recorded
inputs ``h_{t-1}``, and ``G_hh = Σ_t d_t h_{t-1}ᵀ`` is squared as a whole (its cross terms over
steps included), like a linear layer's over ``T`` tokens. Biases take the direct path. Between
layers, a training-mode module's ``dropout`` is ``F.dropout``, applied only when the computation is
random per sample (``dropout="train"``); otherwise the layers are joined as at evaluation.

The one-step kernels of ``nn.RNNCell``, ``nn.LSTMCell`` and ``nn.GRUCell`` (``torch.lstm_cell``, ...)
run :func:`run_cell`, the same step. A ``PackedSequence`` (``nn.utils.rnn.pack_padded_sequence``)
has a data-dependent shape per sample and is refused with a :class:`ValueError`; pad instead and
mask the loss (``docs/recurrent.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .modes import Part

__all__ = ["Recurrent", "KERNELS", "CELLS", "run", "run_cell"]

#: torch's recurrent kernels (what ``nn.RNN``/``nn.LSTM``/``nn.GRU`` call) and their cell kind.
KERNELS: dict[Callable[..., Any], str] = {
    torch.lstm: "lstm",
    torch.gru: "gru",
    torch.rnn_tanh: "rnn_tanh",
    torch.rnn_relu: "rnn_relu",
}
#: torch's one-step kernels (what ``nn.RNNCell``/``nn.LSTMCell``/``nn.GRUCell`` call) and their kind.
CELLS: dict[Callable[..., Any], str] = {
    torch.lstm_cell: "lstm",
    torch.gru_cell: "gru",
    torch.rnn_tanh_cell: "rnn_tanh",
    torch.rnn_relu_cell: "rnn_relu",
}


def _step(
    kind: str, pre: Tensor, h: Tensor, c: Tensor | None, w_hh: Tensor, b_hh: Tensor | None, w_hr: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """One time step: ``pre = W_ih x_t + b_ih`` ``[N, gates·H]`` and the state ``h [N, H_out]`` (``c [N, H]``)."""
    rec = F.linear(h, w_hh, b_hh)  # W_hh h_{t-1} + b_hh
    if kind == "lstm":
        assert c is not None
        i, f, g, o = (pre + rec).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if w_hr is None else F.linear(h, w_hr)), c
    if kind == "gru":
        r, z, n = pre.chunk(3, dim=-1)
        r_h, z_h, n_h = rec.chunk(3, dim=-1)
        r, z = torch.sigmoid(r + r_h), torch.sigmoid(z + z_h)
        n = torch.tanh(n + r * n_h)
        return (1 - z) * n + z * h, None
    total = pre + rec
    return (torch.tanh(total) if kind == "rnn_tanh" else torch.relu(total)), None


def _direction(
    kind: str, x: Tensor, h: Tensor, c: Tensor | None, weights: Sequence[Tensor], bias: bool, reverse: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer in one direction over a time-major input ``x [T, N, in]``: outputs ``[T, N, H_out]``, last states."""
    w_ih, w_hh = weights[0], weights[1]
    b_ih, b_hh = (weights[2], weights[3]) if bias else (None, None)
    w_hr = weights[-1] if len(weights) in (3, 5) else None
    # all steps' input projections: one call, so W_ih can be factorised; unbound once (indexing per
    # step would make the backward build a full-size gradient per step)
    pre = F.linear(x, w_ih, b_ih).unbind(0)
    outputs: list[Tensor] = [h] * x.shape[0]
    for t in reversed(range(x.shape[0])) if reverse else range(x.shape[0]):
        h, c = _step(kind, pre[t], h, c, w_hh, b_hh, w_hr)
        outputs[t] = h
    return torch.stack(outputs), h, c


def run(kind: str, args: Sequence[Any], *, random: bool = False) -> tuple[Tensor, ...]:
    """A recurrent kernel's call, recomputed with batchable ops; same arguments and results.

    Args:
        kind: ``"lstm"``, ``"gru"``, ``"rnn_tanh"`` or ``"rnn_relu"``.
        args: the kernel's positional arguments ``(input, hx, params, has_biases, num_layers,
            dropout, train, bidirectional, batch_first)``; ``input`` ``[N, T, in]`` (batch first) or
            ``[T, N, in]``, ``hx`` ``[layers · directions, N, H_out]`` (a pair ``(h0, c0)`` for LSTM),
            ``params`` the module's flat weights, per layer and direction
            ``[W_ih, W_hh, (b_ih, b_hh), (W_hr)]``.
        random: apply a training-mode module's dropout between layers (``F.dropout``); off, the
            layers are joined as at evaluation.

    Returns:
        ``(output, h_n)``, or ``(output, h_n, c_n)`` for LSTM, shaped as torch's kernel returns them.
    """
    x, hx, params, bias, layers, dropout, train, bidirectional, batch_first = args
    directions = 2 if bidirectional else 1
    h0, c0 = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
    per = len(params) // (layers * directions)
    if batch_first:
        x = x.transpose(0, 1)
    last_h: list[Tensor] = []
    last_c: list[Tensor] = []
    for layer in range(layers):
        if layer > 0 and dropout > 0 and train and random:
            x = F.dropout(x, p=dropout, training=True)
        outs = []
        for d in range(directions):
            k = layer * directions + d
            out, h, c = _direction(
                kind, x, h0[k], None if c0 is None else c0[k], params[k * per : (k + 1) * per], bias, reverse=d == 1
            )
            outs.append(out)
            last_h.append(h)
            if c is not None:
                last_c.append(c)
        x = outs[0] if directions == 1 else torch.cat(outs, dim=-1)
    output = x.transpose(0, 1) if batch_first else x
    if kind == "lstm":
        return output, torch.stack(last_h), torch.stack(last_c)
    return output, torch.stack(last_h)


def run_cell(kind: str, args: Sequence[Any]) -> Tensor | tuple[Tensor, Tensor]:
    """A one-step kernel's call ``(input [N, in], hx, W_ih, W_hh, b_ih, b_hh)``, recomputed with batchable ops.

    Returns:
        ``h [N, H]``, or ``(h, c)`` for LSTM, as torch's kernel returns them.
    """
    x, hx, w_ih, w_hh = args[:4]
    b_ih, b_hh = (tuple(args[4:6]) + (None, None))[:2]
    h, c = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
    h, c = _step(kind, F.linear(x, w_ih, b_ih), h, c, w_hh, b_hh, None)
    return (h, c) if c is not None else h


def _packed(module: str) -> ValueError:
    return ValueError(
        f"fisherfunc runs {module} per sample on padded tensors only: a PackedSequence "
        "(nn.utils.rnn.pack_padded_sequence) has a different shape for every sample, which torch.func.vmap cannot "
        "batch. Pass the padded batch instead and mask the padding in the loss (see docs/recurrent.md)"
    )


class Recurrent(Part):
    """Runs torch's recurrent kernels as :func:`run` and :func:`run_cell`; every other call as is.

    Enter it inside the per-sample function, above the probe mode (which then sees the linear calls
    of :func:`run`), or chained before it (:class:`~fisherfunc._engine.modes.Chain`).

    Args:
        random: whether the computation draws per-sample randomness (``vmap(randomness="different")``,
            a loss with ``dropout="train"``): then a training-mode module's dropout between layers is
            applied; otherwise the layers are joined as at evaluation, as every other dropout is under
            ``dropout="eval"`` (:mod:`fisherfunc.dropout`).

    Raises:
        ValueError: for packing a sequence (``pack_padded_sequence``) or a recurrent layer run on a
            ``PackedSequence``.
    """

    funcs = frozenset({*CELLS, *KERNELS, torch._pack_padded_sequence})

    def __init__(self, *, random: bool = False) -> None:
        super().__init__()
        self.random = random

    def handle(self, func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:  # noqa: D102
        cell = CELLS.get(func)
        if cell is not None and not kwargs:
            with self.onward():  # the step's linear calls go on to the probes
                return run_cell(cell, args)
        if func is torch._pack_padded_sequence:
            raise _packed("a recurrent layer")
        kind = KERNELS.get(func)
        if kind is None:
            return self.proceed(func, args, kwargs)
        if kwargs or len(args) != 9 or (isinstance(args[1], Tensor) and not args[1].is_floating_point()):
            raise _packed(f"nn.{ {'lstm': 'LSTM', 'gru': 'GRU'}.get(kind, 'RNN') }")
        with self.onward():
            return run(kind, args, random=self.random)
