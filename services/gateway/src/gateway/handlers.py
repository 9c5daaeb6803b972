"""Stage events in, job transitions (and the job events they cause, via the outbox) out."""

from __future__ import annotations

from typing import Any

from stemflow_shared.events import (
    ANALYSIS_COMPLETED,
    ANALYSIS_FAILED,
    AUDIO_INGESTED,
    INGEST_FAILED,
    JOB_SUBMITTED,
    SEPARATION_COMPLETED,
    SEPARATION_FAILED,
    SEPARATION_PROGRESS,
    Event,
    EventSpec,
)
from stemflow_shared.messaging import Handler

from .jobs import Jobs


def handlers(jobs: Jobs) -> dict[EventSpec[Any], Handler]:
    async def on_submitted(event: Event[Any]) -> None:
        await jobs.adopt_external(event)

    async def on_stage_event(event: Event[Any]) -> None:
        await jobs.apply_event(event)

    stage_events = (
        AUDIO_INGESTED,
        INGEST_FAILED,
        SEPARATION_PROGRESS,
        SEPARATION_COMPLETED,
        SEPARATION_FAILED,
        ANALYSIS_COMPLETED,
        ANALYSIS_FAILED,
    )
    return {JOB_SUBMITTED: on_submitted, **{spec: on_stage_event for spec in stage_events}}
