"""Turn any audio file into 44.1 kHz stereo float WAV, or a stable error code.

The work is blockwise, so memory stays bounded whatever the file's length:
decode a block, mix it to stereo, resample it, hash it, write it. Files are
recognised by their bytes (see `sniff`); libsndfile decodes what it can and
ffmpeg, when installed, the rest (MP4/AAC and friends).
"""

import hashlib
import math
import os
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import soundfile as sf
import soxr

from ingest.sniff import Sniffed, sniff
from stemflow_shared.events import MAX_TRIM_S

SAMPLE_RATE = 44100
CHANNELS = 2
BLOCK_FRAMES = 65536

# MP3 lengths are estimates unless the file carries a Xing/Info frame count.
_MP3_SLACK_FRAMES = 2 * 1152
_MP3_SLACK_RATIO = 0.01

_G = 1 / math.sqrt(2)
# (left, right) gain of each speaker in a stereo downmix (ITU-R BS.775); mono goes to both.
_SPEAKER_GAINS = {
    "M": (1.0, 1.0),
    "FL": (1.0, 0.0),
    "FR": (0.0, 1.0),
    "FC": (_G, _G),
    "LFE": (0.0, 0.0),
    "BL": (_G, 0.0),
    "BR": (0.0, _G),
    "SL": (_G, 0.0),
    "SR": (0.0, _G),
    "BC": (0.5, 0.5),
}
# Default speaker order by channel count: WAV/FLAC (WAVE_FORMAT_EXTENSIBLE) ...
_WAV_LAYOUTS = {
    1: ("M",),
    2: ("FL", "FR"),
    3: ("FL", "FR", "FC"),
    4: ("FL", "FR", "BL", "BR"),
    5: ("FL", "FR", "FC", "BL", "BR"),
    6: ("FL", "FR", "FC", "LFE", "BL", "BR"),
    7: ("FL", "FR", "FC", "LFE", "BC", "SL", "SR"),
    8: ("FL", "FR", "FC", "LFE", "BL", "BR", "SL", "SR"),
}
# ... and Vorbis/Opus, which put the centre second and the LFE last.
_VORBIS_LAYOUTS = {
    **_WAV_LAYOUTS,
    3: ("FL", "FC", "FR"),
    5: ("FL", "FC", "FR", "BL", "BR"),
    6: ("FL", "FC", "FR", "BL", "BR", "LFE"),
    7: ("FL", "FC", "FR", "SL", "SR", "BC", "LFE"),
    8: ("FL", "FC", "FR", "SL", "SR", "BL", "BR", "LFE"),
}


class AudioError(Exception):
    """The file cannot become normalised audio; `code` is stable, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What the service accepts; durations apply to the audio after trimming."""

    min_duration_s: float = 1.0
    max_duration_s: float = 1200.0
    max_channels: int = 8
    min_sample_rate: int = 8000
    max_sample_rate: int = 384000
    silence_dbfs: float = -90.0
    # Float audio may go past full scale a little; samples a thousand times over it are not audio.
    max_peak_dbfs: float = 60.0
    decode_timeout_s: float = 300.0


@dataclass(frozen=True)
class NormalisedAudio:
    """What was written, and what it was made from."""

    duration_s: float
    sample_rate: int
    channels: int
    frames: int
    source_format: str
    source_subtype: str | None
    source_sample_rate: int
    source_channels: int
    peak_dbfs: float
    sha256: str


class _Source(Protocol):
    format: str
    subtype: str | None
    sample_rate: int
    channels: int
    frames: int | None  # as the header declares it; None when unknown before decoding
    layouts: dict[int, tuple[str, ...]]

    def blocks(self, start: int, stop: int | None) -> Iterator[np.ndarray]: ...


