"""A mix file in, one finished stem file per output out, or no files at all."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .encode import FORMAT_EXTENSIONS, StemWriter
from .engine import SegmentEngine
from .mix import FileSource
from .models import LoadedModel
from .options import output_names
from .stream import Separated, separate_stream


def separate_file(
    engine: SegmentEngine,
    model: LoadedModel,
    mix: Path,
    out_dir: Path,
    *,
    fmt: str = "wav",
    bits: int | None = None,
    rate: int | None = None,
    quality: str = "fast",
    stems: int = 4,
    residual: bool = False,
    progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    seed: int = 0,
) -> tuple[Separated, dict[str, tuple[Path, int]]]:
    """Separate the audio file `mix` into `out_dir`/<stem>.<ext>; each stem's path and size in bytes.

    `bits` (32 = float) and `rate` (None: the model's) are the files' sample format and rate.
    Streams: memory follows the model's segment, not the song. On any failure or cancellation the
    stem files written so far are removed before the exception propagates.
    """
    source = FileSource(mix)
    extension = FORMAT_EXTENSIONS[fmt]
    writers = {
        name: StemWriter(out_dir / f"{name}.{extension}", fmt, source.samplerate, source.channels, bits, rate)
        for name in output_names(model.sources, stems, residual)
    }
    try:
        separated = separate_stream(
            engine,
            model,
            source,
            writers,
            quality=quality,
            stems=stems,
            residual=residual,
            progress=progress,
            should_cancel=should_cancel,
            seed=seed,
        )
        return separated, {name: (writer.path, writer.close()) for name, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
