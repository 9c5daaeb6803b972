"""deploy/compose against deploy/k8s/base: the same images, settings, secrets, probes and limits, so they cannot drift."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "compose"
# What Compose sets on top of the base manifests, and why.
COMPOSE_ONLY = {
    "gateway": {"PUBLIC_URL", "EVENTS_URL"},  # the prod overlay sets them for its ingress
    # The prod overlay mounts its models volume the same way; its GPU pools run torch, which exports nothing, and
    # the base's CPU pods fetch their models into their own /tmp, where the exports go beside them.
    "separator": {"MODEL_REPO", "EXPORT_CACHE_DIR"},
}
SERVERS = {"rabbitmq": "rabbitmq", "mongodb": "mongo", "redis": "redis"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def gpu_override() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "compose.gpu.yaml").read_text())


@pytest.fixture(scope="module")
def workloads(render) -> dict[str, dict[str, Any]]:
    """The base's Deployments and StatefulSets, by name."""
    return {d["metadata"]["name"]: d for d in render("base") if d["kind"] in ("Deployment", "StatefulSet")}


@pytest.fixture(scope="module")
def config_maps(render) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["data"] for d in render("base") if d["kind"] == "ConfigMap"}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]["containers"][0]


def image_name(image: str) -> str:
    """The repository of an image reference, without its tag (Compose interpolates the version)."""
    return image.partition(":")[0]


def test_services_run_the_manifests_images(compose, workloads, service):
    assert image_name(compose["services"][service]["image"]) == container(workloads[service])["image"]
    assert compose["services"][service]["image"].endswith(":${STEMFLOW_VERSION:-0.1.0}")


def test_servers_are_the_versions_the_manifests_run(compose, render):
    redis = next(d for d in render("base") if d["kind"] == "Deployment" and d["metadata"]["name"] == "redis")
    assert compose["services"]["redis"]["image"] == container(redis)["image"]
    (rabbitmq,) = [d for d in render("base") if d["kind"] == "RabbitmqCluster"]
    assert compose["services"]["rabbitmq"]["image"] == rabbitmq["spec"]["image"]
    (mongodb,) = [d for d in render("base") if d["kind"] == "MongoDBCommunity"]
    assert compose["services"]["mongodb"]["image"] == f"mongo:{mongodb['spec']['version']}"


def test_settings_are_the_config_maps(compose, config_maps, service):
    environment = compose["services"][service]["environment"]
    plain = {k: v for k, v in environment.items() if not _secret(v)}
    expected = {**config_maps[service]}
    if service == "notifier":
        expected["REPLICA_ID"] = plain["REPLICA_ID"]  # the pod's name in Kubernetes
    assert {k: v for k, v in plain.items() if k not in COMPOSE_ONLY.get(service, set())} == expected


def test_the_separators_exports_outlive_its_container_on_a_writable_volume(compose):
    separator = compose["services"]["separator"]
    mounts = {m.split(":")[1]: m for m in separator["volumes"]}
    exports = separator["environment"]["EXPORT_CACHE_DIR"]
    assert mounts[exports] == f"exports:{exports}"  # a named volume, not read-only (the models one is)
    assert mounts[separator["environment"]["MODEL_REPO"]].endswith(":ro")
    assert "exports" in compose["volumes"]
    dockerfile = (Path(__file__).resolve().parents[2] / "services/separator/Dockerfile").read_text()
    assert dockerfile.count(f"chown 10001:10001 /var/lib/stemflow/blobs /var/lib/stemflow/models {exports}") == 2


def test_secrets_are_the_ones_the_manifests_read(compose, workloads, service):
    from_secrets = {
        e["name"] for e in container(workloads[service]).get("env", []) if "secretKeyRef" in e.get("valueFrom", {})
    }
    environment = compose["services"][service]["environment"]
    assert {k for k, v in environment.items() if _secret(v)} == from_secrets


def test_health_checks_are_the_readiness_probes(compose, workloads, service, ports):
    probe = container(workloads[service])["readinessProbe"]["httpGet"]
    (test,) = [part for part in compose["services"][service]["healthcheck"]["test"] if "urlopen" in part]
    assert f"http://127.0.0.1:{ports[service]}{probe['path']}" in test
    assert compose["services"][service]["environment"]["HTTP_PORT"] == str(ports[service])


