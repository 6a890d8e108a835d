"""Pictures of group Fisher: heads heatmaps, channel profiles, per-sample distributions, task comparisons.

Every function takes group trees (from :func:`~fisherfunc.fisher`, :func:`~fisherfunc.estimate`, or a
:class:`~fisherfunc.FisherState`, whose bias-corrected estimate is used) or per-sample results, and
returns a ``matplotlib.figure.Figure`` with a title, labelled axes and, where colour encodes a value,
a colour bar. Nothing is shown or saved: call ``fig.savefig("heads.png")``.

matplotlib is an optional extra (``pip install "fisherfunc[plot]"``); it is imported when a function
is called, with an :class:`ImportError` naming the extra if it is missing.

    >>> import torch, fisherfunc as ff, fisherfunc.plot as fplot   # doctest: +SKIP
    >>> fig = fplot.channel_profiles(ff.estimate(state))           # doctest: +SKIP
    >>> fig.savefig("channels.png")                                # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import optree
import torch
from torch import Tensor

from ._estimate import PerSampleFisher
from ._naming import path_name
from ._spec.resolve import named_rules
from ._spec.rules import Channel, Heads
from ._state.state import FisherState, estimate
from .heads import HeadImportance, head_importance

__all__ = ["heads_heatmap", "head_matrix", "channel_profiles", "per_sample_distribution", "compare_tasks"]

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _pyplot() -> Any:
    """``matplotlib.pyplot``, or an ImportError that names the extra to install."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            'fisherfunc.plot needs matplotlib: pip install "fisherfunc[plot]" (or pip install matplotlib)'
        ) from err
    return plt


def _flat(tree: Any) -> dict[str, Tensor]:
    """``{dotted name: float32 CPU tensor}`` of a group tree or a state's estimate (``None`` leaves dropped)."""
    if isinstance(tree, FisherState):
        tree = estimate(tree)
    if isinstance(tree, Tensor):
        return {"<root>": tree.detach().float().cpu()}
    paths, values, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    return {path_name(p): v.detach().float().cpu() for p, v in zip(paths, values) if v is not None}


def _rules(spec: Any, names: Sequence[str]) -> dict[str, Any]:
    """``{dotted name: rule}`` of a rule tree with the same structure as the group tree."""
    if isinstance(spec, FisherState):
        spec = spec.spec
    return {name: rule for name, rule in named_rules(spec).items() if name in names}


def head_matrix(groups: Any, spec: Any = None) -> tuple[Tensor, list[str]]:
    """Per-head Fisher as a ``[layers, heads]`` matrix, summed over each layer's head-ruled parameters.

    A head's Fisher is the sum over the parameters with a :class:`~fisherfunc.Heads` rule in its
    layer (Q, K, V rows, the output projection's columns, all parts of a fused QKV):
    ``H[l, h] = Σ_{p ∈ layer l} Σ_{parts} F_p[..., h]``. The layer of a parameter is the first
    integer in its dotted name (``bert.encoder.layer.3.attention...`` → 3).

    Args:
        groups: a group tree, or a :class:`~fisherfunc.FisherState` (then ``spec`` is its own).
        spec: the rule tree that made ``groups`` (needed unless ``groups`` is a state).

    Returns:
        ``(matrix [layers, heads], layer labels)``; layers in numeric order.

    Raises:
        ValueError: if no parameter has a ``Heads`` rule, or layers have different head counts
            (grouped-query attention: use :func:`fisherfunc.head_importance` with the model, which
            knows which key-value head each query head reads).
    """
    if spec is None and isinstance(groups, FisherState):
        spec = groups.spec
    if spec is None:
        raise ValueError("head_matrix needs spec= (the rules that made the group tree) to find the heads")
    flat = _flat(groups)
    rules = _rules(spec, list(flat))
    layers: dict[int, Tensor] = {}
    for name, value in flat.items():
        rule = rules.get(name)
        if not isinstance(rule, Heads):
            continue
        match = _LAYER.search(name)
        layer = int(match.group(1)) if match else 0
        per_head = value.reshape(-1, value.shape[-1]).sum(0)  # sum the parts of a fused QKV
        if layer in layers and layers[layer].shape != per_head.shape:
            raise ValueError(
                f"layer {layer} has parameters with different head counts ({name!r}), as grouped-query attention "
                "does: pass model= to heads_heatmap (or use fisherfunc.head_importance(groups, model)), which "
                "knows which key-value head each query head reads"
            )
        layers[layer] = layers.get(layer, torch.zeros_like(per_head)) + per_head
    if not layers:
        raise ValueError("no parameter has a Heads rule: nothing to draw as a heads heatmap")
    counts = {v.numel() for v in layers.values()}
    if len(counts) > 1:
        raise ValueError(f"layers have different head counts {sorted(counts)}; cannot stack them")
    order = sorted(layers)
    return torch.stack([layers[i] for i in order]), [str(i) for i in order]


