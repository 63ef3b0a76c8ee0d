"""Inference backend (eval.backend / --backend / FeatureExtractor(backend=)): onnxruntime vs PyTorch, auto's rule."""

from __future__ import annotations

import copy
import json
import re
import sys

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, run_cli
from test_inference_precision import TINY, tiny  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread_module", "fresh_announcements")

from attnreid.config import from_dict, load_config
from attnreid.data.datasets import build_dataset
from attnreid.deploy.extractor import FeatureExtractor
from attnreid.engine.evaluator import evaluate_model
from attnreid.errors import AttnReidError, ConfigError
from attnreid.inference import backend as inference
from attnreid.inference import onnxruntime_backend as ort_backend
from attnreid.inference.extract import extract_with_precision

needs_ort = pytest.mark.skipif(not ort_backend.available(), reason="needs attnreid[onnx]")


@pytest.fixture
def no_onnxruntime(monkeypatch):
    """This process cannot import onnxruntime (a plain install without attnreid[onnx])."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)


@pytest.fixture
def no_openvino(monkeypatch):
    """This process cannot import openvino (an install without attnreid[openvino])."""
    monkeypatch.setitem(sys.modules, "openvino", None)


def designed_speeds(monkeypatch, seconds):
    """auto's timing replaced by designed seconds per candidate path (others: 10 s), so that which
    path is fastest holds by construction; the features are still computed."""
    monkeypatch.setattr(inference, "_measure", lambda path, run: (run(), seconds.get(path, 10.0)))


@pytest.fixture
def no_export(monkeypatch):
    """Any ONNX export fails the test: the paths that must not export."""
    def refuse(*_a, **_k):
        raise AssertionError("exported although it must not")
    monkeypatch.setattr(ort_backend, "open_session", refuse)


def assert_close_features(a: torch.Tensor, b: torch.Tensor) -> None:
    # onnxruntime fuses conv + BN and reorders sums: float32 rounding relative to the features' scale
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(b.abs().max()))


@needs_ort
def test_onnxruntime_backend_matches_torch_fp32(tiny, capsys):
    model, cfg, items = tiny
    ref, pids, _, _, torch_how = extract_with_precision(model, items, cfg.data, amp="off", backend="torch")
    got, pids2, _, _, how = extract_with_precision(model, items, cfg.data, amp="off", backend="onnxruntime")
    assert_close_features(got, ref)
    assert np.array_equal(pids, pids2) and not torch.equal(got, ref)  # really another engine
    assert torch_how.backend == "torch" and how.backend == "onnxruntime" and how.session is not None
    assert how.record() == {"precision": "float32 (onnxruntime runs the exported float32 graph)",
                            "backend": "onnxruntime", "inference": how.describe()}
    assert capsys.readouterr().err.count("inference: onnxruntime fp32 (eval.backend=onnxruntime; setup") == 1
    # flip runs the session on the mirror images too
    flip_ref, _, _, _, _ = extract_with_precision(model, items, cfg.data, amp="off", backend="torch", flip=True)
    flip_got, _, _, _, _ = extract_with_precision(model, items, cfg.data, amp="off", backend="onnxruntime",
                                                  flip=True)
    assert_close_features(flip_got, flip_ref)
    # FeatureExtractor(backend=) likewise, reusing the export of these weights
    ext = FeatureExtractor.from_model(model, cfg, backend="onnxruntime")
    x = torch.stack([ext.preprocess(p) for p, _, _ in items[:5]])
    assert_close_features(ext.forward_batch(x), ref[:5])
    assert ext.backend == "onnxruntime" and ext.precision.dtype is None


@needs_ort
def test_auto_takes_onnxruntime_for_a_big_job_once_for_query_and_gallery(tiny, synthetic_root, monkeypatch, capsys):
    model, _, _ = tiny
    cfg = from_dict({**TINY, "eval": {"bootstrap": 0}})
    dataset = build_dataset("market1501", synthetic_root)
    # above the threshold only together: the decision is for the whole evaluation, not per side
    assert len(dataset.query) < len(dataset.gallery) < len(dataset.query) + len(dataset.gallery)
    monkeypatch.setattr(ort_backend, "MIN_IMAGES", len(dataset.gallery) + 1)
    designed_speeds(monkeypatch, {"onnxruntime fp32": 1.0})  # the fastest path, when it matches
    settles = []
    real = inference._settle_auto
    monkeypatch.setattr(inference, "_settle_auto", lambda *a: settles.append(1) or real(*a))
    inference._settled.pop(model, None)
    metrics = evaluate_model(model, dataset, cfg)
    assert metrics["backend"] == "onnxruntime" and len(settles) == 1
    assert float(re.search(r"onnxruntime fp32 [0-9.]+ img/s cos ([0-9.]+)", metrics["inference"]).group(1)) >= 0.999
    err = capsys.readouterr().err
    assert err.count("inference: onnxruntime fp32 (eval.backend=auto: ") == 1
    # the same metrics as PyTorch float32 (features equal up to float32 rounding)
    torch_metrics = evaluate_model(model, dataset, from_dict({**TINY, "eval": {"bootstrap": 0, "backend": "torch",
                                                                             "amp": "off"}}))
    assert torch_metrics["backend"] == "torch"
    assert abs(metrics["mAP"] - torch_metrics["mAP"]) < 1e-3
    # decided once per model and weights: a second evaluation does not check again
    evaluate_model(model, dataset, cfg)
    assert len(settles) == 1
    copy.deepcopy(model)  # the session is kept beside the model, not in it


def test_auto_falls_back_to_torch_without_onnxruntime(tiny, no_onnxruntime, no_openvino, no_export, monkeypatch,
                                                      capsys):
    model, cfg, items = tiny
    monkeypatch.setattr(ort_backend, "MIN_IMAGES", 1)
    assert not ort_backend.available()
    feats, _, _, _, how = extract_with_precision(model, items, cfg.data, amp="off", backend="auto")
    ref, _, _, _, _ = extract_with_precision(model, items, cfg.data, amp="off", backend="torch")
    assert how.backend == "torch" and torch.equal(feats, ref)
    assert "no exported backend is installed (onnxruntime: pip install 'attnreid[onnx]'; openvino: pip install " \
           "'attnreid[openvino]')" in capsys.readouterr().err


def test_auto_stays_on_torch_below_the_threshold(tiny, no_export, capsys):
    model, cfg, items = tiny
    assert len(items) < ort_backend.MIN_IMAGES
    feats, _, _, _, how = extract_with_precision(model, items, cfg.data, amp="off", backend="auto")
    assert how.backend == "torch" and "too few for a conversion to pay" in how.reason
    err = capsys.readouterr().err
    assert "inference precision: float32 (eval.amp=off)" in err and "onnxruntime" not in err  # the usual quiet case
    # a job announced as big enough gets past the threshold (and then exports)
    big = inference.resolve_inference("off", "auto", "cpu", num_images=ort_backend.MIN_IMAGES)
    assert big.backend == ("auto" if any(inference.backend_module(n).available() for n in inference.BACKENDS)
                           else "torch")
    # an explicit bf16 is PyTorch's autocast, whatever the size
    asked = inference.resolve_inference("bf16", "auto", "cpu", num_images=10**6)
    assert asked.backend == "torch" and "eval.amp=bf16 asks for PyTorch autocast" in asked.reason
    ext = FeatureExtractor.from_model(model, cfg)
    x = torch.stack([ext.preprocess(p) for p, _, _ in items[:3]])
    ext.forward_batch(x)
    assert ext.backend == "torch" and ext.inference.requested == "auto"


def test_auto_falls_back_when_onnxruntime_features_differ_or_the_export_fails(tiny, monkeypatch, capsys):
    model, cfg, items = tiny
    monkeypatch.setattr(ort_backend, "MIN_IMAGES", 1)
    monkeypatch.setattr(ort_backend, "available", lambda: True)
    monkeypatch.setattr(ort_backend, "open_session", lambda *a, **k: (object(), 0.1))
    # zero features: cosine 0 with every PyTorch feature, however fast
    monkeypatch.setattr(ort_backend, "features", lambda s, x, flip=False: torch.zeros(len(x), model.feature_dim))
    designed_speeds(monkeypatch, {"onnxruntime fp32": 0.001})
    inference._settled.pop(model, None)
    _, _, _, _, how = extract_with_precision(model, items, cfg.data, amp="off", backend="auto")
    assert how.backend == "torch" and re.search(r"onnxruntime fp32 [0-9.]+ img/s cos 0\.00000", how.reason)
    assert re.search(r"PyTorch: fastest matching PyTorch fp32 \(mean cosine >= 0\.999 on the first \d+ images\)",
                     capsys.readouterr().err)

    def broken(*_a, **_k):
        raise AttnReidError("ONNX export of 'mhsanet' at opset 18 failed (dynamo: unsupported op)")
    monkeypatch.setattr(ort_backend, "open_session", broken)
    inference._settled.pop(model, None)
    _, _, _, _, how = extract_with_precision(model, items, cfg.data, amp="off", backend="auto")
    assert how.backend == "torch" and "left out: onnxruntime fp32: ONNX export of 'mhsanet'" in how.reason


def test_backend_errors_are_one_line(tiny, no_onnxruntime, tmp_path):
    model, cfg, items = tiny
    with pytest.raises(ConfigError, match="'eval.backend' is 'tensorrt'"):
        load_config(None, ["eval.backend=tensorrt"])
    with pytest.raises(ConfigError, match=r"eval.backend=onnxruntime needs .*pip install 'attnreid\[onnx\]'"):
        extract_with_precision(model, items, cfg.data, backend="onnxruntime")
    with pytest.raises(ConfigError, match="runs on the CPU, but the device is cuda"):
        inference.check_backend("onnxruntime", "cuda")
    with pytest.raises(ConfigError, match=r"^backend=onnxruntime needs"):
        FeatureExtractor.from_model(model, cfg, backend="onnxruntime")
    from test_deploy import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "m.pth", TINY)
    (tmp_path / "gallery").mkdir()
    code, _, err = run_cli(["index", "build", tmp_path / "gallery", "--checkpoint", ckpt, "--out", tmp_path / "idx",
                            "--backend", "onnxruntime"])
    assert_one_line_error(code, err, "backend=onnxruntime", "pip install 'attnreid[onnx]'")
    code, _, err = run_cli(["index", "build", tmp_path / "gallery", "--checkpoint", ckpt, "--out", tmp_path / "idx",
                            "--backend", "tvm"])
    assert_one_line_error(code, err, "--backend", "tvm")
    (tmp_path / "cfg.yaml").write_text(json.dumps(TINY))
    code, _, err = run_cli(["extract", tmp_path / "cfg.yaml", "--checkpoint", ckpt, "--split", "query",
                            "--out", tmp_path / "f.npz", "--backend", "onnxruntime", "data.root=" + str(tmp_path)])
    assert_one_line_error(code, err, "eval.backend=onnxruntime", "pip install 'attnreid[onnx]'")
