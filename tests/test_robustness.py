"""Occlusion-robustness report: occluders, per-level evaluation, CLI on the synthetic set."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from attnreid.errors import AttnReidError
from attnreid.robustness.occlusion import (
    OCCLUDER_KINDS,
    POSITIONS,
    QueryOccluder,
    choose_donor,
    draw_plan,
    occlude,
    occlusion_box,
)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The command sets torch's thread count (train.threads); give the rest of the suite its own back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _image(w=64, h=128, value=128):
    return Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8))


def _changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.any(np.asarray(a) != np.asarray(b), axis=2)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("level", [0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("index", range(6))
def test_box_covers_the_level(position, level, index):
    w, h = 64, 128
    x1, y1, x2, y2 = occlusion_box(w, h, level, position, draw_plan(3, index))
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    # Rounding to whole pixels: at most one row plus one column of the image off.
    assert abs((x2 - x1) * (y2 - y1) / (w * h) - level) <= (w + h) / (w * h)
    if position == "top":
        assert y1 == 0
    elif position == "bottom":
        assert y2 == h
    else:
        assert x1 == 0 or x2 == w


def test_level_zero_and_bad_arguments():
    plan = draw_plan(0, 0)
    assert occlusion_box(64, 128, 0.0, "top", plan) == (0, 0, 0, 0)
    img = _image()
    out, cover = occlude(img, 0.0, "block", "top", plan)
    assert cover == 0.0 and np.array_equal(np.asarray(out), np.asarray(img))
    with pytest.raises(AttnReidError, match=r"level 1.5 is outside \[0, 1\]"):
        occlusion_box(64, 128, 1.5, "top", plan)
    with pytest.raises(AttnReidError, match="position 'middle' is unknown"):
        occlusion_box(64, 128, 0.2, "middle", plan)
    with pytest.raises(AttnReidError, match="kind 'car' is unknown"):
        occlude(img, 0.2, "car", "top", plan)
    with pytest.raises(AttnReidError, match="needs a donor"):
        occlude(img, 0.2, "person", "top", plan)


@pytest.mark.parametrize("kind", OCCLUDER_KINDS)
@pytest.mark.parametrize("position", POSITIONS)
def test_occluder_changes_exactly_its_box(kind, position):
    img = _image(value=128)
    donor = Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 64, 3), dtype=np.uint8))
    for index in range(4):
        plan = draw_plan(7, index)
        out, cover = occlude(img, 0.3, kind, position, plan, donor=donor)
        x1, y1, x2, y2 = occlusion_box(64, 128, 0.3, position, plan)
        assert cover == pytest.approx((x2 - x1) * (y2 - y1) / (64 * 128))
        changed = _changed(out, img)
        outside = changed.copy()
        outside[y1:y2, x1:x2] = False
        assert not outside.any(), "pixels outside the occluder changed"
        # Inside, (nearly) every pixel is replaced: a solid block of exactly the
        # image's grey is the only way to leave it untouched, and the colours are random.
        assert changed[y1:y2, x1:x2].mean() > 0.9 or (kind == "block" and not plan.textured)


def test_deterministic_per_seed_and_index():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 64, 3), dtype=np.uint8))
    for kind in ("block", "erasing"):
        a, _ = QueryOccluder(0.3, kind, "side", seed=5)(img, index=2, pid=1)
        b, _ = QueryOccluder(0.3, kind, "side", seed=5)(img, index=2, pid=1)
        c, _ = QueryOccluder(0.3, kind, "side", seed=6)(img, index=2, pid=1)
        d, _ = QueryOccluder(0.3, kind, "side", seed=5)(img, index=3, pid=1)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(c))
        assert not np.array_equal(np.asarray(a), np.asarray(d))


def test_same_plan_across_levels_nests_the_bands():
    """The random draws do not depend on the level: a higher level grows the same band."""
    for position in POSITIONS:
        for index in range(10):
            plan = draw_plan(0, index)
            boxes = [occlusion_box(64, 128, lv, position, plan) for lv in (0.1, 0.2, 0.3, 0.4, 0.5)]
            areas = [(x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in boxes]
            assert areas == sorted(areas) and areas[0] < areas[-1]
            if position == "top":
                assert all(b[1] == 0 and b[0] == boxes[0][0] for b in boxes)


def test_person_occluder_uses_another_identity():
    donors = [("a.jpg", 1), ("b.jpg", 1), ("c.jpg", 2), ("junk.jpg", -1), ("d.jpg", 3), ("bg.jpg", 0)]
    for index in range(20):
        path = choose_donor(draw_plan(0, index), 1, donors)
        assert path in ("c.jpg", "d.jpg")
    assert choose_donor(draw_plan(0, 0), 1, [("a.jpg", 1), ("bg.jpg", 0)]) == "bg.jpg"
    with pytest.raises(AttnReidError, match="other than 1"):
        choose_donor(draw_plan(0, 0), 1, [("a.jpg", 1), ("junk.jpg", -1)])

    colours = {"c.jpg": 10, "d.jpg": 250}
    donors = donors[:-1]
    read = []

    def reader(path):
        read.append(path)
        return _image(value=colours[path])

    occ = QueryOccluder(0.5, "person", "bottom", seed=0, donors=donors, read_image=reader)
    img = _image(value=128)
    out, cover = occ(img, index=0, pid=1)
    x1, y1, x2, y2 = occlusion_box(64, 128, 0.5, "bottom", draw_plan(0, 0))
    donor_value = colours[choose_donor(draw_plan(0, 0), 1, donors)]
    assert np.all(np.asarray(out)[y1:y2, x1:x2] == donor_value)
    assert cover == pytest.approx(0.5, abs=0.02)
    occ(img, index=0, pid=1)
    assert len(read) == 1, "a donor is read once and cached"


def test_block_textures_and_solids_both_occur():
    plans = [draw_plan(0, i) for i in range(40)]
    assert any(p.textured for p in plans) and any(not p.textured for p in plans)
    textured = next(p for p in plans if p.textured)
    out, _ = occlude(_image(), 0.5, "block", "top", textured)
    x1, y1, x2, y2 = occlusion_box(64, 128, 0.5, "top", textured)
    patch = np.asarray(out)[y1:y2, x1:x2].reshape(-1, 3)
    assert len(np.unique(patch, axis=0)) == 2 or textured.colors[0] == textured.colors[1]


# --- report: per-level evaluation with stand-in features (no model needed) ---------------

import json
from pathlib import Path
from types import SimpleNamespace

from attnreid.robustness.report import (
    Condition,
    ModelUnderTest,
    build_conditions,
    build_report,
    evaluate_robustness,
    parse_levels,
    parse_names,
    report_tables,
    summarize,
    write_report,
)


def _toy_dataset(root: Path, num_ids=6, per_id=3):
    """Each identity a distinct colour pattern (top/bottom halves), slightly varied per image."""
    rng = np.random.default_rng(0)
    query, gallery = [], []
    for pid in range(1, num_ids + 1):
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        for k in range(per_id):
            arr = np.zeros((32, 16, 3), np.int16)
            arr[:16], arr[16:] = top, bottom
            arr = np.clip(arr + rng.integers(-8, 9, arr.shape), 0, 255).astype(np.uint8)
            path = root / f"{pid:04d}_c{k + 1}_{k}.png"
            Image.fromarray(arr).save(path)
            (query if k == 0 else gallery).append((str(path), pid, k + 1))
    return SimpleNamespace(name="toy", protocol="market", query=query, gallery=gallery)


class _Calls:
    def __init__(self):
        self.calls = []

    def extract(self, model, items, data_cfg, device="cpu", flip=False):
        import torch

        self.calls.append(len(items))
        feats = [np.asarray(Image.open(p).convert("RGB").resize((4, 8)), np.float32).ravel() for p, _, _ in items]
        return (torch.tensor(np.stack(feats)), np.array([i[1] for i in items]), np.array([i[2] for i in items]))


def _nn_evaluate(qf, gf, qp, gp, qc, gc, **kw):
    d = ((np.asarray(qf)[:, None] - np.asarray(gf)[None]) ** 2).sum(-1)
    hits = gp[d.argmin(1)] == qp
    return {"rank1": float(hits.mean()), "mAP": float(hits.mean()), "num_valid_queries": len(qp)}


def test_parsers_name_the_option():
    assert parse_levels("0,0.1, 20%,10%") == [0.0, 0.1, 0.2]
    for bad, needle in (("0,x", "'x' is not a number"), ("0,120%", "outside 0%..100%"), ("0,10", "ambiguous"),
                        (",", "at least one")):
        with pytest.raises(AttnReidError, match=needle) as info:
            parse_levels(bad)
        assert "--levels" in str(info.value)
    assert parse_names("person,block,person", OCCLUDER_KINDS, "--kinds") == ["person", "block"]
    with pytest.raises(AttnReidError, match="--positions: 'middle' is unknown"):
        parse_names("top,middle", POSITIONS, "--positions")
    conds = build_conditions([0.0, 0.2], ["block", "erasing"], ["top", "side"])
    assert conds[0] == Condition(0.0) and len(conds) == 5


def test_evaluate_robustness_gallery_once_and_accuracy_falls(tmp_path):
    ds = _toy_dataset(tmp_path)
    calls = _Calls()
    models = [ModelUnderTest("toy/a", "a.pth", None, SimpleNamespace(test_batch_size=4), "fake")]
    levels = [0.0, 0.3, 0.6]
    conds = build_conditions(levels, ["block", "person"], ["top"])
    eval_cfg = SimpleNamespace(metric="euclidean_sq", rerank=False, k1=20, k2=6, lambda_value=0.3, flip=False)
    kw = dict(seed=1, extract=calls.extract, evaluate=_nn_evaluate,
              read_image=lambda p: Image.open(p).convert("RGB"))
    rows = evaluate_robustness(models, ds, eval_cfg, conds, **kw)["toy/a"]
    # The gallery once, then one query extraction per condition.
    assert calls.calls == [len(ds.gallery)] + [len(ds.query)] * len(conds)
    assert [r["level"] for r in rows] == [0, 30, 30, 60, 60]
    assert rows[0]["rank1"] == 1.0 and rows[0]["coverage"] == 0
    assert all(abs(r["coverage"] - r["level"]) < 5 for r in rows)
    per_level = summarize(rows)
    assert [e["level"] for e in per_level] == [0, 30, 60]
    assert per_level[2]["rank1"] < per_level[0]["rank1"]
    assert per_level[1]["rank1"] == pytest.approx(np.mean([rows[1]["rank1"], rows[2]["rank1"]]))
    # Deterministic for a seed.
    again = evaluate_robustness(models, ds, eval_cfg, conds, **{**kw, "extract": _Calls().extract})["toy/a"]
    assert again == rows

    report = build_report(models, {"toy/a": rows}, ds, levels, ["block", "person"], ["top"], seed=1)
    json_path, png_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text())["models"][0]["per_level"] == json.loads(json.dumps(per_level))
    with Image.open(png_path) as im:
        assert im.format == "PNG" and im.size[0] > 300
    from rich.console import Console

    console = Console(record=True, width=200)
    for t in report_tables(report):
        console.print(t)
    text = console.export_text()
    assert "60%" in text and "block / top" in text and "person / top" in text


def _rows(level_hits: dict, valid=None) -> list:
    """Rows of one model: ``{level: [per-condition rank-1 hits]}``, AP equal to the hits."""
    rows = []
    for level, conditions in level_hits.items():
        for hits in conditions:
            h = np.asarray(hits, np.float64)
            pq = {"rank1": h, "ap": h, "valid": np.ones(len(h), bool) if valid is None else np.asarray(valid)}
            rows.append({"level": level, "kind": "block", "position": "top", "coverage": level,
                         "rank1": float(h[pq["valid"]].mean()), "mAP": float(h[pq["valid"]].mean()), "per_query": pq})
    return rows


def test_each_model_settles_its_backend_once_on_the_gallery(tmp_path, monkeypatch):
    """The engine path: auto's backend / precision choice (and an ONNX export) happen once per
    model, for the size of `attnreid eval`'s job, and every occluded query set reuses it."""
    import attnreid.inference.extract as extract_module

    ds = _toy_dataset(tmp_path)
    calls = []

    def fake(model, items, data_cfg, device="cpu", flip=False, channels_last=False, amp="auto", backend="auto",
             num_images=None):
        calls.append((model, len(items), amp, backend, num_images))
        feats, pids, camids = _Calls().extract(model, items, data_cfg)
        return feats, pids, camids, np.arange(len(items)), f"settled:{model}"

    monkeypatch.setattr(extract_module, "extract_with_precision", fake)
    models = [ModelUnderTest(f"toy/{n}", f"{n}.pth", n, SimpleNamespace(), "fake") for n in "ab"]
    eval_cfg = SimpleNamespace(metric="euclidean_sq", rerank=False, k1=20, k2=6, lambda_value=0.3, flip=False,
                               amp="off", backend="onnxruntime")
    conds = build_conditions([0.0, 0.5], ["block"], ["top"])
    evaluate_robustness(models, ds, eval_cfg, conds, evaluate=_nn_evaluate,
                        read_image=lambda p: Image.open(p).convert("RGB"))
    job = len(ds.gallery) + len(ds.query)
    for n in "ab":
        mine = [c for c in calls if c[0] == n]
        assert [c[1] for c in mine] == [len(ds.gallery)] + [len(ds.query)] * len(conds)
        assert [c[2] for c in mine] == ["off"] + [f"settled:{n}"] * len(conds)
        assert {(c[3], c[4]) for c in mine} == {("onnxruntime", job)}


