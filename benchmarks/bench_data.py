"""Data-layer benchmarks: synthetic generation speed, synthetic hardness, image loading speed.

    .venv/bin/python benchmarks/bench_data.py            # all
    .venv/bin/python benchmarks/bench_data.py synth      # one of: synth, hardness, loader

Writes ``benchmarks/results/data_synth.json``, ``data_hardness.json`` and (when
``$ATTNREID_DATA``, default ``data/``, holds the Market-1501 zip) ``data_loader.json``. Wall-clock numbers
depend on the machine's load, so the load average and the CPU time are recorded too.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from _data import DATA_ROOT
from _machine import machine_record

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _machine() -> dict:
    return {**machine_record(), "load_avg_1min": round(os.getloadavg()[0], 2)}


def _write(name: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def bench_synth() -> None:
    """Images per second of `generate_synthetic` (drawing + JPEG + writing) at two sizes."""
    from attnreid.data.datasets.synthetic import generate_synthetic

    runs = []
    for (h, w), (ids, per_id) in (((128, 64), (100, 20)), ((256, 128), (50, 12))):
        with tempfile.TemporaryDirectory() as tmp:
            load = os.getloadavg()[0]
            wall, cpu = time.perf_counter(), time.process_time()
            generate_synthetic(tmp, num_ids=ids, images_per_id=per_id, num_cameras=6, height=h, width=w, seed=0)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        n = ids * per_id
        runs.append({"height": h, "width": w, "images": n, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
                     "images_per_s": round(n / wall, 1), "images_per_cpu_s": round(n / cpu, 1),
                     "load_avg_at_start": round(load, 2)})
    _write("data_synth.json", {"benchmark": "synthetic generation", "target_images_per_s_128x64": 500,
                               "machine": _machine(), "runs": runs})


def _features_colour_stripes(paths) -> torch.Tensor:
    """Mean colour of 8 horizontal stripes (24-d): what colour alone can do."""
    from attnreid.data.io import read_image

    feats = []
    for p in paths:
        a = np.asarray(read_image(p), dtype=np.float32) / 255.0
        feats.append(np.stack([s.mean((0, 1)) for s in np.array_split(a, 8, axis=0)]).ravel())
    return torch.from_numpy(np.stack(feats))


def _features_centre_grey_world(paths) -> torch.Tensor:
    """A hand-made hint that the identity signal is there: stripes of the central 3/8 of the
    width (where the person stands), each divided by the image's mean colour (grey-world
    colour constancy, undoing the camera's light and cast)."""
    from attnreid.data.io import read_image

    feats = []
    for p in paths:
        a = np.asarray(read_image(p), dtype=np.float32) / 255.0
        w = a.shape[1]
        a = a[:, int(w * 0.3125):int(w * 0.6875)]
        stripes = np.stack([s.mean((0, 1)) for s in np.array_split(a, 8, axis=0)])
        feats.append((stripes / (stripes.mean(0, keepdims=True) + 1e-6)).ravel())
    return torch.from_numpy(np.stack(feats))


def _features_random_cnn(paths, height: int, width: int) -> torch.Tensor:
    """Global-average-pooled features of a randomly initialised 4-layer CNN (seed 0)."""
    from attnreid.config import IMAGENET_MEAN, IMAGENET_STD
    from attnreid.data.io import read_image
    from attnreid.data.transforms import build_transforms

    torch.manual_seed(0)
    layers, c = [], 3
    for out in (32, 64, 128, 256):
        layers += [torch.nn.Conv2d(c, out, 3, padding=1), torch.nn.BatchNorm2d(out), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        c = out
    net = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    tf = build_transforms(height, width, IMAGENET_MEAN, IMAGENET_STD, train=False)
    with torch.no_grad():
        x = torch.stack([tf(read_image(p)) for p in paths])
        return torch.nn.functional.normalize(net(x), dim=1)


def bench_hardness() -> None:
    """mAP / Rank-1 of untrained features on the default synthetic set, occluded and clean.

    Colour stripes of the whole image and a random CNN stay near chance (about 1/30 for
    30 test identities): the camera's light, cast and background dominate them. The
    hand-made ``centre_grey_world_hint`` shows the identity signal a model can learn.
    """
    from attnreid.data.datasets import build_dataset
    from attnreid.evaluation.distance import compute_distance
    from attnreid.evaluation.rank import evaluate_rank

    out = {"benchmark": "synthetic hardness (untrained features)", "machine": _machine(), "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for share in (1.0, 0.0):
            ds = build_dataset("synthetic", tmp, occluded_query_share=share)
            qp = np.array([p for _, p, _ in ds.query]); gp = np.array([p for _, p, _ in ds.gallery])
            qc = np.array([c for _, _, c in ds.query]); gc = np.array([c for _, _, c in ds.gallery])
            row = {}
            for name, fn in (("colour_stripes", _features_colour_stripes),
                             ("random_cnn", lambda paths: _features_random_cnn(paths, 128, 64)),
                             ("centre_grey_world_hint", _features_centre_grey_world)):
                qf, gf = fn([p for p, _, _ in ds.query]), fn([p for p, _, _ in ds.gallery])
                m = evaluate_rank(compute_distance(qf, gf), qp, gp, qc, gc)
                row[name] = {"mAP": round(float(m["mAP"]), 4), "rank1": round(float(m["rank1"]), 4)}
            row["stats"] = ds.stats()
            out["sets"][f"occluded_query_share={share:g}"] = row
    _write("data_hardness.json", out)


def bench_loader() -> None:
    """Images per second through the test loader (decode from the zip + resize + normalise)."""
    from attnreid.config import DataConfig
    from attnreid.data.datasets import build_dataset
    from attnreid.data.loader import build_test_loader

    if not DATA_ROOT.is_dir():
        print(f"skip loader benchmark: {DATA_ROOT} not present (set ATTNREID_DATA)")
        return
    t = time.perf_counter()
    ds = build_dataset("market1501", DATA_ROOT)
    index_s = time.perf_counter() - t
    runs = []
    default_threads = torch.get_num_threads()
    # On a loaded machine torch's intra-op threads make per-image ops slow in the main
    # process (workers set 1 thread each): measure workers=0 with both settings.
    for workers, threads in ((0, default_threads), (0, 1), (2, default_threads)):
        torch.set_num_threads(threads)
        cfg = DataConfig(height=256, width=128, workers=workers, test_batch_size=64)
        items = ds.query[:768]
        loader = build_test_loader(cfg, items)
        t = time.perf_counter()
        n = sum(len(b[1]) for b in loader)
        wall = time.perf_counter() - t
        runs.append({"workers": workers, "main_process_threads": threads, "images": n, "seconds": round(wall, 3),
                     "images_per_s": round(n / wall, 1)})
    torch.set_num_threads(default_threads)
    _write("data_loader.json", {"benchmark": "Market-1501 query images from the zip through build_test_loader at 256x128",
                                "index_seconds": round(index_s, 3), "machine": _machine(), "runs": runs})


if __name__ == "__main__":
    todo = sys.argv[1:] or ["synth", "hardness", "loader"]
    for name in todo:
        {"synth": bench_synth, "hardness": bench_hardness, "loader": bench_loader}[name]()
