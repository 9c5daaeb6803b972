"""What the separator pools serve: the model catalogue and the pools' expiring announcements.

Each separator replica announces the models it has loaded (with their sources, so the stem sets follow)
in one Redis hash, and renews the announcement every few seconds; an announcement not renewed in time
expires. The gateway reads the live ones to list `/v1/models` and to refuse work no pool would take.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, Field, ValidationError

from .topology import MODELS

DEFAULT_MODEL = "htdemucs"
ANNOUNCE_TTL_S = 15.0
FOUR_STEMS = ("drums", "bass", "other", "vocals")


class CatalogueEntry(BaseModel):
    """What a model is, whether or not a pool serves it now."""

    name: str
    title: str
    description: str
    sources: tuple[str, ...]


CATALOGUE: dict[str, CatalogueEntry] = {
    entry.name: entry
    for entry in (
        CatalogueEntry(
            name="htdemucs",
            title="HT-Demucs",
            description="Hybrid Transformer Demucs: the fast default, good on most music.",
            sources=FOUR_STEMS,
        ),
        CatalogueEntry(
            name="htdemucs_ft",
            title="HT-Demucs fine-tuned",
            description="A bag of four fine-tuned models: the best four-stem quality, about four times slower.",
            sources=FOUR_STEMS,
        ),
        CatalogueEntry(
            name="htdemucs_6s",
            title="HT-Demucs 6 sources",
            description="Adds guitar and piano stems (piano is still weak); as fast as the default.",
            sources=(*FOUR_STEMS, "guitar", "piano"),
        ),
    )
}
assert set(CATALOGUE) == set(MODELS), "every model of the contract has a catalogue entry"


def stem_counts(sources: Sequence[str]) -> list[int]:
    """The stem sets a model with these sources can deliver (the separator's grouping rules)."""
    counts = []
    if "vocals" in sources:
        counts.append(2)
    if set(FOUR_STEMS) <= set(sources):
        counts.append(4)
    if len(sources) == 6:
        counts.append(6)
    return counts


class ServedModel(BaseModel):
    name: str
    sources: tuple[str, ...]
    untrained: bool = False


class Announcement(BaseModel):
    """One separator replica's word on what it serves, valid until `expires_at` (epoch seconds)."""

    replica: str
    models: list[ServedModel]
    device: str = "cpu"
    # Jobs it works on at once (its prefetch per queue) and how long a job has taken it lately.
    slots: int = Field(default=1, ge=1)
    mean_job_s: float | None = Field(default=None, ge=0)
    expires_at: float = 0.0

    def serves(self, model: str, stems: int | None = None) -> bool:
        return any(m.name == model and (stems is None or stems in stem_counts(m.sources)) for m in self.models)


class SeparatorRegistry:
    """The live announcements in Redis hash `<prefix>separators` (field: replica id)."""

    def __init__(self, redis: object, prefix: str) -> None:
        self._redis = redis
        self._key = f"{prefix}separators"

    async def announce(self, announcement: Announcement, ttl_s: float = ANNOUNCE_TTL_S) -> None:
        stamped = announcement.model_copy(update={"expires_at": time.time() + ttl_s})
        await self._redis.hset(self._key, announcement.replica, stamped.model_dump_json())  # type: ignore[attr-defined]

    async def withdraw(self, replica: str) -> None:
        await self._redis.hdel(self._key, replica)  # type: ignore[attr-defined]

    async def live(self) -> list[Announcement]:
        """The announcements not yet expired; expired or unreadable ones are removed on the way."""
        raw = await self._redis.hgetall(self._key)  # type: ignore[attr-defined]
        now = time.time()
        live: list[Announcement] = []
        stale: list[bytes | str] = []
        for field, value in raw.items():
            try:
                announcement = Announcement.model_validate_json(value)
            except ValidationError:
                stale.append(field)
                continue
            if announcement.expires_at > now:
                live.append(announcement)
            else:
                stale.append(field)
        if stale:
            await self._redis.hdel(self._key, *stale)  # type: ignore[attr-defined]
        return live


def unserved(targets: Iterable[tuple[str, int]], live: Sequence[Announcement]) -> list[tuple[str, int]]:
    """The (model, stems) pairs no live pool can separate."""
    return [(model, stems) for model, stems in targets if not any(a.serves(model, stems) for a in live)]
