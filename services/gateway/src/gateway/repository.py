"""Jobs in MongoDB, with the job's outgoing events kept in the same document (the outbox).

An event is appended to the job's `outbox` in the same atomic write as the state
change that causes it, so a crash between the database and the broker delays
the event but never loses it: the relay publishes what is pending.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel, ReturnDocument
from pymongo.errors import DuplicateKeyError

from stemflow_shared.events import Event, parse_event

from . import lifecycle
from .views import ANALYSIS_SUMMARY

JOBS = "jobs"
# Only what a list item shows (views.public_job) and its version: never the outbox, beats, energy curves or audio.
LIST_PROJECTION = {
    name: 1
    for name in (
        "owner",
        "version",
        "status",
        "stages",
        "progress",
        "options",
        "input",
        "error",
        "batch_id",
        "targets",
        "partial",
        "webhook",
        "queue",
        "result.targets",
        "created_at",
        "updated_at",
        "result.stems",
        "result.separation",
        *(f"result.analysis.{field}" for field in ANALYSIS_SUMMARY),
    )
}
MAX_CONFLICT_RETRIES = 20
VERSIONS = {"_id": 1, "version": 1}
NEWEST = "owner_newest_version"
STATUS_NEWEST = "owner_status_newest_version"


class IdempotencyConflict(Exception):
    """A job with this Idempotency-Key already exists for the owner."""

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(job["_id"])
        self.job = job


def outbox_entry(event: Event[Any]) -> dict[str, Any]:
    return {"id": event.id, "name": event.spec.name, "body": event.envelope.to_json().decode()}


def event_from_entry(entry: dict[str, Any]) -> Event[Any]:
    return parse_event(entry["body"])


def encode_cursor(job_id: str) -> str:
    return base64.urlsafe_b64encode(job_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The job id a cursor points after; ValueError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except Exception as exc:
        raise ValueError("invalid cursor") from exc
    if not (len(raw) == 32 and all(c in "0123456789abcdef" for c in raw)):
        raise ValueError("invalid cursor")
    return raw


class JobRepository:
    def __init__(self, database: Any) -> None:
        self.database = database
        self.jobs = database[JOBS]
        self.batches = database["batches"]

    async def ensure_indexes(self) -> None:
        await self.jobs.create_indexes(
            [
                # Newest-first listing per owner, with and without a status filter (ids sort by time); with the
                # version, a page's ids and versions come from the index alone (a covered query, no fetch).
                IndexModel([("owner", ASCENDING), ("_id", DESCENDING), ("version", ASCENDING)], name=NEWEST),
                IndexModel(
                    [("owner", ASCENDING), ("status", ASCENDING), ("_id", DESCENDING), ("version", ASCENDING)],
                    name=STATUS_NEWEST,
                ),
                # What gateways before the covered listing hint at; kept so that a rolling update never breaks them.
                IndexModel([("owner", ASCENDING), ("_id", DESCENDING)], name="owner_newest"),
                IndexModel(
                    [("owner", ASCENDING), ("status", ASCENDING), ("_id", DESCENDING)], name="owner_status_newest"
                ),
                IndexModel([("status", ASCENDING), ("updated_at", ASCENDING)], name="status_updated"),
                # The stuck-mix sweep reads only jobs with an unfinished mix (mixes.PENDING_SINCE).
                IndexModel(
                    [("mixes_pending_since", ASCENDING)],
                    name="mixes_pending",
                    partialFilterExpression={"mixes_pending_since": {"$type": "date"}},
                ),
                IndexModel(
                    [("owner", ASCENDING), ("idempotency_key", ASCENDING)],
                    name="owner_idempotency_key",
                    unique=True,
                    partialFilterExpression={"idempotency_key": {"$type": "string"}},
                ),
                IndexModel(
                    [("outbox_at", ASCENDING)],
                    name="outbox_pending",
                    partialFilterExpression={"outbox_at": {"$type": "date"}},
                ),
                IndexModel([("audio.fingerprint", ASCENDING)], name="fingerprint", sparse=True),
                IndexModel([("batch_id", ASCENDING)], name="batch", sparse=True),
                # The retention sweeper deletes expired jobs with their blobs; this TTL is the backstop a day later.
                IndexModel([("expire_at", ASCENDING)], name="expiry", expireAfterSeconds=86400),
            ]
        )
        # A batch is a small document naming its jobs; it expires with them.
        await self.batches.create_indexes(
            [
                IndexModel([("expire_at", ASCENDING)], name="expiry", expireAfterSeconds=0),
                IndexModel(
                    [("owner", ASCENDING), ("idempotency_key", ASCENDING)],
                    name="owner_idempotency_key",
                    unique=True,
                    partialFilterExpression={"idempotency_key": {"$type": "string"}},
                ),
            ]
        )

    async def insert(self, doc: dict[str, Any], events: Sequence[Event[Any]]) -> dict[str, Any]:
        """Insert a new job with its first events in its outbox."""
        doc = {**doc, "outbox": [outbox_entry(e) for e in events]}
        if events:
            doc["outbox_at"] = doc["created_at"]
        try:
            await self.jobs.insert_one(doc)
        except DuplicateKeyError as exc:
            key = doc.get("idempotency_key")
            if key is None:
                raise
            existing = await self.jobs.find_one({"owner": doc["owner"], "idempotency_key": key})
            if existing is None:
                raise
            raise IdempotencyConflict(existing) from exc
        return doc

    async def get(self, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
        query: dict[str, Any] = {"_id": job_id}
        if owner is not None:
            query["owner"] = owner
        return await self.jobs.find_one(query, {"outbox": 0})

    async def find_by_idempotency_key(self, owner: str, key: str) -> dict[str, Any] | None:
        return await self.jobs.find_one({"owner": owner, "idempotency_key": key}, {"outbox": 0})

    async def page(
        self, owner: str, *, status: str | None, limit: int, after: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page, newest first, and the cursor of the next page (keyset on the time-ordered id)."""
        items = await self.page_cursor(owner, status=status, limit=limit + 1, after=after).to_list(length=limit + 1)
        next_cursor = encode_cursor(items[limit - 1]["_id"]) if len(items) > limit else None
        return items[:limit], next_cursor

    def page_cursor(
        self, owner: str, *, status: str | None, limit: int, after: str | None, projection: Any = LIST_PROJECTION
    ) -> Any:
        """The page query on its compound index (hinted: a rare owner must never fall back to the _id index)."""
        query: dict[str, Any] = {"owner": owner}
        if status is not None:
            query["status"] = status
        if after is not None:
            query["_id"] = {"$lt": after}
        index = NEWEST if status is None else STATUS_NEWEST
        return self.jobs.find(query, projection).sort("_id", DESCENDING).hint(index).limit(limit)

    async def page_versions(
        self, owner: str, *, status: str | None, limit: int, after: str | None
    ) -> tuple[list[tuple[str, int]], str | None]:
        """One page's (id, version) pairs, newest first, read from the index alone, and the next page's cursor."""
        cursor = self.page_cursor(owner, status=status, limit=limit + 1, after=after, projection=VERSIONS)
        found = [(doc["_id"], doc["version"]) for doc in await cursor.to_list(length=limit + 1)]
        next_cursor = encode_cursor(found[limit - 1][0]) if len(found) > limit else None
        return found[:limit], next_cursor

    async def list_items(self, job_ids: list[str]) -> list[dict[str, Any]]:
        """Jobs by id, projected like list items (those deleted meanwhile are missing)."""
        return await self.jobs.find({"_id": {"$in": job_ids}}, LIST_PROJECTION).to_list(length=len(job_ids))

    async def transition(
        self, job_id: str, decide: Any, now: datetime
    ) -> tuple[dict[str, Any] | None, lifecycle.Transition | None]:
        """Apply `decide(doc) -> Transition | None` with optimistic concurrency on `version`."""
        for _ in range(MAX_CONFLICT_RETRIES):
            doc = await self.jobs.find_one({"_id": job_id}, {"outbox": 0})
            if doc is None:
                return None, None
            change = decide(doc)
            if change is None:
                return doc, None
            update: dict[str, Any] = {"$set": change.set, "$inc": {"version": 1}}
            if change.emit:
                update["$push"] = {"outbox": {"$each": [outbox_entry(e) for e in change.emit]}}
                update["$min"] = {"outbox_at": now}
            updated = await self.jobs.find_one_and_update(
                {"_id": job_id, "version": doc["version"]},
                update,
                projection={"outbox": 0},
                return_document=ReturnDocument.AFTER,
            )
            if updated is not None:
                return updated, change
        raise RuntimeError(f"job {job_id} kept changing under {MAX_CONFLICT_RETRIES} attempts")

    async def pending_events(self, job_id: str) -> list[dict[str, Any]]:
        doc = await self.jobs.find_one({"_id": job_id}, {"outbox": 1})
        return list(doc.get("outbox") or []) if doc else []

    async def mark_published(self, job_id: str, event_ids: Sequence[str]) -> None:
        """Remove published events from the outbox, and its timestamp once it is empty: one update."""
        left = {
            "$filter": {
                "input": {"$ifNull": ["$outbox", []]},
                "cond": {"$not": [{"$in": ["$$this.id", list(event_ids)]}]},
            }
        }
        await self.jobs.update_one(
            {"_id": job_id},
            [
                {"$set": {"outbox": left}},
                {"$set": {"outbox_at": {"$cond": [{"$eq": [{"$size": "$outbox"}, 0]}, "$$REMOVE", "$outbox_at"]}}},
            ],
        )

    async def jobs_with_pending_events(self, older_than: datetime, limit: int = 100) -> list[str]:
        cursor = self.jobs.find({"outbox_at": {"$lte": older_than}}, {"_id": 1}).limit(limit)
        return [doc["_id"] async for doc in cursor]

    async def expired(self, now: datetime, limit: int = 100) -> list[str]:
        cursor = self.jobs.find({"expire_at": {"$lte": now}}, {"_id": 1}).limit(limit)
        return [doc["_id"] async for doc in cursor]

    async def unfinished_summary(self, statuses: Sequence[str]) -> dict[str, tuple[int, datetime | None]]:
        """Per unfinished status: how many jobs, and the oldest last change (each on the status index)."""
        summary: dict[str, tuple[int, datetime | None]] = {}
        for status in statuses:
            count = await self.jobs.count_documents({"status": status}, hint="status_updated")
            oldest = await self.jobs.find_one(
                {"status": status}, {"updated_at": 1}, sort=[("updated_at", ASCENDING)], hint="status_updated"
            )
            summary[status] = (count, oldest["updated_at"] if oldest else None)
        return summary

    async def unchanged_since(self, statuses: Sequence[str], before: datetime, limit: int = 100) -> list[str]:
        """Unfinished jobs whose last change is older than `before`, oldest first."""
        cursor = (
            self.jobs.find({"status": {"$in": list(statuses)}, "updated_at": {"$lt": before}}, {"_id": 1})
            .hint("status_updated")
            .limit(limit)
        )
        return [doc["_id"] async for doc in cursor]

    async def insert_batch(self, batch: dict[str, Any]) -> None:
        try:
            await self.batches.insert_one(batch)
        except DuplicateKeyError as exc:
            existing = await self.find_batch_by_idempotency_key(batch["owner"], batch.get("idempotency_key") or "")
            if existing is None:
                raise
            raise IdempotencyConflict(existing) from exc

    async def find_batch_by_idempotency_key(self, owner: str, key: str) -> dict[str, Any] | None:
        return await self.batches.find_one({"owner": owner, "idempotency_key": key})

    async def get_batch(self, batch_id: str, owner: str) -> dict[str, Any] | None:
        return await self.batches.find_one({"_id": batch_id, "owner": owner})

    async def batch_jobs(self, batch_id: str) -> list[dict[str, Any]]:
        """The batch's jobs in submission order (ids sort by creation), projected like list items."""
        cursor = self.jobs.find({"batch_id": batch_id}, LIST_PROJECTION).sort("_id", ASCENDING).hint("batch")
        return [doc async for doc in cursor]

    async def delete(self, job_id: str, owner: str | None = None) -> bool:
        query = {"_id": job_id} if owner is None else {"_id": job_id, "owner": owner}
        result = await self.jobs.delete_one(query)
        return result.deleted_count == 1

    async def upsert_external(self, doc: dict[str, Any], events: Sequence[Event[Any]]) -> bool:
        """Create a job first announced by another service's `job.submitted`; False if it exists."""
        try:
            await self.insert(doc, events)
        except DuplicateKeyError:
            return False
        return True
