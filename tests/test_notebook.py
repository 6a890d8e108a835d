"""examples/per_sample_fisher.ipynb runs top to bottom (its code cells, in order, in one namespace)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "per_sample_fisher.ipynb"


def code_cells(path: Path) -> list[str]:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    for cell in cells:  # committed with outputs cleared
        assert cell["outputs"] == [] and cell["execution_count"] is None
    return ["".join(c["source"]) for c in cells]


def test_the_notebook_runs_and_finds_what_it_says() -> None:
    import matplotlib.pyplot as plt

    namespace: dict = {"__name__": "__notebook__"}
    cells = code_cells(NOTEBOOK)
    assert len(cells) >= 5
    try:
        for i, source in enumerate(cells):
            exec(compile(source, f"{NOTEBOOK.name}[cell {i}]", "exec"), namespace)
        for name in ("fig_distribution", "fig_channels", "fig_kinds", "fig_ema", "fig_tasks", "fig_heads"):
            assert namespace[name].axes and namespace[name].axes[0].get_title()
    finally:
        plt.close("all")
    assert namespace["held_out_accuracy"] > 0.8
    # the empirical Fisher concentrates on the mistakes, the true Fisher much less
    assert 0.3 < namespace["top_share"] <= 1.0
    assert namespace["wrong_share"] > 0.5
    assert namespace["wrong_share_exact"] < namespace["wrong_share"] - 0.1
    assert namespace["rho"] > 0.5
    # attention heads: per-example matrices sum to the batch's, and the model learned the task
    assert namespace["heads_accuracy"] > 0.8
    assert namespace["per_example"].shape == (len(namespace["held_out"][1]), 2, 4)
    assert namespace["consistent"] and bool((namespace["imp"].matrix > 0).all())
    layers = namespace["imp"].matrix.sum(1)  # what the text says: the layers differ by about 10x,
    assert float(layers.max() / layers.min()) > 5  # and the overall top head is top for a minority
    assert namespace["agree"] < 0.5
    errors = namespace["ema_errors"]
    assert list(errors) == [0.0, 0.5, 0.9, 0.99]
    assert errors[0.99] < errors[0.0]