def normalise(
    src: Path,
    dst: Path,
    *,
    trim_start: float | None = None,
    trim_end: float | None = None,
    limits: Limits = Limits(),
) -> NormalisedAudio:
    """Write `src` to `dst` as 44.1 kHz stereo 32-bit float WAV.

    `trim_start`/`trim_end` are seconds of the source; a `trim_end` past the
    end is clamped to it, while a negative, empty or reversed span, or one that
    starts past the end, is `bad_trim`. Raises AudioError with a stable `code`
    for anything wrong with the audio; OSError (missing `src`, full disk) is
    left to propagate because it says nothing about the file's content. On any
    failure `dst` does not exist afterwards.
    """
    _check_trim_args(trim_start, trim_end)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, part_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
    os.close(fd)
    part = Path(part_name)
    try:
        with _open(src, limits) as source:
            start, stop = _span(source, trim_start, trim_end, limits)
            result = _convert(source, start, stop, part, limits)
        os.replace(part, dst)
        return result
    except BaseException:
        part.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
        raise


def _check_trim_args(trim_start: float | None, trim_end: float | None) -> None:
    for name, value in (("trim_start", trim_start), ("trim_end", trim_end)):
        if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_TRIM_S):
            raise AudioError("bad_trim", f"{name} must be between 0 and {MAX_TRIM_S:.0f} seconds, not {value}")
    if trim_end is not None and trim_end <= (trim_start or 0.0):
        raise AudioError("bad_trim", f"trim_end ({trim_end} s) must come after trim_start ({trim_start or 0} s)")


@contextmanager
def _open(src: Path, limits: Limits) -> Iterator[_Source]:
    """Recognise `src` and open the decoder its content calls for."""
    if src.stat().st_size == 0:
        raise AudioError("empty", "the file is empty")
    sniffed = sniff(src)
    if sniffed is None:
        raise AudioError("not_audio", "the file is not in an audio format we recognise")
    if sniffed.truncated:
        raise AudioError("corrupt", f"the {sniffed.container} file is cut short: it ends before its audio does")
    # Absurd values a header declares get their own code, before a decoder calls the file unreadable;
    # zeros are malformed headers, which the decoder reports.
    if sniffed.channels and sniffed.sample_rate:
        _check_layout(sniffed.channels, sniffed.sample_rate, limits)
    if sniffed.decoder == "ffmpeg":
        with _FfmpegSource.open(src, sniffed, limits) as source:
            _check_stream(source, limits)
            yield source
        return
    with _SndfileSource.open(src, sniffed) as source:
        _check_stream(source, limits)
        yield source


def _check_stream(source: _Source, limits: Limits) -> None:
    """Check what the header says before anything is decoded."""
    if source.channels < 1:
        raise AudioError("corrupt", "the header declares no channels")
    _check_layout(source.channels, source.sample_rate, limits)
    if source.frames == 0:
        raise AudioError("empty", "the file holds no audio")


def _check_layout(channels: int, sample_rate: int, limits: Limits) -> None:
    if channels > limits.max_channels:
        raise AudioError("too_many_channels", f"{channels} channels; at most {limits.max_channels} are accepted")
    if not limits.min_sample_rate <= sample_rate <= limits.max_sample_rate:
        raise AudioError(
            "bad_sample_rate", f"{sample_rate} Hz is outside {limits.min_sample_rate}-{limits.max_sample_rate} Hz"
        )


def _span(source: _Source, trim_start: float | None, trim_end: float | None, limits: Limits) -> tuple[int, int | None]:
    """Source frames [start, stop) to keep, checked against the declared length and the limits."""
    rate = source.sample_rate
    start = round((trim_start or 0.0) * rate)
    stop = None if trim_end is None else round(trim_end * rate)
    if source.frames is None:
        return start, stop
    if start >= source.frames:
        raise AudioError(
            "trim_out_of_range",
            f"trim_start ({trim_start} s) is past the end of the audio ({source.frames / rate:.3f} s)",
        )
    stop = source.frames if stop is None else min(stop, source.frames)
    _check_duration((stop - start) / rate, limits)
    return start, stop


def _check_duration(seconds: float, limits: Limits) -> None:
    if seconds < limits.min_duration_s:
        raise AudioError("too_short", f"{seconds:.3f} s of audio; at least {limits.min_duration_s} s are needed")
    if seconds > limits.max_duration_s:
        raise AudioError("too_long", f"{seconds:.1f} s of audio; at most {limits.max_duration_s} s are accepted")


