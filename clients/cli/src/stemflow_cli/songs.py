"""Songs before upload (audio or not, as the web page judges) and the names of files that come back."""

from __future__ import annotations

import re
from pathlib import Path, PurePath
from urllib.parse import unquote

from .errors import CliError, Exit

# What the web page says of a file the service does not take, so that both say the same.
ACCEPTED = "Send WAV, FLAC, MP3, OGG, Opus or M4A."
AUDIO_SUFFIXES = frozenset(
    {".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".mp4", ".aac", ".aif", ".aiff"}
)
# The first bytes of the containers above (MP3 frames and ADTS start with 0xFFE/0xFFF sync bits).
_MAGIC = (b"RIFF", b"RF64", b"fLaC", b"ID3", b"OggS", b"FORM")
_SNIFF_BYTES = 4096


def refusal(path: Path) -> str | None:
    """Why `path` is not a song the service takes (None: it may be one; the server decides the rest)."""
    if path.suffix.lower() not in AUDIO_SUFFIXES:
        kind = f"a {path.suffix.lower()} file" if path.suffix else "a file without an audio extension"
        return f"{path.name}: {kind} is not audio"
    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    if not head:
        return f"{path.name} is empty"
    if head.startswith(_MAGIC) or head[4:8] == b"ftyp" or (head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return None
    if _is_text(head):
        return f"{path.name} holds text, not audio"
    return None


def check_song(song: str) -> None:
    """Refuse, before any upload, a missing file or one that is plainly not audio (exit 6, the page's words)."""
    path = Path(song)
    if not path.is_file():
        raise CliError(f"no such file: {song}", Exit.USAGE, hint="give audio files or http(s) URLs")
    why = refusal(path)
    if why is not None:
        raise CliError(f"This file type is not accepted ({why}). {ACCEPTED}", Exit.REJECTED)


def _is_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the end of the sniffed bytes is still text.
        return exc.start >= len(head) - 3
    return True


def attachment_name(header: str | None) -> str | None:
    """The file name of a `Content-Disposition` (`filename*=UTF-8''...` of RFC 6266 first), made safe to write
    here: no folders, no control characters; None when there is none worth using."""
    if not header:
        return None
    extended = re.search(r"filename\*\s*=\s*UTF-8''([^;\s]+)", header, re.IGNORECASE)
    plain = re.search(r'filename\s*=\s*"([^"]*)"', header) or re.search(r"filename\s*=\s*([^;\s]+)", header)
    name = unquote(extended.group(1)) if extended else plain.group(1) if plain else ""
    name = re.sub(r"[\x00-\x1f\x7f]", "", PurePath(name.replace("\\", "/")).name).strip()
    return name if name.strip(".") else None
