"""The subcommands: each takes the parsed arguments and returns an exit code."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from . import config as config_module
from . import models as models_module
from .api import TERMINAL_STATUSES, Api, is_url
from .config import Config, events_base
from .display import (
    Board,
    analysis_table,
    job_name,
    job_summary,
    jobs_table,
    models_table,
    print_whole,
    stems_table,
)
from .errors import CliError, Exit
from .events import JOB_PROGRESS, TERMINAL_EVENTS, EventStream
from .songs import check_song

# How often a job shown waiting in a queue is read again: no event says when the jobs ahead of it move.
QUEUE_REFRESH_S = 5.0


@dataclass
class Context:
    config: Config
    out: Console
    err: Console
    json: bool = False
    quiet: bool = False
    # (id, song) of every job this command submitted: named again if it is interrupted.
    submitted: list[tuple[str, str]] = field(default_factory=list)

    def api(self) -> Api:
        return Api(self.config.url, self.config.require_key())

    @property
    def live(self) -> bool:
        """Whether to draw progress bars (never in --json or --quiet mode)."""
        return not (self.json or self.quiet)

    def emit(self, document: Any) -> None:
        """One JSON document on its own line of stdout (--json output is JSON Lines)."""
        sys.stdout.write(json.dumps(document, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    def report(self, error: CliError) -> None:
        if self.json:
            sys.stderr.write(json.dumps(error.as_json()) + "\n")
            sys.stderr.flush()
            return
        self.err.print(f"[bold red]error:[/] {error.message}", highlight=False, markup=True)
        if error.hint:
            self.err.print(f"[dim]hint: {error.hint}[/]", highlight=False)

    def say(self, message: str) -> None:
        if not (self.json or self.quiet):
            self.err.print(message, highlight=False)


class Outcome:
    """The exit code of a command that handles several jobs: the highest of their failures."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.code = Exit.OK

    def fail(self, error: CliError) -> None:
        self.ctx.report(error)
        self.code = max(self.code, error.exit_code)

    async def each(self, items: list[str], action: Callable[[str], Awaitable[None]]) -> int:
        for item in items:
            try:
                await action(item)
            except CliError as error:
                self.fail(error)
        return int(self.code)


# ---- submit


async def submit(
    ctx: Context,
    songs: list[str],
    options: dict[str, Any],
    *,
    wait: bool,
    out: Path | None,
    timeout: float | None,
    batch: bool = False,
) -> int:
    for song in songs:
        if not is_url(song):
            check_song(song)
    if batch and len({is_url(song) for song in songs}) > 1:
        raise CliError("a batch is either all files or all URLs", Exit.USAGE, hint="submit them as two batches")
    outcome = Outcome(ctx)
    jobs: dict[str, dict[str, Any]] = {}
    async with ctx.api() as api:
        options = await _check_models(ctx, api, options)
        with Board(ctx.err, enabled=ctx.live) as board:
            if batch:
                try:
                    made = await _submit_batch(api, board, songs, options)
                except CliError as error:
                    outcome.fail(error)
                    made = []
                if made:
                    ctx.say(f"submitted {len(made)} songs as batch [bold]{made[0]['batch_id']}[/]")
                for doc in made:
                    _announce(ctx, doc)
            else:
                made = []
                for index, song in enumerate(songs):
                    try:
                        made.append(await _submit_one(api, board, f"upload-{index}", song, options))
                    except CliError as error:
                        outcome.fail(error)
                    else:
                        _announce(ctx, made[-1])
            for doc in made:
                jobs[doc["id"]] = doc
            if wait and jobs:
                try:
                    await _follow(ctx, api, jobs, board, timeout)
                except CliError as error:
                    outcome.fail(error)
                    _emit_all(ctx, jobs.values())
                    return int(outcome.code)
        files = await _finish(ctx, api, jobs, outcome, out) if wait else {}
    if wait:
        _emit_all(ctx, jobs.values(), files)
    if not wait and jobs:
        ctx.say("follow them with [bold]stemflow watch[/], or [bold]stemflow status JOB[/]")
    return int(outcome.code)


