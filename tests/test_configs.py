"""Every config in configs/ loads through the typed schema, and the rows mean what their names say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from attnreid.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))
PAPER = [p for p in ALL if p.parent.name != "cpu"]  # cpu/: reduced-size recipes, tests/test_cpu_recipes.py


def test_there_is_a_config_per_row():
    names = {p.relative_to(CONFIGS).as_posix() for p in ALL}
    for ds in ("market1501", "dukemtmcreid", "cuhk03_labeled", "cuhk03_detected"):
        for suffix in ("", "_dagger", "_star", "_k5", "_k6", "_baseline", "_mhsam", "_mhsam_acm", "_mhsam_ihtl_fdrt"):
            assert f"mhsanet/{ds}{suffix}.yaml" in names
        assert f"hacnn/{ds}.yaml" in names
    for name in ("mhsanet/occluded_duke_star.yaml", "mhsanet/p_dukemtmc_dagger.yaml", "mhsanet/partial_reid_star.yaml",
                 "mhsanet/partial_ilids.yaml", "mhsanet/occluded_duke_star_concat.yaml",
                 "mhsanet/occluded_duke_star_sum.yaml", "mhsanet/occluded_duke_star_no_rlm.yaml",
                 "mhsanet/table8/cuhk03_detected_k9.yaml", "hacnn/dukemtmcreid_no_cail.yaml",
                 "hacnn/market1501_soft.yaml"):
        assert name in names
    index = (CONFIGS / "README.md").read_text()
    assert all(f"`{n}`" in index for n in names if n != "base.yaml" and n != "hacnn/base.yaml")


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_loads(path):
    cfg = load_config(path)
    name = path.relative_to(CONFIGS).as_posix()
    if name.startswith("hacnn/"):
        assert cfg.model.name == "hacnn" and (cfg.data.height, cfg.data.width) == (160, 64)
        assert cfg.optim.lr == 5e-4 and cfg.optim.betas == [0.9, 0.999] and cfg.data.batch_size == 32
        assert cfg.train.epochs == 150 and not cfg.data.flip and not cfg.model.backbone.pretrained
        assert cfg.optim.warmup_epochs == 0 and cfg.optim.milestones == []
        return
    assert (cfg.data.height, cfg.data.width) == (384, 128) and cfg.train.epochs == 400
    assert cfg.optim.milestones == [200, 300] and cfg.optim.warmup_epochs == 50 and cfg.data.batch_size == 128
    stem = path.stem
    if stem.endswith("_baseline"):
        assert cfg.model.name == "baseline"
        return
    assert cfg.model.name == "mhsanet"
    assert cfg.loss.global_ce == ("_dagger" not in stem)
    star = "_star" in stem
    assert (cfg.model.test_feature == "star") == star
    k = re.search(r"_k(\d)$", stem)
    assert cfg.model.mhsanet.num_heads == (int(k.group(1)) if k else 8)
    if "table8" in name or stem.endswith("_mhsam"):
        assert (cfg.loss.lambda_fdrt, cfg.loss.lambda_ihtl, cfg.loss.lambda_acm) == (0, 0, 0)


def test_ablation_weights_follow_the_row_name():
    for path in CONFIGS.glob("mhsanet/*_mhsam*.yaml"):
        cfg = load_config(path)
        parts = path.stem.split("_mhsam", 1)[1]
        assert (cfg.loss.lambda_fdrt > 0) == ("fdrt" in parts), path
        assert (cfg.loss.lambda_ihtl > 0) == ("ihtl" in parts), path
        assert (cfg.loss.lambda_acm > 0) == ("acm" in parts), path


def test_partial_rows_train_on_market_and_evaluate_on_the_partial_set():
    for ds in ("partial_reid", "partial_ilids"):
        for suffix in ("", "_dagger", "_star", "_baseline"):
            cfg = load_config(CONFIGS / "mhsanet" / f"{ds}{suffix}.yaml")
            assert cfg.data.dataset == "market1501" and cfg.eval.dataset == ds
