"""Practice mixes: stems in, one file out.

The stems of a section are summed with their gains, the sum's loudness is matched to the original's over
the same section, tempo and pitch are changed with Rubber Band (in process, through pylibrb), the section
is looped, a click is laid on the analysed beats, and the result is written as WAV, FLAC or MP3. Pure:
paths in, a file and its facts out; the caller moves files to and from the blob store.

The mix is rendered at the stems' sample rate (a job may ask for 48 kHz stems while its normalised audio
stays at 44.1 kHz): a file at another rate (a stem, or the original) is resampled to it with soxr, so the
loudness is compared at one rate (K-weighting at two rates differs by ~0.01 dB, enough to spoil a unity mix).
Sections and click times are seconds throughout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyloudnorm
import soundfile as sf
import soxr
from pylibrb import Option, RubberBandStretcher
from scipy import signal

Progress = Callable[[float], None]

# Loudness matching stops where the mix would peak above the original's peak, or above -1 dBFS when the
# original peaks lower: a mix never clips where its original did not.
PEAK_CEILING = 10 ** (-1 / 20)
SEAM_S = 0.005  # fades where a section is cut or a loop repeats, so no seam clicks
CLICK_S = 0.03
BLOCK = 65536  # frames handed to Rubber Band at a time
GATE_LUFS = -70.0
SUBTYPES = {16: "PCM_16", 24: "PCM_24", 32: "FLOAT"}
# Rubber Band per quality (measured in bench/mixes.py and the tests):
# - fast: the R2 ("faster") engine with a short window, phases reset at transients only above the range of
#   fundamentals (its default "crisp" resets detune steady tones by up to a third of a semitone);
# - balanced (default): the R3 ("finer") engine restricted to its short window: R3's clean pitch on complex
#   mixes, vocals and bass at R2's cost (bench/mixes.py; 30 s of a steady tone and of noise bursts at 0.75x,
#   -2 semitones: R3 short tone residue -69 dB, pre-echo 0.2 %, onsets within 2.6 ms, at R2 short's CPU within
#   5 %, whose residue is -44 dB and pre-echo 11 %), onsets drifting early by up to ~16 ms at 0.5x;
# - best: R3 with its full multi-resolution analysis: transients stay sharp (no audible pre-echo), ~2.4x slower.
# Channels are processed together, which keeps the stereo image (centre stays centre, mono-compatible).
ENGINES = {
    "fast": Option.ENGINE_FASTER | Option.TRANSIENTS_MIXED | Option.WINDOW_SHORT,
    "balanced": Option.ENGINE_FINER | Option.WINDOW_SHORT,
    "best": Option.ENGINE_FINER | Option.WINDOW_STANDARD,
}
COMMON = Option.PROCESS_OFFLINE | Option.THREADING_NEVER | Option.CHANNELS_TOGETHER


class MixError(Exception):
    """A mix that cannot be rendered; `code` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)  # both in args, so it pickles back from a worker process
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class MixPlan:
    stems: Sequence[tuple[str, float]]  # (path, linear gain)
    original: str  # the normalised audio the stems were separated from
    tempo: float = 1.0
    semitones: float = 0.0
    start: float | None = None
    end: float | None = None
    loops: int = 1
    click: bool = False
    beats: Sequence[float] = ()
    downbeats: Sequence[float] = ()
    format: str = "wav"
    bit_depth: int | None = 24
    quality: str = "balanced"


@dataclass
class Rendered:
    duration_s: float
    sample_rate: int
    frames: int
    loudness_lufs: float | None
    gain_db: float
    render_s: float
    steps: dict[str, float] = field(default_factory=dict)