def test_level_scores_and_paired_levels_by_hand():
    from attnreid.robustness.report import level_scores, paired_levels

    # A keeps its clean hits better than B: per query, mean over the two conditions of level 30.
    a = _rows({0: [[1, 1, 1, 1]], 30: [[1, 0, 1, 1], [1, 1, 0, 1]]})
    b = _rows({0: [[1, 1, 1, 0]], 30: [[0, 0, 1, 0], [0, 1, 0, 0]]})
    sa = level_scores(a)
    assert sa[30]["rank1"].tolist() == [1.0, 0.5, 0.5, 1.0]
    assert sa[30]["rank1"].mean() == pytest.approx(summarize(a)[1]["rank1"])
    lv0, lv30 = paired_levels(a, b)
    assert lv0["rank1"]["diff"] == pytest.approx(0.25) and "rank1_drop" not in lv0
    assert lv30["rank1"]["diff"] == pytest.approx(0.5)
    assert (lv30["rank1"]["n_a_better"], lv30["rank1"]["n_b_better"]) == (2, 0)
    # Drops: A loses [0, .5, .5, 0], B loses [1, .5, .5, 0]; A minus B = [-1, 0, 0, 0].
    drop = lv30["rank1_drop"]
    assert drop["diff"] == pytest.approx(-0.25) and (drop["n_a_better"], drop["n_b_better"]) == (0, 1)
    assert drop["p"] == 1.0 and -1.0 <= drop["ci"][0] <= drop["diff"] <= drop["ci"][1] <= 0.0
    # The interval of a level's score brackets it and stays within the per-query range.
    e = summarize(b)[1]
    assert 0.0 <= e["rank1_ci"][0] <= e["rank1"] <= e["rank1_ci"][1] <= 0.5
    # A query invalid in one condition leaves every condition of the level (same gallery).
    c = _rows({0: [[1, 1, 0]], 30: [[1, 0, 0], [0, 0, 0]]}, valid=[True, True, False])
    assert level_scores(c)[30]["rank1"].tolist() == [0.5, 0.0]
    with pytest.raises(AttnReidError, match="one length"):
        paired_levels(a, c)  # other queries: no pairing


