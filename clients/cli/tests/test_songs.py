"""Songs judged before upload, and the names of the files that come back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stemflow_cli.songs import attachment_name, refusal


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_audio_passes(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"song.{fmt.lower()}"
    sf.write(path, np.zeros((4410, 2), np.float32), 44100, format=fmt)
    assert refusal(path) is None


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("notes.txt", b"la la la\n", "notes.txt: a .txt file is not audio"),
        ("README", b"# hello\n", "README: a file without an audio extension is not audio"),
        ("fake.wav", "plain text, not a song — café\n".encode() * 300, "fake.wav holds text, not audio"),
        ("empty.mp3", b"", "empty.mp3 is empty"),
    ],
)
def test_what_is_plainly_not_audio_is_refused(tmp_path: Path, name: str, content: bytes, why: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    assert refusal(path) == why


def test_unknown_bytes_with_an_audio_name_are_left_to_the_server(tmp_path: Path) -> None:
    path = tmp_path / "odd.m4a"
    path.write_bytes(bytes(range(256)) * 20)
    assert refusal(path) is None


def test_the_servers_file_name_is_used_safely() -> None:
    dash = "\u2013"
    both = "attachment; filename=\"Song - Vocals.flac\"; filename*=UTF-8''Song%20%E2%80%93%20Vocals.flac"
    assert attachment_name(both) == f"Song {dash} Vocals.flac"
    assert attachment_name('attachment; filename="a b.wav"') == "a b.wav"
    assert attachment_name("attachment; filename*=UTF-8''..%2F..%2Fetc%2Fpasswd") == "passwd"
    assert attachment_name('attachment; filename=".."') is None
    assert attachment_name("attachment") is None and attachment_name(None) is None
