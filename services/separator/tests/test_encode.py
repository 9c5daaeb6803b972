import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from separator.encode import FORMAT_EXTENSIONS, StemWriter, encode_stem, stem_depth, subtype
from separator.mp3 import ENCODER_DELAY, LAME_VERSION, SAMPLES_PER_FRAME, FrameHeader, crc16
from stemflow_shared.events import MEDIA_TYPES

SAMPLERATE = 44100
SAMPLES = SAMPLERATE + 123
LENGTHS = [2, 1000, SAMPLES_PER_FRAME - ENCODER_DELAY, SAMPLES, 3 * SAMPLERATE + 1151]


def tone(channels: int, samples: int = SAMPLES, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(samples) / SAMPLERATE
    rows = [amplitude * np.sin(2 * np.pi * (440 + 110 * c) * t) for c in range(channels)]
    return np.stack(rows).astype(np.float32)


def decode(path: Path) -> tuple[np.ndarray, int]:
    data, samplerate = sf.read(path, dtype="float32", always_2d=True)
    return data.T, samplerate


def write_in_blocks(samples: np.ndarray, fmt: str, path: Path, bits: int | None = None, block: int = 4099) -> int:
    writer = StemWriter(path, fmt, SAMPLERATE, samples.shape[0], bits)
    for start in range(0, samples.shape[1], block):
        writer.write(samples[:, start : start + block])
    return writer.close()


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
@pytest.mark.parametrize("samples", LENGTHS)
def test_every_format_decodes_to_the_input_length(tmp_path: Path, fmt: str, samples: int) -> None:
    path = tmp_path / f"s.{fmt}"
    size = write_in_blocks(tone(2, samples), fmt, path)

    decoded, samplerate = decode(path)
    assert size == path.stat().st_size
    assert (samplerate, decoded.shape) == (SAMPLERATE, (2, samples))


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
@pytest.mark.parametrize("channels", [1, 2])
def test_ffmpeg_reads_the_gapless_tag_too(tmp_path: Path, channels: int) -> None:
    write_in_blocks(tone(channels), "mp3", tmp_path / "s.mp3")

    result = subprocess.run(
        ["ffmpeg", "-v", "warning", "-i", str(tmp_path / "s.mp3"), "-f", "f32le", "-"],
        capture_output=True,
        check=True,
    )
    assert result.stderr == b""
    assert len(result.stdout) == 4 * channels * SAMPLES


@pytest.mark.parametrize("channels", [1, 2])
def test_mp3_is_aligned_with_its_input(tmp_path: Path, channels: int) -> None:
    samples = tone(channels)
    write_in_blocks(samples, "mp3", tmp_path / "s.mp3")

    decoded, _ = decode(tmp_path / "s.mp3")
    error = np.abs(decoded - samples)
    # Off by one sample the error would be about 0.04; only the last frame smears the abrupt end.
    assert error[:, :-SAMPLES_PER_FRAME].max() < 0.005
    assert error.max() < 0.05


def test_mp3_starts_with_a_lame_info_tag(tmp_path: Path) -> None:
    size = write_in_blocks(tone(2), "mp3", tmp_path / "s.mp3")

    data = (tmp_path / "s.mp3").read_bytes()
    header = FrameHeader(data[:4])
    tag = data[4 + header.side_info :]
    frames = int.from_bytes(tag[8:12], "big")
    lame = tag[120:156]
    delay_padding = int.from_bytes(lame[21:24], "big")
    assert tag[:4] == b"Info"
    assert int.from_bytes(tag[12:16], "big") == size
    assert lame[:9] == LAME_VERSION
    assert (delay_padding >> 12, delay_padding & 0xFFF) == (
        ENCODER_DELAY,
        frames * SAMPLES_PER_FRAME - ENCODER_DELAY - SAMPLES,
    )
    assert int.from_bytes(lame[28:32], "big") == size
    assert int.from_bytes(lame[32:34], "big") == crc16(data[header.size :])
    assert int.from_bytes(lame[34:36], "big") == crc16(data[: 4 + header.side_info + 154])
    assert abs(size - 320_000 / 8 * (frames + 1) * SAMPLES_PER_FRAME / SAMPLERATE) < 2 * (frames + 1)


def test_wav_is_float_and_lossless_even_beyond_full_scale(tmp_path: Path) -> None:
    samples = tone(2, amplitude=1.5)
    size = encode_stem(samples, SAMPLERATE, "wav", tmp_path / "s.wav")

    decoded, _ = decode(tmp_path / "s.wav")
    assert size == (tmp_path / "s.wav").stat().st_size
    assert sf.info(tmp_path / "s.wav").subtype == "FLOAT"
    np.testing.assert_array_equal(decoded, samples)


@pytest.mark.parametrize(
    ("fmt", "bits", "expected"),
    [
        ("wav", 16, "PCM_16"),
        ("wav", 24, "PCM_24"),
        ("flac", 16, "PCM_16"),
        ("flac", None, "PCM_24"),
        ("flac", 24, "PCM_24"),
    ],
)
def test_integer_depths_are_kept_and_clipped(tmp_path: Path, fmt: str, bits: int | None, expected: str) -> None:
    samples = tone(2, amplitude=1.5)
    path = tmp_path / f"s.{fmt}"
    writer = StemWriter(path, fmt, SAMPLERATE, 2, bits)
    as_decoded = writer.write(samples)
    writer.close()

    decoded, _ = decode(path)
    depth = 16 if expected == "PCM_16" else 24
    assert sf.info(path).subtype == expected
    np.testing.assert_array_equal(decoded, as_decoded)
    np.testing.assert_allclose(decoded, np.clip(samples, -1, 1), atol=2.0 ** (1 - depth))


def test_subtypes_keep_the_input_depth_where_the_format_allows() -> None:
    assert [subtype("wav", bits) for bits in (None, 16, 24, 32)] == ["FLOAT", "PCM_16", "PCM_24", "FLOAT"]
    assert [subtype("flac", bits) for bits in (None, 16, 24, 32)] == [
        "PCM_16" if b == 16 else "PCM_24" for b in (None, 16, 24, 32)
    ]
    assert subtype("mp3", 24) is None


def test_an_aborted_stem_leaves_no_file(tmp_path: Path) -> None:
    for fmt in FORMAT_EXTENSIONS:
        writer = StemWriter(tmp_path / f"s.{fmt}", fmt, SAMPLERATE, 2)
        writer.write(tone(2))
        writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        encode_stem(tone(2), SAMPLERATE, "ogg", tmp_path / "s.ogg")


def test_every_format_has_an_extension_and_media_type() -> None:
    assert set(FORMAT_EXTENSIONS) == set(MEDIA_TYPES) == {"wav", "flac", "mp3"}
    assert MEDIA_TYPES == {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg"}


def test_a_jobs_stems_are_as_deep_as_asked_else_16_for_a_16_bit_source_else_24() -> None:
    assert [stem_depth(None, source) for source in (None, 16, 24)] == [24, 16, 24]
    assert [stem_depth(asked, 16) for asked in (16, 24, 32)] == [16, 24, 32]


@pytest.mark.parametrize(("fmt", "bits"), [("wav", 24), ("wav", 32), ("flac", 16)])
@pytest.mark.parametrize("rate", [48000, 96000])
def test_stems_resampled_as_they_stream_keep_the_duration_and_the_tone(
    tmp_path: Path, fmt: str, bits: int, rate: int
) -> None:
    samples = tone(2, 3 * SAMPLERATE + 77)
    path = tmp_path / f"s.{fmt}"
    writer = StemWriter(path, fmt, SAMPLERATE, 2, bits, rate)
    for start in range(0, samples.shape[1], 4099):
        assert writer.write(samples[:, start : start + 4099]).shape[1] == min(4099, samples.shape[1] - start)
    writer.close()

    decoded, samplerate = decode(path)
    info = sf.info(path)
    assert samplerate == rate and info.subtype == subtype(fmt, bits)
    assert abs(decoded.shape[1] - round(samples.shape[1] * rate / SAMPLERATE)) <= 1
    t = np.arange(decoded.shape[1]) / rate
    expected = 0.5 * np.sin(2 * np.pi * 440 * t)
    middle = slice(rate // 10, -rate // 10)  # away from the resampler's edges
    np.testing.assert_allclose(decoded[0, middle], expected[middle], atol=2e-3)


def test_mp3_stems_keep_the_models_rate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mp3"):
        StemWriter(tmp_path / "s.mp3", "mp3", SAMPLERATE, 2, None, 48000)
