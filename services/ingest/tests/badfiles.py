"""A corpus of files `normalise` must reject, each with the error code it must give."""

import json
import shutil
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
    # What the user called it: names never decide the format, so a good extension must not help.
    filename: str = "in.wav"


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


def declare_frames(make: Callable[[Path], None], frames: int) -> Callable[[Path], None]:
    """Make a FLAC, then make its STREAMINFO declare `frames` samples per channel."""

    def make_declared(path: Path) -> None:
        make(path)
        data = bytearray(path.read_bytes())
        info = int.from_bytes(data[18:26], "big") & ~(2**36 - 1) | frames
        data[18:26] = info.to_bytes(8, "big")
        path.write_bytes(bytes(data))

    return make_declared


def sparse_wav(seconds: float, rate: int = RATE, channels: int = 2) -> Callable[[Path], None]:
    """A 16-bit WAV of `seconds` of digital silence, its data a hole in a sparse file (no disk used)."""

    def make_sparse(path: Path) -> None:
        sf.write(path, np.zeros((rate, channels), np.float32), rate, format="WAV", subtype="PCM_16")
        head = bytearray(path.read_bytes())
        at = head.index(b"data") + 8
        size = round(seconds * rate) * channels * 2
        head[at - 4 : at] = struct.pack("<I", size)
        head[4:8] = struct.pack("<I", at - 8 + size)
        path.write_bytes(bytes(head[:at]))
        with path.open("r+b") as f:
            f.truncate(at + size)

    return make_sparse


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
    two_hours = 2 * 3600
    # Containers only ffmpeg opens: garbage inside is corrupt where it is installed, else unsupported.
    ffmpeg_garbage = "corrupt" if shutil.which("ffmpeg") else "unsupported_format"
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
        BadFile("pdf_named_mp3", "not_audio", raw(b"%PDF-1.4\n" + _noise(3000, 10)), filename="song.mp3"),
        BadFile(
            "jpeg_named_flac",
            "not_audio",
            raw(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + _noise(3000, 11)),
            filename="song.flac",
        ),
        BadFile("zip_named_m4a", "not_audio", raw(b"PK\x03\x04" + _noise(3000, 12)), filename="song.m4a"),
        BadFile("text_named_ogg", "not_audio", raw(b"OGG VORBIS AUDIO FILE\n" * 50), filename="song.ogg"),
        BadFile(
            "mp4_garbage_named_m4a",
            ffmpeg_garbage,
            raw(b"\x00\x00\x00\x18ftypM4A \x00\x00\x02\x00isomiso2" + _noise(3000, 13)),
            filename="song.m4a",
        ),
        BadFile(
            "matroska_garbage_named_webm",
            ffmpeg_garbage,
            raw(b"\x1a\x45\xdf\xa3" + _noise(3000, 14)),
            filename="song.webm",
        ),
        BadFile("wav_truncated", "corrupt", cut(wav, 0.5)),
        BadFile("wav_header_cut", "corrupt", cut(wav, 30)),
        BadFile("wav_huge_data_size", "corrupt", patch(wav, b"data", 4, struct.pack("<I", 0x7FFFFFF0))),
        BadFile(
            "aiff_huge_data_size",
            "corrupt",
            patch(write(sine(2.0), fmt="AIFF", subtype="PCM_16"), b"SSND", 4, struct.pack(">I", 0x7FFFFFF0)),
        ),
        BadFile("rf64_truncated", "corrupt", cut(write(sine(2.0), fmt="RF64", subtype="PCM_16"), 0.5)),
        BadFile("w64_truncated", "corrupt", cut(write(sine(2.0), fmt="W64", subtype="PCM_16"), 0.5)),
        BadFile("caf_truncated", "corrupt", cut(write(sine(2.0), fmt="CAF", subtype="PCM_16"), 0.5)),
        # A header that claims two hours but holds two seconds lies: the file is cut short.
        BadFile(
            "wav_declares_2_hours_holds_2_s", "corrupt", patch(wav, b"data", 4, struct.pack("<I", two_hours * RATE * 4))
        ),
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
        BadFile("aiff_nan", "corrupt", write(with_value(2.0, 1.0, np.nan), fmt="AIFF", subtype="FLOAT")),
        BadFile("w64_nan", "corrupt", write(with_value(2.0, 1.0, np.nan), fmt="W64", subtype="FLOAT")),
        BadFile("caf_minus_inf", "corrupt", write(with_value(2.0, 1.0, -np.inf), fmt="CAF", subtype="FLOAT")),
        BadFile("wav_no_frames", "empty", write(np.zeros((0, 2), np.float32), subtype="PCM_16")),
        BadFile("ogg_no_frames", "empty", write(np.zeros((0, 2), np.float32), fmt="OGG", subtype="VORBIS")),
        BadFile("wav_silent", "silent", write(np.zeros((RATE * 2, 2), np.float32), subtype="PCM_16")),
        BadFile("flac_silent", "silent", write(np.zeros((RATE * 2, 1), np.float32), fmt="FLAC")),
        BadFile("wav_below_silence_floor", "silent", write(sine(2.0, amp=1e-5), subtype="FLOAT")),
        BadFile("mp3_silent", "silent", write(np.zeros((RATE * 2, 2), np.float32), fmt="MP3")),
        BadFile("ogg_opus_silent", "silent", write(np.zeros((96000, 2), np.float32), 48000, "OGG", "OPUS")),
        BadFile("wav_too_short", "too_short", write(sine(0.5))),
        BadFile("flac_too_long", "too_long", write(sine(3.0), fmt="FLAC"), Limits(max_duration_s=2.0)),
        BadFile("mp3_too_long", "too_long", write(sine(3.0), fmt="MP3"), Limits(max_duration_s=2.0)),
        # Two real hours (a sparse file of silence): refused on the header, before 1.3 GB is decoded.
        BadFile("wav_2_hours", "too_long", sparse_wav(two_hours)),
        BadFile("flac_declares_2_hours", "too_long", declare_frames(flac, two_hours * RATE)),
        BadFile("wav_8_channels", "too_many_channels", write(sine(2.0, channels=8)), Limits(max_channels=6)),
        BadFile(
            "flac_8_channels", "too_many_channels", write(sine(2.0, channels=8), fmt="FLAC"), Limits(max_channels=6)
        ),
        BadFile("wav_4_khz", "bad_sample_rate", write(sine(2.0, 4000), 4000)),
        BadFile("flac_4_khz", "bad_sample_rate", write(sine(2.0, 4000), 4000, "FLAC")),
        BadFile("wav_400_khz", "bad_sample_rate", write(sine(2.0, 400_000), 400_000)),
        BadFile("wav_7999_hz", "bad_sample_rate", write(sine(2.0, 7999), 7999)),
        BadFile("flac_7999_hz", "bad_sample_rate", write(sine(2.0, 7999), 7999, "FLAC")),
        BadFile("wav_384001_hz", "bad_sample_rate", write(sine(2.0, 384_001), 384_001)),
        BadFile("wav_declares_1_hz", "bad_sample_rate", patch(wav, b"fmt ", 12, struct.pack("<I", 1))),
        BadFile("wav_declares_4_ghz", "bad_sample_rate", patch(wav, b"fmt ", 12, struct.pack("<I", 4_000_000_000))),
        BadFile("wav_9_channels", "too_many_channels", write(sine(1.5, channels=9))),
        BadFile("wav_16_channels", "too_many_channels", write(sine(1.5, channels=16))),
        BadFile("wav_declares_65535_channels", "too_many_channels", patch(wav, b"fmt ", 10, struct.pack("<H", 65535))),
        BadFile("trim_reversed", "bad_trim", wav, trim=(1.5, 0.5)),
        BadFile("trim_equal", "bad_trim", wav, trim=(1.0, 1.0)),
        BadFile("trim_negative_start", "bad_trim", wav, trim=(-0.5, 1.5)),
        BadFile("trim_negative_end", "bad_trim", wav, trim=(None, -1.0)),
        BadFile("trim_nan", "bad_trim", wav, trim=(float("nan"), None)),
        BadFile("trim_inf", "bad_trim", wav, trim=(None, float("inf"))),
        BadFile("trim_start_past_end", "trim_out_of_range", wav, trim=(5.0, 6.0)),
        BadFile("trim_huge_finite_end", "bad_trim", wav, trim=(None, 1e308)),
        BadFile("float_samples_1e30", "samples_out_of_range", write(sine(2.0) * 1e30, subtype="FLOAT")),
        BadFile("trim_too_short", "too_short", wav, trim=(0.5, 1.0)),
    ]