def render(plan: MixPlan, out_path: str | Path, progress: Progress | None = None) -> Rendered:
    """Render the plan into `out_path`; MixError when the plan does not fit the audio."""
    report = progress or (lambda _percent: None)
    started = time.process_time()
    steps: dict[str, float] = {}
    clock = _Clock(steps)
    source = sf.info(plan.original)
    sr = render_rate(plan, source.samplerate)
    total = round(source.frames * sr / source.samplerate)  # the song's length in frames at the mix's rate
    first, stop = section_frames(total, sr, plan.start, plan.end)
    with clock("read"):
        original = read_at_rate(plan.original, first, stop, sr)
        mix = np.zeros((original.shape[0], stop - first), np.float32)
        for path, gain in plan.stems:
            if gain > 0:
                mix += np.float32(gain) * _fit(read_at_rate(path, first, stop, sr), mix.shape)
    report(15.0)
    with clock("loudness"):
        wanted, before = loudness(original, sr), loudness(mix, sr)
        ceiling = max(PEAK_CEILING, float(np.max(np.abs(original), initial=0.0)))
    cut = first > 0 or stop < total
    with clock("stretch"):
        out = stretch(mix, sr, plan.tempo, plan.semitones, plan.quality, lambda f: report(20.0 + 65.0 * f))
    gain_db = _matching_gain_db(wanted, before, float(np.max(np.abs(out), initial=0.0)), ceiling)
    out *= np.float32(10 ** (gain_db / 20))
    if cut or plan.loops > 1:
        _fade_ends(out, sr)
    section_out = out.shape[1]
    if plan.loops > 1:
        out = np.tile(out, (1, plan.loops))
    if plan.click:
        lay_click(out, sr, click_times(plan, first / sr, stop / sr, section_out / sr))
    report(88.0)
    with clock("encode"):
        write(out, sr, out_path, plan.format, plan.bit_depth)
    report(100.0)
    return Rendered(
        duration_s=out.shape[1] / sr,
        sample_rate=sr,
        frames=out.shape[1],
        loudness_lufs=None if not np.isfinite(before) else round(before + gain_db, 2),
        gain_db=round(gain_db, 3),
        render_s=round(time.process_time() - started, 3),
        steps=steps,
    )


def section_frames(frames: int, sr: int, start: float | None, end: float | None) -> tuple[int, int]:
    """[first, stop) frames of the section; the whole audio without one."""
    first = round((start or 0.0) * sr)
    stop = frames if end is None else min(round(end * sr), frames)
    if first >= frames:
        raise MixError(
            "section_out_of_range", f"start {start:.2f} s is past the end of the audio ({frames / sr:.2f} s)"
        )
    if stop - first < sr // 10:
        raise MixError("section_too_short", "the section must be at least 0.1 s long")
    return first, stop


def render_rate(plan: MixPlan, original_rate: int) -> int:
    """The rate the mix is rendered at: the first audible stem's (the job's stems share one), else the original's."""
    for path, gain in plan.stems:
        if gain > 0:
            return int(sf.info(path).samplerate)
    return original_rate


def _at_rate(first: int, stop: int, sr: int, rate: int) -> tuple[int, int]:
    """The frames [first, stop) at `sr` as frames at `rate`."""
    return round(first * rate / sr), round(stop * rate / sr)


def read_at_rate(path: str, first: int, stop: int, sr: int) -> np.ndarray:
    """Frames [first, stop) at `sr` of a file, resampled with soxr when the file has another rate."""
    rate = sf.info(path).samplerate
    if rate == sr:
        return _read(path, first, stop)
    start, end = _at_rate(first, stop, sr, rate)
    samples, _ = sf.read(path, start=start, stop=end, dtype="float32", always_2d=True)
    return np.ascontiguousarray(soxr.resample(samples, rate, sr, quality="HQ").T)


def _read(path: str, first: int, stop: int) -> np.ndarray:
    samples, _ = sf.read(path, start=first, stop=stop, dtype="float32", always_2d=True)
    return np.ascontiguousarray(samples.T)


