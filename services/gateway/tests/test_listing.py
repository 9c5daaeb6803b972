"""Keyset listing on its compound indexes: no collection scan, no in-memory sort, small items."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio

from gateway import lifecycle
from gateway.repository import NEWEST, STATUS_NEWEST, decode_cursor
from stemflow_shared.events import JobOptions

OWNERS = ("list-a", "list-b", "list-c")
PER_OWNER = 120


def plan_stages(plan: Any) -> list[tuple[str, str | None]]:
    """Every (stage, index name) of an explain plan, nested stages included."""
    found: list[tuple[str, str | None]] = []
    if isinstance(plan, dict):
        if "stage" in plan:
            found.append((plan["stage"], plan.get("indexName")))
        for value in plan.values():
            found.extend(plan_stages(value))
    elif isinstance(plan, list):
        for value in plan:
            found.extend(plan_stages(value))
    return found


def heavy_job(index: int, owner: str) -> dict[str, Any]:
    """A finished job whose analysis carries long beat and energy arrays (what lists must leave out)."""
    now = lifecycle.utcnow() - timedelta(minutes=index)
    job_id = lifecycle.new_job_id(now.timestamp())
    doc = lifecycle.new_job(job_id, owner, JobOptions(), {"filename": "a.wav"}, now=now, retention=timedelta(days=1))
    doc["status"] = "completed" if index % 2 else "failed"
    doc["audio"] = {"fingerprint": "x" * 64, "blob_key": f"jobs/{job_id}/audio.wav"}
    doc["result"]["analysis"] = {
        "tempo_bpm": 120.0,
        "key": "C major",
        "beat_count": 2000,
        "beats": [0.5] * 2000,
        "energy": [0.1] * 2000,
    }
    return doc


@pytest_asyncio.fixture(scope="module")
async def seeded(app: Any) -> dict[str, list[str]]:
    """PER_OWNER jobs for each owner, interleaved in time; ids newest first per owner."""
    docs = [heavy_job(i, OWNERS[i % len(OWNERS)]) for i in range(PER_OWNER * len(OWNERS))]
    await app.state.jobs.repo.jobs.insert_many(docs)
    return {owner: sorted((d["_id"] for d in docs if d["owner"] == owner), reverse=True) for owner in OWNERS}


@pytest.mark.parametrize(("status", "index"), [(None, NEWEST), ("completed", STATUS_NEWEST)])
@pytest.mark.parametrize("deep", [False, True])
async def test_pages_are_index_scans_without_sorting(
    app: Any, seeded: dict[str, list[str]], status: str | None, index: str, deep: bool
) -> None:
    after = seeded["list-b"][PER_OWNER // 2] if deep else None
    cursor = app.state.jobs.repo.page_cursor("list-b", status=status, limit=21, after=after)
    explained = await cursor.explain()
    stages = plan_stages(explained["queryPlanner"]["winningPlan"])
    names = [stage for stage, _ in stages]
    assert ("IXSCAN", index) in stages, stages
    assert "COLLSCAN" not in names and "SORT" not in names, stages
    executed = explained["executionStats"]
    assert executed["nReturned"] <= 21
    assert executed["totalDocsExamined"] <= 21 and executed["totalKeysExamined"] <= 22


async def test_pages_walk_every_job_once_newest_first(
    app: Any, client: httpx.AsyncClient, helpers: Any, seeded: dict[str, list[str]]
) -> None:
    headers = await helpers.new_key(app, "list-c")
    seen: list[str] = []
    cursor = None
    while True:
        query = "limit=50" + (f"&cursor={cursor}" if cursor else "")
        page = (await client.get(f"/v1/jobs?{query}", headers=headers)).json()
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert decode_cursor(cursor) == seen[-1]
    assert seen == seeded["list-c"]


async def test_list_items_are_projected_small(
    app: Any, client: httpx.AsyncClient, helpers: Any, seeded: dict[str, list[str]]
) -> None:
    headers = await helpers.new_key(app, "list-a")
    items, _ = await app.state.jobs.repo.page("list-a", status=None, limit=20, after=None)
    for doc in items:
        assert "outbox" not in doc and "audio" not in doc
        assert set(doc["result"]["analysis"]) <= {"tempo_bpm", "key", "beat_count"}
    response = await client.get("/v1/jobs?limit=20", headers=headers)
    page = response.json()["items"]
    assert len(page) == 20 and page[0]["result"]["analysis"]["beat_count"] == 2000
    assert "beats" not in response.text and "energy" not in response.text
    assert len(response.content) < 20 * 2500


async def test_list_items_are_the_jobs_as_read_one_by_one(
    app: Any, client: httpx.AsyncClient, helpers: Any, seeded: dict[str, list[str]]
) -> None:
    headers = await helpers.new_key(app, "list-a")
    listed = (await client.get("/v1/jobs?limit=10&status=completed", headers=headers)).json()["items"]
    singles = [(await client.get(f"/v1/jobs/{item['id']}", headers=headers)).json() for item in listed]
    assert singles == listed and {item["status"] for item in listed} == {"completed"}


async def test_a_list_never_shows_an_item_older_than_the_database(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    headers = await helpers.new_key(app, "list-stale")
    job = (await helpers.submit(client, headers)).json()
    assert (await client.get(f"/v1/jobs/{job['id']}", headers=headers)).json()["status"] == "queued"  # cached
    # A write whose cache update was lost (a crash between the two): the list must not serve the old body.
    await app.state.jobs.repo.jobs.update_one(
        {"_id": job["id"]}, {"$set": {"status": "failed"}, "$inc": {"version": 1}}
    )
    listed = (await client.get("/v1/jobs", headers=headers)).json()["items"]
    assert [(i["id"], i["status"]) for i in listed] == [(job["id"], "failed")]
