"""Every benchmark loader on a tiny fake copy of its layout, including torchreid's folder names."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest
from PIL import Image

from attnreid.data.datasets import build_dataset
from attnreid.errors import DataError
from helpers import assert_one_line_error, run_cli

_JPEG = io.BytesIO()
Image.new("RGB", (8, 16), (10, 200, 30)).save(_JPEG, format="JPEG")
JPEG = _JPEG.getvalue()


def make_tree(root: Path, files: Dict[str, List[str]]) -> Path:
    for folder, names in files.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for n in names:
            target = root / folder / n
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(JPEG)
    return root


def market_style(prefix: str, train: List[str], query: List[str], gallery: List[str]) -> Dict[str, List[str]]:
    return {f"{prefix}/bounding_box_train": train, f"{prefix}/query": query, f"{prefix}/bounding_box_test": gallery}


DUKE = (["0001_c2_f0046182.jpg", "0001_c5_f0051341.jpg", "0003_c1_f0044158.jpg"],
        ["0005_c2_f0046985.jpg"], ["0005_c5_f0051341.jpg", "0005_c2_f0046000.jpg", "0010_c8_f0000001.jpg"])


@pytest.mark.parametrize(
    "name, prefix",
    [
        ("dukemtmcreid", "DukeMTMC-reID"),
        ("dukemtmcreid", "dukemtmc-reid/DukeMTMC-reID"),  # torchreid
        ("dukemtmcreid", "dukemtmc-reid"),  # torchreid, folders directly inside
        ("occluded_duke", "Occluded_Duke"),
        ("cuhk03_labeled", "cuhk03-np/labeled"),
        ("cuhk03_detected", "CUHK03-NP/detected"),
        ("cuhk03_labeled", "cuhk03/cuhk03-np/labeled"),
        ("market1501", "market1501/Market-1501-v15.09.15"),  # torchreid
    ],
)
def test_market_style_layouts(tmp_path: Path, name: str, prefix: str):
    root = make_tree(tmp_path, market_style(prefix, *DUKE))
    ds = build_dataset(name, root)
    assert sorted((p, c) for _, p, c in ds.train) == [(0, 1), (0, 4), (1, 0)]
    assert [(p, c) for _, p, c in ds.query] == [(5, 1)]
    assert ds.stats()["gallery"] == {"images": 3, "ids": 2, "cams": 3}
    assert ds.protocol == "market"


def test_cuhk03_labeled_and_detected_side_by_side(tmp_path: Path):
    files = market_style("cuhk03-np/labeled", ["0001_c1_1.png"], ["0002_c1_1.png"], ["0002_c2_1.png"])
    files.update(market_style("cuhk03-np/detected", ["0001_c1_1.png", "0001_c2_1.png"], ["0002_c1_1.png"],
                              ["0002_c2_1.png"]))
    make_tree(tmp_path, files)
    assert build_dataset("cuhk03_labeled", tmp_path).stats()["train"]["images"] == 1
    assert build_dataset("cuhk03_detected", tmp_path).stats()["train"]["images"] == 2


def test_p_dukemtmc(tmp_path: Path):
    base = "P-DukeMTMC-reID"  # the release's capitalisation (also written P-DukeMTMC-reid)
    make_tree(tmp_path, {
        f"{base}/train/occluded_body_images/0005": ["0005_c2_f0046985.jpg"],
        f"{base}/train/whole_body_images/0005": ["0005_c1_f0046000.jpg", "0005_c3_f0046001.jpg"],
        f"{base}/test/occluded_body_images/0009": ["0009_c4_f0000001.jpg"],
        f"{base}/test/whole_body_images/0009": ["0009_c1_f0000002.jpg", "img.jpg"],
    })
    ds = build_dataset("p_dukemtmc", tmp_path)
    assert sorted((p, c) for _, p, c in ds.train) == [(0, 0), (0, 1), (0, 2)]
    assert [(p, c) for _, p, c in ds.query] == [(9, 3)]
    # No _cN in the name: whole-body images default to camera 1 (occluded ones to 0).
    assert sorted((p, c) for _, p, c in ds.gallery) == [(9, 0), (9, 1)]


def test_partial_reid_and_ilids(tmp_path: Path):
    make_tree(tmp_path, {
        "Partial-REID_Dataset/partial_body_images": ["001_01.jpg", "001_02.jpg", "002_01.jpg"],
        "Partial-REID_Dataset/whole_body_images": ["001_01.jpg", "002_01.jpg"],
        "Partial_iLIDS/Probe": ["001.jpg", "002.jpg"],
        "Partial_iLIDS/Gallery": ["001.jpg", "002.jpg"],
    })
    reid = build_dataset("partial_reid", tmp_path)
    assert reid.protocol == "partial" and reid.train == []
    assert [(p, c) for _, p, c in reid.query] == [(1, 0), (1, 0), (2, 0)]
    assert [(p, c) for _, p, c in reid.gallery] == [(1, 1), (2, 1)]
    ilids = build_dataset("partial_ilids", tmp_path)
    assert ilids.stats() == {"train": {"images": 0, "ids": 0, "cams": 0},
                             "query": {"images": 2, "ids": 2, "cams": 1},
                             "gallery": {"images": 2, "ids": 2, "cams": 1}}


def _msmt17(root: Path, version: str, train_dir: str, test_dir: str, parent: str = "msmt17") -> Path:
    base = root / parent / version
    make_tree(base, {
        f"{train_dir}/0000": ["0000_000_01_0303morning_0015_0.jpg", "0000_001_05_0303morning_0016_0.jpg"],
        f"{train_dir}/0001": ["0001_000_15_0303noon_0001_0.jpg"],
        f"{test_dir}/0000": ["0000_000_02_0303morning_0001_0.jpg", "0000_001_03_0303morning_0002_0.jpg"],
    })
    (base / "list_train.txt").write_text("0000/0000_000_01_0303morning_0015_0.jpg 0\n0001/0001_000_15_0303noon_0001_0.jpg 1\n")
    (base / "list_val.txt").write_text("0000/0000_001_05_0303morning_0016_0.jpg 0\n")
    (base / "list_query.txt").write_text("0000/0000_000_02_0303morning_0001_0.jpg 0\n")
    (base / "list_gallery.txt").write_text("0000/0000_001_03_0303morning_0002_0.jpg 0\n")
    return root


@pytest.mark.parametrize("version, train_dir, test_dir", [("MSMT17_V1", "train", "test"),
                                                          ("MSMT17_V2", "mask_train_v2", "mask_test_v2")])
def test_msmt17(tmp_path: Path, version: str, train_dir: str, test_dir: str):
    ds = build_dataset("msmt17", _msmt17(tmp_path, version, train_dir, test_dir))
    assert sorted((p, c) for _, p, c in ds.train) == [(0, 0), (0, 4), (1, 14)]  # list_train + list_val
    assert [(p, c) for _, p, c in ds.query] == [(0, 1)]  # pid 0 is a real identity in MSMT17
    assert [(p, c) for _, p, c in ds.gallery] == [(0, 2)]
    assert Path(ds.query[0][0]).is_file()


def test_msmt17_bad_list_line(tmp_path: Path):
    root = _msmt17(tmp_path, "MSMT17_V1", "train", "test", parent="")
    (root / "MSMT17_V1" / "list_query.txt").write_text("garbage\n")
    with pytest.raises(DataError, match=r"line 1 of .*list_query.txt"):
        build_dataset("msmt17", root)


def test_zip_of_duke_inside_root(tmp_path: Path):
    src = make_tree(tmp_path / "src", market_style("DukeMTMC-reID", *DUKE))
    with zipfile.ZipFile(tmp_path / "DukeMTMC-reID.zip", "w") as zf:
        for f in sorted(src.rglob("*.jpg")):
            zf.write(f, f.relative_to(src).as_posix())
    ds = build_dataset("dukemtmcreid", tmp_path)
    assert ds.root.endswith("DukeMTMC-reID.zip::DukeMTMC-reID")
    assert ds.stats()["train"] == {"images": 3, "ids": 2, "cams": 3}


@pytest.mark.parametrize("prefix", ["Occluded_REID", "ICME2018_Occluded-Person-Reidentification_datasets/Occluded_REID"])
def test_occluded_reid(tmp_path: Path, prefix: str):
    make_tree(tmp_path, {
        # a _c2 in a name is not a camera: the set has none
        f"{prefix}/occluded_body_images/001": ["001_01.tif", "001_c2.tif"],
        f"{prefix}/occluded_body_images/002": ["002_01.jpg"],
        f"{prefix}/whole_body_images/001": ["001_01.tif"],
        f"{prefix}/whole_body_images/002": ["002_01.tif", "002_02.tif"],
    })
    tif = tmp_path / prefix / "whole_body_images" / "002" / "002_02.tif"
    Image.new("RGB", (8, 16), (1, 2, 3)).save(tif, format="TIFF")  # the release's format
    ds = build_dataset("occluded_reid", tmp_path)
    assert ds.protocol == "market" and ds.train == []
    assert sorted((p, c) for _, p, c in ds.query) == [(1, 0), (1, 0), (2, 0)]  # query = occluded, camera 0
    assert sorted((p, c) for _, p, c in ds.gallery) == [(1, 1), (2, 1), (2, 1)]  # gallery = whole body, camera 1
    assert all("whole_body_images" in path for path, _, _ in ds.gallery)
    # the Market protocol's same-(pid, camera) removal never drops a query's whole-body match
    assert not {(p, c) for _, p, c in ds.query} & {(p, c) for _, p, c in ds.gallery}
    from attnreid.data.io import read_image

    assert read_image(str(tif)).size == (8, 16)


@pytest.mark.parametrize("name", ["cuhk03_labeled", "occluded_duke", "p_dukemtmc", "partial_reid", "partial_ilids",
                                  "occluded_reid", "msmt17"])
def test_missing_dataset_is_one_line_error(tmp_path: Path, name: str):
    code, _, err = run_cli(["data", "stats", name, "--root", tmp_path])
    assert_one_line_error(code, err, str(tmp_path), "expected")


def test_partial_missing_gallery_folder(tmp_path: Path):
    make_tree(tmp_path, {"Partial_iLIDS/Probe": ["001.jpg"]})
    code, _, err = run_cli(["data", "stats", "partial_ilids", "--root", tmp_path])
    assert_one_line_error(code, err, "missing split folder", str(tmp_path / "Partial_iLIDS" / "Gallery"))
