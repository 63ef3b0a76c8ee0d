"""Proof on real data: Baseline, MHSA-Net (and MHSA-Net*) and HA-CNN trained from scratch on Market-1501.

Each model trains from random initialisation on the full Market-1501 training split (the
official zip in ``$ATTNREID_DATA``, default ``data/``, read in place) with its CPU recipe,
``configs/cpu/market1501_{baseline,mhsanet,hacnn}.yaml``: the same PK batch, the same
identity-epochs and so the same number of optimiser steps for every model, bf16 autocast
where the CPU has it. ``data.val_ids`` training identities are held out as a validation
split; nothing is tuned on the test split. Then, from ``last.pth``:

- the Market protocol on the full query/gallery, without and with re-ranking;
- MHSA-Net* (p* alone) from the same MHSA-Net run;
- head diversity of MHSA-Net on the query set: the mean pairwise overlap of the K
  attention maps and the entropy of SAFFM's beta (``attnreid.evaluation.attention_stats``);
- ``attnreid robustness`` (block, person and erasing occluders at the top, bottom and side,
  0-50 % of the image) for the Baseline and MHSA-Net on one query per test identity
  (``--robust-queries``) against the full gallery.

    python benchmarks/bench_market_accuracy.py [--models baseline,mhsanet,hacnn] [--epochs 34]
        [--threads 2] [--out scratch/market_accuracy] [--smoke]

Runs go to ``--out`` (git-ignored); ``benchmarks/results/market_accuracy.json`` is rewritten
after every model, so a long run commits its results as they come. ``--smoke`` trains two
epochs on 40 identities with a small test set, to check the script.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import DATA_ROOT  # noqa: E402
from _machine import git_commit, machine_record  # noqa: E402

from attnreid.config import load_config  # noqa: E402
from attnreid.data.datasets import build_dataset_from_config  # noqa: E402
from attnreid.engine.build import load_model, resolve_device  # noqa: E402
from attnreid.engine.evaluator import evaluate_model  # noqa: E402
from attnreid.engine.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "market_accuracy.json"
CONFIGS = {m: ROOT / "configs" / "cpu" / f"market1501_{m}.yaml" for m in ("baseline", "mhsanet", "hacnn", "mhsanet_orth", "mhsanet_diverse", "mhsanet_heads",
                                                                                    "mhsanet_rows", "mhsanet_rows_cap", "mhsanet_rows_centre", "bot")}
METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def pick(metrics: dict) -> dict:
    out = {k: round(float(metrics[k]), 5) for k in METRICS if k in metrics}
    for k in ("rank1_ci", "mAP_ci"):
        if k in metrics:
            out[k] = [round(float(x), 5) for x in metrics[k]]
    return out


def head_diversity(model, dataset, cfg, device, limit: int = 1024) -> dict:
    """Head diversity of MHSA-Net over the first ``limit`` queries (eval mode), by
    :func:`attnreid.evaluation.attention_stats.attention_stats`, rounded, in this file's key names."""
    from attnreid.data.loader import build_test_loader
    from attnreid.evaluation.attention_stats import attention_stats

    grids, betas = [], []
    model.eval()
    with torch.inference_mode():
        for batch in build_test_loader(cfg.data, dataset.query[:limit]):
            out = model.forward_attention(batch[0].to(device))
            grids.append(out["attention"].float().cpu())
            if "beta" in out:
                betas.append(out["beta"].float().cpu())
    stats = attention_stats(torch.cat(grids), torch.cat(betas) if betas else None)
    res = {"images": stats["num_images"], "num_heads": int(grids[0].shape[1]),
           "head_overlap": round(stats["head_overlap"], 4),
           "head_heights": [round(x, 3) for x in stats["head_heights"]],
           "centre_mass": round(stats["centre_mass"], 4), "centre_mass_uniform": stats["centre_mass_uniform"],
           "map_consistency": round(stats["map_consistency"], 4)}
    if betas:
        res.update({"beta_entropy": round(stats["beta_entropy"], 4),
                    "beta_entropy_max": round(stats["beta_entropy_max"], 4),
                    "beta_mean_per_head": [round(x, 4) for x in stats["beta_mean"]]})
    return res


