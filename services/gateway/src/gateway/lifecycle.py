"""The job state machine: pure functions from a job document and an event to a transition.

Transitions are monotonic: a stage never goes back from a terminal status, a
percent never decreases, and a terminal job never changes again, so late or
duplicated events are no-ops.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from stemflow_shared.events import (
    ANALYSIS_COMPLETED,
    ANALYSIS_FAILED,
    ANALYSIS_REQUESTED,
    AUDIO_INGESTED,
    INGEST_FAILED,
    JOB_CANCELLED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_PROGRESS,
    SEPARATION_COMPLETED,
    SEPARATION_FAILED,
    SEPARATION_PROGRESS,
    TERMINAL_JOB_STATUSES,
    AnalysisRequested,
    AnalysisResult,
    AudioInfo,
    ErrorInfo,
    Event,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobOptions,
    JobProgressed,
    Progress,
    SeparationCompleted,
    SeparationProgress,
    StemInfo,
    event_id,
    make_event,
)

SOURCE = "/stemflow/gateway"
STAGES = ("ingest", "separation", "analysis")
TERMINAL_STAGE = frozenset({"completed", "failed", "skipped"})
# Share of the overall percent each stage carries when it runs.
WEIGHTS = {"ingest": 10.0, "separation": 70.0, "analysis": 20.0}


def new_job_id(now: float | None = None) -> str:
    """A time-ordered id (48-bit milliseconds + 80 random bits), so ids sort newest-last."""
    millis = int((now if now is not None else time.time()) * 1000)
    return f"{millis:012x}{os.urandom(10).hex()}"


def new_job(
    job_id: str,
    owner: str,
    options: JobOptions,
    input_doc: dict[str, Any],
    *,
    now: datetime,
    retention: timedelta,
    idempotency_key: str | None = None,
    request_fingerprint: str | None = None,
    batch_id: str | None = None,
) -> dict[str, Any]:
    """A fresh job document in state `queued`."""
    stages = {
        "ingest": {"status": "pending", "percent": 0.0},
        "separation": {"status": "pending" if options.separate else "skipped", "percent": 0.0},
        "analysis": {"status": "pending" if options.analyze else "skipped", "percent": 0.0},
    }
    doc: dict[str, Any] = {
        "_id": job_id,
        "owner": owner,
        "status": "queued",
        "stages": stages,
        "progress": 0.0,
        "options": options.model_dump(mode="json"),
        "input": input_doc,
        "result": {"stems": [], "analysis": None},
        "error": None,
        "created_at": now,
        "updated_at": now,
        "expire_at": now + retention,
        "version": 1,
        "outbox": [],
    }
    if options.targets and options.separate:
        doc["targets"] = {t.name: {"status": "pending", "percent": 0.0} for t in options.targets}
    if idempotency_key is not None:
        doc["idempotency_key"] = idempotency_key
        doc["request_fingerprint"] = request_fingerprint
    if batch_id is not None:
        doc["batch_id"] = batch_id
    return doc


def request_fingerprint(kind: str, options: JobOptions, inputs: list[dict[str, Any]]) -> str:
    """What an Idempotency-Key stands for: the body's kind, every option and each input's content and name."""
    identity = [
        {k: item.get(k) for k in ("sha256", "size", "source_url", "filename", "content_type")} for item in inputs
    ]
    raw = orjson.dumps([kind, options.model_dump(mode="json"), identity], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(raw).hexdigest()


def overall_percent(stages: dict[str, dict[str, Any]]) -> float:
    """Weighted mean of the stages that run; skipped stages carry no weight."""
    total = done = 0.0
    for name in STAGES:
        stage = stages[name]
        if stage["status"] == "skipped":
            continue
        weight = WEIGHTS[name]
        total += weight
        done += weight * (100.0 if stage["status"] in TERMINAL_STAGE else stage["percent"]) / 100.0
    return round(100.0 * done / total, 1) if total else 100.0


def progress_model(doc: dict[str, Any]) -> Progress:
    stages = doc["stages"]
    return Progress(
        overall=doc["progress"],
        ingest=stages["ingest"],
        separation=stages["separation"],
        analysis=stages["analysis"],
        targets={
            name: {"status": t["status"], "percent": t["percent"]} for name, t in (doc.get("targets") or {}).items()
        },
    )


@dataclass
class Transition:
    """Field updates for the job document and the events they cause, in order."""

    set: dict[str, Any] = field(default_factory=dict)
    emit: list[Event[Any]] = field(default_factory=list)
    status_changed: bool = False


@dataclass
class _Step:
    """What one stage event does to a job: its stages after it, other fields, and the error that ends it."""

    stages: dict[str, dict[str, Any]]
    changes: dict[str, Any] = field(default_factory=dict)
    error: ErrorInfo | None = None
    status: str | None = None  # set when the event itself decides the status (audio.ingested)


def apply(
    doc: dict[str, Any], event: Event[Any], now: datetime, *, queue: dict[str, Any] | None = None
) -> Transition | None:
    """The transition an event causes on a job, or None when it changes nothing.

    `queue`: where the job's separation work stands in its queue when `audio.ingested` is applied (shown
    until the separation starts).
    """
    if doc["status"] in TERMINAL_JOB_STATUSES:
        return None
    name, data = event.spec.name, event.data
    stages = {stage: dict(value) for stage, value in doc["stages"].items()}
    if name == AUDIO_INGESTED.name:
        step = _ingested(doc, stages, data, queue)
    elif name in _SEPARATION_EVENTS and getattr(data, "target", None) and doc.get("targets"):
        step = _target_separation(doc, stages, data)
    elif name in _STEPS:
        step = _STEPS[name](stages, data)
    else:
        return None
    return None if step is None else _transition(doc, step, name, now)


def _ingested(doc: dict[str, Any], stages: dict[str, Any], data: Any, queue: dict[str, Any] | None) -> _Step | None:
    if stages["ingest"]["status"] in TERMINAL_STAGE:
        return None
    stages["ingest"] = {"status": "completed", "percent": 100.0}
    for stage in ("separation", "analysis"):
        if stages[stage]["status"] == "pending":
            stages[stage]["status"] = "running"
    changes: dict[str, Any] = {
        "input.duration_s": data.audio.duration_s,
        "input.sample_rate": data.source.sample_rate,
        "input.channels": data.source.channels,
        "input.format": data.source.format,
        "audio": data.audio.model_dump(mode="json"),
    }
    if data.reused:
        changes["reused"] = True
    if doc.get("targets"):
        changes["targets"] = {n: {**t, "status": "running"} for n, t in doc["targets"].items()}
    if queue is not None and stages["separation"]["status"] == "running":
        changes["queue"] = queue
    return _Step(stages, changes, status="processing")


def _separation_progress(stages: dict[str, Any], data: SeparationProgress) -> _Step | None:
    stage = stages["separation"]
    if stage["status"] in TERMINAL_STAGE or data.percent <= stage["percent"]:
        return None
    stages["separation"] = {"status": "running", "percent": min(round(data.percent, 1), 99.9)}
    return _Step(stages)


def _separation_completed(stages: dict[str, Any], data: SeparationCompleted) -> _Step | None:
    if stages["separation"]["status"] in TERMINAL_STAGE:
        return None
    stages["separation"] = {"status": "completed", "percent": 100.0}
    changes = {
        "result.stems": [s.model_dump(mode="json") for s in data.stems],
        "result.separation": _separation_summary(data),
    }
    return _Step(stages, changes)


def _analysis_completed(stages: dict[str, Any], data: Any) -> _Step | None:
    if stages["analysis"]["status"] in TERMINAL_STAGE:
        return None
    stages["analysis"] = {"status": "completed", "percent": 100.0}
    return _Step(stages, {"result.analysis": data.analysis.model_dump(mode="json")})


def _stage_failed(stage: str) -> Any:
    def step(stages: dict[str, Any], data: Any) -> _Step | None:
        if stages[stage]["status"] in TERMINAL_STAGE:
            return None
        stages[stage] = {"status": "failed", "percent": stages[stage]["percent"]}
        return _Step(stages, error=data.error)

    return step


_STEPS = {
    SEPARATION_PROGRESS.name: _separation_progress,
    SEPARATION_COMPLETED.name: _separation_completed,
    ANALYSIS_COMPLETED.name: _analysis_completed,
    INGEST_FAILED.name: _stage_failed("ingest"),
    SEPARATION_FAILED.name: _stage_failed("separation"),
    ANALYSIS_FAILED.name: _stage_failed("analysis"),
}
_SEPARATION_EVENTS = (SEPARATION_PROGRESS.name, SEPARATION_COMPLETED.name, SEPARATION_FAILED.name)


def _target_separation(doc: dict[str, Any], stages: dict[str, Any], data: Any) -> _Step | None:
    """A separation event of one target of a multi-target job; the separation stage aggregates the targets.

    Running while any runs (percent: their mean), completed when all have ended and at least one
    completed (some failed: the job is `partial`), failed when all failed.
    """
    if stages["separation"]["status"] in TERMINAL_STAGE:
        return None
    changes: dict[str, Any] = {}
    targets = _target_update(doc, data.target, data, changes)
    if targets is None:
        return None
    ended = [t for t in targets.values() if t["status"] in TERMINAL_STAGE]
    if len(ended) < len(targets):
        mean = sum(100.0 if t["status"] in TERMINAL_STAGE else t["percent"] for t in targets.values()) / len(targets)
        stages["separation"] = {"status": "running", "percent": min(round(mean, 1), 99.9)}
        return _Step(stages, changes)
    if any(t["status"] == "completed" for t in targets.values()):
        stages["separation"] = {"status": "completed", "percent": 100.0}
        results = changes.get("result.targets") or (doc.get("result") or {}).get("targets") or {}
        first = next(n for n in doc["targets"] if targets[n]["status"] == "completed")
        changes["result.stems"] = results[first]["stems"]
        changes["result.separation"] = {**results[first]["separation"], "target": first}
        if any(t["status"] == "failed" for t in targets.values()):
            changes["partial"] = True
        return _Step(stages, changes)
    stages["separation"] = {"status": "failed", "percent": stages["separation"]["percent"]}
    failed = [f"{n}: {t['error']['code']}" for n, t in targets.items()]
    error = ErrorInfo(code=data.error.code, message="every target failed (" + "; ".join(failed) + ")")
    return _Step(stages, changes, error=error)


def _target_update(doc: dict[str, Any], name: str, data: Any, changes: dict[str, Any]) -> dict[str, Any] | None:
    """The targets after one target's event (results recorded in `changes`), or None if it changes nothing."""
    targets = {k: dict(v) for k, v in (doc.get("targets") or {}).items()}
    target = targets.get(name)
    if target is None or target["status"] in TERMINAL_STAGE:
        return None
    if isinstance(data, SeparationProgress):
        if data.percent <= target["percent"]:
            return None
        target.update(status="running", percent=min(round(data.percent, 1), 99.9))
    elif isinstance(data, SeparationCompleted):
        target.update(status="completed", percent=100.0)
        results = dict((doc.get("result") or {}).get("targets") or {})
        results[name] = {
            "stems": [s.model_dump(mode="json") for s in data.stems],
            "separation": _separation_summary(data),
        }
        changes["result.targets"] = results
    else:  # StageFailed
        target.update(status="failed", error=data.error.model_dump(mode="json"))
    targets[name] = target
    changes["targets"] = targets
    return targets


