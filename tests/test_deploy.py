"""Deployment: FeatureExtractor, gallery index + search (Python and CLI), exact/faiss top-k."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import assert_one_line_error, run_cli, set_batchnorm_statistics

from attnreid.config import from_dict, to_dict
from attnreid.deploy.extractor import FeatureExtractor
from attnreid.deploy.index import (FaissParams, FaissSearcher, GalleryIndex, build_index, exact_topk,
                                   pairwise_distance, parse_camera, recall_at_k)
from attnreid.engine.build import config_fingerprint
from attnreid.engine.checkpoint import save_checkpoint
from attnreid.errors import AttnReidError, CheckpointError, DataError
from attnreid.models import build_model

SMALL = {"model": {"name": "mhsanet", "backbone": {"name": "mobilenetv3_small"},
                   "mhsanet": {"num_heads": 2, "attention_dim": 16, "embed_dim": 16}},
         "data": {"height": 64, "width": 32},
         # float32: these tests compare features across inputs and extractors at float32 noise;
         # bf16 (eval.amp auto) is covered by tests/test_inference_precision.py
         "eval": {"amp": "off"}}


pytestmark = pytest.mark.usefixtures("one_thread_module")


def make_checkpoint(path: Path, overrides: dict, seed: int = 0) -> Path:
    """A checkpoint in the docs/design.md format, from a randomly initialised model.

    BatchNorm statistics are first set on a few batches of noise: with its initial
    running statistics a random network maps every image to almost the same feature.
    """
    cfg = from_dict(overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model, 5)
    set_batchnorm_statistics(model, [torch.randn(8, 3, cfg.data.height, cfg.data.width) for _ in range(3)])
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(cfg), "num_classes": 5, "epoch": 0,
                           "step": 0})
    return path


def assert_same_features(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    """Equal up to float32 noise relative to the features' scale (batched and single convolutions differ slightly)."""
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5 * float(b.abs().max()), msg=msg or None)


