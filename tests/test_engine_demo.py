"""`attnreid demo` on a tiny synthetic set with a tiny budget."""

from __future__ import annotations

import json

from helpers import assert_one_line_error, run_cli

TINY = ["data.height=64", "data.width=32", "data.batch_size=8", "data.num_instances=2", "data.test_batch_size=64",
        "data.synthetic.height=64", "data.synthetic.width=32", "train.threads=1", "model.hacnn.widths=[8,16,24]",
        "model.hacnn.embed_dim=32"]


def test_demo_tiny_budget(tmp_path):
    from attnreid.engine.demo import run_demo

    result = run_demo(minutes=0.2, out_dir=tmp_path / "demo", num_ids=12, images_per_id=6, quiet=True,
                      overrides=TINY, report=False)
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["Baseline", "MHSA-Net", "MHSA-Net*", "HA-CNN"]
    for r in result["rows"]:
        assert 0.0 <= r["rank1"] <= 1.0 and 0.0 <= r["mAP"] <= 1.0 and r["status"] in ("budget", "completed")
    assert 0.0 < result["chance"]["rank1"] < 1.0
    assert "attention branch" in result["verdict"] and "Baseline" in result["verdict"]
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved["verdict"] == result["verdict"]
    for run in ("baseline", "mhsanet", "mhsanet_star", "hacnn"):
        assert (tmp_path / "demo" / "runs" / run / "eval.json").is_file(), run


def test_demo_bad_options():
    code, _, err = run_cli(["demo", "--models", "baseline,resnet"])
    assert_one_line_error(code, err, "--models", "resnet")
    code, _, err = run_cli(["demo", "--minutes", "0"])
    assert_one_line_error(code, err, "--minutes")


def _row(model, rank1, mAP, img_per_s, epochs):
    label = {"baseline": "Baseline", "mhsanet": "MHSA-Net"}[model]
    return {"model": model, "label": label, "rank1": rank1, "mAP": mAP, "img_per_s": img_per_s,
            "train_seconds": 100.0, "epochs": epochs}


def test_verdict_words_and_unequal_work_caveat():
    from attnreid.engine.demo import _verdict

    equal = _verdict([_row("baseline", 0.10, 0.18, 100.0, 60), _row("mhsanet", 0.30, 0.35, 90.0, 55)], 31)
    assert "attention branch helped" in equal and "Caveat" not in equal
    worse = _verdict([_row("baseline", 0.30, 0.35, 100.0, 60), _row("mhsanet", 0.10, 0.18, 90.0, 55)], 31)
    assert "did NOT help" in worse and "Caveat" not in worse
    same = _verdict([_row("baseline", 0.30, 0.35, 100.0, 60), _row("mhsanet", 0.30, 0.355, 90.0, 55)], 31)
    assert "made no clear difference" in same
    # The Baseline saw a quarter of MHSA-Net's images (e.g. other jobs took the CPU during its share).
    unequal = _verdict([_row("baseline", 0.10, 0.18, 25.0, 15), _row("mhsanet", 0.30, 0.35, 100.0, 67)], 31)
    assert "helped" in unequal and "Caveat: not an equal-work comparison" in unequal
    assert "10000 images (67 epochs)" in unequal and "2500 (15 epochs)" in unequal