def heads_heatmap(
    groups: Any,
    spec: Any = None,
    *,
    model: Any = None,
    attention: str = "self",
    title: str = "Per-head Fisher (Q, K, V and output weights of each head)",
    log: bool = True,
    cmap: str = "viridis",
    annotate: bool | None = None,
) -> Any:
    """A layers × heads heatmap of per-head Fisher, with a colour bar.

    Args:
        groups: a :class:`~fisherfunc.HeadImportance`, a ``[layers, heads]`` tensor, or a group tree
            or :class:`~fisherfunc.FisherState` — with ``model=`` reduced by
            :func:`fisherfunc.head_importance` (any supported layout, grouped-query attention
            included), without it by :func:`head_matrix`.
        spec: the rule tree that made ``groups`` (trees without ``model`` only).
        model: the model the Fisher is of (for :func:`fisherfunc.head_importance`).
        attention: ``"self"`` or ``"cross"``, with ``model``.
        title: the figure title.
        log: colour by ``log10`` of the Fisher (values span orders of magnitude).
        cmap: a matplotlib colour map.
        annotate: write each cell's value in it (default: up to 144 cells).

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    plt = _pyplot()
    if model is not None and not isinstance(groups, (HeadImportance, Tensor)):
        groups = head_importance(groups, model, attention=attention)
    if isinstance(groups, HeadImportance):
        matrix, labels = groups.matrix.float(), [str(i) for i in range(groups.matrix.shape[0])]
        if groups.kv_heads != groups.heads:
            title += f"\n({groups.heads} query heads share {groups.kv_heads} key-value heads: K, V split evenly)"
    elif isinstance(groups, Tensor) and groups.dim() == 2:
        matrix, labels = groups.detach().float().cpu(), [str(i) for i in range(groups.shape[0])]
    else:
        matrix, labels = head_matrix(groups, spec)
    layers, heads = matrix.shape
    shown = torch.log10(matrix.clamp_min(torch.finfo(torch.float32).tiny)) if log else matrix
    fig, ax = plt.subplots(figsize=(max(5.5, 0.75 * heads + 2.5), max(3.2, 0.45 * layers + 1.8)), layout="constrained")
    image = ax.imshow(shown.numpy(), aspect="auto", cmap=cmap, interpolation="nearest")
    if annotate is None:
        annotate = layers * heads <= 144
    if annotate:  # the value in each cell, dark text on light cells
        middle = (shown.max() + shown.min()).item() / 2
        for i in range(layers):
            for j in range(heads):
                colour = "black" if shown[i, j].item() > middle else "white"
                ax.text(j, i, f"{matrix[i, j].item():.1e}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers), labels=labels)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="log10 Fisher per token" if log else "Fisher per token")
    return fig


def channel_profiles(
    groups: Any,
    *,
    names: Sequence[str] | None = None,
    title: str = "Per-channel Fisher, sorted",
    log: bool = True,
    relative: bool | None = None,
) -> Any:
    """Each layer's channel Fisher sorted from most to least important, one line per layer.

    A flat profile means the channels matter equally; a steep drop means a few carry the layer,
    and the tail is what pruning by Fisher would remove first.

    Args:
        groups: a group tree or a :class:`~fisherfunc.FisherState`; 1-D leaves are drawn.
        names: the dotted parameter names to draw (default: every 1-D leaf with more than one group).
        title: the figure title.
        log: a logarithmic Fisher axis (zeros cannot be shown; the legend counts them).
        relative: x axis as rank / number of channels, so layers of different widths line up
            (default: when the layers' widths differ).

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: if there is nothing to draw, or a name is not a 1-D leaf.
    """
    plt = _pyplot()
    flat = _flat(groups)
    chosen = [n for n, v in flat.items() if v.dim() == 1 and v.numel() > 1] if names is None else list(names)
    for name in chosen:
        if name not in flat or flat[name].dim() != 1:
            raise ValueError(f"{name!r} is not a 1-D group leaf (have: {', '.join(flat)})")
    if not chosen:
        raise ValueError("no 1-D group leaves (per-channel Fisher) to draw")
    if relative is None:
        relative = len({flat[n].numel() for n in chosen}) > 1
    fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
    for name in chosen:
        values = torch.sort(flat[name], descending=True).values
        zeros = int((values <= 0).sum()) if log else 0
        shown = values[: values.numel() - zeros]  # log axes cannot show zeros: counted in the legend
        label = f"{name} ({values.numel()}" + (f", {zeros} zero)" if zeros else ")")
        x = (torch.arange(shown.numel()) + 0.5) / values.numel() if relative else torch.arange(1, shown.numel() + 1)
        ax.plot(x.numpy(), shown.numpy(), marker="." if values.numel() <= 128 else None, markersize=3, label=label)
    if log:
        ax.set_yscale("log")
    if relative:
        ax.set_xlim(0, 1)
        ax.set_xlabel("channel rank as a fraction of the layer's channels (0 = most important)")
    else:
        ax.set_xlabel("channel rank (1 = most important)")
    ax.set_ylabel("Fisher per token")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(
        fontsize="small",
        title="parameter (channels)",
        title_fontsize="small",
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
    )
    return fig


def per_sample_totals(result: PerSampleFisher | Tensor, *, normalise: bool = True) -> Tensor:
    """Each sample's total Fisher ``Σ_groups s_b`` (over all parameters), per token if ``normalise``.

    Args:
        result: a :class:`~fisherfunc.PerSampleFisher`, or a ``[B]`` tensor of totals.
        normalise: divide by the sample's token count ``n_b``.

    Returns:
        A ``[B]`` float32 tensor.
    """
    if isinstance(result, Tensor):
        return result.detach().float().cpu().reshape(-1)
    leaves = [v.detach().float().cpu() for v in optree.tree_leaves(result.groups) if v is not None]
    total = sum(v.reshape(v.shape[0], -1).sum(1) for v in leaves)
    if not isinstance(total, Tensor):
        raise ValueError("the per-sample result has no groups")
    return total / result.tokens.float().cpu().clamp_min(1) if normalise else total


def per_sample_distribution(
    result: PerSampleFisher | Tensor, *, title: str = "Distribution of per-sample Fisher", bins: int = 40
) -> Any:
    """How Fisher is spread over examples: a histogram of per-sample totals and their concentration curve.

    Left: a histogram of ``log10`` per-sample Fisher (total over all groups, per token). Right: the
    share of the batch's total Fisher carried by the top fraction of samples (a Lorenz-style curve;
    the diagonal is an even spread).

    Args:
        result: a :class:`~fisherfunc.PerSampleFisher` or a ``[B]`` tensor of per-sample totals.
        title: the figure title.
        bins: histogram bins.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    plt = _pyplot()
    totals = per_sample_totals(result)
    if totals.numel() == 0:
        raise ValueError("no samples to draw")
    logs = torch.log10(totals.clamp_min(torch.finfo(torch.float32).tiny))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    left.hist(logs.numpy(), bins=bins, color="tab:blue", alpha=0.85)
    left.set_xlabel("log10 per-sample Fisher (sum over groups, per token)")
    left.set_ylabel("number of samples")
    left.set_title("histogram")
    share = torch.cumsum(torch.sort(totals, descending=True).values, 0) / totals.sum().clamp_min(1e-30)
    fraction = torch.arange(1, totals.numel() + 1) / totals.numel()
    right.plot(torch.cat([torch.zeros(1), fraction]).numpy(), torch.cat([torch.zeros(1), share]).numpy(), lw=2)
    right.plot([0, 1], [0, 1], ls="--", color="grey", label="even spread")
    top = max(1, math.ceil(0.1 * totals.numel()))
    right.annotate(
        f"top 10% of samples: {100 * share[top - 1].item():.0f}% of Fisher",
        xy=(fraction[top - 1].item(), share[top - 1].item()),
        xytext=(0.3, 0.25),
        arrowprops={"arrowstyle": "->"},
    )
    right.set_xlabel("fraction of samples (most Fisher first)")
    right.set_ylabel("share of total Fisher")
    right.set_title("concentration")
    right.legend(loc="lower right", fontsize="small")
    fig.suptitle(f"{title} ({totals.numel()} samples)")
    return fig


