"""The gateway's HTTP API at 1,000, 10,000 and 100,000 jobs, driven by wrk from another process.

Starts one gateway process per size on the real local RabbitMQ, MongoDB and
Redis (each in its own namespace, database and blob directory, all removed at
the end), seeds it with jobs shaped like `lifecycle.new_job` makes them over four
owners, and drives it with wrk (10 and 100 connections) for: get (cache hit,
cache miss), list the first page and a deep cursor page (90% down the owner's
jobs), and create with a 5 MB upload, as a multipart form and as the raw body
(`Content-Type: audio/wav`, options in the query string).
Sizes are measured interleaved, scenario by scenario, so that the load of a
shared machine drifting over minutes hits every size alike.

The baseline, measured in the same run on the same processes and connections,
is `GET /healthz` (the HTTP stack alone); every scenario is also given as a
ratio to it. With `--baseline-pythonpath` (e.g. an older checkout's
services/gateway/src) the same sizes are also served by that code, interleaved
too, and compared. Prints p50/p95/p99, req/s and the gateway's CPU time per
request, the whole stack's CPU per request (gateway, wrk, MongoDB, Redis and
RabbitMQ: what bounds latency on a machine they share, by Little's law a p50
of at least connections * stack CPU / cores), the list p95 ratio 100k/1k, the
RSS growth of a 500 MB upload (both body kinds), the floor under the upload goals
(a bare ASGI app under the gateway's server settings that only receives, or
receives and hashes, the 5 MB body: its CPU per upload, user and kernel) and the issue's reference peer
figures, with the machine's load average before and after; writes bench/results/gateway.json. `--scenarios`
picks scenarios; `--profile DIR` records each scenario's gateway with py-spy
(collapsed stacks) and prints where its CPU went.

    .venv/bin/python bench/gateway.py [--sizes 1000,10000,100000] [--duration 5] [--connections 10,100]
    .venv/bin/python bench/gateway.py --scenarios list_first,list_deep \
        --current-pythonpath NEW/services/gateway/src:NEW/shared/src \
        --baseline-pythonpath OLD/services/gateway/src:OLD/shared/src

(OLD and NEW: `git archive <commit> services/gateway/src shared/src` of the two commits, so that both run
committed code and the shared library of their own commit.)

Needs `wrk` (Debian: `apt-get install -y wrk`; installed automatically when run as root).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
# This script is named like the service's package; its folder must not shadow `gateway` on the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
RESULTS = HERE / "results"
OWNERS = ("bench-0", "bench-1", "bench-2", "bench-3")
UPLOADER = "bench-upload"
PAGE = 20
UPLOAD_MB = 5
BIG_UPLOAD_MB = 500
RSS_LIMIT_MB = 64
STUCK_JOB_TIMEOUT_S = 3600.0  # the gateway's default (STUCK_JOB_TIMEOUT_S)
SCENARIOS = ("healthz", "get_hit", "get_miss", "list_first", "list_deep", "create_5mb", "create_5mb_raw")
UPLOADS = ("create_5mb", "create_5mb_raw")
SERVER_COMMANDS = {"mongod", "redis-server", "beam.smp"}
# Run once over a list of distinct requests (each a cache miss), instead of repeating them for the duration.
ONCE = ("get_miss",)
# The reference: a FastAPI + PostgreSQL peer (offset pagination with a full count), 10 connections, 1,000 jobs.
PEER = {
    "list_p50_ms": 30.0,
    "list_p95_ms": 142.0,
    "list_rps": 29.0,
    "list_p50_ms_10k": 367.0,
    "get_rps": 428.0,
    "get_p99_ms": 134.0,
    "upload_5mb_p50_ms": 61.0,
}
GOALS = {
    "list_p95_ms": 10.0,
    "list_p95_ratio_100k_1k": 1.5,
    "get_hit_p50_ms": 2.0,
    "get_hit_p99_ms": 10.0,
    "get_hit_rps_c10": 3000.0,
    "list_rps_c10": 1000.0,
    "upload_5mb_p50_ms": 30.0,
    "upload_500mb_rss_growth_mb": float(RSS_LIMIT_MB),
}
# Issue 23's goals (10 connections, every size of the run).
GOALS_23 = {
    "list_rps_c10": 1500.0,
    "list_p95_ms": 10.0,
    "list_cpu_ms_per_page": 0.5,
    "list_p95_ratio_100k_1k": 1.3,
    "upload_raw_cpu_ms": 6.0,
    "upload_multipart_cpu_ms": 10.0,
}

LUA = r"""
local list_file, body_file, content_type = "%(list)s", "%(body)s", "%(ctype)s"
local nthreads, once = %(threads)d, %(once)s
local reqs, n, i, answered = {}, 0, 0, 0
local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

function init(args)
  local body = nil
  if body_file ~= "" then
    local f = io.open(body_file, "rb"); body = f:read("*a"); f:close()
  end
  local k = 0
  for line in io.lines(list_file) do
    if (not once) or k %% nthreads == tid then
      local method, path, auth = line:match("^(%%S+)\t(%%S+)\t(.*)$")
      local headers = {["Authorization"] = auth, ["Accept-Encoding"] = "gzip"}
      if content_type ~= "" then headers["Content-Type"] = content_type end
      n = n + 1
      reqs[n] = wrk.format(method, path, headers, body)
    end
    k = k + 1
  end
  i = once and 0 or (tid %% n)
