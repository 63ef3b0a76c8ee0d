"""Visualisation: plots, ranked lists and the HTML report, on hand-made run folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from attnreid.errors import DataError
from attnreid.viz import plots, ranking
from attnreid.viz.report import write_report
from helpers import assert_one_line_error, run_cli

PALETTE = [(200, 40, 40), (40, 160, 60), (40, 70, 200), (220, 180, 30), (150, 60, 170), (30, 170, 170)]


def make_images(folder: Path, pids, camids, prefix: str):
    """Small person-like pictures, one colour per identity, written as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (pid, cam) in enumerate(zip(pids, camids)):
        img = Image.new("RGB", (64, 128), (235, 235, 235))
        d = ImageDraw.Draw(img)
        color = PALETTE[pid % len(PALETTE)]
        d.ellipse([22, 6, 42, 28], fill=(230, 190, 160))
        d.rectangle([16, 30, 48, 80], fill=color)
        d.rectangle([18, 80, 46, 124], fill=tuple(c // 2 for c in color))
        d.text((2, 2), str(i), fill=(0, 0, 0))
        p = folder / f"{prefix}{pid:04d}_c{cam}_{i:03d}.png"
        img.save(p)
        paths.append(str(p))
    return paths


def make_run(root: Path, name: str = "run_a", model: str = "mhsanet", evaluated: bool = True,
             seed: int = 0, k: int = 5, images: Path | None = None) -> Path:
    """A run folder as the engine writes it (docs/design.md): config, log, eval, ranks."""
    rng = np.random.default_rng(seed)
    run = root / name
    run.mkdir(parents=True)
    cfg = {"model": {"name": model, "backbone": {"name": "resnet18"}, "mhsanet": {"num_heads": 4, "fusion": "saffm"}},
           "data": {"dataset": "synthetic", "height": 128, "width": 64}, "train": {"epochs": 3}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for epoch in range(1, 4):
        for step in range(2):
            lines.append({"type": "train", "epoch": epoch, "step": step, "lr": 1e-3, "loss": 5.0 / epoch + step,
                          "ce_global": 3.0 / epoch, "fdrt": 1e-4 * epoch, "img_per_s": 100.0, "data_wait": 0.1})
        lines.append({"type": "eval", "epoch": epoch, "mAP": 0.2 * epoch, "rank1": 0.25 * epoch,
                      "cmc": [0.25 * epoch] * 5})
    (run / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"type\": \"tra")
    if not evaluated:
        return run
    images = images or root / "images"
    q_pids, q_cams = np.array([0, 1, 2, 3]), np.array([0, 0, 0, 0])
    g_pids = np.repeat(np.arange(6), 2)
    g_cams = np.tile([0, 1], 6)
    if not (images / "query").exists():
        make_images(images / "query", q_pids, q_cams, "q")
        make_images(images / "gallery", g_pids, g_cams, "g")
    q_paths = sorted(str(p) for p in (images / "query").iterdir())
    g_paths = sorted(str(p) for p in (images / "gallery").iterdir())
    qf = np.eye(8)[q_pids] + 0.6 * rng.standard_normal((4, 8))
    gf = np.eye(8)[g_pids] + 0.6 * rng.standard_normal((12, 8))
    dist = ((qf[:, None] - gf[None]) ** 2).sum(-1)
    idx = np.argsort(dist, axis=1)[:, :k]
    np.savez(run / "eval_ranks.npz", query_paths=np.array(q_paths), gallery_paths=np.array(g_paths),
             query_pids=q_pids, gallery_pids=g_pids, query_camids=q_cams, gallery_camids=g_cams,
             topk_index=idx, topk_dist=np.take_along_axis(dist, idx, 1))
    ev = {"mAP": 0.5 + 0.1 * seed, "rank1": 0.75, "rank5": 1.0, "rank10": 1.0, "mINP": 0.3,
          "cmc": [0.75, 0.75, 1.0, 1.0, 1.0], "num_valid_queries": 4, "dataset": "synthetic",
          "protocol": "market", "model": model, "epoch": 3}
    (run / "eval.json").write_text(json.dumps(ev))
    return run


# ---------------------------------------------------------------- plots


def test_read_log_skips_half_written_line(tmp_path):
    run = make_run(tmp_path, evaluated=False)
    records = plots.read_log(run / "log.jsonl")
    assert len(records) == 9  # 6 train + 3 eval; the cut last line is dropped
    assert plots.read_log(tmp_path / "missing.jsonl") == []


def test_training_series_averages_each_epoch(tmp_path):
    records = [
        {"type": "train", "epoch": 1, "step": 0, "loss": 4.0, "ce_global": 2.0, "lr": 0.1},
        {"type": "train", "epoch": 1, "step": 1, "loss": 2.0, "ce_global": 1.0, "tri_saffm": 0.5, "lr": 0.1},
        {"type": "train", "epoch": 2, "step": 0, "loss": 1.0, "ce_global": 0.5, "tri_saffm": 0.1},
        {"type": "eval", "epoch": 2, "rank1": 0.4, "mAP": 0.2},
        {"type": "eval", "epoch": 2, "rank1": 0.5, "mAP": 0.3},
    ]
    s = plots.training_series(records)
    assert s["loss_epochs"] == [1, 2]
    assert s["loss"]["loss"] == [3.0, 1.0]
    assert s["loss"]["ce_global"] == [1.5, 0.5]
    assert s["loss"]["tri_saffm"] == [0.5, 0.1]  # averaged over the records that have it
    assert "lr" not in s["loss"]
    assert s["eval_epochs"] == [2] and s["eval"]["rank1"] == [0.5] and s["eval"]["mAP"] == [0.3]


def test_plots_write_pngs(tmp_path):
    out = plots.plot_cmc({"a": [0.5, 0.7, 0.9], "b": [0.6, 0.8, 0.95]}, tmp_path / "cmc.png")
    img = Image.open(out)
    assert img.size == (600, 400)
    assert len(img.convert("RGB").getcolors(1 << 20)) > 20  # curves, text, not a blank canvas
    run = make_run(tmp_path, evaluated=False)
    png = plots.plot_training(plots.read_log(run / "log.jsonl"), tmp_path / "train.png")
    assert png is not None and Image.open(png).size == (1000, 380)
    assert plots.plot_training([], tmp_path / "none.png") is None
    with pytest.raises(DataError):
        plots.plot_cmc({}, tmp_path / "x.png")


# ---------------------------------------------------------------- ranked lists


def _ranks(topk_index, q_pids, q_cams, g_pids, g_cams):
    topk_index = np.asarray(topk_index)
    return {"query_paths": np.array([f"q{i}" for i in range(len(q_pids))]),
            "gallery_paths": np.array([f"g{i}" for i in range(len(g_pids))]),
            "query_pids": np.asarray(q_pids), "gallery_pids": np.asarray(g_pids),
            "query_camids": np.asarray(q_cams), "gallery_camids": np.asarray(g_cams),
            "topk_index": topk_index, "topk_dist": np.sort(np.random.rand(*topk_index.shape), axis=1)}


def test_match_status_and_scores_by_hand():
    # gallery (pid, cam): 0:(7,0) 1:(8,1) 2:(7,1) 3:(9,1) 4:(7,2); query 0 is (7, cam 0), so
    # gallery 0 is junk (same identity and camera), 2 and 4 are true matches.
    r = _ranks([[0, 2, 1, 4, 3], [2, 4, 0, 1, 3]], q_pids=[7, 5], q_cams=[0, 0],
               g_pids=[7, 8, 7, 9, 7], g_cams=[0, 1, 1, 1, 2])
    status = ranking.match_status(r)
    assert status[0].tolist() == [ranking.JUNK, ranking.TRUE, ranking.FALSE, ranking.TRUE, ranking.FALSE]
    assert (status[1] == ranking.FALSE).all()
    s = ranking.query_scores(r)
    # q0 without junk: [T, F, T, F] -> hits at ranks 1 and 3 of R = 2: AP = (1/1 + 2/3) / 2
    assert s["first_hit"].tolist() == [1, 6]
    assert math.isclose(s["ap_at_k"][0], (1 + 2 / 3) / 2)
    assert math.isnan(s["ap_at_k"][1])  # pid 5 has no true match anywhere: not a valid query
    # partial protocol, no junk rule: [T, T, F, T, F], R = 3
    partial = ranking.query_scores(r, protocol="partial")
    assert math.isclose(partial["ap_at_k"][0], (1 / 1 + 2 / 2 + 3 / 4) / 3)


def test_select_queries_picks_the_worst():
    g_pids, g_cams = [1, 1, 2, 2, 3, 3], [1, 1, 1, 1, 1, 1]
    r = _ranks([[0, 2, 4], [2, 4, 0], [4, 2, 3]], q_pids=[1, 1, 1], q_cams=[0, 0, 0], g_pids=g_pids, g_cams=g_cams)
    assert ranking.select_queries(r, 2, by="ap") == [2, 1]
    assert ranking.select_queries(r, 1, by="first_hit") == [2]
    with pytest.raises(DataError):
        ranking.select_queries(r, 1, by="mINP")


def test_draw_ranked_list_colours_borders(tmp_path):
    run = make_run(tmp_path)
    ranks = ranking.load_ranks(run / "eval_ranks.npz")
    status = ranking.match_status(ranks)
    qi = int(np.argmax((status != ranking.JUNK).sum(1)))
    out = ranking.draw_ranked_list([("a", ranks, qi), ("b", ranks, qi)], tmp_path / "r.png", topk=4)
    img = np.asarray(Image.open(out).convert("RGB"))
    keep = np.flatnonzero(status[qi] != ranking.JUNK)[:4]
    cell = ranking.CELL_W + 2 * ranking.BORDER + 4
    y = 6 + 16 + 1  # margin + label, one pixel into the border
    for rank, j in enumerate(keep):
        x = 6 + cell + 18 + rank * cell + 1
        expected = ranking.GREEN if status[qi, j] == ranking.TRUE else ranking.RED
        assert tuple(img[y, x]) == expected
    assert tuple(img[y, 7]) == ranking.QUERY_BORDER
    assert img.shape[0] == 12 + 2 * (16 + ranking.CELL_H + 2 * ranking.BORDER + 28)


def test_load_ranks_rejects_bad_files(tmp_path):
    bad = tmp_path / "r.npz"
    np.savez(bad, query_paths=np.array(["a"]))
    with pytest.raises(DataError, match="lacks key"):
        ranking.load_ranks(bad)
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="c.npz"):
        ranking.load_ranks(tmp_path / "c.npz")


# ---------------------------------------------------------------- report


def test_report_two_runs_and_an_unevaluated_one(tmp_path):
    a = make_run(tmp_path, "run_a", seed=0)
    b = make_run(tmp_path, "run_b", model="hacnn", seed=1)
    c = make_run(tmp_path, "run_<c>", evaluated=False)
    page = write_report([a, b, c], tmp_path / "report", title="Demo <script>", overlays=0)
    text = page.read_text()
    assert "&lt;script&gt;" in text and "<script>" not in text
    assert "run_&lt;c&gt;" in text and "not been evaluated yet" in text
    assert "<td class=\"val\"><b>60.0</b></td>" in text  # run_b's mAP, the best, in percent
    assert text.count("<tr>") == 3  # header + two evaluated runs
    srcs = [s.split('"')[0] for s in text.split('<img src="')[1:]]
    assert srcs and all((page.parent / s).is_file() for s in srcs)
    assert any("compare_q" in s for s in srcs) and any("cmc.png" in s for s in srcs)
    assert sum("_rank_q" in s for s in srcs) == 6  # three worst queries of each evaluated run
    assert "http://" not in text and "https://" not in text


def test_report_cli(tmp_path):
    a = make_run(tmp_path, "run_a")
    code, out, err = run_cli(["report", str(a), "--out", str(tmp_path / "rep"), "--queries", "0,1",
                              "--overlays", "0", "--json"])
    assert code == 0, err
    assert json.loads(out)["report"].endswith("index.html")
    assert len(list((tmp_path / "rep" / "report_files").glob("*_rank_q*.png"))) == 2
    code, out, err = run_cli(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "rep2")])
    assert_one_line_error(code, err, "nope")
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "rep3")])
    assert_one_line_error(code, err, "not a run folder")
    (tmp_path / "afile").write_text("x")
    code, out, err = run_cli(["report", str(a), "--out", str(tmp_path / "afile")])
    assert_one_line_error(code, err, "afile", "is a file")


def test_partial_protocol_table_uses_r1_r3(tmp_path):
    run = make_run(tmp_path, "partial_run")
    ev = json.loads((run / "eval.json").read_text())
    ev.update({"protocol": "partial", "dataset": "partial_reid", "rank1": 0.423, "rank3": 0.61, "rerank": True})
    (run / "eval.json").write_text(json.dumps(ev))
    text = write_report([run], tmp_path / "rep", overlays=0).read_text()
    assert "<th>R1</th><th>R3</th></tr>" in text and "Rank-5" not in text
    assert '<td class="val">42.3</td><td class="val">61.0</td>' in text and "partial_reid +re-rank" in text
