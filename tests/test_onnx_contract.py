"""The inference contract of an exported model: its metadata, dynamic batch at 1, 7 and 64 (torchreid
issue 585 absent), and examples/onnx_only.py reproducing `attnreid extract` without attnreid."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import assert_one_line_error, run_cli
from test_deploy import make_checkpoint

from attnreid.deploy.extractor import FeatureExtractor
from attnreid.inference.export import CONTRACT_BATCHES, check_onnx, verify_onnx
from attnreid.errors import AttnReidError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytestmark = pytest.mark.usefixtures("one_thread_module")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "onnx_only.py"
MODELS = {
    "mhsanet": {"model": {"name": "mhsanet", "backbone": {"name": "mobilenetv3_small"},
                          "mhsanet": {"num_heads": 2, "attention_dim": 16, "embed_dim": 16}},
                "data": {"height": 64, "width": 32}, "eval": {"amp": "off"}},
    "hacnn_l2": {"model": {"name": "hacnn", "feature_norm": True, "hacnn": {"widths": [16, 32, 48], "embed_dim": 16}},
                 "data": {"height": 160, "width": 64}, "eval": {"amp": "off"}},
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"contract_{request.param}")
    ckpt = make_checkpoint(root / "model.pth", MODELS[request.param])
    out = root / "model.onnx"
    code, stdout, err = run_cli(["export", ckpt, "--out", out, "--json"])
    assert code == 0, err
    return {"ckpt": ckpt, "onnx": out, "report": json.loads(stdout), "root": root, "name": request.param}


def images(folder: Path, n: int, seed: int = 0) -> list:
    """``n`` RGB images of varied sizes and aspect ratios (shrunk and enlarged by the resize)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(40, 300)), int(rng.integers(20, 120))
        base = rng.integers(0, 256, size=(max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.NEAREST)
        p = folder / f"{i:03d}.{'png' if i % 3 else 'jpg'}"
        img.save(p)
        paths.append(p)
    return paths


def test_metadata_is_the_contract(exported):
    ext = FeatureExtractor(exported["ckpt"], amp="off")
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    (inp,), out = session.get_inputs(), session.get_outputs()
    h, w = ext.input_size
    assert meta["input_name"] == inp.name == "images" and meta["output_name"] == out[0].name == "feature"
    assert inp.type == "tensor(float)" and meta["input_dtype"] == "float32" and meta["input_layout"] == "NCHW"
    assert not isinstance(inp.shape[0], int) and inp.shape[1:] == [3, h, w]  # dynamic batch, fixed size
    assert (int(meta["input_height"]), int(meta["input_width"])) == (h, w)
    assert int(meta["output_dim"]) == out[0].shape[1] == ext.feature_dim
    assert meta["input_channel_order"] == "RGB" and meta["normalization"] == "outside the graph"
    assert float(meta["input_scale"]) == pytest.approx(1 / 255)
    assert json.loads(meta["input_mean"]) == list(ext.cfg.data.mean) and json.loads(meta["input_std"]) == list(ext.cfg.data.std)
    assert meta["metric"] == ext.metric and meta["weights_hash"] == ext.weights_fingerprint
    # "output_l2_normalized" says what the numbers do
    x = torch.stack([ext.preprocess(np.full((50, 20, 3), v, np.uint8)) for v in (30, 120, 240)])
    norms = np.linalg.norm(session.run(["feature"], {"images": x.numpy()})[0], axis=1)
    assert (meta["output_l2_normalized"] == "true") == bool(np.allclose(norms, 1.0, atol=1e-5))
    assert exported["report"]["contract"] == dict(meta)


def test_dynamic_batch_1_7_64_matches_pytorch(exported):
    """torchreid issue 585: with a BatchNorm in training mode, or a reshape that baked the export
    batch, an image's feature depends on the batch around it. Here it does not, at any size."""
    report = exported["report"]
    assert report["check_batches"] == list(CONTRACT_BATCHES) == [1, 7, 64]
    assert all(v["rel_diff"] < 1e-4 for v in report["per_batch"].values())
    ext = FeatureExtractor(exported["ckpt"], amp="off")
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    h, w = ext.input_size
    batch = torch.randn(64, 3, h, w, generator=torch.Generator().manual_seed(1))
    alone = session.run(["feature"], {"images": batch[:1].numpy()})[0][0]
    with torch.inference_mode():
        ref = ext.model(batch[:1])[0].numpy()
    scale = np.abs(ref).max()
    for b in CONTRACT_BATCHES:
        got = session.run(["feature"], {"images": batch[:b].numpy()})[0]
        assert got.shape == (b, ext.feature_dim)
        assert np.abs(got[0] - alone).max() <= 1e-4 * scale, b  # the same image, whatever surrounds it
        assert np.abs(got[0] - ref).max() <= 1e-4 * scale, b


class _Pool(torch.nn.Module):
    """Mean colour per image; ``baked`` reshapes with the export batch written as a constant (the bug)."""

    def __init__(self, baked: bool = False):
        super().__init__()
        self.baked = baked

    def forward(self, x):
        return x.mean(dim=(2, 3)).reshape(2 if self.baked else -1, 3)


@pytest.mark.filterwarnings("ignore")  # the legacy exporter's deprecation notices: it is used on purpose
def test_the_check_catches_a_training_mode_batchnorm_and_a_baked_batch(tmp_path):
    bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten()).eval()
    with torch.no_grad():
        bn[1].running_mean.fill_(5.0)  # far from any batch's statistics
    path = tmp_path / "train_bn.onnx"
    torch.onnx.export(bn.train(), (torch.randn(2, 3, 8, 8),), str(path), dynamo=False, input_names=["images"],
                      output_names=["feature"], dynamic_axes={"images": {0: "batch"}},
                      training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    assert check_onnx(path, bn.eval(), (8, 8), batch=7)["rel_diff"] > 1e-2
    with pytest.raises(AttnReidError, match="at batch 1"):
        verify_onnx(path, bn.eval(), (8, 8), batches=CONTRACT_BATCHES)
    path = tmp_path / "baked.onnx"
    torch.onnx.export(_Pool(baked=True), (torch.randn(2, 3, 8, 8),), str(path), dynamo=False,
                      input_names=["images"], output_names=["feature"], dynamic_axes={"images": {0: "batch"}})
    assert check_onnx(path, _Pool(), (8, 8), batch=2)["rel_diff"] < 1e-6  # right at the export batch only
    with pytest.raises(AttnReidError, match="at batch 1"):
        verify_onnx(path, _Pool(), (8, 8), batches=CONTRACT_BATCHES)


def _example():
    spec = importlib.util.spec_from_file_location("onnx_only", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_preprocessing_is_attnreids(exported):
    """Pillow's float bilinear resize is the filter of attnreid's anti-aliased torch resize."""
    ext = FeatureExtractor(exported["ckpt"], amp="off")
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    example = _example()
    contract = example.read_contract(session, str(exported["onnx"]))
    for p in images(exported["root"] / "pre", 6, seed=3):
        np.testing.assert_allclose(example.preprocess(str(p), contract), ext.preprocess(p).numpy(), atol=1e-4)


def test_onnx_only_reproduces_extract(exported):
    folder = exported["root"] / "imgs"
    paths = images(folder, 70)
    config = exported["root"] / "config.yaml"
    config.write_text(yaml.safe_dump(MODELS[exported["name"]]))
    ref_file = exported["root"] / "ref.npz"
    # float32: on a CPU with bf16 (AMX, AVX512-BF16) eval.amp=auto may compute in bf16, which the graph does not
    code, _, err = run_cli(["extract", config, "eval.amp=off", "--checkpoint", exported["ckpt"], "--folder", folder,
                            "--out", ref_file])
    assert code == 0, err
    ref = np.load(ref_file)
    assert [Path(p).name for p in ref["paths"]] == [p.name for p in paths]
    # no attnreid and no torch in the example's process: only onnxruntime, Pillow and numpy
    guard = "import sys, runpy; sys.modules['attnreid'] = None; sys.modules['torch'] = None; " \
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    for batch in CONTRACT_BATCHES:
        out = exported["root"] / f"feats_{batch}.npy"
        proc = subprocess.run([sys.executable, "-c", guard, str(EXAMPLE), str(exported["onnx"]),
                               *map(str, paths), "--out", str(out), "--batch", str(batch)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        got = np.load(out)
        assert got.shape == ref["features"].shape and got.dtype == np.float32
        cos = (got * ref["features"]).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref["features"], axis=1))
        assert cos.mean() >= 0.9999, (batch, cos.min(), cos.mean())


@pytest.mark.filterwarnings("ignore")  # the legacy exporter's deprecation notices
def test_example_refuses_a_model_without_contract(tmp_path):
    path = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Flatten(), (torch.randn(1, 3, 4, 4),), str(path), dynamo=False,
                      input_names=["images"], output_names=["feature"])
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(path), str(path), "--out", str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "carries no attnreid inference contract" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_export_bad_opset_still_one_line(exported, tmp_path):
    code, _, err = run_cli(["export", exported["ckpt"], "--out", tmp_path / "x.onnx", "--opset", "3"])
    assert_one_line_error(code, err, "--opset 3")
