"""``FisherCollector``: the stateful API early Fisher code was written against, as a thin façade.

Code written against a ``FisherCollector`` runs with only its import changed::

    from fisherfunc.compat import FisherCollector

    collector = FisherCollector(reduction="group", storage="cpu_fp16", ema_decay=0.99)
    fisher_ema = collector.collect_fisher(model, batch, task="math", mode="ema")
    corrected = collector.get_bias_corrected_fisher("math")
    fisher_oneshot = collector.collect_fisher(model, eval_batch, task="eval", mode="oneshot")
    math_channels = collector.get_group_fisher("math", param_name="fc1", group_type="channel")

Everything it holds is a fisherfunc value: one :class:`~fisherfunc.FisherState` per task for the
running estimate (``β = ema_decay``, stored as ``storage`` says), and one per task for the last
one-shot estimate (a state with ``decay=0``, so it is stored the same way); every number comes from
the pure functions (the table maps each method to them, and the tests check the values are
bitwise the pure API's). Keys are fisherfunc's ``{task}|{param_name}|{group_type}``.

| ``FisherCollector``                               | the pure API                                                    |
|---------------------------------------------------|-----------------------------------------------------------------|
| ``collect_fisher(model, batch, task, "ema")``     | ``state = fisher_step(params, batch, state)``; raw ``state.ema`` |
| ``collect_fisher(model, batch, task, "oneshot")`` | ``ff.fisher(loss, params, batch, spec=spec)``                   |
| ``get_bias_corrected_fisher(task)``               | ``ff.to_keyed(state, task=task)`` (``ff.estimate(state)``)      |
| ``get_group_fisher(task, param_name, group_type)``| the keys of the above that match                                |
| ``clear_fisher(task)`` / ``clear_fisher()``       | drop the task's states (``ff.clear(states, task)`` resets them) |
| ``get_metadata(task)``                            | ``ff.metadata(state)``                                          |
| ``state(task)``                                   | the ``FisherState`` itself, for the pure API from here on       |

Where it differs from the collector it stands in for, on purpose: per-sample gradients are exact
(``vmap(grad)``, not squared micro-batch gradients), and float16 storage keeps a per-value
exponent, so small Fisher values are not flushed to zero; values are returned decoded, in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._engine.kinds import FisherKind, as_kind
from ._spec.infer import infer_spec
from ._spec.rules import Elementwise
from ._state.codec import decode
from ._state.ema import check_decay
from ._state.keys import to_keyed
from ._state.state import FisherState, metadata
from ._state.step import FisherStep, make_fisher_step

__all__ = ["FisherCollector"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
_MODES = ("ema", "oneshot")


def _storage(storage: str) -> tuple[str, torch.dtype]:
    """``"cpu_fp16"`` → ``("cpu", float16)``; ``gpu`` means the parameters' own device."""
    where, _, dtype = storage.partition("_")
    if where not in ("cpu", "gpu") or dtype not in _DTYPES:
        raise ValueError(
            f"storage must be '<cpu|gpu>_<fp32|fp16|bf16|fp64>' (e.g. 'cpu_fp16', 'gpu_fp32'), got {storage!r}"
        )
    return where, _DTYPES[dtype]


def _hf_loss(model: nn.Module, batch: Mapping[str, Any]) -> Any:
    """The per-sample loss of a Hugging Face model, read off its head (as its own ``.loss`` would be)."""
    from . import hf

    name = type(model).__name__
    inputs = tuple(k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch)
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return hf.causal_lm(model, inputs=inputs, labels="labels" if "labels" in batch else None)
    if name.endswith("ForMaskedLM"):
        return hf.masked_lm(model, inputs=inputs)
    if name.endswith("ForSequenceClassification"):
        return hf.sequence_classification(model, inputs=inputs)
    raise ValueError(
        f"FisherCollector cannot tell which loss {name} is trained with; pass loss= (a function of the model "
        "returning a per-sample loss, e.g. fisherfunc.losses.classification or fisherfunc.hf.causal_lm)"
    )


