from pathlib import Path

import pytest
import torch

from separator.device import make_engine, pick_device, pick_precision
from separator.settings import Settings
from stemflow_shared.settings import HarnessKnobs


def settings(**overrides: object) -> Settings:
    return Settings(amqp_url="amqp://x/", redis_url="redis://x/0", blob_dir="/tmp/blobs", **overrides)


def test_auto_precision_is_half_on_cuda_and_full_on_cpu() -> None:
    assert pick_precision("auto", "cuda") == "float16"
    assert pick_precision("auto", "cpu") == "float32"
    assert pick_precision("bfloat16", "cuda") == "bfloat16"


def test_explicit_devices_are_kept_and_auto_follows_cuda() -> None:
    assert pick_device("cpu") == "cpu"
    assert pick_device("cuda") == "cuda"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(("device", "batch"), [("cpu", 1), ("cuda", 8)])
def test_the_engine_follows_the_settings(device: str, batch: int) -> None:
    engine = make_engine(settings(batch_wait_ms=20), device, knobs=HarnessKnobs(simulated_device_memory_mb=1.5))

    assert (engine.device.type, engine.max_batch, engine.precision) == (device, batch, pick_precision("auto", device))
    assert engine.memory_budget_bytes == 3 * 2**19
    assert engine.batch_wait_s == pytest.approx(0.02)


def test_a_batch_size_setting_wins() -> None:
    assert make_engine(settings(max_batch=3, precision="bfloat16"), "cpu").max_batch == 3


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError):
        settings(precision="int8")


def test_the_cpu_default_engine_is_openvino_and_cuda_keeps_torch(tmp_path: Path) -> None:
    cpu = make_engine(settings(model_repo=tmp_path), "cpu")

    assert cpu.backend == "openvino"
    assert cpu.export_dir == tmp_path / ".stemflow-export"
    assert make_engine(settings(), "cuda").backend == "torch"


@pytest.mark.parametrize("overrides", [{"precision": "bfloat16"}, {"torch_compile": True}, {"engine": "torch"}])
def test_torch_runs_on_cpu_where_the_settings_ask_for_it(overrides: dict) -> None:
    assert make_engine(settings(**overrides), "cpu").backend == "torch"


def test_an_explicit_engine_wins_and_is_refused_where_it_cannot_run(tmp_path: Path) -> None:
    assert make_engine(settings(engine="onnx", export_cache_dir=tmp_path), "cpu").backend == "onnx"
    with pytest.raises(ValueError, match="runs on cpu"):
        make_engine(settings(engine="onnx"), "cuda")
    with pytest.raises(ValueError):
        settings(engine="tensorrt")
