"""The instruction counter (stemflow_dev.instructions) on a real valgrind: counts follow the work, not the clock."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stemflow_dev import instructions

pytestmark = pytest.mark.skipif(instructions.missing() is not None, reason=str(instructions.missing()))

CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    from stemflow_dev.instructions import Counter

    def work(n):
        return sum(len(json.dumps({"i": i, "s": "x" * (i % 7)})) for i in range(n))

    counter = Counter.from_environment()
    counts = {}
    for name, n in (("warm", 2000), ("one", 2000), ("two", 4000), ("sleep", 0), ("thread", 0)):
        counter.start()
        if name == "sleep":
            time.sleep(0.2)  # a process that waits runs next to nothing
        elif name == "thread":
            worker = threading.Thread(target=work, args=(2000,))
            worker.start()
            worker.join()
        else:
            work(n)
        counts[name] = counter.stop()
    print(json.dumps(counts))
    """
)


def test_counts_follow_the_work_in_every_thread_and_not_the_clock(tmp_path: Path) -> None:
    out = tmp_path / "callgrind"
    argv = instructions.callgrind_argv([sys.executable, "-c", CHILD], out)
    done = subprocess.run(
        argv, env={**_environment(), **instructions.child_environment(out)}, capture_output=True, text=True, check=True
    )
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["one"] > 1_000_000
    assert counts["two"] / counts["one"] == pytest.approx(2.0, rel=0.05)
    # Another thread's work is counted like the main thread's (the main thread only waits on it).
    assert counts["thread"] / counts["one"] == pytest.approx(1.0, rel=0.1)
    assert counts["sleep"] < counts["one"] / 20
    assert not list(out.glob("callgrind.out.*")), "each stretch's dump is read and removed"


def test_kept_dumps_hold_each_stretchs_count_in_order(tmp_path: Path) -> None:
    out = tmp_path / "callgrind"
    argv = instructions.callgrind_argv([sys.executable, "-c", CHILD], out)
    environment = {**_environment(), **instructions.child_environment(out), instructions.KEEP_ENV: "1"}
    done = subprocess.run(argv, env=environment, capture_output=True, text=True, check=True)
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    kept = [instructions.read_total(out / f"stretch.{n}") for n in range(1, 6)]
    assert kept == [counts[name] for name in ("warm", "one", "two", "sleep", "thread")]
    assert not (out / "stretch.6").exists()


def test_outside_valgrind_there_is_no_counter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(instructions.OUT_DIR_ENV, raising=False)
    assert instructions.Counter.from_environment() is None
    monkeypatch.setenv(instructions.OUT_DIR_ENV, str(tmp_path))
    with pytest.raises(instructions.Unavailable, match="does not run under valgrind"):
        instructions.Counter.from_environment()


def test_read_total_takes_totals_or_an_older_dumps_summary(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.out.1"
    dump.write_text("version: 1\nsummary: 1234\nevents: Ir\nfn=(1) f\n3 1234\ntotals: 1234\n")
    assert instructions.read_total(dump) == 1234
    dump.write_text("version: 1\nevents: Ir\nsummary: 99\n")
    assert instructions.read_total(dump) == 99
    dump.write_text("version: 1\n")
    with pytest.raises(RuntimeError, match="no totals"):
        instructions.read_total(dump)


def _environment() -> dict[str, str]:
    import os

    return dict(os.environ)
