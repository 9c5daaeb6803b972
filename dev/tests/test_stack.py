"""The local stack against real servers, and the process supervisor against real processes."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import httpx
import pytest
import redis
from pymongo import MongoClient

from stemflow_dev.fixtures import STATE_DIR
from stemflow_dev.procs import ProcessGroup, ServiceError, ServiceSpec, pid_alive, stop_saved
from stemflow_dev.stack import LocalPorts, StackUrls, ensure_stack, stop_stack


@pytest.fixture(scope="module")
def local_stack() -> StackUrls:
    return ensure_stack(STATE_DIR)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def assert_stack_works(urls: StackUrls) -> None:
    """Redis SET/GET, and a MongoDB multi-document transaction that commits (only a replica set allows one)."""
    key = f"stemflow-test:{uuid.uuid4().hex}"
    with redis.Redis.from_url(urls.redis_url) as client:
        assert client.set(key, "v", ex=60)
        assert client.get(key) == b"v"
        client.delete(key)

    with MongoClient(urls.mongodb_url, serverSelectionTimeoutMS=10_000) as client:
        db = client[f"stemflow_test_{uuid.uuid4().hex[:8]}"]
        try:
            db.jobs.insert_one({"_id": "first"})
            assert db.jobs.find_one({"_id": "first"}) == {"_id": "first"}
            with client.start_session() as session:
                session.with_transaction(
                    lambda s: (
                        db.jobs.insert_one({"_id": "a"}, session=s),
                        db.events.insert_one({"_id": "b"}, session=s),
                    )
                )
            assert db.jobs.count_documents({}) == 2
            assert db.events.find_one({"_id": "b"}) == {"_id": "b"}
        finally:
            client.drop_database(db.name)


async def assert_amqp_works(url: str) -> None:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"stemflow-test-{uuid.uuid4().hex}", exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"hello"), routing_key=queue.name)
        message = await queue.get(timeout=10, fail=True)
        assert message is not None and message.body == b"hello"
        await message.ack()
        await queue.delete()


async def test_rabbitmq_answers(local_stack: StackUrls) -> None:
    await assert_amqp_works(local_stack.amqp_url)


def test_redis_and_mongodb_answer(local_stack: StackUrls) -> None:
    assert_stack_works(local_stack)


def test_mongodb_change_stream(local_stack: StackUrls) -> None:
    with MongoClient(local_stack.mongodb_url) as client:
        collection = client[f"stemflow_test_{uuid.uuid4().hex[:8]}"].jobs
        try:
            with collection.watch(max_await_time_ms=5000) as stream:
                collection.insert_one({"_id": "x"})
                change = stream.try_next()
            assert change is not None and change["documentKey"] == {"_id": "x"}
        finally:
            client.drop_database(collection.database.name)


def test_second_call_reuses(local_stack: StackUrls) -> None:
    mongod_pid = STATE_DIR / "mongodb" / "mongod.pid"
    before = mongod_pid.read_text() if mongod_pid.exists() else None
    started = time.monotonic()
    assert ensure_stack(STATE_DIR) == local_stack
    assert time.monotonic() - started < 10
    assert (mongod_pid.read_text() if mongod_pid.exists() else None) == before


def test_given_urls_are_reused(local_stack: StackUrls, tmp_path: Path) -> None:
    given = ensure_stack(
        tmp_path, amqp_url=local_stack.amqp_url, mongodb_url=local_stack.mongodb_url, redis_url=local_stack.redis_url
    )
    assert given == local_stack
    assert not list(tmp_path.glob("*/*.pid"))  # nothing started, so nothing for stop_stack to stop


@pytest.fixture
def private_state_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: its parents are private, and RabbitMQ runs as the rabbitmq user.
    path = Path(tempfile.mkdtemp(prefix="stemflow-stack-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        stop_stack(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
async def test_cold_start_then_stop_only_what_it_started(
    local_stack: StackUrls, private_state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AMQP_URL", "MONGODB_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    ports = LocalPorts(amqp=free_port(), mongodb=free_port(), redis=free_port())

    started = time.monotonic()
    urls = ensure_stack(private_state_dir, ports=ports)
    print(f"cold start of RabbitMQ, MongoDB and Redis: {time.monotonic() - started:.1f} s")

    assert urls.mongodb_url == f"mongodb://127.0.0.1:{ports.mongodb}/?replicaSet=rs0"
    await assert_amqp_works(urls.amqp_url)
    assert_stack_works(urls)
    pids = [int(p.read_text()) for p in private_state_dir.glob("*/*.pid")]
    assert len(pids) == 3 and all(pid_alive(pid) for pid in pids)

    stop_stack(private_state_dir)
    assert not any(pid_alive(pid) for pid in pids)
    assert not any(port_open(port) for port in (ports.amqp, ports.mongodb, ports.redis))
    assert_stack_works(local_stack)  # the servers it did not start still run
    await assert_amqp_works(local_stack.amqp_url)


def test_a_server_that_cannot_start_is_named_with_its_log(
    local_stack: StackUrls, private_state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MONGODB_URL", raising=False)
    # Something that is not MongoDB holds the port: mongod cannot bind it.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(RuntimeError, match=r"MongoDB failed to start .*mongodb/mongod\.log"):
            ensure_stack(private_state_dir, ports=LocalPorts(mongodb=port))


# --- the process supervisor ----------------------------------------------------


def http_server(name: str, port: int, directory: Path) -> ServiceSpec:
    return ServiceSpec(
        name=name,
        argv=[sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(directory)],
        env={"STEMFLOW_TEST": "1"},
        ready_url=f"http://127.0.0.1:{port}/",
    )


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_process_group_start_kill_restart_stop(tmp_path: Path) -> None:
    port = free_port()
    with ProcessGroup() as group:
        group.start([http_server("web", port, tmp_path)], tmp_path / "logs")
        group.wait_ready(timeout=20)
        first = group.pid("web")
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200

        group.kill("web")
        assert not group.is_running("web") and group_gone(first)
        assert not port_open(port)

        group.restart("web")
        group.wait_ready(timeout=20)
        second = group.pid("web")
        assert second != first and group.is_running("web")

        group.restart("web")  # a running one is stopped first
        group.wait_ready(timeout=20)
        third = group.pid("web")
        assert third != second and group_gone(second)
    assert group_gone(third) and not pid_alive(third)
    assert not port_open(port)
    assert (tmp_path / "logs" / "web.log").read_text().count("==> ") == 3


def test_wait_ready_reports_the_log_of_a_service_that_exited(tmp_path: Path) -> None:
    crash = ServiceSpec(
        "crash",
        [sys.executable, "-c", "print('bad settings: AMQP_URL'); raise SystemExit(3)"],
        ready_url=f"http://127.0.0.1:{free_port()}/",
    )
    with ProcessGroup() as group:
        group.start([crash], tmp_path)
        with pytest.raises(ServiceError, match=r"(?s)crash exited with code 3.*bad settings: AMQP_URL"):
            group.wait_ready(timeout=20)


def test_wait_ready_times_out_with_the_log(tmp_path: Path) -> None:
    port = free_port()
    silent = ServiceSpec(
        "silent",
        [sys.executable, "-c", "import time; print('booting'); time.sleep(60)"],
        ready_url=f"http://127.0.0.1:{port}/",
    )
    with ProcessGroup() as group:
        group.start([silent], tmp_path)
        with pytest.raises(ServiceError, match=r"(?s)silent was not ready within 1 s.*booting"):
            group.wait_ready(timeout=1)


def test_saved_services_stop_from_another_process(tmp_path: Path) -> None:
    port = free_port()
    group = ProcessGroup()
    group.start([http_server("web", port, tmp_path)], tmp_path / "logs")
    group.wait_ready(timeout=20)
    pid = group.pid("web")
    group.save(tmp_path / "state")

    stop_saved(tmp_path / "state")  # as `down` would, knowing only the state directory

    assert not pid_alive(pid)  # a zombie until its parent, this test, reaps it
    assert not (tmp_path / "state" / "services.json").exists()
    group.stop()
    assert group_gone(pid)
