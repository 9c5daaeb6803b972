"""Chords of a mix, one reading per beat: beat-synchronous chroma against chord templates, smoothed by Viterbi.

The chroma is read at the key's 5512.5 Hz rate in the recording's own
tuning, treble and bass apart: the treble says which notes sound, the bass
which of them is the root. Each beat is scored against every root and
quality (templates carry each note's first harmonics, as instruments do),
and a Viterbi pass keeps a chord until the evidence for another outweighs
the cost of a change; chords of the song's key cost less to enter.
"""

from dataclasses import dataclass
from functools import cache

import librosa
import numpy as np

from analyzer import keys

CHORD_RATE = keys.KEY_RATE
# 0.37 s windows every 93 ms: 2.7 Hz bins keep semitones apart down to about 50 Hz.
_N_FFT = 2048
_HOP = 512
_SUB = 10
_COMPRESSION = 10.0
NO_CHORD = "N"
# Intervals above the root, by Harte shorthand; display suffixes beside.
QUALITIES = {
    "maj": (0, 4, 7),
    "min": (0, 3, 7),
    "7": (0, 4, 7, 10),
    "maj7": (0, 4, 7, 11),
    "min7": (0, 3, 7, 10),
    "dim": (0, 3, 6),
    "sus4": (0, 5, 7),
}
SUFFIXES = {"maj": "", "min": "m", "7": "7", "maj7": "maj7", "min7": "m7", "dim": "dim", "sus4": "sus4"}
# Harmonic h of a note sounds 12*log2(h) semitones above it, at 0.6^(h-1) of its weight.
_HARMONICS = 6
_HARMONIC_DECAY = 0.6
# Tuned on the corpus' tuning split (stemflow_dev.corpus; majmin 0.80 -> 0.82 over a grid of these).
_SHARPNESS = 12.0
_BASS_WEIGHT = 0.5
_IN_KEY_BONUS = 0.04
_CHANGE_COST = 1.2
# Segments whose frames are mostly quieter than this share of the song's median frame are "no chord".
_SILENCE = 0.05
_NO_CHORD_SCORE = 0.45
# The mode a chord of each quality implies when it is the tonic chord.
_MODES = {"maj": "major", "7": "major", "maj7": "major", "min": "minor", "min7": "minor"}


@dataclass(frozen=True)
class Chord:
    """A chord from `start` to `end` (seconds): `root` spelled for the key ("E♭"), None for no chord.

    `quality` is Harte's shorthand (maj, min, 7, maj7, min7, dim, sus4; N for
    no chord); `label` is how a lead sheet writes it ("E♭m7", "N.C.").
    `confidence` is the mean share of belief the chord held on its beats.
    """

    start: float
    end: float
    label: str
    root: str | None
    quality: str
    confidence: float


@dataclass(frozen=True)
class Reading:
    """The evidence for every chord on every segment between beats, before the key is known."""

    edges: np.ndarray
    scores: np.ndarray


def estimate(y: np.ndarray, sr: float, beats: list[float], key: str | None) -> list[Chord]:
    """Chord segments of mono `y` at `sr`, changing only on `beats` (every half second without beats)."""
    reading = read(y, sr, beats)
    return [] if reading is None else label(reading, key)


def read(y: np.ndarray, sr: float, beats: list[float]) -> Reading | None:
    """The chord evidence of mono `y` per segment between `beats`; None when there is nothing to read."""
    duration = y.size / sr
    if duration <= 0:
        return None
    treble, bass, times = _chroma(y, sr)
    edges = _edges(beats, duration)
    if times.size == 0 or edges.size < 2:
        return None
    return Reading(edges, _scores(*_synchronise(treble, bass, times, edges)))


def label(reading: Reading, key: str | None) -> list[Chord]:
    """The chord timeline of a reading, chords of `key` favoured and spelled for it."""
    path, belief = _viterbi(reading.scores + _SHARPNESS * _IN_KEY_BONUS * _key_row(key))
    return _segments(reading.edges, path, belief, _labels(), key)


