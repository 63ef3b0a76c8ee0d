"""Every config in configs/ loads through the typed schema, and the rows mean what their names say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from attnreid.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))
# cpu/: reduced-size recipes, tests/test_cpu_recipes.py; bot/: the strong baseline, tests/test_bot.py
PAPER = [p for p in ALL if p.parent.name not in ("cpu", "bot")]


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
    assert all(f"`{n}`" in index for n in names if n != "base.yaml" and not n.endswith("/base.yaml"))


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
    k = re.search(r"_k(\d)(?:_|$)", stem)
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
    cfg = load_config(CONFIGS / "mhsanet" / "occluded_reid.yaml")
    assert cfg.data.dataset == "market1501" and cfg.eval.dataset == "occluded_reid"


# Tables and figures with trainable rows: MHSA-Net I-XI and Figs. 7-8, HA-CNN Tables 2-7
# (HA Table 1 lists protocols, HA Table 8 model sizes: `attnreid model-info`).
TRAINABLE = {"I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "Fig. 7", "Fig. 8",
             "HA 2", "HA 3", "HA 4", "HA 5", "HA 6", "HA 7"}


def _index_rows():
    """(file, [table labels]) of each row of configs/README.md's index."""
    rows = []
    for line in (CONFIGS / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        tables = cells[1]
        prefix = "HA " if tables.startswith("HA ") else ""
        labels = [prefix + t.strip().removeprefix("HA ").strip() for t in tables.split(",")]
        rows.append((cells[0].strip("`"), labels))
    return rows


def test_every_table_and_figure_with_trainable_rows_is_in_the_index():
    rows = _index_rows()
    labels = {label for _, ls in rows for label in ls}
    assert TRAINABLE <= labels, sorted(TRAINABLE - labels)
    assert all((CONFIGS / f).is_file() for f, _ in rows), [f for f, _ in rows if not (CONFIGS / f).is_file()]
    per_table = {t: sum(t in ls for _, ls in rows) for t in TRAINABLE}
    # row counts of the sweeps, from the papers' tables (reference rows included)
    assert per_table["VII"] == 11 + 1 and per_table["X"] == 6 + 1 and per_table["XI"] == 10 + 2
    assert per_table["Fig. 7"] == per_table["Fig. 8"] == 2 * 9


def test_appendix_sweeps_follow_their_names():
    """Tables VII, X, XI and Figs. 7-8: the weights the file name gives, every other term off."""
    seen = 0
    for path in sorted(CONFIGS.glob("mhsanet/table7/*.yaml")):
        cfg, stem = load_config(path), path.stem
        lam3, gamma = (float(stem.split("_lambda3_")[1]), 1e-3) if "_lambda3_" in stem else (1e-3, float(stem.split("_gamma_")[1]))
        assert (cfg.loss.lambda_fdrt, cfg.loss.lambda_ihtl) == (0, 0) and cfg.model.mhsanet.num_heads == 8, path
        assert cfg.loss.lambda_acm == pytest.approx(lam3) and cfg.loss.acm_gamma == pytest.approx(gamma), path
        assert cfg.data.dataset == "cuhk03_detected"
        seen += 1
    for path in sorted(CONFIGS.glob("mhsanet/table10/*.yaml")):
        cfg = load_config(path)
        assert cfg.loss.lambda_fdrt == pytest.approx(float(path.stem.split("_lambda1_")[1])), path
        assert (cfg.loss.lambda_ihtl, cfg.loss.lambda_acm, cfg.model.mhsanet.num_heads) == (0, 0, 8), path
        assert cfg.data.dataset == "cuhk03_detected"
        seen += 1
    for path in sorted(CONFIGS.glob("mhsanet/table11/*.yaml")):
        cfg = load_config(path)
        k, lam2 = re.fullmatch(r"cuhk03_detected_k(\d)_lambda2_(.+)", path.stem).groups()
        assert cfg.loss.lambda_ihtl == pytest.approx(float(lam2)) and cfg.model.mhsanet.num_heads == int(k), path
        assert (cfg.loss.lambda_fdrt, cfg.loss.lambda_acm) == (0, 0) and cfg.data.dataset == "cuhk03_detected"
        seen += 1
    for fig, weights in (("fig7", (1e-4, 0, 0)), ("fig8", (0, 1.0, 0))):
        for path in sorted(CONFIGS.glob(f"mhsanet/{fig}/*.yaml")):
            cfg = load_config(path)
            ds, k = re.fullmatch(r"(market1501|cuhk03_detected)_k(\d)", path.stem).groups()
            assert (cfg.loss.lambda_fdrt, cfg.loss.lambda_ihtl, cfg.loss.lambda_acm) == pytest.approx(weights), path
            assert cfg.data.dataset == ds and cfg.model.mhsanet.num_heads == int(k), path
            seen += 1
    assert seen == 11 + 6 + 10 + 36
