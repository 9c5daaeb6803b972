from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from separator import mix as mix_module
from separator.encode import StemWriter
from separator.engine import SegmentEngine
from separator.mix import ArraySource, FileSource
from separator.models import LoadedModel, load_model
from separator.stream import separate_stream

SAMPLERATE = 44100
SEGMENT = 2 * SAMPLERATE
STRIDE = int(0.9 * SEGMENT)
NAMES = ("drums", "bass", "other", "vocals")
Reference = Callable[..., dict[str, np.ndarray]]


@pytest.fixture(scope="module")
def htdemucs(tiny_repo: Path) -> LoadedModel:
    return load_model("htdemucs", tiny_repo)


def song(seconds: float, seed: int = 0) -> np.ndarray:
    samples = int(seconds * SAMPLERATE)
    t = np.arange(samples) / SAMPLERATE
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 0.5 * t))
    hiss = 0.05 * np.random.default_rng(seed).standard_normal((2, samples))
    return (tone + hiss).astype(np.float32)


def write_mix(path: Path, mix: np.ndarray) -> Path:
    sf.write(path, mix.T, SAMPLERATE, subtype="FLOAT")
    return path


def read(path: Path) -> np.ndarray:
    data, _ = sf.read(path, dtype="float32", always_2d=True)
    return data.T


class Watched:
    """A file source that says how far it has been read."""

    def __init__(self, source: FileSource) -> None:
        self._source = source
        self.channels, self.frames, self.samplerate = source.channels, source.frames, source.samplerate
        self.position = 0

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        self.position = 0
        for block in self._source.blocks(size):
            self.position += block.shape[1]
            yield block


class Lagging:
    """A sink that records how far the source was read each time a block is written."""

    def __init__(self, source: Watched) -> None:
        self._source = source
        self.written = 0
        self.lags: list[int] = []

    def write(self, block: np.ndarray) -> np.ndarray:
        self.written += block.shape[1]
        self.lags.append(self._source.position - self.written)
        return block


@pytest.mark.parametrize(("name", "quality"), [("htdemucs", "balanced"), ("htdemucs_ft", "best")])
def test_streamed_files_equal_one_unchunked_run_across_every_join(
    tiny_repo: Path, reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, quality: str
) -> None:
    # Blocks far shorter than a segment, of an odd size, so windows span several reads.
    monkeypatch.setattr(mix_module, "BLOCK_FRAMES", 10_007)
    model = load_model(name, tiny_repo)
    mix = song(9.3)
    writers = {stem: StemWriter(tmp_path / f"{stem}.wav", "wav", SAMPLERATE, 2) for stem in NAMES}
    with SegmentEngine() as engine:
        separate_stream(
            engine, model, FileSource(write_mix(tmp_path / "mix.wav", mix)), writers, quality=quality, seed=3
        )
    for writer in writers.values():
        writer.close()
    # The unchunked run: demucs' apply_model with the whole song in memory.
    whole = reference(model, mix, quality, seed=3)

    overlap = {"balanced": 0.25, "best": 0.5}[quality]
    stride = int((1 - overlap) * SEGMENT)
    # Where a segment's crossfade starts and ends (shifted passes move them by up to half a second).
    joins = [offset + edge for offset in range(stride, mix.shape[1], stride) for edge in (0, SEGMENT - stride)]
    for stem in NAMES:
        streamed = read(tmp_path / f"{stem}.wav")
        assert streamed.shape == mix.shape
        np.testing.assert_allclose(streamed, whole[stem], rtol=0, atol=1e-6)
        for join in joins:
            around = slice(max(join - SAMPLERATE // 2, 0), join + SAMPLERATE // 2)
            np.testing.assert_allclose(streamed[:, around], whole[stem][:, around], rtol=0, atol=1e-6)


def test_memory_follows_the_segment_not_the_song(htdemucs: LoadedModel, tmp_path: Path) -> None:
    source = Watched(FileSource(write_mix(tmp_path / "mix.wav", song(30.0))))
    sinks = {name: Lagging(source) for name in NAMES}
    with SegmentEngine() as engine:
        separate_stream(engine, htdemucs, source, sinks)

    lags = sinks["vocals"].lags
    assert sinks["vocals"].written == source.frames
    # Output is written every stride, and never further behind the reading than a few segments and
    # one read block: the song in between is neither read ahead nor kept.
    assert len(lags) >= 15
    assert max(lags) <= 3 * SEGMENT + mix_module.BLOCK_FRAMES


def test_reconstruction_error_is_the_stems_distance_from_the_mix(htdemucs: LoadedModel) -> None:
    mix = song(2.5)
    sinks = {name: _Collect() for name in NAMES}
    with SegmentEngine() as engine:
        separated = separate_stream(engine, htdemucs, ArraySource(mix, SAMPLERATE), sinks)

    total = sum(np.concatenate(sinks[name].blocks, axis=1).astype(np.float64) for name in NAMES)
    expected = 10 * np.log10(np.sum((mix - total) ** 2) / np.sum(mix.astype(np.float64) ** 2))
    assert separated.reconstruction_error_db == pytest.approx(expected, abs=1e-3)
    assert separated.frames == mix.shape[1]
    assert separated.names == NAMES


def test_silence_has_no_reconstruction_error(htdemucs: LoadedModel) -> None:
    sinks = {name: _Collect() for name in NAMES}
    with SegmentEngine() as engine:
        separated = separate_stream(
            engine, htdemucs, ArraySource(np.zeros((2, SAMPLERATE), np.float32), SAMPLERATE), sinks
        )
    assert separated.reconstruction_error_db is None


@pytest.mark.parametrize(("fmt", "bits"), [("wav", 16), ("wav", 24), ("flac", 16), ("flac", 24)])
def test_integer_stems_and_residual_add_up_to_the_mix_exactly(
    htdemucs: LoadedModel, tmp_path: Path, fmt: str, bits: int
) -> None:
    scale = 2.0 ** (bits - 1)
    mix = (np.rint(song(2.5) * scale) / scale).astype(np.float32)
    names = ("vocals", "accompaniment", "residual")
    writers = {name: StemWriter(tmp_path / f"{name}.{fmt}", fmt, SAMPLERATE, 2, bits) for name in names}
    with SegmentEngine() as engine:
        separate_stream(engine, htdemucs, ArraySource(mix, SAMPLERATE), writers, stems=2, residual=True)
    for writer in writers.values():
        writer.close()

    decoded = [read(tmp_path / f"{name}.{fmt}").astype(np.float64) for name in names]
    assert {sf.info(tmp_path / f"{name}.{fmt}").subtype for name in names} == {f"PCM_{bits}"}
    np.testing.assert_array_equal(sum(decoded), mix)


class _Collect:
    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []

    def write(self, block: np.ndarray) -> np.ndarray:
        self.blocks.append(block)
        return block
