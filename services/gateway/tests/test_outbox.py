"""The outbox relay on the real MongoDB and RabbitMQ: what a flush removes, and the gateway's own events."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from gateway import lifecycle
from stemflow_shared.events import (
    JOB_CANCELLED,
    JOB_SUBMITTED,
    Event,
    InputRef,
    JobCancelled,
    JobOptions,
    JobSubmitted,
    make_event,
)


def _submitted(job_id: str, owner: str = "outbox-owner") -> Any:
    data = JobSubmitted(
        job_id=job_id, owner=owner, options=JobOptions(), input=InputRef(source_url="http://a.example/x.wav")
    )
    return make_event(JOB_SUBMITTED, data, source=lifecycle.SOURCE)


def _job(job_id: str) -> dict[str, Any]:
    return lifecycle.new_job(
        job_id,
        "outbox-owner",
        JobOptions(),
        {"source_url": "http://a.example/x.wav"},
        now=lifecycle.utcnow(),
        retention=timedelta(days=1),
    )


async def test_marking_published_removes_only_those_events_and_the_timestamp_once_empty(app: Any) -> None:
    repo = app.state.jobs.repo
    job_id = lifecycle.new_job_id()
    first, second = _submitted(job_id), _submitted(job_id)
    await repo.insert(_job(job_id), [first, second])

    await repo.mark_published(job_id, [first.id])
    doc = await repo.jobs.find_one({"_id": job_id})
    assert [entry["id"] for entry in doc["outbox"]] == [second.id]
    assert doc["outbox_at"] == doc["created_at"].replace(tzinfo=doc["outbox_at"].tzinfo)

    await repo.mark_published(job_id, [second.id, "not-an-event-of-this-job"])
    doc = await repo.jobs.find_one({"_id": job_id})
    assert doc["outbox"] == [] and "outbox_at" not in doc
    assert await repo.pending_events(job_id) == []


async def test_a_new_jobs_events_are_published_from_what_was_written_and_its_own_submission_is_not_adopted(
    app: Any,
) -> None:
    jobs = app.state.jobs
    job_id = lifecycle.new_job_id()
    event = _submitted(job_id)
    cancelled = make_event(JOB_CANCELLED, JobCancelled(job_id=job_id, owner="outbox-owner"), source=lifecycle.SOURCE)
    doc = await jobs.repo.insert(_job(job_id), [event, cancelled])

    assert await jobs.relay.flush(job_id, doc["outbox"]) == 2
    stored = await jobs.repo.jobs.find_one({"_id": job_id})
    assert stored["outbox"] == [] and "outbox_at" not in stored
    assert jobs.relay.published_here(event.id)
    assert not jobs.relay.published_here(_submitted(job_id).id)
    # Only its job.submitted: the consumer acks what published_here names unread, and the gateway consumes no
    # other event it publishes; were it ever to, that event must still be handled.
    assert not jobs.relay.published_here(cancelled.id)

    # The gateway's own job.submitted coming back through its queue is not looked up nor adopted again, even if
    # (as here) it named a job that does not exist; another service's is adopted.
    ghost = lifecycle.new_job_id()
    own = Event(event.envelope, event.spec, event.data.model_copy(update={"job_id": ghost}))
    await jobs.adopt_external(own)
    assert await jobs.repo.get(ghost) is None
    external = _submitted(ghost)
    await jobs.adopt_external(external)
    adopted = await jobs.repo.get(ghost)
    assert adopted is not None and adopted["owner"] == "outbox-owner" and adopted["status"] == "queued"
