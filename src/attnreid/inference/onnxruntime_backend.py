"""The ``onnxruntime`` inference backend: the model exported in-process to a temporary ONNX file
(:func:`attnreid.inference.export.export_onnx`, checked against PyTorch) and run in an
onnxruntime session, float32, on the CPU (:mod:`attnreid.inference.backend` says when).
"""

from __future__ import annotations

import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Optional

import torch

from attnreid.errors import AttnReidError
from attnreid.inference.backend import weights_version
from attnreid.inference.export import export_onnx

INSTALL = "pip install 'attnreid[onnx]'"
REQUIRES = "the optional onnx and onnxruntime packages"
# ``auto`` exports to onnxruntime only for jobs of at least this many images. The export
# (plus its check and the session) is a fixed cost; it pays after setup_s / (1/eager - 1/ort)
# images (``break_even_images`` in benchmarks/bench_infer.py's rows). From
# benchmarks/results/infer_cpu.json (batch 64, an idle 2-core machine) that is about 90
# images for MHSA-Net (ResNet-50, 3.45x faster in onnxruntime) and about 2,100 for HA-CNN
# (2.0x). 1,000 keeps every Market-1501 or DukeMTMC evaluation (~19,000 images) on
# onnxruntime for both models and costs a smaller HA-CNN job at most a few seconds.
MIN_IMAGES = 1000
# What an onnxruntime feature is: the exported float32 graph, whatever eval.amp says.
PRECISION_REASON = "onnxruntime runs the exported float32 graph"
PRECISIONS = ("fp32",)

# Per model: its session, reused while the weights and the input size stay the same.
_sessions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def available() -> bool:
    """The optional packages this backend needs (``attnreid[onnx]``) import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def precisions() -> tuple:
    """What this backend computes here: float32 only."""
    return PRECISIONS


def open_session(model: torch.nn.Module, input_size, precision: str = "fp32", calibration=None,
                 threads: Optional[int] = None):
    """``model`` exported to a temporary ONNX file (checked against PyTorch) and opened in
    onnxruntime with ``threads`` intra-op threads (default: torch's); returns
    ``(session, export seconds)``. Reused while the model's weights and the input size stay
    the same. The export leaves the global RNG as it found it (training goes on after an
    evaluation)."""
    import onnxruntime as ort  # optional (attnreid[onnx]): imported when a session is opened

    if precision != "fp32":
        raise AttnReidError(f"onnxruntime computes fp32 only, not {precision}")
    threads = torch.get_num_threads() if threads is None else threads
    key = (tuple(input_size), threads, weights_version(model))
    cached = _sessions.get(model)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    t0 = time.perf_counter()
    was_training = model.training
    # outside inference mode (the extraction loop's): the exporter traces the model
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]), \
            tempfile.TemporaryDirectory(prefix="attnreid_onnx_") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            export_onnx(model, path, tuple(input_size))
        finally:
            model.train(was_training)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    seconds = time.perf_counter() - t0
    _sessions[model] = (key, session, seconds)
    return session, seconds


def features(session: Any, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """The session's float32 features of a batch (flip-averaged when asked), on the CPU."""
    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": x.detach().cpu().contiguous().numpy()})[0]).float()

    f = run(images)
    if flip:
        f = (f + run(torch.flip(images, dims=[3]))) / 2
    return f
