"""Practice mixes of a finished job: the routes, and the use cases they share with the mix events.

A mix is work like any other: `POST /v1/jobs/{id}/mixes` records it in the job's document with its
`mix.requested` in the same write (the outbox) and answers at once; the analyzer renders it and reports
`mix.progress`, `mix.completed` or `mix.failed`, which the gateway applies to the job and passes on to
clients as `job.mix.*` events. A mix's id is a hash of what it sounds like (stems and gains after
presets, mutes and solos, tempo, pitch, section, loops, click, format), so asking again for the same
mix answers the one there is, rendered once. Mixes live in the job document and their files under the
job's blob prefix: deleting the job deletes them.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import ValidationError

from stemflow_shared.events import (
    JOB_MIX_COMPLETED,
    JOB_MIX_FAILED,
    JOB_MIX_PROGRESS,
    MIX_COMPLETED,
    MIX_FAILED,
    MIX_ID,
    MIX_PROGRESS,
    MIX_REQUESTED,
    ErrorInfo,
    Event,
    EventSpec,
    JobMixChanged,
    MixFailed,
    MixOptions,
    MixRequested,
    MixState,
    MixStem,
    event_id,
    make_event,
)
from stemflow_shared.messaging import Handler
from stemflow_shared.storage import BlobNotFound, job_prefix, normalised_key

from . import lifecycle
from .deps import JobsDep, Owner, SettingsDep, not_found
from .downloads import ranged_file
from .jobs import Jobs
from .problems import Problem
from .submission import read_json_object

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")

MAX_MIXES_PER_JOB = 20
TERMINAL = frozenset({"completed", "failed"})
# A mix queued or running that has not changed for this long is failed with `mix_timeout` (renders take
# seconds; this is the analyzer gone, or its work lost). `Mixes.time_out_stuck` takes the setting.
MIX_TIMEOUT_S = 900.0
# The top-level field of a job document that says since when its oldest unfinished mix has not changed
# (None: no unfinished mix), so the sweep finds stuck mixes without reading every job's mixes.
PENDING_SINCE = "mixes_pending_since"
# Gain maps behind the presets; stems a job does not have are left out (a preset none of whose stems the
# job has is refused). Gains, mutes and solos in the request apply over the preset.
PRESETS: dict[str, dict[str, float]] = {
    "karaoke": {"vocals": 0.15},  # a faint guide vocal (-16.5 dB) to sing along with
    "instrumental": {"vocals": 0.0},
    "a_cappella": {"drums": 0.0, "bass": 0.0, "other": 0.0, "guitar": 0.0, "piano": 0.0, "accompaniment": 0.0},
    "drumless": {"drums": 0.0},
    "bassless": {"bass": 0.0},
    "bass_up": {"bass": 2.0},
}
PRESET_STEMS = {"a_cappella": {"vocals"}}  # what a preset needs besides the stems it changes


def mix_key(job_id: str, mix_id: str, fmt: str) -> str:
    """Where a mix's file lives: under the job's prefix, so it goes with the job."""
    return f"{mix_prefix(job_id, mix_id)}/mix.{fmt}"


def mix_prefix(job_id: str, mix_id: str) -> str:
    return f"{job_prefix(job_id)}/mixes/{mix_id}"


class Mixes:
    """The mix use cases on top of the job service (its repository, outbox relay, cache and blobs)."""

    def __init__(self, jobs: Jobs, *, source: str = lifecycle.SOURCE) -> None:
        self._jobs = jobs
        self._source = source

    # --- requests -----------------------------------------------------------------------------

    async def request(self, job_id: str, owner: str, options: MixOptions) -> tuple[dict[str, Any], bool]:
        """The mix these options make (created, or asked again after a failure) and whether it is to be rendered."""
        doc = await self._finished_job(job_id, owner)
        gains, stems = resolve_gains(doc, options)
        if options.click and not ((doc.get("result") or {}).get("analysis") or {}).get("beats"):
            raise _invalid("click", "the click follows the analysed beats, and this job has none (analyze was off)")
        duration = float((doc.get("input") or {}).get("duration_s") or 0.0)
        if duration and options.start is not None and options.start >= duration:
            message = f"start {options.start:g} s is past the end of the song ({duration:.1f} s)"
            raise Problem(422, "section_out_of_range", message, errors=[{"field": "start", "message": message}])
        mix_id = mix_identity(options, gains)
        requested: list[dict[str, Any]] = []

        def decide(current: dict[str, Any]) -> lifecycle.Transition | None:
            mixes = current.get("mixes") or {}
            found = mixes.get(mix_id)
            if found is not None and found["status"] != "failed":
                requested.clear()
                return None
            if found is None and len(mixes) >= MAX_MIXES_PER_JOB:
                raise Problem(
                    409,
                    "too_many_mixes",
                    f"job {job_id} has {len(mixes)} mixes, the most it may keep; delete some first",
                )
            now = lifecycle.utcnow()
            mix = {
                "id": mix_id,
                "status": "queued",
                "percent": 0.0,
                "options": options.model_dump(mode="json", exclude_defaults=True),
                "target": options.target,
                "gains": gains,
                "file": None,
                "error": None,
                "attempt": (found or {}).get("attempt", 0) + 1,
                "created_at": (found or {}).get("created_at", now),
                "updated_at": now,
            }
            requested[:] = [mix]
            work = self._requested_event(current, mix, options, stems)
            return lifecycle.Transition(
                set={f"mixes.{mix_id}": mix, PENDING_SINCE: pending_since({**mixes, mix_id: mix})},
                emit=[work, self._client_event(current, mix, JOB_MIX_PROGRESS)],
            )

        doc, change = await self._jobs.repo.transition(job_id, decide, lifecycle.utcnow())
        if doc is None:
            raise not_found(job_id)
        if change is None:
            return doc["mixes"][mix_id], False
        await self._jobs.remember(doc)
        self._jobs.relay.flush_soon(job_id)
        log.info("job %s: mix %s requested (%s)", job_id, mix_id, _describe(options))
        return requested[0], True

    async def list(self, job_id: str, owner: str) -> list[dict[str, Any]]:
        doc = await self._owned(job_id, owner)
        return sorted((doc.get("mixes") or {}).values(), key=lambda m: m["created_at"], reverse=True)

    async def get(self, job_id: str, owner: str, mix_id: str) -> dict[str, Any]:
        doc = await self._owned(job_id, owner)
        found = (doc.get("mixes") or {}).get(mix_id)
        if found is None:
            raise Problem(404, "mix_not_found", f"job {job_id} has no mix {mix_id}")
        return found

    async def delete(self, job_id: str, owner: str, mix_id: str) -> None:
        """Forget a mix and delete its file (a render still running finds it gone and its file is deleted)."""
        await self.get(job_id, owner, mix_id)

        def decide(current: dict[str, Any]) -> lifecycle.Transition | None:
            mixes = dict(current.get("mixes") or {})
            if mixes.pop(mix_id, None) is None:
                return None
            return lifecycle.Transition(set={"mixes": mixes, PENDING_SINCE: pending_since(mixes)})

        doc, change = await self._jobs.repo.transition(job_id, decide, lifecycle.utcnow())
        if doc is not None and change is not None:
            await self._jobs.remember(doc)
        await self._jobs.blobs.delete_prefix(mix_prefix(job_id, mix_id))

    async def file(self, job_id: str, owner: str, mix_id: str) -> tuple[dict[str, Any], int]:
        """A completed mix's file description and size (409 before it is rendered, 404 when it is gone)."""
        mix = await self.get(job_id, owner, mix_id)
        if mix["status"] != "completed":
            raise Problem(409, "mix_not_ready", f"mix {mix_id} is {mix['status']}", mix_status=mix["status"])
        try:
            return mix["file"], await self._jobs.blob_size(mix["file"]["blob_key"])
        except BlobNotFound as exc:
            raise Problem(404, "mix_not_found", f"the file of mix {mix_id} is gone") from exc

    # --- events from the worker ---------------------------------------------------------------

    def handlers(self) -> dict[EventSpec[Any], Handler]:
        async def on_mix_event(event: Event[Any]) -> None:
            await self.apply_event(event)

        return {MIX_PROGRESS: on_mix_event, MIX_COMPLETED: on_mix_event, MIX_FAILED: on_mix_event}

    async def apply_event(self, event: Event[Any]) -> bool:
        """Apply the worker's news of a mix; whether it changed the mix. News of a deleted mix deletes its file."""
        data = event.data
        job_id, mix_id = data.job_id, data.mix_id
        doc, change = await self._jobs.repo.transition(
            job_id, lambda current: self._mix_step(current, event), lifecycle.utcnow()
        )
        gone = doc is None or mix_id not in (doc.get("mixes") or {})
        if gone and event.spec is MIX_COMPLETED:
            await self._jobs.blobs.delete_prefix(mix_prefix(job_id, mix_id))
            log.info("job %s: mix %s was deleted while it rendered; its file is deleted too", job_id, mix_id)
        if doc is None:
            return False
        if change is not None:
            await self._jobs.remember(doc)
        await self._jobs.relay.flush(job_id)
        return change is not None

    async def fail(self, job_id: str, mix_id: str, error: ErrorInfo) -> bool:
        """End a mix with an error (a dead letter of its work); whether it changed the mix."""
        failed = make_event(MIX_FAILED, MixFailed(job_id=job_id, mix_id=mix_id, error=error), source=self._source)
        return await self.apply_event(failed)

    def _mix_step(self, doc: dict[str, Any], event: Event[Any]) -> lifecycle.Transition | None:
        """The pure transition of one mix: monotonic, terminal states never change."""
        data = event.data
        mix = (doc.get("mixes") or {}).get(data.mix_id)
        if mix is None or mix["status"] in TERMINAL:
            return None
        mix = dict(mix, updated_at=lifecycle.utcnow())
        if event.spec is MIX_PROGRESS:
            percent = min(round(data.percent, 1), 99.9)
            if mix["status"] == "running" and percent <= mix["percent"]:
                return None
            mix.update(status="running", percent=max(percent, mix["percent"]))
            kind = JOB_MIX_PROGRESS
        elif event.spec is MIX_COMPLETED:
            mix.update(status="completed", percent=100.0, file=data.file.model_dump(mode="json"))
            kind = JOB_MIX_COMPLETED
        else:
            mix.update(status="failed", error=data.error.model_dump(mode="json"))
            kind = JOB_MIX_FAILED
        after = {**doc["mixes"], data.mix_id: mix}
        return lifecycle.Transition(
            set={f"mixes.{data.mix_id}": mix, PENDING_SINCE: pending_since(after)},
            emit=[self._client_event(doc, mix, kind)],
        )

    # --- the sweep of stuck mixes -------------------------------------------------------------

    async def time_out_stuck(self, timeout_s: float = MIX_TIMEOUT_S) -> int:
        """Fail the mixes queued or running that have not changed for `timeout_s` (`mix_timeout`); how many."""
        cutoff = lifecycle.utcnow() - timedelta(seconds=timeout_s)
        found = self._jobs.repo.jobs.find({PENDING_SINCE: {"$lt": cutoff}}, {"_id": 1}).limit(100)
        count = 0
        ended: list[str] = []  # the mixes failed in the last transition (it may be decided again on a conflict)
        for job_id in [doc["_id"] async for doc in found]:
            doc, change = await self._jobs.repo.transition(
                job_id, lambda current: self._time_out(current, cutoff, timeout_s, ended), lifecycle.utcnow()
            )
            if doc is None or change is None:
                continue  # it moved (or ended) since the query
            await self._jobs.remember(doc)
            await self._jobs.relay.flush(job_id)
            for mix_id in ended:
                log.warning("job %s: mix %s made no progress for %.0f s: failed", job_id, mix_id, timeout_s)
            count += len(ended)
        return count

    def _time_out(
        self, doc: dict[str, Any], cutoff: datetime, timeout_s: float, ended: list[str]
    ) -> lifecycle.Transition | None:
        """The pure transition failing a job's stuck mixes (their ids into `ended`)."""
        mixes = dict(doc.get("mixes") or {})
        error = ErrorInfo(
            code="mix_timeout",
            message=f"the mix made no progress for {timeout_s:.0f} s and was stopped; ask for it again",
        )
        changes: dict[str, Any] = {}
        emit: list[Event[Any]] = []
        ended.clear()
        for mix_id, mix in mixes.items():
            if mix["status"] in TERMINAL or mix["updated_at"] >= cutoff:
                continue
            mixes[mix_id] = failed = dict(
                mix, status="failed", error=error.model_dump(mode="json"), updated_at=lifecycle.utcnow()
            )
            changes[f"mixes.{mix_id}"] = failed
            emit.append(self._client_event(doc, failed, JOB_MIX_FAILED))
            ended.append(mix_id)
        since = pending_since(mixes)
        if not changes and since == doc.get(PENDING_SINCE):
            return None
        return lifecycle.Transition(set={**changes, PENDING_SINCE: since}, emit=emit)

    # --- helpers ------------------------------------------------------------------------------

    async def _owned(self, job_id: str, owner: str) -> dict[str, Any]:
        doc = await self._jobs.document(job_id, owner)
        if doc is None:
            raise not_found(job_id)
        return doc

    async def _finished_job(self, job_id: str, owner: str) -> dict[str, Any]:
        doc = await self._owned(job_id, owner)
        if doc["status"] != "completed":
            raise Problem(409, "job_not_completed", f"job {job_id} is {doc['status']}", job_status=doc["status"])
        return doc

    def _requested_event(
        self, doc: dict[str, Any], mix: dict[str, Any], options: MixOptions, stems: list[dict[str, Any]]
    ) -> Event[MixRequested]:
        job_id, mix_id = doc["_id"], mix["id"]
        analysis = (doc.get("result") or {}).get("analysis") or {}
        data = MixRequested(
            job_id=job_id,
            mix_id=mix_id,
            owner=doc["owner"],
            options=options,
            stems=[MixStem(name=s["name"], blob_key=s["blob_key"], gain=mix["gains"][s["name"]]) for s in stems],
            audio_key=(doc.get("audio") or {}).get("blob_key") or normalised_key(job_id),
            beats=analysis.get("beats") or [] if options.click else [],
            downbeats=analysis.get("downbeats") or [] if options.click else [],
            output_key=mix_key(job_id, mix_id, options.format),
            attempt=mix["attempt"],
        )
        return make_event(
            MIX_REQUESTED, data, source=self._source, id=event_id(job_id, mix_id, str(mix["attempt"]), "requested")
        )

    def _client_event(self, doc: dict[str, Any], mix: dict[str, Any], spec: EventSpec[Any]) -> Event[JobMixChanged]:
        batch = {"batch_id": doc["batch_id"]} if doc.get("batch_id") else {}
        data = JobMixChanged(job_id=doc["_id"], owner=doc["owner"], mix=client_state(doc["_id"], mix), **batch)
        if spec is JOB_MIX_PROGRESS:
            return make_event(spec, data, source=self._source)
        return make_event(
            spec, data, source=self._source, id=event_id(doc["_id"], mix["id"], str(mix["attempt"]), spec.name)
        )


