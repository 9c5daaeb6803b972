"""Stage events in, job transitions (and the job events they cause, via the outbox) out."""

from __future__ import annotations

from typing import Any

from stemflow_shared.events import JOB_SUBMITTED, Event, EventSpec
from stemflow_shared.messaging import Handler
from stemflow_shared.topology import GATEWAY_QUEUE

from .jobs import Jobs


def handlers(jobs: Jobs) -> dict[EventSpec[Any], Handler]:
    """A handler for every event the gateway's queue is bound to (one list: the topology's)."""

    async def on_submitted(event: Event[Any]) -> None:
        await jobs.adopt_external(event)

    async def on_stage_event(event: Event[Any]) -> None:
        await jobs.apply_event(event)

    return {spec: on_submitted if spec is JOB_SUBMITTED else on_stage_event for spec in GATEWAY_QUEUE.events}
