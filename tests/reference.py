"""An independent reference for fisherfunc: a naive per-sample loop over the module itself.

Nothing here calls the library's engine, losses or rule reductions. For every sample ``b`` of a
batch the reference

1. slices the sample out of the batch, keeping a batch dimension of 1 (``x[b:b+1]``);
2. calls the *module itself* (``model(...)``; no ``functional_call``, no ``vmap``) and computes
   that sample's summed loss ``L_b`` and token count ``n_b`` with plain ``torch.nn.functional``
   (padding and ``ignore_index`` removed by hand, see :func:`token_cross_entropy`);
3. takes ``torch.autograd.grad(L_b, params)`` and squares it;
4. sums the square into groups with explicit loops over channels, heads, rows and buckets
   (:func:`reduce_groups`; ``rule.reduce`` is never called, only the rule's fields are read).

The token-normalised Fisher is then ``Σ_b groups_b / Σ_b n_b`` (:func:`reference_fisher`).
Use it on a float64 copy of the model (:func:`to_float64`) to get a reference that float32 results
can be compared against.

The only library objects used are the rule *classes* (to read which rule a spec asks for) and,
when a test passes no explicit spec, :func:`fisherfunc.infer_spec` to choose the rules.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fisherfunc as ff

__all__ = [
    "SampleLoss",
    "rel_err",
    "assert_rel_close",
    "assert_groups_close",
    "take_sample",
    "cast_batch",
    "to_float64",
    "full_spec",
    "reduce_groups",
    "per_sample_squared_grads",
    "reference_per_sample",
    "reference_fisher",
    "cross_entropy_sum",
    "token_cross_entropy",
    "causal_cross_entropy",
    "gaussian_nll_sum",
    "count_tokens",
]

#: ``(model, one_sample_batch) -> (loss_sum, num_tokens)``; the batch keeps a leading dimension 1.
SampleLoss = Callable[[nn.Module, Any], tuple[Tensor, float]]


# --- comparisons ----------------------------------------------------------------------------------


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Relative error ``max|a − b| / max|b|`` (computed in float64).

    Args:
        actual: the value under test.
        expected: the reference value (same shape).

    Returns:
        The relative error; ``max|a|`` if ``expected`` is all zeros (an absolute error then).
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_rel_close(actual: Tensor, expected: Tensor, tol: float, what: str = "value") -> None:
    """Assert ``rel_err(actual, expected) <= tol`` and that ``actual`` is finite.

    Args:
        actual: the value under test.
        expected: the reference value.
        tol: the largest allowed relative error.
        what: a name for the message.
    """
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}\nactual   {actual}\nexpected {expected}"


def assert_groups_close(
    actual: Mapping[str, Tensor | None], expected: Mapping[str, Tensor | None], tol: float, what: str = ""
) -> None:
    """Assert two group trees (flat ``{param_name: groups}``) agree leaf by leaf.

    ``None`` (a skipped parameter) must match ``None``; every tensor leaf is compared with
    :func:`assert_rel_close`, each normalised by its own largest reference value.

    Args:
        actual: the library's group tree.
        expected: the reference group tree.
        tol: the largest allowed relative error per leaf.
        what: a prefix for messages.
    """
    assert set(actual) == set(expected), f"{what}: keys {sorted(actual)} != {sorted(expected)}"
    for name, ref in expected.items():
        got = actual[name]
        if ref is None:
            assert got is None, f"{what}{name}: expected None (skipped), got {got}"
            continue
        assert got is not None, f"{what}{name}: got None, expected groups of shape {tuple(ref.shape)}"
        assert_rel_close(got, ref, tol, f"{what}{name}")


# --- batches and models ---------------------------------------------------------------------------


def take_sample(batch: Any, b: int) -> Any:
    """Sample ``b`` of a tuple / dict / tensor batch, keeping a batch dimension of 1."""
    if isinstance(batch, Tensor):
        return batch[b : b + 1]
    if isinstance(batch, Mapping):
        return {k: take_sample(v, b) for k, v in batch.items()}
    return type(batch)(take_sample(v, b) for v in batch)


def batch_len(batch: Any) -> int:
    """The leading dimension of a batch (of its first tensor)."""
    if isinstance(batch, Tensor):
        return batch.shape[0]
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return batch_len(first)


def cast_batch(batch: Any, dtype: torch.dtype) -> Any:
    """Cast the floating-point tensors of a batch to ``dtype`` (integer ids and masks untouched)."""
    if isinstance(batch, Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: cast_batch(v, dtype) for k, v in batch.items()}
    return type(batch)(cast_batch(v, dtype) for v in batch)


def to_float64(model: nn.Module) -> nn.Module:
    """A float64 deep copy of ``model`` (parameters and floating buffers); the original is untouched."""
    return copy.deepcopy(model).double()


def full_spec(model: nn.Module, spec: Any = None) -> dict[str, ff.Rule]:
    """A flat ``{param_name: rule}`` spec for every parameter of ``model``.

    Args:
        model: the module.
        spec: ``None`` (rules from :func:`fisherfunc.infer_spec`), a single rule (used for every
            parameter), or a dict naming every parameter.
    """
    names = [n for n, _ in model.named_parameters()]
    if spec is None:
        spec = ff.infer_spec(model)
    if isinstance(spec, ff.Rule):
        return {n: spec for n in names}
    assert list(spec) == names or set(spec) == set(names), f"spec {sorted(spec)} must name every parameter {names}"
    return dict(spec)


# --- group sums, by hand --------------------------------------------------------------------------


def _bucket_of_row(rule: ff.Buckets, row: int, num_rows: int) -> int:
    """Bucket of one embedding row: the explicit mapping, or ``⌊row · n / V⌋``."""
    if rule.mapping is not None:
        return rule.mapping[row]
    return (row * rule.num_buckets) // num_rows


def reduce_groups(rule: ff.Rule, g2: Tensor) -> Tensor | None:
    """Sum one sample's squared gradient into the groups a rule describes, with explicit loops.

    Written from the contract (DESIGN.md §2), independently of ``rule.reduce``:

    * ``Channel(axis)``: ``F[c] = Σ g2.select(axis, c)``. With ``groups = G`` (grouped
      ``ConvTranspose``, weight ``[in, out/G, *k]``): output channel ``c = g · (out/G) + j`` is
      the sum of rows ``g · in/G … (g+1) · in/G − 1`` of axis 0 at index ``j`` of ``axis``.
    * ``Heads(h, axis, parts)``: with ``hd = size(axis) / (parts · h)``, block ``(p, hh)`` is
      ``g2.narrow(axis, (p · h + hh) · hd, hd).sum()``; shape ``[h]`` for one part.
    * ``Rows()``: ``F[v] = Σ g2[v]``. ``Buckets``: ``F[k] = Σ_{v: bucket(v) = k} Σ g2[v]``.
    * ``Elementwise()``: ``g2`` itself. ``Whole()``: ``Σ g2``. ``Skip()``: ``None``.

    Args:
        rule: the group rule.
        g2: one sample's squared gradient, the parameter's shape.

    Returns:
        The groups (float64 for a float64 ``g2``), or ``None`` for ``Skip()``.
    """
    if isinstance(rule, ff.Skip):
        return None
    if isinstance(rule, ff.Channel):
        axis = rule.axis % g2.ndim
        if rule.groups == 1:
            return torch.stack([g2.select(axis, c).sum() for c in range(g2.shape[axis])])
        rows = g2.shape[0] // rule.groups
        values = []
        for g in range(rule.groups):
            block = g2.narrow(0, g * rows, rows)  # the input channels of group g
            for j in range(g2.shape[axis]):  # output channel g * (out / G) + j
                values.append(block.select(axis, j).sum())
        return torch.stack(values)
    if isinstance(rule, ff.Heads):
        axis = rule.axis % g2.ndim
        h, parts = rule.num_heads, rule.parts
        hd = g2.shape[axis] // (parts * h)
        assert hd * parts * h == g2.shape[axis]
        blocks = torch.stack(
            [torch.stack([g2.narrow(axis, (p * h + hh) * hd, hd).sum() for hh in range(h)]) for p in range(parts)]
        )
        return blocks[0] if parts == 1 else blocks
    if isinstance(rule, ff.Rows):
        return torch.stack([g2[v].sum() for v in range(g2.shape[0])])
    if isinstance(rule, ff.Buckets):
        out = g2.new_zeros(rule.num_buckets)
        for v in range(g2.shape[0]):
            k = _bucket_of_row(rule, v, g2.shape[0])
            out[k] = out[k] + g2[v].sum()
        return out
    if isinstance(rule, ff.Elementwise):
        return g2.clone()
    if isinstance(rule, ff.Whole):
        return g2.sum()
    raise TypeError(f"the reference does not know rule {rule!r}")


# --- the naive per-sample loop --------------------------------------------------------------------


def per_sample_squared_grads(
    model: nn.Module, batch: Any, sample_loss: SampleLoss, names: Sequence[str] | None = None
) -> tuple[list[dict[str, Tensor]], list[float]]:
    """Squared per-sample gradients by a plain Python loop with ``torch.autograd.grad``.

    Args:
        model: the module, called directly on each one-sample slice.
        batch: a tuple / dict / tensor batch with a leading batch dimension.
        sample_loss: ``(model, one_sample_batch) -> (loss_sum, num_tokens)``.
        names: the parameters to differentiate (default: all of ``named_parameters()``).
            Parameters not named are not differentiated.

    Returns:
        ``(squares, tokens)``: for each sample ``{name: g_b ⊙ g_b}`` (a parameter that does not
        reach the loss gets zeros) and its token count ``n_b``.
    """
    named = dict(model.named_parameters())
    names = list(named) if names is None else list(names)
    params = [named[n] for n in names]
    squares, tokens = [], []
    for b in range(batch_len(batch)):
        loss, n = sample_loss(model, take_sample(batch, b))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        squares.append(
            {
                name: (torch.zeros_like(p) if g is None else g.detach().square())
                for name, p, g in zip(names, params, grads, strict=True)
            }
        )
        tokens.append(float(n))
    return squares, tokens


def reference_per_sample(
    model: nn.Module, batch: Any, sample_loss: SampleLoss, spec: Any = None
) -> tuple[dict[str, Tensor | None], Tensor]:
    """Per-sample group Fisher ``reduce(g_b ⊙ g_b)`` (not divided by tokens) and ``n_b``.

    Args:
        model: the module (use a float64 copy for a float64 reference).
        batch: one batch.
        sample_loss: the reference per-sample loss.
        spec: ``None`` (infer), a rule, or a flat dict of rules (see :func:`full_spec`).

    Returns:
        ``(groups, tokens)``: ``groups[name]`` is ``[B, *group_shape]`` (``None`` for ``Skip()``),
        ``tokens`` is ``[B]`` (float64).
    """
    rules = full_spec(model, spec)
    active = [n for n, r in rules.items() if not isinstance(r, ff.Skip)]
    squares, tokens = per_sample_squared_grads(model, batch, sample_loss, active)
    groups: dict[str, Tensor | None] = {n: None for n in rules}
    for name in active:
        groups[name] = torch.stack([reduce_groups(rules[name], s[name]) for s in squares])
    return groups, torch.tensor(tokens, dtype=torch.float64)


def reference_fisher(
    model: nn.Module, batches: Any | Iterable[Any], sample_loss: SampleLoss, spec: Any = None
) -> dict[str, Tensor | None]:
    """Token-normalised group Fisher ``Σ_b reduce(g_b ⊙ g_b) / Σ_b n_b`` over every batch.

    Args:
        model: the module (use a float64 copy for a float64 reference).
        batches: one tuple / dict batch, or a list of them.
        sample_loss: the reference per-sample loss.
        spec: ``None`` (infer), a rule, or a flat dict of rules.

    Returns:
        ``{name: groups}`` with ``None`` for skipped parameters.
    """
    if isinstance(batches, (tuple, Mapping, Tensor)):
        batches = [batches]
    sums: dict[str, Tensor | None] = {}
    total = 0.0
    for batch in batches:
        groups, tokens = reference_per_sample(model, batch, sample_loss, spec)
        for name, g in groups.items():
            part = None if g is None else g.sum(0)
            prev = sums.get(name)
            sums[name] = part if prev is None else prev + part
        total += float(tokens.sum())
    assert total > 0, "the reference batch has no tokens"
    return {n: (None if s is None else s / total) for n, s in sums.items()}


# --- per-sample losses, by hand -------------------------------------------------------------------


def cross_entropy_sum(logits: Tensor, target: Tensor) -> tuple[Tensor, float]:
    """One label per example: ``L = −log softmax(z)[y]`` summed over the (single) sample, ``n = 1``.

    Args:
        logits: ``[1, C]``.
        target: ``[1]`` class index.
    """
    return F.cross_entropy(logits, target, reduction="sum"), 1.0


def _valid_positions(labels: Tensor, mask: Tensor | None, ignore_index: int) -> list[int]:
    """Positions ``t`` with ``mask[t] != 0`` and ``labels[t] != ignore_index``, by a Python loop."""
    return [t for t in range(labels.shape[0]) if int(labels[t]) != ignore_index and (mask is None or int(mask[t]) != 0)]


def token_cross_entropy(
    logits: Tensor, labels: Tensor, mask: Tensor | None = None, ignore_index: int = -100
) -> tuple[Tensor, float]:
    """Cross-entropy summed over one sequence's real, non-ignored tokens.

    Padding and ``ignore_index`` are dropped by selecting the valid positions by hand, and the loss
    of the remaining ones is ``F.cross_entropy(..., reduction="sum")``.

    Args:
        logits: ``[1, T, C]`` (one sample).
        labels: ``[1, T]``.
        mask: ``[1, T]`` padding mask (nonzero = real token), or ``None``.
        ignore_index: label value to skip.

    Returns:
        ``(loss_sum, n)`` with ``n`` the number of valid positions.
    """
    keep = _valid_positions(labels[0], None if mask is None else mask[0], ignore_index)
    index = torch.tensor(keep, dtype=torch.long)
    loss = F.cross_entropy(logits[0].index_select(0, index), labels[0].index_select(0, index), reduction="sum")
    return loss, float(len(keep))


def causal_cross_entropy(
    logits: Tensor, labels: Tensor, mask: Tensor | None = None, ignore_index: int = -100
) -> tuple[Tensor, float]:
    """Next-token cross-entropy: logits at position ``t`` against the label at ``t + 1``.

    Args:
        logits: ``[1, T, C]``.
        labels: ``[1, T]`` unshifted token ids (may hold ``ignore_index``).
        mask: ``[1, T]`` padding mask of the *labels* (a zero at ``t + 1`` drops that target).
        ignore_index: label value to skip.
    """
    shifted_mask = None if mask is None else mask[:, 1:]
    return token_cross_entropy(logits[:, :-1], labels[:, 1:], shifted_mask, ignore_index)


def gaussian_nll_sum(pred: Tensor, target: Tensor, variance: float) -> tuple[Tensor, float]:
    """Squared error of one sample as a Gaussian NLL: ``Σ_k (f_k − y_k)² / (2σ²)``, ``n = 1``."""
    return ((pred - target) ** 2).sum() / (2.0 * variance), 1.0


def count_tokens(labels: Tensor, mask: Tensor | None, ignore_index: int = -100, shift: bool = False) -> list[int]:
    """Tokens per sample of a ``[B, T]`` batch, counted position by position.

    Args:
        labels: ``[B, T]`` labels.
        mask: ``[B, T]`` padding mask or ``None``.
        ignore_index: label value that does not count.
        shift: count next-token targets (positions ``1 … T−1``), as a causal LM does.
    """
    counts = []
    for b in range(labels.shape[0]):
        start = 1 if shift else 0
        n = 0
        for t in range(start, labels.shape[1]):
            if int(labels[b, t]) != ignore_index and (mask is None or int(mask[b, t]) != 0):
                n += 1
        counts.append(n)
    return counts
