"""Per-sample layer inputs and output gradients of the covered layers, chunk by chunk.

For each sample ``b`` and covered layer (:mod:`~fisherfunc.kfac._layers`), the engine's
vectorised computation (:func:`~fisherfunc._engine.vectorise.vectorise`, probes only, no weight
differentiated) gives::

    a_b [T, in]    the layer's input at each of its T positions (recorded in the forward;
                   a convolution's input unfolded into T patches)
    d_b [T, out]   ∂L_b/∂y_b, the gradient of the sample's summed loss w.r.t. the layer's output

For the ``"mc"`` and ``"exact"`` kinds ``d`` depends on the label set ``y_j``, so what leaves
``vmap`` is a per-sample statistic ``Σ_j w_j s(a_b, d_b(y_j))`` computed inside it instead of ``d``
itself; ``a`` is the recorded input of the same single forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from .._engine.kinds import LabelSets
from .._engine.numerics import Prepared
from .._engine.probes import Call
from .._engine.vectorise import vectorise
from ._layers import Layer

__all__ = ["Captured", "Statistic", "capture_fn"]

#: ``(a, d_or_stat, tokens)`` of one chunk: inputs ``[c, T, in]`` per layer, output gradients
#: ``[c, T, out]`` per layer (empirical) or the per-sample statistic per layer (labelled kinds),
#: and token counts ``[c]``.
Captured = tuple[tuple[Tensor, ...], tuple[Tensor, ...], Tensor]

#: ``(layer index, a [T, in], d [T, out]) -> per-sample statistic`` (runs inside ``vmap``).
Statistic = Callable[[int, Tensor, Tensor], Tensor]


def capture_fn(
    loss: Any,
    params: Prepared,
    layers: Sequence[Layer],
    *,
    labels: LabelSets | None = None,
    statistic: Statistic | None = None,
) -> Callable[[Any], Captured]:
    """A function of one chunk (``(samples, noise)`` for labelled kinds) giving :data:`Captured`.

    Args:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        params: the prepared params.
        layers: the covered layers.
        labels: the label sets of ``"mc"`` / ``"exact"``; ``None`` for the dataset's labels.
        statistic: with ``labels``, what to compute from each label set's ``(a, d)`` inside
            ``vmap`` (weighted by ``w_j`` and summed over the sets); required then.
    """
    if labels is not None and statistic is None:
        raise ValueError("a labelled kind needs a per-sample statistic")

    def rows(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        # every layer was called (a layer not called raised StaleSites: the probe mode's recorded())
        return tuple(layer.input_rows(x) for x, layer in zip(inputs, layers))

    def reduce(g: tuple[Tensor, ...], d: tuple[Tensor, ...], inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        out = tuple(layer.output_rows(x) for x, layer in zip(d, layers))
        if labels is None:
            return out
        assert statistic is not None
        return tuple(statistic(k, a, x) for k, (a, x) in enumerate(zip(rows(inputs), out)))

    run = vectorise(
        loss,
        params,
        direct=(),
        probed=[layer.weight for layer in layers],
        probe_shapes=[layer.out_shape for layer in layers],
        # each layer's call must stay the one discovery saw, its folded bias used by it alone
        calls=[Call(layer.op, layer.out_shape, bias=layer.bias, conv=layer.conv) for layer in layers],
        watch=[layer.bias for layer in layers if layer.bias is not None],
        reduce=reduce,
        labels=labels,
        keep=rows,
    )

    def chunk(source: Any) -> Captured:
        out, tokens, inputs = run(source)
        return inputs, out, tokens

    return chunk
