"""Tempo, beats, bars, key, loudness and an energy curve of a mix: samples in, `Analysis` out.

Only the level meters read the full-rate signal. Tempo, beats and bars come
from an 11025 Hz mono mixdown, the key from a 5512.5 Hz one (see `keys`), so
a song takes a small fraction of its duration on one core.
"""

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import librosa
import numba
import numpy as np
import pyloudnorm
import scipy.fft
import soxr

from analyzer import chords as chord_reader
from analyzer import keys
from analyzer.chords import Chord

RHYTHM_RATE = 11025
_N_FFT = 1024
_HOP = 256
_FPS = RHYTHM_RATE / _HOP
_N_MELS = 40
# A frame's flux peaks once an onset is well inside the right half of its window, about this long
# after the frame's centre. With 20 ms the corpus' rendered drums read 15-25 ms late and its winds and
# organ chorales 50-80 ms (past mir_eval's 70 ms); with 8 ms, the tests' clicks read 14-25 ms early
# (tuning split: chorales' beat F 0.53 -> 0.58, arrangements' unchanged).
_ONSET_DELAY_S = 0.008
# A beat is placed near where its onset's rise began (`_attack_starts`): where the flux, rising without a
# dip, first stood this share of the way from the floor before it to its peak (at most `_ATTACK_FRAMES`
# back), plus `_ATTACK_SLACK` frames. Winds and strings rise over several frames and read 50-70 ms late
# by their peak. Tuning split: chorales' beat F 0.60 -> 0.66, arrangements' 0.939 -> 0.940 (stems
# unchanged); no slack would give 0.67, but reads the tests' clicks up to 44 ms early (30 ms with 0.7).
_ATTACK_SHARE = 0.5
_ATTACK_FRAMES = 8
_ATTACK_SLACK = 0.7
_PRE_ROLL_S = _N_FFT / 2 / RHYTHM_RATE

# Stems (demucs' names) that carry the beat, and those that carry the harmony.
RHYTHM_STEMS = ("drums", "bass")
TONAL_STEMS = ("bass", "other", "guitar", "piano")
# Combining the stems' rhythm with the mix's: tempo, beats and bars are read from the mix with the drums
# and bass added again at the mix's level, so the rhythm section leads while the chords still mark the
# beat and the bar line (half-time and four-on-the-floor bass lines fall off the beat). A drums stem
# quieter than `_DRUMS_FLOOR_DB` under the mix is none: the bass alone keeps time worse than the mix.
# Tuning split, arrangements with their true stems: tempo Acc1 0.938 (mix alone) -> 0.975, beat F
# 0.927 -> 0.965, downbeat F 0.861 -> 0.886; added at half or twice the level 0.963 or 0.950, 0.954 or
# 0.957, 0.882 or 0.863; the drums and bass read on their own, taken where their tempo differs from the
# mix's and their beats are the more regular, 0.975, 0.940, 0.868.
_DRUMS_FLOOR_DB = -30.0

MIN_BPM = 40.0
MAX_BPM = 240.0
# Tempo prior: log-normal around 120 BPM, one octave wide (as librosa's).
_PRIOR_BPM = 120.0
# Tempo salience (`_comb`): the autocorrelation at the beat period plus shares of it at two and at
# three or four periods (the bar). Off: with 0.3 each (tuning split Acc1 0.89 -> 0.90) a plain 120 BPM
# backbeat read as 80 (its bar repeats the 1.5-beat lag too), which the demo song and the tests catch.
_COMB = (1.0, 0.0, 0.0)
# A period two or three thirds of the autocorrelation's pick replaces it when its duple salience
# (`_dotted_or_straight`) is this many times the pick's (1.0 does as well on arrangements; chorales' Acc2 0.82 -> 0.86).
_DOTTED_MARGIN = 1.1
# Octave choice (`_choose_octave`), tuned on the tuning split of stemflow_dev.corpus. With the slower
# reading's halfway strength and the faster's evenness alone (weight 3, bias 1.3), arrangements' Acc1
# went 0.69 -> 0.94 on the mix; adding the faster reading's own halfway strength (a beat is subdivided:
# a ballad's eighth hats read at double tempo leave nothing between the doubled beats) took it to
# 0.975 (true stems 0.975 -> 0.988) with chorales unchanged; weights of 2-3 and biases of 1.6-1.75 do
# as well.
_OCTAVE_WEIGHT = 2.0
_OCTAVE_BIAS = 1.65
# The drums' evidence may double a reading only up to this tempo: above it, eighth-note hats of an
# ordinary backbeat (a 120 BPM rock beat) read as a 240 BPM pulse. Punk's 170-200 stays reachable.
_MAX_DOUBLED_BPM = 200.0
# Half-time: below this tempo, the high band's sixteenths at least this share of its eighths, and its
# triplet points under this share of the beats (tuning split: half-time 0.96-1.68 and 0.07-0.11,
# 6/8 and chorales at most 0.77 or at least 0.31).
_SLOW_BPM = 80.0
_SIXTEENTHS_RATIO = 0.8
_TRIPLETS_RATIO = 0.2
# Above this tempo, a reading whose weaker beats are a syncopated groove's eighths (`_syncopated`) is doubled
# back: pop grooves at 82-96 BPM with sixteenth hats read at 171-184 (the doubling's evidence there, sixteenths
# between eighths, is the same as a half-time groove's). Tuning split with 16 more live, pop16, half-time,
# ballad and rock songs each: the three such songs' weaker places 0.20-0.26 and 1.00; every reading above
# 150 BPM on its true tempo (half-time, punk) at least 0.45 where one place is full; a pop16 song read right
# at 114 BPM shows 0.26 and 0.93 too, so the rule holds only above half-time grooves' tempi. Arrangements'
# tempo Acc1 there 0.950 -> 0.969, beat F 0.972 -> 0.978.
_SYNCOPATED_BPM = 160.0
_SYNCOPATED_EMPTY = 0.3
_SYNCOPATED_FULL = 0.8
# Legato music (`_legato`): where the mel flux's 95th percentile stands under this many times its median
# (tuning split: strings, organ and choir chorales 1.59-1.98; winds 3.0-5.4, piano 16-19, every arrangement
# 2.97 or more), the beat is read from the flux in semitone bands (`_pitch_flux`): the mel flux of a legato
# line is mostly noise, its autocorrelation peaking off every pulse (chorales' tempo Acc2 0.86 -> 0.95).
# Those readings then counted the passing eighths (all ten at double tempo); `_chord_pulse` halves one where
# the chords change on one parity of its beats this many standard errors more (six of the ten at 4.98-7.87,
# the other four at 0.45-1.71; read at their true tempo, the other chorales' beats part at 0.04-3.68), and
# the harmony, not the drum rules (`_on_kicks`, `_on_energy_rises`: strings' slow rises put the beats on the
# off-beats), places them. Tuning split, chorales: tempo Acc1 0.73 -> 0.82, beat F 0.66 -> 0.85, chords
# majmin 0.73 -> 0.75; arrangements unchanged.
_LEGATO_PEAKINESS = 2.5
_CHORD_PULSE_CONTRAST = 2.5
# Mel band ranges (of `_N_MELS` from 30 Hz) of the low (to ~480 Hz), middle (~2.3 kHz) and high bands.
_BAND_SPLITS = ((0, 6), (6, 22), (22, 40))
# Beat phase (`_on_energy_rises`): the beats move to the points halfway between them when the energy rises
# there (linear power summed over the mel bands) `_PHASE_RATIO` times as much as on them, or at least
# `_PHASE_SHARED_RATIO` times as much while the high band's (drum hits: claps, snares, a kick's click; not
# bass notes or chord stabs) rises `_PHASE_HIGH_RATIO` times as much. The log flux that finds the period
# favours sounds entering from quiet: a four-on-the-floor groove's off-beat bass, stabs and open hats read
# as its beats over the kick and claps, a half-time groove's hats over its kick and snare. The energy alone
# moved 7 of the 12 readings on the off-beats of the tuning split with 16 more four-on-the-floor, live and
# pop16 songs each (0.64-4.44; those on the beat read at most 0.83, a chorale in time 1.2); with the high
# band's (1.39-30 on those, at most 0.87 on arrangements on the beat; two chorales 1.58-1.65 at 0.45-0.57
# overall), 11. A synthetic kick without a click has no high band, so the energy alone still decides there.
_PHASE_RATIO = 1.4
_PHASE_SHARED_RATIO = 0.7
_PHASE_HIGH_RATIO = 1.3
# Before that rule, the kicks (`_on_kicks`): a kick is a rise of the power under ~130 Hz (`_KICK_BINS`) that
# falls again within `_KICK_DECAY_FRAMES` (70 ms; the corpus' kicks fall to 5-35% of their peak by then, its held
# and plucked bass notes stay at 60-95%). The beats are placed on a grid of half periods; where the kicks fall
# on one parity of that grid `_KICK_RATIO` times as much as on the other, and average `_KICK_STRENGTH` of the
# mean low power or more (a chorale's bass notes read 0.1 at a ratio of 3.6), the beats go onto that parity.
# The tracker follows a four-on-the-floor intro or breakdown without a kick (its off-beat bass and stabs) and
# the groove's beats from one place on: the kicks and the grid bring the whole song onto them.
# Tuning split with 16 more four-on-the-floor, live and pop16 songs each: four-on-the-floor beat F 0.906 ->
# 0.987 (ratios 3.6-5000; ballads and half-time grooves, kicks on and between the beats, at most 1.8).
_KICK_BINS = (2, 12)
_KICK_DECAY_FRAMES = 3
_KICK_RATIO = 3.0
_KICK_STRENGTH = 0.3
# End beats weaker than this share of the median beat are in silence.
_EDGE_STRENGTH = 0.1
# A beat is on the grid within this share of a period.
_GRID_TOLERANCE = 0.1
# Half and double tempo readings less sure than this are not worth stating.
_MIN_ALTERNATIVE_CONFIDENCE = 0.05

