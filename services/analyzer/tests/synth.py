"""Synthetic songs and test signals whose tempo, key and level are known by construction."""

from functools import cache

import numpy as np

RATE = 44100
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")

# Chord roots (semitones above the tonic) and qualities, one chord a bar. The
# minor progressions use the harmonic-minor V, the usual mark of a minor key.
_PROGRESSIONS = {
    "major": (
        ((0, "maj"), (7, "maj"), (9, "min"), (5, "maj")),
        ((0, "maj"), (5, "maj"), (7, "maj"), (0, "maj")),
    ),
    "minor": (
        ((0, "min"), (5, "min"), (7, "maj"), (0, "min")),
        ((0, "min"), (8, "maj"), (5, "min"), (7, "maj")),
    ),
}
_TRIADS = {"maj": (0, 4, 7), "min": (0, 3, 7)}
_SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 11)}


def key_name(tonic: int, mode: str) -> str:
    """The analyzer's spelling of a key, by its key signature: "F♯ minor", "E♭ major"."""
    from analyzer.keys import key_name as spelled

    return spelled(tonic % 12 + (0 if mode == "major" else 12))


def song(
    bpm: float,
    tonic: int,
    mode: str,
    seconds: float = 10.0,
    rate: int = RATE,
    seed: int = 0,
    tuning_cents: float = 0.0,
    beats_per_bar: int = 4,
    progression: tuple[tuple[int, str], ...] | None = None,
) -> np.ndarray:
    """A (2, n) float32 pop loop: drums, bass, chords and a melody at `bpm` in the given key.

    `seed` picks one of the mode's two progressions (unless `progression`
    gives the chords, as (root above the tonic, "maj" or "min") per bar), the
    melody and the drum velocities; a key is only unambiguous once all four
    bars have played. Bars start at 0 s and every `beats_per_bar` beats: in
    4/4 the kick plays beats 1 and 3 and the chord is struck on 1 and 3, in
    3/4 the kick plays beat 1 and the chord is struck once a bar.
    """
    rng = np.random.default_rng(seed)
    n = round(seconds * rate)
    beat = 60.0 / bpm
    progression = progression or _PROGRESSIONS[mode][seed % 2]
    drums = _drums(n, rate, beat, rng, beats_per_bar)
    tonal = np.zeros((3, n))
    bar_s = beats_per_bar * beat
    strikes = (0, 2) if beats_per_bar == 4 else (0,)
    chord_s = bar_s / len(strikes)
    bars = int(np.ceil(seconds / bar_s))
    for bar in range(bars):
        root, quality = progression[bar % len(progression)]
        chord = [tonic + root + step for step in _TRIADS[quality]]
        start = bar * bar_s
        for b in range(beats_per_bar):
            at = start + b * beat
            bass_note = chord[0] + (7 if b == 2 else 0)
            _add(tonal[0], _note(36 + bass_note % 12, beat * 0.9, rate, tuning_cents, 4), at, rate)
        for strike in strikes:
            for pitch in chord:
                chord_note = _note(60 + pitch % 12, chord_s * 0.95, rate, tuning_cents, 6)
                _add(tonal[1], 0.35 * chord_note, start + strike * beat, rate)
        for b in range(beats_per_bar):
            pitch = _melody_pitch(rng, tonic, mode, chord)
            _add(tonal[2], 0.5 * _note(pitch, beat * 0.8, rate, tuning_cents, 3), start + b * beat, rate)
    # Drums and bass in the centre, chords a little left, melody a little right.
    pan = np.array([[1.0, 0.6, 0.6, 0.3], [1.0, 0.6, 0.4, 0.5]])
    mix = pan @ np.vstack([drums, tonal]) + 1e-3 * rng.standard_normal((2, n))
    return (0.8 * mix / np.abs(mix).max()).astype(np.float32)


