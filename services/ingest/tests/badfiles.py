"""A corpus of files `normalise` must reject, each with the error code it must give."""

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from ingest.audio import Limits

RATE = 44100


@dataclass(frozen=True)
class BadFile:
    """One rejected input: how to make it, and what `normalise` must say."""

    name: str
    code: str
    make: Callable[[Path], None]
    limits: Limits = field(default_factory=Limits)
    trim: tuple[float | None, float | None] = (None, None)


def sine(seconds: float, rate: int = RATE, channels: int = 2, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    """A (frames, channels) float32 sine, the same on every channel."""
    t = np.arange(round(seconds * rate)) / rate
    wave = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)


def write(data: np.ndarray, rate: int = RATE, fmt: str = "WAV", subtype: str | None = None) -> Callable[[Path], None]:
    return lambda path: sf.write(path, data, rate, format=fmt, subtype=subtype)


def raw(content: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content)


def cut(make: Callable[[Path], None], keep: float | int) -> Callable[[Path], None]:
    """Make the file, then keep only its first bytes (a fraction, or a count)."""

    def make_cut(path: Path) -> None:
        make(path)
        data = path.read_bytes()
        path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])

    return make_cut


def patch(make: Callable[[Path], None], find: bytes, skip: int, value: bytes) -> Callable[[Path], None]:
    """Make the file, then overwrite bytes `skip` past the first `find`."""

    def make_patched(path: Path) -> None:
        make(path)
        data = bytearray(path.read_bytes())
        at = data.index(find) + skip
        data[at : at + len(value)] = value
        path.write_bytes(bytes(data))

    return make_patched


def with_value(seconds: float, at: float, value: float) -> np.ndarray:
    data = sine(seconds)
    data[round(at * RATE)] = value
    return data


def _noise(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def corpus() -> list[BadFile]:
    """Every bad input, named after what is wrong with it."""
    wav = write(sine(2.0), subtype="PCM_16")
    flac = write(sine(2.0), fmt="FLAC")
    return [
        BadFile("zero_length", "empty", raw(b"")),
        BadFile("random_bytes", "not_audio", raw(_noise(5000, 1))),
        BadFile("random_bytes_large", "not_audio", raw(_noise(200_000, 2))),
        BadFile("text_named_wav", "not_audio", raw(b"hello, this is not audio\n" * 100)),
        BadFile("html_page", "not_audio", raw(b"<!doctype html><html><body>404</body></html>\n")),
        BadFile("json_document", "not_audio", raw(json.dumps({"audio": [0.1] * 500}).encode())),
        BadFile("png_image", "not_audio", raw(b"\x89PNG\r\n\x1a\n" + _noise(3000, 3))),
        BadFile("zip_archive", "not_audio", raw(b"PK\x03\x04" + _noise(3000, 4))),
        BadFile("riff_avi", "not_audio", raw(b"RIFF\x00\x10\x00\x00AVI LIST" + _noise(3000, 5))),
        BadFile("tiny_prefix", "not_audio", raw(b"RIFF")),
        BadFile("wav_truncated", "corrupt", cut(wav, 0.5)),
        BadFile("wav_header_cut", "corrupt", cut(wav, 30)),
        BadFile("wav_huge_data_size", "corrupt", patch(wav, b"data", 4, struct.pack("<I", 0x7FFFFFF0))),
        BadFile("wav_garbage_after_riff", "corrupt", raw(b"RIFF\x00\x10\x00\x00WAVE" + _noise(4000, 6))),
        BadFile("wav_zero_channels", "corrupt", patch(wav, b"fmt ", 10, b"\x00\x00")),
        BadFile("wav_zero_rate", "corrupt", patch(wav, b"fmt ", 12, b"\x00\x00\x00\x00")),
        BadFile("flac_truncated", "corrupt", cut(flac, 0.5)),
        BadFile("flac_header_cut", "corrupt", cut(flac, 20)),
        BadFile("flac_garbage", "corrupt", raw(b"fLaC" + _noise(4000, 7))),
        BadFile("mp3_truncated", "corrupt", cut(write(sine(2.0), fmt="MP3"), 0.5)),
        BadFile("id3_then_garbage", "corrupt", raw(b"ID3\x04\x00\x00\x00\x00\x00\x10" + bytes(16) + _noise(3000, 8))),
        BadFile("ogg_vorbis_truncated", "corrupt", cut(write(sine(2.0), fmt="OGG", subtype="VORBIS"), 0.5)),
        BadFile("ogg_opus_truncated", "corrupt", cut(write(sine(2.0, 48000), 48000, "OGG", "OPUS"), 0.5)),
        BadFile("ogg_garbage", "corrupt", raw(b"OggS" + _noise(4000, 9))),
        BadFile("aiff_truncated", "corrupt", cut(write(sine(2.0), fmt="AIFF", subtype="PCM_16"), 0.5)),
        BadFile("wav_nan", "corrupt", write(with_value(2.0, 1.0, np.nan), subtype="FLOAT")),
        BadFile("wav_inf", "corrupt", write(with_value(2.0, 0.2, np.inf), subtype="FLOAT")),
        BadFile("wav_nan_late", "corrupt", write(with_value(5.0, 4.9, np.nan), subtype="DOUBLE")),
        BadFile("wav_no_frames", "empty", write(np.zeros((0, 2), np.float32), subtype="PCM_16")),
        BadFile("ogg_no_frames", "empty", write(np.zeros((0, 2), np.float32), fmt="OGG", subtype="VORBIS")),
        BadFile("wav_silent", "silent", write(np.zeros((RATE * 2, 2), np.float32), subtype="PCM_16")),
        BadFile("flac_silent", "silent", write(np.zeros((RATE * 2, 1), np.float32), fmt="FLAC")),
        BadFile("wav_below_silence_floor", "silent", write(sine(2.0, amp=1e-5), subtype="FLOAT")),
        BadFile("wav_too_short", "too_short", write(sine(0.5))),
        BadFile("flac_too_long", "too_long", write(sine(3.0), fmt="FLAC"), Limits(max_duration_s=2.0)),
        BadFile("mp3_too_long", "too_long", write(sine(3.0), fmt="MP3"), Limits(max_duration_s=2.0)),
        BadFile("wav_8_channels", "too_many_channels", write(sine(2.0, channels=8)), Limits(max_channels=6)),
        BadFile(
            "flac_8_channels", "too_many_channels", write(sine(2.0, channels=8), fmt="FLAC"), Limits(max_channels=6)
        ),
        BadFile("wav_4_khz", "bad_sample_rate", write(sine(2.0, 4000), 4000)),
        BadFile("flac_4_khz", "bad_sample_rate", write(sine(2.0, 4000), 4000, "FLAC")),
        BadFile("wav_400_khz", "bad_sample_rate", write(sine(2.0, 400_000), 400_000)),
        BadFile("trim_reversed", "bad_trim", wav, trim=(1.5, 0.5)),
        BadFile("trim_equal", "bad_trim", wav, trim=(1.0, 1.0)),
        BadFile("trim_negative_start", "bad_trim", wav, trim=(-0.5, 1.5)),
        BadFile("trim_negative_end", "bad_trim", wav, trim=(None, -1.0)),
        BadFile("trim_nan", "bad_trim", wav, trim=(float("nan"), None)),
        BadFile("trim_inf", "bad_trim", wav, trim=(None, float("inf"))),
        BadFile("trim_start_past_end", "bad_trim", wav, trim=(5.0, 6.0)),
        BadFile("trim_too_short", "too_short", wav, trim=(0.5, 1.0)),
    ]