# Bars: a meter and phase are stated only when the beats they make first in
# the bar stand this many standard errors above the others, at least as far
# as the next best meter and phase, over at least this many bars. Beats of
# noise and of unaccented clicks score at most 2.0 (tests' songs of 70-160
# BPM); on the corpus' tuning split, 2.2 and no margin state bars on more
# songs than 3.0 and a margin of 1.0 (downbeat F 0.72 -> 0.80).
_METERS = (3, 4)
_BAR_MIN_CONTRAST = 2.2
_BAR_MIN_MARGIN = 0.0
_BAR_MIN_COUNT = 4
# The backbeat's weight against a beat starting a bar: claps on 2 and 4 over a four-on-the-floor kick
# otherwise put the bar line on them (tuning split, arrangements: downbeat F 0.82 -> 0.87; four-on-the-floor
# 0.25 -> 0.61; weights of 0.75-1.0 do as well, 0.5 and 1.5 worse).
_BAR_SNARE_WEIGHT = 0.75
# ... only where the middle band's weaker alternate beats fall below this share of the stronger: a
# metronome's louder bar click is no backbeat.
_BACKBEAT_RATIO = 0.8
# Mel bands (of `_N_MELS` from 30 Hz) whose onsets are the kick and the bass: up to about 480 Hz.
_BASS_BANDS = 6

# Loudness gating step (BS.1770: 400 ms blocks overlapping by 75%) and the energy curve's hop.
BLOCK_S = 0.1
# Digital silence in dB, so that every field stays a finite (JSON-safe) number.
SILENCE_DBFS = -120.0
# BS.1770's absolute gate: nothing quieter counts as programme.
LOUDNESS_FLOOR_LUFS = -70.0

# ITU-R BS.1770-4 Annex 2: 4x oversampling interpolator, phases 0 and 1 of 4;
# the prototype is symmetric, so phases 2 and 3 are these reversed.
_TRUE_PEAK_PHASE_0 = (0.0017089843750, 0.0109863281250, -0.0196533203125, 0.0332031250000,
                      -0.0594482421875, 0.1373291015625, 0.9721679687500, -0.1022949218750,
                      0.0476074218750, -0.0266113281250, 0.0148925781250, -0.0083007812500)  # fmt: skip
_TRUE_PEAK_PHASE_1 = (-0.0291748046875, 0.0292968750000, -0.0517578125000, 0.0891113281250,
                      -0.1665039062500, 0.4650878906250, 0.7797851562500, -0.2003173828125,
                      0.1015625000000, -0.0582275390625, 0.0330810546875, -0.0189208984375)  # fmt: skip


# (name, start, end) in nanoseconds since the epoch: spans a parent process can record after the fact.
Step = tuple[str, int, int]


@dataclass(frozen=True)
class Analysis:
    """What the analyzer reports about a mix.

    Times are in seconds, beats rounded to the millisecond; levels in dB
    (LUFS, or dBFS with a full-scale square wave at 0). Confidences run from
    0 (a guess) to 1. `energy` is the RMS of every `energy_hop_s` block,
    relative to the loudest block.

    The doubt is stated, not hidden: `tempo_alternatives` are the half and
    double tempo readings of the same pulse that are at all plausible, each
    with the tempo confidence scaled by how strongly the song repeats at that
    period relative to the chosen one; `key_alternatives` is the runner-up
    key, whose confidence shares a scale with `key_confidence` (all 24 keys'
    sum to 1). `downbeats` (bar starts, a subset of `beats`) and `meter`
    (beats per bar, 3 or 4) are given only when the bars are clear; otherwise
    they are empty and None.
    """

    tempo_bpm: float
    tempo_confidence: float
    beats: list[float]
    key: str
    key_confidence: float
    loudness_lufs: float
    true_peak_dbfs: float
    rms_dbfs: float
    duration_s: float
    beat_count: int
    energy: list[float]
    energy_hop_s: float
    tempo_alternatives: list["TempoAlternative"]
    key_alternatives: list["KeyAlternative"]
    downbeats: list[float]
    meter: int | None
    chords: list[Chord] = field(default_factory=list)
    key_camelot: str | None = None
    key_open_key: str | None = None
    sources: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TempoAlternative:
    """Another reading of the same pulse (half or double tempo), as `AnalysisResult` carries it."""

    bpm: float
    confidence: float


