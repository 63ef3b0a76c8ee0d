"""``torchrun --nproc_per_node 2 -m attnreid extract / index build``: each rank embeds its share,
rank 0 writes one result, the same as one process writes (Gloo on the CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ddp_helpers import REPO, WORLD, free_port
from helpers import run_cli

from attnreid.deploy.index import GalleryIndex, read_shard
from attnreid.inference.extract import shard_of

pytestmark = pytest.mark.usefixtures("one_thread_module")

# resnet18 at 64x32, float32 PyTorch: both runs compute every image in the same batch (shard_of),
# so the features are equal bit for bit, not only close.
TINY = {"model": {"name": "baseline", "backbone": {"name": "resnet18", "pretrained": False}},
        "data": {"height": 64, "width": 32, "test_batch_size": 4, "workers": 0},
        "train": {"device": "cpu", "threads": 1}, "eval": {"amp": "off", "backend": "torch", "bootstrap": 0}}


def test_shard_of_deals_whole_batches_round_robin_and_covers_every_item_once():
    shards = [shard_of(11, 3, r, 2).tolist() for r in range(2)]
    assert shards == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10]]
    assert sorted(shards[0] + shards[1]) == list(range(11))
    assert shard_of(2, 3, 1, 2).tolist() == []  # a rank with nothing to do


def torchrun(*args) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={WORLD}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "attnreid", *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, synthetic_root):
    from test_deploy import make_checkpoint

    base = tmp_path_factory.mktemp("dist_extract")
    cfg = {**TINY, "data": {**TINY["data"], "dataset": "market1501", "root": str(synthetic_root)}}
    return make_checkpoint(base / "m.pth", cfg), base


def test_two_processes_extract_the_same_npz_as_one(ckpt):
    path, base = ckpt
    code, out, err = run_cli(["extract", path, "--split", "query", "--split", "gallery", "--out", base / "one.npz"])
    assert code == 0, err
    printed = torchrun("extract", path, "--split", "query", "--split", "gallery", "--out", base / "two.npz")
    assert printed.count("wrote ") == 1 and f"({WORLD} processes)" in printed  # rank 0 alone writes and prints
    one, two = np.load(base / "one.npz"), np.load(base / "two.npz")
    assert sorted(one.files) == sorted(two.files)
    for key in one.files:
        assert np.array_equal(one[key], two[key]), key
    assert len(one["gallery_features"]) > 2 * 4  # more than one batch per rank


def test_two_processes_resume_an_index_into_the_one_process_index(ckpt, synthetic_root):
    path, base = ckpt
    gallery = synthetic_root / "market1501" / "bounding_box_test"
    args = ["--checkpoint", path, "--batch-size", "4", "--shard-size", "6", "--device", "cpu", "--amp", "off",
            "--backend", "torch"]
    code, _, err = run_cli(["index", "build", gallery, "--out", base / "one", *args])
    assert code == 0, err
    shards = GalleryIndex.shard_files(base / "one")
    assert len(shards) >= 4  # shards of 8 images (6 rounded up to whole batches of 4), dealt over 2 ranks
    # an interrupted build: only the first shard was written; two processes index the rest
    (base / "two").mkdir()
    for name in ("meta.json", shards[0].name):
        shutil.copy(base / "one" / name, base / "two" / name)
    meta = json.loads((base / "two" / "meta.json").read_text())
    meta.pop("backends")  # as after an interruption: this meta has seen the first shard only
    (base / "two" / "meta.json").write_text(json.dumps({**meta, "num_vectors": 8}))
    printed = torchrun("index", "build", gallery, "--out", base / "two", *args)
    assert printed.count("index ") == 1 and "8 already indexed" in printed
    assert [s.name for s in GalleryIndex.shard_files(base / "two")] == [s.name for s in shards]
    for s in shards:  # shard by shard: the same images, in the same order, with the same features
        a, b = read_shard(s, meta["feature_dim"]), read_shard(base / "two" / s.name, meta["feature_dim"])
        for key in ("features", "paths", "camids"):
            assert np.array_equal(a[key], b[key]), (s.name, key)
    one, two = (json.loads((base / d / "meta.json").read_text()) for d in ("one", "two"))
    assert one["world_size"] == 1 and two["world_size"] == WORLD
    assert one["num_vectors"] == two["num_vectors"] == len(list(gallery.glob("*.jpg")))
    assert two["backends"] == [{"backend": "torch", "precision": "float32", "vectors": two["num_vectors"]}]
