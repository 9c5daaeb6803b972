"""Dead letters end jobs: whatever is dead-lettered for a job becomes its stage's failure, within seconds.

Every queue dead-letters to one exchange; the gateway reads a copy of each dead letter (the other copy
stays in the dead-letter queue for people) and turns it into the failure of the stage whose work it was,
through the same state machine as a worker's own `*.failed` event: the job fails (or, for one target of
several, completes partially) and its terminal event goes out. A dead letter with no readable job id is
counted and kept. The codes are `<stage>_<why>`:

| why | when |
|---|---|
| `invalid_event` | the message was not a valid event of the contract (malformed JSON, envelope, data) |
| `handler_error` | the stage's handler failed on every delivery up to the limit |
| `delivery_limit` | the broker gave up after the delivery limit (e.g. a worker that crashes on it) |
| `dead_lettered` | the broker dead-lettered it for another reason (rejected, expired) |
| anything else | a permanent error the handler named itself, e.g. `separation_model_unknown` |

A practice mix's work (the `mixer` queue, or a `mix.*` event the gateway could not apply) ends that mix,
not the job: the mix fails with `mix_<why>`.
"""

from __future__ import annotations

import logging
import re

from stemflow_shared import metrics
from stemflow_shared.events import (
    ANALYSIS_FAILED,
    INGEST_FAILED,
    SEPARATION_FAILED,
    SPECS_BY_TYPE,
    ErrorInfo,
    EventSpec,
    StageFailed,
    make_event,
)
from stemflow_shared.messaging import DeadLetter, PermanentError
from stemflow_shared.topology import ANALYZER_QUEUE, GATEWAY_QUEUE, INGEST_QUEUE, MIXER_QUEUE, WEBHOOKS_QUEUE

from . import lifecycle
from .jobs import Jobs
from .mixes import Mixes

log = logging.getLogger(__name__)

INVALID_EVENT = frozenset(
    {"malformed_json", "invalid_envelope", "invalid_data", "unknown_type", "unsupported_version", "no_handler"}
)
FAILED_EVENTS: dict[str, EventSpec[StageFailed]] = {
    "ingest": INGEST_FAILED,
    "separation": SEPARATION_FAILED,
    "analysis": ANALYSIS_FAILED,
}
# The stage whose result an event is, for events the gateway itself could not apply.
_STAGE_OF_EVENT = {
    "job.submitted": "ingest",
    "audio.ingested": "ingest",
    "ingest.failed": "ingest",
    "separation.progress": "separation",
    "separation.completed": "separation",
    "separation.failed": "separation",
    "analysis.completed": "analysis",
    "analysis.failed": "analysis",
    "mix.progress": "mix",
    "mix.completed": "mix",
    "mix.failed": "mix",
}
# What the broker says when it dead-letters for reasons of its own (besides the delivery limit).
BROKER_REASONS = frozenset({"rejected", "expired", "maxlen", "unknown"})
WHY = {
    "invalid_event": "its message was not a valid event",
    "handler_error": "it failed on every attempt",
    "delivery_limit": "its message was delivered too many times",
    "dead_lettered": "its message was dead-lettered",
}


def stage_of(letter: DeadLetter) -> str | None:
    """The job stage whose work the dead letter was (None: not a stage's work, e.g. a notifier's copy)."""
    if letter.queue == INGEST_QUEUE.name:
        return "ingest"
    if letter.queue.startswith("separator."):
        return "separation"
    if letter.queue == ANALYZER_QUEUE.name:
        return "analysis"
    if letter.queue == MIXER_QUEUE.name:
        return "mix"
    if letter.queue == GATEWAY_QUEUE.name:
        spec = SPECS_BY_TYPE.get(letter.event_type or "")
        return _STAGE_OF_EVENT.get(spec.name) if spec is not None else "ingest"
    return None


def failure_code(stage: str, reason: str) -> str:
    if reason in INVALID_EVENT:
        why = "invalid_event"
    elif reason == "handler_failed":
        why = "handler_error"
    elif reason == "delivery_limit":
        why = "delivery_limit"
    elif reason in BROKER_REASONS or not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", reason):
        why = "dead_lettered"
    else:  # a permanent error the handler named itself, which may name its stage already
        why = reason.removeprefix(f"{stage}_")
    return f"{stage}_{why}"[:64]


class DeadLetterWatch:
    def __init__(self, jobs: Jobs, mixes: Mixes | None = None) -> None:
        self._jobs = jobs
        self._mixes = mixes

    async def settle(self, letter: DeadLetter) -> None:
        outcome = await self._settle(letter)
        metrics.DEAD_LETTERS_SETTLED.labels(letter.queue.split(".")[0], outcome).inc()

    async def _settle(self, letter: DeadLetter) -> str:
        if letter.job_id is None:
            log.warning(
                "a dead letter from %s names no job (%s); it stays in the dead-letter queue",
                letter.queue,
                letter.reason,
            )
            return "unattributed"
        if letter.queue == WEBHOOKS_QUEUE.name:
            found = await self._jobs.webhook_failed(
                letter.job_id, ErrorInfo(code=failure_code("webhook", letter.reason), message=letter.detail[:300])
            )
            return "webhook_failed" if found else "no_job"
        stage = stage_of(letter)
        if stage is None:
            return "not_a_job_stage"
        code = failure_code(stage, letter.reason)
        if stage == "mix":
            return await self._settle_mix(letter, code)
        log.warning(
            "job %s: the %s stage's message was dead-lettered (%s: %s)",
            letter.job_id,
            stage,
            letter.reason,
            letter.detail[:300],
        )
        message = (
            f"the {stage} stage stopped: {WHY.get(code.removeprefix(stage + '_'), letter.reason.replace('_', ' '))}"
        )
        failed = StageFailed(job_id=letter.job_id, target=letter.target, error=ErrorInfo(code=code, message=message))
        try:
            ended = await self._jobs.apply_event(make_event(FAILED_EVENTS[stage], failed, source=lifecycle.SOURCE))
        except PermanentError:
            return "no_job"
        return "job_failed" if ended else "job_ended"

    async def _settle_mix(self, letter: DeadLetter, code: str) -> str:
        """A mix's work was dead-lettered: that mix fails (the job, finished long ago, stays as it is)."""
        if self._mixes is None or letter.job_id is None or letter.mix_id is None:
            return "unattributed"
        log.warning("job %s: mix %s was dead-lettered (%s)", letter.job_id, letter.mix_id, letter.reason)
        why = WHY.get(code.removeprefix("mix_"), letter.reason.replace("_", " "))
        error = ErrorInfo(code=code, message=f"the mix could not be rendered: {why}")
        try:
            ended = await self._mixes.fail(letter.job_id, letter.mix_id, error)
        except PermanentError:
            return "no_job"
        return "mix_failed" if ended else "mix_ended"
