"""Resume with last_event_id across a notifier restart, and several replicas serving the same events."""

from __future__ import annotations

from typing import Any

import aio_pika
import pytest
from websockets.exceptions import ConnectionClosed

from stemflow_shared.topology import NOTIFIER_QUEUE, Names


def ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for e in events]


async def test_a_client_resumes_after_a_restart_with_exactly_the_events_it_missed(
    kit: Any, notifier_env: dict[str, str], feed: Any
) -> None:
    key = await feed.key("resumer")
    job = await feed.job("resumer")
    replica = kit.replica("restart")
    async with kit.running_notifier(notifier_env, replica_id=replica) as first, kit.connect(first.url, key) as ws:
        await kit.subscribe(ws, job_id=job)
        seen = await kit.events_until(ws, (await feed.progress("resumer", job, 20.0)).id)
        await first.stop()
        with pytest.raises(ConnectionClosed) as closed:
            await kit.receive(ws)
        assert closed.value.rcvd.code == 1012
    # While no notifier runs, the replica's queue keeps what is published.
    missed = [
        await feed.progress("resumer", job, 60.0),
        await feed.progress("resumer", job, 90.0),
        await feed.completed("resumer", job),
    ]
    async with kit.running_notifier(notifier_env, replica_id=replica) as second:
        # The queue is worked in order: once an event published now arrives, the backlog is through.
        sentinel_job = await feed.job("resumer")
        async with kit.connect(second.url, key) as observer:
            await kit.subscribe(observer, job_id=sentinel_job)
            await kit.events_until(observer, (await feed.progress("resumer", sentinel_job, 1.0)).id)
        async with kit.connect(second.url, key) as ws:
            reply = await kit.subscribe(ws, job_id=job, last_event_id=seen[-1]["id"])
            assert reply["type"] == "subscribed" and reply["resumed"] is True
            assert ids(await kit.events_until(ws, missed[-1].id)) == [e.id for e in missed]


async def test_resuming_while_the_backlog_is_still_coming_keeps_order_and_sends_nothing_twice(
    kit: Any, notifier_env: dict[str, str], feed: Any
) -> None:
    key = await feed.key("racer")
    job = await feed.job("racer")
    replica = kit.replica("race")
    async with kit.running_notifier(notifier_env, replica_id=replica) as first, kit.connect(first.url, key) as ws:
        await kit.subscribe(ws, job_id=job)
        seen = await kit.events_until(ws, (await feed.cancelled("racer", job)).id)
    missed = [await publish("racer", job) for publish in (feed.failed, feed.completed) * 15]
    async with kit.running_notifier(notifier_env, replica_id=replica) as second, kit.connect(second.url, key) as ws:
        reply = await kit.subscribe(ws, job_id=job, last_event_id=seen[-1]["id"])
        assert reply["resumed"] is True
        assert ids(await kit.events_until(ws, missed[-1].id)) == [e.id for e in missed]


async def test_two_replicas_both_deliver_and_log_each_event_once(
    kit: Any, notifier_env: dict[str, str], feed: Any, redis_client: Any
) -> None:
    key = await feed.key("scaled")
    job = await feed.job("scaled")
    async with (
        kit.running_notifier(notifier_env, replica_id=kit.replica("one")) as one,
        kit.running_notifier(notifier_env, replica_id=kit.replica("two")) as two,
        kit.connect(one.url, key) as on_one,
        kit.connect(two.url, key) as on_two,
    ):
        await kit.subscribe(on_one, job_id=job)
        await kit.subscribe(on_two)
        assert await consumers_of_replica_queues(notifier_env, ("one", "two")) == [1, 1]
        first = await feed.progress("scaled", job, 10.0)
        assert ids(await kit.events_until(on_one, first.id)) == [first.id]
        assert ids(await kit.events_until(on_two, first.id)) == [first.id]
        # The client on replica one leaves; it comes back on replica two for what it missed.
        await on_one.close()
        missed = [await feed.progress("scaled", job, 50.0), await feed.completed("scaled", job)]
        assert ids(await kit.events_until(on_two, missed[-1].id)) == [e.id for e in missed]
        async with kit.connect(two.url, key) as back:
            reply = await kit.subscribe(back, job_id=job, last_event_id=first.id)
            assert reply["resumed"] is True
            assert ids(await kit.events_until(back, missed[-1].id)) == [e.id for e in missed]
    stream = f"{notifier_env['STEMFLOW_NAMESPACE']}:events:{{scaled}}:job:{job}"
    assert await redis_client.xlen(stream) == 3


async def consumers_of_replica_queues(notifier_env: dict[str, str], replicas: tuple[str, ...]) -> list[int]:
    """How many consumers each replica's own queue has (declared passively: it must exist)."""
    names = Names(notifier_env["STEMFLOW_NAMESPACE"])
    connection = await aio_pika.connect(notifier_env["AMQP_URL"])
    async with connection:
        channel = await connection.channel()
        queues = [await channel.declare_queue(names.queue(NOTIFIER_QUEUE, r), passive=True) for r in replicas]
        return [queue.declaration_result.consumer_count for queue in queues]


async def test_an_unknown_last_event_id_replays_all_that_is_kept(
    kit: Any, notifier_env: dict[str, str], feed: Any
) -> None:
    key = await feed.key("forgetful")
    job = await feed.job("forgetful")
    async with kit.running_notifier(notifier_env, replica_id=kit.replica("unknown")) as notifier:
        async with kit.connect(notifier.url, key) as ws:
            await kit.subscribe(ws, job_id=job)
            kept = [await feed.progress("forgetful", job, 30.0), await feed.failed("forgetful", job)]
            await kit.events_until(ws, kept[-1].id)
        async with kit.connect(notifier.url, key) as ws:
            reply = await kit.subscribe(ws, last_event_id="not-an-event-we-know")
            assert (reply["type"], reply["job_id"], reply["resumed"]) == ("subscribed", None, False)
            assert ids(await kit.events_until(ws, kept[-1].id)) == [e.id for e in kept]