end

function request()
  i = i + 1
  if i > n then i = once and n or 1 end
  return reqs[i]
end

if once then
  response = function(status, headers, body)
    answered = answered + 1
    if answered >= n then wrk.thread:stop() end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p95_us":%%d,"p99_us":%%d,"mean_us":%%.1f,' ..
    '"errors":{"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def require_wrk() -> str:
    """The wrk executable; installed with apt-get when missing and we are root on Debian."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk is missing: apt-get install -y wrk", flush=True)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, stdout=subprocess.DEVNULL)
        found = shutil.which("wrk")
    if not found:
        sys.exit("bench/gateway.py needs wrk: apt-get install -y wrk")
    return found


# --- the gateway's processes --------------------------------------------------------


def group_pids(pgid: int) -> list[int]:
    """The gateway's processes: its process group (one server, or a supervisor and its workers)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


def group_times_s(pgid: int) -> tuple[float, float]:
    """User CPU time, and user + kernel, of a process group's processes, in seconds."""
    user = kernel = 0
    for pid in group_pids(pgid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user, kernel = user + int(fields[11]), kernel + int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, (user + kernel) / tick


def process_cpu_s(pgid: int) -> float:
    return group_times_s(pgid)[1]


def servers_cpu_s() -> float:
    """CPU time of the servers every request also uses (MongoDB, Redis, RabbitMQ), whoever else uses them too."""
    total = 0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() not in SERVER_COMMANDS:
                continue
            fields = (comm.parent / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rss_kb(pgid: int, field_name: str) -> int:
    """VmRSS or VmHWM summed over the gateway's processes."""
    total = 0
    for pid in group_pids(pgid):
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in lines if line.startswith(field_name + ":")), 0)
    return total


@dataclass
class Target:
    """One running gateway: which code (`variant`), how many jobs, and how to reach and measure it."""

    variant: str
    size: int
    namespace: str
    base_url: str
    pid: int
    jobs: Any
    blob_dir: Path
    keys: dict[str, str] = field(default_factory=dict)
    lines: dict[str, list[str]] = field(default_factory=dict)
    warm: dict[str, list[str]] = field(default_factory=dict)
    # Scenarios this code cannot serve (an older commit without the raw-body route).
    unsupported: set[str] = field(default_factory=set)

    @property
    def auth(self) -> str:
        return f"Bearer {self.keys[OWNERS[0]]}"