@dataclass(frozen=True)
class KeyAlternative:
    """A runner-up key, as `AnalysisResult` carries it."""

    key: str
    confidence: float


@dataclass(frozen=True)
class _Rhythm:
    bpm: float
    confidence: float
    beats: np.ndarray
    alternatives: list[TempoAlternative] = field(default_factory=list)
    downbeats: np.ndarray = field(default_factory=lambda: np.zeros(0))
    meter: int | None = None


def analyze(
    samples: np.ndarray, sr: int, steps: list[Step] | None = None, stems: Mapping[str, np.ndarray] | None = None
) -> Analysis:
    """Analyse float samples shaped (channels, n) at `sr` Hz, and the song's separated `stems` if given.

    Never fails on silence or very short input: what cannot be measured comes
    back as a floor rather than an error. No beats gives tempo 0.0 and no
    beats; no pitched energy gives key "unknown"; both with confidence 0.0.
    Loudness below BS.1770's absolute gate, or input shorter than one 400 ms
    gating block, reads -70 LUFS; silent peaks and RMS read -120 dBFS.
    `stems` (name to samples like `samples`, e.g. "drums", "bass", "other"):
    tempo, beats and bars are read from the mix with the drums and bass
    added at its level (when the drums play); the key from the mix, opening on the tonal stems' first chord;
    chords from the tonal stems (`sources` says which). Levels are the mix's.
    `steps`, when given, receives the wall-clock span of each step (for traces).
    """
    x = np.ascontiguousarray(np.atleast_2d(samples), dtype=np.float32)
    sources: dict[str, str] = {}
    with _timed(steps, "rhythm"):
        low = soxr.resample(x.mean(axis=0), sr, RHYTHM_RATE)
        beat_stems = _mono_sum(stems, RHYTHM_STEMS, sr) if _drums_play(stems, x) else None
        if beat_stems is None:
            rhythm = _rhythm(low)
            if stems:
                sources["rhythm"] = "mix"
        else:
            rhythm, sources["rhythm"] = _rhythm(low + _level_gain(low, beat_stems) * beat_stems), "mix+stems"
    tonal = _mono_sum(stems, TONAL_STEMS, sr)
    with _timed(steps, "chords"):
        reading = chord_reader.read(low if tonal is None else tonal, RHYTHM_RATE, list(rhythm.beats))
    with _timed(steps, "key"):
        opening = chord_reader.opening_key(reading) if reading else None
        # The key from the mix, opening chord from the tonal stems: on the corpus' tuning split the stems'
        # own key profile, alone or averaged with the mix's, did worse (MIREX 0.93 -> 0.90).
        (key, key_confidence), *key_runners_up = keys.rank(keys.scores(low, RHYTHM_RATE, opening))
        if tonal is not None:
            sources.update(key="mix+stems", chords="stems")
    known_key = key if key != keys.UNKNOWN else None
    chords = chord_reader.label(reading, known_key) if reading else []
    with _timed(steps, "loudness"):
        hop = max(1, round(BLOCK_S * sr))
        weighted, plain = _block_energies(x, _k_weighting(sr), hop)
        energy = np.sqrt(plain.mean(axis=0) / hop)
        loudness = _integrated_loudness(weighted.sum(axis=0) / hop)
        true_peak = _dbfs(_true_peak(x))
        rms = _dbfs(np.sqrt(sum(float(np.dot(c, c)) for c in x) / max(x.size, 1)))
    return Analysis(
        tempo_bpm=rhythm.bpm,
        tempo_confidence=rhythm.confidence,
        beats=[round(float(t), 3) for t in rhythm.beats],
        key=key,
        key_confidence=key_confidence,
        loudness_lufs=loudness,
        true_peak_dbfs=true_peak,
        rms_dbfs=rms,
        duration_s=x.shape[1] / sr,
        beat_count=len(rhythm.beats),
        energy=[round(float(e), 4) for e in energy / max(energy.max(initial=0.0), 1e-12)],
        energy_hop_s=hop / sr,
        tempo_alternatives=rhythm.alternatives,
        key_alternatives=[KeyAlternative(name, confidence) for name, confidence in key_runners_up],
        downbeats=[round(float(t), 3) for t in rhythm.downbeats],
        meter=rhythm.meter,
        chords=chords,
        key_camelot=keys.camelot(key),
        key_open_key=keys.open_key(key),
        sources=sources,
    )


def _drums_play(stems: Mapping[str, np.ndarray] | None, mix: np.ndarray) -> bool:
    """Whether there is a drums stem above `_DRUMS_FLOOR_DB` of the mix: without drums (a chorale), the bass
    alone keeps time worse than the whole mix."""
    if not stems or "drums" not in stems:
        return False
    drums = np.atleast_2d(stems["drums"])
    return bool(np.sqrt(np.mean(drums**2)) >= 10 ** (_DRUMS_FLOOR_DB / 20) * np.sqrt(np.mean(mix**2)))


def _level_gain(reference: np.ndarray, y: np.ndarray) -> float:
    """The gain that brings `y` to the RMS level of `reference`."""
    return float(np.sqrt(np.mean(reference**2) / max(float(np.mean(y**2)), 1e-20)))


def _mono_sum(stems: Mapping[str, np.ndarray] | None, names: tuple[str, ...], sr: int) -> np.ndarray | None:
    """The named stems (those present) summed to mono at `RHYTHM_RATE`; None when none is present."""
    chosen = [np.atleast_2d(stems[name]).mean(axis=0) for name in names if stems and name in stems]
    if not chosen or any(c.size != chosen[0].size for c in chosen):
        return None
    return soxr.resample(np.ascontiguousarray(np.sum(chosen, axis=0), dtype=np.float32), sr, RHYTHM_RATE)


@contextlib.contextmanager
def _timed(steps: list[Step] | None, name: str) -> Iterator[None]:
    if steps is None:
        yield
        return
    start = time.time_ns()
    try:
        yield
    finally:
        steps.append((name, start, time.time_ns()))


def warm_up() -> None:
    """Run every code path once, so that numba compiles before the first real job."""
    # Long enough (18 beats) for the bars to be looked for.
    t = np.arange(9 * 44100) / 44100
    clicks = (np.sin(2 * np.pi * 440 * t) * (t % 0.5 < 0.05)).astype(np.float32)
    analyze(np.stack([clicks, clicks]), 44100)
    analyze(np.zeros((2, 1000), np.float32), 44100)


# --- tempo and beats --------------------------------------------------------


