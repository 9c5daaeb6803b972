"""The CPU runtimes that run an exported network: ONNX Runtime and OpenVINO, float32 both.

Each `load_*` takes the exported ONNX file and returns a `core.Core` (torch tensors in and
out). The runtime's own compiled form, where it keeps one (OpenVINO's blob cache), lives
in a folder named after the runtime's version next to the exported file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .core import Core

INPUTS = ("mag", "mix")


def _feeds(mag: torch.Tensor, mix: torch.Tensor) -> dict[str, np.ndarray]:
    return {"mag": mag.contiguous().numpy(), "mix": mix.contiguous().numpy()}


def load_onnxruntime(path: Path, threads: int) -> Core:
    """An ONNX Runtime CPU session with every graph optimisation, on `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
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


def load_openvino(path: Path, threads: int) -> Core:
    """An OpenVINO CPU model in float32 (its default on CPUs with AMX or AVX512-BF16 is bfloat16)."""
    import openvino as ov

    core = ov.Core()
    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "CACHE_DIR": str(path.parent / f"openvino-{openvino_version()}"),
    }
    compiled = core.compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def run(mag: torch.Tensor, mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        result = request.infer(_feeds(mag, mix))
        # The request reuses its output buffers on the next call: copy them out.
        spec, wave = (torch.from_numpy(np.array(result[output])) for output in outputs)
        return spec, wave

    return run


def openvino_version() -> str:
    import openvino as ov

    return str(ov.get_version()).split("-")[0]


# engine name -> (loader, version); a runtime whose package is missing fails when it is chosen.
RUNTIMES: dict[str, tuple[Callable[[Path, int], Core], Callable[[], str]]] = {
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
