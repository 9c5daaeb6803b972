"""Reading a mix in blocks: its normalisation statistics, then windows of it, never all of it at once."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import soundfile as sf
import torch

from .options import SeparationError

BLOCK_FRAMES = 1 << 16


class MixSource(Protocol):
    """A float32 mix that can be read from its start any number of times."""

    channels: int
    frames: int
    samplerate: int

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        """(channels, <= size) float32 blocks from the first sample to the last."""
        ...


class ArraySource:
    """A mix already in memory, (channels, samples)."""

    def __init__(self, mix: np.ndarray, samplerate: int) -> None:
        if mix.ndim != 2 or mix.shape[1] < 2:
            raise SeparationError("invalid_audio", f"mix must be (channels, samples>=2), got {mix.shape}")
        self._mix = np.ascontiguousarray(mix, dtype=np.float32)
        self.channels, self.frames = self._mix.shape
        self.samplerate = samplerate

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.frames, size):
            yield self._mix[:, start : start + size]


class FileSource:
    """A mix in an audio file, read through soundfile block by block."""

    def __init__(self, path: Path) -> None:
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise SeparationError("invalid_audio", f"cannot read the mix: {exc}") from exc
        self.path = path
        self.channels, self.frames, self.samplerate = info.channels, info.frames, info.samplerate
        if self.frames < 2:
            raise SeparationError("invalid_audio", f"the mix has {self.frames} samples")

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        with sf.SoundFile(str(self.path)) as file:
            for block in file.blocks(blocksize=size, dtype="float32", always_2d=True):
                yield block.T


def normalisation(source: MixSource) -> tuple[torch.Tensor, torch.Tensor]:
    """demucs.api's mean and std (+1e-8) of the channel-averaged mix, merged block by block in float64."""
    count, mean, m2 = 0, 0.0, 0.0
    for block in source.blocks(BLOCK_FRAMES):
        if not np.isfinite(block).all():
            raise SeparationError("invalid_audio", "mix contains NaN or infinite samples")
        ref = block.mean(axis=0, dtype=np.float32).astype(np.float64)
        n, block_mean = ref.size, float(ref.mean())
        block_m2 = float(((ref - block_mean) ** 2).sum())
        delta = block_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += block_m2 + delta * delta * count * n / total
        count = total
    std = (m2 / (count - 1)) ** 0.5
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32) + 1e-8


class WindowReader:
    """Normalised windows of the mix, zero outside it; keeps only the samples not yet released."""

    def __init__(self, source: MixSource, mean: torch.Tensor, std: torch.Tensor) -> None:
        self._blocks = source.blocks(BLOCK_FRAMES)
        self._buffer: deque[tuple[int, np.ndarray]] = deque()
        self._end = 0
        self.frames = source.frames
        self.channels = source.channels
        self._mean, self._std = mean, std

    def window(self, start: int, size: int) -> torch.Tensor:
        """Mix samples [start, start + size), normalised as the model expects, as (channels, size)."""
        out = torch.zeros(self.channels, size)
        low, high = max(start, 0), min(start + size, self.frames)
        if high > low:
            raw = torch.from_numpy(self.raw(low, high))
            out[:, low - start : high - start] = (raw - self._mean) / self._std
        return out

    def raw(self, start: int, end: int) -> np.ndarray:
        """Mix samples [start, end) as read, (channels, end - start); start must not be released."""
        while self._end < end:
            block = next(self._blocks)
            self._buffer.append((self._end, block))
            self._end += block.shape[1]
        if not self._buffer or start < self._buffer[0][0]:
            raise ValueError(f"samples from {start} were released")
        pieces = [
            block[:, max(start - first, 0) : end - first]
            for first, block in self._buffer
            if first < end and first + block.shape[1] > start
        ]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)

    def release(self, before: int) -> None:
        """Forget whole blocks that end at or before `before`."""
        while self._buffer and self._buffer[0][0] + self._buffer[0][1].shape[1] <= before:
            self._buffer.popleft()