def _convert(source: _Source, start: int, stop: int | None, part: Path, limits: Limits) -> NormalisedAudio:
    """Decode, mix to stereo, resample, hash and write, one block at a time."""
    sink = _Sink(part)
    try:
        taken = _pump(source, start, stop, sink, limits)
        sink.finish()
    finally:
        sink.close()
    if taken == 0:
        raise AudioError("trim_out_of_range" if start else "empty", "no audio in the requested span")
    if source.frames is None:
        _check_duration(taken / source.sample_rate, limits)
    peak_dbfs = 20 * math.log10(sink.peak) if sink.peak > 0 else -math.inf
    if peak_dbfs < limits.silence_dbfs:
        raise AudioError("silent", f"the audio is silent (peak {peak_dbfs:.1f} dBFS)")
    if peak_dbfs > limits.max_peak_dbfs:
        raise AudioError(
            "samples_out_of_range",
            f"the samples peak at {peak_dbfs:.0f} dBFS, over {limits.max_peak_dbfs:.0f}: not audio at a usable scale",
        )
    return NormalisedAudio(
        duration_s=sink.frames / SAMPLE_RATE,
        sample_rate=SAMPLE_RATE,
        channels=CHANNELS,
        frames=sink.frames,
        source_format=source.format,
        source_subtype=source.subtype,
        source_sample_rate=source.sample_rate,
        source_channels=source.channels,
        peak_dbfs=peak_dbfs,
        sha256=sink.hasher.hexdigest(),
    )


def _pump(source: _Source, start: int, stop: int | None, sink: "_Sink", limits: Limits) -> int:
    """Move source frames [start, stop) into `sink`; return how many were taken."""
    mix = _downmix_matrix(source.layouts.get(source.channels), source.channels)
    resampler = None
    if source.sample_rate != SAMPLE_RATE:
        resampler = soxr.ResampleStream(source.sample_rate, SAMPLE_RATE, CHANNELS, dtype="float32", quality="HQ")
    # Sources of unknown length are held to the limit while they stream.
    max_frames = math.floor(limits.max_duration_s * source.sample_rate)
    taken = 0
    for block in source.blocks(start, stop):
        taken += len(block)
        if taken > max_frames:
            raise AudioError("too_long", f"more than {limits.max_duration_s} s of audio")
        stereo = block if mix is None else _to_stereo(block, mix)
        sink.write(stereo if resampler is None else resampler.resample_chunk(stereo))
    if resampler is not None:
        sink.write(resampler.resample_chunk(np.zeros((0, CHANNELS), np.float32), last=True))
    return taken