async def _check_models(ctx: Context, api: Api, options: dict[str, Any]) -> dict[str, Any]:
    """Refuse, before any upload, a model or stem count that the service does not run now; the options to send
    (`--stems 6` alone names the six-source model)."""
    if options.get("separate") is False:
        return options
    try:
        catalogue = await api.models()
    except CliError as error:
        if error.exit_code != Exit.NOT_FOUND:
            raise
        ctx.say("[dim]this gateway does not list its models (no /v1/models): the server checks the options[/]")
        return models_module.resolve(None, options)[0]
    options, chosen = models_module.resolve(catalogue, options)
    if chosen:
        ctx.say(chosen)
    models_module.check(catalogue, options)
    return options


def _announce(ctx: Context, doc: dict[str, Any]) -> None:
    """A job's id as soon as it exists, whatever the mode: scripts get its document on stdout at once."""
    ctx.submitted.append((doc["id"], job_name(doc)))
    if ctx.json:
        ctx.emit(doc)
    else:
        ctx.err.print(
            f"submitted {job_name(doc)} as job [bold]{doc['id']}[/] ({doc['status']})", highlight=False, soft_wrap=True
        )


async def _submit_batch(api: Api, board: Board, songs: list[str], options: dict[str, Any]) -> list[dict[str, Any]]:
    """All songs in one POST /v1/batches; their jobs, in the songs' order."""
    keys = [f"upload-{index}" for index in range(len(songs))]
    for key, song in zip(keys, songs, strict=True):
        board.add(key, _label(song))
    if is_url(songs[0]):
        batch = await api.submit_batch_urls(songs, options)
    else:
        paths = [Path(song) for song in songs]
        counters = [_upload_counter(board, key, path) for key, path in zip(keys, paths, strict=True)]
        batch = await api.submit_batch_files(paths, options, counters)
    docs: list[dict[str, Any]] = batch["jobs"]
    for key, doc in zip(keys, docs, strict=True):
        _bind(board, key, doc)
    return docs


def _upload_counter(board: Board, key: str, path: Path) -> Callable[[int], None]:
    total = max(path.stat().st_size, 1)
    sent = 0

    def on_bytes(count: int) -> None:
        nonlocal sent
        sent += count
        board.uploaded(key, min(sent / total, 1.0))

    return on_bytes


async def _submit_one(api: Api, board: Board, key: str, song: str, options: dict[str, Any]) -> dict[str, Any]:
    board.add(key, _label(song))
    if is_url(song):
        doc = await api.submit_url(song, options)
    else:
        doc = await api.submit_file(Path(song), options, _upload_counter(board, key, Path(song)))
    _bind(board, key, doc)
    return doc


def _label(song: str) -> str:
    """What an upload's bar is called: the file's name, or the last part of the URL."""
    return (song.rsplit("/", 1)[-1] or song) if is_url(song) else Path(song).name


def _bind(board: Board, key: str, doc: dict[str, Any]) -> None:
    """Rebind an upload's bar to the job it created, showing the job's state."""
    board.rename(key, doc["id"])
    board.update(doc["id"], doc["status"], doc.get("progress"), doc.get("queue"))


