"""What people see: live progress bars, and tables of jobs, stems and analysis (rich)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console, Group
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

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
            TimeElapsedColumn(),
            console=console,
            transient=False,
            refresh_per_second=8,
        )
        self._tasks: dict[str, TaskID] = {}

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

    def update(self, job_id: str, status: str, progress: dict[str, Any] | None) -> None:
        task = self._tasks.get(job_id)
        if task is None:
            return
        fields: dict[str, Any] = {"status": status_text(status)}
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
    value = float(size or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def analysis_table(job: dict[str, Any]) -> Table | None:
    """Tempo, key, loudness and beats of a finished job, with confidences."""
    analysis = (job.get("result") or {}).get("analysis")
    if not analysis:
        return None
    table = Table(title=f"Analysis of {job_name(job)}", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("Tempo", f"{analysis['tempo_bpm']:.1f} BPM  (confidence {_percent(analysis['tempo_confidence'])})")
    table.add_row("Key", f"{analysis['key']}  (confidence {_percent(analysis['key_confidence'])})")
    table.add_row("Loudness", f"{analysis['loudness_lufs']:.1f} LUFS")
    table.add_row("True peak", f"{analysis['true_peak_dbfs']:.1f} dBFS")
    table.add_row("Duration", _duration(analysis["duration_s"]))
    table.add_row("Beats", str(analysis["beat_count"]))
    return table


def stems_table(job: dict[str, Any], files: dict[str, str] | None = None) -> Table | None:
    stems = (job.get("result") or {}).get("stems") or []
    if not stems:
        return None
    table = Table(title=f"Stems of {job_name(job)}", title_justify="left")
    table.add_column("stem", style="bold")
    table.add_column("format")
    table.add_column("size", justify="right")
    table.add_column("duration", justify="right")
    table.add_column("file" if files else "url", overflow="fold")
    for stem in stems:
        where = (files or {}).get(stem["name"]) or stem["url"]
        table.add_row(stem["name"], stem["format"], _size(stem["size"]), _duration(stem["duration"]), where)
    return table


def job_summary(job: dict[str, Any]) -> Group:
    """Everything `stemflow status` shows about one job."""
    table = Table(title=f"Job {job['id']}", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    progress = job.get("progress") or {}
    table.add_row("Status", status_text(job["status"]))
    table.add_row("Progress", f"{float(progress.get('overall') or 0):.0f}%  {stages_text(progress)}")
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
    for extra in (stems_table(job), analysis_table(job)):
        if extra is not None:
            parts.append(extra)
    return Group(*parts)


def jobs_table(items: list[dict[str, Any]]) -> Table:
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
    table.add_column("input", overflow="ellipsis", no_wrap=True, max_width=40)
    for job in items:
        analysis = (job.get("result") or {}).get("analysis") or {}
        tempo = f"{analysis['tempo_bpm']:.1f}" if analysis.get("tempo_bpm") is not None else ""
        status = status_text(job["status"])
        if job["status"] not in ("completed", "failed", "cancelled"):
            status += f" {float((job.get('progress') or {}).get('overall') or 0):.0f}%"
        table.add_row(
            job["id"],
            str(job.get("created_at", ""))[5:16].replace("T", " "),
            status,
            tempo,
            analysis.get("key") or "",
            job_name(job),
        )
    return table