class _Sink:
    """The output WAV, written as it goes, with the running peak, length and hash of its samples."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("wb")
        self.file.write(_float_wav_header(0))
        self.hasher = hashlib.sha256()
        self.peak = 0.0
        self.frames = 0

    def write(self, block: np.ndarray) -> None:
        if not len(block):
            return
        # NaN and inf survive mixing and resampling, so checking the output suffices.
        peak = max(float(block.max()), -float(block.min()))
        if not math.isfinite(peak):
            raise AudioError("corrupt", "the audio contains NaN or infinite samples")
        self.peak = max(self.peak, peak)
        samples = np.ascontiguousarray(block, dtype="<f4").data
        self.hasher.update(samples)
        self.file.write(samples)
        self.frames += len(block)

    def finish(self) -> None:
        """Write the final sizes into the header."""
        self.file.seek(0)
        self.file.write(_float_wav_header(self.frames))
        self.file.close()

    def close(self) -> None:
        self.file.close()


def _float_wav_header(frames: int) -> bytes:
    """RIFF header of a 32-bit float stereo WAV holding `frames` frames."""
    frame_bytes = 4 * CHANNELS
    data_bytes = frames * frame_bytes
    fmt = struct.pack("<HHIIHHH", 3, CHANNELS, SAMPLE_RATE, SAMPLE_RATE * frame_bytes, frame_bytes, 32, 0)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<II", 4, frames)
    # A RIFF size is 32 bits: about 3.4 hours at this rate, far above any sane max_duration_s.
    riff = struct.pack("<4sI4s", b"RIFF", 4 + len(chunks) + 8 + data_bytes, b"WAVE")
    return riff + chunks + b"data" + struct.pack("<I", data_bytes)


def _downmix_matrix(layout: tuple[str, ...] | None, channels: int) -> np.ndarray | None:
    """The (channels, 2) stereo mix for `layout`, or None when it is stereo already.

    Known layouts use the ITU-R BS.775 gains, unscaled like ffmpeg's float
    downmix: the output is float, so overs are kept rather than clipped, and
    centred voices keep their level. Unknown layouts average all channels.
    """
    if layout == ("FL", "FR"):
        return None
    if layout is None:
        return np.full((channels, CHANNELS), 1 / channels, dtype=np.float32)
    return np.array([_SPEAKER_GAINS[speaker] for speaker in layout], dtype=np.float32)


def _to_stereo(block: np.ndarray, mix: np.ndarray) -> np.ndarray:
    if mix.shape[0] == 1:
        return np.repeat(block, CHANNELS, axis=1)
    return block @ mix


class _SndfileSource:
    """A file libsndfile decodes (WAV, AIFF, FLAC, Ogg Vorbis/Opus, MP3 ...)."""

    def __init__(self, sniffed: Sniffed, file: sf.SoundFile) -> None:
        self.file = file
        self.format = sniffed.container
        self.subtype = file.subtype
        self.sample_rate = file.samplerate
        self.channels = file.channels
        self.frames: int | None = file.frames
        self.layouts = _VORBIS_LAYOUTS if sniffed.container == "OGG" else _WAV_LAYOUTS

    @classmethod
    @contextmanager
    def open(cls, src: Path, sniffed: Sniffed) -> Iterator["_SndfileSource"]:
        try:
            file = sf.SoundFile(src)
        except sf.LibsndfileError as error:
            raise AudioError(
                "corrupt", f"the {sniffed.container} file cannot be decoded: {error.error_string}"
            ) from None
        with file:
            if file.format not in _SNDFILE_FORMATS[sniffed.container]:
                raise AudioError("corrupt", f"the file starts as {sniffed.container} but decodes as {file.format}")
            yield cls(sniffed, file)

    def blocks(self, start: int, stop: int | None) -> Iterator[np.ndarray]:
        stop = self.file.frames if stop is None else stop
        buffer = np.empty((min(BLOCK_FRAMES, stop - start), self.channels), dtype=np.float32)
        read = 0
        try:
            self.file.seek(start)
            while read < stop - start:
                want = min(len(buffer), stop - start - read)
                block = self.file.read(want, dtype="float32", always_2d=True, out=buffer[:want])
                if not len(block):
                    break
                read += len(block)
                yield block
        except sf.LibsndfileError as error:
            raise AudioError("corrupt", f"decoding failed after {read} frames: {error.error_string}") from None
        missing = stop - start - read
        slack = _MP3_SLACK_FRAMES + _MP3_SLACK_RATIO * (stop - start) if self.format == "MP3" else 0
        if missing > slack:
            raise AudioError("corrupt", f"the file ends {missing} frames before the length its header declares")


_SNDFILE_FORMATS = {
    "WAV": {"WAV", "WAVEX"},
    "RF64": {"RF64"},
    "W64": {"W64"},
    "AIFF": {"AIFF"},
    "CAF": {"CAF"},
    "FLAC": {"FLAC"},
    "OGG": {"OGG"},
    "MP3": {"MP3"},
}

# ffmpeg's demuxer for each container we send it, so it never guesses by itself.
_FFMPEG_DEMUXERS = {
    "MP4": "mov",
    "AAC": "aac",
    "MATROSKA": "matroska",
    "ASF": "asf",
    "WAV": "wav",
    "OGG": "ogg",
    "FLAC": "flac",
}


class _FfmpegSource:
    """A file ffmpeg decodes, streamed to us as float WAV through a pipe."""

    def __init__(self, sniffed: Sniffed, process: subprocess.Popen, stderr: BinaryIO, rate: int, channels: int) -> None:
        self.process = process
        self.stderr = stderr
        self.format = sniffed.container
        self.subtype: str | None = None
        self.sample_rate = rate
        self.channels = channels
        self.frames: int | None = None
        self.layouts = _WAV_LAYOUTS

    @classmethod
    @contextmanager
    def open(cls, src: Path, sniffed: Sniffed, limits: Limits) -> Iterator["_FfmpegSource"]:
        ffmpeg = shutil.which("ffmpeg")
        if ffmpeg is None:
            raise AudioError("unsupported_format", f"decoding {sniffed.container} needs ffmpeg, which is not installed")
        with tempfile.TemporaryFile() as stderr:
            process = subprocess.Popen(
                _ffmpeg_command(ffmpeg, src, sniffed.container),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
            watchdog = threading.Timer(limits.decode_timeout_s, process.kill)
            watchdog.start()
            try:
                rate, channels = _read_wav_stream_header(process.stdout, sniffed.container, stderr)
                yield cls(sniffed, process, stderr, rate, channels)
            except AudioError:
                if watchdog.finished.is_set():
                    raise AudioError("corrupt", f"ffmpeg took longer than {limits.decode_timeout_s} s") from None
                raise
            finally:
                watchdog.cancel()
                process.kill()
                process.wait()

    def blocks(self, start: int, stop: int | None) -> Iterator[np.ndarray]:
        frame_bytes = 4 * self.channels
        position = 0
        while stop is None or position < stop:
            data = _read_exactly(self.process.stdout, BLOCK_FRAMES * frame_bytes)
            usable = len(data) - len(data) % frame_bytes
            if not usable:
                self._finish()
                return
            block = np.frombuffer(data[:usable], dtype="<f4").reshape(-1, self.channels)
            first, last = max(start - position, 0), len(block) if stop is None else min(len(block), stop - position)
            position += len(block)
            if first < last:
                yield block[first:last]

    def _finish(self) -> None:
        """Fail unless ffmpeg decoded the whole file."""
        self.process.stdout.close()
        if self.process.wait() != 0:
            raise _ffmpeg_failed(self.format, self.stderr)


def _ffmpeg_command(ffmpeg: str, src: Path, container: str) -> list[str]:
    """Decode the first audio stream only, from local files only, as float WAV on stdout."""
    return [
        ffmpeg,
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-protocol_whitelist",
        "file",
        "-f",
        _FFMPEG_DEMUXERS[container],
        "-i",
        f"file:{src.resolve()}",
        "-map",
        "0:a:0",
        "-map_metadata",
        "-1",
        "-c:a",
        "pcm_f32le",
        "-f",
        "wav",
        "-bitexact",
        "pipe:1",
    ]


def _ffmpeg_failed(container: str, stderr: BinaryIO) -> AudioError:
    stderr.seek(0)
    said = stderr.read().decode(errors="replace").strip().splitlines()
    return AudioError(
        "corrupt", f"ffmpeg could not decode the {container} file: {said[-1] if said else 'no reason given'}"
    )


def _read_wav_stream_header(stream: BinaryIO, container: str, stderr: BinaryIO) -> tuple[int, int]:
    """Read ffmpeg's WAV header up to the data chunk; return (sample rate, channels)."""
    riff = _read_exactly(stream, 12)
    if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:] != b"WAVE":
        raise _ffmpeg_failed(container, stderr)
    fmt = None
    while True:
        header = _read_exactly(stream, 8)
        if len(header) < 8:
            raise _ffmpeg_failed(container, stderr)
        chunk, size = struct.unpack("<4sI", header)
        if chunk == b"data":
            break
        body = _read_exactly(stream, size + (size & 1))
        if chunk == b"fmt " and len(body) >= 8:
            fmt = body
    if fmt is None:
        raise _ffmpeg_failed(container, stderr)
    channels, rate = struct.unpack_from("<HI", fmt, 2)
    return rate, channels


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    """Read `size` bytes, fewer only at the end of the stream."""
    parts = []
    while size > 0:
        part = stream.read(size)
        if not part:
            break
        parts.append(part)
        size -= len(part)
    return b"".join(parts)