async def _follow(ctx: Context, api: Api, jobs: dict[str, dict[str, Any]], board: Board, timeout: float | None) -> None:
    """Follow `jobs` over the WebSocket until each has ended; `jobs` ends up holding their final documents."""
    pending = {job_id for job_id, doc in jobs.items() if doc["status"] not in TERMINAL_STATUSES}
    if not pending:
        return
    first = jobs[next(iter(pending))]
    url = ctx.config.events_url or events_base(first["links"]["events"])
    stream = EventStream(url, ctx.config.require_key(), sorted(pending))

    async def settle(job_id: str) -> None:
        doc = await api.job(job_id)
        jobs[job_id] = doc
        board.update(job_id, doc["status"], doc.get("progress"), doc.get("queue"), (doc.get("error") or {}).get("code"))
        if doc["status"] in TERMINAL_STATUSES:
            pending.discard(job_id)

    try:
        async with (
            asyncio.timeout(timeout),
            _queue_refresher(ctx, api, board),
            contextlib.aclosing(stream.frames()) as frames,
        ):
            async for frame in frames:
                kind = frame.get("type")
                job_id = frame.get("job_id")
                if kind == "subscribed" and job_id in pending:
                    # The subscription is live now; one read covers whatever happened before it.
                    await settle(job_id)
                elif kind == "batch":
                    for event in frame["events"]:
                        subject = event.get("subject")
                        if subject not in pending:
                            continue
                        if event["type"] in TERMINAL_EVENTS:
                            await settle(subject)
                        elif event["type"] == JOB_PROGRESS:
                            _show_event(board, subject, event.get("data") or {})
                elif kind == "error" and job_id in pending:
                    pending.discard(job_id)
                    raise CliError(f"the notifier does not know job {job_id}: {frame.get('message')}", Exit.NOT_FOUND)
                if not pending:
                    return
    except TimeoutError as exc:
        raise CliError(
            f"{len(pending)} job(s) still running after {timeout:g} s: {', '.join(sorted(pending))}",
            Exit.TIMEOUT,
            hint="they go on on the server: `stemflow watch` follows them, `stemflow download JOB` fetches results",
        ) from exc


def _show_event(board: Board, job_id: str, data: dict[str, Any], status: str | None = None) -> None:
    """A job event on its bar; the queue last read stays until the job's separation starts."""
    progress = data.get("progress")
    queue = data.get("queue") or board.queue_of(job_id, progress)
    board.update(job_id, status or data.get("status", ""), progress, queue, (data.get("error") or {}).get("code"))


@contextlib.asynccontextmanager
async def _queue_refresher(ctx: Context, api: Api, board: Board) -> AsyncIterator[None]:
    """While the bars are drawn, read again every few seconds the jobs shown waiting in a queue."""

    async def refresh() -> None:
        while True:
            await asyncio.sleep(QUEUE_REFRESH_S)
            for job_id in board.queued():
                with contextlib.suppress(CliError):
                    doc = await api.job(job_id)
                    board.update(job_id, doc["status"], doc.get("progress"), doc.get("queue"))

    task = asyncio.create_task(refresh()) if ctx.live else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _finish(
    ctx: Context, api: Api, jobs: dict[str, dict[str, Any]], outcome: Outcome, out: Path | None
) -> dict[str, dict[str, str]]:
    """Report each ended job; download the stems of completed ones when asked."""
    files: dict[str, dict[str, str]] = {}
    used: set[str] = set()
    for job_id, doc in jobs.items():
        if doc["status"] == "completed":
            if out is not None:
                folder = out / _folder_name(doc, used)
                try:
                    files[job_id] = await _download_stems(ctx, api, doc, folder, None)
                except CliError as error:
                    outcome.fail(error)
            if not ctx.json:
                analysis = await _full_analysis(api, doc)
                for table in (
                    stems_table(doc, files.get(job_id) if out is not None else None),
                    analysis_table(doc, analysis),
                ):
                    if table is not None:
                        ctx.out.print(table)
        elif doc["status"] == "failed":
            error = doc.get("error") or {}
            outcome.fail(
                CliError(
                    f"job {job_id} ({job_name(doc)}) failed: {error.get('code', '?')}: {error.get('message', '')}",
                    Exit.JOB_FAILED,
                )
            )
        else:
            outcome.fail(CliError(f"job {job_id} ({job_name(doc)}) was {doc['status']}", Exit.JOB_FAILED))
    return files


async def _full_analysis(api: Api, doc: dict[str, Any]) -> dict[str, Any] | None:
    """The job's whole analysis (runner-up tempo and key, chords, key codes), when it has one."""
    if not (doc.get("result") or {}).get("analysis"):
        return None
    try:
        return await api.analysis(doc["id"])
    except CliError:
        return None