class FisherCollector:
    """A stateful Fisher collector over fisherfunc's pure API (see the module docstring).

    Args:
        reduction: ``"group"`` (channels, heads and token rows: :func:`fisherfunc.infer_spec`) or
            ``"param"`` (the full diagonal, ``fisherfunc.Elementwise()``).
        storage: where and how states are kept: ``"cpu_fp16"`` (default), ``"cpu_fp32"``,
            ``"gpu_fp32"`` (the parameters' device), or another ``"<cpu|gpu>_<fp32|fp16|bf16|fp64>"``.
        ema_decay: the EMA decay ``β`` of ``mode="ema"``.
        loss: ``model -> per-sample loss``, e.g. ``fisherfunc.losses.classification``; ``None``
            (default) reads a Hugging Face model's head: causal LM, masked LM or sequence
            classification, with the batch's ``labels`` when it has them.
        kind: the Fisher kind (``"empirical"``, the default; ``fisherfunc.MC(...)``, ``"exact"``).
        chunk_size: samples per vectorised chunk.
        **options: options of the original collector that have no counterpart here (``use_ewc``,
            ``debug`` and ``computation_dtype`` are accepted and ignored); anything else is refused.

    Attributes:
        reduction: as given.
        storage: as given.
        ema_decay: as given.
    """

    def __init__(
        self,
        reduction: str = "group",
        storage: str = "cpu_fp16",
        ema_decay: float = 0.99,
        *,
        loss: Callable[[nn.Module], Any] | None = None,
        kind: FisherKind | str = "empirical",
        chunk_size: int | None = None,
        **options: Any,
    ) -> None:
        if reduction not in ("group", "param"):
            raise ValueError(f"reduction must be 'group' or 'param', got {reduction!r}")
        unknown = sorted(set(options) - {"use_ewc", "debug", "computation_dtype"})
        if unknown:
            raise TypeError(f"FisherCollector does not support {unknown} (fisherfunc.compat keeps the collection API)")
        self.reduction, self.storage, self.ema_decay = reduction, storage, float(ema_decay)
        self._where, self._dtype = _storage(storage)
        self._loss, self._kind, self._chunk_size = loss, kind, chunk_size
        check_decay(ema_decay)
        as_kind(kind)  # a bad kind is refused now, not at the first batch
        self._states: dict[str, FisherState] = {}  # running (EMA) states, by task
        self._oneshot: dict[str, FisherState] = {}  # the last one-shot estimate (a decay-0 state), by task
        self._steps: dict[tuple[str, int, float], FisherStep] = {}

    # --- collection ---------------------------------------------------------------------------------

    def _step(self, model: nn.Module, batch: Any, task: str, decay: float) -> FisherStep:
        key = (task, id(model), decay)
        if key not in self._steps:
            loss = self._loss(model) if self._loss is not None else _hf_loss(model, batch)
            spec = infer_spec(model) if self.reduction == "group" else Elementwise()
            self._steps[key] = make_fisher_step(
                loss, spec=spec, decay=decay, kind=self._kind, chunk_size=self._chunk_size
            )
        return self._steps[key]

    def _fold(
        self, states: dict[str, FisherState], model: nn.Module, batch: Any, task: str, decay: float
    ) -> FisherState:
        params = {k: v.detach() for k, v in model.named_parameters()}
        step = self._step(model, batch, task, decay)
        state = states.get(task)
        if state is None or decay == 0.0:
            device = "cpu" if self._where == "cpu" else None
            state = step.init(params, dtype=self._dtype, device=device)
        states[task] = step(params, batch, state)
        return states[task]

    def collect_fisher(
        self, model: nn.Module, batch: Any, task: str = "default", mode: str = "ema"
    ) -> dict[str, Tensor]:
        """Fold ``batch`` into ``task``'s running estimate (``"ema"``) or estimate it alone (``"oneshot"``).

        Args:
            model: the model (its current parameters are read, never changed).
            batch: one batch, as the loss takes it (a Hugging Face tokenizer's dict, ``(x, y)``...).
            task: the task's name (no ``|``).
            mode: ``"ema"`` or ``"oneshot"``.

        Returns:
            ``{task|param|group_type: tensor}``: the raw (not debiased) EMA ``m_t`` for ``"ema"``, the
            batch's Fisher for ``"oneshot"``; float32, each of its rule's group shape.
        """
        if mode not in _MODES:
            raise ValueError(f"Unknown mode: {mode!r}. Use 'ema' or 'oneshot'")
        if mode == "ema":
            return self.update_fisher_ema(model, batch, task)
        return self.compute_oneshot_fisher(model, batch, task)

    def update_fisher_ema(self, model: nn.Module, batch: Any, task: str = "default") -> dict[str, Tensor]:
        """``collect_fisher(..., mode="ema")``: ``m_t = β m_{t−1} + (1 − β) F̂_t``; returns the raw ``m_t``."""
        state = self._fold(self._states, model, batch, task, self.ema_decay)
        return self._raw(state, task)

    def compute_oneshot_fisher(self, model: nn.Module, batch: Any, task: str = "default") -> dict[str, Tensor]:
        """``collect_fisher(..., mode="oneshot")``: the batch's own Fisher ``F̂`` (replacing the last one)."""
        state = self._fold(self._oneshot, model, batch, task, 0.0)
        return to_keyed(state, task=task)

    # --- reading ------------------------------------------------------------------------------------

    @staticmethod
    def _raw(state: FisherState, task: str) -> dict[str, Tensor]:
        raw = {name: None if m is None else decode(m) for name, m in state.ema.items()}
        return to_keyed(raw, task=task, spec=state.spec)

    def _state(self, task: str, mode: str) -> FisherState:
        if mode not in _MODES:
            raise ValueError(f"Unknown mode: {mode!r}. Use 'ema' or 'oneshot'")
        states = self._states if mode == "ema" else self._oneshot
        if task not in states:
            raise KeyError(f"no {mode} Fisher for task {task!r}; tasks with one: {sorted(states)}")
        return states[task]

    def get_bias_corrected_fisher(self, task: str, mode: str = "ema") -> dict[str, Tensor]:
        """``{key: m_t / (1 − β^t)}`` of ``task`` (``ff.to_keyed(state, task=task)``); ``"oneshot"``: the last."""
        return to_keyed(self._state(task, mode), task=task)

    def get_group_fisher(
        self,
        task: str,
        param_name: str | None = None,
        group_type: str | None = None,
        bias_corrected: bool = True,
        mode: str = "ema",
    ) -> dict[str, Tensor] | Tensor:
        """Group Fisher of ``task``, optionally narrowed to keys naming ``param_name`` and of ``group_type``.

        Args:
            task: the task.
            param_name: keep the keys whose parameter name contains it (e.g. ``"fc1"``).
            group_type: keep the keys of this group type (``"channel"``, ``"head"``, ``"token"``...).
            bias_corrected: ``m_t / (1 − β^t)`` (default) or the raw EMA (``mode="ema"`` only).
            mode: ``"ema"`` or ``"oneshot"``.

        Returns:
            The one matching tensor when ``param_name`` is given and exactly one key matches, else
            ``{key: tensor}``; float32.
        """
        state = self._state(task, mode)
        keyed = to_keyed(state, task=task) if bias_corrected or mode == "oneshot" else self._raw(state, task)
        found = {
            key: value
            for key, value in keyed.items()
            if (param_name is None or param_name in key.split("|")[1])
            and (group_type is None or key.split("|")[2] == group_type)
        }
        if param_name is not None and len(found) == 1:
            return next(iter(found.values()))
        return found

    @property
    def fisher_ema(self) -> dict[str, Tensor]:
        """Every task's raw EMA ``m_t`` by key (decoded to float32, on the storage device)."""
        return {k: v for task, state in self._states.items() for k, v in self._raw(state, task).items()}

    @property
    def fisher_oneshot(self) -> dict[str, Tensor]:
        """Every task's last one-shot estimate by key."""
        return {k: v for task, state in self._oneshot.items() for k, v in to_keyed(state, task=task).items()}

    @property
    def fisher_steps(self) -> dict[str, int]:
        """``{"{task}_steps": t}``: the EMA steps taken per task."""
        return {f"{task}_steps": state.step for task, state in self._states.items()}

    @property
    def n_samples_seen(self) -> dict[str, int]:
        """Samples folded into each task's EMA."""
        return {task: state.samples for task, state in self._states.items()}

    def get_metadata(self, task: str, mode: str = "ema") -> dict[str, Any]:
        """``ff.metadata(state)``: steps, tokens and samples seen, decay, kind, storage, every rule."""
        return metadata(self._state(task, mode))

    def state(self, task: str, mode: str = "ema") -> FisherState:
        """``task``'s :class:`~fisherfunc.FisherState`: the pure API takes it from here (save, merge, EWC...)."""
        return self._state(task, mode)

    def clear_fisher(self, task: str | None = None) -> None:
        """Forget ``task``'s estimates (EMA and one-shot), or every task's with ``task=None``."""
        for states in (self._states, self._oneshot):
            if task is None:
                states.clear()
            else:
                states.pop(task, None)
        self._steps = {k: v for k, v in self._steps.items() if task is not None and k[0] != task}