def _rhythm(y: np.ndarray) -> _Rhythm:
    """Tempo, confidence, beat times, octave alternatives and bars of mono `y` at `RHYTHM_RATE`."""
    power = _power_spectrogram(y)
    mel = power @ _mel_bank().T
    onsets, bass_onsets, bands = _onset_envelopes(mel)
    legato = _legato(onsets)
    if legato:
        onsets = _pitch_flux(power)
    acf = _autocorrelation(onsets)
    lag = _tempo_lag(acf)
    if lag is None:
        return _Rhythm(0.0, 0.0, np.zeros(0))
    lag, beats = _choose_octave(onsets, bands, acf, lag)
    if legato:
        # No drums: the harmony places the beat (_chord_pulse), not the energy's rises or kicks.
        lag, beats = _chord_pulse(power, lag, beats)
    elif (on_kicks := _on_kicks(power, beats, lag)) is not None:
        beats = on_kicks
    else:
        beats = _on_energy_rises(mel, beats)
    if beats.size < 2:
        return _Rhythm(0.0, 0.0, np.zeros(0))
    frames = _refine(onsets, beats)
    peaks = frames / _FPS - _PRE_ROLL_S + _ONSET_DELAY_S
    period = _fit_period(peaks, lag / _FPS)
    clarity = np.clip(_interpolate(acf, period * _FPS), 0.0, 1.0)
    confidence = float(clarity * _regularity(peaks, period))
    index = _grid_index(np.clip(peaks, 0.0, y.size / RHYTHM_RATE), period)
    first_in_bar, meter = _bars(power, onsets, bass_onsets, bands[1], frames, index)
    times = np.clip(_attack_starts(onsets, frames) / _FPS - _PRE_ROLL_S + _ONSET_DELAY_S, 0.0, y.size / RHYTHM_RATE)
    return _Rhythm(
        60.0 / period,
        confidence,
        times,
        _octave_alternatives(acf, period, confidence),
        times[first_in_bar] if meter else np.zeros(0),
        meter,
    )


