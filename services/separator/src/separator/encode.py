"""Writing stems as wav, flac or mp3, block by block, each exactly as long as the input when decoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .mp3 import Mp3Writer

FORMAT_EXTENSIONS = {"wav": "wav", "flac": "flac", "mp3": "mp3"}

MP3_BITRATE_KBPS = 320
# LAME's quality knob (0 best, 9 fastest); 2 is its recommended near-best setting.
MP3_QUALITY = 2
_PCM_SUBTYPES = {16: "PCM_16", 24: "PCM_24"}
_BITS = {name: bits for bits, name in _PCM_SUBTYPES.items()}
# 32-bit float WAV doubles a 16-bit source's size for nothing; 24 bits keep the model's output beyond hearing.
DEFAULT_BITS = 24


def stem_depth(asked: int | None, source_bits: int | None) -> int:
    """The bit depth of a job's stems: the one asked (32 = float), else 16 for a 16-bit source, else 24."""
    if asked is not None:
        return asked
    return 16 if source_bits == 16 else DEFAULT_BITS


def subtype(fmt: str, bits: int | None) -> str | None:
    """The libsndfile subtype of `bits` (16, 24, or 32 = float) where `fmt` allows it (None for mp3).

    wav: 16- and 24-bit integers, anything else 32-bit float (lossless for the float mix);
    flac: 16-bit stays 16, anything else is 24-bit, FLAC's deepest. `stem_depth` picks `bits` for a job.
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
    """One stem file, written in (channels, samples) float blocks; close() returns its size.

    `rate`: the file's sample rate when it differs from the blocks' (`samplerate`), resampled as it streams.
    """

    def __init__(
        self, path: Path, fmt: str, samplerate: int, channels: int, bits: int | None = None, rate: int | None = None
    ) -> None:
        self.path = path
        self.subtype = subtype(fmt, bits)
        out_rate = rate or samplerate
        if out_rate != samplerate and self.subtype is None:
            raise ValueError("mp3 stems keep the model's sample rate")
        self._resampler = (
            soxr.ResampleStream(samplerate, out_rate, channels, dtype="float32", quality="HQ")
            if out_rate != samplerate
            else None
        )
        # Integer samples: the file's depth, or 16 bits for what LAME encodes; None keeps floats.
        self._bits = 16 if self.subtype is None else _BITS.get(self.subtype)
        self._sound: sf.SoundFile | None = None
        self._mp3: Mp3Writer | None = None
        if self.subtype is None:
            self._mp3 = Mp3Writer(path, samplerate, channels, MP3_BITRATE_KBPS, MP3_QUALITY)
        else:
            self._sound = sf.SoundFile(path, "w", out_rate, channels, self.subtype, format=fmt.upper())

    def write(self, block: np.ndarray) -> np.ndarray:
        """Append a block; returns its samples as a decoder reads them (for mp3, before the lossy coding).

        Resampled, the block is returned as given: the file holds it at another rate, and resampling is linear,
        so stems that sum to the mix still do, to within the quantisation.
        """
        if self._resampler is not None:
            self._put(self._resampler.resample_chunk(np.ascontiguousarray(block.T, dtype=np.float32)).T)
            return block
        return self._put(block)

    def _put(self, block: np.ndarray) -> np.ndarray:
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
        if self._resampler is not None:
            channels = self._sound.channels
            self._put(self._resampler.resample_chunk(np.zeros((0, channels), np.float32), last=True).T)
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
