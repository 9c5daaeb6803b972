"""The resume log on the real Redis: each event once across replicas, resume positions, trimmed history."""

from __future__ import annotations

import uuid
from typing import Any

from notifier.mailbox import Item
from notifier.resume import EventLog


def items(owner: str, job: str, count: int) -> list[Item]:
    return [
        Item(id=str(uuid.uuid4()), owner=owner, job_id=job, type="stemflow.job.progress.v1", json=f'{{"n":{n}}}')
        for n in range(count)
    ]


def log(redis_client: Any, notifier_env: dict[str, str], max_len: int = 200) -> EventLog:
    return EventLog(redis_client, f"{notifier_env['STEMFLOW_NAMESPACE']}:", max_len, 600)


async def test_two_replicas_log_an_event_once_and_agree_on_its_position(
    redis_client: Any, notifier_env: dict[str, str]
) -> None:
    one, two = log(redis_client, notifier_env), log(redis_client, notifier_env)
    batch = items("log-a", "j1", 3)
    first = await one.append(batch)
    assert await two.append(batch) == first
    assert first == sorted(first) and len(set(first)) == 3
    replay = await two.since("log-a", batch[0].id, "j1")
    assert [i.id for i in replay.items] == [i.id for i in batch[1:]]
    assert replay.resumed and replay.upto == first[-1]
    assert [i.json for i in replay.items] == [i.json for i in batch[1:]]


async def test_the_owner_stream_interleaves_its_jobs_in_order(redis_client: Any, notifier_env: dict[str, str]) -> None:
    events = log(redis_client, notifier_env)
    a, b = items("log-b", "ja", 2), items("log-b", "jb", 2)
    for item in (a[0], b[0], a[1], b[1]):
        await events.append([item])
    assert [i.id for i in (await events.since("log-b", a[0].id)).items] == [b[0].id, a[1].id, b[1].id]
    assert [i.id for i in (await events.since("log-b", a[0].id, "ja")).items] == [a[1].id]
    assert [i.id for i in (await events.since("log-b", b[0].id, "ja")).items] == [a[1].id]


async def test_a_trimmed_resume_point_is_reported_and_what_is_kept_replayed(
    redis_client: Any, notifier_env: dict[str, str]
) -> None:
    events = log(redis_client, notifier_env, max_len=1)
    batch = items("log-c", "j1", 300)
    await events.append(batch)
    replay = await events.since("log-c", batch[0].id, "j1")
    assert not replay.resumed
    assert 0 < len(replay.items) < 299 and replay.items[-1].id == batch[-1].id


async def test_every_key_of_the_log_expires_and_the_streams_stay_bounded(
    redis_client: Any, notifier_env: dict[str, str]
) -> None:
    events = log(redis_client, notifier_env, max_len=10)
    batch = items("log-e", "j1", 1000)
    await events.append(batch)
    prefix = f"{notifier_env['STEMFLOW_NAMESPACE']}:events:{{log-e}}:"
    job_stream, owner_stream = f"{prefix}job:j1", f"{prefix}all"
    # Trimming is approximate (whole stream nodes of 100 entries), never unbounded.
    assert 10 <= await redis_client.xlen(job_stream) < 10 + 200
    assert 100 <= await redis_client.xlen(owner_stream) < 100 + 200
    for key in (job_stream, owner_stream, f"{prefix}id:{batch[0].id}", f"{prefix}id:{batch[-1].id}"):
        assert 0 < await redis_client.ttl(key) <= 600


async def test_a_forgotten_script_is_loaded_again(redis_client: Any, notifier_env: dict[str, str]) -> None:
    events = log(redis_client, notifier_env)
    events._sha = "0" * 40  # as if Redis had restarted since the script was loaded
    (position,) = await events.append(items("log-d", "j1", 1))
    assert position > (0, 0)
