"""Recognise audio containers by their bytes, never by the file name."""

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

HEAD_BYTES = 8192

# Containers libsndfile decodes; anything else recognised here goes to ffmpeg.
SNDFILE_CONTAINERS = frozenset({"WAV", "RF64", "W64", "AIFF", "CAF", "FLAC", "OGG", "MP3"})

# WAVE format tags libsndfile decodes (PCM, ADPCMs, float, A/u-law, GSM, G721, MP3).
_SNDFILE_WAV_TAGS = frozenset({0x0001, 0x0002, 0x0003, 0x0006, 0x0007, 0x0011, 0x0031, 0x0040, 0x0055})
_WAV_EXTENSIBLE = 0xFFFE
# Ogg codecs libsndfile lacks, by the magic that opens their first packet.
_FFMPEG_OGG_CODECS = (b"\x7fFLAC", b"Speex   ")
# A streaming writer that cannot seek back leaves these as the data chunk size.
_UNKNOWN_SIZES = frozenset({0, 0xFFFFFFFF})

_W64_GUID = b"riff\x2e\x91\xcf\x11\xa5\xd6\x28\xdb\x04\xc1\x00\x00"
_W64_DATA_GUID = b"data\xf3\xac\xd3\x11\x8c\xd1\x00\xc0\x4f\x8e\xdb\x8a"
# W64 chunks: a 16-byte GUID and a 64-bit size that counts the header too; bodies are 8-byte aligned.
_W64_HEADER = 24
_W64_FIRST_CHUNK = 40
_ASF_GUID = b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"

