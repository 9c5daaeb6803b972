"""The five service images, built from the repository root, and stand-in base images where none can be pulled.

    python -m stemflow_dev.images base            # python:3.11-slim-bookworm: present, pulled, or a stand-in
    python -m stemflow_dev.images build [NAME...] [--source REV]  # stemflow/<service>:<version>, sizes
    python -m stemflow_dev.images sizes
    python -m stemflow_dev.images startup [NAME...]  # seconds to /readyz, one container at a time

The stand-in exists for machines that reach Debian's and PyPI's mirrors but no
container registry. It is made from Debian's own packages (`debootstrap
--variant=minbase bookworm`, `docker import`, then Debian's python3.11 with a
venv at /usr/local so that `python` and `pip` behave as in the official image),
is tagged with the official name so the Dockerfiles need no change, trusts the
host's CA bundle (package downloads may pass a TLS-inspecting proxy) and
carries the label `org.stemflow.stand-in=true`. It is never made where the
official image is present or can be pulled. It is larger than the official
image, so sizes are reported as what each service adds above its base.

The separator's CPU target takes torch from TORCH_CPU_INDEX: by default the
PyTorch CPU index; where a torch CPU wheel lies in pip's find-links folders
(`pip config list`), that folder is served here as a local index instead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "ingest", "separator", "analyzer", "notifier")
PYTHON_IMAGE = "python:3.11-slim-bookworm"
DEBIAN_IMAGE = "stemflow-standin/debian:bookworm-minbase"
STAND_IN_LABEL = "org.stemflow.stand-in"
FRONTEND_IMAGE = "docker/dockerfile:1"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY = "http://deb.debian.org/debian-security"

STAND_IN_DOCKERFILE = f"""\
# A stand-in for {PYTHON_IMAGE}, made from Debian's packages where no registry answers.
FROM {DEBIAN_IMAGE}
ENV LANG=C.UTF-8 \\
    PYTHON_VERSION=3.11
COPY host-ca/ /usr/local/share/ca-certificates/host/
COPY pip.conf /etc/pip.conf
RUN apt-get update \\
    && apt-get install --yes --no-install-recommends ca-certificates passwd python3.11 python3.11-venv \\
    && update-ca-certificates \\
    && python3.11 -m venv /usr/local \\
    && /usr/local/bin/python -m pip install --no-cache-dir --upgrade pip \\
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
LABEL {STAND_IN_LABEL}=true \\
      org.opencontainers.image.description="Stand-in for {PYTHON_IMAGE}: Debian bookworm minbase, Debian's python3.11, venv at /usr/local"
