"""The openvino backend (eval.backend=openvino): fp32/bf16/int8, auto's choice among backends, int8's rule.

The tests that run OpenVINO are skipped (with the reason) where ``attnreid[openvino]`` is not
installed; the unavailable path and the decision rules run everywhere.
"""

from __future__ import annotations

import re
import sys

import pytest
import torch

from helpers import assert_one_line_error, run_cli
from test_inference_backend import assert_close_features, designed_speeds
from test_inference_precision import TINY, tiny  # noqa: F401  (fixture)

from attnreid.config import from_dict
from attnreid.deploy.extractor import FeatureExtractor
from attnreid.errors import AttnReidError, ConfigError
from attnreid.inference import backend as inference
from attnreid.inference import onnxruntime_backend as ort_backend
from attnreid.inference import openvino_backend as ov_backend
from attnreid.inference.extract import extract_with_precision
from attnreid.inference.int8 import calibration_images

pytestmark = pytest.mark.usefixtures("one_thread_module", "fresh_announcements")
needs_openvino = pytest.mark.skipif(not ov_backend.available(), reason="needs attnreid[openvino] (openvino, nncf)")


@pytest.fixture
def data_cfg(synthetic_root):
    """TINY reading the session's synthetic set: its training images calibrate int8."""
    return from_dict({**TINY, "data": {**TINY["data"], "dataset": "market1501", "root": str(synthetic_root)},
                      "eval": {"int8_calibration": 16}})


def test_int8_within_is_half_a_point_on_both_rank1_and_map():
    fp32 = {"rank1": 0.900, "mAP": 0.700}
    assert inference.int8_within(fp32, {"rank1": 0.895, "mAP": 0.705})[0]  # exactly 0.5 points each
    ok, text = inference.int8_within(fp32, {"rank1": 0.890, "mAP": 0.700})  # rank-1 1 point lower
    assert not ok and "int8 rank-1 89.00% vs fp32 90.00%" in text and "not within 0.5 points" in text
    assert not inference.int8_within(fp32, {"rank1": 0.900, "mAP": 0.690})[0]  # mAP 1 point lower
    assert not inference.int8_within(fp32, {"rank1": 0.910, "mAP": 0.700})[0]  # a gain as large is no match either


def test_without_openvino_it_is_refused_in_one_line_and_auto_leaves_it_out(tiny, monkeypatch, tmp_path):
    model, cfg, items = tiny
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert not ov_backend.available()
    with pytest.raises(ConfigError, match=r"eval.backend=openvino needs .*pip install 'attnreid\[openvino\]'"):
        extract_with_precision(model, items, cfg.data, backend="openvino")
    monkeypatch.setattr(ov_backend, "MIN_IMAGES", 1)
    monkeypatch.setattr(ort_backend, "MIN_IMAGES", 10**9)
    _, _, _, _, how = extract_with_precision(model, items, cfg.data, amp="off", backend="auto")
    assert how.backend == "torch"
    with pytest.raises(ConfigError, match="eval.amp=int8 needs an int8 backend, and none is installed"):
        inference.resolve_inference("int8", "auto", "cpu", num_images=10)
    with pytest.raises(ConfigError, match="eval.amp=int8 needs eval.backend=openvino"):
        inference.resolve_inference("int8", "torch", "cpu")
    from test_deploy import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "m.pth", TINY)
    (tmp_path / "gallery").mkdir()
    code, _, err = run_cli(["index", "build", tmp_path / "gallery", "--checkpoint", ckpt, "--out", tmp_path / "idx",
                            "--backend", "openvino"])
    assert_one_line_error(code, err, "backend=openvino", "pip install 'attnreid[openvino]'")


