"""Writing stems as wav, flac or mp3, block by block, each exactly as long as the input when decoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from .mp3 import Mp3Writer

FORMAT_EXTENSIONS = {"wav": "wav", "flac": "flac", "mp3": "mp3"}
MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg"}

MP3_BITRATE_KBPS = 320
# LAME's quality knob (0 best, 9 fastest); 2 is its recommended near-best setting.
MP3_QUALITY = 2
_PCM_SUBTYPES = {16: "PCM_16", 24: "PCM_24"}
_BITS = {name: bits for bits, name in _PCM_SUBTYPES.items()}


def subtype(fmt: str, bits: int | None) -> str | None:
    """The libsndfile subtype that keeps the input's bit depth where `fmt` allows (None for mp3).

    wav: 16- and 24-bit integer inputs stay so, anything else is 32-bit float (lossless for the
    float mix); flac: 16-bit stays 16, anything else is 24-bit, FLAC's deepest.
    """
    if fmt == "wav":
        return _PCM_SUBTYPES.get(bits or 0, "FLOAT")
    if fmt == "flac":
        return "PCM_16" if bits == 16 else "PCM_24"
    if fmt == "mp3":
        return None
    raise ValueError(f"format must be one of {sorted(FORMAT_EXTENSIONS)}, got {fmt!r}")


def _quantise(block: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Integers as stored (clipped), and the float values a decoder reads back from them."""
    scale = float(1 << (bits - 1))
    ints = np.clip(np.rint(block * scale), -scale, scale - 1)
    return ints, (ints / scale).astype(np.float32)


class StemWriter:
    """One stem file, written in (channels, samples) float blocks; close() returns its size."""

    def __init__(self, path: Path, fmt: str, samplerate: int, channels: int, bits: int | None = None) -> None:
        self.path = path
        self.subtype = subtype(fmt, bits)
        # Integer samples: the file's depth, or 16 bits for what LAME encodes; None keeps floats.
        self._bits = 16 if self.subtype is None else _BITS.get(self.subtype)
        self._sound: sf.SoundFile | None = None
        self._mp3: Mp3Writer | None = None
        if self.subtype is None:
            self._mp3 = Mp3Writer(path, samplerate, channels, MP3_BITRATE_KBPS, MP3_QUALITY)
        else:
            self._sound = sf.SoundFile(path, "w", samplerate, channels, self.subtype, format=fmt.upper())

    def write(self, block: np.ndarray) -> np.ndarray:
        """Append a block; returns its samples as a decoder reads them (for mp3, before the lossy coding)."""
        if self._bits is None:
            assert self._sound is not None
            self._sound.write(block.T)
            return block
        ints, decoded = _quantise(block, self._bits)
        if self._mp3 is not None:
            self._mp3.write(ints.T.astype(np.int16))
        elif self._bits == 16:
            self._sound.write(ints.T.astype(np.int16))  # type: ignore[union-attr]
        else:
            # libsndfile takes 24-bit samples as the top bits of int32.
            self._sound.write(ints.T.astype(np.int32) << 8)  # type: ignore[union-attr]
        return decoded

    def close(self) -> int:
        """Finish the file; its size in bytes."""
        if self._mp3 is not None:
            return self._mp3.close()
        assert self._sound is not None
        self._sound.close()
        return self.path.stat().st_size

    def abort(self) -> None:
        """Close without finishing and remove the file."""
        if self._mp3 is not None:
            self._mp3.abort()
        elif self._sound is not None:
            self._sound.close()
        self.path.unlink(missing_ok=True)


def encode_stem(samples: np.ndarray, samplerate: int, fmt: str, path: Path, bits: int | None = None) -> int:
    """Write float (channels, samples) audio to `path` in `fmt` and return the file's size in bytes."""
    if samples.ndim != 2:
        raise ValueError(f"samples must be (channels, samples), got shape {samples.shape}")
    writer = StemWriter(path, fmt, samplerate, samples.shape[0], bits)
    try:
        writer.write(samples)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
