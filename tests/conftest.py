"""Shared pytest setup: the real-service fixtures (mosquitto, SeaweedFS) are a plugin; one torch thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest_plugins = ["conftest_services"]


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models on a busy 2-core machine: two torch threads are several times slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
