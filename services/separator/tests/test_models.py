import shutil
import threading
from pathlib import Path

import pytest
from demucs.apply import BagOfModels

from separator.models import ModelCache, ModelError, load_model
from stemflow_dev.models import make_production_htdemucs, make_tiny_repo

FOUR = ("drums", "bass", "other", "vocals")
SIX = (*FOUR, "guitar", "piano")


@pytest.mark.parametrize(
    ("name", "sources", "bag_size"),
    [("htdemucs", FOUR, 1), ("htdemucs_6s", SIX, 1), ("htdemucs_ft", FOUR, 4)],
)
def test_tiny_models_load_through_demucs_repo(tiny_repo: Path, name: str, sources: tuple, bag_size: int) -> None:
    loaded = load_model(name, tiny_repo)

    assert loaded.name == name
    assert loaded.sources == sources
    assert (loaded.samplerate, loaded.audio_channels) == (44100, 2)
    assert loaded.untrained is True
    assert isinstance(loaded.model, BagOfModels)
    assert len(loaded.model.models) == bag_size
    assert not any(module.training for module in loaded.model.modules())


def test_unknown_name_is_model_unknown(tiny_repo: Path) -> None:
    with pytest.raises(ModelError) as raised:
        load_model("htdemucs_nope", tiny_repo)
    assert raised.value.code == "model_unknown"


def test_names_missing_from_the_demucs_remote_are_unknown_without_a_download() -> None:
    with pytest.raises(ModelError) as raised:
        load_model("htdemucs_nope", None)
    assert raised.value.code == "model_unknown"


def test_missing_repo_is_model_load_failed(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as raised:
        load_model("htdemucs", tmp_path / "absent")
    assert raised.value.code == "model_load_failed"


def test_corrupt_weights_are_model_load_failed(tiny_repo: Path, tmp_path: Path) -> None:
    repo = Path(shutil.copytree(tiny_repo, tmp_path / "repo"))
    signature = (repo / "htdemucs.yaml").read_text().split()[-1]
    package = next(repo.glob(f"{signature}-*.th"))
    package.write_bytes(package.read_bytes()[:-10])

    with pytest.raises(ModelError) as raised:
        load_model("htdemucs", repo)
    assert raised.value.code == "model_load_failed"


def test_models_without_the_marker_count_as_trained(tiny_repo: Path, tmp_path: Path) -> None:
    repo = Path(shutil.copytree(tiny_repo, tmp_path / "repo"))
    (repo / "UNTRAINED").unlink()

    assert load_model("htdemucs", repo).untrained is False


def test_make_tiny_repo_leaves_an_existing_repo_alone(tiny_repo: Path) -> None:
    before = {path.name: path.stat().st_mtime_ns for path in tiny_repo.iterdir()}

    make_tiny_repo(tiny_repo)

    assert {path.name: path.stat().st_mtime_ns for path in tiny_repo.iterdir()} == before


def test_cache_hands_every_thread_the_same_model(tiny_repo: Path) -> None:
    cache = ModelCache(tiny_repo, "cpu")
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("htdemucs"))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 6
    assert all(result is results[0] for result in results)
    assert cache.get("htdemucs_6s") is not results[0]


def test_cache_does_not_remember_failures(tiny_repo: Path) -> None:
    cache = ModelCache(tiny_repo, "cpu")
    for _ in range(2):
        with pytest.raises(ModelError):
            cache.get("htdemucs_nope")


def test_production_architecture_matches_the_release() -> None:
    model = make_production_htdemucs()

    assert sum(parameter.numel() for parameter in model.parameters()) == 41_984_456
    assert model.sources == list(FOUR)
    assert not model.training
