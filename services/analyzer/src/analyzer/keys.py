"""Key of a mix: its pitch-class profiles (all of it, and the bass) correlated with the 24 key profiles.

Three cues, weighed as tuned on the tuning split of `stemflow_dev.corpus`:
the profile of everything tonal, the profile of the bass (which dwells on
the tonic and the dominant), and the root of the chord the music opens on
(most songs and chorales start on their tonic chord, which tells a key from
its relative major or minor when the notes alone cannot).
"""

from functools import cache

import librosa
import numpy as np
import soxr

PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
UNKNOWN = "unknown"
# Tonics spelled as their key signature writes them, fewer accidentals winning (F♯ major and E♭ minor,
# six either way, as most charts and DJ tools write them).
MAJOR_TONICS = ("C", "D♭", "D", "E♭", "E", "F", "F♯", "G", "A♭", "A", "B♭", "B")
MINOR_TONICS = ("C", "C♯", "D", "E♭", "E", "F", "F♯", "G", "G♯", "A", "B♭", "B")
_LETTERS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_ACCIDENTALS = {"♭": -1, "b": -1, "♯": 1, "#": 1}

# Up to 2.7 kHz: the fundamentals of everything tonal and their first
# harmonics; higher partials only blur the profile.
KEY_RATE = 5512.5
# 0.74 s windows: 1.35 Hz bins, which keep semitones apart down to the bass.
_N_FFT = 4096
_HOP = 2048
# Chroma bins per semitone: fine enough to find the recording's tuning.
_SUB = 10
# Log compression, so that a few loud notes do not outweigh the harmony.
_COMPRESSION = 10.0

# Albrecht & Shanahan (2013), counted from 490 common-practice pieces. Their
# minor profile blends natural and harmonic minor, so songs with a flat
# seventh are pushed to the relative major less than with Temperley's
# (Kostka-Payne) harmonic-minor profile; Krumhansl-Kessler's probe-tone
# ratings give non-scale tones over a third of the tonic's weight, which
# blurs keys once harmonics leak into the chroma. MIREX scores on 48 songs
# from tests/synth.py: harmonic-minor and plain major progressions, KK 0.95,
# Temperley 1.00, A-S 1.00; modal ones (i-bVII-bVI, I-bVII-IV), 0.82, 0.79, 0.84.
_MAJOR = (0.238, 0.006, 0.111, 0.006, 0.137, 0.094, 0.016, 0.214, 0.009, 0.080, 0.008, 0.081)
_MINOR = (0.220, 0.006, 0.104, 0.123, 0.019, 0.103, 0.012, 0.214, 0.062, 0.022, 0.061, 0.052)

# The chroma of real instruments holds each note's harmonics (the 3rd a fifth up, the 5th a major third
# up), so the templates carry them too: each profile note with its first `_HARMONICS` harmonics at
# `_HARMONIC_DECAY`^(h-1) of its weight (Gomez 2006; Essentia's KeyExtractor does the same). With the bass
# profile at `_BASS_WEIGHT` and `_OPENING_WEIGHT` for the key of the opening chord: MIREX score on the
# tuning split 0.86 -> 0.93 (80 arrangements), 0.78 -> 1.00 (chorales); plain A-S profiles, harmonics,
# bass and opening chord alone each gain 2-6 points.
_HARMONICS = 4
_HARMONIC_DECAY = 0.6
_BASS_WEIGHT = 0.25
_OPENING_WEIGHT = 0.2
# The opening chord's root favours whichever of its major and minor keys the notes fit better, and turns a
# major key into its relative minor when the music opens on the minor's tonic and the minor fits within
# `_RELATIVE_MARGIN` (in summed correlations, before scaling). Tuned on the tuning split widened with
# seeds 8-27 of every style and 31 more chorales (arrangements 0.961 -> 0.984, chorales 0.985 -> 0.987);
# corpus v4 tuning split alone 0.970 -> 0.979 and 1.000 -> 1.000; held back (reported, not tuned on)
# arrangements 0.890 -> 0.943 (0.900 -> 0.967 with true stems), chorales 0.880 -> 0.864.
_RELATIVE_MARGIN = 0.15

# Confidences are the 24 keys' inverse-distance weights (Shepard's, with his
# usual power of 2), the distance being how far a key's correlation falls
# short of a perfect 1. A key that fits far better than the rest takes nearly
# all of the weight; two that fit almost equally well (a relative major and
# minor over the same chords) share it; noise, which fits no key well, spreads
# it over many. On tests/synth.py: clear major and harmonic-minor songs
# 0.58-0.98, aeolian ones (i-bVII-bVI-bVII, often missed) 0.23-0.44, noise 0.06.
_DISTANCE_POWER = 2