def pending_since(mixes: dict[str, Any]) -> datetime | None:
    """Since when the oldest unfinished mix has not changed; None when every mix has ended."""
    return min((m["updated_at"] for m in mixes.values() if m["status"] not in TERMINAL), default=None)


def resolve_gains(doc: dict[str, Any], options: MixOptions) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Each stem's gain after the preset, gains, mutes and solos, and the stems; 422 naming what does not fit."""
    stems = _stems_of(doc, options.target)
    if not stems:
        raise Problem(409, "job_has_no_stems", f"job {doc['_id']} was not separated (separate was off)")
    names = [s["name"] for s in stems]
    gains = dict.fromkeys(names, 1.0)
    if options.preset is not None:
        preset = PRESETS[options.preset]
        needed = set(preset) | PRESET_STEMS.get(options.preset, set())
        if not (needed & set(names)) or not PRESET_STEMS.get(options.preset, set()) <= set(names):
            message = f"preset {options.preset} needs stems this job does not have (it has {', '.join(names)})"
            raise Problem(422, "preset_not_applicable", message, errors=[{"field": "preset", "message": message}])
        gains.update({name: gain for name, gain in preset.items() if name in gains})
    for field, asked in (("gains", list(options.gains)), ("mute", options.mute), ("solo", options.solo)):
        unknown = [name for name in asked if name not in gains]
        if unknown:
            message = f"no stem {', '.join(unknown)} in this job (it has {', '.join(names)})"
            raise Problem(422, "unknown_stem", message, errors=[{"field": field, "message": message}])
    gains.update(options.gains)
    for name in options.mute:
        gains[name] = 0.0
    if options.solo:
        gains = {name: gain if name in options.solo else 0.0 for name, gain in gains.items()}
    if not any(gains.values()) and not options.click:
        raise _invalid("gains", "every stem is muted: the mix would be silent")
    return gains, stems


