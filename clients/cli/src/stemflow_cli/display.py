"""What people see: live progress bars, and tables of jobs, stems and analysis (rich)."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich import box, filesize
from rich.console import Console, Group
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

STAGES = ("ingest", "separation", "analysis")
STATUS_STYLE = {
    "queued": "yellow",
    "ingesting": "cyan",
    "processing": "cyan",
    "completed": "green",
    "failed": "bold red",
    "cancelled": "magenta",
}
STAGE_MARK = {"completed": "✓", "failed": "✗", "skipped": "skipped"}


def stages_text(progress: dict[str, Any]) -> str:
    """'ingest ✓  separation 40%  analysis ✓': each stage's mark or percent."""
    parts = []
    for stage in STAGES:
        info = progress.get(stage) or {}
        status = info.get("status", "pending")
        mark = STAGE_MARK.get(status) or ("…" if status == "pending" else f"{info.get('percent', 0):.0f}%")
        parts.append(f"{stage} {mark}")
    return "  ".join(parts)


def status_text(status: str) -> str:
    style = STATUS_STYLE.get(status, "")
    return f"[{style}]{status}[/]" if style else status


def wait_text(seconds: Any) -> str:
    """An estimate of seconds, as rough as it is: '~40 s', '~3 min'."""
    if not isinstance(seconds, int | float):
        return "?"
    if seconds < 90:
        return f"~{math.ceil(max(seconds, 0.0))} s"
    return f"~{round(seconds / 60)} min"


def start_in(queue: dict[str, Any], elapsed: float = 0.0) -> float | None:
    """Seconds until a waiting job should start: its `estimated_start_s` read `elapsed` seconds ago,
    or its `estimated_start_at` (ISO time); None when the pool's pace is not known yet."""
    seconds = queue.get("estimated_start_s")
    if isinstance(seconds, int | float):
        return seconds - elapsed
    try:
        at = datetime.fromisoformat(str(queue["estimated_start_at"]))
    except (KeyError, ValueError):
        return None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp() - time.time()


def queue_text(queue: dict[str, Any] | None, elapsed: float = 0.0) -> str:
    """'2 ahead · starts in ~40 s' for a job whose separation waits its turn ('' for one that does not),
    `elapsed` seconds after the estimate was read."""
    if not queue:
        return ""
    text = f"{int(queue.get('ahead') or 0)} ahead"
    start = start_in(queue, elapsed)
    if start is not None:
        text += f" · starts in {wait_text(start)}"
    return text


def separation_waiting(progress: dict[str, Any] | None) -> bool:
    """Whether a job's separation may still wait its turn: its stage is 'running' at 0% from the moment it is queued."""
    stage = (progress or {}).get("separation") or {}
    return stage.get("status", "pending") == "pending" or (stage["status"] == "running" and not stage.get("percent"))


class QueueColumn(ProgressColumn):
    """A waiting job's place in its model's queue, its estimated start counting down between reads."""

    def render(self, task: Task) -> Text:
        queue = task.fields.get("queue")
        return Text(queue_text(queue, time.monotonic() - task.fields.get("queue_at", 0.0)), style="yellow")


class Board:
    """One live progress bar per job, updated from job documents, snapshots and job.* events."""

    def __init__(self, console: Console, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[status]}"),
            TextColumn("[dim]{task.fields[stages]}"),
            QueueColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            refresh_per_second=8,
        )
        self._tasks: dict[str, TaskID] = {}
        self._queues: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> Board:
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._progress.stop()

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._tasks

    def add(self, job_id: str, name: str) -> None:
        if job_id not in self._tasks:
            label = name if len(name) <= 28 else name[:27] + "…"
            self._tasks[job_id] = self._progress.add_task(label, total=100, status="", stages="")

    def rename(self, old: str, new: str) -> None:
        """Rebind an upload's bar to the job the upload created."""
        if old in self._tasks:
            self._tasks[new] = self._tasks.pop(old)

    def uploaded(self, key: str, fraction: float) -> None:
        task = self._tasks.get(key)
        if task is not None:
            self._progress.update(task, completed=100.0 * fraction, status="uploading")

    def queue_of(self, job_id: str, progress: dict[str, Any] | None) -> dict[str, Any] | None:
        """The queue last read for a job, while its separation has not started (progress events carry none)."""
        return self._queues.get(job_id) if separation_waiting(progress) else None

    def queued(self) -> list[str]:
        """The jobs shown waiting in a queue: their estimates are worth reading again."""
        return list(self._queues)

    def update(
        self,
        job_id: str,
        status: str,
        progress: dict[str, Any] | None,
        queue: dict[str, Any] | None = None,
        why: str | None = None,
    ) -> None:
        """Show a job's state; `why`: the error code of a failed job."""
        task = self._tasks.get(job_id)
        if task is None:
            return
        fields: dict[str, Any] = {"status": status_text(status) + (f" ({why})" if why and status == "failed" else "")}
        queue = None if status in ("completed", "failed", "cancelled") else queue
        if queue is not self._queues.get(job_id):
            fields.update(queue=queue, queue_at=time.monotonic())
        if queue:
            self._queues[job_id] = queue
        else:
            self._queues.pop(job_id, None)
        if progress:
            fields["stages"] = stages_text(progress)
            fields["completed"] = float(progress.get("overall") or 0.0)
        if status == "completed":
            fields["completed"] = 100.0
        self._progress.update(task, **fields)
        if status in ("completed", "failed", "cancelled"):
            self._progress.stop_task(task)


