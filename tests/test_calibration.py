"""`attnreid calibrate`, `index build` with a calibration, `search --fpr`, `FeatureExtractor.verify`.

The central test: people the model never saw and who are not in the gallery ("unknown")
must be told "no match" at the rate the calibration promised. Why it holds by design and
not by luck (docs/deployment.md, "Same person or unknown"):

- the synthetic set's identities are independent draws of one generator (clean set: no
  occluded queries), so the calibration identities (the validation split, held out of the
  training half) and the test identities (the other half: 60 enrolled in the gallery, 60
  unknown) are exchangeable; the FPR of a fixed threshold is the same expectation on both;
- each side's FPR has a sampling error that the identity bootstrap estimates (pairs share
  identities, so resampling identities, not pairs); the check allows
  4 x sqrt(se_calibration^2 + se_test^2) around the calibrated FPR, a 4-sigma margin: under
  the design a failure has probability about 6e-5;
- the test has power: the same check refuses the threshold of a 3x larger FPR, and the
  design keeps the combined error below a quarter of the target (asserted), so the check
  cannot pass for any threshold.

The model has random weights (BatchNorm statistics from the set's images): the FPR of a
threshold is a property of the distance distribution of different people, whatever the
model; a trained model's calibration is in benchmarks/results/verification_*.json.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import assert_one_line_error, run_cli, set_batchnorm_statistics

from attnreid.config import from_dict, to_dict
from attnreid.data.datasets import build_dataset
from attnreid.engine.checkpoint import save_checkpoint
from attnreid.evaluation.verification import bootstrap_rate
from attnreid.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread_module")

TARGET = 0.05
Z = 4.0
CONFIG = {"model": {"name": "baseline", "backbone": {"name": "resnet18"}},
          "data": {"dataset": "market1501", "height": 64, "width": 32, "workers": 0, "test_batch_size": 64,
                   "val_ids": 118},
          "eval": {"amp": "off"}, "train": {"device": "cpu"}}


def random_checkpoint(path: Path, cfg, images, seed: int = 0) -> Path:
    """Random weights with BatchNorm statistics from real images (else every feature is alike)."""
    from attnreid.data.loader import build_test_loader

    torch.manual_seed(seed)
    model = build_model(cfg.model, 5)
    set_batchnorm_statistics(model, (batch[0] for batch in build_test_loader(cfg.data, images)))
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(cfg), "num_classes": 5, "epoch": 0,
                           "step": 0})
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from attnreid.data.datasets.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("verification")
    generate_synthetic(root / "data", num_ids=240, images_per_id=6, num_cameras=4, height=64, width=32,
                       occluded_query_share=0.0, seed=0)
    cfg = from_dict({**CONFIG, "data": {**CONFIG["data"], "root": str(root / "data")}})
    ds = build_dataset("market1501", root / "data")
    (root / "run" / "checkpoints").mkdir(parents=True)
    ckpt = random_checkpoint(root / "run" / "checkpoints" / "last.pth", cfg, ds.train[::3])
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    test_ids = sorted({pid for _, pid, _ in ds.query})
    enrolled, unknown = set(test_ids[::2]), set(test_ids[1::2])
    gallery = root / "gallery"
    gallery.mkdir()
    for path, pid, _ in ds.gallery:
        if pid in enrolled:
            shutil.copy(path, gallery / Path(path).name)
    probes = [p for p, pid, _ in ds.query + ds.gallery if pid in unknown]
    code, out, err = run_cli(["calibrate", config, "--checkpoint", ckpt, "--fpr", TARGET, "--resamples", 300,
                              "--json"])
    assert code == 0, err
    return {"root": root, "config": config, "ckpt": ckpt, "gallery": gallery, "probes": probes,
            "calibration": json.loads(out), "enrolled": enrolled, "unknown": unknown, "cfg": cfg}


def pid_of(path: str) -> int:
    return int(Path(path).name.split("_")[0])


def test_calibration_file_records_feature_metric_and_data(setup):
    cal = setup["calibration"]
    on_disk = json.loads((setup["ckpt"].parent / "calibration.json").read_text())
    assert on_disk["operating_points"] == cal["operating_points"] and Path(cal["plot"]).is_file()
    assert cal["feature"]["model"] == "baseline" and cal["feature"]["metric"] == "euclidean_sq"
    assert len(cal["feature"]["weights_hash"]) == 16 and cal["feature"]["precision"].startswith("float32")
    assert cal["data"]["split"].startswith("validation") and cal["identities"] == 118
    assert [p["target_fpr"] for p in cal["operating_points"]] == [1e-4, 1e-3, 1e-2, TARGET]
    assert cal["bootstrap"] == {"unit": "identity", "resamples": 300, "level": 0.95, "seed": 0}


@pytest.fixture(scope="module")
def index(setup):
    """The enrolled people's gallery, indexed with the calibration beside the checkpoint."""
    out = setup["root"] / "idx"
    code, stdout, err = run_cli(["index", "build", setup["gallery"], "--checkpoint", setup["ckpt"], "--out", out,
                                 "--json"])
    assert code == 0, err
    assert json.loads(stdout)["calibration"] == str(setup["ckpt"].parent / "calibration.json")
    return out


