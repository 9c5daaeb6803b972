"""Streaming MP3 with a LAME "Info" tag, so decoders trim the encoder delay and padding (gapless).

lameenc returns bare MPEG frames. This writer reserves the first frame, streams lameenc's frames
after it, and at the end writes the tag LAME itself writes when it can seek: an Info (CBR Xing)
header with the frame and byte counts, and the LAME extension with encoder delay and padding and
both CRCs. mpg123 (libsndfile's MP3 decoder), ffmpeg and browsers use it to decode exactly the
input's samples; a decoder that ignores it sees one silent frame first.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import lameenc
import numpy as np

SAMPLES_PER_FRAME = 1152
# LAME's encoder delay (lame_get_encoder_delay) with its default settings.
ENCODER_DELAY = 576
LAME_VERSION = b"LAME3.100"
_BITRATES = {
    3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_SAMPLERATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC16 = _crc16_table()


def crc16(data: bytes, crc: int = 0) -> int:
    """CRC-16/ARC, the checksum of LAME's tag."""
    for byte in data:
        crc = (crc >> 8) ^ _CRC16[(crc ^ byte) & 0xFF]
    return crc


class FrameHeader:
    """The fields of a layer III frame header that size a frame."""

    def __init__(self, raw: bytes) -> None:
        if len(raw) < 4 or raw[0] != 0xFF or raw[1] & 0xE0 != 0xE0 or (raw[1] >> 1) & 3 != 1:
            raise ValueError(f"not an MPEG layer III frame header: {raw[:4].hex()}")
        self.raw = bytes(raw[:4])
        self.version = (raw[1] >> 3) & 3
        self.bitrate_index = raw[2] >> 4
        self.samplerate = _SAMPLERATES[self.version][(raw[2] >> 2) & 3]
        self.padding = (raw[2] >> 1) & 1
        self.mono = raw[3] >> 6 == 3

    @property
    def size(self) -> int:
        kbps = _BITRATES[3 if self.version == 3 else 2][self.bitrate_index]
        return (144 if self.version == 3 else 72) * kbps * 1000 // self.samplerate + self.padding

    @property
    def side_info(self) -> int:
        if self.version == 3:
            return 17 if self.mono else 32
        return 9 if self.mono else 17

    def tag_header(self) -> bytes:
        """This header without padding and without CRC protection, for the tag frame."""
        return bytes([self.raw[0], self.raw[1] | 1, self.raw[2] & ~2 & 0xFF, self.raw[3]])


class Mp3Writer:
    """Encodes int16 blocks to an MP3 file with a gapless tag; close() finishes the tag."""

    def __init__(self, path: Path, samplerate: int, channels: int, kbps: int, quality: int) -> None:
        if channels not in (1, 2):
            raise ValueError(f"mp3 holds 1 or 2 channels, got {channels}")
        self._encoder = lameenc.Encoder()
        self._encoder.set_bit_rate(kbps)
        self._encoder.set_in_sample_rate(samplerate)
        self._encoder.set_channels(channels)
        self._encoder.set_quality(quality)
        self._file: BinaryIO = path.open("wb")
        self._pending = b""
        self._header: FrameHeader | None = None
        self._frames = 0
        self._samples = 0
        self._music_crc = 0
        self._bytes = 0

    def write(self, pcm: np.ndarray) -> None:
        """Encode (samples, channels) int16."""
        self._samples += pcm.shape[0]
        self._frames_out(bytes(self._encoder.encode(np.ascontiguousarray(pcm, dtype="<i2").tobytes())))

    def close(self) -> int:
        """Flush, write the tag, close; the file's size in bytes."""
        self._frames_out(bytes(self._encoder.flush()))
        if self._pending:
            raise ValueError(f"lameenc left {len(self._pending)} bytes that are not a whole frame")
        if self._header is None:
            raise ValueError("lameenc produced no frames")
        self._file.seek(0)
        self._file.write(self._tag(self._header))
        self._file.close()
        return self._bytes + self._header_frame_size()

    def abort(self) -> None:
        self._file.close()

    def _frames_out(self, data: bytes) -> None:
        data = self._pending + data
        position = 0
        while len(data) - position >= 4:
            header = FrameHeader(data[position : position + 4])
            if len(data) - position < header.size:
                break
            if self._header is None:
                self._header = header
                self._file.write(bytes(self._header_frame_size()))
            frame = data[position : position + header.size]
            self._file.write(frame)
            self._music_crc = crc16(frame, self._music_crc)
            self._bytes += len(frame)
            self._frames += 1
            position += header.size
        self._pending = data[position:]

    def _header_frame_size(self) -> int:
        assert self._header is not None
        return FrameHeader(self._header.tag_header()).size

    def _tag(self, header: FrameHeader) -> bytes:
        size = self._header_frame_size()
        padding = self._frames * SAMPLES_PER_FRAME - ENCODER_DELAY - self._samples
        if not 0 <= padding < 4096:
            raise ValueError(f"padding {padding} does not fit the LAME tag")
        # Info: frames, bytes, a linear seek table (constant bitrate) and a quality of 0 (unknown).
        toc = bytes(i * 256 // 100 for i in range(100))
        xing = b"Info" + struct.pack(">III", 0x0F, self._frames, size + self._bytes) + toc + struct.pack(">I", 0)
        source_rate = 1 if header.samplerate == 44100 else 2 if header.samplerate == 48000 else 0
        lame = (
            LAME_VERSION
            + bytes([0x01, 0])  # tag revision 0, CBR; lowpass unknown
            + bytes(8)  # peak and replay gains unknown
            + bytes([0, 255])  # encoding flags; bitrate (255: 255 kbps or more)
            + ((ENCODER_DELAY << 12) | padding).to_bytes(3, "big")
            + bytes([source_rate << 6, 0])  # misc; mp3 gain
            + bytes(2)  # preset and surround
            + struct.pack(">I", size + self._bytes)
            + struct.pack(">H", self._music_crc)
        )
        start = header.tag_header() + bytes(header.side_info) + xing + lame
        tag = start + struct.pack(">H", crc16(start))
        if len(tag) > size:
            raise ValueError(f"the tag needs {len(tag)} bytes, the frame has {size}")
        return tag + bytes(size - len(tag))