@needs_openvino
def test_openvino_fp32_matches_torch_and_bf16_really_is_bf16(tiny, capsys):
    model, cfg, items = tiny
    ref, _, _, _, _ = extract_with_precision(model, items, cfg.data, amp="off", backend="torch")
    got, _, _, _, how = extract_with_precision(model, items, cfg.data, amp="off", backend="openvino")
    assert_close_features(got, ref)
    assert how.backend == "openvino" and how.compute == "fp32" and how.record()["backend"] == "openvino"
    assert "inference: openvino fp32 (eval.backend=openvino; setup" in capsys.readouterr().err
    flip_ref, _, _, _, _ = extract_with_precision(model, items, cfg.data, amp="off", backend="torch", flip=True)
    flip_got, _, _, _, _ = extract_with_precision(model, items, cfg.data, amp="off", backend="openvino", flip=True)
    assert_close_features(flip_got, flip_ref)
    if "bf16" not in ov_backend.precisions():
        pytest.skip("OpenVINO reports no BF16 on this CPU: bf16 asked is fp32 (checked above by eval.amp=off)")
    bf, _, _, _, how = extract_with_precision(model, items, cfg.data, amp="bf16", backend="openvino")
    assert how.compute == "bf16" and how.record()["precision"].startswith("bf16 (")
    assert torch.isfinite(bf).all() and not torch.equal(bf, got)  # 8-bit mantissas round the features


@needs_openvino
def test_openvino_int8_is_calibrated_on_training_images(tiny, data_cfg):
    model, _, items = tiny
    batches = calibration_images(data_cfg)()
    assert sum(len(b) for b in batches) == 16  # eval.int8_calibration
    ref, _, _, _, _ = extract_with_precision(model, items, data_cfg.data, amp="off", backend="torch")
    got, _, _, _, how = extract_with_precision(model, items, data_cfg.data, amp="int8", backend="openvino",
                                               calibration=calibration_images(data_cfg))
    assert how.compute == "int8" and how.record()["precision"].startswith("int8 (")
    assert got.shape == ref.shape and torch.isfinite(got).all() and not torch.equal(got, ref)
    with pytest.raises(ConfigError, match="eval.amp=int8 needs a backend that quantises"):
        inference._compute(ort_backend, "onnxruntime", inference.inference_precision("int8", "cpu"), "eval.amp",
                           "eval.backend")
    with pytest.MonkeyPatch.context() as mp:  # OpenVINO without NNCF: fp32 and bf16, no int8
        mp.setitem(sys.modules, "nncf", None)
        assert "int8" not in ov_backend.precisions() and ov_backend.available()
        with pytest.raises(ConfigError, match="openvino computes fp32"):
            inference.resolve_inference("int8", "openvino", "cpu")
    ext = FeatureExtractor.from_model(model, data_cfg, amp="int8", backend="openvino")
    x = torch.stack([ext.preprocess(p) for p, _, _ in items[:4]])
    assert ext.forward_batch(x).shape == (4, model.feature_dim) and ext.inference.compute == "int8"


@needs_openvino
def test_auto_takes_the_fastest_matching_path_and_int8_only_within_half_a_point(tiny, data_cfg, monkeypatch, capsys):
    model, _, items = tiny
    monkeypatch.setattr(ov_backend, "MIN_IMAGES", 1)
    monkeypatch.setattr(ort_backend, "MIN_IMAGES", 10**9)  # onnxruntime is not part of this comparison
    # openvino fp32 designed fastest of the float paths; it matches PyTorch fp32 (its conversion is checked)
    designed_speeds(monkeypatch, {"openvino fp32": 1.0, "openvino int8": 0.5})
    inference._settled.pop(model, None)
    _, _, _, _, how = extract_with_precision(model, items, data_cfg.data, amp="auto", backend="auto")
    assert how.backend == "openvino" and how.compute == "fp32"
    assert "int8 not tried: no validation split to check it on" in how.reason  # no validate given

    def scores(*rank1_map):  # validate's answers in call order: float32 first, then int8
        answers = iter(rank1_map)
        return lambda features: (features(torch.zeros(1, 3, 64, 32)), next(answers))[1]

    for int8_scores, taken in [({"rank1": 0.804, "mAP": 0.597}, True), ({"rank1": 0.794, "mAP": 0.600}, False)]:
        inference._settled.pop(model, None)
        _, _, _, _, how = extract_with_precision(
            model, items, data_cfg.data, amp="auto", backend="auto", calibration=calibration_images(data_cfg),
            validate=scores({"rank1": 0.800, "mAP": 0.600}, int8_scores))
        assert (how.compute == "int8") == taken
        assert ("within 0.5 points" if taken else "not within 0.5 points") in how.reason
    err = capsys.readouterr().err
    assert re.search(r"inference: openvino int8 \(.*int8 rank-1 80\.40% vs fp32 80\.00%.*within 0\.5 points", err)
    # int8 is not taken when it is not faster than the fastest float path
    designed_speeds(monkeypatch, {"openvino fp32": 1.0, "openvino int8": 2.0})
    inference._settled.pop(model, None)
    _, _, _, _, how = extract_with_precision(
        model, items, data_cfg.data, amp="auto", backend="auto", calibration=calibration_images(data_cfg),
        validate=scores({"rank1": 0.8, "mAP": 0.6}, {"rank1": 0.8, "mAP": 0.6}))
    assert how.compute == "fp32" and "is not faster than openvino fp32" in how.reason