def _fit(samples: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A stem at the original's shape: mono spread to every channel, a few frames short or long evened out."""
    channels, frames = shape
    if samples.shape[0] != channels:
        samples = np.repeat(samples[:1], channels, axis=0)
    if samples.shape[1] >= frames:
        return samples[:, :frames]
    return np.pad(samples, ((0, 0), (0, frames - samples.shape[1])))


def loudness(samples: np.ndarray, sr: int) -> float:
    """BS.1770-4 integrated loudness (LUFS) of (channels, frames); -inf for silence or under 0.4 s.

    pyloudnorm's K-weighting (filtered in float32: the same figure to a thousandth of a dB, four times
    faster), then 400 ms blocks with 75 % overlap as sums of four 100 ms hops, instead of pyloudnorm's
    per-block loop.
    """
    hop = round(0.1 * sr)
    hops = samples.shape[1] // hop
    if hops < 4:
        return float("-inf")
    shelf = pyloudnorm.IIRfilter(4.0, 1 / np.sqrt(2), 1500.0, sr, "high_shelf")
    high_pass = pyloudnorm.IIRfilter(0.0, 0.5, 38.0, sr, "high_pass")
    sos = np.array([np.concatenate([f.b, f.a]) for f in (shelf, high_pass)], dtype=np.float32)
    weighted = signal.sosfilt(sos, samples[:, : hops * hop].astype(np.float32), axis=1)
    per_hop = np.square(weighted).reshape(weighted.shape[0], hops, hop).sum(axis=2, dtype=np.float64)
    summed = per_hop.sum(axis=0)  # channel weights are 1 for L, R (and C)
    powers = (summed[:-3] + summed[1:-2] + summed[2:-1] + summed[3:]) / (4 * hop)
    with np.errstate(divide="ignore"):
        levels = -0.691 + 10 * np.log10(powers)
    gated = powers[levels > GATE_LUFS]
    if gated.size == 0:
        return float("-inf")
    relative = -0.691 + 10 * np.log10(gated.mean()) - 10
    kept = powers[(levels > GATE_LUFS) & (levels > relative)]
    return float(-0.691 + 10 * np.log10(kept.mean()))


def _matching_gain_db(wanted: float, before: float, peak: float, ceiling: float) -> float:
    """The gain that brings the mix to the original's loudness, held where its peak would pass the ceiling."""
    if not (np.isfinite(wanted) and np.isfinite(before)) or peak <= 0:
        return 0.0
    gain = wanted - before
    return float(min(gain, 20 * np.log10(ceiling / peak)))


def stretch(
    samples: np.ndarray, sr: int, tempo: float, semitones: float, quality: str, progress: Progress | None = None
) -> np.ndarray:
    """Tempo changed without pitch and pitch without tempo: Rubber Band stretches, soxr resamples.

    A pitch shift by `p` is a stretch by `p / tempo` and a resampling by `1 / p`, which is what Rubber Band does
    inside; done outside, the resampling is soxr's (exact ratio, 0.5 s for 4 minutes) and Rubber Band only
    stretches, at about half the cost of its own combined pass (bench/mixes.py). The resampling is on the
    side with fewer frames: after the stretch going down, before it going up.
    """
    if tempo == 1.0 and semitones == 0.0:
        return samples.copy()
    channels, frames = samples.shape
    pitch = 2.0 ** (semitones / 12.0)
    if pitch > 1.0:
        samples = _resample(samples, sr, sr / pitch)
    out = _rubber_band(samples, sr, pitch / tempo, quality, progress)
    if pitch < 1.0:
        out = _resample(out, sr, sr / pitch)
    return _fit(out, (channels, round(frames / tempo)))


def _resample(samples: np.ndarray, sr: float, rate: float) -> np.ndarray:
    return np.ascontiguousarray(soxr.resample(samples.T, sr, rate, quality="HQ").T)


def _rubber_band(
    samples: np.ndarray, sr: int, time_ratio: float, quality: str, progress: Progress | None
) -> np.ndarray:
    """Rubber Band offline (study, then process) stretching (channels, frames) by `time_ratio`, pitch kept."""
    channels, frames = samples.shape
    if time_ratio == 1.0:
        return samples.copy()
    stretcher = RubberBandStretcher(
        sample_rate=sr, channels=channels, options=COMMON | ENGINES[quality], initial_time_ratio=time_ratio
    )
    stretcher.set_expected_input_duration(frames)
    stretcher.set_max_process_size(BLOCK)
    for at in range(0, frames, BLOCK):
        stretcher.study(samples[:, at : at + BLOCK], final=at + BLOCK >= frames)
    chunks: list[np.ndarray] = []
    for at in range(0, frames, BLOCK):
        stretcher.process(samples[:, at : at + BLOCK], final=at + BLOCK >= frames)
        chunks.extend(_drain(stretcher))
        if progress is not None:
            progress(min(at + BLOCK, frames) / frames)
    chunks.extend(_drain(stretcher))
    out = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), np.float32)
    return np.ascontiguousarray(out, dtype=np.float32)