def _power_spectrogram(y: np.ndarray) -> np.ndarray:
    """(frames, bins) power of `_N_FFT`-long windows every `_HOP` samples, the first centred on `-_PRE_ROLL_S`."""
    # A window of silence before the first frame, so that a hit on the very first sample shows as a rise.
    padded = np.pad(y, (_N_FFT, _N_FFT // 2))
    frames = np.lib.stride_tricks.sliding_window_view(padded, _N_FFT)[::_HOP]
    return np.abs(scipy.fft.rfft(frames * _hann(), axis=-1)) ** 2


def _onset_envelopes(mel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spectral flux of the log of a (frames, bands) mel spectrogram, one value per frame: over all bands, over the
    bass bands, and (3, frames) over the low, middle and high bands (kick and bass; snare body and chords; hats and
    snare noise).
    """
    rise = _log_rises(mel)
    bands = np.array([rise[:, lo:hi].mean(axis=1) for lo, hi in _BAND_SPLITS])
    return rise.mean(axis=1), rise[:, :_BASS_BANDS].mean(axis=1), bands


def _log_rises(power: np.ndarray) -> np.ndarray:
    """`_rises` of a (frames, bands) power in dB, floored 80 dB under its loudest value."""
    db = 10 * np.log10(np.maximum(power, 1e-10))
    return _rises(np.maximum(db, db.max(initial=-100.0) - 80.0))


def _rises(x: np.ndarray) -> np.ndarray:
    """How much `x` rises from each frame (axis 0) to the next, 0 where it falls and at the first frame."""
    return np.concatenate([np.zeros((1, *x.shape[1:])), np.maximum(np.diff(x, axis=0), 0.0)])


def _autocorrelation(onsets: np.ndarray) -> np.ndarray:
    """Autocorrelation of the mean-removed envelope, 1.0 at lag 0 (all zeros if flat)."""
    centred = onsets - onsets.mean()
    spectrum = scipy.fft.rfft(centred, 2 * centred.size)
    acf = scipy.fft.irfft(np.abs(spectrum) ** 2)[: centred.size]
    return acf / acf[0] if acf.size and acf[0] > 0 else np.zeros_like(acf)


def _tempo_prior(bpm: np.ndarray | float) -> np.ndarray | float:
    """Weight of a tempo before any evidence: log-normal around `_PRIOR_BPM`, one octave wide."""
    return np.exp(-0.5 * np.log2(bpm / _PRIOR_BPM) ** 2)


def _tempo_lag(acf: np.ndarray) -> float | None:
    """Beat period in frames: the autocorrelation peak weighted by the tempo prior, to a fraction of a frame."""
    lags = np.arange(1, acf.size - 1)
    bpm = 60 * _FPS / lags
    score = np.where((bpm >= MIN_BPM) & (bpm <= MAX_BPM), _comb(acf, lags) * _tempo_prior(bpm), 0.0)
    if score.size == 0 or score.max() <= 0:
        return None
    best = int(lags[np.argmax(score)])
    return _dotted_or_straight(acf, best + _parabolic_offset(acf[best - 1 : best + 2]))


def _dotted_or_straight(acf: np.ndarray, lag: float) -> float:
    """The lag, or two or three thirds of it where that period repeats more strongly in duple groups.

    Dotted rhythms (a pop groove's kick, bass and chords every 1.5 beats) and 6/8's quarter notes make
    the autocorrelation peak a fifth off the beat, which octave choices cannot mend. The beat is the
    period whose multiples 1, 2 and 4 (half bar and bar) repeat best: the dotted period's 2 and 4 fall
    off the bar (tuning split, arrangements: tempo Acc1 0.89 -> 0.93, Acc2 0.94 -> 0.99).
    """
    best, best_score = lag, _DOTTED_MARGIN * _duple_salience(acf, lag)
    for factor in (2 / 3, 3 / 2):
        score = _duple_salience(acf, lag * factor)
        if score > best_score:
            best, best_score = lag * factor, score
    if best == lag:
        return lag
    lo = int(np.floor(0.98 * best))
    peak = lo + int(np.argmax(acf[lo : int(np.ceil(1.02 * best)) + 1]))
    return peak + _parabolic_offset(acf[peak - 1 : peak + 2])


def _duple_salience(acf: np.ndarray, lag: float) -> float:
    """Mean autocorrelation peak at 1, 2 and 4 times `lag`, times the tempo prior; 0 outside the tempo range."""
    bpm = 60 * _FPS / lag
    if not MIN_BPM <= bpm <= MAX_BPM:
        return 0.0
    peaks = []
    for multiple in (1, 2, 4):
        lo, hi = int(np.floor(0.98 * multiple * lag)), int(np.ceil(1.02 * multiple * lag))
        peaks.append(max(float(acf[lo : hi + 1].max()), 0.0) if lo >= 1 and hi < acf.size else 0.0)
    return float(np.mean(peaks)) * float(_tempo_prior(bpm))


def _comb(acf: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """The autocorrelation at each lag plus shares of it at two and at three or four times the lag."""

    def at(multiple: int) -> np.ndarray:
        i = lags * multiple
        return np.where(i < acf.size, acf[np.minimum(i, acf.size - 1)], 0.0)

    w1, w2, w34 = _COMB
    return w1 * acf[lags] + w2 * at(2) + w34 * np.maximum(at(3), at(4))


def _track(onsets: np.ndarray, lag: float) -> np.ndarray:
    """Beat frames by librosa's dynamic programme, held to the given period, with spurious end beats trimmed.

    The programme keeps the beat going through silence, and ends its path on
    the last strong onset even when that is off the beat (a song cut short),
    squeezing the last intervals to reach it. librosa's own trim also drops
    weak but genuine beats, so ours drops only end beats with almost no onset
    or next to an interval more than `_GRID_TOLERANCE` off the period.
    """
    bpm = 60 * _FPS / lag
    _, beats = librosa.beat.beat_track(onset_envelope=onsets, sr=RHYTHM_RATE, hop_length=_HOP, bpm=bpm, trim=False)
    if beats.size < 4:
        return beats
    strength = _local_max(onsets, beats)
    weak = strength < _EDGE_STRENGTH * np.median(strength)
    off = np.abs(np.diff(beats) - lag) > _GRID_TOLERANCE * lag
    start, end = 0, beats.size
    while end - start > 3 and (weak[end - 1] or off[end - 2] or off[end - 3]):
        end -= 1
    while end - start > 3 and (weak[start] or off[start] or off[start + 1]):
        start += 1
    return beats[start:end]


def _choose_octave(onsets: np.ndarray, bands: np.ndarray, acf: np.ndarray, lag: float) -> tuple[float, np.ndarray]:
    """The beat period (frames), the autocorrelation's choice or an octave of it, and its beats.

    The autocorrelation alone cannot tell a pulse from its half or double, so
    neighbouring readings are tracked and weighed on the drums' evidence too:
    a reading is too slow when the points halfway between its beats are
    strong (the snare of a backbeat, on the "and"), and too fast when every
    other beat is weak (hats alone) or nothing falls between its beats (a
    beat is subdivided: a slow song's eighth notes read as beats leave the
    points between them empty). The faster of two readings wins when its
    extra salience plus `_OCTAVE_WEIGHT` times (halfway strength of the
    slower + evenness of the faster + halfway strength of the faster -
    `_OCTAVE_BIAS`) is positive. Below
    `_SLOW_BPM`, hats in even sixteenths make a half-time groove, counted at
    double tempo as DJs and charts count it (a 140 BPM dubstep track, not 70);
    above `_SYNCOPATED_BPM`, beats every other one of which is a syncopated
    groove's eighth are counted at half the tempo.
    """
    tracked: dict[float, np.ndarray] = {}

    def track(period: float) -> np.ndarray:
        # Each period is tracked once: the half-time and syncopation rules below may ask for a reading's again.
        if period not in tracked:
            tracked[period] = _track(onsets, period)
        return tracked[period]

    readings = {}
    for factor in (0.5, 1.0, 2.0):
        candidate = lag * factor
        ceiling = _MAX_DOUBLED_BPM if factor < 1 else MAX_BPM
        if MIN_BPM <= 60 * _FPS / candidate <= ceiling and candidate >= 4:
            beats = track(candidate)
            if beats.size >= 4 and _salience(acf, candidate) > 0:
                readings[factor] = (candidate, beats, np.log(_salience(acf, candidate)), *_beat_contrasts(bands, beats))
    if 1.0 not in readings:
        return lag, track(lag)
    chosen = readings[1.0]
    if 0.5 in readings and _faster_wins(chosen, readings[0.5]):
        chosen = readings[0.5]
    elif 2.0 in readings and not _faster_wins(readings[2.0], chosen):
        chosen = readings[2.0]
    period, beats = chosen[0], chosen[1]
    if 60 * _FPS / period < _SLOW_BPM and _half_time(bands[-1], beats):
        period /= 2
        beats = track(period)
    elif 60 * _FPS / period > _SYNCOPATED_BPM and _syncopated(bands, beats):
        period *= 2
        beats = track(period)
    return period, beats


def _kick_strength(low: np.ndarray) -> np.ndarray:
    """Per frame, how much a kick starts in the `low` bins' power: its rise, as far as it falls again within
    `_KICK_DECAY_FRAMES` (a held bass note's does not)."""
    rise = _rises(low)
    peak = np.maximum(low, np.concatenate([low[1:], [0.0]]))
    later = np.concatenate([low[_KICK_DECAY_FRAMES:], np.zeros(min(_KICK_DECAY_FRAMES, low.size))])[: low.size]
    return np.minimum(rise, np.maximum(peak - later, 0.0))


def _half_grid(beats: np.ndarray, lag: float) -> tuple[np.ndarray, np.ndarray]:
    """Each beat's place on a grid of half periods fitted to the beats, and the fit (frame of a place: a quadratic,
    so that slow tempo drift stays on the grid)."""
    middle = beats.size // 2
    index = np.round((beats - beats[middle]) / (lag / 2))
    for _ in range(3):
        fit = np.polyfit(index, beats, 2 if beats.size >= 8 else 1)
        fit = np.concatenate([np.zeros(3 - fit.size), fit])
        slope = np.maximum(2 * fit[0] * index + fit[1], 1e-9)
        index = np.round(index + (beats - np.polyval(fit, index)) / slope)
    return index.astype(int), fit


def _on_kicks(power: np.ndarray, beats: np.ndarray, lag: float) -> np.ndarray | None:
    """The beats, with those between the kicks moved onto them; None where the kicks do not tell."""
    if beats.size < 4:
        return None
    low = power[:, _KICK_BINS[0] : _KICK_BINS[1]].sum(axis=1)
    kick = _kick_strength(low)
    half = round(float(lag) / 2)
    index, fit = _half_grid(beats, lag)
    parity = index % 2
    on = _local_max(kick, beats)
    off = _local_max(kick, np.minimum(beats + half, kick.size - 1))
    evidence = [float(on[parity == p].sum() + off[parity != p].sum()) for p in (0, 1)]
    winner = int(np.argmax(evidence))
    strength = evidence[winner] / beats.size / max(float(low.mean()), 1e-12)
    if evidence[winner] < _KICK_RATIO * evidence[1 - winner] or strength < _KICK_STRENGTH:
        return None
    moved = parity != winner
    if not moved.any():
        return beats
    places = index + moved
    frames = np.minimum(beats + half * moved, kick.size - 1).astype(float)
    expected = np.polyval(fit, places)
    # Beats that land between places (while the tracker slid from the off-beats to the beats) take their place.
    astray = np.abs(frames - expected) > _GRID_TOLERANCE * lag
    frames[astray] = expected[astray]
    order = np.lexsort((np.abs(frames - expected), places))
    first = np.concatenate([[True], np.diff(places[order]) != 0])
    chosen = np.round(frames[order][first]).astype(int)
    return chosen[(chosen >= 0) & (chosen < kick.size)]


def _on_energy_rises(mel: np.ndarray, beats: np.ndarray) -> np.ndarray:
    """The beats, or the points halfway between them where the energy rises more (see `_PHASE_RATIO`).

    The rises are of linear power, so a kick under sustained sound counts for its energy, not for how far
    it lifts its bands in dB.
    """
    if beats.size < 4:
        return beats
    halfway = (beats[1:] + beats[:-1]) // 2

    def ratio(power: np.ndarray) -> float:
        rise = _rises(power)
        return float(_local_max(rise, halfway).mean()) / max(float(_local_max(rise, beats[:-1]).mean()), 1e-12)

    overall = ratio(mel.sum(axis=1))
    if overall <= _PHASE_SHARED_RATIO or (
        overall <= _PHASE_RATIO and ratio(mel[:, _BAND_SPLITS[-1][0] :].sum(axis=1)) <= _PHASE_HIGH_RATIO
    ):
        return beats
    last = beats[-1] + (beats[-1] - beats[-2]) // 2
    return np.append(halfway, last) if last < mel.shape[0] else halfway


def _half_time(high: np.ndarray, beats: np.ndarray) -> bool:
    """Whether the hats play sixteenths of these beats as strongly as eighths, and no triplets: a half-time groove."""
    step = np.diff(beats)

    def strength(*fractions: float) -> float:
        return float(np.mean([_local_max(high, beats[:-1] + np.round(step * f).astype(int)).mean() for f in fractions]))

    halfway = max(strength(0.5), 1e-12)
    return strength(0.25, 0.75) / halfway >= _SIXTEENTHS_RATIO and strength(1 / 3, 2 / 3) < _TRIPLETS_RATIO * strength(
        0
    )


def _syncopated(bands: np.ndarray, beats: np.ndarray) -> bool:
    """Whether the weaker half of these beats are subdivisions: counted in fours, one of their two places is all
    but empty in every band (under `_SYNCOPATED_EMPTY` of the strongest place) while the other is full in some
    band (`_SYNCOPATED_FULL` or more): a syncopated groove's eighths, not a pulse."""
    if beats.size < 4 * _BAR_MIN_COUNT:
        return False
    count = beats.size // 4 * 4
    places = np.array([_local_max(band, beats[:count]).reshape(-1, 4).mean(axis=0) for band in bands])
    places /= np.maximum(places.max(axis=1, keepdims=True), 1e-12)
    weaker = int(places[:, 1::2].sum() < places[:, 0::2].sum())
    pair = places[:, [weaker, weaker + 2]]
    return bool(pair.min(axis=1).max() < _SYNCOPATED_EMPTY and pair.max() >= _SYNCOPATED_FULL)


def _faster_wins(slow: tuple[Any, ...], fast: tuple[Any, ...]) -> bool:
    """Whether the faster of two readings (period, beats, log salience, halfway, alternate) is the pulse."""
    return bool(fast[2] - slow[2] + _OCTAVE_WEIGHT * (slow[3] + fast[4] + fast[3] - _OCTAVE_BIAS) > 0)


def _beat_contrasts(bands: np.ndarray, beats: np.ndarray) -> tuple[float, float]:
    """Halfway points' strength relative to the beats', and the weaker alternate beats' relative to the stronger.

    Each is the largest over the bands, so a kick, a snare or a hat alone can make it.
    """
    halfway = (beats[1:] + beats[:-1]) // 2
    off, on = [], []
    for band in bands:
        at_beats = _local_max(band, beats)
        on_mean = max(float(at_beats.mean()), 1e-12)
        off.append(float(_local_max(band, halfway).mean()) / on_mean)
        even, odd = float(at_beats[0::2].mean()), float(at_beats[1::2].mean())
        on.append(min(even, odd) / max(even, odd, 1e-12))
    return max(off), max(on)


def _local_max(onsets: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """The strongest onset within a frame of each given frame."""
    padded = np.pad(onsets, 1)
    return np.max([padded[frames], padded[frames + 1], padded[frames + 2]], axis=0)


def _refine(onsets: np.ndarray, beats: np.ndarray) -> np.ndarray:
    """Beat frames moved to the nearest onset peak, to a fraction of a frame."""
    refined = beats.astype(float)
    for i, frame in enumerate(beats):
        lo, hi = max(frame - 2, 1), min(frame + 3, onsets.size - 1)
        if lo >= hi:
            continue
        peak = lo + int(np.argmax(onsets[lo:hi]))
        refined[i] = peak + _parabolic_offset(onsets[peak - 1 : peak + 2])
    return refined


def _attack_starts(onsets: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """Frames (to a fraction) near where each onset peak's rise began, never after the peak.

    The rise began where the flux, climbing without a dip, first stood `_ATTACK_SHARE` of the way from
    the lowest point of the `_ATTACK_FRAMES` before the peak to the peak; `_ATTACK_SLACK` frames are
    added back, as a sound entering the window reads early. A drum's flux is about a frame wide, so its
    start stays near its peak; a wind or bowed note rises over several frames, its peak 50-70 ms late.
    Bars and the period are still read from the peaks.
    """
    starts = peaks.astype(float)
    for i, peak in enumerate(peaks):
        top = round(float(peak))
        if top < 2 or top >= onsets.size - 1:
            continue
        floor = float(onsets[max(top - _ATTACK_FRAMES, 0) : top].min())
        threshold, k = floor + _ATTACK_SHARE * (onsets[top] - floor), top
        while k > 1 and top - k < _ATTACK_FRAMES and threshold <= onsets[k - 1] <= onsets[k]:
            k -= 1
        below, above = onsets[k - 1], onsets[k]
        crossing = k - (np.clip((above - threshold) / (above - below), 0.0, 1.0) if above > below else 0.0)
        starts[i] = min(float(peak), crossing + _ATTACK_SLACK)
    return starts


def _grid_index(times: np.ndarray, period: float) -> np.ndarray:
    """Each beat's number on the grid: periods counted between neighbours, so a skipped beat keeps its place."""
    return np.concatenate([[0], np.cumsum(np.maximum(np.round(np.diff(times) / period), 1))]).astype(int)


def _fit_period(times: np.ndarray, guess: float) -> float:
    """Least-squares beat period of `times`, fitted to the beats within `_GRID_TOLERANCE` of the grid.

    Beats are numbered on a grid of `guess`, so a skipped beat does not bend
    the fit; the fit starts from the middle beat and takes in more beats as
    the period improves.
    """
    index = _grid_index(times, guess).astype(float)
    middle = times.size // 2
    period, phase = guess, times[middle] - guess * index[middle]
    for _ in range(4):
        on_grid = np.abs(times - (period * index + phase)) < _GRID_TOLERANCE * period
        if np.unique(index[on_grid]).size < 2:
            return guess
        period, phase = np.polyfit(index[on_grid], times[on_grid], 1)
    return float(period)


def _regularity(times: np.ndarray, period: float) -> float:
    """1 for beats like clockwork, falling as intervals stray from the period or jitter; slow drift costs nothing."""
    intervals = np.diff(times)
    steady = np.abs(intervals - period) < _GRID_TOLERANCE * period
    pairs = steady[1:] & steady[:-1]
    if not pairs.any():
        return 0.0
    # A second difference of beat times carries six times the variance of one beat's jitter.
    jitter = np.sqrt(np.mean(np.diff(intervals)[pairs] ** 2) / 6)
    # Jitter of a tenth of a beat or more means there is no steady pulse to speak of.
    return float(steady.mean() * np.exp(-((jitter / (0.05 * period)) ** 2)))


def _octave_alternatives(acf: np.ndarray, period: float, confidence: float) -> list[TempoAlternative]:
    """Half and double tempo, each as sure as the chosen tempo times its salience relative to the chosen one's.

    Salience is the criterion that picked the tempo: how strongly the onsets
    repeat at the period, weighted by the tempo prior. A reading can equal,
    never exceed, the chosen one's confidence (doubling can pick the less
    salient octave, on the evidence of strong off-beats).
    """
    chosen = _salience(acf, period * _FPS)
    if chosen <= 0:
        return []
    readings = []
    for factor in (0.5, 2.0):
        share = min(1.0, _salience(acf, period * _FPS / factor) / chosen)
        if confidence * share >= _MIN_ALTERNATIVE_CONFIDENCE:
            readings.append(TempoAlternative(factor * 60.0 / period, confidence * share))
    return sorted(readings, key=lambda reading: -reading.confidence)


def _salience(acf: np.ndarray, lag: float) -> float:
    """The autocorrelation's peak within 2% of `lag` frames times the tempo prior; 0 outside the tempo range."""
    bpm = 60 * _FPS / lag
    lo, hi = int(np.floor(0.98 * lag)), int(np.ceil(1.02 * lag))
    if not MIN_BPM <= bpm <= MAX_BPM or lo < 1 or hi >= acf.size:
        return 0.0
    return max(float(acf[lo : hi + 1].max()), 0.0) * float(_tempo_prior(bpm))


# --- bars -------------------------------------------------------------------


def _bars(
    power: np.ndarray,
    onsets: np.ndarray,
    bass_onsets: np.ndarray,
    snare_onsets: np.ndarray,
    frames: np.ndarray,
    index: np.ndarray,
) -> tuple[np.ndarray, int | None]:
    """Which beats start a bar, and the meter; (nothing, None) unless the bars are clear.

    Bar lines are where the harmony changes and the kick, the bass and the
    accents fall, and the snare does not (it plays the backbeat: as in Goto
    2001 and Papadopoulos & Peeters 2011). Each beat scores the chroma change
    across it plus half each of its bass onset, its overall onset and its
    level, less `_BAR_SNARE_WEIGHT` times its middle band's onset (snare body,
    claps), each standardised over the song; every meter
    and phase is then judged by how far the beats it puts first score above
    the others, in standard errors (a two-sample t statistic, with the spread
    of all beats).
    """
    nothing = np.zeros(frames.size, bool)
    if frames.size < _BAR_MIN_COUNT * max(_METERS):
        return nothing, None
    at = np.clip(np.round(frames).astype(int), 0, power.shape[0] - 1)
    score = (
        _standardise(_harmonic_change(power, at))
        + 0.5 * _standardise(_local_max(bass_onsets, at))
        + 0.5 * _standardise(_local_max(onsets, at))
        + 0.5 * _standardise(_beat_level(power, at))
        - _backbeat_weight(snare_onsets, at, index) * _standardise(_local_max(snare_onsets, at))
    )
    readings = sorted(
        ((_contrast(score, index % meter == phase), meter, phase) for meter in _METERS for phase in range(meter)),
        reverse=True,
    )
    (best, meter, phase), (runner_up, _, _) = readings[0], readings[1]
    if best < _BAR_MIN_CONTRAST or best - runner_up < _BAR_MIN_MARGIN:
        return nothing, None
    return index % meter == phase, meter


def _backbeat_weight(snare_onsets: np.ndarray, at: np.ndarray, index: np.ndarray) -> float:
    """`_BAR_SNARE_WEIGHT` where the middle band alternates beat by beat (a backbeat), else 0 (a metronome's accent)."""
    strength = _local_max(snare_onsets, at)
    even, odd = float(strength[index % 2 == 0].mean()), float(strength[index % 2 == 1].mean())
    return _BAR_SNARE_WEIGHT if min(even, odd) < _BACKBEAT_RATIO * max(even, odd) else 0.0


def _harmonic_change(power: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Cosine distance between the chroma of the beat before and the beat after each beat; NaN at the ends."""
    segments = np.add.reduceat(np.sqrt(power), np.concatenate([[0], at]), axis=0)[1:]
    chroma = segments @ _beat_chroma_bank().T
    chroma /= np.maximum(np.linalg.norm(chroma, axis=1, keepdims=True), 1e-12)
    change = np.full(at.size, np.nan)
    change[1:-1] = 1.0 - np.sum(chroma[:-2] * chroma[1:-1], axis=1)
    return change


def _beat_level(power: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Level in dB of the loudest frame from one before each beat to two after it (a hit fills one of them)."""
    energy = np.pad(power.sum(axis=1), (1, 2))
    loudest = np.max([energy[at], energy[at + 1], energy[at + 2], energy[at + 3]], axis=0)
    return 10 * np.log10(np.maximum(loudest, 1e-10))


def _standardise(values: np.ndarray) -> np.ndarray:
    spread = np.nanstd(values)
    return (values - np.nanmean(values)) / spread if spread > 0 else np.zeros_like(values, dtype=float)


def _contrast(score: np.ndarray, chosen: np.ndarray) -> float:
    """How far the chosen beats score above the rest, in standard errors; -inf with too few to tell."""
    valid = ~np.isnan(score)
    on, off = score[chosen & valid], score[~chosen & valid]
    spread = float(score[valid].std()) if valid.any() else 0.0
    if on.size < _BAR_MIN_COUNT or off.size < 2 or spread == 0:
        return -np.inf
    return float((on.mean() - off.mean()) / (spread * np.sqrt(1 / on.size + 1 / off.size)))


def _parabolic_offset(three: np.ndarray) -> float:
    """Where a parabola through three equally spaced values peaks, relative to the middle one (-0.5..0.5)."""
    if three.size < 3:
        return 0.0
    left, mid, right = three
    curvature = left - 2 * mid + right
    return float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5)) if curvature < 0 else 0.0


def _interpolate(values: np.ndarray, at: float) -> float:
    i = int(at)
    if i + 1 >= values.size:
        return 0.0
    return float(values[i] + (at - i) * (values[i + 1] - values[i]))


@cache
def _hann() -> np.ndarray:
    return np.hanning(_N_FFT + 1)[:-1].astype(np.float32)


@cache
def _mel_bank() -> np.ndarray:
    return librosa.filters.mel(sr=RHYTHM_RATE, n_fft=_N_FFT, n_mels=_N_MELS, fmin=30.0)


def _legato(onsets: np.ndarray) -> bool:
    """Whether the music has no sharp attacks (strings, choir, organ): the flux's peaks stand less than
    `_LEGATO_PEAKINESS` times above its median."""
    return bool(np.percentile(onsets, 95) < _LEGATO_PEAKINESS * max(float(np.median(onsets)), 1e-12))


def _pitch_flux(power: np.ndarray) -> np.ndarray:
    """Spectral flux of the log power in semitone bands, one value per frame: a legato line's note changes,
    which stay inside one mel band, show here."""
    return _log_rises(power @ _semitone_bank().T).mean(axis=1)


def _chord_pulse(power: np.ndarray, lag: float, beats: np.ndarray) -> tuple[float, np.ndarray]:
    """The period and beats, or twice the period and every other beat where the harmony changes on one
    parity of the beats `_CHORD_PULSE_CONTRAST` standard errors more than on the other (a legato reading's
    beats are the passing eighth notes between the chords)."""
    if beats.size < 2 * _BAR_MIN_COUNT or 60 * _FPS / (2 * lag) < MIN_BPM:
        return lag, beats
    at = np.clip(np.round(beats).astype(int), 0, power.shape[0] - 1)
    change = _harmonic_change(power, at)
    parity = np.arange(at.size) % 2
    contrasts = [_contrast(change, parity == p) for p in (0, 1)]
    best = int(np.argmax(contrasts))
    if contrasts[best] < _CHORD_PULSE_CONTRAST:
        return lag, beats
    return 2 * lag, beats[parity == best]


@cache
def _semitone_bank() -> np.ndarray:
    """Triangular bands one semitone apart, centred from E1 (41 Hz) to B7 (3.95 kHz); bands between two bins of
    the FFT, at the bottom, are left out."""
    freqs = np.fft.rfftfreq(_N_FFT, 1 / RHYTHM_RATE)
    edges = librosa.midi_to_hz(np.arange(27, 109))
    lo, centre, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bank = np.clip(np.minimum((freqs - lo) / (centre - lo), (hi - freqs) / (hi - centre)), 0.0, None)
    return bank[bank.sum(axis=1) > 0].astype(np.float32)


@cache
def _beat_chroma_bank() -> np.ndarray:
    return librosa.filters.chroma(sr=RHYTHM_RATE, n_fft=_N_FFT, dtype=np.float32)


# --- levels -----------------------------------------------------------------


@cache
def _k_weighting(sr: int) -> np.ndarray:
    """BS.1770's K-weighting for `sr`, designed as pyloudnorm's meter does: two biquads in SOS form."""
    shelf = pyloudnorm.IIRfilter(4.0, 1 / np.sqrt(2), 1500.0, sr, "high_shelf")
    high_pass = pyloudnorm.IIRfilter(0.0, 0.5, 38.0, sr, "high_pass")
    return np.array([[*stage.b, *stage.a] for stage in (shelf, high_pass)])


@numba.njit(cache=True)
def _block_energies(x: np.ndarray, sos: np.ndarray, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum of squares per channel and `hop`-long block, with and without K-weighting.

    One pass over the samples instead of pyloudnorm's several; the trailing
    partial block is left out, as BS.1770 gates only whole blocks.
    """
    channels, n = x.shape
    blocks = n // hop
    weighted = np.zeros((channels, blocks))
    plain = np.zeros((channels, blocks))
    b0, b1, b2, _, a1, a2 = sos[0]
    c0, c1, c2, _, d1, d2 = sos[1]
    for ch in range(channels):
        s1 = s2 = t1 = t2 = 0.0
        for block in range(blocks):
            sum_w = sum_p = 0.0
            for i in range(block * hop, (block + 1) * hop):
                v = x[ch, i]
                u = b0 * v + s1
                s1 = b1 * v - a1 * u + s2
                s2 = b2 * v - a2 * u
                w = c0 * u + t1
                t1 = c1 * u - d1 * w + t2
                t2 = c2 * u - d2 * w
                sum_w += w * w
                sum_p += v * v
            weighted[ch, block] = sum_w
            plain[ch, block] = sum_p
    return weighted, plain


def _integrated_loudness(mean_squares: np.ndarray) -> float:
    """BS.1770-4 gated loudness from K-weighted mean squares per 100 ms, summed over channels."""
    if mean_squares.size < 4:
        return LOUDNESS_FLOOR_LUFS
    blocks = np.lib.stride_tricks.sliding_window_view(mean_squares, 4).mean(axis=1)
    with np.errstate(divide="ignore"):
        loudness = -0.691 + 10 * np.log10(blocks)
    gated = blocks[loudness > LOUDNESS_FLOOR_LUFS]
    if gated.size == 0:
        return LOUDNESS_FLOOR_LUFS
    relative_gate = -0.691 + 10 * np.log10(gated.mean()) - 10.0
    gated = blocks[(loudness > LOUDNESS_FLOOR_LUFS) & (loudness > relative_gate)]
    return float(-0.691 + 10 * np.log10(gated.mean()))


def _true_peak(x: np.ndarray) -> float:
    """Largest magnitude of the 4x oversampled signal, never below the sample peak.

    The Annex's phases all fall between samples (its prototype has an even
    length), so on their own they can read a hair under a peak sample.
    """
    peak = max(float(x.max(initial=0.0)), -float(x.min(initial=0.0)))
    if x.shape[1] < len(_TRUE_PEAK_PHASE_0):
        return peak
    phases = [_TRUE_PEAK_PHASE_0, _TRUE_PEAK_PHASE_1, _TRUE_PEAK_PHASE_1[::-1], _TRUE_PEAK_PHASE_0[::-1]]
    taps = np.array(phases, dtype=np.float32)
    out = np.empty(x.shape[1] - taps.shape[1] + 1, np.float32)
    for channel in x:
        for phase in taps:
            _fir_magnitude(channel, phase, out)
            peak = max(peak, float(out.max()))
    return peak


@numba.njit(cache=True, fastmath=True)
def _fir_magnitude(x: np.ndarray, h: np.ndarray, out: np.ndarray) -> None:
    """out[i] = |sum_k h[k] x[i + k]| for 12 taps, written out so that LLVM vectorises it."""
    h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11 = h
    for i in range(out.size):
        out[i] = abs(
            h0 * x[i] + h1 * x[i + 1] + h2 * x[i + 2] + h3 * x[i + 3] + h4 * x[i + 4] + h5 * x[i + 5]
            + h6 * x[i + 6] + h7 * x[i + 7] + h8 * x[i + 8] + h9 * x[i + 9] + h10 * x[i + 10] + h11 * x[i + 11]
        )  # fmt: skip


def _dbfs(amplitude: float) -> float:
    return float(20 * np.log10(amplitude)) if amplitude > 10 ** (SILENCE_DBFS / 20) else SILENCE_DBFS
