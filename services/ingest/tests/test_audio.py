import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from badfiles import RATE, BadFile, corpus, sine

from ingest.audio import AudioError, Limits, normalise
from ingest.sniff import sniff_bytes

GOOD_FORMATS = [
    ("WAV", "PCM_16", 44100),
    ("WAV", "PCM_24", 48000),
    ("WAV", "FLOAT", 22050),
    ("WAV", "PCM_U8", 8000),
    ("FLAC", "PCM_16", 44100),
    ("FLAC", "PCM_24", 96000),
    ("OGG", "VORBIS", 44100),
    ("OGG", "OPUS", 48000),
    ("MP3", "MPEG_LAYER_III", 44100),
    ("MP3", "MPEG_LAYER_III", 32000),
    ("AIFF", "PCM_16", 44100),
    ("RF64", "PCM_16", 44100),
    ("W64", "PCM_16", 48000),
    ("CAF", "PCM_16", 44100),
]
LOSSY = {"VORBIS", "OPUS", "MPEG_LAYER_III"}


def output_of(path: Path) -> np.ndarray:
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    info = sf.info(path)
    assert (rate, info.channels, info.format, info.subtype) == (44100, 2, "WAV", "FLOAT")
    return data


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int) -> float:
    """Highest normalised correlation of `a` against `b` shifted by up to `max_lag` frames."""
    size = len(a) + len(b)
    circular = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)
    near = np.concatenate([circular[: max_lag + 1], circular[-max_lag:]])
    return float(near.max() / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(("fmt", "subtype", "rate"), GOOD_FORMATS, ids=lambda v: str(v))
def test_each_format_becomes_stereo_44k_float(tmp_path: Path, fmt: str, subtype: str, rate: int) -> None:
    src, dst = tmp_path / "in.bin", tmp_path / "out.wav"
    sf.write(src, sine(2.0, rate, channels=1, freq=1000.0), rate, format=fmt, subtype=subtype)

    result = normalise(src, dst)

    out = output_of(dst)
    assert abs(len(out) - 2.0 * RATE) <= 1
    assert (result.frames, result.sample_rate, result.channels) == (len(out), 44100, 2)
    assert result.duration_s == pytest.approx(2.0, abs=1.5 / RATE)
    assert (result.source_format, result.source_subtype) == (fmt, subtype)
    assert (result.source_sample_rate, result.source_channels) == (rate, 1)
    assert np.array_equal(out[:, 0], out[:, 1])
    expected = sine(2.0, RATE, channels=1, freq=1000.0)[:, 0]
    middle = slice(RATE // 4, RATE * 7 // 4)
    if subtype in LOSSY:
        # Encoders delay and colour the signal; the tone must survive, roughly in place.
        assert best_correlation(out[middle, 0], expected[middle], 2048) > 0.95
        assert -9.0 < result.peak_dbfs < 0.0
    else:
        assert np.max(np.abs(out[middle, 0] - expected[middle])) < 2e-2
        assert result.peak_dbfs == pytest.approx(20 * math.log10(0.5), abs=0.25)


def test_sha256_is_of_the_written_samples(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.flac", tmp_path / "out.wav"
    sf.write(src, sine(3.0, 48000), 48000)

    result = normalise(src, dst)

    assert result.sha256 == hashlib.sha256(output_of(dst).astype("<f4").tobytes()).hexdigest()


def test_same_input_gives_same_output(tmp_path: Path) -> None:
    src = tmp_path / "in.mp3"
    sf.write(src, sine(2.0), RATE)

    first = normalise(src, tmp_path / "a.wav")
    second = normalise(src, tmp_path / "b.wav")

    assert first == second
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()


def test_trim_is_exact(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    data = np.random.default_rng(0).uniform(-0.5, 0.5, (RATE * 3, 2)).astype(np.float32)
    sf.write(src, data, RATE, subtype="FLOAT")

    result = normalise(src, dst, trim_start=0.5, trim_end=2.25)

    assert result.frames == round(1.75 * RATE)
    assert np.array_equal(output_of(dst), data[RATE // 2 : round(2.25 * RATE)])


def test_trim_end_past_the_end_is_clamped(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.flac", tmp_path / "out.wav"
    sf.write(src, sine(2.0), RATE)

    result = normalise(src, dst, trim_start=0.5, trim_end=60.0)

    assert result.frames == round(1.5 * RATE)


def test_trim_after_resampling_has_expected_length(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(src, sine(4.0, 48000), 48000)

    result = normalise(src, dst, trim_start=1.0, trim_end=2.5)

    assert abs(result.frames - 1.5 * RATE) <= 1


def test_mono_is_duplicated(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(src, np.random.default_rng(1).uniform(-0.5, 0.5, RATE * 2).astype(np.float32), RATE, subtype="FLOAT")

    normalise(src, dst)

    out = output_of(dst)
    assert np.array_equal(out[:, 0], out[:, 1])
    assert np.array_equal(out[:, 0], sf.read(src, dtype="float32")[0])


def test_stereo_passes_through_untouched(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    data = np.random.default_rng(2).uniform(-1, 1, (RATE * 2, 2)).astype(np.float32)
    sf.write(src, data, RATE, subtype="FLOAT")

    normalise(src, dst)

    assert np.array_equal(output_of(dst), data)


def surround(channels: int, loud: int, frames: int = RATE * 2) -> np.ndarray:
    data = np.zeros((frames, channels), np.float32)
    data[:, loud] = sine(frames / RATE, channels=1)[:, 0]
    return data


G = 1 / math.sqrt(2)


@pytest.mark.parametrize(
    ("fmt", "channels", "loud", "left", "right"),
    [
        # 5.1 in WAV order: FL FR FC LFE BL BR.
        ("WAV", 6, 0, 1.0, 0.0),
        ("WAV", 6, 2, G, G),
        ("WAV", 6, 5, 0.0, G),
        ("FLAC", 6, 1, 0.0, 1.0),
        ("WAV", 4, 2, G, 0.0),
        # 7.1: FL FR FC LFE BL BR SL SR.
        ("FLAC", 8, 7, 0.0, G),
        # Vorbis puts the centre second (FL FC FR ...) and the LFE last.
        ("OGG", 3, 1, G, G),
        ("OGG", 6, 2, 0.0, 1.0),
        ("OGG", 6, 4, 0.0, G),
    ],
)
def test_surround_downmix(tmp_path: Path, fmt: str, channels: int, loud: int, left: float, right: float) -> None:
    src, dst = tmp_path / "in.bin", tmp_path / "out.wav"
    data = surround(channels, loud)
    sf.write(src, data, RATE, format=fmt)

    normalise(src, dst)

    out = output_of(dst)[RATE // 2 : RATE * 3 // 2]
    reference = data[RATE // 2 : RATE * 3 // 2, loud]
    gains = [float(np.dot(out[:, side], reference) / np.dot(reference, reference)) for side in (0, 1)]
    assert gains == pytest.approx([left, right], abs=0.02)


def test_unknown_layouts_are_averaged(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(src, surround(10, 9), RATE)

    normalise(src, dst, limits=Limits(max_channels=16))

    out = output_of(dst)
    assert np.max(out) == pytest.approx(0.05, abs=1e-3)
    assert np.array_equal(out[:, 0], out[:, 1])


def test_lfe_only_is_silent_after_downmix(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(src, surround(6, 3), RATE)

    with pytest.raises(AudioError) as error:
        normalise(src, dst)

    assert error.value.code == "silent"


@pytest.mark.parametrize("rate", [8000, 384_000])
def test_sample_rate_limits_are_inclusive(tmp_path: Path, rate: int) -> None:
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(src, sine(1.5, rate), rate)

    result = normalise(src, dst)

    assert abs(result.frames - 1.5 * RATE) <= 1


def test_eight_channels_are_accepted_by_default(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.flac", tmp_path / "out.wav"
    sf.write(src, sine(1.5, channels=8), RATE)

    assert normalise(src, dst).source_channels == 8


def test_format_is_decided_by_content_not_name(tmp_path: Path) -> None:
    src, dst = tmp_path / "song.mp3", tmp_path / "out.wav"
    sf.write(src, sine(1.5), RATE, format="FLAC")

    assert normalise(src, dst).source_format == "FLAC"


def test_blocks_keep_memory_bounded(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(src, sine(60.0, 48000, channels=1), 48000, subtype="PCM_16")

    tracemalloc.start()
    try:
        normalise(src, dst)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # The whole output would be 21 MB; blocks of 64k frames need well under 10.
    assert peak < 10_000_000


def test_failure_removes_a_previous_output(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.txt", tmp_path / "out.wav"
    src.write_text("not audio")
    dst.write_bytes(b"stale")

    with pytest.raises(AudioError):
        normalise(src, dst)

    assert os.listdir(tmp_path) == ["in.txt"]


def test_missing_source_is_not_an_audio_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        normalise(tmp_path / "missing.wav", tmp_path / "out.wav")


@pytest.mark.parametrize("bad", corpus(), ids=lambda bad: bad.name)
def test_bad_file_is_rejected_with_its_code(tmp_path: Path, bad: BadFile, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst, temp = tmp_path / bad.filename, tmp_path / "out" / "out.wav", tmp_path / "tmp"
    bad.make(src)
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    with pytest.raises(AudioError) as error:
        normalise(src, dst, trim_start=bad.trim[0], trim_end=bad.trim[1], limits=bad.limits)

    assert error.value.code == bad.code, error.value.message
    assert error.value.message
    assert not dst.parent.exists() or os.listdir(dst.parent) == []
    assert os.listdir(temp) == []


def test_corpus_is_large_and_covers_every_code() -> None:
    bad_files = corpus()
    assert len(bad_files) >= 30
    assert len({bad.name for bad in bad_files}) == len(bad_files)
    codes = {bad.code for bad in bad_files}
    expected = {"empty", "not_audio", "corrupt", "silent", "too_short", "too_long", "too_many_channels"}
    assert codes >= expected | {"bad_sample_rate", "bad_trim", "trim_out_of_range", "samples_out_of_range"}


@pytest.mark.parametrize(
    ("head", "container"),
    [
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "WAV"),
        (b"FORM\x00\x00\x00\x00AIFCCOMM", "AIFF"),
        (b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00", "MP4"),
        (b"\x1a\x45\xdf\xa3" + bytes(12), "MATROSKA"),
        (b"\xff\xfb\x90\x64" + bytes(413) + b"\xff\xfb\x90\x64", "MP3"),
        (b"\xff\xf1\x50\x80\x02\x1f\xfc" + bytes(9) + b"\xff\xf1\x50\x80\x02\x1f\xfc", "AAC"),
        (b"\xff\xfb\x90\x64" + bytes(413) + b"not a frame", None),
        (b"plain text, nothing more", None),
    ],
)
def test_sniff_bytes(head: bytes, container: str | None) -> None:
    assert sniff_bytes(head) == container


def m4a_header() -> bytes:
    return b"\x00\x00\x00\x1cftypM4A \x00\x00\x02\x00M4A isommp42" + bytes(200)


@pytest.mark.parametrize("fmt", ["MP3", "FLAC"])
def test_id3_tagged_files_are_recognised(tmp_path: Path, fmt: str) -> None:
    src, dst = tmp_path / "in.bin", tmp_path / "out.wav"
    sf.write(src, sine(1.5), RATE, format=fmt)
    # An ID3v2.4 tag holding only padding; 300 is 0x02 0x2C as a syncsafe integer.
    src.write_bytes(b"ID3\x04\x00\x00\x00\x00\x02\x2c" + bytes(300) + src.read_bytes())

    result = normalise(src, dst)

    assert result.source_format == fmt
    assert abs(result.frames - 1.5 * RATE) <= 1


def flac_of_unknown_length(path: Path) -> None:
    """A FLAC whose header says 0 samples, as ffmpeg writes one into a pipe."""
    sf.write(path, sine(1.5), RATE, format="FLAC")
    data = bytearray(path.read_bytes())
    info = int.from_bytes(data[18:26], "big") & ~(2**36 - 1)
    data[18:26] = info.to_bytes(8, "big")
    path.write_bytes(bytes(data))


def test_formats_for_ffmpeg_are_unsupported_without_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    src, dst = tmp_path / "in.m4a", tmp_path / "out.wav"
    src.write_bytes(m4a_header())

    with pytest.raises(AudioError) as error:
        normalise(src, dst)

    assert error.value.code == "unsupported_format"
    assert not dst.exists()


def test_flac_of_unknown_length_goes_to_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    src, dst = tmp_path / "in.flac", tmp_path / "out.wav"
    flac_of_unknown_length(src)

    with pytest.raises(AudioError) as error:
        normalise(src, dst)

    assert error.value.code == "unsupported_format"


def test_wav_codec_unknown_to_libsndfile_goes_to_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    src, dst = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(src, sine(1.5), RATE, subtype="PCM_16")
    data = bytearray(src.read_bytes())
    data[20:22] = (0x2000).to_bytes(2, "little")  # WAVE_FORMAT_DVM (AC-3)
    src.write_bytes(bytes(data))

    with pytest.raises(AudioError) as error:
        normalise(src, dst)

    assert error.value.code == "unsupported_format"


def fake_ffmpeg(tmp_path: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put a stand-in `ffmpeg` first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ffmpeg").write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / "ffmpeg").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def streamed_wav(path: Path, data: np.ndarray, rate: int) -> None:
    """A float WAV as ffmpeg streams it: sizes unknown, an extra chunk before the data."""
    sf.write(path, data, rate, subtype="FLOAT")
    body = path.read_bytes()
    samples = body[body.index(b"data") + 8 :]
    fmt = body[body.index(b"fmt ") : body.index(b"fmt ") + 8 + 16]
    path.write_bytes(
        b"RIFF\xff\xff\xff\xffWAVE" + fmt + b"LIST\x04\x00\x00\x00INFO" + b"data\xff\xff\xff\xff" + samples
    )


def test_ffmpeg_output_is_streamed_and_normalised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = tmp_path / "stream.wav"
    data = sine(2.0, 48000, channels=6)
    streamed_wav(stream, data, 48000)
    fake_ffmpeg(tmp_path, f'exec cat "{stream}"', monkeypatch)
    src, dst = tmp_path / "in.m4a", tmp_path / "out.wav"
    src.write_bytes(m4a_header())

    result = normalise(src, dst, trim_start=0.5)

    assert (result.source_format, result.source_channels, result.source_sample_rate) == ("MP4", 6, 48000)
    assert abs(result.frames - 1.5 * RATE) <= 1
    assert result.sha256 == hashlib.sha256(output_of(dst).astype("<f4").tobytes()).hexdigest()


def test_ffmpeg_failure_is_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ffmpeg(tmp_path, "echo 'moov atom not found' >&2; exit 1", monkeypatch)
    src, dst = tmp_path / "in.m4a", tmp_path / "out.wav"
    src.write_bytes(m4a_header())

    with pytest.raises(AudioError) as error:
        normalise(src, dst)

    assert error.value.code == "corrupt"
    assert "moov atom not found" in error.value.message
    assert not dst.exists()


def test_ffmpeg_is_stopped_at_the_time_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ffmpeg(tmp_path, "exec sleep 30", monkeypatch)
    src, dst = tmp_path / "in.m4a", tmp_path / "out.wav"
    src.write_bytes(m4a_header())

    with pytest.raises(AudioError) as error:
        normalise(src, dst, limits=Limits(decode_timeout_s=0.5))

    assert error.value.code == "corrupt"
    assert "longer than" in error.value.message


def test_ffmpeg_output_is_held_to_the_duration_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = tmp_path / "stream.wav"
    streamed_wav(stream, sine(3.0, 48000), 48000)
    fake_ffmpeg(tmp_path, f'exec cat "{stream}"', monkeypatch)
    src, dst = tmp_path / "in.m4a", tmp_path / "out.wav"
    src.write_bytes(m4a_header())

    with pytest.raises(AudioError) as error:
        normalise(src, dst, limits=Limits(max_duration_s=2.0))

    assert error.value.code == "too_long"


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_real_ffmpeg_decodes_flac_of_unknown_length(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.flac", tmp_path / "out.wav"
    flac_of_unknown_length(src)

    result = normalise(src, dst)

    assert (result.source_format, result.frames) == ("FLAC", round(1.5 * RATE))


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_real_ffmpeg_decodes_aac(tmp_path: Path) -> None:
    wav, src, dst = tmp_path / "in.wav", tmp_path / "in.m4a", tmp_path / "out.wav"
    sf.write(wav, sine(2.0, 48000, freq=1000.0), 48000)
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(wav), "-c:a", "aac", str(src)], check=True)

    result = normalise(src, dst)

    assert result.source_format == "MP4"
    assert abs(result.duration_s - 2.0) < 0.05
    expected = sine(2.0, RATE, channels=1, freq=1000.0)[:, 0]
    out = output_of(dst)
    assert best_correlation(out[RATE // 4 : RATE, 0], expected[RATE // 4 : RATE], 4096) > 0.95


# --- decompression bombs: compressed audio never decodes to more than the limits allow ----------


def flac_declaring(seconds: float, holding: float) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        sf.write(path, noise(holding), RATE, format="FLAC", subtype="PCM_16")
        data = bytearray(path.read_bytes())
        info = int.from_bytes(data[18:26], "big") & ~(2**36 - 1) | round(seconds * RATE)
        data[18:26] = info.to_bytes(8, "big")
        path.write_bytes(bytes(data))

    return make


def mp3_declaring(fraction: float, holding: float) -> Callable[[Path], None]:
    """An MP3 whose Xing header counts `fraction` of the frames it holds."""

    def make(path: Path) -> None:
        sf.write(path, noise(holding), RATE, format="MP3")
        data = bytearray(path.read_bytes())
        at = data.index(b"Xing") + 8  # after the tag and its flags: the frame count
        frames = int.from_bytes(data[at : at + 4], "big")
        data[at : at + 4] = round(frames * fraction).to_bytes(4, "big")
        path.write_bytes(bytes(data))

    return make


def mp3_without_header(holding: float) -> Callable[[Path], None]:
    """An MP3 with no Xing header: the decoder can only estimate its length from its size."""

    def make(path: Path) -> None:
        sf.write(path, noise(holding), RATE, format="MP3")
        data = path.read_bytes()
        path.write_bytes(data.replace(b"Xing", b"\0\0\0\0", 1))

    return make


def noise(seconds: float) -> np.ndarray:
    return (np.random.default_rng(3).standard_normal((round(seconds * RATE), 2)) * 0.1).astype(np.float32)


@pytest.mark.parametrize(
    ("make", "declared_s"),
    [(flac_declaring(2.0, holding=20.0), 2.0), (mp3_declaring(0.1, holding=20.0), 2.0)],
    ids=["flac_declares_2_s_holds_20_s", "mp3_declares_a_tenth_of_20_s"],
)
def test_a_compressed_file_decodes_no_more_than_it_declares(
    tmp_path: Path, make: Callable[[Path], None], declared_s: float
) -> None:
    """What a header declares is checked against the limits, and decoding stops there: whatever the
    file holds beyond it is never decoded, so a small declaration cannot hide a bomb."""
    src, dst = tmp_path / "in", tmp_path / "out.wav"
    make(src)

    result = normalise(src, dst, limits=Limits(max_duration_s=5.0))

    assert result.duration_s == pytest.approx(declared_s, abs=0.1)
    assert len(output_of(dst)) == result.frames


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            flac_declaring(0.0, holding=20.0),
            id="flac_of_unknown_length",
            marks=pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg decodes FLAC of unknown length"),
        ),
        pytest.param(mp3_without_header(holding=20.0), id="mp3_without_length_header"),
    ],
)
def test_a_compressed_file_of_unknown_length_is_held_to_the_duration_limit(
    tmp_path: Path, make: Callable[[Path], None]
) -> None:
    src, dst = tmp_path / "in", tmp_path / "out.wav"
    make(src)

    with pytest.raises(AudioError) as error:
        normalise(src, dst, limits=Limits(max_duration_s=5.0))

    assert error.value.code == "too_long"
    assert not dst.exists() and list(tmp_path.iterdir()) == [src]
