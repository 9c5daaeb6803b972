"""The service images as containers, against real RabbitMQ, MongoDB and Redis.

Skipped unless a Docker engine answers and `make images` has built the five
images. The containers use the host's network, so the servers the session
fixtures chose (testcontainers or the local ones) are reachable from them as
from the host; each runs as the manifests run it: read-only root with a
private /tmp, uid 10001, no capabilities, the manifests' CPU and memory limits.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from stemflow_dev.client import StemflowClient
from stemflow_dev.fixtures import Isolation
from stemflow_dev.images import SERVICES, tag
from stemflow_dev.models import make_tiny_repo
from stemflow_dev.services import Ports, service_env
from stemflow_dev.stack import StackUrls, docker_available

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose" / "compose.yaml"
ARTIFACTS = REPO / "test-artifacts" / "images"
BLOBS, MODELS = "/var/lib/stemflow/blobs", "/var/lib/stemflow/models"
NAMESPACE_SUFFIX = "img"  # stemflow_dev.fixtures.DERIVED_NAMESPACES removes it at the end


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "images: runs the service images as containers (make images, then a engine)")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    if os.environ.get("STEMFLOW_TEST_DOCKER") == "0" or not docker_available():
        pytest.skip("no Docker engine answers (or STEMFLOW_TEST_DOCKER=0)")
    import docker

    client = docker.from_env(timeout=120)
    missing = [tag(s) for s in SERVICES if not _has_image(client, tag(s))]
    if missing:
        client.close()
        pytest.skip(f"images not built ({', '.join(missing)}): make images")
    yield client
    client.close()


@dataclass
class Containers:
    """The five service containers, and how to start one again."""

    client: Any
    ports: Ports
    env: dict[str, str]
    mounts: dict[str, dict[str, str]]
    running: dict[str, Any] = field(default_factory=dict)
    ready_s: dict[str, float] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    @property
    def events_url(self) -> str:
        return f"ws://127.0.0.1:{self.ports.notifier}/v1/ws"

    def start(self, service: str) -> Any:
        limits = _compose_limits(service)
        port = getattr(self.ports, service)
        container = self.client.containers.run(
            tag(service),
            name=f"stemflow-test-{self.env['STEMFLOW_NAMESPACE']}-{service}-{int(time.monotonic() * 1000)}",
            detach=True,
            network_mode="host",
            environment={**self.env, "HTTP_PORT": str(port), "OTEL_SERVICE_NAME": service},
            read_only=True,
            user="10001:10001",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            tmpfs={"/tmp": "size=1g"},
            volumes=self.mounts,
            # The manifests' limits; CPUs capped at this machine's, which the engine refuses to exceed.
            nano_cpus=int(min(float(limits["cpus"]), os.cpu_count() or 1) * 1e9),
            mem_limit=limits["memory"].lower(),
            labels={"org.stemflow.test": "images"},
        )
        self.running[service] = container
        return container

    def wait_ready(self, service: str, started: float, timeout_s: float = 240) -> float:
        """Seconds from `started` until /readyz answers 200; fails with the container's log otherwise."""
        url = f"http://127.0.0.1:{getattr(self.ports, service)}/readyz"
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
            container = self.running[service]
            container.reload()
            if container.status == "exited":
                pytest.fail(f"{service} exited: {container.logs(tail=40).decode(errors='replace')}")
            time.sleep(0.2)  # another process: only its HTTP endpoint to poll
        pytest.fail(f"{service} not ready in {timeout_s} s: {self.running[service].logs(tail=40).decode()}")

    def save_logs(self, service: str, container: Any) -> None:
        (ARTIFACTS / "logs").mkdir(parents=True, exist_ok=True)
        with open(ARTIFACTS / "logs" / f"{service}.log", "ab") as log:
            log.write(container.logs())


@pytest.fixture(scope="session")
def containers(
    docker_client: Any,
    stack: StackUrls,
    isolation: Isolation,
    tmp_path_factory: pytest.TempPathFactory,
    broker_cleanup: None,
) -> Iterator[Containers]:
    blobs = tmp_path_factory.mktemp("image-blobs")
    blobs.chmod(0o777)  # written by the containers' uid 10001
    models = make_tiny_repo(tmp_path_factory.mktemp("image-models"))
    for path in (models, *models.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    ports = Ports.free()
    env = service_env(
        stack,
        namespace=f"{isolation.namespace}-{NAMESPACE_SUFFIX}",
        mongodb_db=f"{isolation.mongodb_db}_{NAMESPACE_SUFFIX}",
        blob_dir=Path(BLOBS),
        model_repo=Path(MODELS),
        ports=ports,
        extra={"MODELS": "htdemucs", "TORCH_THREADS": "1", "WORKERS": "1", "RATE_LIMIT_PER_MINUTE": "100000"},
    )
    mounts = {str(blobs): {"bind": BLOBS, "mode": "rw"}, str(models): {"bind": MODELS, "mode": "ro"}}
    system = Containers(docker_client, ports, env, mounts)
    try:
        started = {}
        for service in SERVICES:
            started[service] = time.monotonic()
            system.start(service)
        for service in SERVICES:
            system.ready_s[service] = system.wait_ready(service, started[service])
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "startup.json").write_text(json.dumps(system.ready_s, indent=2) + "\n")
        print("seconds from container start to /readyz:", {s: round(t, 1) for s, t in system.ready_s.items()})
        yield system
        # Again at the end, with the separator's restart in the SIGTERM test.
        (ARTIFACTS / "startup.json").write_text(json.dumps(system.ready_s, indent=2) + "\n")
    finally:
        for service, container in system.running.items():
            with contextlib.suppress(Exception):
                container.stop(timeout=30)
                system.save_logs(service, container)
            with contextlib.suppress(Exception):
                container.remove(force=True)


@pytest_asyncio.fixture(scope="session")
async def image_client(containers: Containers, stack: StackUrls) -> AsyncIterator[StemflowClient]:
    from pymongo import AsyncMongoClient

    from stemflow_shared.auth import ApiKeys

    mongo: AsyncMongoClient[Any] = AsyncMongoClient(stack.mongodb_url, tz_aware=True)
    database = mongo[containers.env["MONGODB_DB"]]
    key = await ApiKeys(database).create("images")
    client = StemflowClient(containers.gateway_url, containers.events_url, key)
    try:
        yield client
    finally:
        await client.aclose()
        await mongo.drop_database(database.name)
        await mongo.close()


def _has_image(client: Any, image: str) -> bool:
    import docker.errors

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return False
    return True


def _compose_limits(service: str) -> dict[str, str]:
    """The service's CPU and memory limits in compose.yaml, which tests/deploy holds equal to the manifests'."""
    compose = yaml.safe_load(COMPOSE.read_text())
    return {k: str(v) for k, v in compose["services"][service]["deploy"]["resources"]["limits"].items()}