def opening_key(reading: Reading) -> str | None:
    """The key whose tonic chord the music opens on ("A minor"), read without a key; None if it opens on
    a chord that names no mode (sus4, dim) or on none."""
    path, _ = _viterbi(reading.scores)
    for state in path:
        root, quality = _labels()[state]
        if root is not None:
            mode = _MODES.get(quality)
            return None if mode is None else f"{keys.PITCH_CLASSES[root]} {mode}"
    return None


def _chroma(y: np.ndarray, sr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames, 12) treble and bass chroma (in the recording's tuning) and frame times."""
    import soxr

    low = soxr.resample(y, sr, CHORD_RATE) if sr != CHORD_RATE else y
    if low.size < _N_FFT:
        low = np.pad(low, (0, _N_FFT - low.size))
    magnitude = np.abs(librosa.stft(low, n_fft=_N_FFT, hop_length=_HOP))
    peak = magnitude.max()
    if peak == 0:
        return np.zeros((0, 12)), np.zeros((0, 12)), np.zeros(0)
    compressed = np.log1p(_COMPRESSION / peak * magnitude)
    # The tuning from the mean spectrum; then each bank folded to 12 tuned pitch classes before it meets
    # every frame (a tenth of the work of folding the fine chroma frame by frame).
    offset = keys.tuning_offset(_treble_bank() @ compressed.mean(axis=1))
    treble = (_fold(_treble_bank(), offset) @ compressed).T
    bass = (_fold(_bass_bank(), offset) @ compressed).T
    times = np.arange(compressed.shape[1]) * _HOP / CHORD_RATE
    return treble, bass, times


def _edges(beats: list[float], duration: float) -> np.ndarray:
    """Segment boundaries: 0, each beat, the end."""
    grid = np.asarray(beats, float)
    if grid.size < 2:
        grid = np.arange(0.0, duration, 0.5)
    grid = grid[(grid > 0.05) & (grid < duration - 0.05)]
    return np.concatenate([[0.0], grid, [duration]])


def _synchronise(
    treble: np.ndarray, bass: np.ndarray, times: np.ndarray, edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean chroma over each segment's frames (the nearest frame for very short ones), and whether most are quiet."""
    index = np.clip(np.searchsorted(times, edges), 0, times.size - 1)
    starts, stops = index[:-1], np.maximum(index[1:], index[:-1] + 1)
    cumulative = np.vstack([np.zeros((1, 12)), np.cumsum(treble, axis=0)])
    cumulative_bass = np.vstack([np.zeros((1, 12)), np.cumsum(bass, axis=0)])
    level = treble.sum(axis=1)
    cumulative_quiet = np.concatenate([[0], np.cumsum(level < _SILENCE * max(float(np.median(level)), 1e-12))])
    stops = np.minimum(stops, times.size)
    starts = np.minimum(starts, stops - 1)
    counts = (stops - starts)[:, None]
    treble_beats = (cumulative[stops] - cumulative[starts]) / counts
    bass_beats = (cumulative_bass[stops] - cumulative_bass[starts]) / counts
    quiet = (cumulative_quiet[stops] - cumulative_quiet[starts]) / counts[:, 0] > 0.5
    return treble_beats, bass_beats, quiet


@cache
def _labels() -> list[tuple[int | None, str]]:
    """Every state: (root, quality) for 12 roots and each quality, then no chord."""
    return [(root, quality) for quality in QUALITIES for root in range(12)] + [(None, NO_CHORD)]


@cache
def _templates() -> np.ndarray:
    """(chords, 12) unit-length templates: each chord note with its first harmonics."""
    rows = []
    for intervals in QUALITIES.values():
        for root in range(12):
            row = np.zeros(12)
            for interval in intervals:
                for h in range(1, _HARMONICS + 1):
                    row[(root + interval + round(12 * np.log2(h))) % 12] += _HARMONIC_DECAY ** (h - 1)
            rows.append(row / np.linalg.norm(row))
    return np.array(rows)


def _scores(treble: np.ndarray, bass: np.ndarray, quiet: np.ndarray) -> np.ndarray:
    """(beats, states) log-likelihoods: template fit, the bass on the root; no chord where quiet."""
    unit = treble / np.maximum(np.linalg.norm(treble, axis=1, keepdims=True), 1e-12)
    fit = unit @ _templates().T
    bass_share = bass / np.maximum(bass.sum(axis=1, keepdims=True), 1e-12)
    roots = np.array([root for root, _ in _labels()[:-1]])
    fit += _BASS_WEIGHT * bass_share[:, roots]
    # A mostly silent segment names no chord, whatever its few sounding frames hold.
    fit[quiet] = 0.0
    none = np.where(quiet, 1.0, _NO_CHORD_SCORE)
    return _SHARPNESS * np.hstack([fit, none[:, None]])


def _key_row(key: str | None) -> np.ndarray:
    """1 for each chord state of the key (`_in_key`), 0 for the others and for no chord."""
    return np.append(_in_key(key), 0.0)


def _in_key(key: str | None) -> np.ndarray:
    """1 for chords built on the key's scale (natural and harmonic minor) with its notes only, else 0."""
    parsed = keys.parse_key(key) if key else None
    states = _labels()[:-1]
    if parsed is None:
        return np.zeros(len(states))
    tonic, mode = parsed
    scale = {(tonic + s) % 12 for s in ((0, 2, 4, 5, 7, 9, 11) if mode == "major" else (0, 2, 3, 5, 7, 8, 10, 11))}
    return np.array([float(all((root + i) % 12 in scale for i in QUALITIES[q])) for root, q in states])


def _viterbi(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best state per beat under a flat cost for each change, and the belief in it (softmax of the beat's scores)."""
    n, k = scores.shape
    back = np.zeros((n, k), dtype=np.int32)
    total = scores[0].copy()
    for t in range(1, n):
        best = int(np.argmax(total))
        switch = total[best] - _CHANGE_COST
        stay = total >= switch
        back[t] = np.where(stay, np.arange(k), best)
        total = np.where(stay, total, switch) + scores[t]
    path = np.empty(n, dtype=np.int32)
    path[-1] = int(np.argmax(total))
    for t in range(n - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    belief = shifted[np.arange(n), path] / shifted.sum(axis=1)
    return path, belief


def _segments(
    edges: np.ndarray, path: np.ndarray, belief: np.ndarray, states: list[tuple[int | None, str]], key: str | None
) -> list[Chord]:
    """Runs of the same state as chords, spelled for the key."""
    chords: list[Chord] = []
    start = 0
    for i in range(1, path.size + 1):
        if i < path.size and path[i] == path[start]:
            continue
        root, quality = states[path[start]]
        name = None if root is None else keys.spell(root, key)
        label = "N.C." if name is None else f"{name}{SUFFIXES[quality]}"
        confidence = round(float(belief[start:i].mean()), 3)
        chords.append(Chord(round(float(edges[start]), 3), round(float(edges[i]), 3), label, name, quality, confidence))
        start = i
    return chords


def _fold(bank: np.ndarray, offset: int) -> np.ndarray:
    """(12, bins): a fine chroma bank's rows summed over the semitone-wide window of each tuned pitch class."""
    return np.roll(bank, _SUB // 2 - offset, axis=0).reshape(12, _SUB, -1).sum(axis=1)


@cache
def _treble_bank() -> np.ndarray:
    return librosa.filters.chroma(sr=CHORD_RATE, n_fft=_N_FFT, n_chroma=12 * _SUB, dtype=np.float32)


@cache
def _bass_bank() -> np.ndarray:
    """Chroma of about 40-250 Hz, where the bass plays."""
    return librosa.filters.chroma(
        sr=CHORD_RATE, n_fft=_N_FFT, n_chroma=12 * _SUB, ctroct=2.6, octwidth=0.8, dtype=np.float32
    )