def _drain(stretcher: RubberBandStretcher) -> list[np.ndarray]:
    chunks = []
    while stretcher.available() > 0:
        chunks.append(stretcher.retrieve_available())
    return chunks


def _fade_ends(samples: np.ndarray, sr: int) -> None:
    n = min(round(SEAM_S * sr), samples.shape[1] // 2)
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
    samples[:, :n] *= ramp
    samples[:, samples.shape[1] - n :] *= ramp[::-1]


def click_times(plan: MixPlan, start_s: float, stop_s: float, section_out_s: float) -> list[tuple[float, bool]]:
    """Where the beats of the section fall in the rendered mix (tempo applied, every loop), and which are downbeats."""
    accents = {round(d, 3) for d in plan.downbeats}
    inside = [(b, round(b, 3) in accents) for b in plan.beats if start_s <= b < stop_s]
    return [
        (loop * section_out_s + (b - start_s) / plan.tempo, down) for loop in range(plan.loops) for b, down in inside
    ]


def lay_click(samples: np.ndarray, sr: int, times: Sequence[tuple[float, bool]]) -> None:
    """Add a short decaying tone at each time (higher and louder on downbeats), in place."""
    n = round(CLICK_S * sr)
    t = np.arange(n) / sr
    envelope = np.exp(-t / 0.006)
    tones = {
        True: (0.5 * envelope * np.sin(2 * np.pi * 1600 * t)).astype(np.float32),
        False: (0.35 * envelope * np.sin(2 * np.pi * 1000 * t)).astype(np.float32),
    }
    length = samples.shape[1]
    for at_s, downbeat in times:
        at = round(at_s * sr)
        if 0 <= at < length:
            end = min(at + n, length)
            samples[:, at:end] += tones[downbeat][: end - at]


def write(samples: np.ndarray, sr: int, path: str | Path, fmt: str, bit_depth: int | None) -> None:
    """Write (channels, frames) as WAV/FLAC at the bit depth, or MP3 (VBR); integer formats are clipped."""
    data = samples.T
    if fmt == "mp3":
        sf.write(str(path), np.clip(data, -1.0, 1.0), sr, format="MP3", subtype="MPEG_LAYER_III")
        return
    depth = bit_depth or 24
    if depth != 32:
        data = np.clip(data, -1.0, 1.0)
    sf.write(str(path), data, sr, format=fmt.upper(), subtype=SUBTYPES[depth])


class _Clock:
    """Times named steps (CPU seconds of this process) into a dict."""

    def __init__(self, steps: dict[str, float]) -> None:
        self._steps = steps

    def __call__(self, name: str) -> _Step:
        return _Step(self._steps, name)


class _Step:
    def __init__(self, steps: dict[str, float], name: str) -> None:
        self._steps, self._name = steps, name

    def __enter__(self) -> None:
        self._started = time.process_time()

    def __exit__(self, *exc: object) -> None:
        self._steps[self._name] = round(time.process_time() - self._started, 3)