def robustness(cfg, checkpoints, dataset, device, num_queries: int, log) -> dict:
    """Occlusion curves of the given checkpoints on one query per test identity, the full gallery."""
    from attnreid.robustness.report import build_conditions, evaluate_robustness, load_models, paired_levels, summarize

    rng = np.random.default_rng(0)
    by_pid = {}
    for item in dataset.query:
        by_pid.setdefault(item[1], []).append(item)
    pids = sorted(by_pid)
    queries = [by_pid[p][rng.integers(len(by_pid[p]))] for p in pids][:num_queries]
    ds = copy.copy(dataset)
    ds.query, ds.train = queries, []
    levels = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    conditions = build_conditions(levels, ("block", "person", "erasing"), ("top", "bottom", "side"))
    models = load_models(checkpoints, cfg, str(device))
    rows = evaluate_robustness(models, ds, cfg.eval, conditions, seed=0, device=str(device), log=log)
    first = models[0].label
    # Every further model against the first, per level: score and loss from the clean score
    # (paired over the queries, each query's mean over the level's 9 conditions).
    return {"num_query": len(queries), "num_gallery": len(ds.gallery), "levels_percent": [100 * x for x in levels],
            "curves": {label: summarize(r) for label, r in rows.items()},
            "paired": {f"{m.label} vs {first}": paired_levels(rows[m.label], rows[first]) for m in models[1:]}}


def rank1_hits(run: Path) -> np.ndarray:
    """Per query, whether the first valid gallery image (Market protocol) has its identity.

    Read from the run's ``eval_ranks.npz`` (the final test evaluation's top 50): gallery
    images of the query's identity seen by the query's camera are skipped, as the protocol
    drops them.
    """
    r = np.load(run / "eval_ranks.npz")
    qp, qc, gp, gc, top = r["query_pids"], r["query_camids"], r["gallery_pids"], r["gallery_camids"], r["topk_index"]
    junk = (gp[top] == qp[:, None]) & (gc[top] == qc[:, None])
    first = np.argmax(~junk, axis=1)
    return (gp[top[np.arange(len(top)), first]] == qp).astype(np.float64)


