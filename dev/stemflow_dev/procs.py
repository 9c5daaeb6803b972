"""A small supervisor for the services run as local processes.

Each service runs in its own process group (so that its children stop with
it), writes stdout and stderr to `<log_dir>/<name>.log`, and is ready when its
`ready_url` answers 200. `ProcessGroup.save` records the pids so that another
process (`down`) can stop them with `stop_saved`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

SAVED_FILE = "services.json"
_POLL_S = 0.1  # external processes: their state can only be polled


@dataclass
class ServiceSpec:
    """One service process. `env` is added to the current environment."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ready_url: str | None = None


class ServiceError(RuntimeError):
    """A service exited or never became ready; the message ends with the tail of its log."""


class ProcessGroup:
    """Start, watch and stop a set of service processes."""

    def __init__(self) -> None:
        self._specs: dict[str, ServiceSpec] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._log_dir = Path(".")

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self, specs: Iterable[ServiceSpec], log_dir: Path) -> None:
        self._log_dir = Path(log_dir)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            if self.is_running(spec.name):
                raise ValueError(f"service {spec.name} is already running")
            self._specs[spec.name] = spec
            self._launch(spec)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Return when every ready_url answers 200; raise ServiceError naming the first one that did not."""
        deadline = time.monotonic() + timeout
        pending = set(self._procs)
        with httpx.Client(timeout=1.0) as client:
            while pending:
                for name in sorted(pending):
                    if self._procs[name].poll() is not None:
                        raise ServiceError(self._describe(name, f"exited with code {self._procs[name].returncode}"))
                    url = self._specs[name].ready_url
                    if url is None or _answers_200(client, url):
                        pending.discard(name)
                if pending and time.monotonic() > deadline:
                    name = sorted(pending)[0]
                    raise ServiceError(self._describe(name, f"was not ready within {timeout:.0f} s"))
                if pending:
                    time.sleep(_POLL_S)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every service, SIGKILL what is left after `grace` seconds."""
        names = list(self._procs)
        for name in names:
            self._signal(name, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name in names:
            self._wait_gone(name, deadline)
        self._procs.clear()

    def kill(self, name: str) -> None:
        """SIGKILL one service and its children (for fault tests)."""
        proc = self._procs[name]
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_group_gone(proc.pid, time.monotonic() + 5.0)

    def restart(self, name: str, grace: float = 10.0) -> None:
        """Stop one service if it still runs, then start it again (its log is appended to)."""
        if name in self._procs:
            self._signal(name, signal.SIGTERM)
            self._wait_gone(name, time.monotonic() + grace)
        self._launch(self._specs[name])

    def is_running(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def pid(self, name: str) -> int:
        return self._procs[name].pid

    def log_path(self, name: str) -> Path:
        return self._log_dir / f"{name}.log"

    def save(self, state_dir: Path) -> Path:
        """Record the running services in `state_dir` for `stop_saved`."""
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        records = {
            name: {"pid": proc.pid, "started": _start_time(proc.pid), "log": str(self.log_path(name))}
            for name, proc in self._procs.items()
            if proc.poll() is None
        }
        path = state_dir / SAVED_FILE
        path.write_text(json.dumps(records, indent=2) + "\n")
        return path

    def _launch(self, spec: ServiceSpec) -> None:
        log_path = self.log_path(spec.name)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
        with open(log_path, "ab") as log_file:
            log_file.write(f"==> {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(spec.argv)}\n".encode())
            log_file.flush()
            self._procs[spec.name] = subprocess.Popen(
                spec.argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: signals reach its children too
            )

    def _signal(self, name: str, sig: signal.Signals) -> None:
        proc = self._procs[name]
        # A reaped leader whose group is empty: its pid may belong to someone else by now.
        if proc.poll() is None or _group_alive(proc.pid):
            _signal_group(proc.pid, sig)

    def _wait_gone(self, name: str, deadline: float) -> None:
        proc = self._procs.pop(name)
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        if not _wait_group_gone(proc.pid, deadline):
            _signal_group(proc.pid, signal.SIGKILL)
            _wait_group_gone(proc.pid, time.monotonic() + 5.0)

    def _describe(self, name: str, what: str) -> str:
        return f"service {name} {what}; last lines of {self.log_path(name)}:\n{log_tail(self.log_path(name))}"


def stop_saved(state_dir: Path, grace: float = 10.0) -> None:
    """Stop the services a `ProcessGroup.save` recorded in `state_dir`, possibly from another process."""
    path = Path(state_dir) / SAVED_FILE
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        return
    # Signal only a process that is still the one recorded: a pid can be reused.
    pids = [r["pid"] for r in records.values() if pid_alive(r["pid"]) and _start_time(r["pid"]) == r["started"]]
    for pid in pids:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for pid in pids:
        if not _wait_group_gone(pid, deadline):
            _signal_group(pid, signal.SIGKILL)
    for pid in pids:
        _wait_group_gone(pid, time.monotonic() + 5.0)
    path.unlink(missing_ok=True)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 16384))
            return b"\n".join(file.read().splitlines()[-lines:]).decode(errors="replace")
    except OSError:
        return "(no log)"


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _answers_200(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process remains in the process group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _wait_group_gone(pgid: int, deadline: float) -> bool:
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, it names one process."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
