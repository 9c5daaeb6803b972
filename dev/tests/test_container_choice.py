"""The session's choice between testcontainers and the local servers, when an engine answers but images do not."""

from __future__ import annotations

from typing import Any

import docker
import docker.errors
import pytest

from stemflow_dev import stack as stack_module


class _Images:
    def __init__(self, present: set[str], pullable: bool) -> None:
        self.present, self.pullable, self.pulled = present, pullable, []

    def get(self, image: str) -> object:
        if image not in self.present:
            raise docker.errors.ImageNotFound(image)
        return object()

    def pull(self, image: str) -> object:
        self.pulled.append(image)
        if not self.pullable:
            raise docker.errors.APIError("dial tcp: lookup registry-1.docker.io: no such host")
        self.present.add(image)
        return object()


class _Client:
    def __init__(self, images: _Images) -> None:
        self.images = images

    def close(self) -> None:
        pass


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Any:
    """An engine that answers, with the images a test gives it (the engine itself is not what is under test)."""

    def install(present: set[str], pullable: bool) -> _Images:
        images = _Images(present, pullable)
        monkeypatch.setattr(stack_module, "docker_available", lambda: True)
        monkeypatch.setattr(docker, "from_env", lambda **_: _Client(images))
        return images

    return install


def test_absent_images_that_cannot_be_pulled_mean_local_servers(engine):
    images = engine(present=set(), pullable=False)
    reason = stack_module.containers_unusable()
    assert reason is not None and "cannot be pulled" in reason and "no such host" in reason
    assert images.pulled == [stack_module.CONTAINER_IMAGES["rabbitmq"]]


def test_ryuk_image_is_needed_too(engine, monkeypatch):
    from testcontainers.core.config import testcontainers_config

    monkeypatch.setattr(testcontainers_config, "_ryuk_disabled", False)
    engine(present=set(stack_module.CONTAINER_IMAGES.values()), pullable=False)
    reason = stack_module.containers_unusable()
    assert reason is not None and testcontainers_config.ryuk_image in reason
    monkeypatch.setattr(testcontainers_config, "_ryuk_disabled", True)
    assert stack_module.containers_unusable() is None


def test_pullable_images_mean_containers(engine):
    images = engine(present=set(), pullable=True)
    assert stack_module.containers_unusable() is None
    assert set(stack_module.CONTAINER_IMAGES.values()) <= images.present


def test_no_engine_means_local_servers(monkeypatch):
    monkeypatch.setattr(stack_module, "docker_available", lambda: False)
    assert stack_module.containers_unusable() == "no Docker engine answers"