def click_track(
    bpm: float, seconds: float = 10.0, rate: int = RATE, offset_s: float = 0.25, beats_per_bar: int = 0
) -> np.ndarray:
    """A (2, n) float32 metronome: a 10 ms 1 kHz blip every beat, exactly on time.

    With `beats_per_bar`, the first beat of each bar (the first click, and
    every `beats_per_bar` clicks after it) is a louder 1.5 kHz blip, as a
    metronome marks bars.
    """
    n = round(seconds * rate)
    t = np.arange(round(0.01 * rate)) / rate
    blip = np.sin(2 * np.pi * 1000 * t) * np.exp(-t / 0.003)
    accent = 1.5 * np.sin(2 * np.pi * 1500 * t) * np.exp(-t / 0.003)
    out = np.zeros(n)
    for i, at in enumerate(np.arange(offset_s, seconds - 0.01, 60.0 / bpm)):
        _add(out, accent if beats_per_bar and i % beats_per_bar == 0 else blip, at, rate)
    return np.stack([out, out]).astype(np.float32) * 0.5


def four_on_the_floor(bpm: float, seconds: float = 16.0, rate: int = RATE) -> np.ndarray:
    """A (2, n) float32 kick on every beat from 0 s, and between the beats a chord stab and a hat.

    The stabs and hats enter from silence, so a log-spectral flux rises most on them; the kick carries the
    most energy.
    """
    n, beat = round(seconds * rate), 60.0 / bpm
    out = np.zeros(n)
    rng = np.random.default_rng(0)
    stab = 0.3 * sum(_note(midi, 0.45 * beat, rate, 0.0, 6) for midi in (48, 60, 64, 67))
    for at in np.arange(0.0, seconds, beat):
        _add(out, _kick(rate), at, rate)
        _add(out, stab, at + beat / 2, rate)
        _add(out, 0.5 * _hat(rate, rng), at + beat / 2, rate)
    return np.stack([out, out]).astype(np.float32) * 0.3


def soft_stabs_over_a_clicking_kick(bpm: float, seconds: float = 16.0, rate: int = RATE) -> np.ndarray:
    """A (2, n) float32 kick with a beater's click on every beat from 0 s, and a soft chord stab between the beats.

    The stabs enter from silence, so a log-spectral flux rises most on them; the kick carries a little more
    energy (less than `four_on_the_floor`'s), and only it and its click reach the high band.
    """
    n, beat = round(seconds * rate), 60.0 / bpm
    out = np.zeros(n)
    rng = np.random.default_rng(0)
    stab = 0.3 * sum(_note(midi, 0.45 * beat, rate, 0.0, 3) for midi in (48, 60, 64, 67))
    for at in np.arange(0.0, seconds, beat):
        _add(out, 0.7 * _kick(rate), at, rate)
        _add(out, 0.3 * _hat(rate, rng), at, rate)
        _add(out, stab, at + beat / 2, rate)
    return np.stack([out, out]).astype(np.float32) * 0.3


def four_on_the_floor_after_an_intro(bpm: float, seconds: float = 16.0, rate: int = RATE) -> np.ndarray:
    """A (2, n) float32 groove whose first four bars have only the off-beats: a held bass note and a chord stab
    between the beats from 0 s; from the fifth bar a kick on every beat joins them.

    Alone, the intro's off-beats sound like beats, so a tracker that follows the onsets comes in off the kicks.
    """
    n, beat = round(seconds * rate), 60.0 / bpm
    out = np.zeros(n)
    stab = 0.3 * sum(_note(midi, 0.45 * beat, rate, 0.0, 6) for midi in (60, 64, 67))
    # A held bass note (decaying over two beats, cut after most of one), as a synth or fretless bass plays it.
    bass = 0.5 * _note(36, 4 * beat, rate, 0.0, 4)[: round(0.45 * beat * rate)]
    for i, at in enumerate(np.arange(0.0, seconds, beat)):
        if i >= 16:
            _add(out, _kick(rate), at, rate)
        _add(out, stab, at + beat / 2, rate)
        _add(out, bass, at + beat / 2, rate)
    return np.stack([out, out]).astype(np.float32) * 0.3


