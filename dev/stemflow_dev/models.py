"""Demucs model repositories for development: tiny untrained models offline, real weights online.

Both write the layout demucs' own LocalRepo and BagOnlyRepo read, so the separator loads them
through `demucs.pretrained.get_model(name, repo=...)` exactly as it would load released models:
one `<signature>-<checksum>.th` package per model and one `<name>.yaml` bag per model name.
"""

import argparse
import hashlib
import sys
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import torch
import yaml
from demucs.apply import BagOfModels
from demucs.htdemucs import HTDemucs
from demucs.pretrained import REMOTE_ROOT, get_model
from demucs.states import get_state, save_with_checksum

from separator.models import UNTRAINED_MARKER

FOUR_SOURCES = ["drums", "bass", "other", "vocals"]
SIX_SOURCES = [*FOUR_SOURCES, "guitar", "piano"]

# name -> (sources, models in the bag), the same shapes as the released bags.
TINY_MODELS = {
    "htdemucs": (FOUR_SOURCES, 1),
    "htdemucs_6s": (SIX_SOURCES, 1),
    "htdemucs_ft": (FOUR_SOURCES, 4),
}

# Narrow layers leave little but demucs' own STFT round trip, so CPU cost follows the audio's length.
# A 2 s segment (the release has 7.8 s) spares short test clips the padding to a full segment and
# gives the demo several progress steps per song.
TINY_HTDEMUCS_KWARGS = {
    "audio_channels": 2,
    "samplerate": 44100,
    "segment": Fraction(2),
    "channels": 4,
    "depth": 4,
    "dconv_depth": 1,
    "dconv_comp": 2,
    "t_layers": 1,
    "t_heads": 1,
    "t_hidden_scale": 1.0,
}

# The released htdemucs (955717e8) where it differs from HTDemucs' defaults; t_dropout and the
# sparse-attention window are training-only and kept for a faithful copy.
PRODUCTION_HTDEMUCS_KWARGS = {
    "sources": FOUR_SOURCES,
    "audio_channels": 2,
    "samplerate": 44100,
    "segment": Fraction(39, 5),
    "multi_freqs": [],
    "dconv_mode": 3,
    "bottom_channels": 512,
    "t_dropout": 0.02,
    "t_sparse_attn_window": 400,
}


class DownloadError(RuntimeError):
    """Real weights could not be fetched."""


def make_tiny_repo(repo: Path) -> Path:
    """Write tiny untrained htdemucs, htdemucs_6s and htdemucs_ft into `repo`, skipping names already there."""
    repo.mkdir(parents=True, exist_ok=True)
    made = set()
    for name, (sources, count) in TINY_MODELS.items():
        if (repo / f"{name}.yaml").exists():
            continue
        signatures = [_tiny_signature(name, index) for index in range(count)]
        models = [_tiny_htdemucs(sources, int(signature, 16)) for signature in signatures]
        weights = _one_source_each(count, len(sources)) if count > 1 else None
        _write_bag(repo, name, dict(zip(signatures, models, strict=True)), weights)
        made.add(name)
    _mark_untrained(repo, made)
    return repo


def make_production_htdemucs() -> torch.nn.Module:
    """The released htdemucs architecture (about 42M parameters) with random weights, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return HTDemucs(**PRODUCTION_HTDEMUCS_KWARGS).eval()


def download_real(repo: Path, names: Iterable[str]) -> None:
    """Fetch released weights through demucs' hub and remote, and store them in `repo` for offline use."""
    repo.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            model = get_model(name)
        # demucs exits through sys.exit for some failures; a CLI should still say what went wrong.
        except (Exception, SystemExit) as exc:
            raise DownloadError(
                f"could not download {name!r} ({exc!r}); this needs access to huggingface.co or "
                "dl.fbaipublicfiles.com. Offline, use `python -m stemflow_dev.models tiny` instead."
            ) from exc
        bag = model if isinstance(model, BagOfModels) else BagOfModels([model])
        # A local repo is flat, so a hub name such as hf://someone/model is stored as `model`.
        local_name = name.removeprefix("hf://").rsplit("/", 1)[-1]
        released = _released_bag(local_name)
        signatures = released.get("models", [])
        if len(signatures) != len(bag.models):
            signatures = [f"{local_name.replace('-', '_')}_{index}" for index in range(len(bag.models))]
        models = dict(zip(map(str, signatures), bag.models, strict=True))
        _write_bag(repo, local_name, models, bag.weights, released.get("segment"))
        _unmark_untrained(repo, local_name)


