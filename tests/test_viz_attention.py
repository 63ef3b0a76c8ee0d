"""Attention overlays: the maths of the overlay, stand-in and real models, the explain command."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from attnreid.errors import AttnReidError
from attnreid.viz import attention as A
from helpers import assert_one_line_error, run_cli

H, W = 64, 32


def _transform(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((W, H))).copy()).permute(2, 0, 1).float() / 255.0


class HeadStandIn(nn.Module):
    """forward_attention as MHSA-Net's: head k attends only to grid cell (k, 0) of a 4 x 2 grid."""

    model_name = "mhsanet"

    def forward_attention(self, x):
        b = x.shape[0]
        att = torch.zeros(b, 2, 4, 2)
        att[:, 0, 0, 0] = 1.0
        att[:, 1, 3, 1] = 1.0
        return {"feature": torch.zeros(b, 8), "attention": att, "beta": torch.tensor([[0.7, 0.3]]).expand(b, 2)}


def test_upsample_is_bilinear_with_pixel_centres():
    up = A.upsample_map(np.array([[0.0, 1.0], [0.0, 1.0]]), 4, 4)
    # align_corners=False: output pixel centres at -0.25, 0.25, 0.75, 1.25 in input cells (clamped)
    np.testing.assert_allclose(up[0], [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(up[:, 2], [0.75] * 4)


def test_normalise_and_overlay_by_hand():
    np.testing.assert_allclose(A.normalise_map(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])
    assert not A.normalise_map(np.full((3, 3), 0.5)).any()  # constant map: no division by zero
    image = np.full((1, 2, 3), 100, dtype=np.uint8)
    out = A.overlay(image, np.array([[0.0, 1.0]]), alpha=0.5)
    jet0 = np.array(matplotlib.colormaps["jet"](0.0)[:3]) * 255
    jet1 = np.array(matplotlib.colormaps["jet"](1.0)[:3]) * 255
    np.testing.assert_allclose(out[0, 0], np.round(0.5 * 100 + 0.5 * jet0), atol=0.51)
    np.testing.assert_allclose(out[0, 1], np.round(0.5 * 100 + 0.5 * jet1), atol=0.51)


def test_mhsanet_panels_follow_each_heads_map_and_show_beta(tmp_path):
    image = np.full((H, W, 3), 128, dtype=np.uint8)
    maps = A.attention_maps(HeadStandIn(), torch.zeros(1, 3, H, W))
    panels = A.mhsanet_panels(image, maps["attention"][0], maps["beta"][0])
    assert [p["title"] for p in panels] == ["input", "head 1\nβ=0.700", "head 2\nβ=0.300"]
    head1, head2 = panels[1]["image"].astype(int), panels[2]["image"].astype(int)
    # head 1 looks at the top-left cell: red there, blue at the bottom right; head 2 the reverse
    assert head1[2, 2, 0] > head1[2, 2, 2] and head1[-3, -3, 2] > head1[-3, -3, 0]
    assert head2[-3, -3, 0] > head2[-3, -3, 2] and head2[2, 2, 2] > head2[2, 2, 0]
    png = A.render_panels(panels, tmp_path / "p.png", title="t")
    assert Image.open(png).size[0] > 300


def test_hacnn_panels_and_boxes():
    image = np.zeros((H, W, 3), dtype=np.uint8)
    soft = [np.random.rand(8, 4), np.random.rand(4, 2)]
    regions = [np.array([[0, 0, W, H / 2], [0, H / 2, W, H]]), np.array([[0, 0, W, H / 4], [0, H / 4, W, H / 2]])]
    panels = A.hacnn_panels(image, soft, regions, [1, 2])
    assert len(panels) == 3 and len(panels[0]["boxes"]) == 4
    assert [lvl for lvl, _ in panels[2]["boxes"]] == [2, 2]
    np.testing.assert_allclose(panels[1]["boxes"][1][1], [0, H / 2, W, H])
    assert panels[1]["title"].startswith("level 1 soft attn")


def _tiny_cfg(name):
    from attnreid.config import from_dict

    model = {"name": name, "backbone": {"name": "resnet18"}, "mhsanet": {"num_heads": 3},
             "hacnn": {"widths": [16, 32, 48], "embed_dim": 32}}
    return from_dict({"model": model, "data": {"height": 128, "width": 64}})


@pytest.mark.parametrize("name", ["mhsanet", "hacnn"])
def test_real_models_explained(tmp_path, name):
    from attnreid.models import build_model

    torch.manual_seed(0)
    model = build_model(_tiny_cfg(name).model, 5)
    img = Image.fromarray((np.random.default_rng(0).random((128, 64, 3)) * 255).astype(np.uint8))
    entries = A.explain_images(model, [("x.png", img)], tmp_path, 128, 64, _transform)
    assert Path(entries[0]["png"]).is_file()
    if name == "mhsanet":
        assert len(entries[0]["beta"]) == 3 and abs(sum(entries[0]["beta"]) - 1) < 1e-3  # softmax over K


def test_baseline_has_no_attention_maps():
    from attnreid.models import build_model

    model = build_model(_tiny_cfg("baseline").model, 5)
    with pytest.raises(AttnReidError, match="model 'baseline' has no attention maps"):
        A.attention_maps(model, torch.zeros(1, 3, 128, 64))


def _checkpoint(tmp_path, name):
    from attnreid.config import save_config, to_dict
    from attnreid.engine.checkpoint import save_checkpoint
    from attnreid.models import build_model

    cfg = _tiny_cfg(name)
    model = build_model(cfg.model, 5)
    ckpt = save_checkpoint(tmp_path / f"{name}.pth", {"model": model.state_dict(), "config": to_dict(cfg),
                                                      "num_classes": 5, "epoch": 1})
    save_config(cfg, tmp_path / f"{name}.yaml")
    return tmp_path / f"{name}.yaml", ckpt


def test_explain_cli(tmp_path):
    config, ckpt = _checkpoint(tmp_path, "mhsanet")
    imgs = []
    for i in range(2):
        p = tmp_path / f"person_{i}.png"
        Image.fromarray((np.random.default_rng(i).random((100, 50, 3)) * 255).astype(np.uint8)).save(p)
        imgs.append(str(p))
    code, out, err = run_cli(["explain", str(config), *imgs, "--checkpoint", str(ckpt), "--out", str(tmp_path / "ex"),
                              "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == "mhsanet" and len(result["images"]) == 2
    page = (tmp_path / "ex" / "index.html").read_text()
    assert page.count("<img ") == 2 and "person_1.png" in page
    (tmp_path / "notes.txt").write_text("not a picture")
    code, out, err = run_cli(["explain", str(config), str(tmp_path / "notes.txt"), "--checkpoint", str(ckpt),
                              "--out", str(tmp_path / "ex2")])
    assert_one_line_error(code, err, "notes.txt")
    config, ckpt = _checkpoint(tmp_path, "baseline")
    code, out, err = run_cli(["explain", str(config), imgs[0], "--checkpoint", str(ckpt), "--out", str(tmp_path / "ex3")])
    assert_one_line_error(code, err, "model 'baseline' has no attention maps")


def test_report_shows_overlays_or_says_why_not(tmp_path):
    import shutil

    from attnreid.viz.report import write_report
    from test_viz import make_run

    _, ckpt = _checkpoint(tmp_path, "hacnn")
    run = make_run(tmp_path, "hacnn_run", model="hacnn")
    (run / "checkpoints").mkdir()
    shutil.copy(ckpt, run / "checkpoints" / "best.pth")
    broken = make_run(tmp_path, "broken_run", seed=1)
    (broken / "checkpoints").mkdir()
    (broken / "checkpoints" / "last.pth").write_bytes(b"\x00" * 10)
    page = write_report([run, broken], tmp_path / "rep", overlays=2).read_text()
    overlays = sorted((tmp_path / "rep" / "report_files").glob("run0_*attention_*.png"))
    assert len(overlays) == 2 and all(o.name in page for o in overlays)
    assert "Attention overlays not available" in page and "last.pth" in page


def test_overlays_carry_each_images_head_diversity(tmp_path):
    img = Image.fromarray(np.zeros((H, W, 3), np.uint8))
    entries = A.explain_images(HeadStandIn(), [("x.png", img)], tmp_path, H, W, _transform)
    # The two stand-in heads attend to different cells: no overlap; beta = (0.7, 0.3).
    assert entries[0]["head_overlap"] == 0.0
    assert entries[0]["beta_entropy"] == pytest.approx(-(0.7 * np.log(0.7) + 0.3 * np.log(0.3)), abs=1e-4)
    assert entries[0]["beta_entropy_max"] == pytest.approx(np.log(2), abs=1e-4)
    assert A.diversity_text(entries[0]) == "head overlap 0.00 · β entropy 0.61 of ln K = 0.69 nats"


def test_report_attention_panel_shows_head_overlap_and_beta_entropy(tmp_path):
    import shutil

    from attnreid.viz.report import write_report
    from test_viz import make_run

    _, ckpt = _checkpoint(tmp_path, "mhsanet")
    run = make_run(tmp_path, "mhsanet_run")
    ev = json.loads((run / "eval.json").read_text())
    ev["attention_stats"] = {"head_overlap": 0.8125, "beta_entropy": 0.25, "beta_entropy_max": 1.0986,
                             "beta_mean": [0.9, 0.05, 0.05], "num_images": 4}
    (run / "eval.json").write_text(json.dumps(ev))
    (run / "checkpoints").mkdir()
    shutil.copy(ckpt, run / "checkpoints" / "last.pth")
    page = write_report([run], tmp_path / "rep", overlays=1).read_text()
    assert "Head diversity over 4 query images" in page
    assert "head overlap 0.81 · β entropy 0.25 of ln K = 1.10 nats" in page
    assert page.count("head overlap") >= 2  # the summary and the overlay's own caption
