"""The gallery index loses nothing: shard numbering, one build at a time, the faiss cache, NaN features."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def thirty(tiny, tmp_path_factory):
    """A folder of exactly 30 gallery images."""
    folder = tmp_path_factory.mktemp("thirty")
    for p in sorted(tiny["gallery"].glob("*.jpg"))[:30]:
        shutil.copy(p, folder / p.name)
    assert len(list(folder.glob("*.jpg"))) == 30
    return folder


def _build(tiny, images, out, *extra):
    return run_cli(["index", "build", images, "--checkpoint", tiny["ckpt"], "--out", out, "--batch-size", "10",
                    "--shard-size", "10", "--device", "cpu", "--amp", "off", "--backend", "torch", "--json", *extra])


def _indexed(out: Path):
    from attnreid.deploy.index import GalleryIndex

    index = GalleryIndex.load(out)
    return index.paths, json.loads((out / "meta.json").read_text())


def test_deleting_a_corrupt_shard_and_rebuilding_reindexes_exactly_its_images(tiny, thirty, tmp_path):
    out = tmp_path / "idx"
    code, _, err = _build(tiny, thirty, out)
    assert code == 0, err
    shards = sorted(out.glob("shard-*.npz"))
    assert [p.name for p in shards] == ["shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    # the audit's sequence: a shard goes bad, the tool says "delete it and re-run", the user does
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    code, _, err = run_cli(["search", out, str(next(thirty.glob("*.jpg"))), "--device", "cpu", "--amp", "off"])
    assert_one_line_error(code, err, str(shards[1]), "delete it and re-run")
    shards[1].unlink()
    everything = {str(p.resolve()) for p in thirty.glob("*.jpg")}
    for _ in range(3):  # every re-run must keep all 30, not swap which 10 are lost
        code, out_json, err = _build(tiny, thirty, out)
        assert code == 0, err
        paths, meta = _indexed(out)
        assert sorted(paths) == sorted(everything), "an image was lost or indexed twice"
        assert meta["num_vectors"] == 30 == json.loads(out_json)["num_vectors"]


def test_a_new_shard_never_replaces_an_existing_file(tmp_path):
    from attnreid.deploy.index import GalleryIndex, write_new_shard

    out = tmp_path / "idx"
    out.mkdir()
    arrays = {"features": np.zeros((1, 4), np.float32), "paths": np.array(["a.jpg"]), "camids": np.zeros(1, np.int64)}
    for name in ("shard-00000.npz", "shard-00005.npz"):  # a gap, as after a deleted shard
        np.savez(out / name, **arrays)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    new = write_new_shard(out, **arrays)
    assert new.name == "shard-00006.npz"
    assert all((out / n).read_bytes() == b for n, b in before.items())
    assert [p.name for p in GalleryIndex.shard_files(out)] == ["shard-00000.npz", "shard-00005.npz",
                                                               "shard-00006.npz"]
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.npz", "shard-00005.npz", "shard-00006.npz"], \
        "a temporary file was left behind"


def test_temporary_names_are_unique_per_process_and_write(tmp_path):
    from attnreid.safe_io import is_temp_name, temp_path

    names = {temp_path(tmp_path / "meta.json").name for _ in range(50)}
    assert len(names) == 50 and all(f".{os.getpid()}." in n and is_temp_name(n) for n in names)


def test_a_second_build_into_an_index_in_use_is_refused(tiny, thirty, tmp_path):
    out = tmp_path / "idx"
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(thirty.glob("*.jpg"))[:10]:
        shutil.copy(p, few / p.name)
    code, _, err = _build(tiny, few, out)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.npz")}
    # another build holds the folder's lock (as `attnreid index build` does while it runs)
    with open(out / ".attnreid.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = _build(tiny, thirty, out)
        assert_one_line_error(code, err, f"index {out} is in use by another attnreid process", "choose another folder")
        assert {p.name: p.read_bytes() for p in out.glob("shard-*.npz")} == before
    code, _, err = _build(tiny, thirty, out)  # released: the build goes ahead
    assert code == 0, err
    assert len(_indexed(out)[0]) == 10 + 30  # the first folder's ten, then the other folder's thirty


def test_faiss_cache_is_never_reused_for_other_vectors(tmp_path):
    pytest.importorskip("faiss")
    from attnreid.deploy.index import FaissParams, GalleryIndex, exact_topk

    gen = torch.Generator().manual_seed(0)
    n, d = 400, 16
    meta = {"metric": "euclidean_sq", "feature_dim": d}
    queries = torch.randn(5, d, generator=gen)
    params = FaissParams(nprobe=64)  # every IVF cell visited: the search is exact
    for _ in range(2):  # the same folder, the same number of vectors, other vectors
        feats = torch.randn(n, d, generator=gen)
        index = GalleryIndex(tmp_path, meta, feats, [f"{i}.jpg" for i in range(n)], torch.zeros(n, dtype=torch.long))
        _, got = index.search(queries, 10, backend="faiss", faiss_index="ivf", faiss_params=params)
        _, want = exact_topk(queries, feats, 10, "euclidean_sq")
        assert torch.equal(got, want), "a cached faiss index of other vectors answered"
    assert len(list((tmp_path / "faiss").glob("*.faiss"))) == 1, "the stale cache was not dropped"


def test_non_finite_features_are_refused_in_build_and_search(tiny, thirty, tmp_path, monkeypatch):
    from attnreid.deploy.extractor import FeatureExtractor

    real = FeatureExtractor.forward_batch

    def nan_first_row(self, images):
        f = real(self, images).clone()
        f[0, 0] = float("nan")
        return f

    out = tmp_path / "idx"
    monkeypatch.setattr(FeatureExtractor, "forward_batch", nan_first_row)
    code, _, err = _build(tiny, thirty, out)
    assert_one_line_error(code, err, "non-finite (NaN/inf) features for")
    assert not list(out.glob("shard-*.npz"))
    monkeypatch.setattr(FeatureExtractor, "forward_batch", real)
    code, _, err = _build(tiny, thirty, out)
    assert code == 0, err
    query = str(next(thirty.glob("*.jpg")))
    monkeypatch.setattr(FeatureExtractor, "forward_batch", nan_first_row)
    code, _, err = run_cli(["search", out, query, "--device", "cpu", "--amp", "off"])
    assert_one_line_error(code, err, "non-finite (NaN/inf) features for query", query)
