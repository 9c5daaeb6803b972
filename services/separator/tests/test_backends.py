"""The exported-network engines (ONNX Runtime, OpenVINO) against torch, and their export cache."""

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from separator import export
from separator.core import CoreUnsupported, HTDemucsCore, check_supported, forward_split
from separator.engine import SegmentEngine
from separator.export import ExportCache
from separator.models import LoadedModel, load_model
from separator.separation import separate
from stemflow_dev.models import make_production_htdemucs

Reference = Callable[..., dict[str, np.ndarray]]
SAMPLERATE = 44100
BACKENDS = ("onnx", "openvino")
# The bound: every stem's largest and RMS difference from float32 torch 60 dB below its own.
ERROR_DB = -60.0


@pytest.fixture(scope="module")
def htdemucs(tiny_repo: Path) -> LoadedModel:
    return load_model("htdemucs", tiny_repo)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export folder for the module: each tiny model is exported once."""
    return tmp_path_factory.mktemp("exports")


def noise(seconds: float, seed: int) -> np.ndarray:
    samples = int(seconds * SAMPLERATE)
    return (0.1 * np.random.default_rng(seed).standard_normal((2, samples))).astype(np.float32)


def error_db(got: np.ndarray | torch.Tensor, expected: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """The largest and the RMS difference, in dB relative to the expected peak and RMS."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    difference = got - expected
    peak = max(np.abs(difference).max(), 1e-30) / np.abs(expected).max()
    rms = max(np.sqrt(np.mean(difference**2)), 1e-30) / np.sqrt(np.mean(expected**2))
    return 20 * float(np.log10(peak)), 20 * float(np.log10(rms))


def assert_close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, stem in expected.items():
        assert got[name].shape == stem.shape
        peak_db, rms_db = error_db(got[name], stem)
        assert peak_db <= ERROR_DB and rms_db <= ERROR_DB, (name, peak_db, rms_db)


@pytest.fixture
def engine_of(exports: Path) -> Iterator:
    engines: list[SegmentEngine] = []

    def make(backend: str, directory: Path = exports) -> SegmentEngine:
        engines.append(SegmentEngine("cpu", backend=backend, export_dir=directory).start())
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def test_the_split_network_is_the_model(htdemucs: LoadedModel) -> None:
    model = htdemucs.model.models[0]
    mix = torch.from_numpy(noise(2, seed=1))[None]

    with torch.inference_mode():
        assert torch.equal(forward_split(model, HTDemucsCore(model), mix), model(mix))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["htdemucs", "htdemucs_ft"])
def test_each_backend_separates_like_torch_and_apply_model(
    backend: str, name: str, tiny_repo: Path, reference: Reference, engine_of
) -> None:
    model = load_model(name, tiny_repo)
    mix = noise(4.5, seed=2)

    got = separate(model, mix, quality="balanced", engine=engine_of(backend))

    assert_close(got, separate(model, mix, quality="balanced"))
    assert_close(got, reference(model, mix, "balanced"))


@pytest.fixture(scope="module")
def production() -> nn.Module:
    """The released htdemucs architecture with random weights."""
    return make_production_htdemucs()


