"""The ``openvino`` inference backend: the model converted in-process by OpenVINO's PyTorch
frontend (``openvino.convert_model``; through an in-process ONNX export for a model with an op
that frontend lacks, HA-CNN's ``affine_grid``; checked against PyTorch) and compiled for the CPU, in
fp32, bf16 (``INFERENCE_PRECISION_HINT``; only where OpenVINO reports the CPU's BF16
capability: AMX or AVX512-BF16) or int8 (NNCF post-training quantisation, calibrated on
training images). :mod:`attnreid.inference.backend` says when each is used.

For MHSA-Net and the Baseline no ONNX file is involved: ``attnreid[openvino]`` alone is enough;
HA-CNN also needs ``attnreid[onnx]``'s exporter.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from attnreid.errors import AttnReidError
from attnreid.inference.backend import weights_version
from attnreid.inference.export import (CHECK_BATCH, EXPORT_BATCH, ExportWrapper, _first_line, _quiet_exporter,
                                       _without_classifiers)

INSTALL = "pip install 'attnreid[openvino]'"
REQUIRES = "the optional openvino package (and nncf for int8)"
# ``auto`` tries OpenVINO only for jobs of at least this many images: like onnxruntime's
# export, the conversion and each precision's compile are a fixed cost. In
# benchmarks/results/infer_cpu.json (a loaded Xeon, one thread, batch 64) fp32 pays after
# about 50 images for MHSA-Net (11 s conversion) and 3,700 for HA-CNN (107 s: it goes through
# the ONNX export); 1,000, as for onnxruntime, keeps every Market-1501-size job eligible.
MIN_IMAGES = 1000
PRECISION_REASON = "OpenVINO runs the converted graph"
# The conversion check: max |OpenVINO fp32 - PyTorch| / max |PyTorch| on a random batch. OpenVINO
# fuses and reorders float32 sums: on MHSA-Net (ResNet-50, 384x128, random weights, a Xeon with
# AMX) the difference was 1.7e-4 (onnxruntime's 1.1e-4), above the ONNX export's 1e-4; a wrong
# conversion differs by orders of magnitude more. ``auto`` still compares cosines on real images.
CHECK_TOLERANCE = 1e-3
# What this backend can compute; ``precisions()`` is what it can compute on this machine.
PRECISIONS = ("fp32", "bf16", "int8")
# OpenVINO's names for the precisions.
_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the quantised ops are int8, the rest fp32

# Per model: its converted graph and compiled sessions, reused while the weights, the input
# size and the threads stay the same.
_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _installed(name: str) -> bool:
    """``name`` can be imported, found without importing it: ``auto`` asks on every job, and
    importing OpenVINO and NNCF takes seconds (``sys.modules[name] = None`` blocks it, as in Python)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def available() -> bool:
    """OpenVINO (``attnreid[openvino]``) is installed; int8 also needs NNCF (:func:`precisions`)."""
    return _installed("openvino")


def precisions() -> tuple:
    """The precisions this machine runs: fp32, bf16 where OpenVINO reports the CPU's BF16
    capability (AMX or AVX512-BF16; elsewhere it would quietly compute in fp32), int8 where
    NNCF is installed."""
    import openvino as ov

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return tuple(p for p in PRECISIONS if (p != "bf16" or "BF16" in caps) and (p != "int8" or _installed("nncf")))


@contextlib.contextmanager
def _quiet_nncf():
    """NNCF logs and draws a progress bar while it collects statistics; keep them off the console."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with _quiet_exporter():
            yield
    finally:
        logger.setLevel(level)


def _convert(model: torch.nn.Module, input_size: Sequence[int]):
    """``model`` (eval mode) as an OpenVINO graph with a dynamic batch; its fp32 compile must match
    PyTorch on a batch of another size than the conversion's (relative difference < :data:`CHECK_TOLERANCE`)."""
    import openvino as ov

    wrapper = ExportWrapper(model).eval()
    example = torch.randn(EXPORT_BATCH, 3, *input_size)
    try:
        with _quiet_exporter(), _without_classifiers(model), torch.no_grad():
            graph = ov.convert_model(wrapper, example_input=example, input=[(-1, 3, *input_size)])
    except Exception as exc:  # an op the PyTorch frontend lacks (HA-CNN's affine_grid): through ONNX
        graph = _convert_via_onnx(model, input_size, _unconverted(exc))
    probe = torch.randn(CHECK_BATCH, 3, *input_size)
    with torch.no_grad():
        ref = wrapper(probe).float().numpy()
    got = ov.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(probe.numpy())[0]
    rel = float(np.abs(got - ref).max()) / max(float(np.abs(ref).max()), 1e-12)
    if not rel < CHECK_TOLERANCE:
        raise AttnReidError(f"OpenVINO's conversion differs from PyTorch: relative difference {rel:.2e} "
                            f">= {CHECK_TOLERANCE:.0e} at batch {CHECK_BATCH}")
    return graph