def person(pid: int, n: int) -> np.ndarray:
    """A 48x24 RGB image, different per identity, slightly varied per shot."""
    rng = np.random.default_rng(pid)
    base = rng.integers(0, 256, size=(6, 3, 3))
    img = np.kron(base, np.ones((8, 8, 1))).astype(np.int64)
    img += np.random.default_rng(1000 * pid + n).integers(-10, 10, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_gallery(folder: Path, pids=(1, 2, 3), cams=(1, 2)) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for pid in pids:
        for cam in cams:
            p = folder / f"{pid:04d}_c{cam}s1_{cam:06d}_00.png"
            Image.fromarray(person(pid, cam)).save(p)
            paths.append(p)
    return paths


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    ckpt = make_checkpoint(root / "small.pth", SMALL)
    gallery = root / "gallery"
    write_gallery(gallery)
    (gallery / "broken_c1.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return {"root": root, "ckpt": ckpt, "gallery": gallery}


@pytest.fixture(scope="module")
def extractor(work):
    return FeatureExtractor(work["ckpt"], batch_size=2)


# -- FeatureExtractor --------------------------------------------------------------------

def test_input_types_agree(work, extractor):
    arr = person(7, 0)
    path = work["root"] / "one.png"
    Image.fromarray(arr).save(path)
    ref = extractor(str(path))
    assert ref.shape == (1, extractor.feature_dim) and ref.dtype == torch.float32
    pre = extractor.preprocess(arr)
    variants = {
        "Path": extractor(path),
        "PIL": extractor(Image.fromarray(arr)),
        "PIL RGBA": extractor(Image.fromarray(arr).convert("RGBA")),
        "numpy": extractor(arr),
        "uint8 tensor": extractor(torch.from_numpy(arr).permute(2, 0, 1)),
        "float tensor": extractor(pre),
        "float batch": extractor(pre[None]),
    }
    for name, f in variants.items():
        assert_same_features(f, ref, msg=name)
    # mixed list of 5 with batch_size 2: three batches, order kept, same as one at a time
    other = person(8, 0)
    mixed = extractor([arr, str(path), other, np.stack([arr, other])])
    assert mixed.shape == (5, extractor.feature_dim)
    assert_same_features(mixed[[0, 1, 3]], ref.expand(3, -1))
    assert_same_features(mixed[[2, 4]], extractor(other).expand(2, -1))
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)


def test_checkpoint_and_config_plus_checkpoint_agree(work, extractor):
    cfg = from_dict(SMALL)
    ext2 = FeatureExtractor(cfg, checkpoint=work["ckpt"])
    x = person(3, 1)
    assert_same_features(ext2(x), extractor(x))
    assert ext2.fingerprint == extractor.fingerprint == config_fingerprint(cfg)


def test_flip_averaging(work):
    plain = FeatureExtractor(work["ckpt"])
    flipped = FeatureExtractor(work["ckpt"], flip=True)
    x = plain.preprocess(person(4, 2))
    expected = (plain(x) + plain(torch.flip(x, dims=[2]))) / 2
    assert_same_features(flipped(x), expected)
    assert not torch.allclose(flipped(x), plain(x), atol=1e-4)


def test_bad_inputs_one_line(extractor):
    with pytest.raises(DataError, match="float tensor of shape"):
        extractor(torch.zeros(3, 10, 10))
    with pytest.raises(DataError, match="uint8 RGB array"):
        extractor(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(DataError, match="cannot read an image from a dict"):
        extractor({"a": 1})
    with pytest.raises(DataError, match="missing.png"):
        extractor("/nonexistent/missing.png")


# -- distances, exact and faiss top-k ----------------------------------------------------

def test_pairwise_distance_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    torch.testing.assert_close(pairwise_distance(q, g, "euclidean_sq"), torch.tensor([[5.0, 4.0]]))
    torch.testing.assert_close(pairwise_distance(q, g, "cosine"), torch.tensor([[1.0, 0.0]]))


def assert_same_ranking(d, i, reference, k):
    """``(d, i)`` are the k nearest under the float64 ``reference`` distances: the distances agree
    with the reference's k smallest, and each returned index's reference distance is its rank's.

    Which of two gallery items at (nearly) equal distance comes first depends on the float32
    summation order of the kernel (torch, BLAS or faiss), so indices are compared through the
    reference distances, with a tolerance from the distances' magnitude, never for equality.
    """
    expected = reference.sort(1).values[:, :k]
    tol = 1e-5 * float(expected[torch.isfinite(expected)].abs().max())
    torch.testing.assert_close(d.double(), expected, atol=tol, rtol=0)
    torch.testing.assert_close(reference.gather(1, i), expected, atol=tol, rtol=0)
    assert all(len(set(row.tolist())) == k for row in i)


def test_exact_topk_chunks_and_camera_exclusion():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(50, 8, generator=gen)
    q = torch.randn(4, 8, generator=gen)
    d_full = torch.cdist(q.double(), g.double()) ** 2
    d, i = exact_topk(q, g, 5, "euclidean_sq", chunk_size=7)
    assert_same_ranking(d, i, d_full, 5)
    gc = torch.arange(50) % 3
    qc = torch.tensor([0, 1, 2, 0])
    d2, i2 = exact_topk(q, g, 5, "euclidean_sq", qc, gc, chunk_size=7)
    assert (gc[i2] != qc[:, None]).all()
    masked = d_full.masked_fill(gc[None] == qc[:, None], float("inf"))
    assert_same_ranking(d2, i2, masked, 5)


def test_recall_at_k_by_hand():
    approx = np.array([[1, 2, 3], [4, 5, 6]])
    exact = np.array([[3, 2, 9], [4, 5, 6]])
    assert recall_at_k(approx, exact, 3) == pytest.approx((2 / 3 + 1) / 2)
    assert recall_at_k(approx, exact, 1) == pytest.approx(0.5)


def test_faiss_matches_exact():
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(400, 16, generator=gen)
    q = torch.randn(5, 16, generator=gen)
    gc = torch.arange(400) % 4
    qc = torch.tensor([0, 1, 2, 3, 0])
    same_camera = gc[None] == qc[:, None]
    qd, gd = q.double(), g.double()
    references = {"euclidean_sq": torch.cdist(qd, gd) ** 2,
                  "cosine": 1 - F.normalize(qd, dim=1) @ F.normalize(gd, dim=1).T}
    for metric in ("euclidean_sq", "cosine"):
        reference = references[metric].masked_fill(same_camera, float("inf"))
        ed, ei = exact_topk(q, g, 10, metric, qc, gc)
        fd, fi = FaissSearcher(g, metric, "flat").search(q, 10, qc, gc)
        assert_same_ranking(ed, ei, reference, 10)
        assert_same_ranking(fd, fi, reference, 10)
        for kind in ("ivf", "hnsw"):
            _, ai = FaissSearcher(g, metric, kind, FaissParams(nprobe=64, ef_search=200)).search(q, 10, qc, gc)
            assert (gc[ai[ai >= 0]] != qc[:, None].expand_as(ai)[ai >= 0]).all()
            assert recall_at_k(ai, ei, 10) >= 0.9


def test_parse_camera():
    assert parse_camera("/x/0001_c3s1_001051_00.jpg") == 3
    assert parse_camera("/x/zip.zip::q/0001_c12s1_001051_00.jpg") == 12
    assert parse_camera("/x/0001.jpg") == -1
    assert parse_camera("/x/cam7_0001.jpg", r"cam(\d+)") == 7


# -- index build and search --------------------------------------------------------------

def test_index_build_resumes_and_lists_corrupt(work, tmp_path):
    gallery = tmp_path / "g"
    shutil.copytree(work["gallery"], gallery)
    out = tmp_path / "index"
    code, stdout, err = run_cli(["index", "build", gallery, "--checkpoint", work["ckpt"], "--out", out,
                                 "--json", "--batch-size", "2", "--shard-size", "3"])
    assert code == 0, err
    s = json.loads(stdout)
    assert s["added"] == 6 and s["already_indexed"] == 0 and s["num_vectors"] == 6
    assert [Path(x["path"]).name for x in s["skipped"]] == ["broken_c1.jpg"]
    assert "cannot be decoded" in s["skipped"][0]["error"]
    assert len(GalleryIndex.shard_files(out)) == 2
    # second run: nothing new to do
    code, stdout, err = run_cli(["index", "build", gallery, "--checkpoint", work["ckpt"], "--out", out, "--json"])
    s = json.loads(stdout)
    assert code == 0 and s["added"] == 0 and s["already_indexed"] == 6 and len(s["skipped"]) == 1
    # new images: only they are processed
    write_gallery(gallery, pids=(4,), cams=(1, 3))
    code, stdout, err = run_cli(["index", "build", gallery, "--checkpoint", work["ckpt"], "--out", out, "--json"])
    s = json.loads(stdout)
    assert s["added"] == 2 and s["already_indexed"] == 6 and s["num_vectors"] == 8
    index = GalleryIndex.load(out)
    assert len(index) == 8 and len(set(index.paths)) == 8
    assert sorted(index.camids.tolist()) == [1, 1, 1, 1, 2, 2, 2, 3]
    # the stored features are the extractor's
    ext = FeatureExtractor(work["ckpt"])
    i = index.paths.index(str((gallery / "0004_c3s1_000003_00.png").resolve()))
    assert_same_features(index.features[i:i + 1], ext(index.paths[i]))
    assert json.loads((out / "skipped.json").read_text())[0]["path"].endswith("broken_c1.jpg")


@pytest.fixture(scope="module")
def built_index(work):
    out = work["root"] / "index"
    summary = build_index(FeatureExtractor(work["ckpt"]), work["gallery"], out, progress=False)
    assert summary["num_vectors"] == 6
    query = work["root"] / "query" / "0002_c1s1_000099_00.png"
    query.parent.mkdir(exist_ok=True)
    shutil.copy(work["gallery"] / "0002_c1s1_000001_00.png", query)
    return out, query


def test_search_ranks_gallery_copy_first(work, built_index):
    out, query = built_index
    code, stdout, err = run_cli(["search", out, query, "--top-k", "3", "--json"])
    assert code == 0, err
    res = json.loads(stdout)["queries"][0]
    assert res["camera"] == 1 and [r["rank"] for r in res["results"]] == [1, 2, 3]
    top = res["results"][0]
    assert Path(top["path"]).name == "0002_c1s1_000001_00.png" and top["distance"] < 1e-6
    dists = [r["distance"] for r in res["results"]]
    assert dists == sorted(dists) and dists[1] > 1e-4
    code, stdout, _ = run_cli(["search", out, query, "-k", "2"])
    assert code == 0 and "0002_c1s1_000001_00.png" in stdout.splitlines()[1]


def test_search_faiss_backend_agrees(built_index):
    pytest.importorskip("faiss")
    out, query = built_index
    a = json.loads(run_cli(["search", out, query, "--json", "-k", "6"])[1])["queries"][0]["results"]
    b = json.loads(run_cli(["search", out, query, "--json", "-k", "6", "--backend", "faiss"])[1])["queries"][0]["results"]
    assert [r["path"] for r in a] == [r["path"] for r in b]


def test_exclude_same_camera(built_index):
    out, query = built_index
    code, stdout, err = run_cli(["search", out, query, "--json", "-k", "6", "--exclude-same-camera"])
    assert code == 0, err
    results = json.loads(stdout)["queries"][0]["results"]
    assert len(results) == 3 and all(r["camera"] == 2 for r in results)
    assert Path(results[0]["path"]).name == "0002_c2s1_000002_00.png"


def test_mismatched_model_refused(work, built_index):
    out, query = built_index
    other = make_checkpoint(work["root"] / "star.pth", {**SMALL, "model": {**SMALL["model"], "test_feature": "star"}})
    code, _, err = run_cli(["search", out, query, "--checkpoint", other])
    assert_one_line_error(code, err, str(out), "was built with model 'mhsanet'", "feature dim")
    code, _, err = run_cli(["index", "build", work["gallery"], "--checkpoint", other, "--out", out])
    assert_one_line_error(code, err, "was built with model")
    with pytest.raises(CheckpointError):
        GalleryIndex.load(out).check_model(FeatureExtractor(other))


def test_non_image_query_one_line(work, built_index):
    out, _ = built_index
    text = work["root"] / "notes.jpg"
    text.write_text("not an image")
    code, _, err = run_cli(["search", out, text])
    assert_one_line_error(code, err, "notes.jpg")
    code, _, err = run_cli(["search", out, work["root"] / "absent.jpg"])
    assert_one_line_error(code, err, "absent.jpg")
    code, _, err = run_cli(["search", work["root"], text])
    assert_one_line_error(code, err, "not an attnreid index")


def test_exclude_same_camera_needs_query_camera(work, built_index):
    out, query = built_index
    plain = work["root"] / "query" / "someone.png"
    shutil.copy(query, plain)
    code, _, err = run_cli(["search", out, plain, "--exclude-same-camera"])
    assert_one_line_error(code, err, "someone.png", "no camera id")


def test_missing_faiss_is_one_line(built_index, monkeypatch):
    import builtins

    out, query = built_index
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("no faiss")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    code, _, err = run_cli(["search", out, query, "--backend", "faiss"])
    assert_one_line_error(code, err, "faiss is not installed")


def test_build_index_errors(work, tmp_path):
    ext = FeatureExtractor(work["ckpt"])
    with pytest.raises(DataError, match="image folder not found"):
        build_index(ext, tmp_path / "nope", tmp_path / "i", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        build_index(ext, tmp_path / "empty", tmp_path / "i", progress=False)
    with pytest.raises(AttnReidError, match="camera-regex"):
        build_index(ext, work["gallery"], tmp_path / "i", camera_regex="(", progress=False)