def mix_identity(options: MixOptions, gains: dict[str, float]) -> str:
    """The mix's id: a hash of what it sounds like, whichever way it was asked for (preset or gains)."""
    changes_time = options.tempo != 1.0 or options.pitch_semitones != 0.0
    identity = {
        "target": options.target,
        "gains": {name: round(gain, 4) for name, gain in gains.items()},
        "tempo": round(options.tempo, 4),
        "pitch": round(options.pitch_semitones, 4),
        "start": round(options.start or 0.0, 3),
        "end": None if options.end is None else round(options.end, 3),
        "loops": options.loops,
        "click": options.click,
        "format": options.format,
        "bit_depth": options.resolved_bit_depth,
        "quality": options.quality if changes_time else None,  # only Rubber Band's engine depends on it
    }
    return hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()[:24]


def client_state(job_id: str, mix: dict[str, Any]) -> MixState:
    file = mix.get("file") or {}
    return MixState(
        id=mix["id"],
        status=mix["status"],
        percent=mix["percent"],
        error=mix.get("error"),
        format=file.get("format"),
        size=file.get("size"),
        duration_s=file.get("duration_s"),
        path=f"/v1/jobs/{job_id}/mixes/{mix['id']}/file" if mix["status"] == "completed" else None,
    )


def public_mix(job_id: str, mix: dict[str, Any], base_url: str, events_url: str) -> dict[str, Any]:
    """The mix document clients read."""
    self_url = f"{base_url}/v1/jobs/{job_id}/mixes/{mix['id']}"
    file = mix.get("file")
    return {
        "id": mix["id"],
        "job_id": job_id,
        "status": mix["status"],
        "percent": mix["percent"],
        "options": mix["options"],
        "target": mix.get("target"),
        "gains": mix["gains"],
        "file": None if file is None else {k: v for k, v in file.items() if k != "blob_key"},
        "error": mix.get("error"),
        "created_at": _iso(mix["created_at"]),
        "updated_at": _iso(mix["updated_at"]),
        "links": {
            "self": self_url,
            "file": f"{self_url}/file",
            "job": f"{base_url}/v1/jobs/{job_id}",
            "events": f"{events_url}?job_id={job_id}",
        },
    }