def test_report_keeps_per_query_results_out_of_the_json_and_compares_models(tmp_path):
    ds = _toy_dataset(tmp_path)

    def per_query_eval(qf, gf, qp, gp, qc, gc, per_query=False, **kw):
        d = ((np.asarray(qf)[:, None] - np.asarray(gf)[None]) ** 2).sum(-1)
        hits = (gp[d.argmin(1)] == qp).astype(np.float64)
        out = {"rank1": float(hits.mean()), "mAP": float(hits.mean()), "num_valid_queries": len(qp)}
        if per_query:
            out["per_query"] = {"rank1": hits, "ap": hits, "valid": np.ones(len(hits), bool), "inp": hits}
        return out

    models = [ModelUnderTest(f"toy/{n}", f"{n}.pth", None, SimpleNamespace(test_batch_size=4), "fake") for n in "ab"]
    conds = build_conditions([0.0, 0.6], ["block"], ["top", "bottom"])
    eval_cfg = SimpleNamespace(metric="euclidean_sq", rerank=False, k1=20, k2=6, lambda_value=0.3, flip=False)
    rows = evaluate_robustness(models, ds, eval_cfg, conds, seed=1, extract=_Calls().extract,
                               evaluate=per_query_eval, read_image=lambda p: Image.open(p).convert("RGB"))
    assert set(rows["toy/a"][0]["per_query"]) == {"rank1", "ap", "valid"}
    report = build_report(models, rows, ds, [0.0, 0.6], ["block"], ["top", "bottom"], seed=1)
    json_path, _ = write_report(report, tmp_path / "out")
    saved = json.loads(json_path.read_text())
    assert all("per_query" not in r for m in saved["models"] for r in m["conditions"])
    assert "rank1_ci" in saved["models"][0]["per_level"][1]
    # The same features for both models: every paired difference is exactly 0.
    pair = saved["paired"][0]
    assert (pair["a"], pair["b"]) == ("toy/b", "toy/a")
    assert [lv["rank1"]["diff"] for lv in pair["levels"]] == [0.0, 0.0]
    assert pair["levels"][1]["rank1_drop"]["ci"] == [0.0, 0.0]
    from rich.console import Console

    console = Console(record=True, width=250)
    for t in report_tables(report):
        console.print(t)
    assert "toy/b minus toy/a" in console.export_text()


