"""The whole system as five real processes on real RabbitMQ, MongoDB and Redis.

The servers come from the shared fixtures (`stemflow_dev.fixtures`: testcontainers
when a Docker engine answers, otherwise the local stack); the services run on
free ports in this run's own namespace, with tiny untrained demucs models.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from stemflow_dev.client import EventWatch, StemflowClient
from stemflow_dev.fixtures import Isolation
from stemflow_dev.models import make_tiny_repo
from stemflow_dev.procs import ProcessGroup
from stemflow_dev.services import Ports, service_env, service_specs
from stemflow_dev.stack import StackUrls
from stemflow_shared.auth import ApiKeys

pytestmark = pytest.mark.integration
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "integration"


@dataclass
class RunningSystem:
    ports: Ports
    processes: ProcessGroup
    env: dict[str, str]

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    @property
    def events_url(self) -> str:
        return f"ws://127.0.0.1:{self.ports.notifier}/v1/ws"


@pytest.fixture(scope="session")
def system(
    stack: StackUrls, isolation: Isolation, tmp_path_factory: pytest.TempPathFactory, broker_cleanup: None
) -> Iterator[RunningSystem]:
    models = make_tiny_repo(tmp_path_factory.mktemp("models"))
    ports = Ports.free()
    env = service_env(
        stack,
        namespace=isolation.namespace,
        mongodb_db=isolation.mongodb_db,
        blob_dir=tmp_path_factory.mktemp("blobs"),
        model_repo=models,
        ports=ports,
        # The suite shares one API key across many tests (the API fuzzer alone sends hundreds of requests):
        # the per-key limit is tested on its own (services/gateway/tests), not here.
        extra={"MODELS": "htdemucs", "TORCH_THREADS": "1", "LOG_LEVEL": "INFO", "RATE_LIMIT_PER_MINUTE": "100000"},
    )
    group = ProcessGroup()
    group.start(service_specs(env, ports), ARTIFACTS / "logs")
    try:
        group.wait_ready(timeout=240)
        yield RunningSystem(ports, group, env)
    finally:
        group.stop()
    # At the end of the session, after every test that used the system: no secret reached a log line.
    assert_no_secrets_in_logs(ARTIFACTS / "logs")


def assert_no_secrets_in_logs(folder: Path) -> None:
    logs = {path.name: path.read_text(errors="replace") for path in folder.glob("*.log")}
    assert set(logs) >= {"gateway.log", "notifier.log", "ingest.log", "separator.log", "analyzer.log"}
    assert sum(len(text) for text in logs.values()) > 1000
    for name, text in logs.items():
        assert not re.search(r"sfk_[A-Za-z0-9_-]{20,}", text), f"an API key is in {name}"
        # A password shown as asterisks (telemetry.redact's work) is no secret.
        assert not re.search(r"://[^/\s:@]+:(?!\*+@)[^/\s@]+@", text), f"a URL with credentials is in {name}"


@pytest_asyncio.fixture(scope="session")
async def api_key(system: RunningSystem, mongo_db: object) -> str:
    return await ApiKeys(mongo_db).create("integration")


@pytest_asyncio.fixture
async def client(system: RunningSystem, api_key: str) -> AsyncIterator[StemflowClient]:
    client = StemflowClient(system.gateway_url, system.events_url, api_key)
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def all_events(system: RunningSystem, api_key: str) -> AsyncIterator[EventWatch]:
    """Every event the notifier pushes for the integration key's jobs, from before the test acts."""
    watcher = EventWatch()
    task = asyncio.create_task(watcher.run(system.events_url, api_key))
    await asyncio.wait_for(watcher.subscribed.wait(), 30)  # subscribed before the test acts
    yield watcher
    task.cancel()