def estimate(y: np.ndarray, sr: float, count: int = 2, opening: str | None = None) -> list[tuple[str, float]]:
    """The `count` most likely keys of mono `y`, best first, each with a 0..1 confidence.

    `opening`: the key whose tonic chord the music opens on ("A minor"), when known.
    The confidences of all 24 keys sum to 1, so they read as shares of belief:
    "A minor 0.45, C major 0.30" is a close call. Silence gives [("unknown", 0.0)].
    """
    return rank(scores(y, sr, opening), count)


def scores(y: np.ndarray, sr: float, opening: str | None = None) -> np.ndarray | None:
    """How well each of the 24 keys (0-11 major from C, 12-23 minor) fits mono `y`, as a correlation
    (-1..1); None for silence. Readings of the same song (the mix, its stems) average."""
    profile, bass = pitch_profiles(soxr.resample(y, sr, KEY_RATE))
    if np.ptp(profile) <= 1e-9 * profile.max():
        return None
    templates = _key_templates()
    fit = templates @ _standardised(profile) / 12 + _BASS_WEIGHT * templates @ _standardised(bass) / 12
    parsed = parse_key(opening) if opening else None
    if parsed is not None:
        # Only the opening chord's root is trusted: chord readings often take a minor chord for a major or
        # seventh one, so the notes decide the mode of the key it favours.
        tonic = parsed[0]
        fit[tonic if fit[tonic] >= fit[tonic + 12] else tonic + 12] += _OPENING_WEIGHT
        _prefer_opening_minor(fit, tonic)
    # Back to the scale of one correlation, so that distances below stay within 0..2.
    return fit / (1 + _BASS_WEIGHT + _OPENING_WEIGHT)


def _prefer_opening_minor(fit: np.ndarray, opening_tonic: int) -> None:
    """Swap the best major key's fit with its relative minor's when the music opens on the minor's tonic
    and the minor fits nearly as well (within `_RELATIVE_MARGIN`).

    A natural-minor loop (i-bVI-bIII-bVII) has its relative major's notes and no
    leading tone, so the profiles, whose minor expects one, read the major.
    Only the other way round is left alone: a major song opening on vi is rarer
    than a minor one read as major, and minor chorales (leading tone and all)
    that open on their relative major's chord are read right by their notes.
    """
    best = int(np.argmax(fit))
    relative_minor = 12 + (best + 9) % 12
    if best < 12 and relative_minor % 12 == opening_tonic and fit[best] - fit[relative_minor] < _RELATIVE_MARGIN:
        fit[[best, relative_minor]] = fit[[relative_minor, best]]


def rank(fit: np.ndarray | None, count: int = 2) -> list[tuple[str, float]]:
    """The `count` best keys of `scores`, each with its share of belief; [("unknown", 0.0)] for None."""
    if fit is None:
        return [(UNKNOWN, 0.0)]
    ranked = np.argsort(fit)[::-1][:count]
    distance = np.maximum(1 - fit, 1e-6)
    weights = (distance[ranked[0]] / distance) ** _DISTANCE_POWER
    confidences = weights / weights.sum()
    return [(key_name(int(k)), float(confidences[k])) for k in ranked]


def key_name(index: int) -> str:
    """Template index (0-11 major from C, 12-23 minor from C) to a name like "E♭ major" or "F♯ minor"."""
    if index < 12:
        return f"{MAJOR_TONICS[index]} major"
    return f"{MINOR_TONICS[index % 12]} minor"


def pitch_class(note: str) -> int:
    """ "E♭", "Eb", "D#" or "D♯" to 3."""
    return (_LETTERS[note[0]] + sum(_ACCIDENTALS[a] for a in note[1:])) % 12


def parse_key(key: str) -> tuple[int, str] | None:
    """ "E♭ major" to (3, "major"); None for "unknown"."""
    if key == UNKNOWN:
        return None
    tonic, mode = key.split()
    return pitch_class(tonic), mode


def spell(pc: int, key: str | None = None) -> str:
    """A pitch class named as music in `key` writes it: D♯ in E major, E♭ in B♭ major.

    Sharp keys sharpen and flat keys flatten; a minor key's raised leading
    tone is a sharp (C♯ in D minor); in C major and A minor, and without a
    key, F♯, C♯ and G♯ (secondary dominants, A minor's leading tone) but B♭ and E♭.
    """
    natural = next((name for name, value in _LETTERS.items() if value == pc), None)
    if natural:
        return natural
    sharp, flat = f"{PITCH_CLASSES[pc][0]}♯", f"{PITCH_CLASSES[(pc + 1) % 12][0]}♭"
    parsed = parse_key(key) if key else None
    if parsed is None:
        return sharp if pc in (1, 6, 8) else flat
    tonic, mode = parsed
    if mode == "minor" and pc == (tonic - 1) % 12:
        return sharp
    name = (MAJOR_TONICS if mode == "major" else MINOR_TONICS)[tonic]
    signature = _SHARP_KEYS if mode == "major" else _SHARP_MINOR_KEYS
    if name in ("C", "A") and (mode == "major") == (name == "C"):
        return sharp if pc in (1, 6, 8) else flat
    return sharp if name in signature else flat


