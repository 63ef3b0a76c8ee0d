"""Every config in configs/ loads through the typed schema and means exactly its paper-table row.

The expected values are written out below from the papers' tables (MHSA-Net Tables I-IX,
HA-CNN Tables 2-7) and the file names, never read from the configs. A new config that is not
in ``EXPECTED`` fails ``test_every_shipped_config_is_pinned``: add its row here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from attnreid.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))
BASES = {"base.yaml", "hacnn/base.yaml", "bot/base.yaml"}  # schedules only; every row inherits from one
# Not paper-table rows, each pinned by its own test: reduced-size recipes for a CPU.
PINNED_ELSEWHERE = {
    "cpu/market1501_baseline.yaml": "tests/test_cpu_recipes.py",
    "cpu/market1501_mhsanet.yaml": "tests/test_cpu_recipes.py",
    "cpu/market1501_hacnn.yaml": "tests/test_cpu_recipes.py",
    "cpu/market1501_mhsanet_orth.yaml": "tests/test_cpu_recipes.py",
    "cpu/market1501_mhsanet_diverse.yaml": "tests/test_cpu_recipes.py",
    "cpu/market1501_mhsanet_heads.yaml": "tests/test_cpu_recipes.py",
    "cpu/market1501_mhsanet_rows.yaml": "tests/test_cpu_recipes.py",
    "cpu/market1501_mhsanet_rows_cap.yaml": "tests/test_cpu_recipes.py",
    "cpu/market1501_mhsanet_rows_centre.yaml": "tests/test_cpu_recipes.py",
    "cpu/market1501_bot.yaml": "tests/test_cpu_recipes.py",
    "cpu/market1501_baseline_mobilenetv2.yaml": "tests/test_cpu_recipes.py",
    "cpu/market1501_bot_mobilenetv2.yaml": "tests/test_cpu_recipes.py",
    "cpu/market1501_mhsanet_mobilenetv2.yaml": "tests/test_cpu_recipes.py",
    "cpu/market1501_mhsanet_heads_mobilenetv2.yaml": "tests/test_cpu_recipes.py",
    "cpu/market1501_mhsanet_rows_centre_mobilenetv2.yaml": "tests/test_cpu_recipes.py",
}

# --- MHSA-Net (docs/spec.md §1, MHSA-Net Sec. VII) ---------------------------------------------------
PAPER_LAMBDAS = (1e-4, 1.0, 1e-3)  # lambda1 (FDRT), lambda2 (IHTL), lambda3 (ACM): Eq. 11, 13, Sec. VII-D
MHSANET = {  # MHSA-Net (K=8), Table I / V: everything on, test feature cat(p*, q*)
    "model": "mhsanet", "K": 8, "lambdas": PAPER_LAMBDAS, "global_ce": True, "fusion": "saffm", "rlm": True,
    "test_feature": "concat", "rerank": False,
    # not in the paper, so 0 in every paper row: Lin et al.'s attention penalty, the logit cap
    "attention_orth": 0.0, "logit_cap": 0.0,
}
# suffix -> what the row changes (Table I, V, IX). The Table V ablations switch components off
# by weight 0; "MHSAM" alone is lambda1 = lambda2 = lambda3 = 0 (Table VIII's setting).
MHSA_ROWS = {
    "": {},
    "_dagger": {"global_ce": False},                       # MHSA-Net-dagger: no L_CE on q*
    "_star": {"test_feature": "star"},                     # MHSA-Net*: p* alone
    "_k5": {"K": 5},
    "_k6": {"K": 6},
    "_rerank": {"rerank": True},                           # MHSA-Net + Re-ranking (K=8)
    "_baseline": {"model": "baseline", "test_feature": "global"},  # ResNet-50 + GFB, CE on q*
    "_mhsam": {"lambdas": (0.0, 0.0, 0.0)},
    "_mhsam_acm": {"lambdas": (0.0, 0.0, 1e-3)},
    "_mhsam_fdrt": {"lambdas": (1e-4, 0.0, 0.0)},
    "_mhsam_ihtl": {"lambdas": (0.0, 1.0, 0.0)},
    "_mhsam_ihtl_acm": {"lambdas": (0.0, 1.0, 1e-3)},
    "_mhsam_fdrt_acm": {"lambdas": (1e-4, 0.0, 1e-3)},
    "_mhsam_ihtl_fdrt": {"lambdas": (1e-4, 1.0, 0.0)},
    "_star_concat": {"test_feature": "star", "fusion": "concat"},  # Table IX
    "_star_sum": {"test_feature": "star", "fusion": "sum"},        # Table IX
    "_star_no_rlm": {"test_feature": "star", "rlm": False},        # Table IX, w/o RLM
}
GENERAL = ("", "_dagger", "_star", "_k5", "_k6", "_rerank", "_baseline", "_mhsam", "_mhsam_acm", "_mhsam_fdrt",
           "_mhsam_ihtl", "_mhsam_ihtl_acm", "_mhsam_fdrt_acm", "_mhsam_ihtl_fdrt")
OCCLUDED = ("", "_dagger", "_star", "_baseline")
# file prefix -> (training set, evaluation set), and which rows of the tables it has
MHSA_DATASETS = {
    "market1501": ("market1501", "market1501", GENERAL),                 # Tables I, V
    "dukemtmcreid": ("dukemtmcreid", "dukemtmcreid", GENERAL),
    "cuhk03_labeled": ("cuhk03_labeled", "cuhk03_labeled", GENERAL),
    "cuhk03_detected": ("cuhk03_detected", "cuhk03_detected", GENERAL),
    "occluded_duke": ("occluded_duke", "occluded_duke", OCCLUDED + ("_star_concat", "_star_sum", "_star_no_rlm")),  # II, IX
    "p_dukemtmc": ("p_dukemtmc", "p_dukemtmc", OCCLUDED),                # Table IV
    "partial_reid": ("market1501", "partial_reid", OCCLUDED),            # Table III: trained on Market-1501
    "partial_ilids": ("market1501", "partial_ilids", OCCLUDED),
}
TABLE8 = {"market1501": "market1501", "cuhk03_detected": "cuhk03_detected"}   # K = 1..9, MHSAM alone
TABLE6 = {"occluded_duke": "occluded_duke", "cuhk03_detected": "cuhk03_detected"}  # P_k alone, k = 1..8 of K = 8

# --- HA-CNN (docs/spec.md §2, HA Tables 2-7) --------------------------------------------------------
HACNN = {"model": "hacnn", "attention": "all", "cross_attention": "on", "test_feature": "joint"}
HA_ROWS = {
    "": {},
    "_none": {"attention": "none"},       # Table 5: no attention
    "_spatial": {"attention": "spatial"},  # SSA
    "_channel": {"attention": "channel"},  # SCA
    "_soft": {"attention": "soft"},        # SSA + SCA
    "_hard": {"attention": "hard"},        # HRA
    "_no_cail": {"cross_attention": "off"},  # Table 6: w/o cross-attention interaction learning
    "_no_cail_detach": {"cross_attention": "detach"},  # Table 6, second reading: hard attention kept, Eq. 7 cut
    "_global": {"test_feature": "global"},   # Table 7
    "_local": {"test_feature": "local"},
}
HA_DATASETS = {
    "market1501": tuple(HA_ROWS),    # Tables 2, 5, 6, 7
    "dukemtmcreid": tuple(HA_ROWS),  # Tables 3, 5, 6, 7
    "cuhk03_labeled": ("",),         # Table 4
    "cuhk03_detected": ("",),
    "occluded_duke": ("",),          # MHSA-Net Table II comparison row
}


def _expected():
    rows = {}
    for prefix, (train_set, eval_set, suffixes) in MHSA_DATASETS.items():
        for suffix in suffixes:
            rows[f"mhsanet/{prefix}{suffix}.yaml"] = {**MHSANET, **MHSA_ROWS[suffix], "dataset": train_set,
                                                      "eval_dataset": eval_set}
    # MHSA-Net (K=8) on Market-1501 with every loss read literally (docs/spec.md §1): the row's own values
    rows["mhsanet/paper_literal.yaml"] = {**MHSANET, "dataset": "market1501", "eval_dataset": "market1501"}
    for prefix, ds in TABLE8.items():
        for k in range(1, 10):
            rows[f"mhsanet/table8/{prefix}_k{k}.yaml"] = {**MHSANET, "K": k, "lambdas": (0.0, 0.0, 0.0),
                                                          "dataset": ds, "eval_dataset": ds}
    for prefix, ds in TABLE6.items():
        for k in range(1, 9):
            rows[f"mhsanet/table6/{prefix}_head{k}.yaml"] = {**MHSANET, "test_feature": "head", "test_head": k - 1,
                                                             "dataset": ds, "eval_dataset": ds}
    for prefix, suffixes in HA_DATASETS.items():
        for suffix in suffixes:
            rows[f"hacnn/{prefix}{suffix}.yaml"] = {**HACNN, **HA_ROWS[suffix], "dataset": prefix,
                                                    "eval_dataset": prefix}
    # Appendix sweeps on MHSAM (K = 8 unless named), docs/spec.md §1 / MHSA-Net Tables VII, X, XI, Figs. 7-8.
    cuhk = {"dataset": "cuhk03_detected", "eval_dataset": "cuhk03_detected"}
    for tag, lam3 in (("1", 1.0), ("1e-1", 1e-1), ("1e-2", 1e-2), ("1e-3", 1e-3), ("1e-4", 1e-4), ("1e-5", 1e-5)):
        rows[f"mhsanet/table7/cuhk03_detected_lambda3_{tag}.yaml"] = {**MHSANET, **cuhk, "lambdas": (0.0, 0.0, lam3),
                                                                     "gamma": 1e-3}
    for tag, gamma in (("1", 1.0), ("5e-1", 0.5), ("1e-1", 1e-1), ("1e-2", 1e-2), ("1e-4", 1e-4)):
        rows[f"mhsanet/table7/cuhk03_detected_gamma_{tag}.yaml"] = {**MHSANET, **cuhk, "lambdas": (0.0, 0.0, 1e-3),
                                                                   "gamma": gamma}
    for e in range(1, 7):
        rows[f"mhsanet/table10/cuhk03_detected_lambda1_1e-{e}.yaml"] = {**MHSANET, **cuhk,
                                                                        "lambdas": (10.0 ** -e, 0.0, 0.0)}
    for k in (7, 8):
        for tag, lam2 in (("1e-2", 1e-2), ("1e-1", 1e-1), ("1", 1.0), ("1e1", 10.0), ("1e2", 100.0)):
            rows[f"mhsanet/table11/cuhk03_detected_k{k}_lambda2_{tag}.yaml"] = {**MHSANET, **cuhk, "K": k,
                                                                               "lambdas": (0.0, lam2, 0.0)}
    for fig, lambdas in (("fig7", (1e-4, 0.0, 0.0)), ("fig8", (0.0, 1.0, 0.0))):  # MHSAM+FDRT, MHSAM+IHTL
        for prefix in ("market1501", "cuhk03_detected"):
            for k in range(1, 10):
                rows[f"mhsanet/{fig}/{prefix}_k{k}.yaml"] = {**MHSANET, "K": k, "lambdas": lambdas,
                                                            "dataset": prefix, "eval_dataset": prefix}
    # Trained on Market-1501, tested on Occluded-REID (as the Partial-REID rows).
    rows["mhsanet/occluded_reid.yaml"] = {**MHSANET, "dataset": "market1501", "eval_dataset": "occluded_reid"}
    # HA-CNN readings the paper leaves open, and the multi-query column of HA Table 2.
    rows["hacnn/market1501_native.yaml"] = {**HACNN, "dataset": "market1501", "eval_dataset": "market1501",
                                            "region_scale": "native"}
    rows["hacnn/market1501_mq.yaml"] = {**HACNN, "dataset": "market1501", "eval_dataset": "market1501",
                                        "multi_query": True}
    # BoT (Luo et al.): ResNet-50 baseline with BNNeck, its test feature after the BN.
    for ds in ("market1501", "dukemtmcreid"):
        rows[f"bot/{ds}.yaml"] = {"model": "baseline", "test_feature": "global", "dataset": ds, "eval_dataset": ds,
                                  "rerank": False, "global_ce": True, "bnneck": True}
    return rows


EXPECTED = _expected()
SHIPPED = {p.relative_to(CONFIGS).as_posix() for p in ALL} - BASES - set(PINNED_ELSEWHERE)
# The papers' schedules; bot/ has BoT's own (tests/test_bot.py), cpu/ its reduced one.
PAPER = [p for p in ALL if p.relative_to(CONFIGS).as_posix() not in PINNED_ELSEWHERE and p.parent.name != "bot"]


def test_every_shipped_config_is_pinned():
    unpinned = sorted(SHIPPED - set(EXPECTED))  # PINNED_ELSEWHERE: not paper rows, own tests
    missing = sorted(set(EXPECTED) - SHIPPED)
    assert not unpinned, (f"configs not pinned to a paper-table row: {unpinned}; add each one's row (K, lambdas, "
                          "fusion, rlm, test feature, dataset / attention, cross_attention) to tests/test_configs.py")
    assert not missing, f"paper-table rows without a config: {missing}"


def test_the_index_lists_every_config():
    index = (CONFIGS / "README.md").read_text()
    assert [n for n in sorted(SHIPPED | set(PINNED_ELSEWHERE)) if f"`{n}`" not in index] == []


def _row_values(cfg, expected: dict) -> dict:
    """What the loaded config means, in the vocabulary of ``EXPECTED`` ("default" resolved per model)."""
    m = cfg.model
    default_feature = {"mhsanet": "concat", "baseline": "global", "hacnn": "joint"}[m.name]
    got = {
        "model": m.name,
        "test_feature": default_feature if m.test_feature == "default" else m.test_feature,
        "dataset": cfg.data.dataset,
        "eval_dataset": cfg.eval.dataset or cfg.data.dataset,
    }
    if m.name == "hacnn":
        got.update(attention=m.hacnn.attention, cross_attention=m.hacnn.cross_attention)
        for key, value in (("region_scale", m.hacnn.region_scale), ("multi_query", cfg.eval.multi_query)):
            if key in expected:
                got[key] = value
        return got
    got["rerank"] = cfg.eval.rerank
    got["global_ce"] = cfg.loss.global_ce
    if m.name == "mhsanet":
        got.update(K=m.mhsanet.num_heads, fusion=m.mhsanet.fusion, rlm=m.mhsanet.rlm,
                   lambdas=(cfg.loss.lambda_fdrt, cfg.loss.lambda_ihtl, cfg.loss.lambda_acm),
                   attention_orth=cfg.loss.lambda_attention_orth, logit_cap=m.mhsanet.attention_logit_cap)
        if "test_head" in expected:
            got["test_head"] = m.test_head
        if "gamma" in expected:
            got["gamma"] = cfg.loss.acm_gamma
    if "bnneck" in expected:
        got["bnneck"] = m.bnneck
    return got


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_means_its_table_row(name):
    expected = dict(EXPECTED[name])
    if expected["model"] == "baseline":  # the Baseline has no MHSAB: K, lambdas, fusion and RLM mean nothing
        for key in ("K", "lambdas", "fusion", "rlm", "attention_orth", "logit_cap"):
            expected.pop(key, None)
    got = _row_values(load_config(CONFIGS / name), expected)
    assert got == expected, name


def test_configs_pinned_elsewhere_exist():
    assert [n for n in PINNED_ELSEWHERE if not (CONFIGS / n).exists()] == []


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_loads_with_its_papers_schedule(path):
    cfg = load_config(path)
    name = path.relative_to(CONFIGS).as_posix()
    if name.startswith("hacnn/"):  # HA Sec. 4
        assert cfg.model.name == "hacnn" and (cfg.data.height, cfg.data.width) == (160, 64)
        assert cfg.optim.lr == 5e-4 and cfg.optim.betas == [0.9, 0.999] and cfg.data.batch_size == 32
        assert cfg.train.epochs == 150 and not cfg.data.flip and not cfg.model.backbone.pretrained
        assert cfg.optim.warmup_epochs == 0 and cfg.optim.milestones == []
        return
    # MHSA-Net Sec. VII-B: 384x128, flip, PK 32 x 4, Adam 1e-3 with 50 warm-up epochs, x0.1 at 200 and 300
    assert (cfg.data.height, cfg.data.width) == (384, 128) and cfg.train.epochs == 400 and cfg.data.flip
    assert cfg.optim.name == "adam" and cfg.optim.lr == 1e-3 and cfg.optim.warmup_start_lr == 1e-5
    assert cfg.optim.milestones == [200, 300] and cfg.optim.gamma == 0.1 and cfg.optim.warmup_epochs == 50
    assert cfg.data.batch_size == 128 and cfg.data.num_instances == 4 and cfg.optim.weight_decay == 5e-4
    assert cfg.model.backbone.name == "resnet50" and cfg.model.backbone.last_stride == 1
    assert cfg.model.backbone.pretrained
    if cfg.eval.rerank:
        assert (cfg.eval.k1, cfg.eval.k2, cfg.eval.lambda_value) == (20, 6, 0.3)  # Zhong et al.'s parameters
