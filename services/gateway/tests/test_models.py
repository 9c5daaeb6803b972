"""`GET /v1/models` and the refusal of work no separator pool serves."""

from __future__ import annotations

from typing import Any

from gateway.models import ModelCatalogue
from stemflow_dev.fixtures import SERVING_REPLICA
from stemflow_shared.separators import CATALOGUE, SeparatorRegistry
from stemflow_shared.topology import separator_queue


async def test_models_lists_the_catalogue_with_what_is_served(client: Any, app: Any, helpers: Any) -> None:
    headers = await helpers.new_key(app, "models-owner")
    response = await client.get("/v1/models", headers=headers)
    assert response.status_code == 200
    body = response.json()
    assert body["default_model"] == "htdemucs"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == set(CATALOGUE)
    assert by_name["htdemucs"]["stems"] == [2, 4]
    assert by_name["htdemucs_6s"]["stems"] == [2, 4, 6]
    assert by_name["htdemucs_6s"]["sources"][-2:] == ["guitar", "piano"]
    for model in by_name.values():
        assert model["served"] is True and model["workers"] >= 1
        assert model["queue_depth"] >= 0
        assert model["title"] and model["description"]


async def test_models_needs_a_key(client: Any, helpers: Any) -> None:
    helpers.assert_problem(await client.get("/v1/models"), 401, "unauthorized")


async def test_a_model_nobody_serves_is_refused_and_listed_as_unserved(
    base_env: dict[str, str], redis_client: Any, helpers: Any
) -> None:
    namespace = base_env["STEMFLOW_NAMESPACE"]
    registry = SeparatorRegistry(redis_client, f"{namespace}:")
    await registry.withdraw(SERVING_REPLICA)
    await helpers.announce_models(redis_client, namespace, ["htdemucs"])
    try:
        async with helpers.running_app(base_env) as app, helpers.http_client(app) as client:
            headers = await helpers.new_key(app, "unserved-owner")
            listing = {m["name"]: m for m in (await client.get("/v1/models", headers=headers)).json()["models"]}
            assert listing["htdemucs"]["served"] is True
            assert listing["htdemucs_6s"]["served"] is False and listing["htdemucs_6s"]["workers"] == 0
            assert listing["htdemucs_6s"]["estimated_wait_s"] is None

            for fields in (
                {"model": "htdemucs_6s", "stems": "6"},
                {"model": "htdemucs_ft"},
                {"targets": "htdemucs:4,htdemucs_6s:6"},
            ):
                body = helpers.assert_problem(await helpers.submit(client, headers, **fields), 422, "model_unavailable")
                assert body["errors"][0]["field"] in ("model", "targets")
            by_url = await client.post(
                "/v1/jobs", headers=headers, json={"source_url": "https://example.com/a.wav", "model": "htdemucs_ft"}
            )
            helpers.assert_problem(by_url, 422, "model_unavailable")
            batch = await client.post(
                "/v1/batches",
                headers=headers,
                json={"source_urls": ["https://example.com/a.wav"], "model": "htdemucs_6s"},
            )
            helpers.assert_problem(batch, 422, "model_unavailable")
            # Analysis alone needs no separator; the served model is accepted.
            assert (await helpers.submit(client, headers, model="htdemucs_6s", separate="false")).status_code == 202
            assert (await helpers.submit(client, headers, model="htdemucs")).status_code == 202
            # Nothing of the refused uploads is kept.
            listed = (await client.get("/v1/jobs", headers=headers)).json()["items"]
            assert len(listed) == 2
    finally:
        await helpers.announce_models(redis_client, namespace, list(CATALOGUE))


async def test_an_expired_announcement_serves_nothing(
    base_env: dict[str, str], redis_client: Any, helpers: Any
) -> None:
    namespace = base_env["STEMFLOW_NAMESPACE"]
    registry = SeparatorRegistry(redis_client, f"{namespace}:")
    await helpers.announce_models(redis_client, namespace, list(CATALOGUE), ttl_s=-1)
    try:
        assert await registry.live() == []
        assert await redis_client.hlen(f"{namespace}:separators") == 0  # removed on the way
    finally:
        await helpers.announce_models(redis_client, namespace, list(CATALOGUE))


async def test_the_openapi_document_has_no_dangling_references(client: Any) -> None:
    document = (await client.get("/openapi.json")).json()
    text = str(document)
    components = document.get("components", {}).get("schemas", {})
    import re

    for ref in re.findall(r"'\$ref': '([^']+)'", text):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in components, ref
    assert "/v1/models" in document["paths"]


async def test_the_listing_reuses_a_queue_depth_for_a_second_and_a_jobs_place_reads_it_afresh(
    app: Any, base_env: dict[str, str]
) -> None:
    """Polls of `/v1/models` cost the broker one round of passive declares per second; a job's place in its
    queue (`estimate` with no max age) always sees the queue as it is. Real broker, real queue."""
    import aio_pika

    served = app.state.jobs.models
    now = [1000.0]
    catalogue = ModelCatalogue(served._registry, served._broker, listing_max_age_s=1.0, clock=lambda: now[0])
    queue_name = served._broker.names.queue(separator_queue("htdemucs"))

    def depth(listing: dict[str, Any]) -> int:
        return next(m["queue_depth"] for m in listing["models"] if m["name"] == "htdemucs")

    before = depth(await catalogue.listing())
    connection = await aio_pika.connect(base_env["AMQP_URL"])
    try:
        channel = await connection.channel()  # publisher confirms: the message is in the queue once this returns
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=queue_name)
        queue = await channel.declare_queue(queue_name, passive=True)
        taken = False
        try:
            assert depth(await catalogue.listing()) == before  # read 0 s ago: reused
            now[0] += 0.9
            assert depth(await catalogue.listing()) == before  # 0.9 s ago: still reused
            assert (await catalogue.estimate("htdemucs")).queue_depth == before + 1  # a job's place: afresh
            message = await queue.get()
            await message.ack()
            taken = True
            now[0] += 0.9
            assert depth(await catalogue.listing()) == before + 1  # the estimate's read, 0.9 s old
            now[0] += 0.2
            assert depth(await catalogue.listing()) == before  # over a second old: read again
        finally:
            if not taken:
                message = await queue.get()
                await message.ack()
    finally:
        await connection.close()