def _separation_summary(data: Any) -> dict[str, Any]:
    return {
        "model": data.model,
        "device": data.device,
        "precision": data.precision,
        "untrained": data.untrained,
        "reconstruction_error_db": data.reconstruction_error_db,
    }


def _transition(doc: dict[str, Any], step: _Step, name: str, now: datetime) -> Transition:
    """The job's status after a step (an error ends it, all stages done complete it), with its events."""
    stages, changes, status = step.stages, step.changes, step.status or doc["status"]
    if step.error is not None:
        status = "failed"
        for stage in stages.values():
            if stage["status"] in ("pending", "running"):
                stage["status"] = "skipped"
        changes["error"] = step.error.model_dump(mode="json")
    elif all(stages[s]["status"] in ("completed", "skipped") for s in STAGES):
        status = "completed"
    if doc.get("queue") and (name.startswith("separation.") or status in TERMINAL_JOB_STATUSES):
        changes["queue"] = None  # the separation started (or the job ended): no longer waiting
    changes.update({"stages": stages, "status": status, "progress": overall_percent(stages), "updated_at": now})
    changed = status != doc["status"]
    after = _merged(doc, changes)
    emit = _events_for(after, changed) + _analysis_request(doc, after)
    return Transition(set=changes, emit=emit, status_changed=changed)


