"""The report's intervals, CMC error bands and paired comparison, on hand-made run folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from attnreid.evaluation import stats
from attnreid.viz import plots
from attnreid.viz.report import write_report


def make_run(root: Path, name: str, ap, queries=None, gallery_pids=(1, 2, 3)) -> Path:
    """A run folder holding eval.json (with intervals) and eval_per_query.npz."""
    ap = np.asarray(ap, dtype=float)
    n = len(ap)
    queries = queries or [f"/data/{name}/query/{i:04d}_c1s1_{i:06d}_00.jpg" for i in range(n)]
    first = np.where(ap > 0.5, 1, 3)
    pq = {"ap": ap, "inp": ap, "rank1": (first == 1).astype(float), "valid": np.ones(n, bool), "first_rank": first}
    res = {"mAP": float(ap.mean()), "mINP": float(ap.mean()), "rank1": float(pq["rank1"].mean()),
           "rank5": 1.0, "rank10": 1.0, "cmc": [float(pq["rank1"].mean()), float(pq["rank1"].mean()), 1.0, 1.0, 1.0],
           "per_query": pq, "dataset": "synthetic", "protocol": "market", "model": "baseline"}
    stats.with_intervals(res, resamples=200)
    record = stats.per_query_record(queries, np.arange(n) % 3 + 1, np.ones(n, int), ["/g/a.jpg", "/g/b.jpg", "/g/c.jpg"],
                                    list(gallery_pids), [2, 2, 2], res.pop("per_query"), protocol="market")
    run = root / name
    run.mkdir(parents=True)
    np.savez(run / "eval_per_query.npz", **record)
    (run / "eval.json").write_text(json.dumps(res))
    return run


def test_report_shows_intervals_bands_and_the_paired_comparison(tmp_path):
    rng = np.random.default_rng(0)
    ap = rng.beta(2, 3, 200)
    base = make_run(tmp_path, "baseline", ap)
    better = make_run(tmp_path, "better", np.clip(ap + 0.1, 0, 1))
    same = make_run(tmp_path, "same", ap)
    other = make_run(tmp_path, "other_gallery", ap, gallery_pids=(1, 2, 4))
    page = write_report([base, better, same, other], tmp_path / "report", overlays=0).read_text()
    assert "Paired comparison (reference: baseline)" in page
    assert "better better" in page  # the verdict names the run
    assert "no significant difference" in page
    assert "different galleries" in page  # refused, as a note
    ci = json.loads((base / "eval.json").read_text())["mAP_ci"]
    assert stats.format_ci(ap.mean(), ci) in page and "bootstrap interval" in page
    assert "shaded: the bootstrap interval" in page


def test_report_of_one_run_has_no_comparison(tmp_path):
    run = make_run(tmp_path, "only", np.linspace(0.1, 0.9, 20))
    page = write_report([run], tmp_path / "report", overlays=0).read_text()
    assert "Paired comparison" not in page


def test_cmc_plot_with_bands_differs_from_without(tmp_path):
    curves = {"a": [0.5, 0.7, 0.9]}
    plain = plots.plot_cmc(curves, tmp_path / "plain.png")
    banded = plots.plot_cmc(curves, tmp_path / "band.png", bands={"a": [[0.4, 0.6], [0.6, 0.8], [0.85, 0.95]]})
    assert plain.read_bytes() != banded.read_bytes()
    # A band of the wrong length is not drawn (the plot equals the plain one but for its title).
    short = plots.plot_cmc(curves, tmp_path / "short.png", bands={"a": [[0.4, 0.6]]}, title="CMC")
    assert short.read_bytes() == plain.read_bytes()
