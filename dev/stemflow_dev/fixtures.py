"""Pytest fixtures for real RabbitMQ, MongoDB and Redis, isolated per test run.

Servers come from testcontainers when a Docker engine answers, otherwise from
the local stack mechanism (`stemflow_dev.stack`), which reuses running servers
or starts them. Each run gets its own namespace: exchange and queue prefix,
MongoDB database and Redis key prefix, removed at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from .namespaces import delete_namespace, delete_namespace_keys, leased
from .stack import StackUrls, containers_unusable, ensure_stack, start_containers

__all__ = ["delete_namespace", "delete_namespace_keys"]  # used by tests that make namespaces of their own

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("STEMFLOW_STATE_DIR", REPO_ROOT / ".stemflow"))


@dataclass(frozen=True)
class Isolation:
    namespace: str
    mongodb_db: str

    @property
    def redis_prefix(self) -> str:
        return f"{self.namespace}:"


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Iterator[StackUrls]:
    """URLs of live RabbitMQ, MongoDB and Redis servers, and a line saying where they come from.

    STEMFLOW_TEST_DOCKER: "auto" (default) takes testcontainers when an engine
    answers and their images are present or pullable, else the local servers;
    "1" insists on containers; "0" never tries them.
    """
    choice = os.environ.get("STEMFLOW_TEST_DOCKER", "auto")
    reason = "STEMFLOW_TEST_DOCKER=0" if choice == "0" else containers_unusable()
    if reason is None:
        try:
            urls, stop = start_containers()
        except Exception as exc:
            if choice == "1":
                raise
            reason = f"testcontainers failed to start: {str(exc).strip()[:300]}"
        else:
            _say(request, "test servers: testcontainers (RabbitMQ, MongoDB, Redis in Docker)")
            try:
                yield urls
            finally:
                stop()
            return
    if choice == "1":
        pytest.fail(f"STEMFLOW_TEST_DOCKER=1 but containers cannot be used: {reason}")
    _say(request, f"test servers: local (stemflow_dev.stack), not testcontainers: {reason}")
    yield ensure_stack(STATE_DIR)


def _say(request: pytest.FixtureRequest, line: str) -> None:
    """Write a line to the terminal even while pytest captures output, and to the log."""
    log.warning("%s", line)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line(line)


@pytest.fixture(scope="session")
def isolation() -> Isolation:
    ns = f"t{uuid.uuid4().hex[:10]}"
    return Isolation(namespace=ns, mongodb_db=f"stemflow_{ns}")


@pytest.fixture(scope="session")
def base_env(stack: StackUrls, isolation: Isolation, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment variables every service under test shares."""
    blob_dir = tmp_path_factory.mktemp("blobs")
    return {
        "AMQP_URL": stack.amqp_url,
        "MONGODB_URL": stack.mongodb_url,
        "MONGODB_DB": isolation.mongodb_db,
        "REDIS_URL": stack.redis_url,
        "STEMFLOW_NAMESPACE": isolation.namespace,
        "BLOB_BACKEND": "filesystem",
        "BLOB_DIR": str(blob_dir),
        "LOG_LEVEL": "INFO",
    }


@pytest_asyncio.fixture(scope="session")
async def namespace_lease(stack: StackUrls, isolation: Isolation) -> AsyncIterator[None]:
    """This run's lease on its namespace (see `stemflow_dev.namespaces`), taken after sweeping what killed runs
    left on these servers. The fixtures below remove what they made; the lease is given back after them."""
    async with leased(
        STATE_DIR,
        isolation.namespace,
        stack,
        mongodb_db=isolation.mongodb_db,
        derived=[f"{isolation.namespace}-{s}" for s in DERIVED_NAMESPACES],
        remove_at_end=False,
    ):
        yield


@pytest_asyncio.fixture(scope="session")
async def mongo_db(stack: StackUrls, isolation: Isolation, namespace_lease: None) -> AsyncIterator[object]:
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient = AsyncMongoClient(stack.mongodb_url, tz_aware=True)
    try:
        yield client[isolation.mongodb_db]
    finally:
        await client.drop_database(isolation.mongodb_db)
        await client.close()


@pytest_asyncio.fixture(scope="session")
async def redis_client(stack: StackUrls, isolation: Isolation, namespace_lease: None) -> AsyncIterator[object]:
    import redis.asyncio as redis

    client = redis.from_url(stack.redis_url)
    try:
        yield client
    finally:
        await delete_namespace_keys(client, isolation.namespace)
        await client.aclose()


# Suffixes of the namespaces tests derive from the run's own on the shared broker
# (`f"{isolation.namespace}-outages"`, ...): the session's clean-up removes them too.
DERIVED_NAMESPACES = ("outages", "ni", "nt", "gw", "img")


@pytest_asyncio.fixture(scope="session", autouse=False)
async def broker_cleanup(stack: StackUrls, isolation: Isolation, namespace_lease: None) -> AsyncIterator[None]:
    """Delete this run's exchanges and queues at the end of the session (derived namespaces included)."""
    yield
    for namespace in (isolation.namespace, *(f"{isolation.namespace}-{s}" for s in DERIVED_NAMESPACES)):
        await delete_namespace(stack.amqp_url, namespace)


SERVING_REPLICA = "tests"


async def announce_models(
    redis_client: Any, namespace: str, names: list[str] | None = None, ttl_s: float = 3600
) -> None:
    """Announce `names` (default: every model) in `namespace` as a separator pool would, for a gateway that runs
    without separators: otherwise it refuses every submission with 422 model_unavailable."""
    from stemflow_shared.separators import CATALOGUE, Announcement, SeparatorRegistry, ServedModel

    served = [ServedModel(name=n, sources=CATALOGUE[n].sources) for n in names or list(CATALOGUE)]
    announcement = Announcement(replica=SERVING_REPLICA, models=served, slots=2, mean_job_s=4.0)
    await SeparatorRegistry(redis_client, f"{namespace}:").announce(announcement, ttl_s=ttl_s)