_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_MPEG1_KBPS = {
    3: (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    2: (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
}
_MPEG2_KBPS = {
    3: (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    1: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}


@dataclass(frozen=True)
class Sniffed:
    """What the bytes of a file say it is."""

    container: str
    decoder: str  # "sndfile" or "ffmpeg"
    truncated: bool  # the container declares more audio than the file holds
    # What a WAV or RF64 header declares, read before any decoder sees it; None when unknown.
    channels: int | None = None
    sample_rate: int | None = None


def sniff(path: Path) -> Sniffed | None:
    """Recognise the container of `path`, or None when it is not audio we know."""
    with path.open("rb") as f:
        head = f.read(HEAD_BYTES)
        tag = _id3_size(head)
        if tag:
            f.seek(tag)
            head = f.read(HEAD_BYTES)
            container = _after_id3(head)
        else:
            container = sniff_bytes(head)
        if container is None:
            return None
        channels, rate = _declared_layout(f) if container in ("WAV", "RF64") else (None, None)
        return Sniffed(container, _decoder(f, head, container), _truncated(f, container), channels, rate)


def _decoder(f: BinaryIO, head: bytes, container: str) -> str:
    """Which decoder the content calls for: libsndfile where it can, else ffmpeg."""
    if container not in SNDFILE_CONTAINERS:
        return "ffmpeg"
    if container == "WAV" and not _sndfile_wav_codec(f):
        return "ffmpeg"
    if container == "OGG" and any(codec in head[:512] for codec in _FFMPEG_OGG_CODECS):
        return "ffmpeg"
    # A FLAC streamed to a pipe says 0 samples, which libsndfile cannot read to the end.
    if container == "FLAC" and len(head) >= 26 and int.from_bytes(head[18:26], "big") & (2**36 - 1) == 0:
        return "ffmpeg"
    return "sndfile"


def sniff_bytes(head: bytes) -> str | None:
    """Name the container that starts with `head`, or None."""
    if len(head) < 12:
        return None
    magic4, form = head[:4], head[8:12]
    if magic4 == b"RIFF" and form == b"WAVE":
        return "WAV"
    if magic4 == b"RF64" and form == b"WAVE":
        return "RF64"
    if magic4 == b"FORM" and form in (b"AIFF", b"AIFC"):
        return "AIFF"
    simple = {b"fLaC": "FLAC", b"OggS": "OGG", b"caff": "CAF", b"\x1a\x45\xdf\xa3": "MATROSKA"}
    if magic4 in simple:
        return simple[magic4]
    if head.startswith(_W64_GUID):
        return "W64"
    if head.startswith(_ASF_GUID):
        return "ASF"
    if head[4:8] == b"ftyp":
        return "MP4"
    if _chained(head, 0, _mpeg_frame_length):
        return "MP3"
    if _chained(head, 0, _adts_frame_length):
        return "AAC"
    return None


def _after_id3(head: bytes) -> str | None:
    """Name what follows an ID3v2 tag; encoders may pad before the first frame."""
    if head.startswith(b"fLaC"):
        return "FLAC"
    for offset in range(max(len(head) - 4, 0)):
        if _chained(head, offset, _adts_frame_length):
            return "AAC"
        if _chained(head, offset, _mpeg_frame_length):
            return "MP3"
    # The tag says audio; the decoder will judge the rest (and call it corrupt).
    return "MP3"


def _id3_size(head: bytes) -> int:
    """Bytes taken by a leading ID3v2 tag, or 0."""
    if len(head) < 10 or not head.startswith(b"ID3") or any(b & 0x80 for b in head[6:10]):
        return 0
    size = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
    footer = 10 if head[5] & 0x10 else 0
    return 10 + size + footer


def _chained(head: bytes, offset: int, frame_length) -> bool:
    """Whether a frame starts at `offset` and, if `head` reaches that far, another follows."""
    length = frame_length(head[offset : offset + 7])
    if not length:
        return False
    following = head[offset + length : offset + length + 7]
    return len(following) < 7 or bool(frame_length(following))


def _mpeg_frame_length(h: bytes) -> int:
    """Length of the MPEG audio frame whose header is `h`, or 0 when it is none."""
    if len(h) < 4 or h[0] != 0xFF or h[1] & 0xE0 != 0xE0:
        return 0
    version, layer = (h[1] >> 3) & 3, (h[1] >> 1) & 3
    bitrate_index, rate_index, padding = h[2] >> 4, (h[2] >> 2) & 3, (h[2] >> 1) & 1
    if version == 1 or layer == 0 or bitrate_index in (0, 15) or rate_index == 3:
        return 0
    kbps = (_MPEG1_KBPS if version == 3 else _MPEG2_KBPS)[layer][bitrate_index]
    rate = _MPEG_RATES[version][rate_index]
    if layer == 3:
        return (12 * kbps * 1000 // rate + padding) * 4
    per_frame = 144 if layer == 2 or version == 3 else 72
    return per_frame * kbps * 1000 // rate + padding


def _adts_frame_length(h: bytes) -> int:
    """Length of the ADTS (raw AAC) frame whose header is `h`, or 0 when it is none."""
    if len(h) < 7 or h[0] != 0xFF or h[1] & 0xF6 != 0xF0 or (h[2] >> 2) & 0xF > 12:
        return 0
    length = ((h[3] & 3) << 11) | (h[4] << 3) | (h[5] >> 5)
    return length if length >= 7 else 0


def _declared_layout(f: BinaryIO) -> tuple[int | None, int | None]:
    """(channels, sample rate) as the 'fmt ' chunk of a WAV or RF64 file declares them."""
    for chunk, start, size in _chunks(f, 12, big_endian=False):
        if chunk == b"fmt ":
            f.seek(start)
            fmt = f.read(min(size, 8))
            return struct.unpack_from("<HI", fmt, 2) if len(fmt) == 8 else (None, None)
    return None, None


def _sndfile_wav_codec(f: BinaryIO) -> bool:
    """Whether the WAV's 'fmt ' chunk names a codec libsndfile decodes."""
    for chunk, start, size in _chunks(f, 12, big_endian=False):
        if chunk == b"fmt ":
            f.seek(start)
            fmt = f.read(min(size, 40))
            if len(fmt) < 2:
                return True  # malformed; libsndfile reports it
            tag = struct.unpack_from("<H", fmt)[0]
            if tag == _WAV_EXTENSIBLE and len(fmt) >= 26:
                tag = struct.unpack_from("<H", fmt, 24)[0]
            return tag in _SNDFILE_WAV_TAGS
    return True


def _truncated(f: BinaryIO, container: str) -> bool:
    """Whether the container declares more audio than the file holds."""
    if container == "WAV":
        return _chunk_truncated(f, b"data", big_endian=False)
    if container == "RF64":
        return _rf64_truncated(f)
    if container == "W64":
        return _w64_truncated(f)
    if container == "AIFF":
        return _chunk_truncated(f, b"SSND", big_endian=True)
    if container == "OGG":
        return not _ogg_ends_cleanly(f)
    return False


def _chunk_truncated(f: BinaryIO, wanted: bytes, *, big_endian: bool) -> bool:
    """Whether the audio chunk's declared size runs past the end of the file."""
    end = f.seek(0, 2)
    for chunk, start, size in _chunks(f, 12, big_endian=big_endian):
        if chunk == wanted:
            return size not in _UNKNOWN_SIZES and start + size > end
    return False


def _rf64_truncated(f: BinaryIO) -> bool:
    """Whether the RF64 data chunk, sized by its 'ds64' chunk when its own size field is full, runs past the end."""
    end = f.seek(0, 2)
    ds64_data_size = None
    for chunk, start, size in _chunks(f, 12, big_endian=False):
        if chunk == b"ds64":
            f.seek(start + 8)  # after the 64-bit RIFF size
            field = f.read(8)
            ds64_data_size = struct.unpack("<Q", field)[0] if len(field) == 8 else None
        elif chunk == b"data":
            declared = ds64_data_size if size == 0xFFFFFFFF and ds64_data_size is not None else size
            return declared not in _UNKNOWN_SIZES and start + declared > end
    return False


def _w64_truncated(f: BinaryIO) -> bool:
    """Whether the Sony Wave64 data chunk's declared size runs past the end of the file."""
    end = f.seek(0, 2)
    offset = _W64_FIRST_CHUNK
    while True:
        f.seek(offset)
        header = f.read(_W64_HEADER)
        if len(header) < _W64_HEADER:
            return False
        size = struct.unpack_from("<Q", header, 16)[0]
        if header[:16] == _W64_DATA_GUID:
            return offset + size > end
        if size < _W64_HEADER:
            return False  # malformed; libsndfile reports it
        offset += (size + 7) // 8 * 8


def _chunks(f: BinaryIO, offset: int, *, big_endian: bool):
    """Yield (id, body offset, declared size) of the RIFF/IFF chunks from `offset` on."""
    layout = ">4sI" if big_endian else "<4sI"
    while True:
        f.seek(offset)
        header = f.read(8)
        if len(header) < 8:
            return
        chunk, size = struct.unpack(layout, header)
        yield chunk, offset + 8, size
        offset += 8 + size + (size & 1)


def _ogg_ends_cleanly(f: BinaryIO) -> bool:
    """Whether the last Ogg page is complete and marks the end of its stream."""
    end = f.seek(0, 2)
    # An Ogg page is at most 65307 bytes, so the last one starts in this tail.
    start = max(0, end - 65536)
    f.seek(start)
    tail = f.read()
    at = tail.rfind(b"OggS")
    while at >= 0:
        page = tail[at:]
        if len(page) >= 27 and len(page) >= 27 + page[26]:
            body = sum(page[27 : 27 + page[26]])
            if 27 + page[26] + body == len(page):
                return bool(page[5] & 0x04)
        at = tail.rfind(b"OggS", 0, at)
    return False
