"""ONNX export with a built-in equivalence check against PyTorch.

:func:`export_onnx` writes a graph with one input ``images`` (``batch x 3 x H x W``,
normalised like :meth:`FeatureExtractor.preprocess` output; the batch dimension is
dynamic) and the output ``feature`` (``batch x feature_dim``, the model's configured test
feature). With ``attention=True`` the graph also returns the model's
``forward_attention`` maps: MHSA-Net ``attention`` (B x K x h x w) and ``beta`` (B x K);
HA-CNN ``soft_attention_<l>`` (B x h_l x w_l) and ``regions_<l>`` (B x T x 4) per level.

The exporter is torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``), which
handles HA-CNN's ``affine_grid``/``grid_sample`` at opset 18; the TorchScript exporter
is the fallback (it needs opset >= 20 for ``affine_grid``). The dynamo exporter writes
opset 18 or newer whatever it is asked (below 18 it keeps 18), so an older opset is
exported with the TorchScript exporter (opsets 7 to 20); every file's opset is read back
and one that differs from the requested opset is never kept. Then :func:`check_onnx` runs
the file in onnxruntime on a random batch whose size differs from the export batch (so a
batch size frozen into the graph is caught) and compares every output with PyTorch;
``attnreid export`` checks batches of 1, 7 and 64 (:data:`CONTRACT_BATCHES`): a BatchNorm
left in training mode (torchreid issue 585) makes the outputs depend on the batch, and a
reshape that baked the export batch fails or differs at the other sizes.

:func:`inference_contract` is what the file's metadata says about its input and output
(docs/deployment.md, "The inference contract"): a program that reads it (examples/onnx_only.py)
needs nothing else to compute the same features.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from attnreid.errors import AttnReidError
from attnreid.models.baseline import BNNeckClassifier
from attnreid.models.registry import spec_of
from attnreid.safe_io import atomic_path

DEFAULT_OPSET = 18
MIN_OPSET = 7  # torch.onnx's oldest (TorchScript exporter)
MAX_OPSET = 23  # torch.onnx's newest (dynamo exporter)
DYNAMO_MIN_OPSET = 18  # the dynamo exporter writes nothing older
TORCHSCRIPT_MAX_OPSET = 20
EXPORT_BATCH = 2
CHECK_BATCH = 3
CONTRACT_BATCHES = (1, 7, 64)  # what `attnreid export` verifies: one, an odd size, a large batch
REL_TOLERANCE = 1e-4
CONTRACT_VERSION = 1


def inference_contract(model_name: str, feature_dim: int, input_size: Sequence[int], mean: Sequence[float],
                       std: Sequence[float], l2_normalized: bool, metric: str, config_hash: str,
                       weights_hash: str) -> Dict[str, str]:
    """The ONNX metadata of an exported model: everything a runtime needs to feed it and read it.

    Normalisation stays outside the graph (the graph takes what ``FeatureExtractor.preprocess``
    returns), as BoxMOT's and deep-sort's ONNX embedders feed their models: a caller that
    normalises and a graph that normalises again would give wrong features silently
    (fast-reid issue 177). Values are strings; lists are JSON.
    """
    import json

    height, width = (int(v) for v in input_size)
    return {
        "attnreid_contract": str(CONTRACT_VERSION),
        "input_name": "images",
        "input_dtype": "float32",
        "input_layout": "NCHW",
        "input_shape": f"[batch, 3, {height}, {width}]",
        "input_height": str(height),
        "input_width": str(width),
        "input_channel_order": "RGB",
        "input_resize": "bilinear, anti-aliased when shrinking (Pillow BILINEAR on float pixels), to exactly "
                        f"{height}x{width}; the aspect ratio is not kept, nothing is padded",
        "input_scale": repr(1.0 / 255.0),
        "input_value_range": "RGB pixels 0..255 times input_scale (0..1), then (x - input_mean) / input_std per channel",
        "input_mean": json.dumps([float(m) for m in mean]),
        "input_std": json.dumps([float(s) for s in std]),
        "normalization": "outside the graph",
        "output_name": "feature",
        "output_shape": f"[batch, {int(feature_dim)}]",
        "output_dim": str(int(feature_dim)),
        "output_l2_normalized": "true" if l2_normalized else "false",
        "metric": metric,
        "dynamic_batch": "true",
        # the names attnreid recorded before the contract, kept for readers of older files
        "model": model_name,
        "feature_dim": str(int(feature_dim)),
        "config_hash": config_hash,
        "weights_hash": weights_hash,
        "input_size": f"{height}x{width}",
        "mean": str([float(m) for m in mean]),
        "std": str([float(s) for s in std]),
    }


def flatten_outputs(outputs: Dict[str, Any]) -> List[Tuple[str, torch.Tensor]]:
    """``forward_attention``'s dict -> named tensors in a fixed order (lists become ``name_<i>``).

    Non-tensor entries (e.g. HA-CNN's ``region_levels``, a list of ints) are not graph outputs.
    """
    flat: List[Tuple[str, torch.Tensor]] = []
    for name, value in outputs.items():
        if isinstance(value, torch.Tensor):
            flat.append((name, value))
        elif isinstance(value, (list, tuple)):
            flat.extend((f"{name}_{i}", v) for i, v in enumerate(value) if isinstance(v, torch.Tensor))
    return flat


class ExportWrapper(nn.Module):
    """The graph that is exported: test feature alone, or feature plus attention maps."""

    def __init__(self, model: nn.Module, attention: bool = False):
        super().__init__()
        self.model = model
        self.attention = attention

    def forward(self, images: torch.Tensor):
        if not self.attention:
            return self.model(images)
        outputs = self.model.forward_attention(images)
        return tuple(t for _, t in flatten_outputs(outputs))

    def output_names(self, example: torch.Tensor) -> List[str]:
        if not self.attention:
            return ["feature"]
        with torch.inference_mode():
            return [n for n, _ in flatten_outputs(self.model.forward_attention(example))]


@contextlib.contextmanager
def _without_classifiers(model: nn.Module):
    """Detach the identity classifiers (unused at test time) while exporting.

    The dynamo exporter regenerates Python code from the module tree, and a classifier
    named ``global`` (a Python keyword) makes that code invalid; the classifiers would
    only be dead weights in the graph anyway.
    """
    heads = getattr(model, "classifiers", None)
    if heads is None or any(isinstance(h, BNNeckClassifier) for h in heads.values()):
        yield  # a BNNeck's BN is part of the test feature: keep the heads
        return
    model.classifiers = nn.ModuleDict()
    try:
        yield
    finally:
        model.classifiers = heads


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters report progress and warnings (stdout, stderr, the ``torch.onnx`` logger,
    and, from C++, the TorchScript graph of a failed export on file descriptor 1); keep them
    off the console."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    log = io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    sink = tempfile.TemporaryFile()
    try:
        for fd in (1, 2):
            os.dup2(sink.fileno(), fd)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        sink.close()
        logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _export_dynamo(wrapper: nn.Module, example: torch.Tensor, out: Path, opset: int, names: List[str]) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(wrapper, (example,), None, dynamo=True, opset_version=opset,
                                input_names=["images"], output_names=names,
                                dynamic_shapes={"images": {0: batch}}, optimize=True, verbose=False)
    program.save(str(out))


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, out: Path, opset: int, names: List[str]) -> None:
    axes = {n: {0: "batch"} for n in ["images", *names]}
    torch.onnx.export(wrapper, (example,), str(out), dynamo=False, opset_version=opset, input_names=["images"],
                      output_names=names, dynamic_axes=axes, do_constant_folding=True)


def check_opset(opset: Optional[int]) -> int:
    """The opset to export (``None``: :data:`DEFAULT_OPSET`); outside what torch.onnx writes is one line."""
    if opset is None:
        return DEFAULT_OPSET
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise AttnReidError(f"--opset {opset} is not supported: torch's ONNX exporters write opsets "
                            f"{MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    return int(opset)


def file_opset(path: str | Path) -> int:
    """The default-domain (``ai.onnx``) opset an ONNX file declares."""
    import onnx  # optional (attnreid[onnx]): imported when a file is written or read

    proto = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _exporters(opset: int):
    """The exporters that can write ``opset``, preferred first."""
    out = []
    if opset >= DYNAMO_MIN_OPSET:
        out.append(("dynamo", _export_dynamo))
    if opset <= TORCHSCRIPT_MAX_OPSET:
        out.append(("torchscript", _export_torchscript))
    return out


def check_onnx(path: str | Path, model: nn.Module, input_size: Sequence[int], attention: bool = False,
               batch: int = CHECK_BATCH, seed: int = 0) -> Dict[str, Any]:
    """Run the ONNX file in onnxruntime and PyTorch on the same random batch; compare outputs.

    Returns ``max_abs_diff`` and ``rel_diff`` (max |onnx - torch| / max |torch|, the
    worst over all outputs), and the same per output name under ``diffs``.
    """
    import onnxruntime as ort  # optional (attnreid[onnx])

    wrapper = ExportWrapper(model, attention).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *input_size, generator=gen)
    with torch.inference_mode():
        ref = wrapper(x)
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same CPU budget as the PyTorch side
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    try:
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    except Exception as exc:  # onnxruntime reports a shape baked into the graph as a runtime failure
        raise AttnReidError(f"ONNX file {path} fails in onnxruntime at batch {batch}: {_first_line(exc)}") from None
    names = [o.name for o in session.get_outputs()]
    if len(got) != len(refs):
        raise AttnReidError(f"ONNX file {path} has {len(got)} outputs but the model gives {len(refs)}")
    per_output = {}
    for name, g, r in zip(names, got, refs):
        r = r.float().numpy()
        if g.shape != r.shape:
            raise AttnReidError(f"ONNX output '{name}' of {path} has shape {g.shape} for batch {batch}; "
                                f"PyTorch gives {r.shape}")
        abs_diff = float(np.abs(g - r).max()) if r.size else 0.0
        per_output[name] = {"max_abs_diff": abs_diff, "rel_diff": abs_diff / max(float(np.abs(r).max()), 1e-12)}
    return {
        "check_batch": batch,
        "max_abs_diff": max(v["max_abs_diff"] for v in per_output.values()),
        "rel_diff": max(v["rel_diff"] for v in per_output.values()),
        "diffs": per_output,
    }


def export_onnx(model: nn.Module, out: str | Path, input_size: Sequence[int], opset: Optional[int] = None,
                attention: bool = False, check: bool = True, tolerance: float = REL_TOLERANCE,
                metadata: Optional[Dict[str, Any]] = None,
                check_batches: Sequence[int] = (CHECK_BATCH,)) -> Dict[str, Any]:
    """Export ``model`` (eval mode) to ``out`` and verify it; return a report dict.

    ``metadata`` (e.g. :func:`inference_contract`) is stored as the ONNX model's
    ``metadata_props``. The file is compared with PyTorch at each of ``check_batches``; a
    relative difference >= ``tolerance`` raises a one-line :class:`AttnReidError`. The file is written under a temporary name next to ``out`` and
    renamed to ``out`` only once it is exported and verified: a failed or rejected export
    leaves an existing ``out`` as it was.
    """
    out = Path(out)
    model = model.eval()
    opset = check_opset(opset)
    name = getattr(model, "model_name", type(model).__name__)
    spec = spec_of(model)
    if spec is not None and opset < spec.onnx_min_opset:
        raise AttnReidError(f"--opset {opset} is too old for {spec.label}: {spec.onnx_opset_reason}, "
                            f"which needs opset >= {spec.onnx_min_opset}")
    has_maps = spec.attention is not None if spec is not None else hasattr(model, "forward_attention")
    if attention and not has_maps:
        raise AttnReidError(f"model '{name}' has no attention maps to export; drop --attention")
    wrapper = ExportWrapper(model, attention).eval()
    example = torch.randn(EXPORT_BATCH, 3, *input_size)
    names = wrapper.output_names(example)
    t0 = time.perf_counter()
    errors = []
    exporter = None
    with atomic_path(out, suffix=".onnx") as tmp:  # renamed to `out` only if every step below succeeds
        for label, fn in _exporters(opset):
            try:
                with _quiet_exporter(), _without_classifiers(model):
                    fn(wrapper, example, tmp, opset, names)
            except Exception as exc:  # any exporter failure: try the other one, then report both
                errors.append(f"{label}: {_first_line(exc)}")
                continue
            written = file_opset(tmp)
            if written != opset:
                errors.append(f"{label}: wrote opset {written}")
                continue
            exporter = label
            break
        if exporter is None:
            raise AttnReidError(f"ONNX export of '{name}' at opset {opset} failed ({'; '.join(errors)}); "
                                f"{out} is unchanged")
        if metadata:
            _write_metadata(tmp, metadata)
        report: Dict[str, Any] = {"onnx": str(out), "model": name, "exporter": exporter, "opset": opset,
                                  "inputs": ["images"], "outputs": names, "export_batch": EXPORT_BATCH,
                                  "input_size": list(input_size),
                                  "export_seconds": round(time.perf_counter() - t0, 2)}
        if check:
            report.update(verify_onnx(tmp, model, input_size, attention, tolerance, check_batches, name=out))
    return report


def verify_onnx(path: str | Path, model: nn.Module, input_size: Sequence[int], attention: bool = False,
                tolerance: float = REL_TOLERANCE, batches: Sequence[int] = (CHECK_BATCH,),
                name: Optional[str | Path] = None) -> Dict[str, Any]:
    """:func:`check_onnx` at each batch size, raising one line when a relative difference is >=
    ``tolerance`` (``name``: the file to name in it, when ``path`` is a temporary file on its way
    there). Returns the worst batch's numbers, plus ``check_batches`` and ``per_batch``."""
    kept = f"; {name} is unchanged" if name is not None else ""
    diffs = []
    for batch in batches:
        diff = check_onnx(path, model, input_size, attention, batch=batch)
        if diff["rel_diff"] >= tolerance:
            raise AttnReidError(f"ONNX check failed for {name or path} at batch {batch}: onnxruntime differs from "
                                f"PyTorch by {diff['rel_diff']:.2e} relative (max abs {diff['max_abs_diff']:.2e}); "
                                f"tolerance {tolerance:.0e}{kept}")
        diffs.append(diff)
    per_batch = {str(d["check_batch"]): {k: d[k] for k in ("max_abs_diff", "rel_diff")} for d in diffs}
    worst = max(diffs, key=lambda d: d["rel_diff"])
    return {**worst, "check_batches": [int(b) for b in batches], "per_batch": per_batch}


def _write_metadata(path: Path, metadata: Dict[str, Any]) -> None:
    import onnx  # optional (attnreid[onnx])

    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.save(proto, str(path))