def _folder_name(doc: dict[str, Any], used: set[str]) -> str:
    name = job_name(doc)
    base = Path(urlsplit(name).path).stem if is_url(name) else Path(name).stem
    base = re.sub(r"[^\w.-]+", "_", base).strip("._") or doc["id"]
    folder = base if base not in used else f"{base}-{doc['id'][:8]}"
    used.add(folder)
    return folder


def _emit_all(ctx: Context, docs: Any, files: dict[str, dict[str, str]] | None = None) -> None:
    if not ctx.json:
        return
    for doc in docs:
        ctx.emit({**doc, "files": files[doc["id"]]} if files and doc["id"] in files else doc)


# ---- downloads


async def _download_stems(
    ctx: Context, api: Api, doc: dict[str, Any], folder: Path, names: list[str] | None, target: str | None = None
) -> dict[str, str]:
    """The job's stems into `folder` (a multi-target job's into `folder/<target>/`); {stem or target/stem: path}."""
    targets = (doc.get("result") or {}).get("targets")
    if not targets:
        if target is not None:
            raise CliError(f"job {doc['id']} has no targets: it made one set of stems", Exit.NOT_FOUND)
        return await _download_set(ctx, api, doc["id"], doc["result"]["stems"], folder, names)
    if target is not None and target not in targets:
        raise CliError(
            f"job {doc['id']} has no target {target} (it has {', '.join(sorted(targets))})",
            Exit.NOT_FOUND,
        )
    chosen = {target: targets[target]} if target is not None else targets
    made = {name: t for name, t in chosen.items() if t.get("stems")}
    if target is not None and not made:
        error = targets[target].get("error") or {}
        raise CliError(
            f"target {target} of job {doc['id']} has no stems: {error.get('code', targets[target]['status'])}",
            Exit.JOB_FAILED,
        )
    if names:
        _check_stem_names(doc["id"], names, {s["name"] for t in made.values() for s in t["stems"]})
    files: dict[str, str] = {}
    for name, made_target in made.items():
        wanted = [s["name"] for s in made_target["stems"] if not names or s["name"] in names]
        if wanted:
            got = await _download_set(ctx, api, doc["id"], made_target["stems"], folder / name, wanted)
            files.update({f"{name}/{stem}": path for stem, path in got.items()})
    return files


async def _download_set(
    ctx: Context, api: Api, job_id: str, stems: list[dict[str, Any]], folder: Path, names: list[str] | None
) -> dict[str, str]:
    if names:
        _check_stem_names(job_id, names, {s["name"] for s in stems})
        stems = [s for s in stems if s["name"] in names]
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    with _transfer_bars(ctx) as bars:
        for stem in stems:
            task = bars.add_task(stem["name"], total=stem["size"] or None)
            # Named as the service names it (the song's and the stem's names), as the web page saves it.
            dest = await api.download_to(
                stem["url"], folder, f"{stem['name']}.{stem['format']}", lambda n, task=task: bars.advance(task, n)
            )
            files[stem["name"]] = str(dest)
    return files


def _check_stem_names(job_id: str, names: list[str], known: set[str]) -> None:
    missing = [n for n in names if n not in known]
    if missing:
        raise CliError(
            f"job {job_id} has no stem {', '.join(missing)} (it has {', '.join(sorted(known))})", Exit.NOT_FOUND
        )


def _transfer_bars(ctx: Context) -> Progress:
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=ctx.err,
        disable=not ctx.live,
    )


