"""``attnreid metrics FILE.npz``: JSON and table output, re-ranking, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import assert_one_line_error, run_cli

from attnreid.evaluation.rank import evaluate_rank
from attnreid.evaluation.rerank import re_ranking


def problem(seed=0, q=12, g=40, ids=6, dim=8):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids, dim))
    qp, gp = rng.integers(0, ids, q), rng.integers(0, ids, g)
    return {
        "query_pids": qp,
        "gallery_pids": gp,
        "query_camids": rng.integers(0, 3, q),
        "gallery_camids": rng.integers(0, 3, g),
        "query_features": (centres[qp] + 0.8 * rng.standard_normal((q, dim))).astype(np.float32),
        "gallery_features": (centres[gp] + 0.8 * rng.standard_normal((g, dim))).astype(np.float32),
    }


def save(tmp_path, name="x.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_json_from_distmat(tmp_path):
    arrs = problem()
    dist = np.random.default_rng(1).random((12, 40)).astype(np.float32)
    ids = {k: arrs[k] for k in ("query_pids", "gallery_pids", "query_camids", "gallery_camids")}
    code, out, err = run_cli(["metrics", save(tmp_path, distmat=dist, **ids), "--json"])
    assert code == 0, err
    res = json.loads(out)
    expected = evaluate_rank(dist, arrs["query_pids"], arrs["gallery_pids"], arrs["query_camids"], arrs["gallery_camids"])
    for key in ("mAP", "mINP", "cmc", "rank1", "rank5", "rank10", "num_valid_queries"):
        assert res[key] == expected[key]
    assert len(res["cmc"]) == 50 and all(0.0 <= v <= 1.0 for v in res["cmc"])


def test_json_with_rerank_from_features(tmp_path):
    arrs = problem(2)
    code, out, err = run_cli(["metrics", save(tmp_path, **arrs), "--rerank", "--k1", "8", "--k2", "3", "--lambda", "0.2", "--json"])
    assert code == 0, err
    dist = re_ranking(arrs["query_features"], arrs["gallery_features"], k1=8, k2=3, lambda_value=0.2)
    expected = evaluate_rank(dist, arrs["query_pids"], arrs["gallery_pids"], arrs["query_camids"], arrs["gallery_camids"])
    assert json.loads(out)["mAP"] == pytest.approx(expected["mAP"], abs=1e-12)


def test_human_table(tmp_path):
    code, out, err = run_cli(["metrics", save(tmp_path, **problem(3))])
    assert code == 0, err
    assert "mAP" in out and "Rank-1" in out and "valid queries" in out


@pytest.mark.parametrize(
    "mutate, needles",
    [
        (lambda a: a.pop("query_pids"), ["missing key 'query_pids'"]),
        (lambda a: a.update(query_camids=a["query_camids"][:5]), ["'query_camids' has shape (5,)"]),
        (lambda a: a.update(query_features=a["query_features"][:, :3]), ["'query_features'", "(12, 3)"]),
        (lambda a: a.update(gallery_features=np.full((40, 8), np.nan, np.float32)), ["'gallery_features'", "NaN"]),
        (lambda a: [a.update(query_pids=a["query_pids"][:0], query_camids=a["query_camids"][:0], query_features=a["query_features"][:0])], ["query set is empty"]),
    ],
)
def test_bad_feature_files(tmp_path, mutate, needles):
    arrs = problem()
    mutate(arrs)
    code, _, err = run_cli(["metrics", save(tmp_path, **arrs), "--json"])
    assert_one_line_error(code, err, *needles)


def test_bad_distmat_files(tmp_path):
    arrs = problem()
    ids = {k: arrs[k] for k in ("query_pids", "gallery_pids", "query_camids", "gallery_camids")}
    dist = np.zeros((12, 40), np.float32)
    dist[3, 7] = np.inf
    code, _, err = run_cli(["metrics", save(tmp_path, "inf.npz", distmat=dist, **ids)])
    assert_one_line_error(code, err, "'distmat'", "NaN/inf", "[3, 7]")
    code, _, err = run_cli(["metrics", save(tmp_path, "shape.npz", distmat=np.zeros((12, 39)), **ids)])
    assert_one_line_error(code, err, "'distmat' has shape (12, 39)", "(12, 40)")
    code, _, err = run_cli(["metrics", save(tmp_path, "none.npz", **ids)])
    assert_one_line_error(code, err, "missing key 'distmat'")
    code, _, err = run_cli(["metrics", save(tmp_path, "rr.npz", distmat=np.zeros((12, 40)), **ids), "--rerank"])
    assert_one_line_error(code, err, "--rerank needs features", "'query_features'")


def test_not_an_npz_and_missing_file(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("hello")
    code, _, err = run_cli(["metrics", bad])
    assert_one_line_error(code, err, "bad.npz", "not a readable .npz")
    code, _, err = run_cli(["metrics", tmp_path / "nope.npz"])
    assert_one_line_error(code, err, "nope.npz", "no such file")
