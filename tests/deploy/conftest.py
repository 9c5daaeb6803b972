"""Fixtures for the offline deployment checks: the services, and the manifests as kustomize renders them."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
SERVICES = ("gateway", "ingest", "separator", "analyzer", "notifier")
PORTS = {"gateway": 8000, "notifier": 8001, "ingest": 9101, "separator": 9102, "analyzer": 9103}
TARGETS = ("base", "overlays/dev", "overlays/prod")


def _renderer() -> list[str]:
    """The command that renders a kustomization directory: kubectl's kustomize, else a standalone kustomize."""
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    pytest.skip("neither kubectl nor kustomize is installed; one of them renders the kustomizations")


def _build(directory: Path, what: str) -> tuple[dict[str, Any], ...]:
    command = _renderer()
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        version = subprocess.run([command[0], "version", "--client"], capture_output=True, text=True, check=False)
        pytest.fail(
            f"rendering {what} failed; these kustomizations need kubectl >= 1.22 "
            f"(kustomize >= 4.1: labels, components), this is:\n{version.stdout}{version.stderr}\n{result.stderr}"
        )
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@functools.cache
def _render(target: str) -> tuple[dict[str, Any], ...]:
    return _build(K8S / target, target)


@functools.cache
def _render_with(target: str, components: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    """A kustomization (e.g. "overlays/prod") with more components on top, as an overlay of one's own would add them."""
    with tempfile.TemporaryDirectory() as tmp:
        # kustomize takes only relative paths to other kustomizations.
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(K8S / target, tmp)],
            "components": [os.path.relpath(K8S / component, tmp) for component in components],
        }
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return _build(Path(tmp), f"{target} with {', '.join(components)}")


@pytest.fixture(scope="session")
def render() -> Callable[[str], tuple[dict[str, Any], ...]]:
    """Render a kustomization under deploy/k8s ("base", "overlays/dev", ...) into its objects."""
    return _render


@pytest.fixture(scope="session")
def render_with() -> Callable[[str, tuple[str, ...]], tuple[dict[str, Any], ...]]:
    """Render a kustomization with extra components ("components/gridfs-blobs", ...) on top."""
    return _render_with


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=SERVICES)
def service(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def services() -> tuple[str, ...]:
    return SERVICES


@pytest.fixture(scope="session")
def ports() -> dict[str, int]:
    return PORTS


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