def sine(freq: float, rms: float, seconds: float, rate: int = RATE, channels: int = 1) -> np.ndarray:
    """A (channels, n) float32 sine with the given RMS (full-scale square wave = 1)."""
    t = np.arange(round(seconds * rate)) / rate
    wave = rms * np.sqrt(2) * np.sin(2 * np.pi * freq * t)
    return np.repeat(wave[None, :], channels, axis=0).astype(np.float32)


def intersample_peaks(seconds: float = 2.0, rate: int = RATE, amp: float = 0.9) -> np.ndarray:
    """A (2, n) float32 sine at rate/4 sampled 45 degrees off its crests: sample peak 3 dB below the true peak."""
    k = np.arange(round(seconds * rate))
    wave = amp * np.sin(np.pi / 2 * k + np.pi / 4)
    return np.stack([wave, wave]).astype(np.float32)


def _drums(n: int, rate: int, beat: float, rng: np.random.Generator, beats_per_bar: int) -> np.ndarray:
    """Closed hi-hat on every eighth note; kick on beats 1 and 3 in 4/4, on 1 in 3/4; snare on the others."""
    out = np.zeros(n)
    kick, snare = _kick(rate), _snare(rate, rng)
    kicks = (0, 2) if beats_per_bar == 4 else (0,)
    for i, at in enumerate(np.arange(0.0, n / rate, beat / 2)):
        velocity = 1.0 + 0.1 * rng.standard_normal()
        _add(out, 0.35 * velocity * _hat(rate, rng), at, rate)
        if i % 2 == 0:
            _add(out, velocity * (kick if (i // 2) % beats_per_bar in kicks else snare), at, rate)
    return out


def _kick(rate: int) -> np.ndarray:
    t = np.arange(round(0.3 * rate)) / rate
    phase = 2 * np.pi * np.cumsum(50 + 100 * np.exp(-t / 0.03)) / rate
    return 1.2 * np.sin(phase) * np.exp(-t / 0.12)


def _snare(rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(round(0.2 * rate)) / rate
    noise = np.diff(rng.standard_normal(t.size + 1))
    return 0.4 * noise * np.exp(-t / 0.06) + 0.5 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.04)


def _hat(rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(round(0.05 * rate)) / rate
    noise = np.diff(rng.standard_normal(t.size + 2), n=2)
    return 0.3 * noise * np.exp(-t / 0.012)


@cache
def _note(midi: float, seconds: float, rate: int, tuning_cents: float, harmonics: int) -> np.ndarray:
    """A plucked tone with 1/k harmonics, a 5 ms attack and an exponential decay (cached: songs repeat notes)."""
    t = np.arange(round(seconds * rate)) / rate
    f0 = 440.0 * 2 ** ((midi - 69) / 12 + tuning_cents / 1200)
    wave = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, harmonics + 1) if k * f0 < rate / 2)
    envelope = np.minimum(t / 0.005, 1.0) * np.exp(-t / max(seconds / 2, 0.05))
    return wave * envelope


def _melody_pitch(rng: np.random.Generator, tonic: int, mode: str, chord: list[int]) -> int:
    """Mostly chord tones, sometimes another scale degree, in the octave above middle C."""
    pool = chord if rng.random() < 0.7 else [tonic + step for step in _SCALES[mode]]
    return 72 + pool[rng.integers(len(pool))] % 12


def _add(out: np.ndarray, sound: np.ndarray, at_s: float, rate: int) -> None:
    """Mix `sound` into `out` starting at `at_s` seconds, cut at the end."""
    start = round(at_s * rate)
    if start >= out.size:
        return
    end = min(out.size, start + sound.size)
    out[start:end] += sound[: end - start]
