"""What a request may ask of the separator: quality presets, stem sets, and the errors for the rest."""

from collections.abc import Sequence

QUALITY_PRESETS: dict[str, dict[str, float]] = {
    "fast": {"shifts": 0, "overlap": 0.1},
    # demucs' shifts=1 is one randomly offset pass: it averages nothing, so it would cost padding and
    # reproducibility for no gain; the shift trick only starts paying at 2 passes.
    "balanced": {"shifts": 0, "overlap": 0.25},
    "best": {"shifts": 2, "overlap": 0.5},
}

FOUR_STEMS = ("drums", "bass", "other", "vocals")
RESIDUAL = "residual"


class SeparationCancelled(Exception):
    """The caller asked to stop; raised between segments."""


class SeparationError(Exception):
    """The request cannot be separated; `code` is stable, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def quality_preset(quality: str) -> dict[str, float]:
    """The apply_model settings for a quality name."""
    try:
        return QUALITY_PRESETS[quality]
    except KeyError:
        raise SeparationError("quality_unknown", f"quality must be one of {sorted(QUALITY_PRESETS)}") from None


def stem_groups(sources: Sequence[str], stems: int) -> dict[str, tuple[str, ...]]:
    """Which model sources are summed into each output stem."""
    if stems == 6 and len(sources) == 6:
        return {source: (source,) for source in sources}
    if stems == 4 and set(FOUR_STEMS) <= set(sources):
        extra = tuple(source for source in sources if source not in FOUR_STEMS)
        return {stem: (stem, *extra) if stem == "other" else (stem,) for stem in FOUR_STEMS}
    if stems == 2 and "vocals" in sources:
        return {"vocals": ("vocals",), "accompaniment": tuple(s for s in sources if s != "vocals")}
    raise SeparationError("stems_unsupported", f"{stems} stems are not available from a model with sources {sources}")


def output_names(sources: Sequence[str], stems: int, residual: bool) -> tuple[str, ...]:
    """The stems a request delivers, in order; `residual` (mix minus the others) comes last."""
    names = tuple(stem_groups(sources, stems))
    return (*names, RESIDUAL) if residual else names