@pytest.fixture(scope="module")
def production_exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for both backends, so the production network is exported once."""
    return tmp_path_factory.mktemp("production-exports")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_equals_torch_on_the_production_architecture(
    backend: str, production: nn.Module, production_exports: Path, engine_of
) -> None:
    window = torch.from_numpy(noise(float(production.segment), seed=3))
    with SegmentEngine("cpu") as torch_engine:
        expected = torch_engine.submit("torch", production, window).result()

    got = engine_of(backend, production_exports).submit("job", production, window).result()

    for source, name in enumerate(production.sources):
        peak_db, rms_db = error_db(got[source], expected[source])
        assert peak_db <= ERROR_DB and rms_db <= ERROR_DB, (name, peak_db, rms_db)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_workers_engine_releases_the_torch_weights_it_no_longer_needs(
    backend: str, tiny_repo: Path, exports: Path
) -> None:
    model = load_model("htdemucs_ft", tiny_repo)
    mix = noise(2.5, seed=6)
    expected = separate(model, mix)

    with SegmentEngine("cpu", backend=backend, export_dir=exports, release_weights=True) as engine:
        first = separate(model, mix, engine=engine)
        # The runtimes hold the networks now: the STFT and iSTFT run on without any weight.
        assert all(parameter.numel() == 0 for parameter in model.model.parameters())
        again = separate(model, mix, engine=engine)

    assert_close(first, expected)
    assert_close(again, expected)
    with pytest.raises(Exception, match="released"):
        separate(model, mix)


def test_an_export_is_reused_by_the_next_worker(htdemucs: LoadedModel, tmp_path: Path) -> None:
    model = htdemucs.model.models[0]
    first = ExportCache(tmp_path).path(model)
    written = first.stat().st_mtime_ns

    again = ExportCache(tmp_path)

    assert again.path(model) == first
    assert again.exports == 0
    assert first.stat().st_mtime_ns == written
    assert [path.name for path in tmp_path.iterdir()] == [first.name]


def test_changed_weights_export_anew_and_separate_with_the_new_weights(
    tiny_repo: Path, tmp_path: Path, engine_of
) -> None:
    old = load_model("htdemucs", tiny_repo)
    new = load_model("htdemucs", tiny_repo)
    with torch.no_grad():
        for parameter in new.model.parameters():
            parameter.mul_(1.5)
    mix = noise(2.5, seed=4)
    old_file = ExportCache(tmp_path).path(old.model.models[0])

    got = separate(new, mix, engine=engine_of("openvino", tmp_path))

    assert_close(got, separate(new, mix))
    new_file = ExportCache(tmp_path).path(new.model.models[0])
    assert new_file != old_file and old_file.is_file()


def test_another_exporter_version_exports_anew_and_drops_the_stale_file(
    htdemucs: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = htdemucs.model.models[0]
    stale = ExportCache(tmp_path).path(model)
    monkeypatch.setattr(export, "EXPORT_FORMAT", export.EXPORT_FORMAT + 1)

    cache = ExportCache(tmp_path)
    fresh = cache.path(model)

    assert cache.exports == 1
    assert fresh != stale
    assert sorted(tmp_path.iterdir()) == [fresh]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_damaged_export_is_exported_again(backend: str, htdemucs: LoadedModel, tmp_path: Path, engine_of) -> None:
    path = ExportCache(tmp_path).path(htdemucs.model.models[0])
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    mix = noise(2.5, seed=5)

    got = separate(htdemucs, mix, engine=engine_of(backend, tmp_path))

    assert_close(got, separate(htdemucs, mix))
    assert path.stat().st_size == size


def test_an_interrupted_export_leaves_nothing_that_looks_cached(
    htdemucs: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def killed(*args: object, **kwargs: object) -> None:
        Path(args[2]).write_bytes(b"half a file")  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", killed)

    with pytest.raises(KeyboardInterrupt):
        ExportCache(tmp_path).path(htdemucs.model.models[0])

    assert list(tmp_path.iterdir()) == []


class _Halves(nn.Module):
    """Not an HTDemucs: two 'sources', each half the mix."""

    sources = ("a", "b")

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        return torch.stack([mix / 2, mix / 2], dim=1)


def test_a_model_the_split_cannot_reproduce_runs_in_torch(tmp_path: Path, engine_of) -> None:
    window = torch.ones(2, 100)

    with pytest.raises(CoreUnsupported):
        check_supported(_Halves())
    got = engine_of("onnx", tmp_path).submit("job", _Halves(), window).result()

    assert torch.equal(got, torch.stack([window / 2, window / 2]))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "settings",
    [{"device": "cuda"}, {"precision": "bfloat16"}, {"compile_models": True}],
)
def test_the_graph_backends_refuse_what_they_cannot_do(settings: dict) -> None:
    device = settings.pop("device", "cpu")
    with pytest.raises(ValueError, match="runs on cpu in float32"):
        SegmentEngine(device, backend="openvino", **settings)


def test_a_large_model_is_exported_in_a_child_process(
    htdemucs: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_here(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported in the worker's own process")

    monkeypatch.setattr(export, "ISOLATE_PARAMETERS", 0)
    monkeypatch.setattr(torch.onnx, "export", not_here)
    mix = noise(2.5, seed=6)

    with SegmentEngine("cpu", backend="onnx", export_dir=tmp_path) as engine:
        got = separate(htdemucs, mix, engine=engine)

    assert_close(got, separate(htdemucs, mix))