# --- end to end: the command on the synthetic set with real (tiny) models -----------------

import yaml

from helpers import assert_one_line_error, run_cli

TINY = {
    "data": {"height": 64, "width": 32, "batch_size": 8, "num_instances": 2, "test_batch_size": 64, "workers": 0},
    "model": {"name": "baseline", "backbone": {"name": "resnet18", "last_stride": 2}},
    "train": {"device": "cpu", "threads": 1},
}


def _tiny_checkpoints(tmp_path: Path, data: dict, n: int):
    import torch

    from attnreid.config import from_dict, to_dict
    from attnreid.engine.checkpoint import save_checkpoint
    from attnreid.models import build_model

    cfg = from_dict({**TINY, "data": {**TINY["data"], **data}})
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        model = build_model(cfg.model, 5)
        path = tmp_path / f"run{i}" / "checkpoints" / "last.pth"
        save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(cfg), "num_classes": 5,
                               "epoch": 1, "step": 1, "metrics": {}})
        paths.append(path)
    return cfg, paths


def test_cli_on_synthetic_set_two_models(synthetic_root, tmp_path):
    data = {"dataset": "market1501", "root": str(synthetic_root)}
    cfg, (a, b) = _tiny_checkpoints(tmp_path, data, 2)
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(yaml.safe_dump({"data": {**data, "workers": 0}, "train": {"device": "cpu", "threads": 1}}))
    out = tmp_path / "out"
    args = ["robustness", cfg_path, "--checkpoint", a, b, "--levels", "0,0.2,40%", "--kinds", "block,person",
            "--positions", "top,side", "--seed", "3", "--out", out]
    code, text, err = run_cli(args)
    assert code == 0, err
    assert "40%" in text and "person / side" in text and "rank-1" in text and "robustness.png" in text
    with Image.open(out / "robustness.png") as im:
        assert im.format == "PNG"
    first = json.loads((out / "robustness.json").read_text())

    code, stdout, err = run_cli(args + ["--json"])
    assert code == 0, err
    report = json.loads(stdout)
    assert report["models"] == first["models"], "not deterministic for a seed"
    assert [m["label"] for m in report["models"]] == ["run0/last", "run1/last"]
    assert report["levels"] == [0, 20, 40] and report["kinds"] == ["block", "person"]
    for m in report["models"]:
        assert len(m["conditions"]) == 1 + 2 * 2 * 2
        assert [e["level"] for e in m["per_level"]] == [0, 20, 40]
        assert all(0.0 <= r["rank1"] <= 1.0 and 0.0 <= r["mAP"] <= 1.0 for r in m["conditions"])
        assert all(abs(r["coverage"] - r["level"]) < 3 for r in m["conditions"])

    # Level 0 is exactly what `attnreid eval` measures.
    from attnreid.data.datasets import build_dataset
    from attnreid.engine.build import load_model
    from attnreid.engine.evaluator import evaluate_model

    model, ckpt_cfg = load_model(a)
    clean = evaluate_model(model, build_dataset("market1501", str(synthetic_root)), ckpt_cfg)
    assert report["models"][0]["per_level"][0]["rank1"] == pytest.approx(clean["rank1"])
    assert report["models"][0]["per_level"][0]["mAP"] == pytest.approx(clean["mAP"])


