"""Loading demucs models once and keeping them warm."""

import threading
from dataclasses import dataclass
from pathlib import Path

from demucs.api import list_models
from demucs.pretrained import get_model
from demucs.repo import AnyModel
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError

# Written by stemflow_dev.models.make_tiny_repo; one model name per line.
UNTRAINED_MARKER = "UNTRAINED"


class ModelError(Exception):
    """A model could not be loaded; `code` is stable, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class LoadedModel:
    """A demucs model (or bag of models) in eval mode, with what callers need to know about it."""

    name: str
    model: AnyModel
    sources: tuple[str, ...]
    samplerate: int
    audio_channels: int
    untrained: bool


def load_model(name: str, repo: Path | None) -> LoadedModel:
    """Load `name` from the local `repo`, or from demucs' hub and remote when `repo` is None."""
    if repo is not None and not repo.is_dir():
        raise ModelError("model_load_failed", f"model repository {repo} is not a directory")
    if not _is_listed(name, repo):
        raise ModelError("model_unknown", f"no model named {name!r} in {repo or 'the demucs remote'}")
    try:
        model = get_model(name, repo=repo)
    except (RepositoryNotFoundError, RemoteEntryNotFoundError) as exc:
        raise ModelError("model_unknown", f"no model named {name!r} on the hub") from exc
    # demucs calls sys.exit through `fatal` (e.g. when diffq is missing); a worker must survive that.
    except (Exception, SystemExit) as exc:
        raise ModelError("model_load_failed", f"loading model {name!r} failed: {exc!r}") from exc
    return LoadedModel(
        name=name,
        model=model,
        sources=tuple(model.sources),
        samplerate=int(model.samplerate),
        audio_channels=int(model.audio_channels),
        untrained=repo is not None and name in _untrained_names(repo),
    )


def _is_listed(name: str, repo: Path | None) -> bool:
    """Whether the repo (or demucs' remote list) has `name`; hub names can only be known by fetching."""
    if repo is None and (name.startswith("hf://") or "/" in name):
        return True
    try:
        listing = list_models(repo)
    except Exception as exc:
        raise ModelError("model_load_failed", f"listing models in {repo} failed: {exc!r}") from exc
    return name in listing["single"] or name in listing["bag"]


def _untrained_names(repo: Path) -> set[str]:
    marker = repo / UNTRAINED_MARKER
    if not marker.is_file():
        return set()
    return {line.strip() for line in marker.read_text().splitlines() if line.strip()}


class ModelCache:
    """Loads each model at most once and keeps it on `device`."""

    def __init__(self, repo: Path | None, device: str) -> None:
        self.repo = repo
        self.device = device
        self._models: dict[str, LoadedModel] = {}
        # A lock per name: a long load of one model must not hold up requests for models already warm.
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def get(self, name: str) -> LoadedModel:
        """Return the warm model, loading it on first use; load failures are not cached."""
        loaded = self._models.get(name)
        if loaded is not None:
            return loaded
        with self._lock_for(name):
            loaded = self._models.get(name)
            if loaded is None:
                loaded = load_model(name, self.repo)
                try:
                    loaded.model.to(self.device)
                except Exception as exc:
                    raise ModelError("model_load_failed", f"moving {name!r} to {self.device} failed: {exc!r}") from exc
                self._models[name] = loaded
            return loaded

    @property
    def warm(self) -> tuple[str, ...]:
        """The names loaded so far."""
        return tuple(self._models)

    def _lock_for(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())