def _analysis_request(before: dict[str, Any], after: dict[str, Any]) -> list[Event[Any]]:
    """`analysis.requested` when the separation of a job still waiting for its analysis has just completed.

    The analyzer leaves a job that separates until its stems exist (it reads the facts from them and the
    mix), so the analysis stage stays running and the job cannot complete on the mix's reading alone.
    A reused job's analysis comes from ingest with its stems.
    """
    if not (
        before["stages"]["separation"]["status"] != "completed"
        and after["stages"]["separation"]["status"] == "completed"
        and after["stages"]["analysis"]["status"] == "running"
        and after["status"] not in TERMINAL_JOB_STATUSES
        and after.get("audio")
        and not after.get("reused")
    ):
        return []
    job_id = after["_id"]
    data = AnalysisRequested(
        job_id=job_id,
        audio=AudioInfo.model_validate(after["audio"]),
        stems=[StemInfo.model_validate(s) for s in after["result"].get("stems") or []],
    )
    return [make_event(ANALYSIS_REQUESTED, data, source=SOURCE, id=event_id(job_id, ANALYSIS_REQUESTED.name))]


def cancel(doc: dict[str, Any], now: datetime) -> Transition | None:
    """Cancel a job that has not finished."""
    if doc["status"] in TERMINAL_JOB_STATUSES:
        return None
    stages = {name: dict(stage) for name, stage in doc["stages"].items()}
    for stage in stages.values():
        if stage["status"] in ("pending", "running"):
            stage["status"] = "skipped"
    changes = {"status": "cancelled", "stages": stages, "updated_at": now}
    after = _merged(doc, changes)
    return Transition(set=changes, emit=_events_for(after, True), status_changed=True)