def paired_rank1(out: Path, a: str, b: str) -> dict:
    """Paired bootstrap interval and exact McNemar (sign) test of rank-1 of run ``a`` minus run ``b``."""
    from attnreid.evaluation.stats import paired_bootstrap, sign_test

    ha, hb = rank1_hits(out / a), rank1_hits(out / b)
    res = paired_bootstrap(ha, hb)
    test = sign_test(ha - hb)
    return {"a": a, "b": b, "rank1_a": round(float(ha.mean()), 5), "rank1_b": round(float(hb.mean()), 5),
            "rank1_diff": round(res["diff"], 5), "rank1_diff_ci95": [round(x, 5) for x in res["ci"]],
            "a_only_hits": test["n_pos"], "b_only_hits": test["n_neg"], "p_sign_test": test["p"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(DATA_ROOT))
    ap.add_argument("--models", default="baseline,mhsanet,hacnn", help=f"any of {', '.join(CONFIGS)}")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs (same for all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "scratch" / "market_accuracy")
    ap.add_argument("--robust-queries", type=int, default=750)
    ap.add_argument("--no-robustness", action="store_true")
    ap.add_argument("--robustness-only", action="store_true",
                    help="no training: the occlusion curves of the baseline and mhsanet runs already in --out")
    ap.add_argument("--smoke", action="store_true", help="2 epochs on 40 ids, small test set: checks the script")
    ap.add_argument("--seed", type=int, default=None,
                    help="train.seed for every model; the runs and their entries are then named MODEL_seedN")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--paired", default="mhsanet:baseline,mhsanet:hacnn,mhsanet_diverse:mhsanet,hacnn:baseline",
                    help="A:B pairs of runs in --out compared on rank-1 (paired bootstrap, sign test)")
    ap.add_argument("--paired-only", action="store_true", help="no training: only the paired comparisons")
    ap.add_argument("--diversity-only", action="store_true",
                    help="no training: recompute the head diversity of the --models runs already in --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    result = json.loads(args.results.read_text()) if args.results.is_file() and not args.smoke else {}
    result.update({"benchmark": "bench_market_accuracy", "dataset": "Market-1501 (official zip, full splits)",
                   "initialisation": "random (no ImageNet weights)", "commit": git_commit()})
    result.setdefault("models", {})
    result["machine"] = machine_record()

    def save() -> None:
        # Several processes (one per model) may share the file: merge into what is there now.
        on_disk = json.loads(args.results.read_text()) if args.results.is_file() and not args.smoke else {}
        models_now = {**on_disk.get("models", {}), **result["models"]}
        merged = {**on_disk, **result, "models": models_now}
        args.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.results.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
        tmp.replace(args.results)

    full = None
    if args.diversity_only:
        full = build_dataset_from_config(load_config(CONFIGS["mhsanet"], [f"data.root={args.root}"]).data)
        for key in models:
            model, run_cfg = load_model(args.out / key / "checkpoints" / "last.pth", None, device="cpu")
            on_disk = json.loads(args.results.read_text())["models"][key]
            result["models"][key] = {**on_disk, "diversity": head_diversity(model, full, run_cfg, torch.device("cpu"))}
            print(key, result["models"][key]["diversity"], flush=True)
        save()
        return
    if args.paired_only:
        models = []
    if args.robustness_only:
        models = []
        full = build_dataset_from_config(load_config(CONFIGS["baseline"], [f"data.root={args.root}"]).data)
    for name in models:
        overrides = [f"data.root={args.root}", f"train.threads={args.threads}", "train.device=cpu"]
        if args.epochs:
            overrides.append(f"train.epochs={args.epochs}")
        if args.seed is not None:
            overrides.append(f"train.seed={args.seed}")
        if args.smoke:
            overrides += ["train.epochs=2", "data.max_ids=40", "data.val_ids=8", "train.eval_every=1"]
        cfg = load_config(CONFIGS[name], overrides)
        if full is None:
            full = build_dataset_from_config(cfg.data)
            if args.smoke:
                keep = set(sorted({p for _, p, _ in full.query})[:30])
                full.query = [it for it in full.query if it[1] in keep][:60]
                full.gallery = ([it for it in full.gallery if it[1] in keep]
                                + [it for it in full.gallery if it[1] not in keep][:300])
        key = name if args.seed is None else f"{name}_seed{args.seed}"
        run = args.out / key
        print(f"== {name}: {CONFIGS[name].relative_to(ROOT)}  -> {run}", flush=True)
        t0 = time.perf_counter()
        summary = train(cfg, run, overwrite=True, eval_dataset=full)
        train_s = time.perf_counter() - t0
        device = resolve_device(cfg.train.device)
        last = run / "checkpoints" / "last.pth"
        model, run_cfg = load_model(last, None, device=str(device))
        entry = {"config": str(CONFIGS[name].relative_to(ROOT)), "steps": summary["step"], "epochs": summary["epoch"],
                 "train_wall_seconds": round(train_s, 1), "img_per_s": summary.get("img_per_s"),
                 "data_wait": summary.get("data_wait"), "precision": summary.get("precision"),
                 "status": summary.get("status"), "val_best_mAP": summary.get("best_val_mAP"),
                 "backbone": run_cfg.model.backbone.name, "input": [run_cfg.data.height, run_cfg.data.width],
                 "batch": run_cfg.data.batch_size, "val_ids": run_cfg.data.val_ids,
                 "load_average_end": machine_record()["load_average"]}
        t1 = time.perf_counter()
        entry["test"] = pick(evaluate_model(model, full, run_cfg, device=device, rerank=False))
        entry["test_rerank"] = pick(evaluate_model(model, full, run_cfg, device=device, rerank=True))
        if name.startswith("mhsanet"):
            star_cfg = copy.deepcopy(run_cfg)
            star_cfg.model.test_feature = "star"
            star, _ = load_model(last, star_cfg, device=str(device))
            result["models"][f"{key}_star"] = {
                "from": "the mhsanet run's last.pth, test feature p*",
                "test": pick(evaluate_model(star, full, star_cfg, device=device, rerank=False)),
                "test_rerank": pick(evaluate_model(star, full, star_cfg, device=device, rerank=True))}
            entry["diversity"] = head_diversity(model, full, run_cfg, device)
        entry["eval_seconds"] = round(time.perf_counter() - t1, 1)
        entry["seed"] = run_cfg.train.seed
        entry["commit"] = git_commit()
        result["models"][key] = entry
        print(json.dumps({key: entry}, indent=1), flush=True)
        save()
    pairs = [p.split(":") for p in args.paired.split(",") if p]
    done = [(a, b) for a, b in pairs if (args.out / a / "eval_ranks.npz").is_file() and (args.out / b / "eval_ranks.npz").is_file()]
    if done:
        result["paired_rank1"] = [paired_rank1(args.out, a, b) for a, b in done]
        save()
    if args.robustness_only or (not args.no_robustness and {"baseline", "mhsanet"} <= set(models)):
        cfg = load_config(CONFIGS["mhsanet"], [f"data.root={args.root}", f"train.threads={args.threads}"])
        ckpts = [str(args.out / m / "checkpoints" / "last.pth") for m in ("baseline", "mhsanet")]
        t2 = time.perf_counter()
        result["robustness"] = robustness(cfg, ckpts, full, resolve_device("cpu"), args.robust_queries,
                                          log=lambda s: print(s, flush=True))
        result["robustness"]["seconds"] = round(time.perf_counter() - t2, 1)
        result["robustness"]["machine"] = machine_record()
        save()
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
