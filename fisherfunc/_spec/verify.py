"""Head layouts verified on the live model: a functional self-test before per-head rules are trusted.

The family table (:mod:`~fisherfunc._spec.layouts`) *claims* which rows of Q, K, V (and which
columns of the output projection O) belong to which head. Attention computes, for query head ``h``
reading key-value head ``g(h) = ⌊h / r⌋`` (``r = H / KV``), from the projections' input ``x``::

    c_h = softmax(q_h k_gᵀ + position terms) v_g,   q_h = W_q[rows of h] x,  k_g, v_g likewise
    y   = Σ_h W_o[:, columns of h] c_h               (c = O's input: the heads' contexts)

The model is run once on a short sample input (:func:`sample_inputs`); a scoped torch function mode
records O's input ``c`` and Q's input ``x`` (no hooks, nothing attached to a module) and ends the
forward once every module under test has been seen. For every head ``h``, a random cotangent ``u``
on head ``h``'s columns of ``c`` at the last token ``t`` gives the gradients ``G = ∂(u·c_t)/∂W`` of
the Q, K, V weights and biases, summed into the rules' groups (``rule.reduce(G ⊙ G)``). The layout
passes when, for every head:

| check  | the layout claims                              | what must hold                                   |
|--------|------------------------------------------------|--------------------------------------------------|
| heads  | head ``h``'s context reads its own Q rows and  | no gradient energy outside Q's group ``h`` and   |
|        | key-value head ``g(h)``'s K and V rows         | K's and V's group ``g(h)``; some on each weight's |
| query  | Q's rows are queries                           | Q's rows of ``h``: ``G = δ x_tᵀ``, every row      |
|        |                                                | parallel to ``x_t`` (keys, values mix tokens)    |
| value  | V's rows are values (``c`` is linear in them)  | V's rows (and bias) doubled: every head's        |
|        |                                                | context exactly doubled                          |

Doubling is exact in floating point and leaves the attention weights bit-identical, so the value
check holds to rounding in any dtype; the gradient checks see structural zeros. A layout that
fails is refused (:class:`~fisherfunc.SpecError` naming the parameter); one that cannot be run
(no sample input for the model, a forward that fails, a module the forward never calls) is not
trusted either. Results are kept per attention class, projection classes, shapes and rules, so a
model's layers of one shape are tested once, and a second model of that shape not at all.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .. import dropout
from .._engine.probes import arg
from .layouts import AttentionBlock, HeadPart, is_hf_module
from .rules import Rule, SpecError

__all__ = ["Verdict", "verify_blocks", "sample_inputs", "clear_cache"]

#: Tokens of the sample input.
SAMPLE_LENGTH = 5
_MATMUL = (torch.matmul, Tensor.matmul, Tensor.__matmul__)
_CACHE: dict[tuple, Verdict] = {}
_MAX_CACHE = 256


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The self-test's outcome for one attention module.

    Attributes:
        error: the failure, naming the parameter (the layout is refused), else ``None``.
        unverified: why the test could not run (the layout is not trusted), else ``None``.
    """

    error: SpecError | None = None
    unverified: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the layout passed."""
        return self.error is None and self.unverified is None


def clear_cache() -> None:
    """Forget every verdict (tests that build a model whose layout must be tested afresh)."""
    _CACHE.clear()


# --- a sample input ------------------------------------------------------------------------------


def _special_ids(config: Any) -> set[int]:
    return {v for k, v in vars(config).items() if k.endswith("_token_id") and isinstance(v, int)}


def sample_inputs(root: nn.Module, length: int = SAMPLE_LENGTH) -> dict[str, Tensor] | str:
    """A one-sample input for a ``transformers`` model, or why there is none.

    By the model's ``main_input_name``: ``input_ids`` ``[1, length]`` of distinct ordinary tokens (no
    padding, no special ids); Whisper-like ``input_features`` ``[1, num_mel_bins, 2 ·
    max_source_positions]`` and vision ``pixel_values`` ``[1, num_channels, image_size, image_size]``
    of standard normal noise. Encoder–decoders also get the ids as ``decoder_input_ids``, decoders
    with cross-attention (``config.add_cross_attention``) noise as ``encoder_hidden_states``.
    """
    config = getattr(root, "config", None)
    first = next(iter(root.parameters()), None)
    if config is None or first is None:
        return f"{type(root).__name__} has no config or no parameters"
    floating = next((p for p in root.parameters() if p.is_floating_point()), first)

    def noise(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(first.device, floating.dtype)

    vocab = getattr(config, "vocab_size", None)
    specials = _special_ids(config)
    ordinary = [i for i in range(vocab) if i not in specials][-length:] if isinstance(vocab, int) else []
    ids = torch.tensor([ordinary], device=first.device) if len(ordinary) == length else None
    main = getattr(root, "main_input_name", "input_ids")
    inputs: dict[str, Tensor] = {}
    if main == "input_ids" and ids is not None:
        inputs["input_ids"] = ids
    elif main == "input_features" and hasattr(config, "num_mel_bins") and hasattr(config, "max_source_positions"):
        # Whisper: its two convolutions, the second of stride 2, take 2 · max_source_positions frames
        inputs["input_features"] = noise(1, config.num_mel_bins, 2 * config.max_source_positions)
    elif main == "pixel_values" and hasattr(config, "image_size") and hasattr(config, "num_channels"):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        inputs["pixel_values"] = noise(1, config.num_channels, size, size)
    else:
        return f"{type(root).__name__} takes {main!r}, for which fisherfunc has no sample input"
    if getattr(config, "is_encoder_decoder", False):
        if ids is None:
            return f"{type(root).__name__}'s config has no vocabulary of {length} ordinary tokens for its decoder"
        inputs["decoder_input_ids"] = ids
    elif getattr(config, "add_cross_attention", False) and isinstance(getattr(config, "hidden_size", None), int):
        inputs["encoder_hidden_states"] = noise(1, length, config.hidden_size)  # a decoder's cross-attention
    return inputs


# --- recording the projections' inputs -----------------------------------------------------------


class _Seen(Exception):
    """Every watched weight has been used: the forward can stop."""


class _InputsOf(TorchFunctionMode):
    """Records the input of the first call that uses each watched weight, then ends the forward.

    Recognises ``F.linear(x, W)``, ``torch.addmm(b, x, W)`` (``Conv1D``) and ``x @ W.T`` (a view
    of ``W`` then a matrix product: Falcon's linear layers).
    """

    def __init__(self, watched: Sequence[Tensor]) -> None:
        super().__init__()
        self.watched = {id(w): i for i, w in enumerate(watched)}
        self.views: dict[int, int] = {}
        self.keep: list[Tensor] = []  # views stay alive, so their ids are not reused
        self.inputs: dict[int, Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        used = self._use(func, args, kwargs, out)
        if used is not None:
            self.inputs.setdefault(*used)
            if len(self.inputs) == len(self.watched):
                raise _Seen
        return out

    def _slot(self, x: Any) -> int | None:
        if not isinstance(x, Tensor):
            return None
        found = self.watched.get(id(x))
        return found if found is not None else self.views.get(id(x))

    def _use(self, func: Any, args: tuple, kwargs: dict, out: Any) -> tuple[int, Tensor] | None:
        if func is F.linear:
            slot, x = self._slot(arg(args, kwargs, 1, "weight")), arg(args, kwargs, 0, "input")
        elif func is torch.addmm:
            slot, x = self._slot(arg(args, kwargs, 2, "mat2")), arg(args, kwargs, 1, "mat1")
        else:
            tensors = [a for a in args if isinstance(a, Tensor)]
            slots = [self._slot(a) for a in tensors]
            if all(s is None for s in slots):
                return None
            if len(tensors) == 1 and isinstance(out, Tensor):  # a view of the weight (W.T, W.t()): its use counts
                self.views[id(out)] = slots[0]  # type: ignore[assignment]
                self.keep.append(out)
                return None
            if func not in _MATMUL or len(tensors) != 2 or slots[1] is None:
                return None
            slot, x = slots[1], tensors[0]
        return (slot, x) if slot is not None and isinstance(x, Tensor) else None


# --- the checks ----------------------------------------------------------------------------------

#: Stands for the tested module's name in a kept message (rendered per module).
_HERE = "\x00"


@dataclasses.dataclass(frozen=True)
class _Test:
    """One module's test: its block, its query weight, O's head columns, and its Q/K/V parts."""

    block: AttentionBlock
    query: str
    output: HeadPart
    inputs: tuple[HeadPart, ...]


def _test_of(block: AttentionBlock) -> _Test | str:
    outputs = [p for p in block.parts if p.role == "o"]
    queries = [p for p in block.parts if p.role == "q" and p.param.endswith(".weight")]
    if len(outputs) != 1 or not queries:
        return f"'{block.module}' has no output projection or no query weight with per-head rules to test"
    if any(p.role in "kv" for p in block.parts) and block.heads % block.kv_heads:
        return f"'{block.module}': {block.heads} query heads cannot share {block.kv_heads} key-value heads evenly"
    return _Test(block, queries[0].param, outputs[0], tuple(p for p in block.parts if p.role in "qkv"))


def _local(block: AttentionBlock, name: str) -> str:
    return name[len(block.module) + 1 :] if block.module else name


def _key(model: nn.Module, block: AttentionBlock) -> tuple:
    """What the verdict depends on: the module's class, its submodules' classes, shapes and dtypes, and the rules."""
    module = model.get_submodule(block.module)
    layers = tuple((n, type(m).__name__) for n, m in module.named_modules())
    shapes = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
    rules = tuple(sorted((_local(block, n), r) for n, r in block.rules.items()))
    parts = tuple((_local(block, p.param), p.role, p.start, p.stop) for p in block.parts)
    return (type(module), layers, shapes, rules, parts, block.heads, block.kv_heads, block.attention)


def _along(rule: Rule, shape: torch.Size, group: int) -> Tensor:
    """The indices along ``rule``'s head axis that belong to group ``group`` (O: input columns; Q: rows)."""
    axis = getattr(rule, "axis", 0) % len(shape)
    owner = rule.membership(shape)
    along = owner.movedim(axis, 0).reshape(shape[axis], -1)[:, 0]
    return torch.nonzero(along == group).flatten()


def _leak(test: _Test, energy: Mapping[str, Tensor], head: int, total: float) -> str | None:
    block, r = test.block, test.block.heads // test.block.kv_heads
    for part in test.inputs:
        own = head if part.role == "q" else head // r
        segment = energy[part.param][part.start : part.stop]
        name = f"'{_HERE}.{_local(block, part.param)}'"
        if float(segment.sum() - segment[own]) > 1e-8 * total:
            others = [j for j in range(segment.numel()) if j != own and float(segment[j]) > 0]
            return (
                f"query head {head}'s context (its columns of '{_HERE}.{_local(block, test.output.param)}') depends "
                f"on the {part.role.upper()} rows {name} gives to head(s) {others} (head {own} expected)"
            )
        if part.param.endswith(".weight") and not float(segment[own]) > 1e-12 * total:
            role = part.role.upper()
            return f"query head {head}'s context does not depend on the {role} rows of head {own} of {name}"
    return None


def _not_queries(test: _Test, grad: Tensor, head: int, x_t: Tensor) -> str | None:
    """Q's rows of ``head`` from one token's cotangent: ``G = δ x_tᵀ``, every row parallel to ``x_t``."""
    rule = test.block.rules[test.query]
    part = next(p for p in test.inputs if p.param == test.query and p.role == "q")
    rows = _along(rule, grad.shape, part.start + head)
    axis = getattr(rule, "axis", 0) % 2
    m = grad.movedim(axis, 0)[rows.to(grad.device)].detach().to("cpu", torch.float64)
    x = x_t / x_t.norm()
    residual = m - (m @ x).unsqueeze(1) * x.unsqueeze(0)
    if float(m.norm()) > 0 and float(residual.norm()) <= 64 * torch.finfo(grad.dtype).eps * float(m.norm()):
        return None
    return (
        f"the rows '{_HERE}.{_local(test.block, test.query)}' gives to query head {head} do not act as queries: their "
        "gradient from one token's context is not that token's input alone (keys and values mix other tokens)"
    )


def _gradient_checks(
    test: _Test, model: nn.Module, leaves: Mapping[str, Tensor], context: Tensor, x: Tensor
) -> str | None:
    """The ``heads`` and ``query`` checks of every head (module docstring)."""
    block = test.block
    flat = context.reshape(-1, context.shape[-1])
    x_t = x.reshape(-1, x.shape[-1])[-1].detach().to("cpu", torch.float64)
    o_shape = model.get_parameter(test.output.param).shape
    names = sorted({p.param for p in test.inputs})
    generator = torch.Generator().manual_seed(0)
    for head in range(block.heads):
        columns = _along(block.rules[test.output.param], o_shape, test.output.start + head).to(flat.device)
        cotangent = torch.zeros_like(flat)
        noise = torch.randn(columns.numel(), generator=generator, dtype=torch.float64)
        cotangent[-1, columns] = noise.to(flat.device, flat.dtype)  # head h's context at the last token
        grads = torch.autograd.grad(
            (flat * cotangent).sum(), [leaves[n] for n in names], retain_graph=True, allow_unused=True
        )
        grad = {n: (g if g is not None else torch.zeros_like(leaves[n])) for n, g in zip(names, grads)}
        energy = {n: block.rules[n].reduce(grad[n].detach().to(torch.float64).square()).reshape(-1) for n in names}
        total = sum(float(e.sum()) for e in energy.values())
        problem = _leak(test, energy, head, total) or _not_queries(test, grad[test.query], head, x_t)
        if problem is not None:
            return problem
    return None


def _value_check(test: _Test, model: nn.Module, context: Tensor, doubled: Tensor) -> str | None:
    """With V's rows doubled, every head's columns of O's input are exactly doubled."""
    block = test.block
    o_shape = model.get_parameter(test.output.param).shape
    rule = block.rules[test.output.param]
    columns = torch.cat([_along(rule, o_shape, test.output.start + h) for h in range(block.heads)])
    before = context.detach().reshape(-1, context.shape[-1])[:, columns.to(context.device)].to(torch.float64)
    after = doubled.detach().reshape(-1, doubled.shape[-1])[:, columns.to(doubled.device)].to(torch.float64)
    scale = float(before.abs().max())
    if float((after - 2 * before).abs().max()) <= 4 * torch.finfo(context.dtype).eps * scale:
        return None
    values = sorted(f"'{_HERE}.{_local(block, p.param)}'" for p in test.inputs if p.role == "v")
    if not values:  # no value parameter with a per-head rule: nothing to double
        return None
    return (
        f"doubling the rows it gives to values ({', '.join(values)}) does not double every head's context: some of "
        "them are not values, or some values are elsewhere"
    )


# --- running the model ---------------------------------------------------------------------------


def _root(model: nn.Module, module: str) -> str:
    """The outermost ``transformers`` model (a module with a config and a main input) holding ``module``."""
    parts = module.split(".") if module else []
    for i in range(len(parts) + 1):
        name = ".".join(parts[:i])
        candidate = model.get_submodule(name)
        if is_hf_module(candidate) and hasattr(candidate, "config") and hasattr(candidate, "main_input_name"):
            return name
    return module


def _forward(
    root: nn.Module, prefix: str, replaced: Mapping[str, Tensor], inputs: Mapping[str, Tensor], watched: list[Tensor]
) -> dict[int, Tensor] | str:
    """Run ``root`` with ``replaced`` params, recording the watched weights' inputs; or why it failed."""
    mode = _InputsOf(watched)
    params = {n[len(prefix) :]: t for n, t in replaced.items()}
    try:
        with warnings.catch_warnings(), dropout.evaluation(), mode:
            warnings.simplefilter("ignore")
            torch.func.functional_call(root, params, args=(), kwargs=dict(inputs))
    except _Seen:
        pass
    except Exception as err:  # noqa: BLE001 - any failure means: not verified
        return f"its forward on a sample input failed ({type(err).__name__}: {str(err)[:200]})"
    return mode.inputs


def _doubled_values(test: _Test, model: nn.Module, replaced: dict[str, Tensor]) -> None:
    """Double the value rows (weights and biases) of ``test`` in ``replaced``."""
    for part in test.inputs:
        if part.role != "v":
            continue
        current = replaced.get(part.param, model.get_parameter(part.param).detach())
        rule = test.block.rules[part.param]
        owner = rule.membership(current.shape).to(current.device)
        values = (owner >= part.start) & (owner < part.stop)
        replaced[part.param] = torch.where(values, 2 * current, current)


def _run(model: nn.Module, root_name: str, tests: Mapping[tuple, _Test]) -> dict[tuple, Verdict]:
    """Test every module of ``tests`` (one per key): one forward of their root model, and one more per module."""
    root = model.get_submodule(root_name)
    prefix = f"{root_name}." if root_name else ""
    inputs = sample_inputs(root)
    if isinstance(inputs, str):
        return {key: Verdict(unverified=inputs) for key in tests}
    names = sorted({p.param for t in tests.values() for p in t.inputs})
    leaves = {n: model.get_parameter(n).detach().requires_grad_() for n in names}
    order = list(tests)
    outputs = [model.get_parameter(tests[k].output.param) for k in order]
    queries = [leaves[tests[k].query] for k in order]
    with torch.enable_grad():
        seen = _forward(root, prefix, leaves, inputs, outputs + queries)
    if isinstance(seen, str):
        return {key: Verdict(unverified=seen) for key in tests}
    out: dict[tuple, Verdict] = {}
    for i, key in enumerate(order):
        test = tests[key]
        if i not in seen or len(order) + i not in seen:
            out[key] = Verdict(unverified=f"the forward of {type(root).__name__} on a sample input never used it")
            continue
        problem = _gradient_checks(test, model, leaves, seen[i], seen[len(order) + i])
        if problem is None:  # one more forward, with this module's values doubled (earlier modules unchanged)
            doubled: dict[str, Tensor] = {}
            _doubled_values(test, model, doubled)
            with torch.no_grad():
                again = _forward(root, prefix, doubled, inputs, [outputs[i]])
            if isinstance(again, str) or 0 not in again:
                out[key] = Verdict(unverified=again if isinstance(again, str) else "a second forward never used it")
                continue
            problem = _value_check(test, model, seen[i], again[0])
        out[key] = Verdict(error=SpecError(problem)) if problem is not None else Verdict()
    return out


def _render(verdict: Verdict, block: AttentionBlock, model: nn.Module) -> Verdict:
    """A kept verdict, its messages naming ``block``'s module."""
    if verdict.error is None:
        return verdict
    cls = type(model.get_submodule(block.module)).__name__
    params = sorted(block.rules)
    pattern = f"{block.module}.*" if block.module else "*"
    why = str(verdict.error).replace(_HERE, block.module)
    message = (
        f"infer_spec: the head layout that fisherfunc's family table gives '{block.module}' ({cls}, row "
        f"'{block.family}') fails its self-test on the live module: {why}. Its "
        f"parameters {params[:4]}{' ...' if len(params) > 4 else ''} get no per-head rule; give them rules with "
        f"overrides=, e.g. overrides={{'{pattern}': fisherfunc.Channel(0)}} (or your own Heads layout)"
    )
    return Verdict(error=SpecError(message))


def verify_blocks(model: nn.Module, blocks: Sequence[AttentionBlock]) -> dict[str, Verdict]:
    """The self-test's verdict for every block of ``model`` (module docstring), by module name.

    One forward (and one more without gradients) per root model, for the blocks whose
    class/shapes/rules have no kept verdict; every other block reuses its kept one.
    """
    keys = {}
    found: dict[str, Verdict] = {}
    pending: dict[str, dict[tuple, _Test]] = {}
    for block in blocks:
        test = _test_of(block)
        if isinstance(test, str):
            found[block.module] = Verdict(unverified=test)
            continue
        keys[block.module] = key = _key(model, block)
        if key not in _CACHE:
            pending.setdefault(_root(model, block.module), {}).setdefault(key, test)
    fresh: dict[tuple, Verdict] = {}
    for root_name, tests in pending.items():
        fresh.update(_run(model, root_name, tests))
    if len(_CACHE) + len(fresh) > _MAX_CACHE:
        _CACHE.clear()
    _CACHE.update({key: verdict for key, verdict in fresh.items() if verdict.unverified is None})
    for block in blocks:
        if block.module in keys:
            key = keys[block.module]
            found[block.module] = _render(_CACHE.get(key) or fresh[key], block, model)
    return found
