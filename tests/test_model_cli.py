"""`attnreid model-info` and the parameter/MAC counters behind it."""

import copy
import json
import math
from pathlib import Path

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

def test_model_info_never_reads_weights(tmp_path):
    # inspecting a model needs no weights: a weights path that does not exist is not opened
    code, out, err = run_cli(["model-info", _config(tmp_path), "--json", f"model.backbone.weights={tmp_path / 'missing.pth'}"])
    assert code == 0, err
    assert json.loads(out)["params"] > 0


def _tiny_for_losses(cfg):
    """``cfg`` with what the loss terms do not depend on made small: MobileNetV3-small at 64x32,
    narrow attention/embedding (HA-CNN: narrow widths, its 160x64 input); kind, heads, RLM,
    BNNeck and every ``loss.*`` stay."""
    tiny = copy.deepcopy(cfg)
    if cfg.model.name == "hacnn":
        tiny.model.hacnn.widths, tiny.model.hacnn.embed_dim = [16, 32, 48], 32
    else:
        tiny.data.height, tiny.data.width, tiny.model.backbone.name = 64, 32, "mobilenetv3_small"
        tiny.model.mhsanet.attention_dim, tiny.model.mhsanet.embed_dim = 16, 32
    return tiny


def test_model_info_runs_offline_on_every_shipped_config(monkeypatch):
    """``model-info CONFIG`` and ``model-info CONFIG --losses`` on each config under configs/
    (base.yaml asks for ImageNet weights) with the network and weight files cut off.

    model_info depends only on ``cfg.model`` and the input size, so configs that agree on
    both (rows differing in loss weights or evaluation) are measured once. The loss terms
    (which ones, their weights, the center loss's sizes) depend on the model's kind, heads,
    RLM and BNNeck and on ``loss.*``, not on widths or the input size: each distinct such
    setting runs --losses once on a small copy (:func:`_tiny_for_losses`), 2 identities x K
    images; each distinct backbone the configs name is then built for --losses for real, at
    64x32.
    """
    import socket

    from attnreid.cli.model import loss_info, model_info
    from attnreid.config import load_config
    from attnreid.models import backbones

    def offline(*args, **kwargs):
        raise AssertionError("model-info tried to reach the network or read weights")

    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(backbones, "download_pretrained_weights", offline)
    monkeypatch.setattr(backbones, "load_pretrained_weights", offline)
    root = Path(__file__).resolve().parents[1] / "configs"
    configs = sorted(root.rglob("*.yaml"))
    assert len(configs) > 100
    seen, terms, backbone_configs = {}, {}, {}
    for path in configs:
        cfg = load_config(path)
        key = (repr(cfg.model), cfg.data.height, cfg.data.width)
        if key not in seen:
            seen[key] = model_info(cfg)
        info = seen[key]
        assert info["params"] > info["params_no_classifier"] > 0 and info["macs"] > 0, path
        assert info["input_size"] == [cfg.data.height, cfg.data.width] and info["feature_dim"] > 0, path

        tiny, k = _tiny_for_losses(cfg), cfg.data.num_instances
        key = (repr(tiny.model), repr(cfg.loss), k)
        if key not in terms:
            terms[key] = loss_info(tiny, num_classes=4, batch_size=2 * k)
        names = {r["name"] for r in terms[key]}
        assert names and all(math.isfinite(r["value"]) and r["grad_norm"] >= 0 for r in terms[key]), path
        assert ("center" in names) == (cfg.loss.center_weight > 0), path
        if cfg.model.name != "hacnn":
            backbone_configs.setdefault(repr(cfg.model.backbone), cfg)
    assert len(terms) > 20
    assert load_config(root / "base.yaml").model.backbone.pretrained  # the test covers a config that asks for weights
    assert any(c.model.backbone.pretrained for c in backbone_configs.values())
    for cfg in backbone_configs.values():
        cfg = copy.deepcopy(cfg)
        cfg.data.height, cfg.data.width = 64, 32
        assert loss_info(cfg, num_classes=4, batch_size=2 * cfg.data.num_instances), repr(cfg.model.backbone)


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