def job_name(job: dict[str, Any]) -> str:
    source = job.get("input") or {}
    return source.get("filename") or source.get("source_url") or job["id"]


def _percent(value: Any) -> str:
    return f"{float(value) * 100:.0f}%" if isinstance(value, int | float) else "?"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    minutes, secs = divmod(float(seconds), 60)
    return f"{int(minutes)}:{secs:04.1f}"


def _size(size: Any) -> str:
    """Bytes as the download bars count them (rich's decimal units: 1 MB = 1,000,000 bytes)."""
    return filesize.decimal(int(size or 0))


def analysis_table(job: dict[str, Any], full: dict[str, Any] | None = None) -> Table | None:
    """Tempo, key (each with its runner-up), key codes, chords, loudness and beats of a finished job.

    `full`: the whole analysis (GET .../analysis); the job document holds only its summary."""
    summary = (job.get("result") or {}).get("analysis")
    if not summary:
        return None
    analysis = {**summary, **(full or {})}
    table = Table(title=f"Analysis of {job_name(job)}", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    tempo = f"{analysis['tempo_bpm']:.1f} BPM  (confidence {_percent(analysis['tempo_confidence'])})"
    others = [f"{t['bpm']:.1f} BPM ({_percent(t['confidence'])})" for t in analysis.get("tempo_alternatives") or []]
    table.add_row("Tempo", tempo + (f"  or {', '.join(others)}" if others else ""))
    key = f"{analysis['key']}  (confidence {_percent(analysis['key_confidence'])})"
    runner_up = (analysis.get("key_alternatives") or [None])[0]
    if runner_up:
        key += f"  or {runner_up['key']} ({_percent(runner_up['confidence'])})"
    table.add_row("Key", key)
    if analysis.get("key_camelot"):
        table.add_row("Key codes", f"Camelot {analysis['key_camelot']}  Open Key {analysis.get('key_open_key') or '-'}")
    if analysis.get("chords"):
        table.add_row("Chords", _chord_line(analysis["chords"]))
    table.add_row("Loudness", f"{analysis['loudness_lufs']:.1f} LUFS")
    table.add_row("True peak", f"{analysis['true_peak_dbfs']:.1f} dBFS")
    table.add_row("Duration", _duration(analysis["duration_s"]))
    table.add_row("Beats", str(analysis["beat_count"]))
    return table


def _chord_line(chords: list[dict[str, Any]], limit: int = 16) -> str:
    """The chord changes in order ("E♭ B♭ Cm A♭ …"), no-chord stretches left out."""
    labels = [c["label"] for c in chords if c.get("root")]
    return " ".join(labels[:limit]) + (" …" if len(labels) > limit else "")


def stem_sets(job: dict[str, Any]) -> list[tuple[str | None, list[dict[str, Any]]]]:
    """(target or None, stems) of each separation the job made: its targets', or its one set."""
    result = job.get("result") or {}
    targets = result.get("targets") or {}
    if targets:
        return [(name, t["stems"]) for name, t in targets.items() if t.get("stems")]
    return [(None, result["stems"])] if result.get("stems") else []


def stems_table(job: dict[str, Any], files: dict[str, str] | None = None) -> Table | None:
    """Every stem of every target: with `files` ({stem or target/stem: path}), only the files written, as paths
    with their size on disk; else as links."""
    rows = []
    for target, stems in stem_sets(job):
        for stem in stems:
            key = stem["name"] if target is None else f"{target}/{stem['name']}"
            if files is None:
                rows.append((target, stem, stem["size"], stem["url"]))
            elif key in files:
                path = Path(files[key])
                rows.append((target, stem, path.stat().st_size if path.exists() else stem["size"], str(path)))
    if not rows:
        return None
    table = Table(title=f"Stems of {job_name(job)}", title_justify="left")
    with_targets = any(target for target, *_ in rows)
    if with_targets:
        table.add_column("target")
    table.add_column("stem", style="bold")
    table.add_column("format")
    table.add_column("size", justify="right")
    table.add_column("duration", justify="right")
    table.add_column("file" if files is not None else "url", overflow="fold")
    for target, stem, size, where in rows:
        cells = [stem["name"], stem["format"], _size(size), _duration(stem["duration"]), where]
        table.add_row(*([target or ""] if with_targets else []), *cells)
    return table


def job_summary(job: dict[str, Any], analysis: dict[str, Any] | None = None) -> Group:
    """Everything `stemflow status` shows about one job."""
    table = Table(title=f"Job {job['id']}", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    progress = job.get("progress") or {}
    table.add_row("Status", status_text(job["status"]))
    table.add_row("Progress", f"{float(progress.get('overall') or 0):.0f}%  {stages_text(progress)}")
    if job.get("queue"):
        table.add_row("Queue", queue_text(job["queue"]))
    table.add_row("Input", job_name(job))
    source = job.get("input") or {}
    if source.get("duration_s"):
        table.add_row(
            "Audio",
            f"{_duration(source['duration_s'])}, {source.get('sample_rate', '?')} Hz, {source.get('channels', '?')} ch",
        )
    options = job.get("options") or {}
    shown = ("stems", "model", "quality", "output_format", "trim_start", "trim_end")
    table.add_row("Options", "  ".join(f"{k}={options[k]}" for k in shown if options.get(k) is not None))
    table.add_row("Created", str(job.get("created_at", "")))
    table.add_row("Updated", str(job.get("updated_at", "")))
    if job.get("error"):
        table.add_row("Error", f"[red]{job['error'].get('code')}[/]: {job['error'].get('message', '')}")
    parts: list[Any] = [table]
    for extra in (stems_table(job), analysis_table(job, analysis)):
        if extra is not None:
            parts.append(extra)
    return Group(*parts)


def print_whole(console: Console, renderable: Any) -> None:
    """Print as wide as `renderable` needs (for a pipe: nothing cut to a terminal's width)."""
    needed = console.measure(renderable, options=console.options.update_width(1_000_000)).maximum
    width = console.width
    console.width = max(width, needed)
    try:
        console.print(renderable, crop=False)
    finally:
        console.width = width


def jobs_table(items: list[dict[str, Any]], *, fit: bool = True) -> Table:
    """Jobs, newest first; a failed job with why. `fit`: names give way to a narrow terminal (else all is kept)."""
    table = Table(
        title="Your jobs (newest first)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    # Ids stay whole (people copy them); the input's name gives way on a narrow terminal.
    table.add_column("id", no_wrap=True, min_width=32)
    table.add_column("created", no_wrap=True, min_width=11)
    table.add_column("status", no_wrap=True, min_width=9)
    table.add_column("tempo", justify="right", no_wrap=True, min_width=5)
    table.add_column("key", no_wrap=True, min_width=8)
    table.add_column("input", overflow="ellipsis" if fit else "ignore", no_wrap=True, max_width=40 if fit else None)
    table.add_column("note", overflow="ellipsis" if fit else "ignore", no_wrap=True)
    for job in items:
        analysis = (job.get("result") or {}).get("analysis") or {}
        tempo = f"{analysis['tempo_bpm']:.1f}" if analysis.get("tempo_bpm") is not None else ""
        status = status_text(job["status"])
        if job["status"] not in ("completed", "failed", "cancelled"):
            status += f" {float((job.get('progress') or {}).get('overall') or 0):.0f}%"
            if job.get("queue"):
                status += f" ({int(job['queue'].get('ahead') or 0)} ahead)"
        table.add_row(
            job["id"],
            str(job.get("created_at", ""))[5:16].replace("T", " "),
            status,
            tempo,
            analysis.get("key") or "",
            job_name(job),
            _note(job),
        )
    return table


def _note(job: dict[str, Any]) -> str:
    """Why a job failed (its error code and message), or that some of its targets did."""
    error = job.get("error") or {}
    if job["status"] == "failed" and error:
        return f"[red]{error.get('code', '?')}[/]: {error.get('message', '')}".rstrip(": ")
    if job.get("partial"):
        return "some targets failed"
    return ""


def models_table(catalogue: dict[str, Any]) -> Table:
    """`stemflow models`: each model, its stem counts, whether a worker serves it now, its queue and wait."""
    table = Table(title="Models", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model", no_wrap=True)
    table.add_column("stems", no_wrap=True)
    table.add_column("served", no_wrap=True)
    table.add_column("workers", justify="right")
    table.add_column("queue", justify="right")
    table.add_column("est. wait", justify="right", no_wrap=True)
    table.add_column("about", overflow="fold")
    default = catalogue.get("default_model")
    for model in catalogue.get("models", []):
        served = bool(model.get("served"))
        table.add_row(
            model["name"] + (" (default)" if model["name"] == default else ""),
            ", ".join(str(n) for n in model.get("stems", [])),
            "[green]yes[/]" if served else "[red]no[/]",
            str(model.get("workers", 0)),
            str(model.get("queue_depth", 0)),
            wait_text(model.get("estimated_wait_s")) if served else "-",
            model.get("description", ""),
        )
    return table
