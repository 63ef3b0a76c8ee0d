"""Real-data smoke test: a few minutes of training on a Market-1501 subset, on this CPU.

Reads the official zip directly (``$ATTNREID_DATA/Market-1501-v15.09.15.zip``, default
``data/``, or ``--root``), keeps the first ``--train-ids`` training identities and the first
``--test-ids`` test identities (their queries, and their gallery images), trains a small
model from random initialisation (no ImageNet weights: nothing is downloaded) with
``train.max_minutes``, evaluates with the Market protocol and compares rank-1 and mAP
with the chance level of a random ranking on the same subset.

    python benchmarks/bench_market_smoke.py [--minutes 4] [--model baseline] [--backbone resnet18] [--seeds N]

Each metric comes with its 95 % bootstrap interval over the queries (query noise). ``--seeds N``
trains N times (``train.seed`` 0..N-1, ``--minutes`` each) on the same subset and adds the mean ±
sd over seeds (training noise; ``attnreid.evaluation.stats.summarise_seeds``).

Writes benchmarks/results/market_smoke.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine_record

from attnreid.config import load_config
from attnreid.data.datasets import build_dataset_from_config
from attnreid.data.datasets.base import ReIDDataset
from attnreid.apps.demo import chance_level
from attnreid.engine.trainer import train
from attnreid.evaluation import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import DATA_ROOT  # noqa: E402
from _machine import machine_record  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def subset(full: ReIDDataset, train_ids: int, test_ids: int) -> ReIDDataset:
    """First ``train_ids`` training identities; queries and gallery of the first ``test_ids`` test identities."""
    keep_train = sorted({pid for _, pid, _ in full.train})[:train_ids]
    train_items = [it for it in full.train if it[1] in set(keep_train)]
    keep_test = set(sorted({pid for _, pid, _ in full.query})[:test_ids])
    query = [it for it in full.query if it[1] in keep_test]
    gallery = [it for it in full.gallery if it[1] in keep_test]
    ds = ReIDDataset(train_items, query, gallery, root=full.root)
    ds.name, ds.protocol = f"{full.name}-subset", full.protocol
    return ds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(DATA_ROOT))
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--model", default="baseline", choices=["baseline", "mhsanet"])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--train-ids", type=int, default=100)
    ap.add_argument("--test-ids", type=int, default=50)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="PK batch (4 images per identity)")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: a temp dir)")
    ap.add_argument("--seeds", type=int, default=1, help="train this many times (train.seed 0..N-1)")
    args = ap.parse_args()
    cfg = load_config(None, [
        "data.dataset=market1501", f"data.root={args.root}", f"data.height={args.height}", f"data.width={args.width}",
        f"data.batch_size={args.batch}", "data.num_instances=4", "data.workers=2", "data.test_batch_size=64",
        f"model.name={args.model}", f"model.backbone.name={args.backbone}", "model.backbone.pretrained=false",
        "model.mhsanet.num_heads=4", "optim.lr=1e-3", "optim.warmup_epochs=1", "optim.warmup_start_lr=1e-4",
        "optim.milestones=[1000]", "train.epochs=1000", "train.eval_every=0", "train.device=cpu",
        f"train.max_minutes={args.minutes}", "train.log_every=10"])
    t0 = time.perf_counter()
    full = build_dataset_from_config(cfg.data)
    ds = subset(full, args.train_ids, args.test_ids)
    chance = chance_level(ds)
    base = args.out or Path(tempfile.mkdtemp(prefix="market_smoke_"))
    print(f"Market-1501 subset: {len(ds.train)} train images / {ds.num_train_pids} ids; "
          f"{len(ds.query)} queries, {len(ds.gallery)} gallery; chance rank-1 {100 * chance['rank1']:.1f}%")
    keys = ("rank1", "rank5", "rank10", "mAP", "mINP")
    runs = []
    for seed in range(args.seeds):
        cfg.train.seed = seed
        result = train(cfg, base if args.seeds == 1 else base / f"seed{seed}", overwrite=True, dataset=ds,
                       eval_dataset=ds)
        runs.append({"seed": seed, "epochs": result["epoch"], "steps": result["step"],
                     "img_per_s": result["img_per_s"], "data_wait": result["data_wait"],
                     **{k: result[k] for k in keys},
                     **{f"{k}_ci": result[f"{k}_ci"] for k in ("rank1", "mAP", "mINP") if f"{k}_ci" in result}})
        print(f"seed {seed}: " + "  ".join(f"{k} {stats.metric_text(result, k)}" for k in ("rank1", "mAP", "mINP")))
    first = runs[0]
    out = {
        "dataset": "Market-1501 subset (official zip, read in place)",
        "train_ids": ds.num_train_pids, "train_images": len(ds.train), "test_ids": args.test_ids,
        "num_query": len(ds.query), "num_gallery": len(ds.gallery),
        "model": args.model, "backbone": args.backbone, "pretrained": False, "input": [args.height, args.width],
        "budget_minutes": args.minutes, "batch": args.batch, "seeds": args.seeds,
        **{k: v for k, v in first.items() if k != "seed"},
        "ci": "95% percentile bootstrap over the queries, 1000 resamples (query noise; seed 0's run)",
        "chance_rank1": chance["rank1"], "chance_mAP_approx": chance["mAP"],
        "rank1_over_chance": round(first["rank1"] / max(chance["rank1"], 1e-9), 2),
        "wall_seconds": round(time.perf_counter() - t0, 1), "machine": machine_record(),
    }
    if args.seeds > 1:
        out["per_seed"] = runs
        out["over_seeds"] = stats.summarise_seeds(runs, keys)
        for k in ("rank1", "mAP"):
            print(f"{k} over {args.seeds} seeds: {stats.format_mean_std(out['over_seeds'][k])}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "market_smoke.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