def time_out(doc: dict[str, Any], now: datetime, timeout_s: float) -> Transition | None:
    """Fail a job that has not changed for `timeout_s`: code `stage_timeout`, naming the stalled stage."""
    if doc["status"] in TERMINAL_JOB_STATUSES or (now - doc["updated_at"]).total_seconds() < timeout_s:
        return None
    stages = {name: dict(stage) for name, stage in doc["stages"].items()}
    stalled = [name for name in STAGES if stages[name]["status"] in ("pending", "running")]
    for name in stalled:
        stages[name]["status"] = "failed" if name == stalled[0] else "skipped"
    stage = stalled[0] if stalled else "job"
    error = ErrorInfo(
        code="stage_timeout",
        message=f"the {stage} stage made no progress for {timeout_s:.0f} s; the job was stopped",
    )
    changes = {
        "status": "failed",
        "stages": stages,
        "error": error.model_dump(mode="json"),
        "progress": doc["progress"],
        "updated_at": now,
    }
    after = _merged(doc, changes)
    return Transition(set=changes, emit=_events_for(after, True), status_changed=True)


def webhook_failed(doc: dict[str, Any], error: ErrorInfo, now: datetime) -> Transition | None:
    """Note that the job's webhook was not delivered; the job's own status is unchanged."""
    record = {"status": "failed", "error": error.model_dump(mode="json")}
    if doc.get("webhook") == record:
        return None
    return Transition(set={"webhook": record, "updated_at": now})


def stalled_stage(doc: dict[str, Any]) -> str:
    """The stage a timed-out job failed in (as `time_out` marked it)."""
    return next((name for name in STAGES if doc["stages"][name]["status"] == "failed"), "job")


def _merged(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = {**doc, "result": dict(doc.get("result") or {})}
    for path, value in changes.items():
        if path.startswith("result."):
            merged["result"][path.split(".", 1)[1]] = value
        elif "." not in path:
            merged[path] = value
    return merged


def _events_for(job: dict[str, Any], status_changed: bool) -> list[Event[Any]]:
    """A progress event for every change, then the terminal event when the job just ended."""
    job_id, owner, status = job["_id"], job["owner"], job["status"]
    batch = {"batch_id": job["batch_id"]} if job.get("batch_id") else {}
    progress = JobProgressed(job_id=job_id, owner=owner, status=status, progress=progress_model(job), **batch)
    events: list[Event[Any]] = [make_event(JOB_PROGRESS, progress, source=SOURCE)]
    if status_changed and status == "completed":
        result = job["result"]
        data = JobCompleted(
            job_id=job_id,
            owner=owner,
            partial=bool(job.get("partial")),
            **batch,
            stems=[StemInfo.model_validate(s) for s in result.get("stems") or []],
            analysis=AnalysisResult.model_validate(result["analysis"]) if result.get("analysis") else None,
        )
        events.append(make_event(JOB_COMPLETED, data, source=SOURCE, id=event_id(job_id, JOB_COMPLETED.name)))
    elif status_changed and status == "failed":
        data = JobFailed(job_id=job_id, owner=owner, error=ErrorInfo.model_validate(job["error"]), **batch)
        events.append(make_event(JOB_FAILED, data, source=SOURCE, id=event_id(job_id, JOB_FAILED.name)))
    elif status_changed and status == "cancelled":
        events.append(
            make_event(
                JOB_CANCELLED,
                JobCancelled(job_id=job_id, owner=owner, **batch),
                source=SOURCE,
                id=event_id(job_id, JOB_CANCELLED.name),
            )
        )
    return events


def utcnow() -> datetime:
    # MongoDB keeps milliseconds; rounding here keeps ETags and comparisons stable after a round trip.
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)
