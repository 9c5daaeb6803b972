"""Fixtures shared by the separator's tests: tiny untrained demucs models, run on one thread."""

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from demucs.apply import apply_model

from separator.mix import ArraySource, normalisation
from separator.models import LoadedModel
from stemflow_dev.models import make_tiny_repo

Reference = Callable[..., dict[str, np.ndarray]]
# The presets' apply_model settings, written out here so a change to the code's table shows.
PRESETS = {"fast": (0, 0.1), "balanced": (0, 0.25), "best": (2, 0.5)}


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny htdemucs, htdemucs_6s and htdemucs_ft, made once per test session."""
    return make_tiny_repo(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where workers made by the tests cache exported networks: each tiny model is exported once a session."""
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine their barriers cost 5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def apply_model_reference(model: LoadedModel, mix: np.ndarray, quality: str, seed: int = 0) -> dict[str, np.ndarray]:
    """demucs' own apply_model on the whole mix in memory, normalised as the separator does, shifts seeded alike."""
    shifts, overlap = PRESETS[quality]
    mean, std = normalisation(ArraySource(mix, model.samplerate))
    random.seed(seed)
    with torch.no_grad():
        out = apply_model(
            model.model,
            ((torch.from_numpy(mix) - mean) / std)[None],
            shifts=shifts,
            overlap=overlap,
        )
    return {name: (source * std + mean).numpy() for name, source in zip(model.sources, out[0], strict=True)}


@pytest.fixture(scope="session")
def reference() -> Reference:
    """apply_model_reference: what the separator must equal."""
    return apply_model_reference
