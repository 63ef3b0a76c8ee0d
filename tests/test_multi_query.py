"""Market-1501 multi-query (HA Table 2, MQ): eval.multi_query averages the gt_bbox features of a query's pid and camera."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from attnreid.config import load_config
from attnreid.data.datasets import build_dataset
from attnreid.engine.evaluator import evaluate_model
from attnreid.errors import DataError
from attnreid.evaluation.options import RankingOptions
from attnreid.evaluation.protocols import evaluate
from attnreid.inference.extract import extract_features

BASE = "Market-1501-v15.09.15"
# file name -> red level; the feature is the image's mean colour
FILES = {
    "bounding_box_train": {"0007_c1s1_000001_00.jpg": 10, "0007_c2s1_000001_00.jpg": 20},
    # single query: q1 (red 100) is nearest the wrong person's 110; its gt_bbox mean (150) is nearest 160
    "query": {"0001_c1s1_000001_00.jpg": 100, "0002_c2s1_000001_00.jpg": 50},
    "bounding_box_test": {"0001_c2s1_000002_00.jpg": 160, "0002_c1s1_000002_00.jpg": 110,
                          "0002_c3s1_000002_00.jpg": 40},
    "gt_bbox": {"0001_c1s1_000001_00.jpg": 100, "0001_c1s1_000003_00.jpg": 200, "0001_c2s1_000002_00.jpg": 160,
                "0002_c2s1_000001_00.jpg": 50},
}


class MeanColour(nn.Module):
    feature_dim = 3

    def forward(self, x):
        return x.mean((2, 3))


def _market(root: Path, with_gt_bbox: bool = True) -> Path:
    for folder, files in FILES.items():
        if folder == "gt_bbox" and not with_gt_bbox:
            continue
        (root / BASE / folder).mkdir(parents=True)
        for name, red in files.items():
            Image.new("RGB", (16, 32), (red, 60, 60)).save(root / BASE / folder / name, format="PNG")
    return root


def _cfg(root: Path, multi_query: bool):
    return load_config(None, ["data.dataset=market1501", f"data.root={root}", "data.height=32", "data.width=16",
                              "data.workers=0", f"eval.multi_query={str(multi_query).lower()}", "train.device=cpu"])


def test_multi_query_averages_the_gt_bbox_images_of_the_query_pid_and_camera(tmp_path):
    root = _market(tmp_path)
    ds = build_dataset("market1501", root)
    assert len(ds.extras["gt_bbox"]) == 4
    model = MeanColour()
    single = evaluate_model(model, ds, _cfg(root, False))
    multi = evaluate_model(model, ds, _cfg(root, True))
    assert single["rank1"] == 0.5 and multi["rank1"] == 1.0 and multi["multi_query"] is True

    # the same numbers from features averaged here, by hand, per (pid, camera)
    cfg = _cfg(root, False)
    qf, qp, qc = extract_features(model, ds.query, cfg.data)
    gf, gp, gc = extract_features(model, ds.gallery, cfg.data)
    bf, bp, bc = extract_features(model, ds.extras["gt_bbox"], cfg.data)
    averaged = torch.stack([bf[(bp == p) & (bc == c)].mean(0) for p, c in zip(qp, qc)])
    assert averaged.shape == qf.shape and not torch.allclose(averaged, qf)
    expected = evaluate(averaged, gf, qp, gp, qc, gc)
    assert multi["mAP"] == pytest.approx(expected["mAP"]) and multi["cmc"] == pytest.approx(expected["cmc"])


def test_multi_query_without_gt_bbox_is_one_line(tmp_path):
    root = _market(tmp_path, with_gt_bbox=False)
    ds = build_dataset("market1501", root)
    with pytest.raises(DataError) as info:
        evaluate_model(MeanColour(), ds, _cfg(root, True))
    msg = str(info.value)
    assert "\n" not in msg and "eval.multi_query" in msg and "gt_bbox" in msg and str(tmp_path) in msg


def test_market_multi_query_config():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "hacnn" / "market1501_mq.yaml")
    assert cfg.eval.multi_query and cfg.data.dataset == "market1501" and cfg.model.name == "hacnn"
    assert not cfg.eval.rerank


def test_eval_rerank_input_reaches_the_re_ranking(tmp_path):
    root = _market(tmp_path)
    ds = build_dataset("market1501", root)
    model = MeanColour()
    cfg = load_config(None, ["data.dataset=market1501", f"data.root={root}", "data.height=32", "data.width=16",
                             "data.workers=0", "eval.rerank=true", "eval.rerank_input=torchreid", "eval.k1=2",
                             "eval.k2=1"])
    got = evaluate_model(model, ds, cfg, out_dir=tmp_path / "run")
    qf, qp, qc = extract_features(model, ds.query, cfg.data)
    gf, gp, gc = extract_features(model, ds.gallery, cfg.data)
    expected = evaluate(qf, gf, qp, gp, qc, gc, ranking=RankingOptions(rerank=True, k1=2, k2=1, rerank_input="torchreid"))
    assert got["rerank_input"] == "torchreid" and got["mAP"] == pytest.approx(expected["mAP"])
    # the ranked lists written for the report carry torchreid's re-ranked distances, not Zhong's
    from attnreid.evaluation.rerank import re_ranking

    written = np.load(tmp_path / "run" / "eval_ranks.npz")["topk_dist"]
    torchreid = np.sort(re_ranking(qf, gf, k1=2, k2=1, rerank_input="torchreid"), axis=1)
    zhong = np.sort(re_ranking(qf, gf, k1=2, k2=1), axis=1)
    assert np.allclose(written, torchreid, atol=1e-6) and not np.allclose(written, zhong, atol=1e-4)
    with pytest.raises(Exception, match="eval.rerank_input"):
        load_config(None, ["eval.rerank_input=fourth_power"])
