"""`attnreid model-info` and the parameter/MAC counters behind it."""

import json

import torch
from torch import nn

from attnreid.models.complexity import count_macs, count_params
from helpers import assert_one_line_error, run_cli


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.proj = nn.Linear(4, 6)
        self.classifiers = nn.ModuleDict({"global": nn.Linear(6, 10)})

    def forward(self, x):
        f = self.proj(self.conv(x).mean((2, 3)))
        return f if not self.training else self.classifiers["global"](f)


def test_count_params_and_macs_by_hand():
    m = _Tiny()
    assert count_params(m) == 3 * 4 * 9 + (4 * 6 + 6) + (6 * 10 + 10)
    assert count_params(m, exclude_classifiers=True) == 3 * 4 * 9 + (4 * 6 + 6)
    m.train()
    # eval forward: 3x3 conv (8 x 6 outputs x 4 channels x 27 MACs) + linear 4 -> 6; no classifier
    assert count_macs(m, (8, 6)) == 8 * 6 * 4 * 27 + 4 * 6
    assert m.training  # mode restored


def _config(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("model:\n  backbone:\n    name: mobilenetv3_small\n  mhsanet:\n    num_heads: 2\n"
                    "data:\n  height: 64\n  width: 32\n")
    return path


def test_model_info_json(tmp_path):
    code, out, err = run_cli(["model-info", _config(tmp_path), "--json", "--num-classes", "10"])
    assert code == 0, err
    info = json.loads(out)
    assert {"params", "params_no_classifier", "macs", "feature_dim", "attention_grid"} <= set(info)
    # three classifiers (global, saffm, rlm), each 512 -> 10 with bias
    assert info["params"] - info["params_no_classifier"] == 3 * (512 * 10 + 10)
    assert info["feature_dim"] == 1024 and info["attention_grid"] == [4, 2] and info["macs"] > 0
    code, out, _ = run_cli(["model-info", _config(tmp_path), "--json", "model.name=baseline", "model.test_feature=global"])
    info = json.loads(out)
    assert code == 0 and info["feature_dim"] == 512 and "attention_grid" not in info
    assert info["params"] - info["params_no_classifier"] == 512 * 751 + 751


def test_model_info_text(tmp_path):
    code, out, err = run_cli(["model-info", _config(tmp_path), "model.test_feature=star"])
    assert code == 0, err
    assert "512-d" in out and "attention grid   [4, 2]" in out and "mobilenetv3_small" in out


def test_model_info_bad_input_is_one_line(tmp_path):
    cfg = _config(tmp_path)
    code, _, err = run_cli(["model-info", cfg, "model.mhsanet.num_head=3"])
    assert_one_line_error(code, err, "model.mhsanet.num_head", "model.mhsanet.num_heads")
    code, _, err = run_cli(["model-info", cfg, "model.mhsanet.num_heads=0"])
    assert_one_line_error(code, err, "model.mhsanet.num_heads")
    code, _, err = run_cli(["model-info", cfg, "data.height=16", "data.width=16", "model.backbone.last_stride=2"])
    assert_one_line_error(code, err, "too small", "mobilenetv3_small")
    code, _, err = run_cli(["model-info", cfg, f"model.backbone.weights={tmp_path / 'missing.pth'}"])
    assert_one_line_error(code, err, "missing.pth")


def test_model_info_losses(tmp_path):
    code, out, err = run_cli(["model-info", _config(tmp_path), "--losses", "--json", "--batch-size", "8", "--num-classes", "10"])
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)["losses"]}
    assert set(rows) == {"ce_global", "ce_saffm", "tri_saffm", "ce_rlm", "tri_rlm", "fdrt", "ihtl", "acm"}
    assert max(r["ratio_to_ce"] for n, r in rows.items() if n.startswith("ce_")) == 1.0
    assert rows["fdrt"]["weight"] == 1e-4 and rows["tri_rlm"]["grad_norm"] > 0
    code, out, err = run_cli(["model-info", _config(tmp_path), "--losses", "--batch-size", "8", "loss.lambda_acm=0"])
    assert code == 0, err
    assert "x largest CE" in out and "tri_saffm" in out and "acm" not in out.split("x largest CE")[1]
    code, _, err = run_cli(["model-info", _config(tmp_path), "--losses", "--batch-size", "6"])
    assert_one_line_error(code, err, "--batch-size", "data.num_instances")
