"""The device's one forward loop: segments of concurrent jobs batched, round-robin, split on out-of-memory.

Jobs submit segment windows and get futures; one thread takes up to `max_batch` windows for the
same model, one per job in turn (so a long song cannot starve short ones), waits up to
`batch_wait_s` for a batch to fill, runs one forward pass, and resolves the futures. When the
device runs out of memory the batch is halved and retried, and later batches stay at the size
that fitted. On CPU, `memory_budget_bytes` simulates a device that small, raising the same error.

`backend` picks what runs the network: torch (eager, or compiled with `compile_models`), or on
CPU an exported graph in ONNX Runtime (`onnx`) or OpenVINO (`openvino`), float32, with the STFT
and iSTFT still in torch (separator.core); exports are cached in `export_dir` (separator.export).
With `release_weights` (the worker's setting: its models run on this engine only), a model's torch
network gives its weights back once the runtime holds the network: the STFT and iSTFT need none,
and the weights would otherwise be held twice (about 170 MB per production htdemucs).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from opentelemetry import context as otel_context
from opentelemetry import trace
from torch import nn

from stemflow_shared import telemetry

from .core import Core, CoreUnsupported, check_supported, forward_split
from .export import ExportCache, default_cache_dir
from .runtimes import RUNTIMES

PRECISIONS = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
BACKENDS = ("torch", *RUNTIMES)

log = logging.getLogger(__name__)


class EngineClosed(RuntimeError):
    """The engine stopped before the segment ran."""


class SegmentOutOfMemory(RuntimeError):
    """A single segment does not fit the device, even alone."""


@dataclass
class _Item:
    job: Hashable
    model: nn.Module
    window: torch.Tensor
    model_name: str = ""
    future: Future[torch.Tensor] = field(default_factory=Future)
    # The submitter's trace context: the batch span of each job is a child of that job's span.
    context: otel_context.Context = field(default_factory=otel_context.get_current)

    @property
    def key(self) -> tuple[int, tuple[int, ...]]:
        return id(self.model), tuple(self.window.shape)


@dataclass(frozen=True)
class BatchReport:
    """What one forward pass did, for metrics and tests."""

    jobs: tuple[Hashable, ...]
    out_of_memory: bool
    seconds: float = 0.0  # time on the device, the failed attempt's included
    device: str = "cpu"


class SegmentEngine:
    """Runs model segments for many jobs on one device; start() it, submit(), close() it."""

    def __init__(
        self,
        device: str = "cpu",
        *,
        max_batch: int = 1,
        batch_wait_s: float = 0.0,
        precision: str = "float32",
        memory_budget_bytes: int = 0,
        compile_models: bool = False,
        on_batch: Callable[[BatchReport], None] | None = None,
        backend: str = "torch",
        export_dir: Path | None = None,
        threads: int = 0,
        release_weights: bool = False,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend != "torch" and (torch.device(device).type != "cpu" or precision != "float32" or compile_models):
            raise ValueError(f"the {backend} backend runs on cpu in float32, without torch.compile")
        if backend != "torch":
            try:
                RUNTIMES[backend][1]()
            except ImportError as exc:
                raise ValueError(f"the {backend} backend's package is not installed: {exc}") from exc
        self.device = torch.device(device)
        self.backend = backend
        self.threads = threads
        self.release_weights = release_weights and backend != "torch"
        self.precision = precision
        self.max_batch = max(1, max_batch)
        self.batch_cap = self.max_batch
        self.batch_wait_s = batch_wait_s
        self.memory_budget_bytes = memory_budget_bytes
        self._on_batch = on_batch
        self._compile = compile_models
        self._compiled: dict[int, nn.Module] = {}
        self.export_dir = (export_dir or default_cache_dir(None)) if backend != "torch" else None
        self._exports = ExportCache(self.export_dir) if self.export_dir is not None else None
        # Per model: its network in the backend's runtime, or None where it runs in torch instead.
        self._cores: dict[int, Core | None] = {}
        self._queues: OrderedDict[Hashable, deque[_Item]] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> SegmentEngine:
        """Start the forward loop (idempotent)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="segment-engine", daemon=True)
                self._thread.start()
        return self

    def close(self) -> None:
        """Stop after the batch in flight; segments not yet run fail with EngineClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._fail_queued()

    def _fail_queued(self) -> None:
        with self._cond:
            self._closed = True
            for item in (item for queue in self._queues.values() for item in queue):
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(EngineClosed("the segment engine was closed"))
            self._queues.clear()

    def __enter__(self) -> SegmentEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self, job: Hashable, model: nn.Module, window: torch.Tensor, model_name: str = ""
    ) -> Future[torch.Tensor]:
        """Queue `window` (channels, samples) for `model`; the future gets (sources, channels, samples) on CPU."""
        item = _Item(job, model, window, model_name)
        with self._cond:
            if self._closed:
                raise EngineClosed("the segment engine was closed")
            self._queues.setdefault(job, deque()).append(item)
            self._cond.notify_all()
        return item.future

    @property
    def queued(self) -> int:
        """Segments waiting for a forward pass."""
        with self._cond:
            return sum(len(queue) for queue in self._queues.values())

    def wait_queued(self, count: int, timeout: float) -> bool:
        """Block until at least `count` segments wait; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: sum(map(len, self._queues.values())) >= count, timeout)

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    batch = self._next_batch()
                    if batch is None:
                        return
                self._run(batch)
        finally:
            # Whatever ends the loop, no job may wait for a segment that will never run.
            self._fail_queued()

    def _next_batch(self) -> list[_Item] | None:
        """Block until there is work; then a batch, after the short wait for it to fill (lock held)."""
        batch: list[_Item] = []
        while not batch:
            if self._closed:
                return None
            self._take(batch)
            if not batch:
                self._cond.wait()
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_cap and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._cond.wait(remaining):
                break
            self._take(batch)
        return batch

    def _take(self, batch: list[_Item]) -> None:
        """Add items matching the batch's model and shape: one per job per round, from the job whose turn it is."""
        key = batch[0].key if batch else None
        took = True
        while took and len(batch) < self.batch_cap:
            took = False
            for job in list(self._queues):
                queue = self._queues[job]
                while queue and queue[0].future.cancelled():
                    queue.popleft()
                if not queue:
                    del self._queues[job]
                    continue
                if key is not None and queue[0].key != key:
                    continue
                item = queue.popleft()
                if not item.future.set_running_or_notify_cancel():
                    continue
                key = item.key
                batch.append(item)
                took = True
                if not queue:
                    del self._queues[job]
                if len(batch) == self.batch_cap:
                    break
        # The next batch starts with the job after the first one served here.
        if batch and batch[0].job in self._queues:
            self._queues.move_to_end(batch[0].job)

    def _run(self, items: list[_Item]) -> None:
        started = time.perf_counter()
        started_ns = time.time_ns()
        try:
            outputs = self._forward(items)
        except torch.cuda.OutOfMemoryError:
            self._report(items, out_of_memory=True, seconds=time.perf_counter() - started)
            self._after_out_of_memory()
            if len(items) == 1:
                items[0].future.set_exception(SegmentOutOfMemory("one segment does not fit the device's memory"))
                return
            half = len(items) // 2
            self.batch_cap = min(self.batch_cap, half)
            self._run(items[:half])
            self._run(items[half:])
            return
        except BaseException as exc:
            for item in items:
                item.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._report(items, out_of_memory=False, seconds=time.perf_counter() - started)
        _trace_batch(items, started_ns, str(self.device), self.precision, self.backend)
        for item, output in zip(items, outputs, strict=True):
            item.future.set_result(output)

    def _forward(self, items: list[_Item]) -> tuple[torch.Tensor, ...]:
        if self.memory_budget_bytes and self.estimate_bytes(items) > self.memory_budget_bytes:
            raise torch.cuda.OutOfMemoryError(
                f"simulated: {len(items)} segments need {self.estimate_bytes(items)} bytes, budget {self.memory_budget_bytes}"
            )
        core = self._core(items[0].model) if self._exports is not None else None
        if core is not None:
            # One window at a time: the exported graph has the shape of one segment.
            with torch.inference_mode():
                return tuple(forward_split(items[0].model, core, item.window[None])[0] for item in items)
        if getattr(items[0].model, "stemflow_weights_released", False):
            raise RuntimeError("this model's weights were released to a runtime: it cannot run in torch")
        model = self._runnable(items[0].model)
        windows = items[0].window[None] if len(items) == 1 else torch.stack([item.window for item in items])
        windows = windows.to(self.device, non_blocking=True)
        with torch.inference_mode():
            with self._autocast():
                out = model(windows)
            # Half precision can overflow on some input; such a batch is redone in float32.
            if self.precision != "float32" and not torch.isfinite(out).all():
                out = model(windows)
            return out.float().cpu().unbind(0)

    def _runnable(self, model: nn.Module) -> nn.Module:
        """The model, or its torch.compile'd form (compiled on first use, once per model)."""
        if not self._compile:
            return model
        compiled = self._compiled.get(id(model))
        if compiled is None:
            compiled = self._compiled[id(model)] = torch.compile(model, dynamic=False)  # type: ignore[assignment]
        return compiled

    def _core(self, model: nn.Module) -> Core | None:
        """The model's network in the backend (exported and loaded on first use), or None to run it in torch."""
        if id(model) in self._cores:
            return self._cores[id(model)]
        assert self._exports is not None
        load = RUNTIMES[self.backend][0]
        threads = self.threads or torch.get_num_threads()
        try:
            check_supported(model)
        except CoreUnsupported as exc:
            log.warning("%s runs in torch, not %s: %s", type(model).__name__, self.backend, exc)
            self._cores[id(model)] = None
            return None
        path = self._exports.path(model)
        try:
            core = load(path, threads)
        except Exception as exc:
            # A file damaged on disk (its name is right, its content not): export it again, once.
            log.warning("loading %s in %s failed (%r): exporting it again", path, self.backend, exc)
            core = load(self._exports.path(model, refresh=True), threads)
        self._cores[id(model)] = core
        if self.release_weights:
            release_weights(model)
        else:
            trim_heap()
        return core

    def warm_up(self, model: nn.Module) -> None:
        """Run one silent segment through `model` (one of a bag), so compilation or export happens before the first job."""
        window = torch.zeros(model.audio_channels, int(model.samplerate * model.segment))
        self.submit("warm-up", model, window).result()

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=dtype):
            yield

    @staticmethod
    def estimate_bytes(items: list[_Item]) -> int:
        """The simulated budget's measure: float32 inputs and outputs of the batch."""
        return sum(item.window.numel() * 4 * (1 + len(item.model.sources)) for item in items)

    def _after_out_of_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _report(self, items: list[_Item], *, out_of_memory: bool, seconds: float) -> None:
        if self._on_batch is not None:
            report = BatchReport(tuple(item.job for item in items), out_of_memory, seconds, str(self.device))
            self._on_batch(report)


