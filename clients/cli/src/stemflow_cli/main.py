"""`stemflow`: the command line of the arguments, configuration and exit codes."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from . import __version__, commands
from . import config as config_module
from . import practice as practice_module
from .errors import CliError, Exit

DEFAULT_FORMAT = "flac"
JOB_OPTIONS = (
    "stems",
    "model",
    "quality",
    "output_format",
    "bit_depth",
    "sample_rate",
    "analyze",
    "separate",
    "residual",
    "priority",
    "callback_url",
)
EPILOG = """\
configuration: flags, then the environment (STEMFLOW_URL, STEMFLOW_EVENTS_URL, STEMFLOW_API_KEY,
STEMFLOW_CONFIG), then the config file (~/.config/stemflow/config.toml, written by `stemflow configure`).

exit codes: 0 ok, 1 a job failed or was cancelled, 2 usage or configuration, 3 API key refused,
4 not found, 5 conflict (job not in a state that allows it), 6 request or file refused,
7 rate limited, 8 service unreachable or failing, 9 --timeout passed, 10 no worker serves the model now,
130 interrupted.
"""


def _trim(text: str) -> tuple[float | None, float | None]:
    """'10:95' -> (10.0, 95.0); either side may be empty ('10:', ':95')."""
    start_text, sep, end_text = text.partition(":")
    try:
        if not sep:
            raise ValueError
        start = float(start_text) if start_text.strip() else None
        end = float(end_text) if end_text.strip() else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END in seconds (e.g. 10:95), not {text!r}") from None
    if start is not None and start < 0:
        raise argparse.ArgumentTypeError("the trim start cannot be negative")
    if start is not None and end is not None and end <= start:
        raise argparse.ArgumentTypeError(f"the trim end must come after its start ({text})")
    if start is None and end is None:
        raise argparse.ArgumentTypeError("give a start, an end or both (e.g. 10:95)")
    return start, end


def _target(text: str) -> str:
    """'htdemucs_6s:6' -> the same, its form checked: a model name and a stem count (2, 4 or 6).

    Whether the model exists, gives that many stems and is served now is asked of `/v1/models` before upload.
    """
    model, sep, stems = text.partition(":")
    if not sep or not model.strip() or stems not in ("2", "4", "6"):
        raise argparse.ArgumentTypeError(
            f"expected MODEL:STEMS with STEMS 2, 4 or 6 (`stemflow models` lists the models), not {text!r}"
        )
    return f"{model.strip()}:{stems}"


def _bit_depth(text: str) -> int:
    """'16', '24', or 'float' (sent as 32, the service's name for 32-bit float)."""
    depths = {"16": 16, "24": 24, "float": 32, "32": 32}
    if text.strip().lower() not in depths:
        raise argparse.ArgumentTypeError(f"expected 16, 24 or float, not {text!r}")
    return depths[text.strip().lower()]


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _common() -> argparse.ArgumentParser:
    """Options every subcommand takes, before or after its name (SUPPRESS keeps the subparsers from resetting them)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument("--url", default=argparse.SUPPRESS, help="the gateway, e.g. http://127.0.0.1:8000")
    group.add_argument(
        "--events-url", default=argparse.SUPPRESS, help="the notifier's WebSocket, e.g. ws://127.0.0.1:8001/v1/ws"
    )
    group.add_argument("--api-key", default=argparse.SUPPRESS, help="prefer STEMFLOW_API_KEY: flags show in `ps`")
    group.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file to use")
    output = common.add_argument_group("output")
    output.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="JSON Lines on stdout, for scripts"
    )
    output.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="stemflow",
        description="Split songs into stems and measure them, with Stemflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common])

    submit = command("submit", "upload songs (files or http(s) URLs), follow them, fetch the results")
    submit.add_argument("songs", nargs="+", metavar="SONG")
    submit.add_argument("--stems", type=int, choices=(2, 4, 6), help="2: vocals + accompaniment, 4 or 6 sources")
    submit.add_argument(
        "--model", help="checked before upload against the models served now (`stemflow models` lists them)"
    )
    submit.add_argument(
        "--target",
        dest="targets",
        action="append",
        type=_target,
        metavar="MODEL:STEMS",
        help="one separation of the upload (repeat, up to 4: e.g. --target htdemucs:4 --target htdemucs_6s:6)",
    )
    submit.add_argument("--quality", choices=("fast", "balanced", "best"))
    submit.add_argument(
        "--format",
        dest="output_format",
        choices=("wav", "flac", "mp3"),
        help=f"the stems' format (default {DEFAULT_FORMAT}, as on the web page)",
    )
    submit.add_argument(
        "--bit-depth",
        type=_bit_depth,
        metavar="16|24|float",
        help="WAV/FLAC samples (default: 16 for a 16-bit song, else 24; float: 32-bit float WAV)",
    )
    submit.add_argument(
        "--sample-rate",
        type=int,
        choices=(44100, 48000, 88200, 96000),
        metavar="HZ",
        help="WAV/FLAC sample rate: 44100 (default, the model's), 48000, 88200 or 96000",
    )
    submit.add_argument("--trim", type=_trim, metavar="START:END", help="keep only START..END seconds, e.g. 10:95")
    submit.add_argument(
        "--no-analyze", dest="analyze", action="store_false", default=None, help="skip tempo/key/loudness"
    )
    submit.add_argument("--no-separate", dest="separate", action="store_false", default=None, help="only analyse")
    submit.add_argument("--residual", action="store_true", default=None, help="also deliver mix minus the stems")
    submit.add_argument("--priority", choices=("normal", "high"))
    submit.add_argument("--callback-url", help="webhook called when the job ends")
    submit.add_argument(
        "--batch", action="store_true", help="send the songs as one batch (one request, one batch id; up to 50)"
    )
    submit.add_argument("--wait", action="store_true", help="follow the jobs live until they end")
    submit.add_argument(
        "--out", type=Path, metavar="DIR", help="download the stems to DIR/<song>/ (DIR/<song>/<target>/ with targets)"
    )
    submit.add_argument("--timeout", type=_positive, metavar="SECONDS", help="give up waiting after SECONDS (exit 9)")

    for name, help_text in (
        ("status", "show jobs: progress, options, stems, analysis"),
        ("cancel", "cancel jobs that have not ended"),
    ):
        command(name, help_text).add_argument("jobs", nargs="+", metavar="JOB")
    delete = command("delete", "delete jobs and their files")
    delete.add_argument("jobs", nargs="+", metavar="JOB")
    delete.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    listing = command("list", "your jobs, newest first")
    listing.add_argument("--status", choices=("queued", "ingesting", "processing", "completed", "failed", "cancelled"))
    listing.add_argument("--limit", type=int, default=20, choices=range(1, 101), metavar="N", help="1..100 per page")
    listing.add_argument("--cursor", help="continue after a previous page")
    listing.add_argument("--all", dest="every", action="store_true", help="follow every page")

    download = command("download", "download a finished job's stems (or their zip)")
    download.add_argument("job", metavar="JOB")
    download.add_argument("--out", type=Path, metavar="DIR", help="where to write (default: ./JOB/, or . for --zip)")
    download.add_argument("--stem", dest="stems", action="append", metavar="NAME", help="only this stem (repeatable)")
    download.add_argument(
        "--target", metavar="NAME", help="only this target of a multi-target job (e.g. htdemucs_6s-6; default: all)"
    )
    download.add_argument("--zip", dest="as_zip", action="store_true", help="one zip of every stem")

    watch = command("watch", "all of your jobs, live (Ctrl-C to stop)")
    watch.add_argument("--count", type=int, metavar="N", help="stop after N jobs have ended")
    watch.add_argument("--timeout", type=_positive, metavar="SECONDS", help="stop after SECONDS (exit 0)")

    command("models", "the models: stem counts, whether a worker serves each now, queue and estimated wait")

    practice_help = "a practice mix of a finished job (stems muted or louder, tempo, pitch, a looped section, click)"
    practice_module.add_arguments(
        sub.add_parser("practice", aliases=["mix"], help=practice_help, description=practice_help, parents=[common]),
        _positive,
    )

    command("configure", "save the URL, events URL and API key given as flags (asks for the key on a terminal)")
    return parser


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the job options given, so the server's defaults apply to the rest."""
    options = {key: getattr(args, key) for key in JOB_OPTIONS if getattr(args, key) is not None}
    if args.separate is not False:
        # The web page's default, so a song gives the same files from both.
        options.setdefault("output_format", DEFAULT_FORMAT)
    if args.targets:
        options["targets"] = args.targets
    if args.trim:
        start, end = args.trim
        if start is not None:
            options["trim_start"] = start
        if end is not None:
            options["trim_end"] = end
    return options


def _dispatch(ctx: commands.Context, args: argparse.Namespace) -> Coroutine[Any, Any, int] | int:
    match args.command:
        case "submit":
            return commands.submit(
                ctx,
                args.songs,
                _options(args),
                wait=args.wait or args.out is not None,
                out=args.out,
                timeout=args.timeout,
                batch=args.batch,
            )
        case "status":
            return commands.status(ctx, args.jobs)
        case "cancel":
            return commands.cancel(ctx, args.jobs)
        case "delete":
            ask = not args.yes and sys.stdin.isatty() and not ctx.json
            return commands.delete(ctx, args.jobs, _confirm if ask else None)
        case "list":
            return commands.list_jobs(ctx, status=args.status, limit=args.limit, cursor=args.cursor, every=args.every)
        case "download":
            return commands.download(
                ctx, args.job, out=args.out, stems=args.stems, as_zip=args.as_zip, target=args.target
            )
        case "watch":
            return commands.watch(ctx, count=args.count, timeout=args.timeout)
        case "models":
            return commands.models(ctx)
        case "practice" | "mix":
            return practice_module.practice(
                ctx, args.job, practice_module.mix_options(args), out=args.out, wait=args.wait, timeout=args.timeout
            )
        case "configure":
            settings = {k: getattr(args, k, None) for k in config_module.KEYS}
            return commands.configure(ctx, settings, ask_key=sys.stdin.isatty())
    raise AssertionError(args.command)


def _confirm(question: str) -> bool:
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def run(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Parse, configure, run one command; the exit code (README: "Exit codes")."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    err = Console(stderr=True)
    as_json = getattr(args, "json", False)
    ctx: commands.Context | None = None
    try:
        flags = {k: getattr(args, k, None) for k in config_module.KEYS}
        config = config_module.load(flags, environ, getattr(args, "config", None))
        ctx = commands.Context(config, Console(), err, json=as_json, quiet=getattr(args, "quiet", False))
        result = _dispatch(ctx, args)
        return result if isinstance(result, int) else asyncio.run(result)
    except CliError as error:
        if ctx is None:
            ctx = commands.Context(config_module.Config("", None, None, Path()), Console(), err, json=as_json)
        ctx.report(error)
        return int(error.exit_code)
    except KeyboardInterrupt:
        if args.command == "watch":
            # Ctrl-C is how `watch` is stopped (its help says so): not a failure.
            if not as_json:
                err.print("stopped watching; the jobs go on")
            return 0
        interrupted = _interrupted(args.command, ctx.submitted if ctx is not None else [])
        if ctx is None:
            ctx = commands.Context(config_module.Config("", None, None, Path()), Console(), err, json=as_json)
        ctx.report(interrupted)
        return int(Exit.INTERRUPTED)


def _interrupted(command: str, submitted: list[tuple[str, str]]) -> CliError:
    """What Ctrl-C left: the jobs submitted (they go on on the server), named by id and song."""
    if not submitted:
        return CliError("interrupted" + ("; nothing was submitted" if command == "submit" else ""), Exit.INTERRUPTED)
    named = ", ".join(f"{job_id} ({name})" for job_id, name in submitted)
    return CliError(
        f"interrupted; job(s) {named} go on on the server",
        Exit.INTERRUPTED,
        hint=f"`stemflow status {submitted[0][0]}` shows one; `stemflow watch` follows them",
    )


def main() -> None:
    raise SystemExit(run())


if __name__ == "__main__":
    main()
