"""List pages from the caches: a cached first page never outlives a change of the owner's jobs, items are
the job cache's bodies only at the version MongoDB has, and a page's ids and versions come from the index."""

from __future__ import annotations

from typing import Any

import httpx

from gateway.repository import VERSIONS, encode_cursor
from stemflow_shared.events import (
    AUDIO_INGESTED,
    JOB_SUBMITTED,
    AudioInfo,
    AudioIngested,
    InputRef,
    JobOptions,
    JobSubmitted,
    SourceInfo,
    make_event,
)


async def listed(client: httpx.AsyncClient, headers: dict[str, str], query: str = "") -> list[tuple[str, str]]:
    response = await client.get(f"/v1/jobs{query}", headers=headers)
    assert response.status_code == 200, response.text
    return [(item["id"], item["status"]) for item in response.json()["items"]]


def ingested(job_id: str) -> Any:
    audio = AudioInfo(blob_key="a", duration_s=1, sample_rate=44100, channels=2, frames=44100, fingerprint="f")
    data = AudioIngested(
        job_id=job_id,
        owner="x",
        options=JobOptions(),
        audio=audio,
        source=SourceInfo(format="WAV", sample_rate=22050, channels=1, duration_s=1),
    )
    return make_event(AUDIO_INGESTED, data, source="/t")


def submitted(job_id: str, owner: str) -> Any:
    """Another service's `job.submitted` (the gateway adopts the job)."""
    data = JobSubmitted(
        job_id=job_id, owner=owner, options=JobOptions(), input=InputRef(source_url="http://a.example/x.wav")
    )
    return make_event(JOB_SUBMITTED, data, source="/other")


async def test_every_change_shows_on_the_next_first_page(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "lc-alice")
    first = (await helpers.submit(client, alice)).json()["id"]
    assert await listed(client, alice) == [(first, "queued")]
    assert await listed(client, alice, "?status=queued") == [(first, "queued")]
    assert await listed(client, alice) == [(first, "queued")]  # now from the cache

    second = (await helpers.submit(client, alice)).json()["id"]  # a new job
    assert await listed(client, alice) == [(second, "queued"), (first, "queued")]

    await app.state.jobs.apply_event(ingested(first))  # a stage event
    assert await listed(client, alice) == [(second, "queued"), (first, "processing")]
    assert await listed(client, alice, "?status=queued") == [(second, "queued")]

    assert (await client.post(f"/v1/jobs/{second}/cancel", headers=alice)).status_code == 200
    assert await listed(client, alice) == [(second, "cancelled"), (first, "processing")]
    assert await listed(client, alice, "?status=cancelled&limit=5") == [(second, "cancelled")]

    assert (await client.delete(f"/v1/jobs/{second}", headers=alice)).status_code == 204
    assert await listed(client, alice) == [(first, "processing")]
    assert await listed(client, alice, "?status=cancelled&limit=5") == []


async def test_a_page_read_before_a_change_is_not_kept(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    jobs = app.state.jobs
    alice = await helpers.new_key(app, "lc-race")
    job_id = (await helpers.submit(client, alice)).json()["id"]
    newest = (await helpers.submit(client, alice)).json()["id"]
    for after, query in ((None, ""), (newest, f"?cursor={encode_cursor(newest)}")):
        await listed(client, alice, query)
        await app.state.jobs.apply_event(ingested(job_id))
        # A reader looks the page up (a miss) and reads MongoDB; the job changes before it stores the page.
        missed, _ = await jobs.cached_page(
            "lc-race", status=None, limit=20, after=after, gzip_ok=False, counter_key=None
        )
        assert missed.body is None
        assert (await client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)).status_code == 200
        await jobs.list_page("lc-race", status=None, limit=20, after=after, generation=missed.generation)
        assert not await from_cache(app, "lc-race", limit=20, after=after)
        assert (job_id, "cancelled") in await listed(client, alice, query)


async def from_cache(app: Any, owner: str, *, limit: int, after: str | None, status: str | None = None) -> bool:
    """Whether the owner's page is in the list cache now."""
    page, _ = await app.state.jobs.cached_page(
        owner, status=status, limit=limit, after=after, gzip_ok=False, counter_key=None
    )
    return page.body is not None


