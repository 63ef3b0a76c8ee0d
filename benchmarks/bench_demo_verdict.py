"""How often does the demo's verdict agree with itself? The demo run 3 times, with 3 training seeds.

    nohup nice -n 10 python benchmarks/bench_demo_verdict.py [--seeds 3] [--minutes 6] [--out scratch/demo_verdict] &

Runs ``attnreid demo`` (``attnreid.apps.demo.run_demo``, default sizes and the default 6-minute
budget per seed) with ``--seeds 3 --threads 1`` (one torch thread: on a shared 2-core machine under
load, two threads spend most of their time waiting for each other at every kernel's barrier): the same synthetic data set and queries, ``train.seed`` 0, 1
and 2. For each seed it records every model's rank-1 / mAP with their bootstrap intervals, the
paired MHSA-Net - Baseline comparison (mAP and rank-1 difference, interval, sign-test p) and the
verdict; then how many seeds gave the most common verdict, and the mean ± sd over seeds. The HTML
reports are not written (they do not change the verdict, and the machine is shared).

Writes benchmarks/results/demo_verdict.json (with ``machine_record()`` at the start and the end:
the demo shares its budget by wall-clock time, so the load of the machine matters) and the
demo's console output to ``OUT/console.txt``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_record  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--minutes", type=float, default=6.0, help="budget per seed (the demo's default)")
    ap.add_argument("--out", type=Path, default=Path("scratch/demo_verdict"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (train.threads); 1 on a shared machine, where two threads wait on each other")
    ap.add_argument("--init", default="scratch", choices=("scratch", "imagenet"),
                    help="how the Baseline's and MHSA-Net's backbone starts (attnreid demo --init); "
                         "imagenet writes demo_verdict_imagenet.json")
    ap.add_argument("--models", default="baseline,mhsanet,hacnn", help="attnreid demo --models")
    ap.add_argument("--num-ids", type=int, default=None, help="smaller data set for a quick check of this script")
    ap.add_argument("--images-per-id", type=int, default=None)
    args = ap.parse_args()

    from attnreid.apps.demo import IMAGES_PER_ID, NUM_IDS, run_demo

    start = machine_record()
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "console.txt", "w") as log, redirect_stdout(_Tee(sys.__stdout__, log)):
        result = run_demo(minutes=args.minutes, out_dir=args.out, seeds=args.seeds, report=False, threads=args.threads,
                          num_ids=args.num_ids or NUM_IDS, images_per_id=args.images_per_id or IMAGES_PER_ID,
                          init=args.init, models=args.models.split(","))
    per_seed = []
    for seed, res in enumerate(result["per_seed"]):
        cmp = res["comparisons"].get("MHSA-Net", {})
        per_seed.append({
            "seed": seed, "verdict": res["verdict"], "winner": res["winner"],
            "mhsanet_minus_baseline": {k: {x: cmp[k][x] for x in ("diff", "ci", "p", "n_a_better", "n_b_better")}
                                       for k in ("mAP", "rank1")} if cmp else None,
            "rows": [{k: r.get(k) for k in ("label", "rank1", "rank1_ci", "mAP", "mAP_ci", "mINP", "epochs",
                                             "img_per_s", "train_seconds", "status")} for r in res["rows"]],
        })
    out = {
        "benchmark": "agreement of the demo's verdict over training seeds",
        "command": f"run_demo(minutes={args.minutes}, seeds={args.seeds}, threads={args.threads}, init={args.init!r}, "
                   f"models={args.models!r}) = attnreid demo --seeds {args.seeds} --threads {args.threads} "
                   f"--init {args.init} --models {args.models}",
        "init": args.init,
        "threads": args.threads,
        "num_query": result["num_query"], "num_gallery": result["num_gallery"],
        "num_train_ids": result["num_train_ids"], "minutes_per_seed": args.minutes,
        "seconds_per_seed": [r["seconds"] for r in result["per_seed"]],
        "agreement": result["agreement"], "summary_over_seeds": result["summary"], "per_seed": per_seed,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "machine_at_start": start, "machine_at_end": machine_record(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("demo_verdict.json" if args.init == "scratch" else f"demo_verdict_{args.init}.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"verdict over {args.seeds} seeds: {result['agreement']['text']}; wrote {path}", file=sys.__stdout__)


if __name__ == "__main__":
    main()