async def download(
    ctx: Context, job_id: str, *, out: Path | None, stems: list[str] | None, as_zip: bool, target: str | None = None
) -> int:
    async with ctx.api() as api:
        doc = await api.job(job_id)
        if doc["status"] != "completed":
            raise CliError(
                f"job {job_id} is {doc['status']}: stems exist only once the job has completed",
                Exit.CONFLICT if doc["status"] not in ("failed", "cancelled") else Exit.JOB_FAILED,
                hint="wait with `stemflow watch`" if doc["status"] not in TERMINAL_STATUSES else "",
            )
        if as_zip:
            folder = out or Path(".")
            folder.mkdir(parents=True, exist_ok=True)
            url, fallback = doc["links"]["stems_zip"], f"{job_id}-stems.zip"
            if target is not None:
                targets = (doc.get("result") or {}).get("targets") or {}
                if not (targets.get(target) or {}).get("stems_zip"):
                    raise CliError(f"job {job_id} has no stems of a target {target}", Exit.NOT_FOUND)
                url, fallback = targets[target]["stems_zip"], f"{job_id}-{target}-stems.zip"
            with _transfer_bars(ctx) as bars:
                task = bars.add_task("zip", total=None)
                dest = await api.download_to(url, folder, fallback, lambda n: bars.advance(task, n))
            files = {"zip": str(dest)}
        else:
            files = await _download_stems(ctx, api, doc, out or Path(job_id), stems, target)
    if ctx.json:
        ctx.emit({"id": job_id, "files": files})
    else:
        for name, path in files.items():
            ctx.out.print(f"{name}\t{path}", highlight=False, soft_wrap=True)
    return 0


# ---- one-job commands


async def status(ctx: Context, job_ids: list[str]) -> int:
    async with ctx.api() as api:

        async def show(job_id: str) -> None:
            doc = await api.job(job_id)
            if ctx.json:
                ctx.emit(doc)
            else:
                ctx.out.print(job_summary(doc, await _full_analysis(api, doc)))

        return await Outcome(ctx).each(job_ids, show)


async def cancel(ctx: Context, job_ids: list[str]) -> int:
    async with ctx.api() as api:

        async def stop(job_id: str) -> None:
            doc = await api.cancel(job_id)
            if ctx.json:
                ctx.emit(doc)
            else:
                ctx.out.print(f"cancelled job {job_id} ({job_name(doc)})", highlight=False)

        return await Outcome(ctx).each(job_ids, stop)


async def delete(ctx: Context, job_ids: list[str], confirm: Callable[[str], bool] | None = None) -> int:
    """Delete jobs, naming their songs; `confirm` (on a terminal, without --yes) is asked first with them listed."""
    outcome = Outcome(ctx)
    found: dict[str, dict[str, Any]] = {}
    deleted = 0
    async with ctx.api() as api:

        async def look(job_id: str) -> None:
            found[job_id] = await api.job(job_id)

        await outcome.each(list(dict.fromkeys(job_ids)), look)
        if found and confirm is not None:
            listed = "\n".join(f"  {job_name(doc)}  ({job_id}, {doc['status']})" for job_id, doc in found.items())
            ctx.err.print(f"delete {len(found)} job(s) and their files:\n{listed}", highlight=False, markup=False)
            if not confirm("delete them?"):
                ctx.err.print("nothing was deleted", highlight=False)
                return int(Exit.USAGE)

        async def remove(job_id: str) -> None:
            nonlocal deleted
            await api.delete(job_id)
            deleted += 1
            if ctx.json:
                ctx.emit({"id": job_id, "deleted": True, "name": job_name(found[job_id])})
            else:
                ctx.out.print(
                    f"deleted job {job_id} ({job_name(found[job_id])}) and its files", highlight=False, soft_wrap=True
                )

        await outcome.each(list(found), remove)
    if not deleted and not ctx.json:
        ctx.err.print("nothing was deleted", highlight=False)
    return int(outcome.code)


async def list_jobs(ctx: Context, *, status: str | None, limit: int, cursor: str | None, every: bool) -> int:
    items: list[dict[str, Any]] = []
    async with ctx.api() as api:
        while True:
            page = await api.jobs(status=status, limit=limit, cursor=cursor)
            items.extend(page["items"])
            cursor = page.get("next_cursor")
            if not (every and cursor):
                break
    if ctx.json:
        ctx.emit({"items": items, "next_cursor": cursor})
        return 0
    # Piped, nothing is cut to a width: the whole song name, the whole reason a job failed.
    if ctx.out.is_terminal:
        ctx.out.print(jobs_table(items))
    else:
        print_whole(ctx.out, jobs_table(items, fit=False))
    if cursor:
        ctx.say(f"more: stemflow list --cursor {cursor}")
    return 0


