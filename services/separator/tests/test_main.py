import shutil
from pathlib import Path

import pytest

from separator.engine import SegmentEngine
from separator.main import preload
from separator.models import ModelCache
from separator.settings import Settings


async def test_a_model_that_cannot_load_is_reported_and_the_others_stay_warm(tiny_repo: Path, tmp_path: Path) -> None:
    repo = Path(shutil.copytree(tiny_repo, tmp_path / "repo"))
    (repo / "htdemucs_6s.yaml").unlink()
    models = ModelCache(repo, "cpu")

    failed = await preload(models, SegmentEngine(), ["htdemucs", "htdemucs_6s", "htdemucs_ft"])

    assert {name: error.code for name, error in failed.items()} == {"htdemucs_6s": "model_unknown"}
    assert models.warm == ("htdemucs", "htdemucs_ft")


def settings(**overrides: object) -> Settings:
    return Settings(amqp_url="amqp://x/", redis_url="redis://x/0", blob_dir="/tmp/blobs", **overrides)


def test_served_models_are_read_from_a_list() -> None:
    assert settings(models=" htdemucs_ft, htdemucs_6s ,").model_names == ["htdemucs_ft", "htdemucs_6s"]


@pytest.mark.parametrize("models", ["", "htdemucs,mdx_extra", " , "])
def test_a_worker_refuses_to_start_without_a_queue_for_each_model(models: str) -> None:
    with pytest.raises(ValueError, match="models must name some of"):
        settings(models=models)