@needs_openvino
def test_an_op_the_pytorch_frontend_lacks_goes_through_onnx_or_is_left_out_by_auto(tiny, monkeypatch):
    import openvino

    model, cfg, items = tiny
    real = openvino.convert_model

    def frontend_without_rules(source, **kwargs):  # as for HA-CNN's affine_grid: only files convert
        if not isinstance(source, str):
            raise RuntimeError("Model wasn't fully converted.\nNo conversion rule found for operations: aten::x")
        return real(source, **kwargs)

    monkeypatch.setattr(openvino, "convert_model", frontend_without_rules)

    def fresh():  # no converted graph or settled choice kept from earlier calls
        ov_backend._cache.pop(model, None)
        inference._settled.pop(model, None)

    ref, _, _, _, _ = extract_with_precision(model, items, cfg.data, amp="off", backend="torch")
    if ort_backend.available():
        fresh()
        got, _, _, _, how = extract_with_precision(model, items, cfg.data, amp="off", backend="openvino")
        assert_close_features(got, ref)
    monkeypatch.setitem(sys.modules, "onnx", None)  # no exporter either: one line naming the op
    fresh()
    with pytest.raises(AttnReidError, match=r"could not convert 'mhsanet' \(No conversion rule found for "
                                            r"operations: aten::x\); with attnreid\[onnx\] installed"):
        extract_with_precision(model, items, cfg.data, amp="off", backend="openvino")
    monkeypatch.setattr(ov_backend, "MIN_IMAGES", 1)
    monkeypatch.setattr(ort_backend, "MIN_IMAGES", 10**9)
    fresh()
    _, _, _, _, how = extract_with_precision(model, items, cfg.data, amp="off", backend="auto")
    assert how.backend == "torch" and "left out: openvino fp32: OpenVINO could not convert 'mhsanet'" in how.reason


def test_validation_scorer_is_the_evaluation_of_the_held_out_identities(tiny, synthetic_root):
    from attnreid.data.datasets import build_dataset_from_config
    from attnreid.data.splits import hold_out_validation
    from attnreid.evaluation.protocols import evaluate
    from attnreid.inference.extract import extract_features
    from attnreid.inference.int8 import validation_scorer

    model, _, _ = tiny
    cfg = from_dict({**TINY, "data": {**TINY["data"], "dataset": "market1501", "root": str(synthetic_root),
                                      "val_ids": 3}})
    assert validation_scorer(from_dict({**TINY, "data": {**TINY["data"], "val_ids": 0}})) is None
    with torch.inference_mode():
        got = validation_scorer(cfg)(lambda x: model(x))
    train, val = hold_out_validation(build_dataset_from_config(cfg.data), 3)
    q = extract_features(model, val.query, cfg.data, amp="off", backend="torch")
    g = extract_features(model, val.gallery, cfg.data, amp="off", backend="torch")
    ref = evaluate(q[0].numpy(), g[0].numpy(), q[1], g[1], q[2], g[2], protocol=val.protocol)
    assert got == {"rank1": float(ref["rank1"]), "mAP": float(ref["mAP"])}
    # int8 calibrates on training images only, never on the held-out identities
    assert sum(len(b) for b in calibration_images(cfg)()) == min(300, len(train.train))
    assert not {pid for _, pid, _ in train.train} & {pid for _, pid, _ in val.query}
