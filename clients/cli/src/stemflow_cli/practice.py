"""`stemflow practice` (or `mix`): a practice mix of a finished job, rendered by the service, followed live,
downloaded.

The mix is asked for once the WebSocket subscription to its job is live, so none of its events is missed;
a mix asked for before (the same parameters) comes back at once, already rendered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn

from .api import Api
from .config import events_base
from .errors import CliError, Exit
from .events import EventStream

PRESETS = ("karaoke", "instrumental", "a_cappella", "drumless", "bassless", "bass_up")
MIX_EVENTS = {f"stemflow.job.mix.{kind}.v1" for kind in ("progress", "completed", "failed")}
ENDED = ("completed", "failed")


def gain(text: str) -> tuple[str, float]:
    """`STEM=GAIN` (linear, 0 to 4; `vocals=0.5`) for --gain."""
    name, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not sep or not name or not 0 <= number <= 4:
        raise argparse.ArgumentTypeError(f"{text!r}: give STEM=GAIN with a gain from 0 to 4, e.g. bass=1.5")
    return name, number


def section(text: str) -> tuple[float | None, float | None]:
    """'30:45' -> (30.0, 45.0); either side may be empty ('30:' to the end, ':45' from the start)."""
    start_text, sep, end_text = text.partition(":")
    try:
        if not sep or not (start_text.strip() or end_text.strip()):
            raise ValueError
        start = float(start_text) if start_text.strip() else None
        end = float(end_text) if end_text.strip() else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END in seconds (e.g. 30:45), not {text!r}") from None
    if (start is not None and start < 0) or (start is not None and end is not None and end <= start):
        raise argparse.ArgumentTypeError(f"the section must start at 0 or later and end after it starts ({text})")
    return start, end


def add_arguments(parser: argparse.ArgumentParser, positive: Any) -> None:
    parser.add_argument("job", metavar="JOB")
    parser.add_argument("--preset", choices=PRESETS, help="karaoke: a faint guide vocal; instrumental: no vocals; ...")
    parser.add_argument("--mute", action="append", metavar="STEM", help="silence a stem (repeatable)")
    parser.add_argument("--solo", action="append", metavar="STEM", help="only these stems sound (repeatable)")
    parser.add_argument(
        "--gain", dest="gains", action="append", type=gain, metavar="STEM=GAIN", help="a stem's gain, 0-4 (1: as is)"
    )
    parser.add_argument("--tempo", type=float, metavar="RATIO", help="0.5-1.5, pitch unchanged (0.75: three-quarters)")
    parser.add_argument("--semitones", type=int, metavar="N", help="transpose -12..12, tempo unchanged")
    parser.add_argument("--cents", type=float, metavar="N", help="fine tuning, -100..100 cents")
    parser.add_argument("--section", type=section, metavar="START:END", help="only START..END seconds, e.g. 30:45")
    parser.add_argument("--loops", type=int, metavar="N", help="play the section N times (1-16)")
    parser.add_argument("--click", action="store_true", default=None, help="a click on the analysed beats")
    parser.add_argument("--format", choices=("wav", "flac", "mp3"))
    parser.add_argument("--bit-depth", type=int, choices=(16, 24, 32), help="WAV 16/24/32 (float), FLAC 16/24")
    parser.add_argument("--quality", choices=("fast", "balanced", "best"), help="time-stretch engine (best: slowest)")
    parser.add_argument("--target", metavar="NAME", help="the stems of this target of a multi-target job")
    parser.add_argument(
        "--out", metavar="PATH", help="a file, or a folder (existing, or ending in /, or without an extension)"
    )
    parser.add_argument("--no-wait", dest="wait", action="store_false", help="ask for the mix and exit")
    parser.add_argument("--timeout", type=positive, metavar="SECONDS", help="give up waiting after SECONDS (exit 9)")


def mix_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options given, so the server's defaults apply to the rest."""
    options: dict[str, Any] = {}
    for key in (
        "preset",
        "mute",
        "solo",
        "tempo",
        "semitones",
        "cents",
        "loops",
        "click",
        "format",
        "quality",
        "target",
    ):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.bit_depth is not None:
        options["bit_depth"] = args.bit_depth
    if args.gains:
        options["gains"] = dict(args.gains)
    if args.section:
        start, end = args.section
        if start is not None:
            options["start"] = start
        if end is not None:
            options["end"] = end
    return options