def _unconverted(exc: BaseException) -> str:
    """The frontend's own summary (``No conversion rule found for operations: ...``), else its first line."""
    text = str(exc)
    i = text.find("No conversion rule found")
    return text[i:].splitlines()[0].strip() if i >= 0 else _first_line(exc)


def _convert_via_onnx(model: torch.nn.Module, input_size: Sequence[int], why: str):
    """The graph read from an in-process ONNX export (torch's exporter decomposes what OpenVINO's
    PyTorch frontend cannot convert); needs ``attnreid[onnx]``'s onnx as well."""
    import openvino as ov

    from attnreid.inference.export import export_onnx

    name = getattr(model, "model_name", type(model).__name__)
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise AttnReidError(f"OpenVINO could not convert '{name}' ({why}); with attnreid[onnx] installed it "
                            f"converts through an ONNX export") from None
    with tempfile.TemporaryDirectory(prefix="attnreid_openvino_") as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, tuple(input_size), check=False)  # checked below, in OpenVINO
        return ov.convert_model(str(path))


def _quantize(graph, calibration: Callable[[], Sequence[torch.Tensor]]):
    """The graph quantised to int8 by NNCF, its activation ranges measured on ``calibration()``'s
    images (preprocessed batches)."""
    import nncf

    batches = [b.detach().cpu().float().numpy() for b in calibration()]
    if not batches:
        raise AttnReidError("int8 quantisation needs calibration images; none were given")
    items = [b[i:i + 1] for b in batches for i in range(b.shape[0])]
    with _quiet_nncf():
        return nncf.quantize(graph, nncf.Dataset(items), subset_size=len(items))


def open_session(model: torch.nn.Module, input_size, precision: str = "fp32",
                 calibration: Optional[Callable[[], Sequence[torch.Tensor]]] = None,
                 threads: Optional[int] = None):
    """``model`` converted (checked against PyTorch) and compiled for the CPU in ``precision``
    (fp32 | bf16 | int8, which needs ``calibration``: a callable returning preprocessed image
    batches) with ``threads`` inference threads (default: torch's); returns ``(session, setup
    seconds)``. The conversion is shared by the precisions and everything is reused while the
    weights, the input size and the threads stay the same. Leaves the global RNG as it found it."""
    import openvino as ov

    if precision not in PRECISIONS:
        raise AttnReidError(f"openvino has no precision {precision!r}; expected one of: {', '.join(PRECISIONS)}")
    if precision == "int8" and calibration is None:
        raise AttnReidError("openvino int8 needs calibration images (eval.int8_calibration)")
    threads = torch.get_num_threads() if threads is None else threads
    key = (tuple(input_size), threads, weights_version(model))
    cached = _cache.get(model)
    if cached is None or cached["key"] != key:
        cached = {"key": key, "graph": None, "sessions": {}}
        _cache[model] = cached
    if precision in cached["sessions"]:
        return cached["sessions"][precision]
    t0 = time.perf_counter()
    was_training = model.training
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        try:
            if cached["graph"] is None:
                cached["graph"] = _convert(model.eval(), tuple(input_size))
            graph = _quantize(cached["graph"], calibration) if precision == "int8" else cached["graph"]
        finally:
            model.train(was_training)
    session = ov.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": _HINTS[precision],
                                                     "INFERENCE_NUM_THREADS": threads})
    cached["sessions"][precision] = (session, time.perf_counter() - t0)
    return cached["sessions"][precision]


def features(session: Any, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """The session's float32 features of a batch (flip-averaged when asked), on the CPU."""
    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.array(session(x.detach().cpu().float().contiguous().numpy())[0])).float()

    f = run(images)
    if flip:
        f = (f + run(torch.flip(images, dims=[3]))) / 2
    return f
