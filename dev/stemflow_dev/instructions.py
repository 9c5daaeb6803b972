"""Instructions a stretch of a Python process runs, counted by valgrind's callgrind: a measure of CPU work that
does not move with the machine's load, the core a process lands on or its neighbours (CPU time on a shared
2-core VM moves by 3-4% from process to process, more than a 3% goal measures).

The process runs under `callgrind_argv(...)` (instrumentation off, so start-up runs at near native speed);
around each measured stretch it calls `Counter.start()` and `Counter.stop()`, which switch instrumentation on,
zero the counts, and dump them (callgrind's client requests, through a small C shim built once with the
system's compiler and valgrind's header). Every thread of the process is counted while it runs, as CPU time
counts them; the kernel's work for the process (socket copies, page faults) is not. Instructions are not
cycles: a change that only moves memory traffic or cache misses shows in time, not here.

    argv = callgrind_argv([sys.executable, "script.py"], out_dir)  # in the parent
    counter = Counter.from_environment()                            # in the child: None when not under valgrind
    counter.start(); work(); instructions = counter.stop()
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

OUT_DIR_ENV = "STEMFLOW_CALLGRIND_OUT"
KEEP_ENV = "STEMFLOW_CALLGRIND_KEEP"
SHIM = r"""
#include <valgrind/callgrind.h>
int stemflow_on_valgrind(void) { return RUNNING_ON_VALGRIND; }
void stemflow_start(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_ZERO_STATS; }
void stemflow_stop(void) { CALLGRIND_DUMP_STATS_AT("stemflow"); CALLGRIND_STOP_INSTRUMENTATION; }
"""
HEADER = Path("/usr/include/valgrind/callgrind.h")


class Unavailable(RuntimeError):
    """valgrind, a C compiler or valgrind's header is missing."""


def missing() -> str | None:
    """What this machine lacks to count instructions (None: nothing)."""
    if shutil.which("valgrind") is None:
        return "valgrind is not installed (Debian: apt-get install -y valgrind)"
    if shutil.which("cc") is None:
        return "no C compiler (cc) to build the callgrind shim"
    if not HEADER.exists():
        return f"{HEADER} is missing (it comes with Debian's valgrind package)"
    return None


def shim_path() -> Path:
    """The shim's shared library, built on first use into a cache folder keyed by its source."""
    if reason := missing():
        raise Unavailable(reason)
    digest = hashlib.sha256(SHIM.encode()).hexdigest()[:16]
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stemflow" / "callgrind"
    library = folder / f"shim-{digest}.so"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            source = Path(tmp) / "shim.c"
            source.write_text(SHIM)
            built = Path(tmp) / library.name
            subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(built), str(source)], check=True)
            built.replace(library)  # atomic: a concurrent build leaves one whole file
    return library


def callgrind_argv(argv: list[str], out_dir: Path) -> list[str]:
    """`argv` run under callgrind with instrumentation off until a Counter starts it; dumps go to `out_dir`.

    The child finds `out_dir` in its environment (OUT_DIR_ENV): set it there with `child_environment`.
    """
    shim_path()  # built here, once, not in each child
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--quiet",
        f"--callgrind-out-file={out_dir / 'callgrind.out'}",
        *argv,
    ]


def child_environment(out_dir: Path) -> dict[str, str]:
    """What the child's environment needs for Counter.from_environment()."""
    return {OUT_DIR_ENV: str(out_dir)}


class Counter:
    """Counts the instructions of stretches of this process, which must run under `callgrind_argv`."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._shim = ctypes.CDLL(str(shim_path()))
        if not self._shim.stemflow_on_valgrind():
            raise Unavailable("this process does not run under valgrind")
        self._running = False
        # STEMFLOW_CALLGRIND_KEEP=1: each stretch's dump is kept as out_dir/stretch.N (functions' counts in it).
        self.keep = os.environ.get(KEEP_ENV) == "1"
        self.kept = 0

    @classmethod
    def from_environment(cls) -> Counter | None:
        """A counter when this process was started by `callgrind_argv` with `child_environment`, else None."""
        out_dir = os.environ.get(OUT_DIR_ENV)
        return cls(Path(out_dir)) if out_dir else None

    def start(self) -> None:
        """Instrument from here on, counts zeroed."""
        if self._running:
            raise RuntimeError("the counter is already running")
        self._running = True
        self._shim.stemflow_start()

    def stop(self) -> int:
        """Instructions run (all threads) since start()."""
        if not self._running:
            raise RuntimeError("the counter was not started")
        self._shim.stemflow_stop()
        self._running = False
        dumps = sorted(self.out_dir.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
        if not dumps:
            raise RuntimeError(f"callgrind wrote no dump into {self.out_dir}")
        total = read_total(dumps[-1])
        for dump in dumps:
            if self.keep:  # for callgrind_annotate: each stretch's dump, numbered in order
                self.kept += 1
                dump.rename(self.out_dir / f"stretch.{self.kept}")
            else:
                dump.unlink()
        return total


def read_total(dump: Path) -> int:
    """The instructions (Ir) of a callgrind dump: its `totals:` line, or `summary:` in older formats."""
    summary = None
    with dump.open() as lines:
        for line in lines:
            if line.startswith("totals:"):
                return int(line.split()[1])
            if line.startswith("summary:"):
                summary = int(line.split()[1])
    if summary is None:
        raise RuntimeError(f"{dump} has no totals or summary line")
    return summary
