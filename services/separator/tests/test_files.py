"""A mix file through the real loading path to stem files: every model, stem set and format."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from separator.engine import SegmentEngine
from separator.files import separate_file
from separator.models import ModelCache
from separator.options import SeparationCancelled, SeparationError
from separator.separation import separate

SAMPLERATE = 44100
SECONDS = 2.6
FRAMES = int(SECONDS * SAMPLERATE)
FOUR = ("drums", "bass", "other", "vocals")
TWO = ("vocals", "accompaniment")
SIX = (*FOUR, "guitar", "piano")


@pytest.fixture(scope="module")
def models(tiny_repo: Path) -> ModelCache:
    """The worker's cache over a local demucs repository: demucs.pretrained.get_model(name, repo)."""
    return ModelCache(tiny_repo, "cpu")


def song(frames: int = FRAMES, seed: int = 0, bits: int | None = None) -> np.ndarray:
    t = np.arange(frames) / SAMPLERATE
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    mix = (tone + 0.05 * np.random.default_rng(seed).standard_normal((2, frames))).astype(np.float32)
    if bits is None:
        return mix
    scale = 2.0 ** (bits - 1)
    return (np.rint(mix * scale) / scale).astype(np.float32)


def error_db(signal: np.ndarray, reference: np.ndarray) -> float:
    """The energy of the difference relative to the reference's, in dB, edges left out."""
    difference = (signal - reference)[:, 100:-100]
    return float(10 * np.log10(np.sum(difference**2) / np.sum(reference[:, 100:-100].astype(np.float64) ** 2)))


def write_mix(path: Path, mix: np.ndarray) -> Path:
    sf.write(path, mix.T, SAMPLERATE, subtype="FLOAT")
    return path


def decode(path: Path) -> np.ndarray:
    data, samplerate = sf.read(path, dtype="float32", always_2d=True)
    assert samplerate == SAMPLERATE
    return data.T


@pytest.mark.parametrize(
    ("name", "stems", "names"),
    [
        ("htdemucs", 2, TWO),
        ("htdemucs", 4, FOUR),
        ("htdemucs_ft", 2, TWO),
        ("htdemucs_ft", 4, FOUR),
        ("htdemucs_6s", 2, TWO),
        ("htdemucs_6s", 4, FOUR),
        ("htdemucs_6s", 6, SIX),
    ],
)
def test_every_model_and_stem_set_from_a_local_repository(
    models: ModelCache, tmp_path: Path, name: str, stems: int, names: tuple[str, ...]
) -> None:
    mix = song()
    loaded = models.get(name)
    with SegmentEngine() as engine:
        separated, files = separate_file(
            engine, loaded, write_mix(tmp_path / "mix.wav", mix), tmp_path, stems=stems, quality="fast"
        )
    in_memory = separate(loaded, mix, stems=stems, quality="fast")

    assert tuple(files) == names == separated.names
    assert separated.frames == FRAMES
    for stem, (path, size) in files.items():
        assert (path, size) == (tmp_path / f"{stem}.wav", path.stat().st_size)
        # Float WAV is lossless: the file holds exactly the in-memory separation.
        np.testing.assert_array_equal(decode(path), in_memory[stem])


def test_six_stems_need_a_six_source_model(models: ModelCache, tmp_path: Path) -> None:
    for name in ("htdemucs", "htdemucs_ft"):
        with SegmentEngine() as engine, pytest.raises(SeparationError) as raised:
            separate_file(engine, models.get(name), write_mix(tmp_path / "mix.wav", song()), tmp_path, stems=6)
        assert raised.value.code == "stems_unsupported"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mix.wav"]


