"""A short synthetic song with known facts (tempo, key) for the demo and the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

NOTE_A4 = 440.0


def _midi(note: int) -> float:
    return NOTE_A4 * 2 ** ((note - 69) / 12)


def render(seconds: float = 12.0, bpm: float = 120.0, sr: int = 44100, seed: int = 7) -> np.ndarray:
    """Stereo float32 (frames, 2): drums at `bpm`, bass and chords in A minor, a little melody."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    beat = 60.0 / bpm
    drums = np.zeros(n)
    for i, start in enumerate(np.arange(0, seconds, beat / 2)):
        s = int(start * sr)
        length = min(int(0.15 * sr), n - s)
        env = np.exp(-np.arange(length) / (0.03 * sr))
        if i % 4 == 0:  # kick on beats 1 and 3
            drums[s : s + length] += 0.9 * env * np.sin(2 * np.pi * 55 * np.arange(length) / sr)
        elif i % 4 == 2:  # snare on 2 and 4
            drums[s : s + length] += 0.4 * env * rng.standard_normal(length)
        drums[s : s + length] += 0.08 * env * rng.standard_normal(length)  # hats on every eighth
    progression = [(57, 60, 64), (53, 57, 60), (48, 52, 55), (55, 59, 62)]  # Am F C G
    harmony = np.zeros(n)
    bass = np.zeros(n)
    bar = 4 * beat
    for b, start in enumerate(np.arange(0, seconds, bar)):
        s, e = int(start * sr), min(int((start + bar) * sr), n)
        tt = t[s:e] - start
        chord = progression[b % len(progression)]
        for note in chord:
            harmony[s:e] += 0.08 * np.sin(2 * np.pi * _midi(note) * tt)
        bass[s:e] += 0.25 * np.sin(2 * np.pi * _midi(chord[0] - 12) * tt)
    melody = np.zeros(n)
    scale = [69, 71, 72, 74, 76, 77, 79]
    for k, start in enumerate(np.arange(0, seconds, beat)):
        s, e = int(start * sr), min(int((start + beat) * sr), n)
        tt = t[s:e] - start
        melody[s:e] += 0.12 * np.sin(2 * np.pi * _midi(scale[(k * 3) % 7]) * tt) * np.exp(-tt * 3)
    left = drums + bass + harmony + 0.7 * melody
    right = drums + bass + 0.8 * harmony + melody
    mix = np.stack([left, right], axis=1)
    return (0.8 * mix / np.max(np.abs(mix))).astype(np.float32)


def write(path: Path, seconds: float = 12.0, bpm: float = 120.0, seed: int = 7) -> Path:
    """The song as 16-bit WAV; another `seed` gives other audio (identical audio would reuse earlier results)."""
    sf.write(path, render(seconds, bpm, seed=seed), 44100, subtype="PCM_16")
    return path
