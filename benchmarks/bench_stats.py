"""Bootstrap intervals and paired comparisons at Market-1501 size (issue 16).

    python benchmarks/bench_stats.py [--resamples 1000] [--repeats 3]

Real Market-1501 query/gallery ids and cameras (3,368 x 15,913, from the official zip's file names)
with identity-correlated random features (dimension 512), as in bench_evaluation.py. Times:

- ``evaluate_rank`` with and without ``per_query=True`` (the per-query output must cost ~nothing);
- ``stats.bootstrap_metrics`` (rank-1, mAP, mINP and every CMC rank to 50; target < 1 s at 1,000
  resamples);
- ``stats.compare`` of two models (paired bootstrap of AP and rank-1 differences, sign tests).

Best of ``--repeats`` runs each, on one thread. Writes benchmarks/results/evaluation_stats.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_record  # noqa: E402
from bench_evaluation import best_of, features, market_ids  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from attnreid.evaluation import compute_distance, evaluate_rank, stats

    torch.set_num_threads(1)
    qp, qc, gp, gc = market_ids()
    pids = np.concatenate([qp, gp])
    cams = np.concatenate([qc, gc])
    out = {"benchmark": "bootstrap intervals and paired comparison at Market-1501 size",
           "num_query": len(qp), "num_gallery": len(gp), "resamples": args.resamples, "machine": machine_record()}
    per_model = []
    for seed in (0, 1):
        f = torch.from_numpy(features(pids, cams, 512, seed=seed))
        dist = compute_distance(f[: len(qp)], f[len(qp):])
        plain, t_plain, _ = best_of(lambda: evaluate_rank(dist, qp, gp, qc, gc), args.repeats)
        full, t_pq, _ = best_of(lambda: evaluate_rank(dist, qp, gp, qc, gc, per_query=True), args.repeats)
        assert {k: v for k, v in full.items() if k != "per_query"} == plain
        per_model.append(full)
        if seed == 0:
            out["evaluate_rank_seconds"] = round(t_plain, 3)
            out["evaluate_rank_per_query_seconds"] = round(t_pq, 3)
    pq = per_model[0]["per_query"]
    ci, t_boot, _ = best_of(lambda: stats.bootstrap_metrics(pq, args.resamples, max_rank=50), args.repeats)
    _, t_boot_nocmc, _ = best_of(lambda: stats.bootstrap_metrics(pq, args.resamples), args.repeats)
    cmp, t_cmp, _ = best_of(lambda: stats.compare(per_model[0]["per_query"], per_model[1]["per_query"],
                                                  args.resamples), args.repeats)
    m = per_model[0]
    out.update({
        "bootstrap_seconds": round(t_boot, 3), "bootstrap_without_cmc_seconds": round(t_boot_nocmc, 3),
        "compare_seconds": round(t_cmp, 3), "target_seconds": 1.0, "meets_target": t_boot < 1.0,
        "example": {"mAP": m["mAP"], "mAP_ci": ci["mAP_ci"], "rank1": m["rank1"], "rank1_ci": ci["rank1_ci"],
                    "mINP": m["mINP"], "mINP_ci": ci["mINP_ci"], "mAP_text": stats.metric_text({**m, **ci}, "mAP"),
                    "rank1_text": stats.metric_text({**m, **ci}, "rank1")},
        "compare_example": {"mAP_diff": cmp["mAP"]["diff"], "mAP_diff_ci": cmp["mAP"]["ci"], "p": cmp["mAP"]["p"],
                            "verdict": stats.verdict(cmp)},
    })
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "evaluation_stats.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