def release_weights(model: nn.Module) -> None:
    """Free the parameters and buffers of `model` (an HTDemucs run by a runtime: STFT and iSTFT need none).

    The model keeps its attributes (segment, sources, ...); running it in torch afterwards fails.
    Freed heap memory is handed back to the system (glibc), so the drop shows in the RSS.
    """
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = torch.empty(0, dtype=parameter.dtype)
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = torch.empty(0, dtype=buffer.dtype)
    model.stemflow_weights_released = True  # type: ignore[assignment]
    trim_heap()


def trim_heap() -> None:
    """glibc's malloc_trim(0): freed heap pages back to the system (nothing elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _trace_batch(items: list[_Item], start_ns: int, device: str, precision: str, backend: str = "torch") -> None:
    """One `separator.batch` span per job in the batch, under that job's span (nothing when tracing is off)."""
    by_job: dict[Hashable, list[_Item]] = {}
    for item in items:
        if trace.get_current_span(item.context).get_span_context().is_valid:
            by_job.setdefault(item.job, []).append(item)
    if not by_job:
        return
    end_ns = time.time_ns()
    jobs = len({item.job for item in items})
    tracer = telemetry.tracer("stemflow.separator")
    for mine in by_job.values():
        first = mine[0]
        rate = getattr(first.model, "samplerate", 44100)
        span = tracer.start_span("separator.batch", context=first.context, start_time=start_ns)
        span.set_attributes(
            {
                "stemflow.model": first.model_name,
                "stemflow.device": device,
                "stemflow.precision": precision,
                "stemflow.engine": backend,
                "stemflow.batch.size": len(items),
                "stemflow.batch.jobs": jobs,
                "stemflow.batch.segments_of_job": len(mine),
                "stemflow.audio.seconds": sum(item.window.shape[-1] for item in mine) / rate,
            }
        )
        span.end(end_time=end_ns)
