"""Batching, coalescing, back-pressure and tenancy of the notifier's hub (pure, no servers)."""

from __future__ import annotations

import asyncio

from notifier.hub import Client, Hub
from notifier.mailbox import Item, Mailbox

TYPES = {
    "progress": "stemflow.job.progress.v1",
    "completed": "stemflow.job.completed.v1",
    "failed": "stemflow.job.failed.v1",
    "cancelled": "stemflow.job.cancelled.v1",
}


def item(kind: str, job: str, n: int, owner: str = "alice", seq: int | None = None) -> Item:
    return Item(
        id=f"{kind}-{job}-{n}",
        owner=owner,
        job_id=job,
        type=TYPES[kind],
        json=f'{{"n":{n}}}',
        seq=(seq, 0) if seq is not None else None,
    )


def ids(batch: list[Item]) -> list[str]:
    return [i.id for i in batch]


async def test_progress_of_a_job_within_a_window_collapses_to_the_latest_in_stream_order() -> None:
    box = Mailbox(window_s=0.05, max_batch=50, max_pending=100)
    box.push(item("progress", "j1", 1))
    box.push(item("progress", "j2", 1))
    box.push(item("progress", "j1", 2))
    assert ids(await asyncio.wait_for(box.next_batch(), 5)) == ["progress-j2-1", "progress-j1-2"]


async def test_a_terminal_event_makes_the_batch_due_at_once() -> None:
    box = Mailbox(window_s=3600, max_batch=50, max_pending=100)
    box.push(item("progress", "j1", 1))
    waiter = asyncio.create_task(box.next_batch())
    await asyncio.sleep(0)
    assert not waiter.done()
    box.push(item("completed", "j1", 2))
    assert ids(await asyncio.wait_for(waiter, 5)) == ["progress-j1-1", "completed-j1-2"]


async def test_a_full_batch_goes_without_waiting_and_the_rest_follows() -> None:
    box = Mailbox(window_s=3600, max_batch=3, max_pending=100)
    for n in range(5):
        box.push(item("failed", f"j{n}", n))
    first = await asyncio.wait_for(box.next_batch(), 5)
    second = await asyncio.wait_for(box.next_batch(), 5)
    assert len(first) == 3 and len(second) == 2


async def test_what_a_full_batch_leaves_waits_for_the_rest_of_its_window() -> None:
    box = Mailbox(window_s=3600, max_batch=2, max_pending=100)
    for n in range(3):
        box.push(item("progress", f"j{n}", n))
    assert len(await asyncio.wait_for(box.next_batch(), 5)) == 2
    waiter = asyncio.create_task(box.next_batch())
    await asyncio.sleep(0)
    assert not waiter.done()
    box.push(item("cancelled", "j0", 9))
    assert ids(await asyncio.wait_for(waiter, 5)) == ["progress-j2-2", "cancelled-j0-9"]


async def test_without_a_window_everything_pending_goes_out_at_once() -> None:
    box = Mailbox(window_s=0, max_batch=2, max_pending=100)
    for n in range(3):
        box.push(item("progress", f"j{n}", n))
    first = await asyncio.wait_for(box.next_batch(), 5)
    second = await asyncio.wait_for(box.next_batch(), 5)
    assert len(first) == 2 and len(second) == 1


async def test_window_zero_sends_each_event_as_it_comes() -> None:
    box = Mailbox(window_s=0, max_batch=1, max_pending=100)
    box.push(item("progress", "j1", 1))
    assert ids(await asyncio.wait_for(box.next_batch(), 5)) == ["progress-j1-1"]


async def test_a_slow_client_loses_progress_first_and_never_a_terminal_event() -> None:
    box = Mailbox(window_s=3600, max_batch=50, max_pending=3)
    box.push(item("completed", "a", 1))
    box.push(item("progress", "b", 1))
    box.push(item("completed", "c", 1))
    box.push(item("progress", "d", 1))
    assert sorted(i.type.split(".")[2] for i in box._pending.values()) == ["completed", "completed", "progress"]
    box.push(item("cancelled", "e", 1))
    assert not box.overflowed and len(box) == 3
    box.push(item("failed", "f", 1))
    assert box.overflowed
    assert {i.id for i in box._pending.values()} >= {"completed-a-1", "completed-c-1", "cancelled-e-1", "failed-f-1"}


async def test_clients_only_get_their_owners_subscribed_jobs_and_each_event_once() -> None:
    hub = Hub()
    alice, alice_all, mallory = (Client(o, Mailbox(3600, 50, 100)) for o in ("alice", "alice", "mallory"))
    for client in (alice, alice_all, mallory):
        hub.add(client)
    hub.subscribe(alice, "j1")
    hub.subscribe(alice_all, None)
    hub.subscribe(alice_all, "j1")
    hub.subscribe(mallory, None)
    hub.subscribe(mallory, "j1")  # a job id of another owner: matches nothing of alice's
    event = item("completed", "j1", 1)
    assert hub.dispatch(event) == 2
    assert hub.dispatch(event) == 0  # a redelivery
    hub.dispatch(item("completed", "j2", 1))
    assert (len(alice.mailbox), len(alice_all.mailbox), len(mallory.mailbox)) == (1, 2, 0)
    hub.remove(alice_all)
    assert hub.dispatch(item("completed", "j1", 2)) == 1


async def test_events_held_during_a_replay_are_queued_unless_the_replay_had_them() -> None:
    client = Client("alice", Mailbox(3600, 50, 100))
    client.hold()
    client.deliver(item("progress", "j1", 3, seq=3))
    client.deliver(item("progress", "j2", 4, seq=4))
    assert len(client.mailbox) == 0
    client.release({"progress-j0-2", "progress-j1-3"}, None, (3, 0))
    assert [i.id for i in client.mailbox._pending.values()] == ["progress-j2-4"]


async def test_too_many_held_events_overflow_the_mailbox() -> None:
    client = Client("alice", Mailbox(3600, 50, 2))
    client.hold()
    for n in range(3):
        client.deliver(item("completed", f"j{n}", n))
    assert client.mailbox.overflowed


async def test_live_events_a_replay_already_covered_are_dropped() -> None:
    client = Client("alice", Mailbox(3600, 50, 100))
    client.hold()
    client.release({"completed-j1-5"}, "j1", (5, 0))
    client.deliver(item("completed", "j1", 5, seq=5))  # the same event from a replica that lags behind
    client.deliver(item("completed", "j2", 4, seq=4))  # another job: not covered by the replay
    client.deliver(item("failed", "j1", 6, seq=6))
    assert [i.id for i in client.mailbox._pending.values()] == ["completed-j2-4", "failed-j1-6"]