def parse_options(payload: dict[str, Any]) -> MixOptions:
    """The request's mix options, or 422 naming each field (unknown fields too) and what to fix."""
    unknown = sorted(set(payload) - set(MixOptions.model_fields))
    if unknown:
        errors = [{"field": name, "message": "not a mix option"} for name in unknown]
        allowed = ", ".join(MixOptions.model_fields)
        raise Problem(422, "validation_failed", f"{', '.join(unknown)}: not a mix option ({allowed})", errors=errors)
    try:
        return MixOptions.model_validate(payload)
    except ValidationError as exc:
        errors = [
            {
                "field": ".".join(str(p) for p in err["loc"]) or "body",
                "message": err["msg"].removeprefix("Value error, "),
            }
            for err in exc.errors()
        ]
        raise Problem(
            422, "validation_failed", "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors
        ) from exc


def _stems_of(doc: dict[str, Any], target: str | None) -> list[dict[str, Any]]:
    result = doc.get("result") or {}
    if target is None:
        return list(result.get("stems") or [])
    found = (result.get("targets") or {}).get(target)
    if found is None:
        raise Problem(404, "target_not_found", f"job {doc['_id']} has no finished target {target!r}")
    return list(found.get("stems") or [])


def _invalid(field: str, message: str) -> Problem:
    return Problem(422, "validation_failed", f"{field}: {message}", errors=[{"field": field, "message": message}])


