"""Namespaces on shared servers, and leases that let the next run sweep what a killed run left behind.

A test session declares its exchanges and queues on a long-lived RabbitMQ (durable quorum queues: they stay
until deleted), a MongoDB database and Redis keys, all under its namespace, and removes them when it ends. A
run that is killed first (a timeout, Ctrl-C twice, an OOM kill) removes nothing, and a broker that has
gathered hundreds of such queues slows down and can stop answering handshakes.

So a run takes a lease first: `<state dir>/namespaces/<namespace>.json` names its process (pid and start
time, so a reused pid is not mistaken for it), the servers, its database and the namespaces it derives from
its own. It gives the lease back once its clean-up is done. A lease whose process is gone is stale:
`sweep_stale` removes what it names on the same servers, then the lease.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .stack import StackUrls

log = logging.getLogger(__name__)

LEASES = "namespaces"


async def delete_namespace(amqp_url: str, namespace: str) -> None:
    """Remove every exchange and queue a namespace declared (queue names from the topology)."""
    import aio_pika

    from stemflow_shared.topology import ALL_QUEUES, Names

    names = Names(namespace)
    connection = await aio_pika.connect(amqp_url, timeout=30)
    try:
        queues = [names.queue(q) for q in ALL_QUEUES if not q.per_replica]
        queues += [names.dead_letter_queue, names.dead_letter_watch_queue]
        for queue in queues:
            channel = await connection.channel()
            try:
                await channel.queue_delete(queue)
            except Exception:
                pass
        for exchange in (names.work_exchange, names.exchange, names.dead_letter_exchange):
            channel = await connection.channel()
            try:
                await channel.exchange_delete(exchange)
            except Exception:
                pass
    finally:
        await connection.close()


async def delete_namespace_keys(client: Any, namespace: str) -> None:
    """Remove every Redis key a namespace's services wrote (`<namespace>:...`)."""
    keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
    for start in range(0, len(keys), 500):
        await client.delete(*keys[start : start + 500])


def process_start(pid: int) -> int | None:
    """The process' start time in clock ticks since boot (/proc/<pid>/stat field 22); None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[19])


@dataclass(frozen=True)
class Lease:
    namespace: str
    pid: int
    started: int | None
    urls: StackUrls
    mongodb_db: str | None = None
    derived: tuple[str, ...] = field(default_factory=tuple)

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.namespace, *self.derived)

    def alive(self) -> bool:
        return self.started is not None and process_start(self.pid) == self.started

    def to_json(self) -> str:
        data = asdict(self)
        data["urls"] = asdict(self.urls)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Lease:
        data = json.loads(text)
        return cls(
            namespace=data["namespace"],
            pid=int(data["pid"]),
            started=data.get("started"),
            urls=StackUrls(**data["urls"]),
            mongodb_db=data.get("mongodb_db"),
            derived=tuple(data.get("derived") or ()),
        )


def lease_path(state_dir: Path, namespace: str) -> Path:
    return state_dir / LEASES / f"{namespace}.json"


def take(state_dir: Path, lease: Lease) -> Path:
    """Write the lease (atomically: a sweep never reads half of one)."""
    path = lease_path(state_dir, lease.namespace)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(f".{os.getpid()}.tmp")
    temp.write_text(lease.to_json())
    temp.replace(path)
    return path


def stale(state_dir: Path) -> list[tuple[Path, Lease]]:
    """The leases whose process is gone (unreadable ones included, as leases of nobody)."""
    found: list[tuple[Path, Lease]] = []
    for path in sorted((state_dir / LEASES).glob("*.json")):
        try:
            lease = Lease.from_json(path.read_text())
        except FileNotFoundError:
            continue  # given back meanwhile
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("removing unreadable namespace lease %s: %s", path, exc)
            path.unlink(missing_ok=True)
            continue
        if not lease.alive():
            found.append((path, lease))
    return found


async def remove(lease: Lease) -> None:
    """Remove everything the lease names: exchanges and queues, Redis keys, the MongoDB database."""
    import redis.asyncio as redis
    from pymongo import AsyncMongoClient

    for namespace in lease.namespaces:
        await delete_namespace(lease.urls.amqp_url, namespace)
    client = redis.from_url(lease.urls.redis_url)
    try:
        for namespace in lease.namespaces:
            await delete_namespace_keys(client, namespace)
    finally:
        await client.aclose()
    if lease.mongodb_db:
        mongo: AsyncMongoClient = AsyncMongoClient(lease.urls.mongodb_url, serverSelectionTimeoutMS=10_000)
        try:
            await mongo.drop_database(lease.mongodb_db)
        finally:
            await mongo.close()


async def sweep_stale(state_dir: Path, urls: StackUrls) -> list[str]:
    """Remove what stale leases on these servers name, then the leases; the namespaces swept.

    A lease on other servers (say, testcontainers that are gone) is left for a run on those servers. A
    failure leaves the lease for the next sweep and does not stop this run."""
    swept: list[str] = []
    for path, lease in stale(state_dir):
        if lease.urls != urls:
            continue
        try:
            await remove(lease)
        except Exception as exc:
            log.warning("could not sweep namespace %s (kept for the next run): %s", lease.namespace, exc)
            continue
        path.unlink(missing_ok=True)
        swept.append(lease.namespace)
    if swept:
        log.info("swept %d namespaces left by killed runs: %s", len(swept), ", ".join(swept))
    return swept


@contextlib.asynccontextmanager
async def leased(
    state_dir: Path,
    namespace: str,
    urls: StackUrls,
    *,
    mongodb_db: str | None = None,
    derived: Iterable[str] = (),
    remove_at_end: bool = True,
) -> AsyncIterator[Lease]:
    """Sweep stale leases, hold one for `namespace` while the block runs, then remove what it names and give
    the lease back (with `remove_at_end=False` the caller has removed it all by then). A removal that fails
    keeps the lease, so the next run's sweep tries again."""
    await sweep_stale(state_dir, urls)
    pid = os.getpid()
    lease = Lease(namespace, pid, process_start(pid), urls, mongodb_db, tuple(derived))
    path = take(state_dir, lease)
    removed = not remove_at_end
    try:
        yield lease
    finally:
        if remove_at_end:
            try:
                await remove(lease)
                removed = True
            except Exception as exc:
                log.warning("could not remove namespace %s (kept for the next sweep): %s", namespace, exc)
        if removed:
            path.unlink(missing_ok=True)