@pytest.mark.parametrize(
    ("fmt", "bits", "subtype"),
    [
        ("wav", None, "FLOAT"),
        ("wav", 16, "PCM_16"),
        ("wav", 24, "PCM_24"),
        ("flac", 16, "PCM_16"),
        ("flac", 24, "PCM_24"),
        ("mp3", None, "MPEG_LAYER_III"),
        ("mp3", 16, "MPEG_LAYER_III"),
    ],
)
def test_every_format_decodes_to_the_input_length_and_adds_back_up(
    models: ModelCache, tmp_path: Path, fmt: str, bits: int | None, subtype: str
) -> None:
    # An odd length, not a multiple of a block, a segment or an MP3 frame.
    mix = song(FRAMES + 1001, bits=bits)
    with SegmentEngine() as engine:
        separated, files = separate_file(
            engine,
            models.get("htdemucs"),
            write_mix(tmp_path / "mix.wav", mix),
            tmp_path,
            fmt=fmt,
            bits=bits,
            residual=True,
        )

    assert tuple(files) == (*FOUR, "residual")
    decoded = {stem: decode(path) for stem, (path, _) in files.items()}
    for stem, (path, size) in files.items():
        assert sf.info(str(path)).subtype == subtype
        assert decoded[stem].shape == mix.shape
        assert size == path.stat().st_size
    total = sum(stem.astype(np.float64) for stem in decoded.values())
    if fmt == "mp3":
        # Lossy, and LAME's low-pass drops the untrained stems' hiss above 20 kHz: the stems add up
        # to the mix only roughly, but in time with it (a sample late or early is far worse).
        aligned = error_db(total, mix)
        assert aligned < -15
        assert aligned < min(error_db(np.roll(total, shift, axis=1), mix) for shift in (-1, 1)) - 6
    elif bits is None:
        # Float stems: only the residual's own rounding to float32 remains.
        np.testing.assert_allclose(total, mix, rtol=0, atol=1e-7)
    else:
        # Integer stems of an integer mix: the residual takes every rounding, the sum is exact.
        np.testing.assert_array_equal(total, mix)
    assert separated.reconstruction_error_db is not None


def test_a_cancelled_file_separation_leaves_no_files(models: ModelCache, tmp_path: Path) -> None:
    out = tmp_path / "stems"
    out.mkdir()
    reports: list[float] = []
    mix = write_mix(tmp_path / "mix.wav", song(6 * SAMPLERATE))
    with SegmentEngine() as engine, pytest.raises(SeparationCancelled):
        separate_file(
            engine,
            models.get("htdemucs"),
            mix,
            out,
            fmt="mp3",
            progress=reports.append,
            should_cancel=lambda: len(reports) > 2,
        )

    assert 0 < reports[-1] < 1
    assert list(out.iterdir()) == []


def test_a_failed_file_separation_leaves_no_files(models: ModelCache, tmp_path: Path) -> None:
    out = tmp_path / "stems"
    out.mkdir()
    mix = write_mix(tmp_path / "mix.wav", song())
    with SegmentEngine(memory_budget_bytes=1) as engine, pytest.raises(SeparationError) as raised:
        separate_file(engine, models.get("htdemucs"), mix, out, fmt="flac")

    assert raised.value.code == "out_of_memory"
    assert list(out.iterdir()) == []


def test_a_file_that_is_not_audio_fails_with_a_code(models: ModelCache, tmp_path: Path) -> None:
    (tmp_path / "mix.wav").write_bytes(b"RIFF not really")
    with SegmentEngine() as engine, pytest.raises(SeparationError) as raised:
        separate_file(engine, models.get("htdemucs"), tmp_path / "mix.wav", tmp_path / "out")
    assert raised.value.code == "invalid_audio"


def test_stems_at_another_rate_last_as_long_and_still_add_back_up(models: ModelCache, tmp_path: Path) -> None:
    mix = song(FRAMES + 1001)
    with SegmentEngine() as engine:
        _, files = separate_file(
            engine,
            models.get("htdemucs"),
            write_mix(tmp_path / "mix.wav", mix),
            tmp_path,
            fmt="flac",
            bits=24,
            rate=48000,
            residual=True,
        )
    decoded = {}
    for stem, (path, _) in files.items():
        data, samplerate = sf.read(path, dtype="float32", always_2d=True)
        assert samplerate == 48000 and sf.info(str(path)).subtype == "PCM_24"
        decoded[stem] = data.T
    assert {d.shape[1] for d in decoded.values()} == {round(mix.shape[1] * 48000 / SAMPLERATE)}
    total = sum(d.astype(np.float64) for d in decoded.values())
    # The mix resampled the same way: resampling is linear, so the stems' sum is the mix at the new rate.
    reference = soxr.resample(mix.T, SAMPLERATE, 48000, quality="HQ").T
    assert error_db(total[:, : reference.shape[1]], reference) < -60