def compare_tasks(
    a: Any,
    b: Any,
    *,
    labels: tuple[str, str] = ("task A", "task B"),
    title: str = "Group Fisher of two tasks",
) -> Any:
    """A log-log scatter of two tasks' group importances, one point per group, coloured by parameter.

    Points on the diagonal matter equally to both tasks; far above it, a group matters more to
    task B (what EWC protects, or Fisher merging weights towards B). Groups with zero Fisher in
    either tree cannot be placed on log axes; the title counts them.

    Args:
        a: the first task's group tree or :class:`~fisherfunc.FisherState`.
        b: the second's, with the same structure and shapes.
        labels: the tasks' names, for the axes.
        title: the figure title.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: if the trees' parameters or shapes differ.
    """
    plt = _pyplot()
    fa, fb = _flat(a), _flat(b)
    if list(fa) != list(fb):
        raise ValueError(f"the two trees have different parameters: {sorted(set(fa) ^ set(fb))}")
    fig, ax = plt.subplots(figsize=(7.5, 5.2), layout="constrained")
    lo, hi, hidden = math.inf, 0.0, 0
    for name in fa:
        if fa[name].shape != fb[name].shape:
            raise ValueError(
                f"{name!r} has shape {tuple(fa[name].shape)} in one tree, {tuple(fb[name].shape)} in the other"
            )
        x, y = fa[name].reshape(-1), fb[name].reshape(-1)
        keep = (x > 0) & (y > 0)  # log axes cannot show zeros: counted in the title instead
        hidden += int((~keep).sum())
        x, y = x[keep], y[keep]
        ax.scatter(x.numpy(), y.numpy(), s=10, alpha=0.7, label=name)
        if keep.any():
            lo, hi = min(lo, x.min().item(), y.min().item()), max(hi, x.max().item(), y.max().item())
    if hi > 0:
        ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1, label="equal")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"Fisher per token, {labels[0]}")
    ax.set_ylabel(f"Fisher per token, {labels[1]}")
    ax.set_title(title + (f"\n({hidden} groups with zero Fisher not shown)" if hidden else ""))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="x-small", title="parameter", title_fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def figures_for_state(state: FisherState, *, model: Any = None) -> dict[str, Any]:
    """The standard figures for one state: channel profiles, and a heads heatmap if it has heads.

    Args:
        state: the state.
        model: the model the state is of; with it the heatmap is :func:`fisherfunc.head_importance`'s
            matrix (grouped-query attention included), without it :func:`head_matrix`'s.

    Returns:
        ``{file stem: Figure}``.
    """
    out: dict[str, Any] = {}
    rules = _rules(state.spec, list(_flat(state)))
    if any(isinstance(r, Heads) for r in rules.values()):
        heads: Any = state
        if model is not None:
            try:
                heads = head_importance(state, model)
            except ValueError:  # no head-grouped attention module: the names' layers
                heads = state
        out["heads"] = heads_heatmap(heads)
    flat = _flat(state)
    channel_names = [n for n, v in flat.items() if v.dim() == 1 and v.numel() > 1 and isinstance(rules.get(n), Channel)]
    if channel_names:
        # many layers make an unreadable legend: draw at most 8, the largest first
        weights = [n for n in channel_names if n.endswith("weight")]
        channel_names = sorted(weights or channel_names, key=lambda n: -flat[n].numel())[:8]
        out["channels"] = channel_profiles(state, names=sorted(channel_names))
    return out