async def practice(
    ctx: Any, job_id: str, options: dict[str, Any], *, out: str | None, wait: bool, timeout: float | None
) -> int:
    async with ctx.api() as api:
        if not wait:
            mix = await api.create_mix(job_id, options)
            _announce(ctx, job_id, mix)
            if ctx.json:
                ctx.emit(mix)
            return int(Exit.OK)
        job = await api.job(job_id)
        url = ctx.config.events_url or events_base(job["links"]["events"])
        try:
            async with asyncio.timeout(timeout):
                mix = await _render(ctx, api, EventStream(url, ctx.config.require_key(), [job_id]), job_id, options)
        except TimeoutError:
            raise CliError(f"the mix of job {job_id} did not end within {timeout:g} s", Exit.TIMEOUT) from None
        if mix["status"] == "failed":
            error = mix.get("error") or {}
            raise CliError(
                f"mix {mix['id']} of job {job_id} failed: {error.get('code')}: {error.get('message')}", Exit.JOB_FAILED
            )
        dest = destination(out, job_id, mix)
        await api.download(mix["links"]["file"], dest)
        if ctx.json:
            ctx.emit({**mix, "path": str(dest)})
        else:
            file = mix["file"]
            ctx.out.print(
                f"{dest}  ({file['duration_s']:.1f} s, {file['format']}, {file['size'] / 1e6:.1f} MB, "
                f"{file.get('loudness_lufs')} LUFS)",
                highlight=False,
            )
        return int(Exit.OK)


async def _render(ctx: Any, api: Api, stream: EventStream, job_id: str, options: dict[str, Any]) -> dict[str, Any]:
    """Subscribe, ask for the mix, follow its events to the end; the mix document as it ended."""
    mix: dict[str, Any] | None = None
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"))
    with Progress(*columns, console=ctx.err, disable=not ctx.live, transient=True) as bar:
        task = bar.add_task("mixing", total=100)
        async with contextlib.aclosing(stream.frames()) as frames:
            async for frame in frames:
                if frame.get("type") == "subscribed" and mix is None:
                    mix = await api.create_mix(job_id, options)
                    _announce(ctx, job_id, mix)
                elif frame.get("type") == "subscribed" and mix is not None:
                    mix = await api.mix(job_id, mix["id"])  # reconnected: what happened meanwhile
                for event in frame.get("events") or []:
                    state = event["data"].get("mix") or {} if event["type"] in MIX_EVENTS else {}
                    if mix is not None and state.get("id") == mix["id"]:
                        bar.update(task, completed=state.get("percent", 0.0), description=state.get("status", ""))
                        if state.get("status") in ENDED:
                            mix = await api.mix(job_id, mix["id"])
                if mix is not None and mix["status"] in ENDED:
                    return mix
    raise CliError(f"the live connection ended before mix of job {job_id} did", Exit.UNAVAILABLE)


def _announce(ctx: Any, job_id: str, mix: dict[str, Any]) -> None:
    again = " (asked for before)" if mix["status"] == "completed" else ""
    ctx.say(f"mix [bold]{mix['id']}[/] of job {job_id}: {mix['status']}{again}")


def destination(out: str | None, job_id: str, mix: dict[str, Any]) -> Path:
    """Where the mix is written: `out` as a file, or in `out` as a folder, or `./JOB-mix-ID.EXT`."""
    name = f"{job_id}-mix-{mix['id'][:8]}.{mix['file']['format']}"
    if out is None:
        return Path(name)
    path = Path(out)
    if path.is_dir() or out.endswith(("/", "\\")) or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        return path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
