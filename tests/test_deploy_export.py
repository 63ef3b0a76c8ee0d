"""ONNX export: one export per model family (they take seconds), checked in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, run_cli
from test_deploy import make_checkpoint, person

pytestmark = pytest.mark.usefixtures("one_thread_module")

from attnreid.deploy.extractor import FeatureExtractor
from attnreid.errors import AttnReidError
from attnreid.inference.export import REL_TOLERANCE, check_onnx, export_onnx, flatten_outputs, verify_onnx

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

MHSA = {"model": {"name": "mhsanet", "backbone": {"name": "resnet18"},
                  "mhsanet": {"num_heads": 2, "attention_dim": 16, "embed_dim": 32}},
        "data": {"height": 128, "width": 64}}
HACNN = {"model": {"name": "hacnn", "hacnn": {"widths": [16, 32, 48], "embed_dim": 32}},
         "data": {"height": 160, "width": 64}}


@pytest.fixture(scope="module")
def mhsa_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root / "mhsa.pth", MHSA)
    out = root / "mhsa.onnx"
    code, stdout, err = run_cli(["export", ckpt, "--out", out, "--json"])
    assert code == 0, err
    return ckpt, out, json.loads(stdout)


@pytest.fixture(scope="module")
def hacnn_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_hacnn")
    ckpt = make_checkpoint(root / "hacnn.pth", HACNN)
    ext = FeatureExtractor(ckpt)
    out = root / "hacnn.onnx"
    report = export_onnx(ext.model, out, ext.input_size, attention=True)
    return ext, out, report


def run_ort(path, x: torch.Tensor):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, session.run(None, {"images": x.numpy()})


def test_mhsanet_export_matches_extractor(mhsa_export):
    ckpt, out, report = mhsa_export
    assert report["outputs"] == ["feature"] and report["check_batch"] != report["export_batch"]
    assert report["rel_diff"] < REL_TOLERANCE and report["max_abs_diff"] >= 0
    ext = FeatureExtractor(ckpt, amp="off")  # the exported graph is float32
    images = [person(pid, 0) for pid in range(1, 6)]
    x = torch.stack([ext.preprocess(a) for a in images])
    session, (feat,) = run_ort(out, x)
    assert feat.shape == (5, ext.feature_dim)
    ref = ext(images).numpy()
    assert np.abs(feat - ref).max() / np.abs(ref).max() < REL_TOLERANCE
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["model"] == "mhsanet" and meta["config_hash"] == ext.fingerprint
    assert meta["input_size"] == "128x64"


def test_hacnn_export_with_attention(hacnn_export):
    ext, out, report = hacnn_export
    assert report["exporter"] == "dynamo" and report["rel_diff"] < REL_TOLERANCE
    x = torch.stack([ext.preprocess(person(1, 0))])  # batch 1: the batch dimension is dynamic down to 1
    session, got = run_ort(out, x)
    names = [o.name for o in session.get_outputs()]
    assert names == report["outputs"]
    assert names[0] == "feature" and "soft_attention_0" in names and "regions_2" in names
    with torch.inference_mode():
        ref = dict(flatten_outputs(ext.model.forward_attention(x)))
    for name, value in zip(names, got):
        np.testing.assert_allclose(value, ref[name].numpy(), rtol=1e-4, atol=1e-4 * float(ref[name].abs().max()))
    assert got[names.index("regions_0")].shape == (1, 4, 4)


def test_check_catches_a_different_model(mhsa_export):
    ckpt, out, _ = mhsa_export
    ext = FeatureExtractor(ckpt)
    other = FeatureExtractor(ext.cfg).model  # same architecture, other (random) weights
    diff = check_onnx(out, other, ext.input_size)
    assert diff["rel_diff"] > 1e-2
    with pytest.raises(AttnReidError, match="ONNX check failed"):
        verify_onnx(out, other, ext.input_size)


def test_hacnn_old_opset_one_line(hacnn_export, tmp_path):
    ext, _, _ = hacnn_export
    code, _, err = run_cli(["export", ext.checkpoint, "--out", tmp_path / "x.onnx", "--opset", "15"])
    assert_one_line_error(code, err, "--opset 15", "grid_sample", ">= 16")


def test_export_config_needs_checkpoint(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: hacnn\n")
    code, _, err = run_cli(["export", cfg, "--out", tmp_path / "x.onnx"])
    assert_one_line_error(code, err, "needs --checkpoint")
