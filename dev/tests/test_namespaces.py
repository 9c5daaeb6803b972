"""Namespace leases against the real servers: what a killed run leaves is swept by the next, and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aio_pika
import pytest
import redis.asyncio as redis
from pymongo import AsyncMongoClient

from stemflow_dev import namespaces
from stemflow_dev.fixtures import STATE_DIR
from stemflow_dev.namespaces import Lease, leased, process_start, sweep_stale, take
from stemflow_dev.stack import StackUrls, ensure_stack
from stemflow_shared.topology import SHARED_QUEUES, Names


@pytest.fixture(scope="module")
def local_stack() -> StackUrls:
    return ensure_stack(STATE_DIR)


def dead_pid() -> tuple[int, int]:
    """A pid whose process has ended, and the start time it had."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = process_start(child.pid)
    assert started is not None
    child.kill()
    child.wait()
    return child.pid, started


async def occupy(urls: StackUrls, namespace: str, mongodb_db: str) -> None:
    """What a test run leaves: a durable quorum queue and an exchange, a MongoDB database, Redis keys."""
    names = Names(namespace)
    connection = await aio_pika.connect(urls.amqp_url, timeout=30)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(names.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        await channel.declare_queue(names.queue(SHARED_QUEUES[0]), durable=True, arguments={"x-queue-type": "quorum"})
    client = redis.from_url(urls.redis_url)
    try:
        await client.set(f"{namespace}:job:1", "x")
    finally:
        await client.aclose()
    mongo: AsyncMongoClient = AsyncMongoClient(urls.mongodb_url)
    try:
        await mongo[mongodb_db].jobs.insert_one({"_id": "j"})
    finally:
        await mongo.close()


async def remains(urls: StackUrls, namespace: str, mongodb_db: str) -> dict[str, bool]:
    """Which of `occupy`'s things still exist."""
    names = Names(namespace)
    found: dict[str, bool] = {}
    connection = await aio_pika.connect(urls.amqp_url, timeout=30)
    async with connection:
        for kind, declare in (
            ("queue", lambda ch: ch.declare_queue(names.queue(SHARED_QUEUES[0]), passive=True)),
            ("exchange", lambda ch: ch.declare_exchange(names.exchange, passive=True)),
        ):
            channel = await connection.channel()
            try:
                await declare(channel)
                found[kind] = True
            except aio_pika.exceptions.ChannelClosed:
                found[kind] = False
    client = redis.from_url(urls.redis_url)
    try:
        found["redis"] = bool(await client.exists(f"{namespace}:job:1"))
    finally:
        await client.aclose()
    mongo: AsyncMongoClient = AsyncMongoClient(urls.mongodb_url)
    try:
        found["mongodb"] = mongodb_db in await mongo.list_database_names()
    finally:
        await mongo.close()
    return found


ALL = {"queue": True, "exchange": True, "redis": True, "mongodb": True}
NONE = {"queue": False, "exchange": False, "redis": False, "mongodb": False}


@pytest.fixture
async def state(local_stack: StackUrls, tmp_path: Path) -> AsyncIterator[Path]:
    yield tmp_path
    for path in (tmp_path / namespaces.LEASES).glob("*.json"):  # whatever a failed test kept
        await namespaces.remove(Lease.from_json(path.read_text()))


def new_namespace() -> tuple[str, str]:
    ns = f"tl{uuid.uuid4().hex[:10]}"
    return ns, f"stemflow_{ns}"


async def test_a_killed_runs_namespace_is_swept(local_stack: StackUrls, state: Path) -> None:
    ns, db = new_namespace()
    pid, started = dead_pid()
    await occupy(local_stack, ns, db)
    path = take(state, Lease(ns, pid, started, local_stack, db))
    assert await remains(local_stack, ns, db) == ALL

    assert await sweep_stale(state, local_stack) == [ns]
    assert await remains(local_stack, ns, db) == NONE
    assert not path.exists()


async def test_derived_namespaces_are_swept_with_it(local_stack: StackUrls, state: Path) -> None:
    ns, db = new_namespace()
    pid, started = dead_pid()
    await occupy(local_stack, f"{ns}-outages", f"{db}x")
    take(state, Lease(ns, pid, started, local_stack, db, derived=(f"{ns}-outages",)))

    await sweep_stale(state, local_stack)
    left = await remains(local_stack, f"{ns}-outages", f"{db}x")
    assert left == {**NONE, "mongodb": True}  # only the lease's own database is dropped
    await AsyncMongoClient(local_stack.mongodb_url).drop_database(f"{db}x")


async def test_a_live_runs_namespace_is_kept(local_stack: StackUrls, state: Path) -> None:
    ns, db = new_namespace()
    await occupy(local_stack, ns, db)
    path = take(state, Lease(ns, os.getpid(), process_start(os.getpid()), local_stack, db))

    assert await sweep_stale(state, local_stack) == []
    assert await remains(local_stack, ns, db) == ALL
    assert path.exists()


async def test_a_reused_pid_does_not_keep_a_lease_alive(local_stack: StackUrls, state: Path) -> None:
    """Our own pid, but another start time: the process that took the lease is gone."""
    ns, db = new_namespace()
    await occupy(local_stack, ns, db)
    started = process_start(os.getpid())
    assert started is not None
    take(state, Lease(ns, os.getpid(), started - 1, local_stack, db))

    assert await sweep_stale(state, local_stack) == [ns]
    assert await remains(local_stack, ns, db) == NONE


async def test_a_lease_on_other_servers_waits_for_a_run_on_them(local_stack: StackUrls, state: Path) -> None:
    ns, db = new_namespace()
    pid, started = dead_pid()
    await occupy(local_stack, ns, db)
    elsewhere = replace(local_stack, amqp_url="amqp://guest:guest@127.0.0.1:1/")
    path = take(state, Lease(ns, pid, started, elsewhere, db))

    assert await sweep_stale(state, local_stack) == []
    assert path.exists()
    assert await remains(local_stack, ns, db) == ALL
    path.write_text(Lease(ns, pid, started, local_stack, db).to_json())  # for the fixture's clean-up


async def test_a_lease_that_cannot_be_swept_is_kept_for_the_next_run(local_stack: StackUrls, state: Path) -> None:
    ns, db = new_namespace()
    pid, started = dead_pid()
    unreachable = replace(local_stack, amqp_url="amqp://guest:guest@127.0.0.1:1/")
    path = take(state, Lease(ns, pid, started, unreachable, db))

    assert await sweep_stale(state, unreachable) == []
    assert path.exists()
    path.unlink()


async def test_an_unreadable_lease_is_dropped(local_stack: StackUrls, state: Path) -> None:
    path = state / namespaces.LEASES / "broken.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert await sweep_stale(state, local_stack) == []
    assert not path.exists()


async def test_leased_holds_the_lease_then_removes_everything(local_stack: StackUrls, state: Path) -> None:
    ns, db = new_namespace()
    async with leased(state, ns, local_stack, mongodb_db=db) as lease:
        assert lease.alive()
        assert namespaces.lease_path(state, ns).exists()
        await occupy(local_stack, ns, db)
    assert not namespaces.lease_path(state, ns).exists()
    assert await remains(local_stack, ns, db) == NONE


async def test_leased_sweeps_first(local_stack: StackUrls, state: Path) -> None:
    old, old_db = new_namespace()
    pid, started = dead_pid()
    await occupy(local_stack, old, old_db)
    take(state, Lease(old, pid, started, local_stack, old_db))
    ns, db = new_namespace()
    async with leased(state, ns, local_stack, mongodb_db=db):
        assert await remains(local_stack, old, old_db) == NONE


def test_the_test_session_holds_a_lease(request: pytest.FixtureRequest) -> None:
    """The session fixtures take one for the run's namespace, in the state directory the sweep reads."""
    isolation = request.getfixturevalue("isolation")
    request.getfixturevalue("namespace_lease")
    lease = Lease.from_json(namespaces.lease_path(STATE_DIR, isolation.namespace).read_text())
    assert lease.alive() and lease.mongodb_db == isolation.mongodb_db
    assert f"{isolation.namespace}-outages" in lease.derived
