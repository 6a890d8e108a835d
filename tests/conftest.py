"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module's tiny models on one intra-op thread, restoring the setting afterwards.

    Their ops take microseconds; with two OpenMP threads on a shared 2-core machine, thread
    hand-off dominates (grouped convolutions ran 50× slower), with no effect on the values.
    Use it in a module with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
