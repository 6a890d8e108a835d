"""The per-sample gradient computation: ``vmap`` over samples of ``grad`` of the per-sample loss.

For one sample ``b`` with summed loss ``L_b`` and token count ``n_b``, one backward pass
differentiates with respect to two kinds of inputs at once::

    direct leaves θ_i:        g_i = ∂L_b/∂θ_i                   (the direct path)
    output probes p_k:        d_k = ∂L_b/∂y_k,  with a_k recorded (the factorised path, see probes)

and a caller's ``reduce(g, d, a)`` turns them into what leaves the function — group sums of
``g ⊙ g``, or ``(a, d)`` for K-FAC — *inside* ``vmap``, so the full per-sample gradients never
exist outside it: at most ``chunk × |θ|`` per-sample gradient memory per chunk.

Memory: the backward pass is ``torch.func.vjp``'s pullback of the cotangent 1, called under
``torch.no_grad()`` with ``retain_graph=False`` — the gradient ``torch.func.grad`` computes, without
its ``create_graph=True``. ``grad`` records the backward pass itself (for higher derivatives), so
every intermediate of the backward stays alive until the gradients are returned — about a second
set of activations; and a retained graph keeps every saved activation until the end. Here each
saved tensor is freed once its node has run, as a plain ``.backward()`` frees it. Sites that
reduce inside the backward (:class:`~fisherfunc._engine.probes.ReducingProbe`) then hold nothing
beyond their own reduction.

For the ``"mc"`` and ``"exact"`` Fisher kinds (:mod:`~fisherfunc._engine.kinds`) a chunk is
``(samples, noise)`` and the gradient is taken at every label set ``y_j`` of a sample, from one
forward and one ``vjp``: ``Σ_j w_j reduce(g(y_j), d(y_j), a)`` leaves the function.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp, vmap

from ..dropout import EvalDropout, chained, vmap_randomness
from .attention import batched_attention
from .batches import cast_floating
from .kinds import LabelSets
from .modes import Chain
from .numerics import Prepared, scope
from .probes import Call, ProbeMode, Reducer
from .recurrent import Recurrent

__all__ = ["PerSampleLoss", "Reduce", "Output", "vectorise"]

PerSampleLoss = Callable[[Any, Any], tuple[Tensor, Any]]
#: ``(direct gradients, probe gradients d, recorded inputs a) -> per-sample outputs`` (inside ``vmap``).
Reduce = Callable[[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]], tuple[Any, ...]]
#: ``(outputs [c, ...], tokens [c], recorded inputs [c, ...] or ())`` of one chunk.
Output = tuple[tuple[Any, ...], Tensor, tuple[Tensor, ...]]


def vectorise(
    loss: PerSampleLoss,
    prepared: Prepared,
    *,
    direct: Sequence[int],
    probed: Sequence[int] = (),
    probe_shapes: Sequence[tuple[int, ...]] = (),
    repeats: Sequence[int] | None = None,
    reducers: Sequence[Reducer | None] | None = None,
    probe_dtypes: Sequence[torch.dtype | None] | None = None,
    calls: Sequence[Call | None] | None = None,
    watch: Sequence[int] = (),
    reduce: Reduce,
    labels: LabelSets | None = None,
    keep: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]] | None = None,
) -> Callable[[Any], Output]:
    """The vectorised per-sample computation of one chunk.

    Args:
        loss: per-sample loss ``(params, sample) -> (loss_sum, num_tokens)``.
        prepared: the prepared params.
        direct: leaf indices differentiated directly.
        probed: leaf indices of the weights whose calls get output probes.
        probe_shapes: per-sample shape of each probe (a probed weight's output shape; ``[k, ...]``
            for a weight called ``k`` times, see ``repeats``).
        repeats: how many calls use each probed weight (default: 1 each).
        reducers: per probed weight, ``None`` or a reducer ``(a, d) -> s`` run inside the backward
            (:class:`~fisherfunc._engine.probes.ReducingProbe`): its probe has ``s``'s shape, its
            "gradient" ``d`` in ``reduce`` is ``s`` and its recorded input is empty.
        probe_dtypes: per probe, its dtype (``None``: the compute dtype).
        calls: per probed weight, the :class:`~fisherfunc._engine.probes.Call` discovery saw (each of
            its calls must be that one, or the run raises ``StaleSites``); ``None``: not checked.
        watch: leaf indices of further leaves that only the probed calls may use (K-FAC's folded
            biases); the probed weights are watched always.
        reduce: what leaves ``vmap`` per sample (per label set, weighted, for labelled kinds).
        labels: the label sets of the ``"mc"`` / ``"exact"`` kinds; ``None``: the data's labels.
        keep: also return ``keep(a)`` of the recorded inputs ``a`` of the probed calls (computed inside ``vmap``).

    Returns:
        ``chunk -> (outputs, tokens, inputs)``; a chunk is a slice of the batch, or
        ``(samples, noise)`` with ``labels``.
    """
    dtype = prepared.dtype
    counts = torch.promote_types(dtype, torch.float32)  # token counts: exact integers past bfloat16's 256
    direct = tuple(direct)
    slots = {id(prepared.leaves[i]): k for k, i in enumerate(probed)}
    leaf_of = {id(x): i for i, x in enumerate(prepared.leaves)}
    watched = tuple(id(prepared.leaves[i]) for i in watch)
    dtypes = tuple(probe_dtypes) if probe_dtypes is not None else (None,) * len(probe_shapes)
    zeros = tuple(
        torch.zeros(shape, dtype=kind or dtype, device=prepared.device) for shape, kind in zip(probe_shapes, dtypes)
    )
    direct_values = tuple(prepared.leaves[i] for i in direct)
    like = torch.zeros((), dtype=dtype, device=prepared.device)
    randomness = vmap_randomness(loss)
    # a loss with dropout="eval" (fisherfunc's losses): the rewriting is the chain's first part, not a second mode
    eval_dropout = getattr(loss, "dropout", None) == "eval"

    def run(
        call: Callable[[Any, Any], Any], direct_params: tuple[Tensor, ...], probes: tuple[Tensor, ...], sample: Any
    ):
        tree = prepared.tree(dict(zip(direct, direct_params)))
        # one function mode: dropout as an identity (dropout="eval"), recurrent kernels as linear steps,
        # then the probes, then the attention kernel
        mode = (
            ProbeMode(slots, probes, leaf_of, repeats=repeats, reducers=reducers, expect=calls, watch=watched)
            if slots
            else None
        )
        first = EvalDropout() if eval_dropout else None
        parts = [first, Recurrent(random=randomness == "different"), mode, batched_attention(prepared.device)]
        with Chain([p for p in parts if p is not None]), chained() if first is not None else contextlib.nullcontext():
            out = call(tree, sample)
        return out, mode.recorded(like) if mode is not None else ()

    def sample_loss(direct_params: tuple[Tensor, ...], probes: tuple[Tensor, ...], sample: Any):
        (value, tokens), inputs = run(loss, direct_params, probes, sample)
        if not isinstance(value, Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"the per-sample loss must return a scalar loss_sum, got {shape}")
        return value, (torch.as_tensor(tokens, dtype=counts), inputs)

    def per_sample(sample: Any) -> Output:
        # grad(sample_loss) without grad's create_graph=True, which records the backward itself and so
        # keeps every backward intermediate alive until the gradients are returned (a second set of
        # activations); retain_graph=False frees each saved tensor once its node has run, as .backward() does
        value, pullback, (tokens, inputs) = vjp(  # type: ignore[misc]  # has_aux=True: three values
            functools.partial(sample_loss, sample=sample), direct_values, zeros, has_aux=True
        )
        with torch.no_grad():
            g, d = pullback(torch.ones_like(value), retain_graph=False)
        return reduce(g, d, inputs), tokens, keep(inputs) if keep is not None else ()

    def per_sample_labelled(sample_noise: Any) -> Output:
        assert labels is not None
        sample, noise = sample_noise

        def predict(direct_params: tuple[Tensor, ...], probes: tuple[Tensor, ...]):
            return run(labels.loss.forward, direct_params, probes, sample)

        def reduce_set(grads: tuple[Any, ...], inputs: tuple[Tensor, ...]) -> tuple[Any, ...]:
            return reduce(grads[0], grads[1], inputs)

        values, tokens, inputs = labels.expected_squares(predict, (direct_values, zeros), reduce_set, sample, noise)
        return values, tokens, keep(inputs) if keep is not None else ()

    batched = vmap(per_sample if labels is None else per_sample_labelled, randomness=randomness)

    def chunk_fn(chunk: Any) -> Output:
        with scope(prepared):
            return batched(cast_floating(chunk, dtype))

    return chunk_fn
