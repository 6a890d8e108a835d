"""The README's code runs as written (with a small data stream standing in for ``loader``)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_loop_and_the_fresh_machine_commands() -> None:
    text = README.read_text()
    first_screen = "\n".join(text.splitlines()[:25])
    assert "pip install" in first_screen and "python -m pytest" in first_screen
    assert "state = fisher_step(params, (x, y), state)" in text


def test_readme_python_blocks_run() -> None:
    blocks = _python_blocks()
    assert len(blocks) >= 2
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(3)]
    namespace: dict = {"loader": loader}
    exec(blocks[0], namespace)  # the loop: defines model, loss, spec, params, state
    state = namespace["state"]
    assert state.step == 3 and state.samples == 48
    assert namespace["importance"]["0.weight"].shape == (64,)
    assert "mnist|0.weight|channel" in namespace["flat"]
    namespace.update(batches=loader, batch=loader[0])
    exec(blocks[1], namespace)  # one-shot, per-sample and accumulators (it asserts internally)
    acc = namespace["acc"]
    assert acc.samples == 48 and acc.tokens == 48.0