class Wrk:
    """Runs one wrk scenario against a gateway and reads its figures, with the gateway's CPU time."""

    def __init__(
        self, executable: str, work: Path, duration_s: float, uploads: dict[str, tuple[Path, str]], profile: Path | None
    ) -> None:
        self.executable = executable
        self.work = work
        self.duration_s = duration_s
        self.uploads = uploads
        self.profile = profile

    def run(self, target: Target, scenario: str, connections: int) -> dict[str, Any]:
        threads = min(2, connections)
        once = scenario in ONCE
        seconds = self.duration_s
        body, content_type = None, ""
        if scenario in UPLOADS:
            body, content_type = self.uploads[scenario]
            # Each upload holds its connection for a while: at 100 connections a short run completes few.
            seconds = max(seconds, connections / 10)
        name = f"{target.variant}-{target.size}-{scenario}-{connections}"
        listing = self.work / f"{name}.txt"
        listing.write_text("\n".join(target.lines[scenario]) + "\n")
        script = self.work / f"{name}.lua"
        script.write_text(
            LUA
            % {
                "list": listing,
                "body": body or "",
                "ctype": content_type,
                "threads": threads,
                "once": "true" if once else "false",
            }
        )
        argv = [self.executable, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s"]
        spy = self._spy(target, f"{name}.txt", seconds)
        cpu_before, wrk_before, servers_before = process_cpu_s(target.pid), children_cpu_s(), servers_cpu_s()
        out = subprocess.run([*argv, "-s", str(script), target.base_url], capture_output=True, text=True, check=True)
        cpu = process_cpu_s(target.pid) - cpu_before
        wrk_cpu, servers_cpu = children_cpu_s() - wrk_before, servers_cpu_s() - servers_before
        if spy is not None:
            spy.wait()
        raw = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("BENCHJSON "))[10:])
        requests = max(raw["requests"], 1)
        return {
            "connections": connections,
            "requests": raw["requests"],
            "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
            "p50_ms": raw["p50_us"] / 1000,
            "p95_ms": raw["p95_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000,
            "mean_ms": round(raw["mean_us"] / 1000, 3),
            "gateway_cpu_us_per_request": round(cpu * 1e6 / requests, 1),
            # Everything one request costs on this machine: the gateway, the client (wrk) and the servers.
            "stack_cpu_us_per_request": round((cpu + wrk_cpu + servers_cpu) * 1e6 / requests, 1),
            "errors": {k: v for k, v in raw["errors"].items() if v},
        }

    def _spy(self, target: Target, name: str, seconds: float) -> subprocess.Popen[bytes] | None:
        """py-spy recording the gateway's processes for the scenario (collapsed stacks), when profiling."""
        if self.profile is None:
            return None
        self.profile.mkdir(parents=True, exist_ok=True)
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        argv = [spy, "record", "--pid", str(target.pid), "--subprocesses", "--nonblocking", "--format", "raw"]
        argv += ["--rate", "250", "--duration", str(max(1, int(seconds))), "--output", str(self.profile / name)]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --- seeding ------------------------------------------------------------------------


def job_documents(count: int, base: float) -> Iterator[dict[str, Any]]:
    """`count` jobs, newest first by index, a mix of finished and failed ones, like new_job makes them; only
    those younger than the stuck-job timeout still queued."""
    from gateway import lifecycle
    from stemflow_shared.events import JobOptions

    options = JobOptions(stems=4, quality="balanced")
    retention = timedelta(days=7)
    seeded_at = datetime.fromtimestamp(base, UTC)
    for index in range(count):
        created = base - index * 10.0
        job_id = lifecycle.new_job_id(created)
        now = datetime.fromtimestamp(created, UTC).replace(microsecond=0)
        input_doc = {
            "blob_key": f"jobs/{job_id}/upload",
            "filename": f"song-{index}.wav",
            "content_type": "audio/wav",
            "size": 31_000_000,
            "sha256": uuid.uuid4().hex * 2,
        }
        doc = lifecycle.new_job(job_id, OWNERS[index % len(OWNERS)], options, input_doc, now=now, retention=retention)
        doc["expire_at"] = datetime.now(UTC) + retention
        if index % 10 < 7:
            finish(doc, job_id)
        elif index % 10 == 7:
            doc["status"] = "failed"
            doc["error"] = {"code": "decode_failed", "message": "the file is not audio"}
        elif (stuck := lifecycle.time_out(doc, seeded_at, STUCK_JOB_TIMEOUT_S)) is not None:
            # No job stays unfinished past the gateway's stuck-job timeout: its sweeper fails it. Seeded queued,
            # the old ones would be failed 100 per sweep during the measurement, each write emptying the
            # owner's cached list pages.
            doc.update(stuck.set)
        yield doc


def finish(doc: dict[str, Any], job_id: str) -> None:
    """A completed job with four stems and a full analysis (beats and energy curve included)."""
    doc["status"] = "completed"
    doc["progress"] = 100.0
    doc["stages"] = {s: {"status": "completed", "percent": 100.0} for s in ("ingest", "separation", "analysis")}
    doc["audio"] = {"blob_key": f"jobs/{job_id}/audio.wav", "fingerprint": uuid.uuid4().hex, "duration_s": 180.0}
    doc["result"] = {
        "stems": [
            {
                "name": name,
                "format": "wav",
                "media_type": "audio/wav",
                "blob_key": f"jobs/{job_id}/stems/{name}.wav",
                "size": 31_752_044,
                "duration_s": 180.0,
            }
            for name in ("vocals", "drums", "bass", "other")
        ],
        "separation": {"model": "htdemucs", "device": "cpu", "precision": "float32", "untrained": False},
        "analysis": {
            "tempo_bpm": 120.2,
            "tempo_confidence": 0.91,
            "key": "A minor",
            "key_confidence": 0.77,
            "loudness_lufs": -9.4,
            "true_peak_dbfs": -0.3,
            "rms_dbfs": -12.0,
            "duration_s": 180.0,
            "beat_count": 360,
            "beats": [round(0.5 * b, 3) for b in range(360)],
            "energy": [0.5] * 200,
            "energy_hop_s": 0.9,
            "source": "mix",
        },
    }


def seed(jobs: Any, count: int, base: float) -> None:
    batch: list[dict[str, Any]] = []
    for doc in job_documents(count, base):
        batch.append(doc)
        if len(batch) == 5000:
            jobs.insert_many(batch, ordered=False)
            batch = []
    if batch:
        jobs.insert_many(batch, ordered=False)


def raw_body(path: Path, megabytes: int) -> str:
    """A `megabytes` file written to `path` for the raw-body route; returns its content type."""
    with open(path, "wb") as fh:
        fh.write(os.urandom(megabytes * 1024 * 1024))
    return "audio/wav"


def multipart_body(path: Path, megabytes: int) -> str:
    """A multipart form with a `megabytes` file written to `path`; returns its content type."""
    boundary = "stemflowbench" + uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="stems"\r\n\r\n4\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="song.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    with open(path, "wb") as fh:
        fh.write(head)
        fh.write(os.urandom(megabytes * 1024 * 1024))
        fh.write(f"\r\n--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}"


def plan_requests(target: Target) -> None:
    """Each scenario's requests (`METHOD\\tPATH\\tAuthorization` lines) and the jobs it needs cached first."""
    from gateway.repository import encode_cursor

    mine = [d["_id"] for d in target.jobs.find({"owner": OWNERS[0]}, {"_id": 1}).sort("_id", -1)]
    everyone = [(d["_id"], d["owner"]) for d in target.jobs.find({}, {"_id": 1, "owner": 1}).sort("_id", -1)]
    deep = encode_cursor(mine[int(len(mine) * 0.9) - 1])
    auth = target.auth
    target.lines = {
        "healthz": ["GET\t/healthz\t-"],
        "get_hit": [f"GET\t/v1/jobs/{j}\t{auth}" for j in mine[:100]],
        "get_miss": [f"GET\t/v1/jobs/{j}\tBearer {target.keys[o]}" for j, o in everyone],
        "list_first": [f"GET\t/v1/jobs?limit={PAGE}\t{auth}"],
        "list_deep": [f"GET\t/v1/jobs?limit={PAGE}&cursor={deep}\t{auth}"],
        "create_5mb": [f"POST\t/v1/jobs\tBearer {target.keys[UPLOADER]}"],
        "create_5mb_raw": [f"POST\t/v1/jobs?stems=4\tBearer {target.keys[UPLOADER]}"],
    }
    target.warm = {"get_hit": mine[:100]}


# --- one scenario on one gateway ----------------------------------------------------


def measure(wrk: Wrk, redis: Any, target: Target, scenario: str, connections: int) -> dict[str, Any]:
    """Bring the cache to the state the scenario assumes, run it, and undo what it created."""
    if scenario == "get_miss":
        drop_cache(redis, target)
    with httpx.Client(base_url=target.base_url, headers={"Authorization": target.auth}) as http:
        for job_id in target.warm.get(scenario, []):
            http.get(f"/v1/jobs/{job_id}").raise_for_status()
    figures = wrk.run(target, scenario, connections)
    if scenario in UPLOADS:
        drop_uploads(target)
    return figures


def drop_cache(redis: Any, target: Target) -> None:
    keys = list(redis.scan_iter(match=f"{target.namespace}:job:*", count=5000))
    for start in range(0, len(keys), 5000):
        redis.delete(*keys[start : start + 5000])


def drop_uploads(target: Target) -> None:
    """Remove the jobs and files the upload scenario made, so each size keeps its job count."""
    target.jobs.delete_many({"owner": UPLOADER})
    shutil.rmtree(target.blob_dir / "jobs", ignore_errors=True)


def big_upload(target: Target, *, raw: bool = False) -> dict[str, Any]:
    """Stream a 500 MB upload and measure the gateway's peak RSS growth (VmHWM after a reset, and sampled)."""
    boundary = "stemflowbig" + uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    if raw:
        head, tail, content_type = b"", b"", "audio/wav"
    chunk = os.urandom(1024 * 1024)

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(BIG_UPLOAD_MB):
            yield chunk
        yield tail

    for member in group_pids(target.pid):
        Path(f"/proc/{member}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = rss_kb(target.pid, "VmRSS")
    samples = [before]
    finished = threading.Event()

    def sample() -> None:
        # VmHWM is updated lazily by the kernel; sampling VmRSS as well catches the peak either way.
        while not finished.wait(0.02):
            samples.append(rss_kb(target.pid, "VmRSS"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    headers = {
        "Authorization": f"Bearer {target.keys[UPLOADER]}",
        "Content-Type": content_type,
        "Content-Length": str(len(head) + BIG_UPLOAD_MB * len(chunk) + len(tail)),
    }
    try:
        response = httpx.post(f"{target.base_url}/v1/jobs", content=body(), headers=headers, timeout=300)
    finally:
        finished.set()
        sampler.join()
    seconds = time.perf_counter() - started
    response.raise_for_status()
    peak = max(rss_kb(target.pid, "VmHWM"), *samples)
    drop_uploads(target)
    return {
        "body": "raw" if raw else "multipart",
        "megabytes": BIG_UPLOAD_MB,
        "seconds": round(seconds, 2),
        "rss_before_mb": round(before / 1024, 1),
        "rss_peak_mb": round(peak / 1024, 1),
        "rss_growth_mb": round((peak - before) / 1024, 1),
    }


# A bare ASGI app under the gateway's server settings: what any 5 MB upload costs before the gateway's own work.
FLOOR_APP = """
import hashlib


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    digest = hashlib.sha256() if scope["path"] == "/sha256" else None
    size, more = 0, True
    while more:
        message = await receive()
        more, body = message.get("more_body", False), message.get("body", b"")
        size += len(body)
        if digest is not None:
            digest.update(body)
    answer = str(size).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(answer))]})
    await send({"type": "http.response.body", "body": answer})


if __name__ == "__main__":
    import sys

    import uvicorn

    from stemflow_shared.httpserver import HttpLimits, server_options

    uvicorn.run(app, port=int(sys.argv[1]), loop="uvloop", log_level="warning", **server_options(HttpLimits()))
"""
FLOOR_UPLOADS = 40


def upload_floor(work: Path, body_path: Path) -> dict[str, Any]:
    """The CPU per upload of a bare ASGI app under uvicorn with the gateway's loop and HTTP protocol, which only
    reads the body (`drain`) or reads and hashes it (`sha256`), one connection sending one body after another:
    the floor under the upload goals, user and kernel time apart."""
    from stemflow_dev.procs import ProcessGroup, ServiceSpec
    from stemflow_dev.services import Ports

    (work / "floor_app.py").write_text(FLOOR_APP)
    port = Ports.free().gateway
    body = body_path.read_bytes()
    answer = str(len(body)).encode()
    figures: dict[str, Any] = {"uploads": FLOOR_UPLOADS, "megabytes": UPLOAD_MB}
    with ProcessGroup() as group:
        argv = [sys.executable, str(work / "floor_app.py"), str(port)]
        group.start([ServiceSpec("floor-app", argv, ready_url=f"http://127.0.0.1:{port}/ready")], work / "logs")
        group.wait_ready(timeout=60)
        pgid = group.pid("floor-app")
        for path in ("/drain", "/sha256"):
            head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: audio/wav\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            with socket.create_connection(("127.0.0.1", port)) as conn:
                user, total = group_times_s(pgid)
                for _ in range(FLOOR_UPLOADS):
                    conn.sendall(head + body)
                    received = b""
                    while not received.endswith(answer):
                        received += conn.recv(4096)
                after_user, after_total = group_times_s(pgid)
            cpu, user_cpu = after_total - total, after_user - user
            figures[path.strip("/")] = {
                "cpu_ms": round(cpu * 1000 / FLOOR_UPLOADS, 2),
                "user_ms": round(user_cpu * 1000 / FLOOR_UPLOADS, 2),
                "kernel_ms": round((cpu - user_cpu) * 1000 / FLOOR_UPLOADS, 2),
            }
    return figures


# --- report -------------------------------------------------------------------------


def add_ratios(variant: dict[str, Any]) -> None:
    """Each scenario against the same run's /healthz; list p95 at the largest size against the smallest."""
    for per_size in variant["sizes"].values():
        for row in per_size["figures"].values():
            floor = row.get("healthz")
            for name, fig in row.items():
                if name != "healthz" and floor is not None:
                    fig["p50_vs_healthz"] = round(fig["p50_ms"] / max(floor["p50_ms"], 1e-3), 2)
                    fig["rps_vs_healthz"] = round(fig["rps"] / max(floor["rps"], 1e-3), 3)
    sizes = sorted(variant["sizes"], key=int)
    first, last = variant["sizes"][sizes[0]]["figures"], variant["sizes"][sizes[-1]]["figures"]
    variant["list_p95_ratio"] = {
        conns: {
            scenario: round(last[conns][scenario]["p95_ms"] / max(first[conns][scenario]["p95_ms"], 1e-3), 2)
            for scenario in ("list_first", "list_deep")
            if scenario in first[conns]
        }
        for conns in first
    }
    variant["list_p95_ratio_sizes"] = f"{sizes[-1]}/{sizes[0]}"


def against_baseline(results: dict[str, Any]) -> dict[str, Any]:
    """Current code over baseline code, measured interleaved: req/s, p50, p95 and CPU per request.

    The raw-body upload, which older code lacks, is set against the baseline's multipart upload.
    """
    current, baseline = results["current"]["sizes"], results["baseline"]["sizes"]
    ratios: dict[str, Any] = {}
    for size, per_size in current.items():
        for conns, row in per_size["figures"].items():
            theirs = baseline[size]["figures"][conns]
            for name, fig in row.items():
                base = theirs.get(name) or (theirs.get("create_5mb") if name == "create_5mb_raw" else None)
                if base is None:
                    continue
                ratios.setdefault(size, {}).setdefault(conns, {})[name] = {
                    "rps": round(fig["rps"] / max(base["rps"], 1e-3), 2),
                    "p50": round(fig["p50_ms"] / max(base["p50_ms"], 1e-3), 2),
                    "p95": round(fig["p95_ms"] / max(base["p95_ms"], 1e-3), 2),
                    "cpu_per_request": round(
                        fig["gateway_cpu_us_per_request"] / max(base["gateway_cpu_us_per_request"], 1e-3), 2
                    ),
                }
    return ratios


def print_variant(label: str, variant: dict[str, Any]) -> None:
    for size, per_size in variant["sizes"].items():
        print(f"\n== {label}: {int(size):,} jobs ({per_size['owner_jobs']:,} for the measured owner)")
        header = f"{'scenario':<15}{'conns':>6}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>10}"
        print(header + f"{'cpu µs/req':>12}{'stack µs/req':>14}{'vs healthz':>12}")
        for row in per_size["figures"].values():
            for name, fig in row.items():
                ratio = f"{fig['rps_vs_healthz']:.2f}x" if "rps_vs_healthz" in fig else "-"
                errors = f"  errors {fig['errors']}" if fig["errors"] else ""
                print(
                    f"{name:<15}{fig['connections']:>6}{fig['p50_ms']:>9.2f}{fig['p95_ms']:>9.2f}{fig['p99_ms']:>9.2f}"
                    f"{fig['rps']:>10.0f}{fig['gateway_cpu_us_per_request']:>12.0f}"
                    f"{fig.get('stack_cpu_us_per_request', 0):>14.0f}{ratio:>12}{errors}"
                )
    print(f"\nlist p95 ratio {variant['list_p95_ratio_sizes']}: {variant['list_p95_ratio']}")


def print_report(results: dict[str, Any]) -> None:
    if "baseline" in results:
        print_variant("baseline code", results["baseline"])
    print_variant("current code", results["current"])
    for big in results.get("upload_500mb", []):
        print(f"500 MB {big['body']} upload: {big['seconds']} s, gateway RSS +{big['rss_growth_mb']} MB")
    if floor := results.get("upload_floor"):
        print(f"{floor['megabytes']} MB uploads to a bare ASGI app (the gateway's server settings), CPU per upload:")
        for name in ("drain", "sha256"):
            f = floor[name]
            print(f"    {name:<7} {f['cpu_ms']:.2f} ms ({f['user_ms']:.2f} user, {f['kernel_ms']:.2f} kernel)")
    if "current_vs_baseline" in results:
        print("\ncurrent / baseline code (req/s, p50, p95, CPU per request), measured interleaved:")
        for size, per_size in results["current_vs_baseline"].items():
            for conns, row in per_size.items():
                for name, r in row.items():
                    print(
                        f"  {int(size):>7,} {conns:>4}  {name:<15} req/s {r['rps']:.2f}  p50 {r['p50']:.2f}"
                        f"  p95 {r['p95']:.2f}  cpu {r['cpu_per_request']:.2f}"
                    )
    if results["profiles"]:
        print("\nwhere the gateway's CPU went (py-spy: share of busy samples per package, then per function):")
        for name, top in results["profiles"].items():
            print(f"  {name}: " + ", ".join(f"{frame} {share:.0%}" for frame, share in top))
    print("\nagainst the goals (10 connections):")
    for line in results["comparison"]:
        print("  " + line)


def compare(current: dict[str, Any], bigs: list[dict[str, Any]], floor: dict[str, Any] | None = None) -> list[str]:
    """Each goal of the gateway issue and of issue 23 with this run's figure (the worst size where sizes differ)."""
    sizes = sorted(current["sizes"], key=int)
    rows: list[tuple[str, float, float, bool]] = []

    def worst(scenario: str, key: str, higher_better: bool) -> float | None:
        found = [
            current["sizes"][s]["figures"]["c10"][scenario][key]
            for s in sizes
            if scenario in current["sizes"][s]["figures"].get("c10", {})
        ]
        if not found:
            return None
        return min(found) if higher_better else max(found)

    def goal(label: str, value: float | None, target: float, higher_better: bool = False) -> None:
        if value is not None:
            rows.append((label, value, target, higher_better))

    for scenario in ("list_first", "list_deep"):
        goal(f"{scenario} req/s (worst size)", worst(scenario, "rps", True), GOALS_23["list_rps_c10"], True)
        goal(f"{scenario} p95 ms (worst size)", worst(scenario, "p95_ms", False), GOALS_23["list_p95_ms"])
        cpu = worst(scenario, "gateway_cpu_us_per_request", False)
        goal(f"{scenario} CPU ms/page", cpu / 1000 if cpu is not None else None, GOALS_23["list_cpu_ms_per_page"])
        ratio = current["list_p95_ratio"].get("c10", {}).get(scenario)
        goal(f"{scenario} p95 {current['list_p95_ratio_sizes']}", ratio, GOALS_23["list_p95_ratio_100k_1k"])
    for scenario, key in (("create_5mb_raw", "upload_raw_cpu_ms"), ("create_5mb", "upload_multipart_cpu_ms")):
        cpu = worst(scenario, "gateway_cpu_us_per_request", False)
        goal(f"{scenario} CPU ms", cpu / 1000 if cpu is not None else None, GOALS_23[key])
        goal(f"{scenario} p50 ms", worst(scenario, "p50_ms", False), GOALS["upload_5mb_p50_ms"])
        stack = worst(scenario, "stack_cpu_us_per_request", False)
        if stack is not None:
            # Little's law: 10 requests in flight, each needing `stack` of CPU on `cores` cores that nothing else
            # uses, cannot complete faster than 10 * stack / cores apiece.
            floor_ms = 10 * stack / 1000 / (os.cpu_count() or 1)
            goal(f"{scenario} p50 floor ms (CPU-bound)", floor_ms, GOALS["upload_5mb_p50_ms"])
    if floor is not None:
        # Not the gateway's figure: what the server and kernel take to receive (and hash) the body at all.
        goal("bare app: receive CPU ms", floor["drain"]["cpu_ms"], GOALS_23["upload_raw_cpu_ms"])
        goal("bare app: receive + sha256 CPU ms", floor["sha256"]["cpu_ms"], GOALS_23["upload_raw_cpu_ms"])
    goal("get_hit p50 ms", worst("get_hit", "p50_ms", False), GOALS["get_hit_p50_ms"])
    goal("get_hit req/s", worst("get_hit", "rps", True), GOALS["get_hit_rps_c10"], True)
    for big in bigs:
        goal(f"500 MB {big['body']} upload RSS MB", big["rss_growth_mb"], GOALS["upload_500mb_rss_growth_mb"])
    lines = []
    for label, ours, target, higher_better in rows:
        met = ours >= target if higher_better else ours <= target
        sign = ">=" if higher_better else "<="
        lines.append(f"{label:<36}{ours:>10.2f}   goal {sign} {target:g}: {'met' if met else 'MISSED'}")
    return lines


def profile_summary(path: Path, top: int = 12) -> list[tuple[str, float]]:
    """Where a py-spy raw (collapsed) profile's busy samples were: per package (the innermost frame of one
    of PACKAGES), then the functions running (self time), each as a share of the busy samples."""
    packages: dict[str, int] = {}
    leaves: dict[str, int] = {}
    busy = 0
    for line in path.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        frames = stack.split(";")
        if not number.isdigit() or any(idle in frames[-1] for idle in IDLE):
            continue
        busy += int(number)
        leaf = _frame_name(frames[-1])
        leaves[leaf] = leaves.get(leaf, 0) + int(number)
        package = next((p for f in reversed(frames) for p in PACKAGES if f"({p}/" in f or f"/{p}/" in f), "other")
        packages[package] = packages.get(package, 0) + int(number)
    by_package = sorted(((n / max(busy, 1), f"[{p}]") for p, n in packages.items()), reverse=True)
    by_leaf = sorted(((n / max(busy, 1), f) for f, n in leaves.items()), reverse=True)[:top]
    return [(name, share) for share, name in by_package + by_leaf]


PACKAGES = (
    "gateway",
    "stemflow_shared",
    "pymongo",
    "bson",
    "redis",
    "aio_pika",
    "aiormq",
    "fastapi",
    "starlette",
    "uvicorn",
    "python_multipart",
    "anyio",
    "pydantic",
    "opentelemetry",
    "prometheus_client",
    "asyncio",
)
# A thread waiting for work, or the event loop waiting for events: not CPU.
IDLE = ("Condition.wait", "Queue.get", "_worker (thread.py", "select (selectors.py")


def _frame_name(frame: str) -> str:
    """`function (path/file.py:line)` as `function (file.py)`."""
    function, _, where = frame.partition(" (")
    return f"{function} ({where.split(':')[0].rsplit('/', 1)[-1].rstrip(')')})" if where else function


# --- main ---------------------------------------------------------------------------


class Bench:
    """The gateways under test and the servers they share; everything it creates is removed by `close`."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import redis as redis_sync
        from pymongo import MongoClient

        from stemflow_dev.fixtures import STATE_DIR
        from stemflow_dev.procs import ProcessGroup
        from stemflow_dev.stack import ensure_stack

        self.args = args
        self.work = work
        self.urls = ensure_stack(STATE_DIR)
        self.mongo: Any = MongoClient(self.urls.mongodb_url, tz_aware=True)
        self.redis = redis_sync.from_url(self.urls.redis_url)
        self.redis_url = self.urls.redis_url
        self.group = ProcessGroup()
        self.targets: list[Target] = []

    def start(self, variant: str, size: int, pythonpath: str | None) -> Target:
        from stemflow_dev.services import Ports, service_env, service_specs

        namespace = f"b{uuid.uuid4().hex[:8]}"
        ports = Ports.free()
        blob_dir = self.work / namespace / "blobs"
        extra = {"LOG_LEVEL": "WARNING", "RATE_LIMIT_PER_MINUTE": str(10**12)}
        extra.update(dict(kv.split("=", 1) for kv in self.args.env))
        if pythonpath:
            extra["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, os.environ.get("PYTHONPATH")]))
        env = service_env(
            self.urls,
            namespace=namespace,
            mongodb_db=f"stemflow_{namespace}",
            blob_dir=blob_dir,
            model_repo=self.work,
            ports=ports,
            extra=extra,
        )
        spec = next(s for s in service_specs(env, ports) if s.name == "gateway")
        spec.name = f"gateway-{variant}-{size}"
        target = Target(
            variant=variant,
            size=size,
            namespace=namespace,
            base_url=f"http://127.0.0.1:{ports.gateway}",
            pid=0,
            jobs=self.mongo[f"stemflow_{namespace}"]["jobs"],
            blob_dir=blob_dir,
        )
        self.targets.append(target)
        self.group.start([spec], self.work / "logs")
        self.group.wait_ready(timeout=120)
        target.pid = self.group.pid(spec.name)
        target.keys = {o: create_key(self.urls.mongodb_url, f"stemflow_{namespace}", o) for o in (*OWNERS, UPLOADER)}
        asyncio.run(announce_served_models(self.redis_url, namespace))
        started = time.perf_counter()
        seed(target.jobs, size, time.time())
        print(f"{variant}: seeded {size:,} jobs in {time.perf_counter() - started:.1f} s", flush=True)
        plan_requests(target)
        # Older code has no raw-body route: it answers 415 where ours refuses the empty body (422).
        probe = httpx.post(
            f"{target.base_url}/v1/jobs",
            content=b"",
            headers={"Authorization": f"Bearer {target.keys[UPLOADER]}", "Content-Type": "audio/wav"},
        )
        if probe.status_code == 415:
            target.unsupported.add("create_5mb_raw")
        return target

    def close(self) -> None:
        from stemflow_dev.fixtures import delete_namespace

        self.group.stop()
        for target in self.targets:
            self.mongo.drop_database(f"stemflow_{target.namespace}")
            for key in self.redis.scan_iter(match=f"{target.namespace}:*", count=5000):
                self.redis.delete(key)
            asyncio.run(delete_namespace(self.urls.amqp_url, target.namespace))
        self.mongo.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    executable = require_wrk()
    sizes = [int(s) for s in args.sizes.split(",")]
    connections = [int(c) for c in args.connections.split(",")]
    scenarios = [s for s in SCENARIOS if s in args.scenarios.split(",")]
    variants = [("current", args.current_pythonpath)]
    variants += [("baseline", args.baseline_pythonpath)] if args.baseline_pythonpath else []
    with tempfile.TemporaryDirectory(prefix="stemflow-bench-") as tmp:
        work = Path(tmp)
        bench = Bench(args, work)
        try:
            targets = [bench.start(variant, size, path) for variant, path in variants for size in sizes]
            uploads = {
                "create_5mb": (work / "upload.bin", multipart_body(work / "upload.bin", UPLOAD_MB)),
                "create_5mb_raw": (work / "upload.raw", raw_body(work / "upload.raw", UPLOAD_MB)),
            }
            profile = Path(args.profile).resolve() if args.profile else None
            wrk = Wrk(executable, work, args.duration, uploads, profile)
            results: dict[str, Any] = {
                variant: {"sizes": {str(t.size): {"figures": {}} for t in targets if t.variant == variant}}
                for variant, _ in variants
            }
            for target in targets:
                results[target.variant]["sizes"][str(target.size)]["owner_jobs"] = len(target.lines["get_miss"]) // 4
            for round_ in range(args.rounds):
                for conns in connections:
                    for scenario in scenarios:
                        # Innermost: every size and variant one after the other, so drifting load hits all alike.
                        for target in targets:
                            if scenario in target.unsupported:
                                continue
                            figures = measure(wrk, bench.redis, target, scenario, conns)
                            row = results[target.variant]["sizes"][str(target.size)]["figures"]
                            row.setdefault(f"c{conns}", {}).setdefault(scenario, []).append(figures)
                print(f"round {round_ + 1} of {args.rounds} done", flush=True)
            for variant in results.values():
                for per_size in variant["sizes"].values():
                    for row in per_size["figures"].values():
                        for name, runs in row.items():
                            row[name] = median_figures(runs)
            results["upload_500mb"] = [big_upload(targets[0], raw=raw) for raw in (False, True) if args.big_upload]
            if set(scenarios) & set(UPLOADS):
                results["upload_floor"] = upload_floor(work, uploads["create_5mb_raw"][0])
            results["profiles"] = (
                {path.stem: profile_summary(path) for path in sorted(profile.glob("*.txt"))} if profile else {}
            )
            return results
        finally:
            bench.close()


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure set from several rounds: the median of each number (the run itself when there is one)."""
    if len(runs) == 1:
        return runs[0]
    merged = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, int | float) and key != "connections":
            merged[key] = statistics.median(r[key] for r in runs)
    merged["rounds"] = len(runs)
    return merged


async def announce_served_models(redis_url: str, namespace: str) -> None:
    """Every model served in the namespace for the run (uploads need one), announced for a day: runs are long."""
    import redis.asyncio as redis_async

    from stemflow_dev.fixtures import announce_models

    client = redis_async.from_url(redis_url)
    try:
        await announce_models(client, namespace, ttl_s=24 * 3600)
    finally:
        await client.aclose()


def create_key(mongodb_url: str, database: str, owner: str) -> str:
    from pymongo import AsyncMongoClient

    from stemflow_shared.auth import ApiKeys

    async def create() -> str:
        client: AsyncMongoClient[Any] = AsyncMongoClient(mongodb_url)
        try:
            return await ApiKeys(client[database]).create(owner)
        finally:
            await client.close()

    return asyncio.run(create())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--connections", default="10,100")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per scenario")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every scenario; medians are reported")
    parser.add_argument("--env", action="append", default=[], help="extra gateway setting, NAME=value")
    parser.add_argument("--baseline-pythonpath", help="also run the gateway from this code (first on PYTHONPATH)")
    parser.add_argument("--current-pythonpath", help="run the current gateway from this code instead of the checkout")
    parser.add_argument("--name", default="gateway", help="results file name under bench/results/")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--no-big-upload", dest="big_upload", action="store_false", help="skip the 500 MB uploads")
    parser.add_argument("--profile", help="record each scenario with py-spy into this folder (slows the runs)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    results = run(args)
    for variant in ("current", "baseline"):
        if variant in results:
            add_ratios(results[variant])
    if "baseline" in results:
        results["current_vs_baseline"] = against_baseline(results)
    results.update(
        {
            "benchmark": "gateway",
            "machine": {
                "cpus": os.cpu_count(),
                "load_average_at_start": load_before,
                "load_average_at_end": os.getloadavg(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "duration_s_per_scenario": args.duration,
            "rounds": args.rounds,
            "in_run_baseline": "GET /healthz on the same gateway process, same wrk settings, same run",
            "baseline_code": args.baseline_pythonpath,
            "peer_reference": PEER,
            "goals": {**GOALS, "issue_23": GOALS_23},
            "comparison": compare(results["current"], results["upload_500mb"], results.get("upload_floor")),
        }
    )
    print_report(results)
    print(f"\nload average (1, 5, 15 min) at start {load_before}, at end {results['machine']['load_average_at_end']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
