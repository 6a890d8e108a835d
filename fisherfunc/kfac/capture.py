"""Per-sample layer inputs and output gradients of the covered layers, chunk by chunk.

For each sample ``b`` and covered layer (:mod:`fisherfunc.kfac.layers`), one ``vmap(grad)`` over
zero probes on the layer outputs gives::

    a_b [T, in]    the layer's input at each of its T positions (recorded in the forward;
                   a convolution's input unfolded into T patches)
    d_b [T, out]   ∂L_b/∂y_b, the gradient of the sample's summed loss w.r.t. the layer's output

For the ``"mc"`` and ``"exact"`` kinds (:mod:`fisherfunc.kinds`) ``d`` depends on the label set
``y_j``, so what leaves ``vmap`` is a per-sample statistic ``Σ_j w_j s(a_b, d_b(y_j))`` computed
inside it instead of ``d`` itself; ``a`` comes from one more forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from ..batch import cast_floating
from ..dropout import vmap_randomness
from ..per_sample import no_autocast
from .layers import CaptureMode, Layer, ParamLeaves

if TYPE_CHECKING:
    from ..kinds import LabelSets

__all__ = ["Captured", "capture_fn"]

#: ``(a, d_or_stat, tokens)`` of one chunk: inputs ``[c, T, in]`` per layer, output gradients
#: ``[c, T, out]`` per layer (empirical) or the per-sample statistic per layer (labelled kinds),
#: and token counts ``[c]``.
Captured = tuple[tuple[Tensor, ...], tuple[Tensor, ...], Tensor]

#: ``(layer index, a [T, in], d [T, out]) -> per-sample statistic`` (runs inside ``vmap``).
Statistic = Callable[[int, Tensor, Tensor], Tensor]


def capture_fn(
    loss: Any,
    params: ParamLeaves,
    layers: Sequence[Layer],
    *,
    labels: LabelSets | None = None,
    statistic: Statistic | None = None,
) -> Callable[[Any], Captured]:
    """A function of one chunk (``(samples, noise)`` for labelled kinds) giving :data:`Captured`.

    Args:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        params: the flattened params.
        layers: the covered layers.
        labels: the label sets of ``"mc"`` / ``"exact"``; ``None`` for the dataset's labels.
        statistic: with ``labels``, what to compute from each label set's ``(a, d)`` inside
            ``vmap`` (weighted by ``w_j`` and summed over the sets); required then.
    """
    dtype = params.dtype
    device = params.leaves[layers[0].weight].device
    slots = {id(params.leaves[layer.weight]): k for k, layer in enumerate(layers)}
    probes = tuple(torch.zeros(layer.out_shape, dtype=dtype, device=device) for layer in layers)
    tree = params.tree()

    def under_probes(call: Callable, probe_values: tuple[Tensor, ...], sample: Any) -> tuple[Any, tuple[Tensor, ...]]:
        mode = CaptureMode(slots, probe_values)
        with mode:
            out = call(tree, sample)
        missing = [layers[k].name for k, x in enumerate(mode.inputs) if x is None]
        if missing:
            raise RuntimeError(f"layer(s) {missing} were not called for this sample; K-FAC found them in another")
        inputs = tuple(layer.input_rows(x) for x, layer in zip(mode.inputs, layers))  # type: ignore[arg-type]
        return out, inputs

    def sample_loss(probe_values: tuple[Tensor, ...], sample: Any):
        (value, tokens), inputs = under_probes(loss, probe_values, sample)
        if not isinstance(value, Tensor) or value.ndim != 0:
            raise ValueError("the per-sample loss must return a scalar loss_sum")
        return value, (torch.as_tensor(tokens, dtype=dtype), inputs)

    def per_sample(sample: Any):
        d, (tokens, inputs) = grad(sample_loss, has_aux=True)(probes, sample)
        return inputs, tuple(layer.output_rows(x) for x, layer in zip(d, layers)), tokens

    def per_sample_labelled(sample_noise: Any):
        assert labels is not None and statistic is not None
        sample, noise = sample_noise
        _, inputs = under_probes(labels.loss.forward, probes, sample)

        def predict(probe_values: tuple[Tensor, ...]):
            return under_probes(labels.loss.forward, probe_values, sample)

        def reduce(grads: tuple, recorded: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            (d,) = grads
            return tuple(
                statistic(k, a, layer.output_rows(x)) for k, (a, x, layer) in enumerate(zip(recorded, d, layers))
            )

        stats, tokens = labels.expected_squares(predict, (probes,), reduce, sample, noise)
        return inputs, stats, tokens

    if labels is not None and statistic is None:
        raise ValueError("a labelled kind needs a per-sample statistic")
    batched = vmap(per_sample if labels is None else per_sample_labelled, randomness=vmap_randomness(loss))
    device_types = {leaf.device.type for leaf in params.leaves}

    def run(chunk: Any) -> Captured:
        with no_autocast(device_types):
            return batched(cast_floating(chunk, dtype))

    return run
