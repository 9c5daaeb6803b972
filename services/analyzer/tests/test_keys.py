"""Keys and notes spelled as musicians write them, and the DJs' key codes."""

import pytest

from analyzer.keys import camelot, key_name, open_key, parse_key, pitch_class, spell


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
