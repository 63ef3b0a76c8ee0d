"""`attnreid demo`: Baseline vs MHSA-Net (and HA-CNN) on the synthetic occluded set, on the CPU.

What it does, within ``minutes`` in total: generate the synthetic set (every query
occluded, Occluded-Duke-like; nothing downloaded), train each model at a reduced size
for its share of the time, evaluate it (MHSA-Net twice: concat(p*, q*) and the star
feature p* alone, from one training run), print a table next to the chance level, say
plainly whether the attention branch beat the Baseline on the occluded queries at this
budget, and write the HTML report when the visualisation layer is installed.

Reduced size, chosen by measuring on a shared 2-core CPU (a few minutes must give
tens of optimiser steps, not a handful): synthetic set of 40 identities x 8 images
(generated at 128x64), ResNet-18 backbone (random init: no download) at 64x32 input,
MHSA-Net with K = 4 heads, HA-CNN at half its paper input (80x32) with widths scaled
to 1/8 (about 250 images/s here, so it sees far more epochs than the ResNet-18 models
in its share); PK batches of 4 identities x 4 images; Adam 1e-3 with no warm-up and no
decay. Every choice is in :func:`demo_configs` and can be read from each run's
``config.yaml``.

The models share the budget by wall-clock time, so on a machine shared with other jobs
one model can see much less training than another; the verdict says so when the
Baseline and MHSA-Net trained on clearly different numbers of images.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from attnreid.config import Config, from_dict, save_config

MODEL_ROWS = ("baseline", "mhsanet", "hacnn")
# Share of the training time each model gets. Baseline and MHSA-Net get equal shares: at
# this size MHSA-Net is only ~10 % slower per image (141 vs 157 img/s measured), and a
# bigger share would let it see more images than the model it is compared with.
TIME_WEIGHTS = {"baseline": 0.35, "mhsanet": 0.35, "hacnn": 0.3}


def demo_configs(data_root: Path, num_ids: int = 40, images_per_id: int = 8, threads: int = 0) -> Dict[str, Config]:
    """The reduced-size configuration of each demo model."""
    common: Dict[str, Any] = {
        "data": {"dataset": "synthetic", "root": str(data_root), "height": 64, "width": 32, "flip": True,
                 "batch_size": 16, "num_instances": 4, "test_batch_size": 64, "workers": 0,
                 "synthetic": {"num_ids": num_ids, "images_per_id": images_per_id, "num_cameras": 4,
                               "height": 128, "width": 64, "occluded_query_share": 1.0, "seed": 0}},
        "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 5e-4, "warmup_epochs": 0, "warmup_start_lr": 1e-4,
                  "milestones": [1000], "gamma": 0.1},
        "train": {"epochs": 1000, "eval_every": 0, "device": "cpu", "log_every": 5, "threads": threads, "seed": 0},
        "model": {"backbone": {"name": "resnet18", "pretrained": False, "last_stride": 1}},
    }
    baseline = _merge(common, {"model": {"name": "baseline"}})
    mhsanet = _merge(common, {"model": {"name": "mhsanet", "mhsanet": {"num_heads": 4}}})
    hacnn = _merge(common, {
        "data": {"height": 80, "width": 32, "flip": False},
        "model": {"name": "hacnn", "hacnn": {"widths": [16, 32, 48], "embed_dim": 128}},
        "optim": {"lr": 1e-3}})
    return {"baseline": from_dict(baseline, "demo baseline"), "mhsanet": from_dict(mhsanet, "demo mhsanet"),
            "hacnn": from_dict(hacnn, "demo hacnn")}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def chance_level(dataset: Any) -> Dict[str, float]:
    """Expected rank-1 and mAP of a random ranking under the Market protocol.

    Rank-1: per query, matches / valid gallery images (same-id-same-camera removed).
    mAP of a random order is close to that same share (exactly its expectation for one
    match), so the table shows rank-1 chance only and mAP as an approximation.
    """
    g = np.array([(pid, cam) for _, pid, cam in dataset.gallery])
    shares = []
    for _, pid, cam in dataset.query:
        valid = ~((g[:, 0] == pid) & (g[:, 1] == cam))
        matches = (g[valid, 0] == pid).sum()
        if matches:
            shares.append(matches / valid.sum())
    r1 = float(np.mean(shares)) if shares else 0.0
    return {"rank1": r1, "mAP": r1}


def run_demo(minutes: float = 6.0, out_dir: str | Path = "runs/demo", models: Sequence[str] = MODEL_ROWS,
             quiet: bool = False, num_ids: int = 40, images_per_id: int = 8, threads: int = 0,
             overrides: Sequence[str] = (), report: bool = True) -> Dict[str, Any]:
    """Run the demo; returns a JSON-able dict (rows, chance level, verdict, paths).

    ``overrides`` (KEY=VALUE) apply to every model's config, e.g. a smaller input for tests.
    ``report=False`` skips the HTML report (it is tested with the visualisation layer).
    """
    from rich.console import Console
    from rich.table import Table

    from attnreid.config import load_config, to_dict
    from attnreid.data.datasets import build_dataset_from_config
    from attnreid.engine.build import load_model
    from attnreid.engine.evaluator import evaluate_model, write_report_if_available
    from attnreid.engine.trainer import train
    from attnreid.errors import AttnReidError

    t_start = time.perf_counter()
    budget_s = minutes * 60.0
    console = Console(quiet=quiet, highlight=False)
    unknown = [m for m in models if m not in MODEL_ROWS]
    if unknown or not models:
        raise AttnReidError(f"--models has {unknown or 'nothing'}; choose from {', '.join(MODEL_ROWS)}")
    if "mhsanet" in models and "baseline" not in models:
        raise AttnReidError("--models needs 'baseline' next to 'mhsanet': the demo compares the two")
    if minutes <= 0:
        raise AttnReidError(f"--minutes is {minutes}; it must be > 0")
    out_dir = Path(out_dir)
    configs = demo_configs(out_dir / "data", num_ids, images_per_id, threads)
    if overrides:
        configs = {n: load_config(None, _flatten(to_dict(c)) + list(overrides)) for n, c in configs.items()}

    console.print(f"[bold]attnreid demo[/bold]: synthetic occluded set, {', '.join(models)} on the CPU, "
                  f"budget {minutes:g} min")
    dataset = build_dataset_from_config(configs[models[0]].data)
    chance = chance_level(dataset)
    n_train_ids = len({pid for _, pid, _ in dataset.train})
    console.print(f"data: {len(dataset.train)} training images of {n_train_ids} identities; "
                  f"{len(dataset.query)} queries (all occluded), {len(dataset.gallery)} gallery images "
                  f"({time.perf_counter() - t_start:.0f} s)")

    rows: List[Dict[str, Any]] = []
    run_dirs: List[Path] = []
    remaining = list(models)
    for name in models:
        elapsed = time.perf_counter() - t_start
        left = budget_s - elapsed
        weight = TIME_WEIGHTS[name] / sum(TIME_WEIGHTS[m] for m in remaining)
        # Keep ~20 % of each share for building the model and evaluating it.
        train_minutes = max(left * weight * 0.8, 1.0) / 60.0
        remaining.remove(name)
        cfg = configs[name]
        cfg.train.max_minutes = train_minutes
        run = out_dir / "runs" / name
        console.print(f"training {name} for up to {60 * train_minutes:.0f} s ...")
        result = train(cfg, run, overwrite=True, quiet=True)
        rows.append(_row(name, "default", result))
        run_dirs.append(run)
        if name == "mhsanet":
            star_cfg = from_dict({**to_dict(cfg), "model": {**to_dict(cfg)["model"], "test_feature": "star"}},
                                 "demo mhsanet star")
            star_run = out_dir / "runs" / "mhsanet_star"
            model, star_cfg = load_model(run / "checkpoints" / "last.pth", star_cfg)
            save_config(star_cfg, star_run / "config.yaml")
            m = evaluate_model(model, dataset, star_cfg, out_dir=star_run,
                               extra={"checkpoint": str(run / "checkpoints" / "last.pth"), "epoch": result["epoch"]})
            star = dict(result, **{k: m[k] for k in ("rank1", "rank5", "rank10", "mAP", "feature_dim")})
            rows.append(_row("mhsanet", "star", star))
            run_dirs.append(star_run)

    verdict = _verdict(rows, len(dataset.query))
    table = Table(title=f"Occluded synthetic queries ({len(dataset.query)} queries, {len(dataset.gallery)} gallery)")
    for col in ("model", "test feature", "R1", "R5", "mAP", "epochs", "train s", "img/s"):
        table.add_column(col, justify="left" if col in ("model", "test feature") else "right")
    for r in rows:
        table.add_row(r["label"], r["feature"], f"{100 * r['rank1']:.1f}", f"{100 * r['rank5']:.1f}",
                      f"{100 * r['mAP']:.1f}", str(r["epochs"]), f"{r['train_seconds']:.0f}", f"{r['img_per_s']:.1f}")
    table.add_row("chance", "random ranking", f"{100 * chance['rank1']:.1f}", "", f"~{100 * chance['mAP']:.1f}",
                  "", "", "")
    console.print(table)
    console.print(verdict)
    report_path = None
    if report:
        try:
            report_path = write_report_if_available(run_dirs, out_dir / "report")
        except AttnReidError as exc:
            console.print(f"report not written: {exc}")
    if report_path is not None:
        console.print(f"report: {report_path}")
    total = time.perf_counter() - t_start
    console.print(f"total {total:.0f} s; runs in {out_dir / 'runs'}")
    result = {"rows": rows, "chance": chance, "verdict": verdict, "num_query": len(dataset.query),
              "num_gallery": len(dataset.gallery), "seconds": round(total, 1), "minutes": minutes,
              "report": str(report_path) if report_path else None, "runs": [str(d) for d in run_dirs]}
    (out_dir / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


LABELS = {("baseline", "default"): "Baseline", ("mhsanet", "default"): "MHSA-Net",
          ("mhsanet", "star"): "MHSA-Net*", ("hacnn", "default"): "HA-CNN"}
FEATURES = {("baseline", "default"): "q* (512)", ("mhsanet", "default"): "concat(p*, q*)",
            ("mhsanet", "star"): "p* (SAFFM)", ("hacnn", "default"): "global+local"}


def _row(name: str, feature: str, result: Dict[str, Any]) -> Dict[str, Any]:
    return {"model": name, "label": LABELS[(name, feature)], "feature": FEATURES[(name, feature)],
            "rank1": float(result["rank1"]), "rank5": float(result["rank5"]), "mAP": float(result["mAP"]),
            "epochs": int(result["epoch"]), "train_seconds": float(result["train_seconds"]),
            "img_per_s": float(result["img_per_s"]), "status": result["status"]}


def _verdict(rows: List[Dict[str, Any]], num_query: int) -> str:
    """One honest sentence: did MHSA-Net (either feature) beat the Baseline on the occluded queries?"""
    base = next((r for r in rows if r["model"] == "baseline"), None)
    mhsa = [r for r in rows if r["model"] == "mhsanet"]
    if base is None or not mhsa:
        return "No Baseline/MHSA-Net pair was trained, so the attention branch is not compared."
    best = max(mhsa, key=lambda r: (r["mAP"], r["rank1"]))
    d_r1, d_map = 100 * (best["rank1"] - base["rank1"]), 100 * (best["mAP"] - base["mAP"])
    step = 100.0 / max(num_query, 1)  # one query more or less moves rank-1 by this much
    if d_map > 0 and d_r1 >= 0 and (d_r1 > step or d_map > 1.0):
        word = "helped"
    elif d_map < 0 and d_r1 <= 0 and (-d_r1 > step or -d_map > 1.0):
        word = "did NOT help (it scored lower)"
    else:
        word = "made no clear difference"
    text = (f"At this budget the attention branch {word} on occluded queries: {best['label']} R1 "
            f"{100 * best['rank1']:.1f}% / mAP {100 * best['mAP']:.1f}% vs Baseline {100 * base['rank1']:.1f}% / "
            f"{100 * base['mAP']:.1f}% ({d_r1:+.1f} / {d_map:+.1f} points; one query = {step:.1f} R1 points; "
            f"the paper's gains need its full 400-epoch schedule with ImageNet weights).")
    seen_base, seen_mhsa = _images_seen(base), _images_seen(best)
    if min(seen_base, seen_mhsa) <= 0 or max(seen_base, seen_mhsa) / min(seen_base, seen_mhsa) > UNEQUAL_WORK:
        text += (f" Caveat: not an equal-work comparison: in their equal time shares MHSA-Net trained on "
                 f"{seen_mhsa:.0f} images ({best['epochs']} epochs) and the Baseline on {seen_base:.0f} "
                 f"({base['epochs']} epochs), e.g. because other jobs shared the CPU.")
    return text


# Above this ratio of training images seen, the verdict warns that the pair is not comparable.
UNEQUAL_WORK = 1.25


def _images_seen(row: Dict[str, Any]) -> float:
    return row["img_per_s"] * row["train_seconds"]


def _flatten(d: dict, prefix: str = "") -> List[str]:
    out: List[str] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, key + "."))
        elif v is None:
            out.append(f"{key}=null")
        else:
            out.append(f"{key}={json.dumps(v)}")
    return out
