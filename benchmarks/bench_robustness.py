"""Benchmark: the occlusion-robustness report on Market-1501 (a subset), timed.

    .venv/bin/python benchmarks/bench_robustness.py [--checkpoint CKPT] [--train-minutes 8]

1. A subset of the Market-1501 zip (``$ATTNREID_DATA``, default ``data/``) is written in the Market layout under
   ``scratch/bench_robustness/data`` (git-ignored; never in the repository): ``--train-ids``
   training identities, ``--num-query`` queries (one per test identity, random camera),
   and a gallery of every gallery image of those identities plus ``--distractors`` other
   gallery images (other identities and Market's distractors, pid 0).
2. The model: ``--checkpoint`` when given; else the engine benchmark's Market smoke
   checkpoint when one exists; else a small baseline (ResNet-18, no pretraining)
   trained for ``--train-minutes`` at 64x32 on the subset's training identities with
   ``attnreid.engine.trainer.train``.
3. ``attnreid.robustness.report.run_robustness`` on the subset (every kind and position,
   levels 0..50 %), exactly what ``attnreid robustness`` runs.

Writes ``benchmarks/results/robustness_market1501.json`` (the report plus timings and the
set-up) and ``robustness_market1501.png`` next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _data import MARKET_ZIP  # noqa: E402
RESULTS = REPO / "benchmarks" / "results"
SMOKE_CHECKPOINTS = [  # where the engine benchmark leaves its Market smoke run
    REPO / "scratch" / "bench_engine" / "market1501" / "checkpoints" / "last.pth",
    REPO / "runs" / "bench_market_smoke" / "checkpoints" / "last.pth",
]


def parse_name(name: str):
    pid, rest = name.split("_", 1)
    return int(pid), int(rest[1])


def write_subset(zip_path: Path, out: Path, train_ids: int, num_query: int, distractors: int, seed: int) -> Path:
    """Copy a Market-1501 subset (file bytes unchanged) into ``out/market1501``."""
    rng = np.random.default_rng(seed)
    base = out / "market1501"
    marker = base / "subset.json"
    spec = {"zip": str(zip_path), "train_ids": train_ids, "num_query": num_query, "distractors": distractors, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if n.endswith(".jpg")]
        split = {s: sorted(n for n in names if f"/{s}/" in n) for s in ("bounding_box_train", "query", "bounding_box_test")}
        train_pids = sorted({parse_name(Path(n).name)[0] for n in split["bounding_box_train"]})
        keep_train = set(rng.choice(train_pids, size=min(train_ids, len(train_pids)), replace=False).tolist())
        by_pid: dict = {}
        for n in split["query"]:
            by_pid.setdefault(parse_name(Path(n).name)[0], []).append(n)
        query_pids = sorted(by_pid)
        chosen = rng.choice(query_pids, size=min(num_query, len(query_pids)), replace=False).tolist()
        queries = [by_pid[p][rng.integers(len(by_pid[p]))] for p in chosen]
        chosen_set = set(chosen)
        gallery = [n for n in split["bounding_box_test"] if parse_name(Path(n).name)[0] in chosen_set]
        others = [n for n in split["bounding_box_test"]
                  if parse_name(Path(n).name)[0] not in chosen_set and parse_name(Path(n).name)[0] >= 0]
        gallery += rng.choice(others, size=min(distractors, len(others)), replace=False).tolist()
        selection = {
            "bounding_box_train": [n for n in split["bounding_box_train"] if parse_name(Path(n).name)[0] in keep_train],
            "query": queries,
            "bounding_box_test": gallery,
        }
        for folder, members in selection.items():
            (base / folder).mkdir(parents=True, exist_ok=True)
            for n in members:
                (base / folder / Path(n).name).write_bytes(zf.read(n))
    marker.write_text(json.dumps(spec))
    return out


def train_small(root: Path, run_dir: Path, minutes: float, threads: int) -> Path:
    from attnreid.config import load_config
    from attnreid.engine.trainer import train

    cfg = load_config(None, [
        "data.dataset=market1501", f"data.root={root}", "data.height=64", "data.width=32",
        "data.batch_size=32", "data.num_instances=4", "data.test_batch_size=128", "data.workers=0",
        "model.name=baseline", "model.backbone.name=resnet18", "model.backbone.last_stride=2",
        "optim.lr=1e-3", "optim.warmup_epochs=0", "optim.milestones=[1000]",
        "train.epochs=1000", "train.eval_every=0", f"train.max_minutes={minutes}", "train.device=cpu",
        f"train.threads={threads}", "train.log_every=20",
    ])
    result = train(cfg, run_dir, overwrite=True, quiet=True)
    print(f"trained {result['epoch']} epochs / {result['step']} steps in {result['train_seconds']:.0f} s: "
          f"rank-1 {result.get('rank1', float('nan')) * 100:.1f}%  mAP {result.get('mAP', float('nan')) * 100:.1f}%",
          file=sys.stderr)
    return run_dir / "checkpoints" / "last.pth"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a trained checkpoint (default: smoke run, else train one)")
    ap.add_argument("--zip", default=str(MARKET_ZIP))
    ap.add_argument("--train-ids", type=int, default=300)
    ap.add_argument("--num-query", type=int, default=200)
    ap.add_argument("--distractors", type=int, default=1000)
    ap.add_argument("--train-minutes", type=float, default=8.0)
    ap.add_argument("--levels", default="0,10,20,30,40,50")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "robustness_market1501.json"))
    args = ap.parse_args()

    import torch
    from _machine import machine_record

    from attnreid.config import load_config
    from attnreid.robustness.report import parse_levels, plot_report, report_tables, run_robustness

    torch.set_num_threads(args.threads)
    if not Path(args.zip).is_file():
        sys.exit(f"Market-1501 zip not found: {args.zip}")
    work = REPO / "scratch" / "bench_robustness"
    t0 = time.perf_counter()
    root = write_subset(Path(args.zip), work / "data", args.train_ids, args.num_query, args.distractors, args.seed)
    t_subset = time.perf_counter() - t0

    ckpt, trained_here = args.checkpoint, False
    if ckpt is None:
        ckpt = next((str(p) for p in SMOKE_CHECKPOINTS if p.is_file()), None)
    t_train = 0.0
    if ckpt is None:
        t0 = time.perf_counter()
        ckpt = str(train_small(root, work / "run", args.train_minutes, args.threads))
        t_train, trained_here = time.perf_counter() - t0, True

    cfg = load_config(None, ["data.dataset=market1501", f"data.root={root}", "data.test_batch_size=128",
                             "data.workers=0", "train.device=cpu", f"train.threads={args.threads}"])
    t0 = time.perf_counter()
    report = run_robustness(cfg, [ckpt], parse_levels(args.levels), seed=args.seed,
                            log=lambda line: print(line, file=sys.stderr, flush=True))
    t_report = time.perf_counter() - t0
    n_cond = len(report["models"][0]["conditions"])
    from attnreid.data.datasets import build_dataset
    from attnreid.apps.demo import chance_level

    run_eval = Path(ckpt).parent.parent / "eval.json"
    report["benchmark"] = {
        # A random ranking's rank-1 on this subset: how far above chance the model is.
        "chance": chance_level(build_dataset("market1501", str(root))),
        "training": ({k: v for k, v in json.loads(run_eval.read_text()).items()
                      if k in ("rank1", "mAP", "epoch", "step", "num_query", "num_gallery")}
                     if run_eval.is_file() else None),
        "subset": {"train_ids": args.train_ids, "num_query": report["num_query"], "num_gallery": report["num_gallery"],
                   "distractors": args.distractors, "source": Path(args.zip).name},
        "checkpoint": ckpt, "trained_here": trained_here, "train_minutes": args.train_minutes if trained_here else None,
        "device": "cpu", "threads": args.threads,
        "seconds": {"subset": round(t_subset, 1), "train": round(t_train, 1), "report": round(t_report, 1)},
        "conditions": n_cond, "machine": machine_record(),
        "query_images_per_second": round(n_cond * report["num_query"] / t_report, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot_report(report, out.with_suffix(".png"))
    from rich.console import Console

    console = Console(width=200)
    for table in report_tables(report):
        console.print(table)
    print(f"wrote {out} ({t_report:.0f} s for {n_cond} conditions)")


if __name__ == "__main__":
    main()