CMD ["python3"]
"""


@dataclass(frozen=True)
class Built:
    service: str
    tag: str
    seconds: float


# --- the docker client -----------------------------------------------------------


@functools.cache
def docker_cli() -> str:
    """A docker client that can build with BuildKit: one with buildx, or one older than 23 (BuildKit built in)."""
    candidates = [os.environ.get("DOCKER", ""), shutil.which("docker") or "", "/usr/bin/docker"]
    for candidate in dict.fromkeys(c for c in candidates if c and os.access(c, os.X_OK)):
        if _ok([candidate, "buildx", "version"]):
            return candidate
        version = _output([candidate, "version", "--format", "{{.Client.Version}}"])
        if version and int(version.split(".")[0]) < 23:
            return candidate
    raise SystemExit("no docker client that can build with BuildKit (install docker-buildx, or Debian's docker.io)")


def docker(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    return subprocess.run([docker_cli(), *args], env=env, text=True, check=True, **kwargs)  # type: ignore[call-overload]


def image_present(image: str) -> bool:
    return _ok([docker_cli(), "image", "inspect", image])


def image_size(image: str) -> int:
    return int(_output([docker_cli(), "image", "inspect", "--format", "{{.Size}}", image]) or 0)


def is_stand_in(image: str) -> bool:
    label = _output(
        [docker_cli(), "image", "inspect", "--format", f'{{{{index .Config.Labels "{STAND_IN_LABEL}"}}}}', image]
    )
    return label == "true"


def can_have(image: str) -> bool:
    """Present, or pulled now."""
    return image_present(image) or _ok([docker_cli(), "pull", "--quiet", image])


# --- the base image ------------------------------------------------------------


def ensure_base() -> str:
    """Make sure PYTHON_IMAGE exists: the official one when it is present or can be pulled, else the stand-in."""
    if image_present(PYTHON_IMAGE):
        kind = "a STAND-IN (made from Debian packages)" if is_stand_in(PYTHON_IMAGE) else "the official image"
        print(f"{PYTHON_IMAGE}: present, {kind}")
        return PYTHON_IMAGE
    if _ok([docker_cli(), "pull", "--quiet", PYTHON_IMAGE]):
        print(f"{PYTHON_IMAGE}: pulled")
        return PYTHON_IMAGE
    print(f"{PYTHON_IMAGE} cannot be pulled: making a STAND-IN from Debian's packages")
    if not image_present(DEBIAN_IMAGE):
        import_debian()
    with tempfile.TemporaryDirectory(prefix="stemflow-standin-") as tmp:
        context = Path(tmp)
        (context / "Dockerfile").write_text(STAND_IN_DOCKERFILE)
        (context / "pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
        host_certificates(context / "host-ca")
        docker("build", "--network", "host", "--tag", PYTHON_IMAGE, str(context))
    print(f"{PYTHON_IMAGE}: STAND-IN built, {image_size(PYTHON_IMAGE) / 1e6:.0f} MB")
    return PYTHON_IMAGE


def import_debian() -> None:
    """Debian bookworm minbase, from debootstrap, imported as DEBIAN_IMAGE (apt sources as in Debian's images)."""
    if shutil.which("debootstrap", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") is None:
        raise SystemExit("debootstrap is not installed: apt-get install debootstrap")
    with tempfile.TemporaryDirectory(prefix="stemflow-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        print(f"debootstrap --variant=minbase bookworm from {DEBIAN_MIRROR} (a few minutes)")
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR], check=True)
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(
            f"Types: deb\nURIs: {DEBIAN_MIRROR}\nSuites: bookworm bookworm-updates\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
            f"Types: deb\nURIs: {DEBIAN_SECURITY}\nSuites: bookworm-security\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / cache).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        docker("import", "--change", 'CMD ["bash"]', "-", DEBIAN_IMAGE, stdin=tar.stdout)
        if tar.wait() != 0:
            raise SystemExit("tar of the debootstrap root failed")


def host_certificates(directory: Path) -> None:
    """The host's CA bundle, one certificate a file, for update-ca-certificates in the stand-in."""
    bundle = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
    directory.mkdir()
    pems = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", bundle.read_text(), re.DOTALL)
    for number, pem in enumerate(pems):
        (directory / f"host-{number:03d}.crt").write_text(pem + "\n")


# --- the service images --------------------------------------------------------


def version(service: str) -> str:
    with open(REPO_ROOT / "services" / service / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def tag(service: str) -> str:
    return f"stemflow/{service}:{version(service)}"


def build(services: list[str], *, cuda: bool = False, source: str | None = None) -> list[Built]:
    """Build from the working tree, or from a commit (`source`, e.g. HEAD) exported with git archive."""
    ensure_base()
    strip_syntax = not can_have(FRONTEND_IMAGE)
    if strip_syntax:
        print(f"the BuildKit frontend {FRONTEND_IMAGE} cannot be pulled: building with the built-in one")
    built = []
    with torch_cpu_index() as torch_index, _context(source) as context:
        for service in services:
            extra = ["--target", "cpu", *torch_index] if service == "separator" else []
            built.append(_build_one(context, service, tag(service), extra, strip_syntax))
            if service == "separator" and cuda:
                cuda_tag = f"{tag(service)}-cuda"
                built.append(_build_one(context, service, cuda_tag, ["--target", "cuda"], strip_syntax))
    return built


@contextlib.contextmanager
def _context(source: str | None) -> Iterator[Path]:
    if source is None:
        yield REPO_ROOT
        return
    with tempfile.TemporaryDirectory(prefix="stemflow-context-") as tmp:
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", source], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        print(f"building from {source} ({_output(['git', '-C', str(REPO_ROOT), 'rev-parse', '--short', source])})")
        yield Path(tmp)


def _build_one(context: Path, service: str, image: str, extra: list[str], strip_syntax: bool) -> Built:
    dockerfile = context / "services" / service / "Dockerfile"
    text = dockerfile.read_text()
    if strip_syntax:
        text = re.sub(r"\A# syntax=.*\n", "", text)
    print(f"--- building {image}", flush=True)
    started = time.monotonic()
    # fmt: off
    docker(
        "build", "--network", "host", "--file", "-", "--tag", image, "--tag", f"stemflow/{service}:latest",
        "--label", f"org.opencontainers.image.version={version(service)}", *extra, str(context),
        input=text,
    )
    # fmt: on
    return Built(service, image, time.monotonic() - started)


@contextlib.contextmanager
def torch_cpu_index() -> Iterator[list[str]]:
    """Build arguments pointing TORCH_CPU_INDEX at a local index when a torch CPU wheel is on disk, else none."""
    if os.environ.get("TORCH_CPU_INDEX"):
        yield ["--build-arg", f"TORCH_CPU_INDEX={os.environ['TORCH_CPU_INDEX']}"]
        return
    wheels = [w for folder in _find_links() for w in sorted(folder.glob("torch-*+cpu-*.whl"))]
    if not wheels:
        yield []
        return
    with tempfile.TemporaryDirectory(prefix="stemflow-torch-index-") as tmp:
        project = Path(tmp) / "simple" / "torch"
        project.mkdir(parents=True)
        links = []
        for wheel in wheels:
            (project / wheel.name).symlink_to(wheel)
            links.append(f'<a href="{wheel.name}">{wheel.name}</a><br>')
        (project / "index.html").write_text("<!DOCTYPE html><html><body>" + "".join(links) + "</body></html>\n")
        handler = functools.partial(_QuietHandler, directory=tmp)
        with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            url = f"http://127.0.0.1:{server.server_address[1]}/simple/"
            print(f"torch CPU wheels from {', '.join(w.name for w in wheels)}, served as {url}")
            try:
                yield ["--build-arg", f"TORCH_CPU_INDEX={url}"]
            finally:
                server.shutdown()
                thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _find_links() -> list[Path]:
    """The folders pip's configuration names as find-links (PIP_FIND_LINKS and `pip config list`)."""
    found = os.environ.get("PIP_FIND_LINKS", "").split()
    listing = _output([sys.executable, "-m", "pip", "config", "list"]) or ""
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            found += value.strip("'\"").split()
    return [Path(p.removeprefix("file://")) for p in dict.fromkeys(found) if Path(p.removeprefix("file://")).is_dir()]


# --- sizes -------------------------------------------------------------------------


def sizes_table(services: list[str]) -> str:
    base = image_size(PYTHON_IMAGE) if image_present(PYTHON_IMAGE) else 0
    kind = " (STAND-IN)" if base and is_stand_in(PYTHON_IMAGE) else ""
    rows = [f"{'image':32} {'size':>9} {'added above base':>17}", f"{PYTHON_IMAGE + kind:32} {base / 1e6:>6.0f} MB"]
    for service in services:
        for image in (tag(service), f"{tag(service)}-cuda"):
            if image_present(image):
                size = image_size(image)
                added = f"+{(size - base) / 1e6:.0f} MB" if not image.endswith("-cuda") else "(CUDA base)"
                rows.append(f"{image:32} {size / 1e6:>6.0f} MB {added:>17}")
    return "\n".join(rows)


# --- start-up time ---------------------------------------------------------------


def startup_times(services: list[str]) -> dict[str, float]:
    """Seconds from `docker run` to /readyz 200 for each image started alone (the gateway stays up: the notifier needs it).

    Each runs as tests/images runs it (read-only root, uid 10001, no capabilities, Compose's limits) against the
    local servers (stemflow_dev.stack), in a namespace and database of its own that are removed at the end.
    """
    import asyncio
    import secrets
    import urllib.request

    import yaml

    from stemflow_dev.fixtures import STATE_DIR, delete_namespace
    from stemflow_dev.models import make_tiny_repo
    from stemflow_dev.services import Ports, service_env
    from stemflow_dev.stack import ensure_stack

    urls = ensure_stack(STATE_DIR)
    compose = yaml.safe_load((REPO_ROOT / "deploy" / "compose" / "compose.yaml").read_text())
    namespace = f"startup{secrets.token_hex(4)}"
    ports = Ports.free()
    times: dict[str, float] = {}
    running: list[str] = []
    with tempfile.TemporaryDirectory(prefix="stemflow-startup-") as tmp:
        blobs, models = Path(tmp) / "blobs", make_tiny_repo(Path(tmp) / "models")
        blobs.mkdir()
        for path in (Path(tmp), blobs, models, *models.rglob("*")):
            path.chmod(0o777 if path == blobs else 0o755 if path.is_dir() else 0o644)
        env = service_env(
            urls,
            namespace=namespace,
            mongodb_db=f"stemflow_{namespace}",
            blob_dir=Path("/var/lib/stemflow/blobs"),
            model_repo=Path("/var/lib/stemflow/models"),
            ports=ports,
            extra={"MODELS": "htdemucs", "TORCH_THREADS": "1", "WORKERS": "1"},
        )
        env_file = Path(tmp) / "env"  # the secrets stay off command lines
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))

        def start(service: str) -> float:
            limits = compose["services"][service]["deploy"]["resources"]["limits"]
            port = getattr(ports, service)
            name = f"stemflow-startup-{namespace}-{service}"
            started = time.monotonic()
            # fmt: off
            docker(
                "run", "--detach", "--name", name, "--network", "host", "--read-only", "--user", "10001:10001",
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--tmpfs", "/tmp:size=1g",
                "--volume", f"{blobs}:/var/lib/stemflow/blobs", "--volume", f"{models}:/var/lib/stemflow/models:ro",
                "--cpus", str(min(float(limits["cpus"]), os.cpu_count() or 1)), "--memory", str(limits["memory"]),
                "--env-file", str(env_file), "--env", f"HTTP_PORT={port}", "--env", f"OTEL_SERVICE_NAME={service}",
                tag(service), capture_output=True,
            )
            # fmt: on
            running.append(name)
            while time.monotonic() - started < 600:
                with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                    return time.monotonic() - started
                if _output([docker_cli(), "inspect", "--format", "{{.State.Running}}", name]) != "true":
                    break
                time.sleep(0.2)
            logs = subprocess.run([docker_cli(), "logs", "--tail", "30", name], capture_output=True, text=True)
            raise SystemExit(f"{service} did not become ready:\n{logs.stdout}{logs.stderr}")

        def stop(name: str) -> None:
            subprocess.run([docker_cli(), "rm", "--force", name], capture_output=True, check=False)
            running.remove(name)

        try:
            for service in ["gateway", *(s for s in services if s != "gateway")]:
                times[service] = start(service)
                print(f"{service}: ready {times[service]:.1f} s after docker run", flush=True)
                if service != "gateway":
                    stop(running[-1])
        finally:
            for name in list(running):
                stop(name)
            asyncio.run(delete_namespace(urls.amqp_url, namespace))
            from pymongo import MongoClient

            with MongoClient(urls.mongodb_url) as mongo:
                mongo.drop_database(f"stemflow_{namespace}")
    return {s: times[s] for s in services if s in times}


# --- helpers and command line ----------------------------------------------------


def _ok(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def _output(argv: list[str]) -> str | None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stemflow_dev.images", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["base", "build", "sizes", "startup"])
    parser.add_argument("services", nargs="*", metavar="SERVICE", help=f"default: all five ({', '.join(SERVICES)})")
    parser.add_argument("--cuda", action="store_true", help="also the separator's CUDA target (needs its base)")
    parser.add_argument("--source", metavar="REV", help="build a commit (git archive REV), not the working tree")
    args = parser.parse_args(argv)
    if unknown := set(args.services) - set(SERVICES):
        parser.error(f"unknown services: {', '.join(sorted(unknown))}")
    services = args.services or list(SERVICES)
    if args.command == "base":
        ensure_base()
        return 0
    if args.command == "startup":
        times = startup_times(services)
        print("seconds from docker run to /readyz, each alone:", {s: round(t, 1) for s, t in times.items()})
        return 0
    if args.command == "build":
        for built in build(services, cuda=args.cuda, source=args.source):
            print(f"built {built.tag} in {built.seconds:.0f} s")
    print(sizes_table(services))
    return 0


if __name__ == "__main__":
    sys.exit(main())
