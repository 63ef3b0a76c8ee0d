"""Your own data: ``data.dataset: folder`` and ``list``, the protocol without cameras, ``data check``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import assert_one_line_error, run_cli
from test_train_cli import TINY

from attnreid.data.check import check_dataset
from attnreid.data.datasets import build_dataset
from attnreid.data.splits import hold_out_validation
from attnreid.errors import DataError
from attnreid.evaluation.protocols import evaluate


def image(path: Path, seed: int, size=(32, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path)
    return path


def crops_from_synthetic(market: Path, out: Path) -> Path:
    """The synthetic set re-laid out as a user would: one folder per person, no camera ids in the names."""
    for split, folder in (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test")):
        for f in sorted((market / folder).glob("*.jpg")):
            pid, _, frame = f.name.split("_")[:3]
            (out / split / pid).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, out / split / pid / f"frame{frame}.jpg")
    return out


# -- folder ----------------------------------------------------------------------------

def test_folder_reads_market_names_like_the_market_loader(synthetic_root):
    """Market-style names under Market's folder names: the same images, identities and protocol."""
    market = build_dataset("market1501", synthetic_root)
    folder = build_dataset("folder", Path(synthetic_root) / "market1501")
    assert folder.cameras_known
    for split in ("train", "query", "gallery"):
        a, b = getattr(market, split), getattr(folder, split)
        assert [(p, pid) for p, pid, _ in a] == [(p, pid) for p, pid, _ in b]
        assert [c + 1 for _, _, c in a] == [c for _, _, c in b]  # cameras as written (Market's are 0-based)


def test_per_person_folders_without_cameras(synthetic_root, tmp_path):
    root = crops_from_synthetic(Path(synthetic_root) / "market1501", tmp_path / "crops")
    ds = build_dataset("folder", root)
    market = build_dataset("market1501", synthetic_root)
    assert not ds.cameras_known and ds.stats()["query"]["cams"] is None
    assert [pid for _, pid, _ in ds.gallery] == [pid for _, pid, _ in market.gallery]
    # one pseudo-camera per file, numbered over every split
    cams = [c for split in ("train", "query", "gallery") for _, _, c in getattr(ds, split)]
    assert len(set(cams)) == len(cams)
    assert ds.train_source_pids == market.train_source_pids == [1, 2, 3, 4, 5]  # the folders' names


def test_names_in_per_person_folders(tmp_path):
    root = tmp_path / "d"
    image(root / "train" / "0007" / "c2_000123.jpg", 1)  # camera at the start of the name
    image(root / "train" / "0007" / "0007_c1s1_000001_00.jpg", 2)  # Market name, same identity
    image(root / "train" / "0009" / "000123_c3.jpg", 3)  # a number that is not the folder's: refused
    with pytest.raises(DataError, match="identity 123 but the folder says 9: .*000123_c3.jpg"):
        build_dataset("folder", root)
    (root / "train" / "0009" / "000123_c3.jpg").rename(root / "train" / "0009" / "c3_000123.jpg")
    ds = build_dataset("folder", root)
    assert sorted((Path(p).name, ds.train_source_pids[pid], c) for p, pid, c in ds.train) == [
        ("0007_c1s1_000001_00.jpg", 7, 1), ("c2_000123.jpg", 7, 2), ("c3_000123.jpg", 9, 3)]


def test_folder_bad_input_is_one_line(tmp_path):
    root = tmp_path / "d"
    image(root / "train" / "0001_c1_a.jpg", 1)
    image(root / "train" / "0002_b.jpg", 2)  # no camera while another image has one
    code, _, err = run_cli(["data", "stats", "folder", "--root", root])
    assert_one_line_error(code, err, "some images have a camera id", "0001_c1_a.jpg", "0002_b.jpg")
    (root / "train" / "0002_b.jpg").unlink()
    image(root / "train" / "holiday.jpg", 3)
    code, _, err = run_cli(["data", "stats", "folder", "--root", root])
    assert_one_line_error(code, err, "holiday.jpg", "cannot parse the identity")
    code, out, err = run_cli(["data", "stats", "folder", "--root", root, "--skip-bad-images", "--json"])
    assert code == 0 and json.loads(out)["train"]["images"] == 1 and "skipped: " in err
    image(root / "query" / "0001_c2_q.jpg", 4)
    code, _, err = run_cli(["data", "stats", "folder", "--root", root, "--skip-bad-images"])
    assert_one_line_error(code, err, "gallery", "query/ and gallery/ go together")
    code, _, err = run_cli(["data", "stats", "folder", "--root", tmp_path / "empty_dir_missing"])
    assert_one_line_error(code, err, "empty_dir_missing")