def _describe(options: MixOptions) -> str:
    return f"tempo {options.tempo:g}, {options.pitch_semitones:+g} st, {options.format}"


def _iso(value: datetime | str) -> str:
    return value if isinstance(value, str) else value.isoformat().replace("+00:00", "Z")


# --- routes ---------------------------------------------------------------------------------------


def mixes_of(request: Request) -> Mixes:
    return request.app.state.mixes


async def _mixes(request: Request) -> Mixes:
    return mixes_of(request)


MixesDep = Annotated[Mixes, Depends(_mixes)]
_BODY = {"requestBody": {"content": {"application/json": {"schema": MixOptions.model_json_schema()}}, "required": True}}


def _json(value: Any, status_code: int = 200, **headers: str) -> Response:
    return Response(orjson.dumps(value), status_code=status_code, media_type="application/json", headers=headers)


@router.post("/jobs/{job_id}/mixes", status_code=202, openapi_extra=_BODY)
async def create_mix(
    request: Request, job_id: str, who: Owner, jobs: JobsDep, mixes: MixesDep, settings: SettingsDep
) -> Response:
    """Ask for a practice mix of a completed job: `202` when it is to be rendered, `200` with the one there is."""
    options = parse_options(await read_json_object(request, settings.max_json_body_bytes))
    mix, rendering = await mixes.request(job_id, who.owner, options)
    view = public_mix(job_id, mix, jobs.base_url, jobs.events_url)
    return _json(view, 202 if rendering else 200, Location=view["links"]["self"])