def test_cli_generates_a_synthetic_set_by_name(tmp_path):
    data = {"dataset": "market1501", "root": str(tmp_path)}
    _, (ckpt,) = _tiny_checkpoints(tmp_path, data, 1)
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(yaml.safe_dump({"data": {"workers": 0, "synthetic": {
        "num_ids": 6, "images_per_id": 4, "num_cameras": 2, "height": 64, "width": 32}},
        "train": {"device": "cpu", "threads": 1}}))
    code, stdout, err = run_cli(["robustness", cfg_path, "--checkpoint", ckpt, "--dataset", "synthetic",
                                 "--root", tmp_path / "syn", "--levels", "0,0.3", "--kinds", "erasing",
                                 "--positions", "bottom", "--json"])
    assert code == 0, err
    report = json.loads(stdout)
    assert report["num_query"] > 0 and len(report["models"][0]["conditions"]) == 2
    # Default output folder: RUN/robustness next to RUN/checkpoints.
    assert (tmp_path / "run0" / "robustness" / "robustness.json").is_file()


def test_cli_needs_a_checkpoint(tmp_path):
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text("train:\n  device: cpu\n")
    code, _, err = run_cli(["robustness", cfg_path])
    assert_one_line_error(code, err, "--checkpoint")


def test_partial_protocol_without_map(tmp_path):
    """Partial-REID / Partial-iLIDS report rank-1 and rank-3 only: table, plot and log cope."""
    ds = _toy_dataset(tmp_path)
    ds.protocol = "partial"
    models = [ModelUnderTest("toy/a", "a.pth", None, SimpleNamespace(), "fake")]

    def partial_eval(*args, **kw):
        r = _nn_evaluate(*args, **kw)
        return {"rank1": r["rank1"], "rank3": r["rank1"]}

    lines = []
    rows = evaluate_robustness(models, ds, SimpleNamespace(metric="euclidean_sq", rerank=False, k1=1, k2=1,
                                                           lambda_value=0.3), build_conditions([0.0, 0.5], ["block", "erasing"], ["top"]),
                               extract=_Calls().extract, evaluate=partial_eval, log=lines.append,
                               read_image=lambda p: Image.open(p).convert("RGB"))
    report = build_report(models, rows, ds, [0.0, 0.5], ["block", "erasing"], ["top"], seed=0)
    assert "rank3" in report["models"][0]["per_level"][1] and "mAP" not in report["models"][0]["per_level"][1]
    assert len(lines) == 3 and "mAP" not in lines[0]
    json_path, png_path = write_report(report, tmp_path / "out")
    assert png_path.is_file()
    from rich.console import Console

    console = Console(record=True, width=200)
    for t in report_tables(report):
        console.print(t)
    assert "block / top" in console.export_text()
