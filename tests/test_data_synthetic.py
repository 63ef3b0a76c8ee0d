"""The procedural synthetic data set and `attnreid data synth`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnreid.data.datasets import build_dataset
from attnreid.data.datasets.synthetic import (
    OCCLUDERS, generate_synthetic, random_camera, random_person, render_image,
)
from helpers import assert_one_line_error, run_cli

SMALL = dict(num_ids=4, images_per_id=4, num_cameras=2, height=32, width=16)


def _files(folder: Path):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.jpg"))}


def test_deterministic_for_a_seed(tmp_path: Path):
    a = _files(generate_synthetic(tmp_path / "a", seed=7, **SMALL))
    b = _files(generate_synthetic(tmp_path / "b", seed=7, **SMALL))
    c = _files(generate_synthetic(tmp_path / "c", seed=8, **SMALL))
    assert a == b and len(a) == 16
    assert a != c


def test_market_names_and_layout(synthetic_root: Path):
    folder = synthetic_root / "market1501"
    names = [p.name for p in folder.rglob("*.jpg")]
    assert len(names) == 80
    for name in names:
        pid, cam, frame, box = name[:-4].split("_")
        assert len(pid) == 4 and 1 <= int(pid) <= 10
        assert cam[0] == "c" and cam.endswith("s1") and 1 <= int(cam[1:-2]) <= 3
        assert len(frame) == 6 and box == "00"
    train_ids = {n[:4] for n in (p.name for p in (folder / "bounding_box_train").iterdir())}
    test_ids = {n[:4] for n in (p.name for p in (folder / "bounding_box_test").iterdir())}
    assert train_ids.isdisjoint(test_ids)
    with Image.open(next((folder / "query").iterdir())) as img:
        assert img.size == (32, 64) and img.mode == "RGB"


def test_occluded_share_changes_only_the_queries(tmp_path: Path):
    occluded = generate_synthetic(tmp_path / "occ", occluded_query_share=1.0, **SMALL)
    clean = generate_synthetic(tmp_path / "clean", occluded_query_share=0.0, **SMALL)
    meta_occ = json.loads((occluded / "synthetic.json").read_text())
    meta_clean = json.loads((clean / "synthetic.json").read_text())
    queries = sorted(p.name for p in (occluded / "query").iterdir())
    assert sorted(meta_occ["occluded_queries"]) == queries and meta_clean["occluded_queries"] == {}
    assert set(meta_occ["occluded_queries"].values()) <= set(OCCLUDERS)
    a, b = _files(occluded), _files(clean)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a if k.startswith("bounding_box_test/"))  # same gallery pixels
    assert all(a[k] != b[k] for k in a if k.startswith("query/"))  # every query got an occluder


@pytest.mark.parametrize("kind", OCCLUDERS)
def test_each_occluder_hides_part_of_the_person(kind: str):
    h, w = 128, 64
    rng = np.random.default_rng(0)
    person, camera = random_person(rng), random_camera(rng, h, w)
    clean = render_image(person, camera, np.random.default_rng(1), h, w)
    hidden = render_image(person, camera, np.random.default_rng(1), h, w, kind, np.random.default_rng(2))
    changed = (np.abs(clean.astype(int) - hidden.astype(int)).max(-1) > 30).mean()
    assert 0.05 < changed < 0.85, (kind, changed)


def test_identities_differ_and_cameras_change_appearance():
    h, w = 64, 32
    people = [random_person(np.random.default_rng([0, 1, pid])) for pid in range(1, 41)]
    combos = {(str(p.upper), p.upper_texture, str(p.lower), p.lower_type, p.bag) for p in people}
    assert len(combos) == len(people)
    cams = [random_camera(np.random.default_rng([0, 2, c]), h, w) for c in (1, 2)]
    means = [render_image(people[0], cam, np.random.default_rng(5), h, w).reshape(-1, 3).mean(0) for cam in cams]
    assert np.abs(means[0] - means[1]).max() > 5  # light / colour cast / background differ


def test_synth_cli_then_market_loader(tmp_path: Path):
    code, out, err = run_cli(["data", "synth", "--out", tmp_path, "--ids", "6", "--images-per-id", "4",
                              "--cameras", "3", "--height", "32", "--width", "16", "--occluded-query-share", "0.5",
                              "--seed", "1", "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["train"]["images"] == 12 and result["folder"] == str(tmp_path / "market1501")
    assert build_dataset("market1501", tmp_path).stats()["query"] == {k: result["query"][k] for k in ("images", "ids", "cams")}
    code, _, err = run_cli(["data", "synth", "--out", tmp_path, "--ids", "6"])
    assert_one_line_error(code, err, str(tmp_path / "market1501"), "already exists", "--overwrite")


@pytest.mark.parametrize("args, needle", [(["--cameras", "1"], "--cameras is 1"), (["--ids", "1"], "--ids is 1"),
                                          (["--occluded-query-share", "1.5"], "--occluded-query-share is 1.5")])
def test_synth_cli_bad_parameters(tmp_path: Path, args, needle):
    code, _, err = run_cli(["data", "synth", "--out", tmp_path, *args])
    assert_one_line_error(code, err, needle)
