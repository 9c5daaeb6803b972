"""The five services as local processes: their commands, ports and environment."""

from __future__ import annotations

import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from .procs import ServiceSpec
from .stack import StackUrls


@dataclass(frozen=True)
class Ports:
    gateway: int = 8000
    notifier: int = 8001
    ingest: int = 9101
    separator: int = 9102
    analyzer: int = 9103
    gateway_metrics: int = 9100  # the gateway serves /metrics here, not on its API port
    gateway_internal: int = 9200  # the gateway's internal API (the notifier's queries), not on its API port

    @classmethod
    def free(cls) -> Ports:
        """Unused ports, for tests that must not collide with a running dev stack."""
        return cls(*(_free_port() for _ in range(7)))

    def metrics(self, service: str) -> int:
        """The port that serves `service`'s /metrics."""
        return self.gateway_metrics if service == "gateway" else int(getattr(self, service))


def service_env(
    urls: StackUrls,
    *,
    namespace: str,
    mongodb_db: str,
    blob_dir: Path,
    model_repo: Path,
    ports: Ports,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment every service gets (each adds its own HTTP_PORT)."""
    env = {
        **urls.as_env(),
        "MONGODB_DB": mongodb_db,
        "STEMFLOW_NAMESPACE": namespace,
        "BLOB_BACKEND": "filesystem",
        "BLOB_DIR": str(blob_dir),
        "MODEL_REPO": str(model_repo),
        "PUBLIC_URL": f"http://127.0.0.1:{ports.gateway}",
        "EVENTS_URL": f"ws://127.0.0.1:{ports.notifier}/v1/ws",
        "METRICS_PORT": str(ports.gateway_metrics),
        "INTERNAL_PORT": str(ports.gateway_internal),
        "GATEWAY_INTERNAL_URL": f"http://127.0.0.1:{ports.gateway_internal}",
        "REPLICA_ID": "local",
        # Webhooks are signed with it (a fresh one per stack: nothing outside the machine checks them).
        "WEBHOOK_SECRET": secrets.token_urlsafe(32),
        # The notifier asks the gateway's internal API with it (a fresh one per stack, as the webhook secret).
        "INTERNAL_TOKEN": secrets.token_urlsafe(32),
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra or {})
    return env


def service_specs(env: dict[str, str], ports: Ports, python: str = sys.executable) -> list[ServiceSpec]:
    specs = []
    for name in ("gateway", "notifier", "ingest", "separator", "analyzer"):
        port = getattr(ports, name)
        specs.append(
            ServiceSpec(
                name=name,
                argv=[python, "-m", f"{name}.main"],
                env={**env, "HTTP_PORT": str(port)},
                ready_url=f"http://127.0.0.1:{port}/readyz",
            )
        )
    return specs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
