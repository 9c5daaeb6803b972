"""The models on offer: the catalogue joined with the pools' live announcements and their queues; `/v1/models`.

`GET /v1/models` lists every model with its stem sets, whether a pool serves it now, its queue depth
and an estimated wait; submissions naming a model (and stem set) that no pool serves are refused
with 422 `model_unavailable`. Separator pools never scale to zero in the manifests (minReplicaCount 1),
so refusing at once is kinder than accepting work that would wait for a worker that may not come.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from redis.exceptions import RedisError

from stemflow_shared import telemetry
from stemflow_shared.events import JobOptions
from stemflow_shared.messaging import Broker
from stemflow_shared.separators import CATALOGUE, DEFAULT_MODEL, Announcement, SeparatorRegistry, stem_counts, unserved
from stemflow_shared.topology import PRIORITIES, QueueSpec, separator_queue

from .deps import JobsDep, Owner
from .problems import Problem

router = APIRouter(prefix="/v1")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Estimate:
    """How busy one model's pool is: jobs waiting for it and the expected wait, when known."""

    queue_depth: int
    workers: int
    estimated_wait_s: float | None


class ModelCatalogue:
    """The catalogue and the pools' state. Queue depths are read from the broker (a passive declare per
    queue); the listing reuses a depth read within `listing_max_age_s`, so that clients polling
    `/v1/models` cost the broker at most one round of reads per interval, while a job's place in its
    queue is always read afresh."""

    def __init__(
        self,
        registry: SeparatorRegistry,
        broker: Broker,
        *,
        listing_max_age_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._broker = broker
        self._listing_max_age_s = listing_max_age_s
        self._clock = clock
        self._depths: dict[str, tuple[float, int]] = {}  # queue name -> (read at, messages ready)

    async def live(self) -> list[Announcement]:
        return await self._registry.live()

    async def estimate(self, model: str, live: list[Announcement] | None = None, *, max_age_s: float = 0.0) -> Estimate:
        """How busy `model`'s pool is; its queues' depths read afresh, or reused when read within `max_age_s`."""
        live = await self.live() if live is None else live
        pools = [a for a in live if a.serves(model)]
        depth = 0
        for priority in PRIORITIES:
            try:
                depth += await self._depth(separator_queue(model, priority), max_age_s)
            except Exception as exc:  # the broker is away: depth unknown, not an error for the caller
                log.warning("could not read the depth of %s's queue: %s", model, exc)
        slots = sum(a.slots for a in pools)
        means = [a.mean_job_s for a in pools if a.mean_job_s is not None]
        wait = round(depth * (sum(means) / len(means)) / slots, 1) if slots and means else (0.0 if not depth else None)
        return Estimate(queue_depth=depth, workers=len(pools), estimated_wait_s=wait if pools else None)

    async def _depth(self, queue: QueueSpec, max_age_s: float) -> int:
        now = self._clock()
        known = self._depths.get(queue.name)
        if known is not None and now - known[0] <= max_age_s:
            return known[1]
        depth = await self._broker.queue_depth(queue)
        self._depths[queue.name] = (now, depth)
        return depth

    async def listing(self) -> dict[str, Any]:
        """The body of `GET /v1/models`."""
        live = await self.live()
        models = []
        for name, entry in CATALOGUE.items():
            served = [m for a in live for m in a.models if m.name == name]
            sources = served[0].sources if served else entry.sources
            estimate = await self.estimate(name, live, max_age_s=self._listing_max_age_s)
            models.append(
                {
                    "name": name,
                    "title": entry.title,
                    "description": entry.description,
                    "sources": list(sources),
                    "stems": stem_counts(sources),
                    "served": bool(served),
                    "untrained": any(m.untrained for m in served),
                    "workers": estimate.workers,
                    "queue_depth": estimate.queue_depth,
                    "estimated_wait_s": estimate.estimated_wait_s,
                }
            )
        return {"models": models, "default_model": DEFAULT_MODEL}

    async def require_served(self, options: JobOptions) -> None:
        """Refuse (422 `model_unavailable`) options that name a separation no live pool can do.

        With Redis away the announcements cannot be read: the job is accepted (its work waits in its
        model's queue as before this check existed) rather than a submission failing for a cache.
        """
        if not options.separate:
            return
        wanted = [(t.model, t.stems) for t in options.targets] or [(options.model, options.stems)]
        try:
            # A side read of a job's creation: no span in the job's trace (telemetry.no_client_spans).
            with telemetry.no_client_spans():
                live = await self.live()
        except RedisError as exc:
            log.warning("the separator pools' announcements cannot be read (%s): accepting unchecked", exc)
            return
        missing = unserved(wanted, live)
        if missing:
            names = ", ".join(f"{model} with {stems} stems" for model, stems in missing)
            raise Problem(
                422,
                "model_unavailable",
                f"no separator serves {names} now; GET /v1/models lists what is served",
                errors=[{"field": "targets" if options.targets else "model", "message": f"not served: {names}"}],
            )


@router.get("/models")
async def list_models(who: Owner, jobs: JobsDep) -> dict[str, Any]:
    """Every model with its stem sets, whether a separator serves it now, its queue depth and estimated wait."""
    return await jobs.models.listing()