@router.get("/jobs/{job_id}/mixes")
async def list_mixes(job_id: str, who: Owner, jobs: JobsDep, mixes: MixesDep) -> Response:
    """The job's mixes, newest first."""
    items = [public_mix(job_id, m, jobs.base_url, jobs.events_url) for m in await mixes.list(job_id, who.owner)]
    return _json({"items": items})


@router.get("/jobs/{job_id}/mixes/{mix_id}")
async def get_mix(job_id: str, mix_id: str, who: Owner, jobs: JobsDep, mixes: MixesDep) -> Response:
    mix = await mixes.get(job_id, who.owner, _checked(mix_id))
    return _json(public_mix(job_id, mix, jobs.base_url, jobs.events_url))


@router.get("/jobs/{job_id}/mixes/{mix_id}/file")
async def download_mix(
    job_id: str,
    mix_id: str,
    who: Owner,
    jobs: JobsDep,
    mixes: MixesDep,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> Response:
    """The rendered file (`409 mix_not_ready` until it is); a single byte range is honoured."""
    file, size = await mixes.file(job_id, who.owner, _checked(mix_id))
    headers = {
        "Content-Disposition": f'attachment; filename="mix-{mix_id[:8]}.{file["format"]}"',
        "ETag": f'"{mix_id}-{size}"',
    }
    return ranged_file(jobs, file["blob_key"], size, file["media_type"], range_header, headers)


@router.delete("/jobs/{job_id}/mixes/{mix_id}", status_code=204)
async def delete_mix(job_id: str, mix_id: str, who: Owner, mixes: MixesDep) -> Response:
    await mixes.delete(job_id, who.owner, _checked(mix_id))
    return Response(status_code=204)


def _checked(mix_id: str) -> str:
    if not MIX_ID.fullmatch(mix_id):
        raise Problem(404, "mix_not_found", f"no mix {mix_id[:64]}")
    return mix_id