_SHARP_KEYS = {"G", "D", "A", "E", "B", "F♯"}
_SHARP_MINOR_KEYS = {"E", "B", "F♯", "C♯", "G♯"}


def camelot(key: str) -> str | None:
    """The Camelot wheel code DJs mix by: "8B" for C major, "8A" for A minor; None for "unknown"."""
    position = _circle_position(key)
    return None if position is None else f"{(position[0] + 7) % 12 + 1}{'B' if position[1] == 'major' else 'A'}"


def open_key(key: str) -> str | None:
    """The Open Key notation (Traktor): "1d" for C major, "1m" for A minor; None for "unknown"."""
    position = _circle_position(key)
    return None if position is None else f"{position[0] + 1}{'d' if position[1] == 'major' else 'm'}"


def _circle_position(key: str) -> tuple[int, str] | None:
    """Steps of a fifth from C major of the key (or its relative major), and the mode."""
    parsed = parse_key(key)
    if parsed is None:
        return None
    tonic, mode = parsed
    relative_major = tonic if mode == "major" else (tonic + 3) % 12
    return (7 * relative_major) % 12, mode


def pitch_profile(y: np.ndarray) -> np.ndarray:
    """Energy per pitch class (C first) of mono `y` at `KEY_RATE`, measured in the recording's own tuning."""
    return pitch_profiles(y)[0]


def pitch_profiles(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`pitch_profile` of everything, and of the bass alone (about 40-250 Hz), in the same tuning."""
    if y.size < _N_FFT:
        y = np.pad(y, (0, _N_FFT - y.size))
    magnitude = np.abs(librosa.stft(y, n_fft=_N_FFT, hop_length=_HOP))
    peak = magnitude.max()
    if peak == 0:
        return np.zeros(12), np.zeros(12)
    # The filterbank is linear, so averaging the spectrum first gives the mean chroma for 1/120 of the work.
    spectrum = np.log1p(_COMPRESSION / peak * magnitude).mean(axis=1)
    fine = _chroma_bank() @ spectrum
    offset = tuning_offset(fine)

    def fold(bins: np.ndarray) -> np.ndarray:
        # Each pitch class gets the semitone-wide window centred on its tuned pitch.
        return np.roll(bins, _SUB // 2 - offset).reshape(12, _SUB).sum(axis=1)

    return fold(fine), fold(_bass_bank() @ spectrum)


def _standardised(profile: np.ndarray) -> np.ndarray:
    spread = profile.std()
    return (profile - profile.mean()) / spread if spread > 1e-12 * max(float(profile.max()), 1e-30) else np.zeros(12)


def tuning_offset(fine: np.ndarray) -> int:
    """How many fine bins the recording sits above equal temperament at A440 (circular mean)."""
    phase = np.angle(np.sum(fine * np.exp(2j * np.pi * np.arange(fine.size) / _SUB)))
    return round(phase / (2 * np.pi) * _SUB)


@cache
def _chroma_bank() -> np.ndarray:
    return librosa.filters.chroma(sr=KEY_RATE, n_fft=_N_FFT, n_chroma=12 * _SUB, dtype=np.float32)


@cache
def _bass_bank() -> np.ndarray:
    return librosa.filters.chroma(
        sr=KEY_RATE, n_fft=_N_FFT, n_chroma=12 * _SUB, ctroct=2.6, octwidth=0.8, dtype=np.float32
    )


def _with_harmonics(profile: tuple[float, ...]) -> np.ndarray:
    """A profile whose every note also sounds its first `_HARMONICS` harmonics."""
    out = np.zeros(12)
    for pc, weight in enumerate(profile):
        for h in range(1, _HARMONICS + 1):
            out[(pc + round(12 * np.log2(h))) % 12] += weight * _HARMONIC_DECAY ** (h - 1)
    return out


@cache
def _key_templates() -> np.ndarray:
    """(24, 12): each key's profile (with harmonics) rotated to its tonic, standardised for correlations."""
    rows = [np.roll(_with_harmonics(profile), tonic) for profile in (_MAJOR, _MINOR) for tonic in range(12)]
    templates = np.array(rows)
    return (templates - templates.mean(axis=1, keepdims=True)) / templates.std(axis=1, keepdims=True)
