"""Benchmark: does a calibrated "same person?" threshold keep its promise on people it never saw?

    python benchmarks/bench_verification.py synthetic [--minutes 15] [--ids 400]
    python benchmarks/bench_verification.py market --config CONFIG --checkpoint CKPT --root DATA

1. Calibration: ``attnreid.deploy.calibration.calibrate_checkpoint`` on the validation
   identities (``data.val_ids``, held out of training): thresholds at FPR 1e-2, 1e-3, 1e-4
   with identity-bootstrap intervals.
2. Held out: the test identities, which neither training nor calibration saw, split in two
   halves: *enrolled* (their gallery images form the gallery) and *unknown* (their query
   images are searched against it, and must get "no match"). For each operating point:
   the false-accept rate of unknown-vs-enrolled comparisons (all pairs) with its own
   identity-bootstrap interval and standard error, the z-score of its difference from the
   calibrated FPR (``(measured - calibrated) / sqrt(se_cal^2 + se_test^2)``), the share of
   unknown queries answered "no match" against the whole gallery, and for enrolled queries
   (mated searches) the share whose nearest hit is their own identity *and* below the
   threshold.
3. ``synthetic``: a clean synthetic set (no occluded queries; ``--ids`` identities, half for
   training) and a small model trained on it for ``--minutes`` (ResNet-18 baseline with BNNeck,
   label smoothing and a batch-hard triplet on the global feature, ``--height`` x ``--width``, no pretraining).
   ``market``: a checkpoint you trained on Market-1501 (its
   config names ``data.val_ids``); Market's distractors (0000) and junk are left out.

Writes ``benchmarks/results/verification_<mode>.json`` with the machine record.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _machine import machine_record  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def synthetic_run(args) -> tuple:
    """Generate the set and train the model; returns (config, checkpoint)."""
    from attnreid.config import from_dict
    from attnreid.engine.trainer import train

    work = Path(args.work)
    cfg = from_dict({
        "data": {"dataset": "synthetic", "root": str(work / "data"), "height": args.height, "width": args.width,
                 "batch_size": 32,
                 "num_instances": 4, "test_batch_size": 128, "workers": 1, "epoch_mode": "identities",
                 "val_ids": args.ids // 4,
                 "synthetic": {"num_ids": args.ids, "images_per_id": 8, "num_cameras": 4, "height": args.height,
                               "width": args.width,
                               "occluded_query_share": 0.0, "seed": 0}},
        "model": {"name": "baseline", "bnneck": True, "backbone": {"name": "resnet18", "last_stride": 1}},
        "loss": {"global_triplet": 1.0, "label_smoothing": 0.1},
        "optim": {"lr": 1e-3, "warmup_epochs": 2, "warmup_start_lr": 1e-4, "milestones": [1000]},
        "train": {"epochs": 1000, "max_minutes": args.minutes, "eval_every": 0, "amp": "off", "threads": 1,
                  "device": "cpu"},
        "eval": {"amp": "off"},
    })
    run = work / f"run_{args.ids}_{args.height}x{args.width}_{args.minutes:g}min"
    ckpt = run / "checkpoints" / "last.pth"
    if not ckpt.is_file():  # a finished run of these settings is reused (re-running the calibration only)
        train(cfg, run, overwrite=True)
    return cfg, ckpt


def held_out(model, cfg, dataset, threshold_points, resamples: int, seed: int = 0) -> dict:
    """The operating points' false-accept and mated rates on the test identities (module doc)."""
    from attnreid.inference.extract import extract_features
    from attnreid.evaluation.verification import bootstrap_rate, pair_counts

    distractor = getattr(dataset, "distractor_pid", None)
    ids = sorted({pid for _, pid, _ in dataset.query if pid >= 0 and pid != distractor})
    rng = np.random.default_rng(seed)
    rng.shuffle(ids)
    enrolled, unknown = set(ids[: len(ids) // 2]), set(ids[len(ids) // 2:])
    probes = [it for it in dataset.query if it[1] in unknown]
    mated = [it for it in dataset.query if it[1] in enrolled]
    gallery = [it for it in dataset.gallery if it[1] in enrolled]
    t0 = time.perf_counter()
    feats = {}
    for name, items in (("probes", probes), ("mated", mated), ("gallery", gallery)):
        f, p, c = extract_features(model, items, cfg.data, amp="off", backend="torch", progress=f"held-out {name}")
        feats[name] = (f.numpy().astype(np.float64), p, c)
    seconds = time.perf_counter() - t0
    metric = threshold_points[0]["metric"]
    gf, gp, gc = feats["gallery"]
    rows = []
    for point in threshold_points:
        t = point["threshold"]
        pf, pp, pc = feats["probes"]
        counts = pair_counts(np.concatenate([pf, gf]), np.concatenate([pp, gp]), np.concatenate([pc, gc]), t, metric,
                             query=np.arange(len(pf) + len(gf)) < len(pf))
        measured = bootstrap_rate(counts["neg_accepted"], counts["neg_total"], resamples, seed=seed)
        se = math.hypot(point["fpr_se"] or 0.0, measured["se"] or 0.0)
        nearest_probe = nearest(pf, gf, metric)
        mf, mp, mc = feats["mated"]
        order, dist = nearest_valid(mf, mp, mc, gf, gp, gc, metric)
        rows.append({
            "target_fpr": point["target_fpr"], "threshold": t, "calibrated_fpr": point["fpr"],
            "calibrated_fpr_ci": point["fpr_ci"], "calibrated_fpr_se": point["fpr_se"],
            "calibrated_tpr": point["tpr"], "calibrated_tpr_ci": point["tpr_ci"],
            "unknown_false_accept_rate": measured["rate"], "unknown_false_accept_ci": measured["ci"],
            "unknown_false_accept_se": measured["se"], "unknown_pairs": measured["pairs"],
            "unknown_accepted_pairs": measured["accepted"],
            "z": (measured["rate"] - point["fpr"]) / se if se > 0 else None,
            "within_calibrated_interval": point["fpr_ci"][0] <= measured["rate"] <= point["fpr_ci"][1],
            "within_4_sigma": abs(measured["rate"] - point["fpr"]) <= 4 * se,
            "unknown_queries_no_match": float((nearest_probe >= t).mean()),
            "enrolled_queries_correct_match": float(((gp[order] == mp) & (dist < t)).mean()),
        })
    return {"enrolled_ids": len(enrolled), "unknown_ids": len(unknown), "unknown_queries": len(probes),
            "enrolled_queries": len(mated), "gallery_images": len(gallery), "extract_seconds": round(seconds, 1),
            "rows": rows}


def _dist(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    from attnreid.evaluation.verification import distance_rows

    f = np.concatenate([a, b])
    d = distance_rows(f, slice(0, len(a)), metric, np.linalg.norm(f, axis=1))
    return d[:, len(a):]


def nearest(q: np.ndarray, g: np.ndarray, metric: str, block: int = 512) -> np.ndarray:
    return np.concatenate([_dist(q[s:s + block], g, metric).min(1) for s in range(0, len(q), block)])


def nearest_valid(q, qp, qc, g, gp, gc, metric: str, block: int = 512):
    """Nearest gallery image of each query under the Market rule (same identity and camera left out)."""
    order, dist = [], []
    for s in range(0, len(q), block):
        d = _dist(q[s:s + block], g, metric)
        d[(qp[s:s + block, None] == gp[None, :]) & (qc[s:s + block, None] == gc[None, :])] = np.inf
        order.append(d.argmin(1))
        dist.append(d.min(1))
    return np.concatenate(order), np.concatenate(dist)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("synthetic", "market"))
    parser.add_argument("--config", help="market: the config the checkpoint was trained with")
    parser.add_argument("--checkpoint", help="market: a checkpoint trained on Market-1501")
    parser.add_argument("--root", help="market: the data root holding Market-1501 (folder or zip)")
    parser.add_argument("--minutes", type=float, default=15.0, help="synthetic: training budget")
    parser.add_argument("--ids", type=int, default=400, help="synthetic: identities (half train, half test)")
    parser.add_argument("--height", type=int, default=128, help="synthetic: image and input height")
    parser.add_argument("--width", type=int, default=64, help="synthetic: image and input width")
    parser.add_argument("--work", default=str(REPO / "scratch" / "bench_verification"), help="synthetic: work folder")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--out", help="result file (default benchmarks/results/verification_<mode>.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from attnreid.config import load_config
    from attnreid.data.datasets import build_dataset_from_config
    from attnreid.deploy.calibration import calibrate_checkpoint
    from attnreid.engine.build import load_model

    t0 = time.perf_counter()
    if args.mode == "synthetic":
        cfg, ckpt = synthetic_run(args)
    else:
        if not (args.config and args.checkpoint and args.root):
            parser.error("market needs --config, --checkpoint and --root")
        cfg, ckpt = load_config(args.config, [f"data.root={args.root}", "eval.amp=off"]), Path(args.checkpoint)
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    cal = calibrate_checkpoint(ckpt, cfg, resamples=args.resamples, progress=True)
    cal_seconds = time.perf_counter() - t0
    model, cfg = load_model(ckpt, cfg)
    dataset = build_dataset_from_config(cfg.data)
    points = [dict(p, metric=cal["metric"]) for p in cal["operating_points"] if p["threshold"] is not None]
    result = held_out(model, cfg, dataset, points, args.resamples)
    out = Path(args.out or RESULTS / f"verification_{args.mode}.json")
    record = {
        "benchmark": "bench_verification", "mode": args.mode, "machine": machine_record(),
        "checkpoint": str(ckpt), "config": {"model": cfg.model.name, "backbone": cfg.model.backbone.name,
                                            "input": [cfg.data.height, cfg.data.width],
                                            "test_feature": cfg.model.test_feature},
        "train_seconds": round(train_seconds, 1) if args.mode == "synthetic" else None,
        "calibration_seconds": round(cal_seconds, 1),
        "calibration": {k: cal[k] for k in ("feature", "data", "identities", "images", "positive_pairs",
                                            "negative_pairs", "negative_pairs_total", "eer", "eer_ci",
                                            "eer_threshold", "operating_points", "bootstrap")},
        "held_out": result,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    for r in result["rows"]:
        print(f"FPR {r['target_fpr']:.0e}: threshold {r['threshold']:.4g}, calibrated FPR {r['calibrated_fpr']:.2e} "
              f"{r['calibrated_fpr_ci']}, unknown people {r['unknown_false_accept_rate']:.2e} "
              f"{r['unknown_false_accept_ci']} (z {r['z']:.2f}), unknown queries 'no match' "
              f"{100 * r['unknown_queries_no_match']:.1f} %, enrolled queries matched "
              f"{100 * r['enrolled_queries_correct_match']:.1f} %")


if __name__ == "__main__":
    main()