# -- list ------------------------------------------------------------------------------

def write_list(path: Path, rows, header="path,pid,camid,split", sep=",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header.replace(",", sep)] + [sep.join(map(str, r)) for r in rows]) + "\n")
    return path


def test_list_csv_and_tsv(tmp_path):
    for i in range(4):
        image(tmp_path / "imgs" / f"{i}.png", i)
    rows = [("imgs/0.png", 5, "", "train"), ("imgs/1.png", 6, "", "train"), ("imgs/2.png", 5, "", "query"),
            (str(tmp_path / "imgs" / "3.png"), 5, "", "gallery"), ("imgs/1.png", -1, "", "gallery")]
    for name, sep in (("l.csv", ","), ("l.tsv", "\t")):
        ds = build_dataset("list", str(write_list(tmp_path / name, rows, sep=sep)))
        assert not ds.cameras_known and ds.train_source_pids == [5, 6]
        assert [Path(p).name for p, _, _ in ds.gallery] == ["3.png"]  # the -1 line is junk
        assert ds.query[0][0] == str(tmp_path / "imgs" / "2.png")  # relative to the list's folder
    ds = build_dataset("list", str(write_list(tmp_path / "c.csv", [r[:2] + (3 + i,) + r[3:] for i, r in enumerate(rows)],
                                              header="split,camid,pid,path,extra".replace("split,camid,pid,path,extra",
                                                                                          "path,pid,camid,split"))))
    assert ds.cameras_known and [c for _, _, c in ds.train] == [3, 4]


@pytest.mark.parametrize("header,row,needles", [
    ("path,pid,split", ("imgs/0.png", 1, "train"), ["line 1", "missing column(s) camid"]),
    ("path,pid,camid,split", ("imgs/0.png", "bob", "", "train"), ["line 2", "pid 'bob' is not an integer"]),
    ("path,pid,camid,split", ("imgs/0.png", 1, "x", "train"), ["line 2", "camid 'x' is not an integer"]),
    ("path,pid,camid,split", ("imgs/0.png", 1, "", "test"), ["line 2", "split 'test' is not one of"]),
    ("path,pid,camid,split", ("imgs/nope.png", 1, "", "train"), ["line 2", "image not found", "nope.png"]),
])
def test_list_bad_input_is_one_line(tmp_path, header, row, needles):
    image(tmp_path / "imgs" / "0.png", 0)
    lst = write_list(tmp_path / "bad.csv", [row], header=header)
    code, _, err = run_cli(["data", "stats", "list", "--root", lst])
    assert_one_line_error(code, err, str(lst), *needles)


def test_list_mixed_cameras_and_skipped_missing_files(tmp_path):
    image(tmp_path / "a.png", 0)
    lst = write_list(tmp_path / "m.csv", [("a.png", 1, 2, "train"), ("a.png", 2, "", "train")])
    code, _, err = run_cli(["data", "stats", "list", "--root", lst])
    assert_one_line_error(code, err, "line 3", "camid is empty but line 2 has one")
    lst = write_list(tmp_path / "s.csv", [("a.png", 1, "", "train"), ("gone.png", 2, "", "train")])
    code, out, err = run_cli(["data", "stats", "list", "--root", lst, "--skip-bad-images", "--json"])
    assert code == 0 and json.loads(out)["train"]["images"] == 1
    assert "line 3: image not found" in err
    code, _, err = run_cli(["data", "stats", "list", "--root", tmp_path / "a.png"])
    assert_one_line_error(code, err, "must be a .csv or .tsv")


# -- the protocol without cameras ------------------------------------------------------

def test_a_query_never_matches_its_own_file_but_same_camera_matches_count(tmp_path):
    """q is listed as a query and in the gallery. Its copy is nearest but left out; the other
    image of its identity is a match although (unknown to us) it may be from the same camera."""
    for name in ("q", "g1", "g2"):
        image(tmp_path / f"{name}.png", hash(name) % 100)
    lst = write_list(tmp_path / "l.csv", [("q.png", 1, "", "query"), ("q.png", 1, "", "gallery"),
                                          ("g1.png", 1, "", "gallery"), ("g2.png", 2, "", "gallery")])
    ds = build_dataset("list", str(lst))
    (_, qp, qc), = ds.query
    gp = [pid for _, pid, _ in ds.gallery]
    gc = [c for _, _, c in ds.gallery]
    assert gc[0] == qc and len({qc, gc[1], gc[2]}) == 3  # the same file has the same pseudo-camera
    qf = np.zeros((1, 2), np.float32)
    gf = np.array([[0, 0], [3, 0], [2, 0]], np.float32)  # own copy, then g2 (a stranger), then g1
    res = evaluate(qf, gf, [qp], gp, [qc], gc)
    assert res["rank1"] == 0.0 and res["cmc"][1] == 1.0 and res["num_valid_queries"] == 1
    gf[1] = [1, 0]  # g1 nearest: a match at rank 1
    assert evaluate(qf, gf, [qp], gp, [qc], gc)["rank1"] == 1.0


def test_validation_split_without_cameras(synthetic_root, tmp_path):
    ds = build_dataset("folder", crops_from_synthetic(Path(synthetic_root) / "market1501", tmp_path / "c"))
    train, val = hold_out_validation(ds, 2)
    assert not val.cameras_known and len({pid for _, pid, _ in val.query}) == len(val.query) == 2
    assert {pid for _, pid, _ in val.gallery} == {pid for _, pid, _ in val.query}
    assert train.num_train_pids == ds.num_train_pids - 2
    kept = {train.train_source_pids[pid] for _, pid, _ in train.train}
    assert kept < set(ds.train_source_pids) and len(kept) == ds.num_train_pids - 2


# -- data check ------------------------------------------------------------------------

def test_data_check_counts(tmp_path):
    root = tmp_path / "d"
    a = image(root / "train" / "0001" / "a.jpg", 1)
    image(root / "train" / "0001" / "b.jpg", 2)
    image(root / "train" / "0002" / "a.jpg", 3)  # a single-image identity
    image(root / "train" / "0003" / "tiny.jpg", 4, size=(20, 10))  # tiny, single image
    image(root / "query" / "0003" / "q.jpg", 5)  # id 3 is also a training id; no gallery image of it
    image(root / "query" / "0004" / "q.jpg", 6)
    image(root / "gallery" / "0004" / "g.jpg", 7)
    shutil.copy(a, root / "gallery" / "0004" / "copy.jpg")  # a leak, and a copy under another identity
    (root / "gallery" / "0004" / "broken.jpg").write_bytes(b"not a jpeg")
    report = check_dataset(build_dataset("folder", root))
    counts = {k: c["count"] for k, c in report["checks"].items()}
    assert counts == {"unreadable": 1, "tiny": 1, "duplicates": 1, "single_image_ids": 2,
                      "single_camera_ids": None, "query_without_match": 1, "train_test_overlap": 1}
    assert report["checks"]["duplicates"]["status"] == "error" and report["status"] == "error"
    assert report["checks"]["train_test_overlap"]["examples"] == [3]
    assert report["checks"]["single_image_ids"]["examples"] == [2, 3]
    code, out, err = run_cli(["data", "check", root, "--json"])
    assert code == 0, err
    assert {k: c["count"] for k, c in json.loads(out)["checks"].items()} == counts
    code, out, err = run_cli(["data", "check", root])
    assert code == 0 and "duplicates" in out and "overall: error" in out


def test_data_check_cameras(synthetic_root):
    """The synthetic set is clean: every query has a cross-camera match, no overlap, no copies."""
    report = check_dataset(build_dataset("market1501", synthetic_root))
    assert report["status"] in ("ok", "warn") and report["cameras_known"]
    for key in ("unreadable", "tiny", "duplicates", "query_without_match", "train_test_overlap"):
        assert report["checks"][key]["count"] == 0, key


# -- one command each: check, train, evaluate a folder of crops without cameras --------

def test_crops_without_cameras_check_train_evaluate(synthetic_root, tmp_path):
    root = crops_from_synthetic(Path(synthetic_root) / "market1501", tmp_path / "crops")
    code, out, err = run_cli(["data", "check", root])
    assert code == 0 and "cameras unknown" in out, err
    config = tmp_path / "own.yaml"
    # float32 throughout: eval, extract and metrics must see the same features, whatever bf16 kernels the CPU has
    config.write_text(yaml.safe_dump(dict(TINY, data=dict(TINY["data"], dataset="folder", root=str(root), val_ids=1),
                                          train=dict(TINY.get("train", {}), amp="off"),
                                          eval=dict(TINY.get("eval", {}), amp="off"))))
    code, out, err = run_cli(["train", config, "--out", tmp_path / "run"])
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: dataset")]
    assert len(warnings) == 1 and "not comparable with the benchmarks'" in warnings[0]
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["dataset"] == "folder" and saved["cameras_known"] is False and saved["num_skipped_queries"] == 0
    from attnreid.data.datasets import base

    base._warned_cameras.clear()  # once per process: the CLI runs in this one
    best = tmp_path / "run" / "checkpoints" / "best.pth"
    code, out, err = run_cli(["eval", config, "--checkpoint", best, "--json"])
    assert code == 0 and json.loads(out)["num_valid_queries"] == saved["num_query"], err
    assert "not comparable" in err
    folder_metrics = json.loads(out)

    # the same crops as a list file (camid empty), evaluated as a second data set: the same numbers
    rows = [(str(Path(p).relative_to(root)), pid, "", split) for split in ("query", "gallery")
            for p, pid, _ in getattr(build_dataset("folder", root), split)]
    lst = write_list(root / "crops.tsv", rows, sep="\t")
    code, out, err = run_cli(["eval", config, "eval.dataset=list", f"eval.root={lst}", "--checkpoint", best, "--json"])
    assert code == 0, err
    as_list = json.loads(out)
    assert as_list["dataset"] == "list" and as_list["mAP"] == pytest.approx(folder_metrics["mAP"], abs=1e-6)

    # extract keeps the pseudo-cameras, so `attnreid metrics` scores the file like eval
    code, _, err = run_cli(["extract", config, "--checkpoint", best, "--split", "query", "--split", "gallery",
                            "--out", tmp_path / "f.npz"])
    assert code == 0, err
    code, out, err = run_cli(["metrics", tmp_path / "f.npz", "--json"])
    assert code == 0 and json.loads(out)["mAP"] == pytest.approx(folder_metrics["mAP"], abs=1e-4), err

    # robustness runs on it too
    code, out, err = run_cli(["robustness", config, "--checkpoint", best, "--levels", "0,30%", "--kinds", "block",
                              "--positions", "top", "--out", tmp_path / "rob", "--json"])
    assert code == 0, err

    # and calibrate, on the validation split and on a named set (here the list of the test people)
    code, out, err = run_cli(["calibrate", config, "data.val_ids=2", "--checkpoint", best, "--resamples", 20,
                              "--json", "--out", tmp_path / "val_cal.json"])
    assert code == 0, err
    assert json.loads(out)["data"]["positive_rule"] == "same identity, different file (no camera ids)"
    code, out, err = run_cli(["calibrate", config, "--checkpoint", best, "--dataset", "list", "--root", lst,
                              "--resamples", 20, "--json", "--out", tmp_path / "list_cal.json"])
    assert code == 0, err
    cal = json.loads(out)
    assert cal["data"]["split"] == "query+gallery" and cal["images"] == len(rows)