def _tiny_signature(name: str, index: int) -> str:
    """Eight hex digits like demucs' signatures, stable across runs."""
    return hashlib.sha256(f"stemflow-tiny/{name}/{index}".encode()).hexdigest()[:8]


def _tiny_htdemucs(sources: list[str], seed: int) -> HTDemucs:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return HTDemucs(sources=sources, **TINY_HTDEMUCS_KWARGS)


def _one_source_each(models: int, sources: int) -> list[list[float]]:
    """The fine-tuned bag's weights: model i alone provides source i."""
    return [[1.0 if source == model else 0.0 for source in range(sources)] for model in range(models)]


def _released_bag(name: str) -> dict:
    """demucs' own yaml for `name` (signatures, segment), empty for names it does not ship."""
    remote_yaml = REMOTE_ROOT / f"{name}.yaml"
    return yaml.safe_load(remote_yaml.read_text()) if remote_yaml.is_file() else {}


def _write_bag(
    repo: Path, name: str, models: dict[str, torch.nn.Module], weights: list | None, segment: float | None = None
) -> None:
    """Save each model as a demucs package, then the yaml, so an interrupted run leaves no half-made bag."""
    for signature, model in models.items():
        # LocalRepo refuses two files for one signature, and a rerun may produce another checksum.
        for stale in repo.glob(f"{signature}-*.th"):
            stale.unlink()
        args, kwargs = model._init_args_kwargs
        package = {"klass": type(model), "args": args, "kwargs": kwargs, "state": get_state(model, None, half=True)}
        save_with_checksum(package, repo / f"{signature}.th")
    bag: dict = {"models": list(models)}
    if weights is not None:
        bag["weights"] = [[float(w) for w in row] for row in weights]
    if segment is not None:
        bag["segment"] = float(segment)
    (repo / f"{name}.yaml").write_text(yaml.safe_dump(bag))


def _untrained(repo: Path) -> set[str]:
    marker = repo / UNTRAINED_MARKER
    return set(marker.read_text().split()) if marker.is_file() else set()


def _mark_untrained(repo: Path, names: set[str]) -> None:
    _write_marker(repo, _untrained(repo) | names)


def _unmark_untrained(repo: Path, name: str) -> None:
    _write_marker(repo, _untrained(repo) - {name})


def _write_marker(repo: Path, names: set[str]) -> None:
    marker = repo / UNTRAINED_MARKER
    if names == _untrained(repo) and (marker.is_file() or not names):
        return
    if names:
        marker.write_text("".join(f"{name}\n" for name in sorted(names)))
    else:
        marker.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Command line: `tiny --repo DIR` or `download --repo DIR [names]`."""
    parser = argparse.ArgumentParser(prog="python -m stemflow_dev.models", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser("tiny", help="write tiny untrained models (offline)")
    tiny.add_argument("--repo", type=Path, required=True)
    download = commands.add_parser("download", help="fetch released weights (online)")
    download.add_argument("--repo", type=Path, required=True)
    download.add_argument("names", nargs="*", default=list(TINY_MODELS))
    args = parser.parse_args(argv)
    if args.command == "tiny":
        make_tiny_repo(args.repo)
        print(f"tiny models {', '.join(TINY_MODELS)} in {args.repo}")
        return 0
    print(f"downloading {', '.join(args.names)}: huggingface.co first, then dl.fbaipublicfiles.com", file=sys.stderr)
    try:
        download_real(args.repo, args.names)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"released models {', '.join(args.names)} in {args.repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
