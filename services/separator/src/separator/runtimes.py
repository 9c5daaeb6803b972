"""The CPU runtimes that run an exported network: ONNX Runtime and OpenVINO, float32 both.

Each `load_*` takes the exported ONNX file, the CPU threads and the number of streams, and
returns a `core.Core` (torch tensors in and out). With `streams` > 1 the core may be called
from that many threads at once, each call running on its own share of the threads (OpenVINO:
one stream and infer request each; ONNX Runtime: threads // streams intra-op threads per
call); each concurrent call holds its own intermediate tensors. The runtime's own compiled
form, where it keeps one (OpenVINO's blob cache), lives in a folder named after the runtime's
version next to the exported file.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .core import Core

INPUTS = ("mag", "mix")


def _feeds(mag: torch.Tensor, mix: torch.Tensor) -> dict[str, np.ndarray]:
    return {"mag": mag.contiguous().numpy(), "mix": mix.contiguous().numpy()}


def load_onnxruntime(path: Path, threads: int, streams: int = 1) -> Core:
    """An ONNX Runtime CPU session with every graph optimisation, on `threads` intra-op threads.

    With several streams, each concurrent run gets threads // streams of them (at least its own
    calling thread): one session (one copy of the weights), run from several threads at once.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = max(1, threads // max(1, streams))
    options.inter_op_num_threads = 1
    # Spinning threads burn the shared cores between segments for no gain at this op size.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(mag: torch.Tensor, mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec, wave = session.run(None, _feeds(mag, mix))
        return torch.from_numpy(spec), torch.from_numpy(wave)

    return run


def onnxruntime_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def load_openvino(path: Path, threads: int, streams: int = 1) -> Core:
    """An OpenVINO CPU model in float32 (its default on CPUs with AMX or AVX512-BF16 is bfloat16).

    One stream on all `threads` (latency) by default; with several, the threads are split among
    that many streams, each with its own infer request, handed to one caller at a time.
    """
    import openvino as ov

    streams = max(1, streams)
    core = ov.Core()
    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
        "NUM_STREAMS": streams,
        "CACHE_DIR": str(path.parent / f"openvino-{openvino_version()}"),
    }
    compiled = core.compile_model(str(path), "CPU", config)
    requests: queue.SimpleQueue[ov.InferRequest] = queue.SimpleQueue()
    for _ in range(streams):
        requests.put(compiled.create_infer_request())
    outputs = compiled.outputs

    def run(mag: torch.Tensor, mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        request = requests.get()
        try:
            result = request.infer(_feeds(mag, mix))
            # The request reuses its output buffers on the next call: copy them out.
            spec, wave = (torch.from_numpy(np.array(result[output])) for output in outputs)
        finally:
            requests.put(request)
        return spec, wave

    return run


def openvino_version() -> str:
    import openvino as ov

    return str(ov.get_version()).split("-")[0]


# engine name -> (loader, version); a runtime whose package is missing fails when it is chosen.
RUNTIMES: dict[str, tuple[Callable[[Path, int, int], Core], Callable[[], str]]] = {
    "onnx": (load_onnxruntime, onnxruntime_version),
    "openvino": (load_openvino, openvino_version),
}


def available(name: str) -> bool:
    """Whether the runtime's package imports here."""
    try:
        RUNTIMES[name][1]()
    except ImportError:
        return False
    return True
