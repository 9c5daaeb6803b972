"""Exporting a model's network to ONNX once, cached next to the weights.

A cached file is named after everything its content depends on: the weights and constructor
arguments (the model's hash), the exporter (torch's version, the opset) and this module's
EXPORT_FORMAT. Changed weights or another torch are another name, so they export anew; the
same weights' file from another exporter is removed then. A file is written whole under
a temporary name and renamed, so a worker killed mid-export leaves nothing that looks cached;
a file that fails to load is exported again (`ExportCache.path(..., refresh=True)`).

Tracing and constant folding hold several copies of the weights: a production htdemucs export
peaks at several GB. A large model is therefore exported in a child process, so that the
worker's own memory stays what separating needs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
from torch import nn

from .core import HTDemucsCore, prepare, training_length

log = logging.getLogger(__name__)

# Bump when HTDemucsCore or the export options change what a file holds.
EXPORT_FORMAT = 1
OPSET = 17
SUFFIX = ".onnx"
CACHE_FOLDER = ".stemflow-export"
# Models with more parameters than this are exported in a child process (tiny test models are not).
ISOLATE_PARAMETERS = 1_000_000


def model_hash(model: nn.Module) -> str:
    """sha256 over the constructor arguments and every tensor of the state, in order."""
    digest = hashlib.sha256()
    args, kwargs = getattr(model, "_init_args_kwargs", ((), {}))
    digest.update(repr((type(model).__qualname__, args, sorted(kwargs.items()))).encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def exporter_version() -> str:
    """What, besides the weights, decides an exported file's bytes."""
    return f"torch-{torch.__version__}-opset{OPSET}-format{EXPORT_FORMAT}"


def default_cache_dir(model_repo: Path | None) -> Path:
    """Next to the weights: in the local model repository, else in torch hub's checkpoint folder."""
    if model_repo is not None:
        return model_repo / CACHE_FOLDER
    return Path(torch.hub.get_dir()) / "checkpoints" / CACHE_FOLDER


def usable_cache_dir(wanted: Path) -> Path:
    """`wanted` where this process may write there (a read-only model volume is common), else a temporary folder."""
    existing = wanted
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if os.access(existing, os.W_OK | os.X_OK):
        return wanted
    fallback = Path(tempfile.gettempdir()) / CACHE_FOLDER
    log.warning("cannot write exports to %s: caching them in %s instead, per container", wanted, fallback)
    return fallback


class ExportCache:
    """ONNX files of models' networks in `directory`, exported on first use, reused after."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.exports = 0  # files written by this cache, for logs and tests
        self._lock = threading.Lock()
        self._hashes: dict[int, str] = {}

    def weights_hash(self, model: nn.Module) -> str:
        """`model_hash(model)`, computed once per model object."""
        found = self._hashes.get(id(model))
        if found is None:
            found = self._hashes[id(model)] = model_hash(model)
        return found

    def path(self, model: nn.Module, *, refresh: bool = False) -> Path:
        """The exported file of `model`, exported now if missing (or if `refresh`)."""
        weights = self.weights_hash(model)[:32]
        path = self.directory / f"{weights}.{exporter_version()}{SUFFIX}"
        with self._lock:
            if refresh or not path.is_file():
                self._export(model, path)
                # The same weights exported by another torch or format: never read again.
                for stale in self.directory.glob(f"{weights}.*{SUFFIX}"):
                    if stale != path:
                        stale.unlink(missing_ok=True)
        return path

    def _export(self, model: nn.Module, path: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log.info("exporting %s to %s (once per weights and exporter)", type(model).__name__, path)
        if sum(parameter.numel() for parameter in model.parameters()) > ISOLATE_PARAMETERS:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as child:
                child.submit(export_onnx, model, path).result()
        else:
            export_onnx(model, path)
        self.exports += 1


def export_onnx(model: nn.Module, path: Path) -> None:
    """Write the network of `model` to `path` as ONNX, whole or not at all."""
    core = HTDemucsCore(model).eval()
    padded, _, mag = prepare(model, torch.zeros(1, model.audio_channels, training_length(model)))
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        # With grad enabled: without it, attention takes torch's fused fast path, which ONNX cannot express.
        with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
            # The tracer warns about Python conditions on shapes: segments have one fixed shape.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                core,
                (mag, padded),
                tmp,
                input_names=["mag", "mix"],
                output_names=["spec", "wave"],
                opset_version=OPSET,
                dynamo=False,
            )
        # mkstemp's file is private; workers running as another user share the cache.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