# ---- watch


async def watch(ctx: Context, *, count: int | None, timeout: float | None) -> int:
    """All of this key's jobs, live, until Ctrl-C, `count` jobs have ended or `timeout` seconds."""
    key = ctx.config.require_key()
    async with ctx.api() as api:
        recent = (await api.jobs(limit=20))["items"]
        url = await _events_url(ctx, api, recent)
        with Board(ctx.err, enabled=ctx.live) as board:
            for doc in reversed(recent):
                if doc["status"] not in TERMINAL_STATUSES:
                    board.add(doc["id"], job_name(doc))
                    board.update(doc["id"], doc["status"], doc.get("progress"), doc.get("queue"))
            ended = 0
            with contextlib.suppress(TimeoutError):
                async with (
                    asyncio.timeout(timeout),
                    _queue_refresher(ctx, api, board),
                    contextlib.aclosing(EventStream(url, key).frames()) as frames,
                ):
                    async for frame in frames:
                        if ctx.json and frame.get("type") == "subscribed":
                            ctx.emit(frame)
                        for event in frame.get("events") or []:
                            ended += await _watched(ctx, api, board, event)
                            if count is not None and ended >= count:
                                return 0
    return 0


async def _watched(ctx: Context, api: Api, board: Board, event: dict[str, Any]) -> int:
    """Show one job event; 1 when it ends a job."""
    if ctx.json:
        ctx.emit(event)
    job_id = event.get("subject") or ""
    if ctx.live and job_id not in board:
        try:
            board.add(job_id, job_name(await api.job(job_id)))
        except CliError:
            board.add(job_id, job_id)
    final = TERMINAL_EVENTS.get(event.get("type", ""))
    _show_event(board, job_id, event.get("data") or {}, final)
    return 1 if final else 0


async def _events_url(ctx: Context, api: Api, recent: list[dict[str, Any]]) -> str:
    """The notifier's URL: configured, else the gateway's /config.json, else a job's `links.events`."""
    if ctx.config.events_url:
        return ctx.config.events_url
    published = (await api.page_config()).get("events_url")
    if isinstance(published, str) and published.startswith(("ws://", "wss://")):
        return published
    if recent:
        return events_base(recent[0]["links"]["events"])
    raise CliError(
        "cannot tell where the notifier's WebSocket is",
        Exit.USAGE,
        hint="set STEMFLOW_EVENTS_URL or --events-url (e.g. ws://127.0.0.1:8001/v1/ws)",
    )


# ---- models


async def models(ctx: Context) -> int:
    """Every model, the stem counts it gives, whether a worker serves it now, its queue and wait."""
    async with ctx.api() as api:
        catalogue = await api.models()
    if ctx.json:
        ctx.emit(catalogue)
        return 0
    ctx.out.print(models_table(catalogue))
    if not any(model.get("served") for model in catalogue.get("models", [])):
        ctx.say("[yellow]no worker serves any model now: jobs that separate are refused until one does[/]")
    return 0


# ---- configure


def configure(ctx: Context, settings: dict[str, str | None], *, ask_key: bool) -> int:
    values = {k: v for k, v in settings.items() if v}
    if ask_key and "api_key" not in values:
        import getpass

        values["api_key"] = getpass.getpass("API key: ").strip()
    if not any(values.values()):
        raise CliError("nothing to save", Exit.USAGE, hint="give --url, --events-url or --api-key")
    # Check the values before writing them.
    config_module.load(values, {}, ctx.config.path)
    config_module.write(ctx.config.path, {k: v for k, v in values.items() if v})
    if ctx.json:
        ctx.emit({"path": str(ctx.config.path), "saved": sorted(values)})
    else:
        ctx.out.print(f"saved {', '.join(sorted(values))} to {ctx.config.path}", highlight=False)
    return 0
