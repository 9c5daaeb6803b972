"""Fixtures shared by the separator's tests: tiny untrained demucs models, run on one thread."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stemflow_dev.models import make_tiny_repo


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny htdemucs, htdemucs_6s and htdemucs_ft, made once per test session."""
    return make_tiny_repo(tmp_path_factory.mktemp("models"))


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine their barriers cost 5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
