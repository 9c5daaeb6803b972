"""Keys and notes spelled as musicians write them, and the DJs' key codes."""

import numpy as np
import pytest
import synth

from analyzer.keys import camelot, estimate, key_name, open_key, parse_key, pitch_class, spell


@pytest.mark.parametrize(
    ("index", "name"),
    [(3, "E♭ major"), (10, "B♭ major"), (8, "A♭ major"), (1, "D♭ major"), (6, "F♯ major"), (11, "B major"),
     (12, "C minor"), (18, "F♯ minor"), (13, "C♯ minor"), (15, "E♭ minor"), (20, "G♯ minor"), (22, "B♭ minor")],
)  # fmt: skip
def test_keys_are_spelled_by_their_key_signature(index, name):
    assert key_name(index) == name
    assert parse_key(name) == (index % 12, "major" if index < 12 else "minor")


def test_pitch_classes_read_any_spelling():
    assert pitch_class("E♭") == pitch_class("Eb") == pitch_class("D#") == pitch_class("D♯") == 3
    assert pitch_class("C") == 0 and pitch_class("B") == 11


@pytest.mark.parametrize(
    ("key", "code", "open_code"),
    [("C major", "8B", "1d"), ("A minor", "8A", "1m"), ("E♭ major", "5B", "10d"), ("F♯ minor", "11A", "4m"),
     ("B major", "1B", "6d"), ("G♯ minor", "1A", "6m"), ("F major", "7B", "12d"), ("D minor", "7A", "12m")],
)  # fmt: skip
def test_camelot_and_open_key_codes(key, code, open_code):
    assert camelot(key) == code
    assert open_key(key) == open_code


def test_unknown_key_has_no_codes():
    assert camelot("unknown") is None and open_key("unknown") is None and parse_key("unknown") is None


def test_notes_are_spelled_for_the_key():
    assert [spell(pc, "B♭ major") for pc in (10, 3, 8)] == ["B♭", "E♭", "A♭"]
    assert [spell(pc, "E major") for pc in (1, 3, 6, 8)] == ["C♯", "D♯", "F♯", "G♯"]
    # A minor key's raised leading tone is a sharp even in a flat key.
    assert spell(1, "D minor") == "C♯" and spell(10, "D minor") == "B♭"
    assert spell(6, "C major") == "F♯" and spell(10, "C major") == "B♭"


def _held_notes(weights: dict[int, float]) -> np.ndarray:
    """8 s of sines on the given pitch classes (0 = middle C), each at its weight."""
    t = np.arange(8 * synth.RATE) / synth.RATE
    return sum(w * np.sin(2 * np.pi * 261.63 * 2 ** (pc / 12) * t) for pc, w in weights.items()).astype(np.float32)


# C major's notes, its tonic triad loudest; and A harmonic minor's (with G♯), its tonic triad loudest.
_C_MAJOR_NOTES = {0: 2, 2: 1, 4: 2, 5: 1, 7: 2, 9: 1, 11: 1}
_A_HARMONIC_MINOR_NOTES = {9: 2, 11: 1, 0: 2, 2: 1, 4: 2, 5: 1, 8: 1}


@pytest.mark.parametrize("opening", ["A minor", "A major"])
def test_music_on_a_major_scale_that_opens_on_its_sixth_degree_is_in_the_relative_minor(opening):
    # The opening chord's root decides (chord readings often take a minor chord for a major or seventh one).
    notes = _held_notes(_C_MAJOR_NOTES)
    assert estimate(notes, synth.RATE)[0][0] == "C major"
    assert estimate(notes, synth.RATE, opening=opening)[0][0] == "A minor"


def test_a_minor_key_with_its_leading_tone_stays_minor_when_it_opens_on_the_relative_major():
    assert estimate(_held_notes(_A_HARMONIC_MINOR_NOTES), synth.RATE, opening="C major")[0][0] == "A minor"