async def test_every_change_shows_on_the_next_cursor_page(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    """A cursor page is cached like a first page: no job deleted, status changed or (with an older id) created
    since is ever shown from the cache as it was."""
    jobs = app.state.jobs
    alice = await helpers.new_key(app, "lc-deep-cache")
    ids = [(await helpers.submit(client, alice)).json()["id"] for _ in range(4)]
    deep = f"?limit=2&cursor={encode_cursor(ids[3])}"

    async def page() -> list[tuple[str, str]]:
        shown = await listed(client, alice, deep)
        assert await from_cache(app, "lc-deep-cache", limit=2, after=ids[3])
        assert await listed(client, alice, deep) == shown  # the same, now from the cache
        return shown

    assert await page() == [(ids[2], "queued"), (ids[1], "queued")]
    await jobs.apply_event(ingested(ids[2]))  # a stage event
    assert await page() == [(ids[2], "processing"), (ids[1], "queued")]
    assert (await client.post(f"/v1/jobs/{ids[1]}/cancel", headers=alice)).status_code == 200
    assert await page() == [(ids[2], "processing"), (ids[1], "cancelled")]
    assert (await client.delete(f"/v1/jobs/{ids[2]}", headers=alice)).status_code == 204
    assert await page() == [(ids[1], "cancelled"), (ids[0], "queued")]
    # Another service's job.submitted with an id from before the cursor: it belongs on this page at once.
    older = f"{int(ids[3], 16) - 1:032x}"
    first = await listed(client, alice)
    assert await listed(client, alice) == first and await from_cache(app, "lc-deep-cache", limit=20, after=None)
    await jobs.adopt_external(submitted(older, "lc-deep-cache"))
    assert await page() == [(older, "queued"), (ids[1], "cancelled")]
    assert await listed(client, alice) == [first[0], (older, "queued"), *first[1:]]
    # Another owner's change leaves this owner's pages cached.
    bob = await helpers.new_key(app, "lc-deep-bob")
    await helpers.submit(client, bob)
    assert await from_cache(app, "lc-deep-cache", limit=2, after=ids[3])


async def test_an_owner_keeps_at_most_the_configured_pages(base_env: dict[str, str], helpers: Any) -> None:
    async with helpers.running_app(base_env, list_cache_pages=2) as app, helpers.http_client(app) as client:
        alice = await helpers.new_key(app, "lc-few-pages")
        ids = [(await helpers.submit(client, alice)).json()["id"] for _ in range(4)]
        afters = [None, ids[3], ids[2]]
        for after in afters:
            query = f"?limit=1&cursor={encode_cursor(after)}" if after else "?limit=1"
            assert await listed(client, alice, query) == await listed(client, alice, query)
        kept = [await from_cache(app, "lc-few-pages", limit=1, after=after) for after in afters]
        assert kept == [True, True, False]
        assert await listed(client, alice, f"?limit=1&cursor={encode_cursor(ids[2])}") == [(ids[1], "queued")]
        # A change empties the owner's pages: there is room again.
        assert (await client.post(f"/v1/jobs/{ids[0]}/cancel", headers=alice)).status_code == 200
        assert await listed(client, alice, f"?limit=1&cursor={encode_cursor(ids[2])}") == [(ids[1], "queued")]
        assert await from_cache(app, "lc-few-pages", limit=1, after=ids[2])


async def test_first_pages_are_the_same_gzipped_or_not(app: Any, client: httpx.AsyncClient, helpers: Any) -> None:
    alice = await helpers.new_key(app, "lc-gzip")
    for _ in range(3):
        await helpers.submit(client, alice)
    plain = await client.get("/v1/jobs", headers={**alice, "Accept-Encoding": "identity"})
    zipped = await client.get("/v1/jobs", headers={**alice, "Accept-Encoding": "gzip"})
    again = await client.get("/v1/jobs", headers={**alice, "Accept-Encoding": "gzip"})
    assert "content-encoding" not in plain.headers
    assert zipped.headers["content-encoding"] == again.headers["content-encoding"] == "gzip"
    assert plain.json() == zipped.json() == again.json() and len(plain.json()["items"]) == 3


async def test_deep_pages_follow_the_database_not_a_stale_cache(
    app: Any, client: httpx.AsyncClient, helpers: Any
) -> None:
    alice = await helpers.new_key(app, "lc-deep")
    ids = [(await helpers.submit(client, alice)).json()["id"] for _ in range(3)]
    page = (await client.get("/v1/jobs?limit=1", headers=alice)).json()
    assert [item["id"] for item in page["items"]] == [ids[2]]
    # A write whose cache update was lost: the job cache holds an older version than MongoDB.
    await app.state.jobs.repo.jobs.update_one({"_id": ids[1]}, {"$set": {"status": "failed"}, "$inc": {"version": 1}})
    deep = (await client.get(f"/v1/jobs?limit=5&cursor={page['next_cursor']}", headers=alice)).json()
    assert [(item["id"], item["status"]) for item in deep["items"]] == [(ids[1], "failed"), (ids[0], "queued")]
    assert deep["next_cursor"] is None
    # The page cached what it read: a single read now answers the database's version too.
    assert (await client.get(f"/v1/jobs/{ids[1]}", headers=alice)).json()["status"] == "failed"


async def test_a_page_of_ids_and_versions_is_read_from_the_index_alone(app: Any) -> None:
    repo = app.state.jobs.repo
    for status in (None, "queued"):
        cursor = repo.page_cursor("lc-alice", status=status, limit=21, after=None, projection=VERSIONS)
        explained = await cursor.explain()
        plan = str(explained["queryPlanner"]["winningPlan"])
        assert "PROJECTION_COVERED" in plan and "FETCH" not in plan, plan
        assert explained["executionStats"]["totalDocsExamined"] == 0


async def test_first_and_later_pages_count_against_the_rate_limit(base_env: dict[str, str], helpers: Any) -> None:
    async with helpers.running_app(base_env, rate_limit_per_minute=3) as app, helpers.http_client(app) as client:
        alice = await helpers.new_key(app, "lc-limited")
        ids = [(await helpers.submit(client, alice)).json()["id"] for _ in range(2)]
        page = (await client.get("/v1/jobs?limit=1", headers=alice)).json()
        assert page["items"][0]["id"] == ids[1] and page["next_cursor"]
        # Cached first pages and later pages both count: each kind alone soon runs into the limit
        # (within two windows, should a minute end meanwhile).
        for query in ("?limit=1", f"?limit=1&cursor={page['next_cursor']}"):
            answers = [(await client.get(f"/v1/jobs{query}", headers=alice)).status_code for _ in range(8)]
            assert 429 in answers and set(answers) <= {200, 429}, answers


async def test_cached_first_pages_are_answered_before_the_route_and_each_request_counted_once(
    app: Any, client: httpx.AsyncClient, helpers: Any, monkeypatch: Any
) -> None:
    """A cached first page is answered by cached_reads.py (the route never runs); a miss, a cursor or a query the
    route must judge goes on to the route, and every request counts once against the rate limit."""
    from gateway import job_routes

    routed: list[bytes] = []
    page_response = job_routes._page_response

    def counting(body: bytes, gzipped: bool) -> Any:
        routed.append(body)
        return page_response(body, gzipped)

    monkeypatch.setattr(job_routes, "_page_response", counting)
    alice = await helpers.new_key(app, "lc-front")
    who = await app.state.api_keys.authenticate(alice["Authorization"].split()[1])
    ids = [(await helpers.submit(client, alice)).json()["id"] for _ in range(2)]

    async def counted() -> int:
        return int(await app.state.redis.get(app.state.limiter.counter_key(who)) or 0)

    before = await counted()
    miss = await client.get("/v1/jobs?limit=5&status=queued", headers=alice)  # read by the route, then cached
    hits = [await client.get("/v1/jobs?status=queued&limit=5", headers=alice) for _ in range(3)]
    assert len(routed) == 1
    assert all(hit.content == miss.content and hit.status_code == 200 for hit in hits)
    assert [item["id"] for item in miss.json()["items"]] == ids[::-1] and miss.json()["next_cursor"] is None
    assert hits[0].headers["content-type"] == "application/json"
    assert hits[0].headers["content-encoding"] == "gzip" and hits[0].headers["vary"] == "Accept-Encoding"
    plain = await client.get("/v1/jobs?status=queued&limit=5", headers={**alice, "Accept-Encoding": "identity"})
    assert plain.content == miss.content and "content-encoding" not in plain.headers
    assert int(plain.headers["content-length"]) == len(plain.content) and len(routed) == 1

    # Queries the front does not read exactly as the route does go on to it: it answers them, or refuses them.
    odd = ["limit=1&cursor=xxxxxxxx", "limit=5&limit=5", "limit=0", "limit=1001", "status=bogus", "page=2", "limit="]
    answers = [(await client.get(f"/v1/jobs?{query}", headers=alice)).status_code for query in odd]
    assert answers == [422, 200, 422, 422, 422, 200, 422]
    assert len(routed) == 3  # limit=5&limit=5 and page=2 answered by the route, not from the front's cache
    assert await counted() - before == 5 + 2  # each answered request once (the route counts no refused query)
