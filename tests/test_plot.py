"""fisherfunc.plot: every function returns a titled, labelled Figure that saves as a PNG."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fisherfunc as ff
from fisherfunc.testing import cases

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fisherfunc import plot  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def saved(fig, path: Path) -> bytes:
    fig.savefig(path)
    plt.close(fig)
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 2000
    return data


def labelled(ax) -> None:
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def mha_model() -> tuple[torch.nn.Module, dict, ff.PerSampleFisher]:
    """Three residual ``nn.MultiheadAttention`` layers (4 heads each) and a head, on 12 sequences."""
    case = cases.case(
        "attention_classifier", block="mha", layers=3, dim=8, heads=4, classes=5, seq_len=6, batch=12,
        dtype=torch.float32,
    )  # fmt: skip
    loss, batch = case.loss, case.batch
    params = {k: v.detach() for k, v in case.params.items()}
    state = ff.make_fisher_step(loss, decay=0.5).init(params)
    state = ff.make_fisher_step(loss, decay=0.5)(params, batch, state)
    return case.model, state, ff.per_sample_fisher(loss, params, batch)


def test_head_matrix_sums_each_layers_head_parameters() -> None:
    model, state, _ = mha_model()
    matrix, labels = plot.head_matrix(state)
    assert matrix.shape == (3, 4) and labels == ["0", "1", "2"]
    F = ff.estimate(state)
    assert isinstance(state.spec["layers.1.in_proj_bias"], ff.Heads)
    assert not isinstance(state.spec["layers.1.out_proj.bias"], ff.Heads)
    qkv = F["layers.1.in_proj_weight"].sum(0) + F["layers.1.in_proj_bias"].sum(0)
    expected = qkv + F["layers.1.out_proj.weight"]
    torch.testing.assert_close(matrix[1], expected)
    with pytest.raises(ValueError, match="no parameter has a Heads rule"):
        plot.head_matrix({"w": torch.ones(3)}, {"w": ff.Channel()})
    with pytest.raises(ValueError, match="spec="):
        plot.head_matrix({"w": torch.ones(3)})


def test_heads_heatmap_from_a_state_and_from_a_matrix(tmp_path: Path) -> None:
    _, state, _ = mha_model()
    fig = plot.heads_heatmap(state)
    ax = fig.axes[0]
    labelled(ax)
    assert ax.get_xlabel() == "head" and ax.get_ylabel() == "layer"
    assert len(fig.axes) == 2 and "Fisher" in fig.axes[1].get_ylabel()  # the colour bar
    assert len(ax.texts) == 12  # one value per cell
    saved(fig, tmp_path / "heads.png")
    fig = plot.heads_heatmap(torch.rand(2, 3), title="mine", log=False, annotate=False)
    assert fig.axes[0].get_title() == "mine" and not fig.axes[0].texts
    saved(fig, tmp_path / "heads2.png")


def test_channel_profiles_sorts_each_layer_and_counts_zeros(tmp_path: Path) -> None:
    tree = {
        "a.weight": torch.tensor([0.1, 3.0, 0.0, 1.0]),
        "b.weight": torch.tensor([2.0, 0.5]),
        "s": torch.tensor(1.0),
    }
    fig = plot.channel_profiles(tree)
    ax = fig.axes[0]
    labelled(ax)
    lines = ax.get_lines()
    assert len(lines) == 2
    assert list(lines[0].get_ydata()) == pytest.approx([3.0, 1.0, 0.1])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["a.weight (4, 1 zero)", "b.weight (2)"]
    assert ax.get_xlim() == (0, 1)  # widths differ: relative ranks
    saved(fig, tmp_path / "channels.png")
    with pytest.raises(ValueError, match="not a 1-D group leaf"):
        plot.channel_profiles(tree, names=["s"])


def test_per_sample_distribution_shows_the_concentration(tmp_path: Path) -> None:
    _, _, ps = mha_model()
    totals = plot.per_sample_totals(ps)
    assert totals.shape == (12,)
    manual = sum(v.reshape(12, -1).sum(1) for v in ps.groups.values() if v is not None) / ps.tokens
    torch.testing.assert_close(totals, manual.float())
    fig = plot.per_sample_distribution(ps)
    assert "12 samples" in fig._suptitle.get_text()
    for ax in fig.axes:
        labelled(ax)
    curve = fig.axes[1].get_lines()[0].get_ydata()
    assert curve[0] == 0 and curve[-1] == pytest.approx(1.0) and all(b >= a for a, b in zip(curve, curve[1:]))
    saved(fig, tmp_path / "per_sample.png")
    fig = plot.per_sample_distribution(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert fig.axes[1].get_lines()[0].get_ydata()[2] == pytest.approx(0.5)  # even spread: half at half
    plt.close(fig)


def test_compare_tasks_scatters_every_group(tmp_path: Path) -> None:
    a = {"x.weight": torch.tensor([1.0, 2.0, 3.0]), "y.weight": torch.tensor([[1e-3, 1e-2]])}
    b = {"x.weight": torch.tensor([2.0, 1.0, 3.0]), "y.weight": torch.tensor([[1e-4, 1e-2]])}
    fig = plot.compare_tasks(a, b, labels=("math", "code"))
    ax = fig.axes[0]
    labelled(ax)
    assert "math" in ax.get_xlabel() and "code" in ax.get_ylabel()
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert sum(len(c.get_offsets()) for c in ax.collections) == 5
    saved(fig, tmp_path / "compare.png")
    fig = plot.compare_tasks({"w": torch.tensor([0.0, 1.0, 2.0])}, {"w": torch.tensor([1.0, 0.0, 2.0])})
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == 1
    assert "2 groups with zero Fisher not shown" in fig.axes[0].get_title()
    plt.close(fig)
    with pytest.raises(ValueError, match="different parameters"):
        plot.compare_tasks(a, {"x.weight": a["x.weight"]})
    with pytest.raises(ValueError, match="shape"):
        plot.compare_tasks(a, {**b, "x.weight": torch.ones(2)})