def test_unknown_people_get_no_match_at_the_calibrated_rate(setup, index):
    cal = setup["calibration"]
    point = next(p for p in cal["operating_points"] if p["target_fpr"] == TARGET)
    size = len(list(setup["gallery"].iterdir()))
    code, out, err = run_cli(["search", index, *setup["probes"], "--fpr", TARGET, "--top-k", size, "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["threshold"] == point["threshold"]
    # every unknown probe is compared with every enrolled image: each comparison a decision
    ids = sorted(setup["enrolled"] | setup["unknown"])
    pos = {pid: i for i, pid in enumerate(ids)}
    accepted, total = np.zeros((len(ids), len(ids))), np.zeros((len(ids), len(ids)))
    for q in result["queries"]:
        assert len(q["results"]) == size
        assert q["decision"] == ("match" if any(r["match"] for r in q["results"]) else "no match")
        for r in q["results"]:
            a, b = sorted((pos[pid_of(q["query"])], pos[pid_of(r["path"])]))
            total[a, b] += 1
            accepted[a, b] += r["match"]
    measured = bootstrap_rate(accepted, total, resamples=300)
    se = math.hypot(point["fpr_se"], measured["se"])
    assert se < TARGET / 4, (point, measured)  # the design is sharp enough to mean something
    assert abs(measured["rate"] - point["fpr"]) <= Z * se, (point, measured)
    # power: a threshold promising the same FPR but giving three times as many false accepts is refused
    dist = np.array([r["distance"] for q in result["queries"] for r in q["results"]])
    looser = np.quantile(dist, 3 * measured["rate"])
    assert abs(float((dist < looser).mean()) - point["fpr"]) > Z * se
    # the share of unknown-vs-enrolled decisions answered "no match" is 1 - FPR
    no_match = 1 - measured["rate"]
    assert abs(no_match - (1 - point["fpr"])) <= Z * se


def test_python_api_verify_and_index_search(setup, index):
    from attnreid import FeatureExtractor
    from attnreid.deploy.index import GalleryIndex

    ext = FeatureExtractor(setup["ckpt"], amp="off")
    t = next(p["threshold"] for p in setup["calibration"]["operating_points"] if p["target_fpr"] == TARGET)
    a, b, c = setup["probes"][0], setup["probes"][1], setup["probes"][-1]
    verdict = ext.verify(a, b, fpr=TARGET)  # the calibration beside the checkpoint
    assert verdict.threshold == t and verdict.fpr == TARGET and verdict.same == (verdict.distance < t)
    f = ext([a, b]).double()
    assert verdict.distance == pytest.approx(float(((f[0] - f[1]) ** 2).sum()), rel=1e-5)
    both = ext.verify([a, a], [b, c], threshold=1e9)
    assert [v.same for v in both] == [True, True] and both[0].fpr is None
    gallery = GalleryIndex.load(index)
    dist, idx, match = gallery.search(ext([a, c]), 5, fpr=TARGET)
    assert match.shape == (2, 5) and torch.equal(match, dist < t)


def test_index_refuses_a_calibration_of_other_features(setup, index, tmp_path):
    other = random_checkpoint(tmp_path / "other.pth", setup["cfg"], [], seed=1)  # same config, other weights
    cal = setup["ckpt"].parent / "calibration.json"
    code, _, err = run_cli(["index", "build", setup["gallery"], "--checkpoint", other, "--calibration", cal,
                            "--out", tmp_path / "idx"])
    assert_one_line_error(code, err, "calibration", "weights_hash", "does not fit")
    # nor does a search with other weights use the index's calibration, nor a resumed build add them
    code, _, err = run_cli(["search", index, setup["probes"][0], "--fpr", TARGET, "--checkpoint", other])
    assert_one_line_error(code, err, "calibration", "weights_hash", "does not fit")
    code, _, err = run_cli(["index", "build", setup["gallery"], "--checkpoint", other, "--calibration", "",
                            "--out", index])
    assert_one_line_error(code, err, str(index), "other weights")
    cosine = tmp_path / "cosine.json"
    code, _, err = run_cli(["calibrate", setup["config"], "--checkpoint", setup["ckpt"], "--metric", "cosine",
                            "--resamples", 20, "--out", cosine, "data.val_ids=20"])
    assert code == 0, err
    code, _, err = run_cli(["index", "build", setup["gallery"], "--checkpoint", setup["ckpt"], "--calibration",
                            cosine, "--out", tmp_path / "idx2"])
    assert_one_line_error(code, err, "metric", "'cosine'", "'euclidean_sq'")
    # a calibration of other weights at the default place is kept, not overwritten
    code, _, err = run_cli(["calibrate", setup["config"], "--checkpoint", other, "--out", cal, "--resamples", 5])
    assert_one_line_error(code, err, str(cal), "other weights", "--overwrite")


def test_search_messages(setup, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for f in sorted(setup["gallery"].iterdir())[:4]:
        shutil.copy(f, few / f.name)
    code, out, err = run_cli(["index", "build", few, "--checkpoint", setup["ckpt"], "--calibration", "",
                              "--out", tmp_path / "idx"])
    assert code == 0 and "calibration:" not in out, err
    probe = setup["probes"][0]
    code, _, err = run_cli(["search", tmp_path / "idx", probe, "--fpr", 1e-3])
    assert_one_line_error(code, err, "--fpr needs a calibration", "--threshold")
    code, out, err = run_cli(["search", tmp_path / "idx", probe, "--threshold", 0, "-k", 3])
    assert code == 0 and "no match" in out and out.count("  -") == 3, err
    code, out, err = run_cli(["search", tmp_path / "idx", probe, "--threshold", 1e12, "-k", 3])
    assert code == 0 and "no match" not in out and out.count("  match") == 3, err
    code, _, err = run_cli(["search", tmp_path / "idx", probe, "--threshold", 1, "--fpr", 0.01])
    assert_one_line_error(code, err, "--fpr", "--threshold", "not both")


def test_calibrate_bad_input(setup, tmp_path):
    code, _, err = run_cli(["calibrate", setup["config"], "--checkpoint", setup["ckpt"], "data.val_ids=0",
                            "--out", tmp_path / "c.json"])
    assert_one_line_error(code, err, "data.val_ids", "--dataset")
    code, _, err = run_cli(["calibrate", setup["config"], "--checkpoint", setup["ckpt"], "--fpr", 2,
                            "--out", tmp_path / "c.json"])
    assert_one_line_error(code, err, "--fpr 2")
    code, _, err = run_cli(["calibrate", setup["config"], "--checkpoint", setup["ckpt"], "--out", tmp_path / "c.txt"])
    assert_one_line_error(code, err, "--out", ".json")


def test_report_shows_the_calibration(setup, tmp_path):
    from attnreid.viz.report import write_report

    page = write_report([setup["ckpt"].parent.parent], tmp_path / "report").read_text()
    assert "Verification: same person or not" in page and "calibration.png" in page
    assert (tmp_path / "report" / "report_files").glob("*_calibration.png")