def test_metrics_are_published_where_prometheus_scrapes_them(compose, workloads, service):
    port = workloads[service]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
    assert any(str(p).endswith(f":{port}:{port}") for p in compose["services"][service]["ports"])


def test_limits_security_and_grace_are_the_manifests(compose, workloads, service):
    spec = workloads[service]["spec"]["template"]["spec"]
    limits = container(workloads[service])["resources"]["limits"]
    ours = compose["services"][service]
    assert ours["deploy"]["resources"]["limits"] == {
        "cpus": str(_cpus(limits["cpu"])),
        "memory": limits["memory"].replace("Gi", "G").replace("Mi", "M"),
    }
    assert ours["user"] == f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}"
    assert ours["read_only"] is container(workloads[service])["securityContext"]["readOnlyRootFilesystem"] is True
    assert ours["cap_drop"] == ["ALL"]
    assert ours["stop_grace_period"] == f"{spec['terminationGracePeriodSeconds']}s"
    assert any(mount.startswith("/tmp") for mount in ours["tmpfs"])


def test_services_wait_for_healthy_servers(compose, service):
    depends_on = compose["services"][service]["depends_on"]
    assert {name: d["condition"] for name, d in depends_on.items()} == dict.fromkeys(SERVERS, "service_healthy")
    for server in SERVERS:
        assert compose["services"][server]["healthcheck"]["test"]


def test_databases_and_blobs_live_on_named_volumes(compose):
    assert {"blobs", "models", "rabbitmq-data", "mongodb-data"} <= set(compose["volumes"])
    assert "rabbitmq-data:/var/lib/rabbitmq" in compose["services"]["rabbitmq"]["volumes"]
    assert "mongodb-data:/data/db" in compose["services"]["mongodb"]["volumes"]
    assert "--replSet" in compose["services"]["mongodb"]["command"]


def test_gpu_override_reserves_a_device_for_the_separator_only(gpu_override):
    assert set(gpu_override["services"]) == {"separator"}
    (device,) = gpu_override["services"]["separator"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert gpu_override["services"]["separator"]["image"] == "stemflow/separator:${STEMFLOW_VERSION:-0.1.0}-cuda"


def test_env_example_names_every_secret_the_compose_file_reads(compose):
    names = set(re.findall(r"\$\{(\w+):\?", (COMPOSE_DIR / "compose.yaml").read_text()))
    example = {line.split("=", 1)[0] for line in (COMPOSE_DIR / "env.example").read_text().splitlines() if "=" in line}
    assert names <= example and names


def test_docker_compose_accepts_the_files(tmp_path):
    """`docker compose config` (or the older docker-compose, which predates the top-level `name`)."""
    (tmp_path / ".env").write_text("RABBITMQ_PASSWORD=a\nREDIS_PASSWORD=b\nWEBHOOK_SECRET=c\nINTERNAL_TOKEN=d\n")
    for name in ("compose.yaml", "compose.gpu.yaml", "download-models.py"):
        shutil.copy(COMPOSE_DIR / name, tmp_path / name)
    if _has_compose_v2():
        command = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        command = ["docker-compose"]
        text = (tmp_path / "compose.yaml").read_text()
        (tmp_path / "compose.yaml").write_text(re.sub(r"(?m)^name: .*\n", "", text))
    else:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    result = subprocess.run(
        [*command, "-f", "compose.yaml", "-f", "compose.gpu.yaml", "config", "-q"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _secret(value: object) -> bool:
    """A value from `.env` that must be set (`${NAME:?...}`), or the MongoDB URL: Kubernetes reads both from Secrets."""
    return ":?" in str(value) or str(value).startswith("mongodb://")


def _has_compose_v2() -> bool:
    return (
        bool(shutil.which("docker"))
        and subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0
    )


def _cpus(quantity: str) -> str | float:
    if quantity.endswith("m"):
        return int(quantity[:-1]) / 1000
    return quantity
