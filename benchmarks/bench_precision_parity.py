"""bf16 vs float32 training and inference parity on a Market-1501 subset, on this CPU.

Trains the ResNet-18 Baseline (or ``--model mhsanet``, K = 8) at 128x64 from random initialisation on the first
``--train-ids`` Market-1501 training identities, the same number of steps in each run,
with ``train.amp=off`` and ``train.amp=bf16`` and two seeds each (the seed-to-seed spread
is the run-to-run noise the precision difference is measured against). Every run is
evaluated with float32 features (``eval.amp=off``) on the queries and gallery of the
first ``--test-ids`` test identities, so the runs differ only in training precision.
Then the test features of one trained model (seed 0, float32 training) are extracted in
float32 and in bf16 autocast: per-image cosine (mean, min) and rank-1 / mAP from each.

    python benchmarks/bench_precision_parity.py [--steps 40] [--train-ids 150] [--test-ids 30] [--seeds 0,1]
    python benchmarks/bench_precision_parity.py --trained mhsanet=RUN/checkpoints/last.pth ...

``--trained`` does no training: it extracts the full Market-1501 query and gallery with
each given trained checkpoint in float32 and in bf16 autocast and compares them (mean
and minimum cosine, rank-1 and mAP from each), the issue's check of a trained model.

Writes benchmarks/results/precision_parity.json (the machine and the load average at the
start and end of every run are recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _data import DATA_ROOT
from _machine import machine_record
from bench_market_smoke import subset

from attnreid.config import load_config
from attnreid.data.datasets import build_dataset_from_config
from attnreid.engine.build import load_model
from attnreid.engine.trainer import train
from attnreid.evaluation.protocols import evaluate
from attnreid.inference.extract import extract_features

RESULTS = Path(__file__).resolve().parent / "results"


def load() -> list:
    return [round(v, 2) for v in os.getloadavg()]


def config(args, amp: str, seed: int):
    steps_per_epoch = args.steps_per_epoch
    return load_config(None, [
        "data.dataset=market1501", f"data.root={args.root}", f"data.height={args.height}", f"data.width={args.width}",
        f"data.batch_size={args.batch}", "data.num_instances=4", f"data.workers={args.workers}",
        "data.test_batch_size=64", f"model.name={args.model}", "model.backbone.name=resnet18",
        "model.backbone.pretrained=false", "optim.lr=1e-3", "optim.warmup_epochs=1", "optim.warmup_start_lr=1e-4",
        "optim.milestones=[1000]", f"train.epochs={args.steps // steps_per_epoch}",
        f"train.max_steps_per_epoch={steps_per_epoch}", "train.eval_every=0", "train.device=cpu",
        f"train.threads={args.threads}", "train.log_every=20", f"train.seed={seed}", f"train.amp={amp}",
        "eval.amp=off"])


def metrics(qf, gf, q_ids, g_ids, protocol: str) -> dict:
    m = evaluate(qf, gf, q_ids[0], g_ids[0], q_ids[1], g_ids[1], protocol=protocol)
    return {"rank1": round(float(m["rank1"]), 4), "mAP": round(float(m["mAP"]), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(DATA_ROOT))
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps per run (a multiple of --steps-per-epoch)")
    ap.add_argument("--steps-per-epoch", type=int, default=10)
    ap.add_argument("--train-ids", type=int, default=150)
    ap.add_argument("--test-ids", type=int, default=30)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--model", default="baseline", choices=("baseline", "mhsanet"),
                    help="ResNet-18 Baseline, or MHSA-Net (K = 8) with its default losses")
    ap.add_argument("--amps", default="off,bf16")
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="run folders (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=RESULTS / "precision_parity.json")
    ap.add_argument("--no-agreement", action="store_true", help="skip the bf16-vs-fp32 feature check")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="combine result files of runs made in separate processes into --out")
    ap.add_argument("--trained", nargs="+", default=None, metavar="NAME=CKPT",
                    help="no training: the float32-vs-bf16 feature check of these trained checkpoints on the full "
                         "Market-1501 query and gallery, added to --out under trained_agreement")
    args = ap.parse_args()
    if args.trained:
        trained_agreement(args)
        return
    if args.merge:
        merge(args.merge, args.out, args.amps.split(","))
        return
    if args.steps % args.steps_per_epoch:
        ap.error("--steps must be a multiple of --steps-per-epoch")
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="parity_"))
    machine = machine_record()
    t_all = time.perf_counter()
    full = build_dataset_from_config(config(args, "off", 0).data)
    ds = subset(full, args.train_ids, args.test_ids)
    print(f"Market-1501 subset: {len(ds.train)} train images / {ds.num_train_pids} ids; "
          f"{len(ds.query)} queries, {len(ds.gallery)} gallery", flush=True)
    out = {
        "benchmark": f"bf16 vs fp32 training parity, {args.model} ResNet-18 {args.height}x{args.width}, Market-1501 subset",
        "model": args.model,
        "machine": machine,
        "dataset": {"train_ids": ds.num_train_pids, "train_images": len(ds.train), "test_ids": args.test_ids,
                    "num_query": len(ds.query), "num_gallery": len(ds.gallery)},
        "steps": args.steps, "batch": args.batch, "threads": args.threads, "eval_precision": "float32 (eval.amp=off)",
        "runs": [], "complete": False,
        "note": ("run-to-run noise = the mAP spread between seeds of one precision; the precisions match when "
                 "their mean mAP differs by no more than that spread. A 2-core machine shared with other jobs: "
                 "see the load averages (speed only; the metrics do not depend on load). The file is rewritten "
                 "after every run, so an interrupted benchmark leaves the runs it finished (complete: false)."),
    }
    amps = args.amps.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    for i, (seed, amp) in enumerate((s, a) for s in seeds for a in amps):
        cfg = config(args, amp, seed)
        start = load()
        t0 = time.perf_counter()
        res = train(cfg, work / f"{amp}_seed{seed}", overwrite=True, dataset=ds, eval_dataset=ds, quiet=True)
        row = {"train_amp": amp, "precision": res.get("precision"), "seed": seed, "steps": res["step"],
               "epochs": res["epoch"], "status": res["status"], "rank1": round(res["rank1"], 4),
               "mAP": round(res["mAP"], 4), "img_per_s": res["img_per_s"],
               "train_seconds": round(res["train_seconds"], 1), "wall_seconds": round(time.perf_counter() - t0, 1),
               "load_average_start": start, "load_average_end": load()}
        row["loaded"] = max(row["load_average_start"][0], row["load_average_end"][0]) > 1
        out["runs"].append(row)
        print(json.dumps(row), flush=True)
        if i == 0 and not args.no_agreement:  # the first trained model's test features in float32 and in bf16 autocast
            out["inference_agreement"] = agreement(work / f"{amp}_seed{seed}" / "checkpoints" / "last.pth", ds, work)
            print(json.dumps(out["inference_agreement"]), flush=True)
        summarise(out, amps)
        write(args.out, out, t_all)
    out["complete"] = True
    write(args.out, out, t_all)
    print(json.dumps(out, indent=2))


def trained_agreement(args) -> None:
    """bf16 against float32 test features of trained models on the full Market-1501 test split."""
    torch.set_num_threads(args.threads)
    full = build_dataset_from_config(config(args, "off", 0).data)
    out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rows = out.setdefault("trained_agreement", {})
    for item in args.trained:
        name, _, ckpt = item.partition("=")
        res = agreement(Path(ckpt), full, Path(ckpt).parents[2])
        res.update({"checkpoint": f"{name}: the {name} run of benchmarks/bench_market_accuracy.py (last.pth)",
                    "num_query": len(full.query), "num_gallery": len(full.gallery), "machine": machine_record()})
        rows[name] = res
        print(json.dumps({name: res}), flush=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


def agreement(ckpt: Path, ds, work: Path) -> dict:
    model, cfg = load_model(ckpt, device="cpu")
    start = load()
    feats = {}
    for amp in ("off", "bf16"):
        t0 = time.perf_counter()
        qf, q_pids, q_cams = extract_features(model, ds.query, cfg.data, amp=amp, backend="torch")  # PyTorch's bf16
        gf, g_pids, g_cams = extract_features(model, ds.gallery, cfg.data, amp=amp, backend="torch")
        feats[amp] = (qf, gf, time.perf_counter() - t0)
    ids = ((q_pids, q_cams), (g_pids, g_cams))
    cos = torch.nn.functional.cosine_similarity(torch.cat(feats["off"][:2]), torch.cat(feats["bf16"][:2]), dim=1)
    m32, m16 = (metrics(*feats[a][:2], *ids, ds.protocol) for a in ("off", "bf16"))
    res = {
        "model": str(ckpt.relative_to(work)), "images": int(cos.numel()), "threads": torch.get_num_threads(),
        "mean_cosine": round(float(cos.mean()), 6), "min_cosine": round(float(cos.min()), 6),
        "fp32_features": m32, "bf16_features": m16,
        "rank1_diff_points": round(100 * (m16["rank1"] - m32["rank1"]), 2),
        "mAP_diff_points": round(100 * (m16["mAP"] - m32["mAP"]), 2),
        "extract_seconds": {"fp32": round(feats["off"][2], 1), "bf16": round(feats["bf16"][2], 1)},
        "target": "mean cosine >= 0.999 and rank-1 within 0.5 points",
        "load_average_start": start, "load_average_end": load(),
    }
    res["meets_target"] = res["mean_cosine"] >= 0.999 and abs(res["rank1_diff_points"]) <= 0.5
    return res


def merge(files, out_path: Path, amps) -> None:
    """One result from several processes' files (same subset and steps; their runs side by side)."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    first = parts[0]
    for p in parts[1:]:
        if (p["dataset"], p["steps"], p["batch"]) != (first["dataset"], first["steps"], first["batch"]):
            raise SystemExit(f"cannot merge: different subset or steps in {files}")
    out = {**first, "runs": [r for p in parts for r in p["runs"]],
           "complete": all(p["complete"] for p in parts), "merged_from": [str(f) for f in files],
           "machines": [p["machine"] for p in parts]}
    agreements = [p["inference_agreement"] for p in parts if "inference_agreement" in p]
    if agreements:
        out["inference_agreement"] = agreements[0]
    summarise(out, amps)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def summarise(out: dict, amps) -> None:
    summary = {}
    for amp in amps:
        vals = [r["mAP"] for r in out["runs"] if r["train_amp"] == amp]
        if vals:
            summary[amp] = {"runs": len(vals), "mAP_mean": round(statistics.mean(vals), 4),
                            "mAP_seed_spread_points": round(100 * (max(vals) - min(vals)), 2) if len(vals) > 1 else None}
    out["summary"] = summary
    if len(summary) == 2:
        a, b = (summary[k]["mAP_mean"] for k in amps)
        out["mAP_diff_points_bf16_minus_fp32"] = round(100 * (b - a), 2)


def write(path: Path, out: dict, t_all: float) -> None:
    out["load_average_end"] = load()
    out["wall_seconds"] = round(time.perf_counter() - t_all, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
