"""The chord timeline on synthetic songs whose chords are known bar by bar."""

import itertools

import numpy as np
import synth
from synth import RATE

from analyzer.chords import QUALITIES, estimate
from analyzer.features import analyze


def chord_at(chords, t):
    return next(c for c in chords if c.start <= t < c.end)


def bar_labels(analysis, bpm, bars):
    bar_s = 4 * 60 / bpm
    return [chord_at(analysis.chords, (i + 0.5) * bar_s).label for i in range(bars)]


def test_a_progression_in_e_flat_is_read_bar_by_bar_and_spelled_with_flats():
    bpm, bars = 100.0, 12
    progression = ((0, "maj"), (7, "maj"), (9, "min"), (5, "maj"))
    samples = synth.song(bpm, 3, "major", seconds=bars * 4 * 60 / bpm, seed=0, progression=progression)
    analysis = analyze(samples, RATE)
    expected = ["E♭", "B♭", "Cm", "A♭"] * (bars // 4)
    labels = bar_labels(analysis, bpm, bars)
    assert np.mean([a == b for a, b in zip(labels, expected, strict=True)]) >= 0.8, labels
    assert analysis.key == "E♭ major" and analysis.key_camelot == "5B" and analysis.key_open_key == "10d"


def test_minor_progression_in_f_sharp_minor_uses_sharps():
    bpm, bars = 120.0, 12
    progression = ((0, "min"), (5, "min"), (7, "maj"), (0, "min"))
    samples = synth.song(bpm, 6, "minor", seconds=bars * 4 * 60 / bpm, seed=1, progression=progression)
    analysis = analyze(samples, RATE)
    expected = ["F♯m", "Bm", "C♯", "F♯m"] * (bars // 4)
    labels = bar_labels(analysis, bpm, bars)
    assert np.mean([a == b for a, b in zip(labels, expected, strict=True)]) >= 0.8, labels


def test_chords_tile_the_song_and_change_only_on_beats():
    bpm = 96.0
    analysis = analyze(synth.song(bpm, 9, "minor", seconds=12.0, seed=3), RATE)
    chords = analysis.chords
    assert chords[0].start == 0.0 and abs(chords[-1].end - analysis.duration_s) < 0.01
    assert all(a.end == b.start for a, b in itertools.pairwise(chords))
    beats = set(analysis.beats)
    assert all(c.start in beats for c in chords[1:])
    assert all(c.quality in QUALITIES or c.quality == "N" for c in chords)
    assert all(0.0 <= c.confidence <= 1.0 for c in chords)


def test_silence_has_no_chord():
    assert estimate(np.zeros(11025 * 4, np.float32), 11025, [], None) == []
    quiet_then_song = np.concatenate([np.zeros((2, 3 * RATE), np.float32), synth.song(120.0, 0, "major", 8.0)], axis=1)
    analysis = analyze(quiet_then_song, RATE)
    assert analysis.chords[0].label == "N.C." and analysis.chords[0].root is None
    assert analysis.chords[0].end <= 3.6
