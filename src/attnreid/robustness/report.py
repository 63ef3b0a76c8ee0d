"""Occlusion-robustness report: evaluate model(s) with occluded queries, level by level.

For each condition (occlusion level, occluder kind, position) the query images are
occluded (:mod:`attnreid.robustness.occlusion`, deterministic for a seed), written
losslessly (PNG) to a temporary folder and passed through the engine's own feature
extraction, so the preprocessing (resize, normalisation, flip averaging) is exactly that
of ``attnreid eval``; level 0 uses the original files. Gallery features are extracted once
per model; the occluded query set of a condition is made once and shared by all models.

Metrics per condition come from :func:`attnreid.evaluation.protocols.evaluate` with the
dataset's protocol; a level's summary is the mean over its kinds x positions. Its intervals
and the paired comparisons between models resample the queries, each query scored by its mean
over the level's conditions (the conditions share the queries, so a query's occluded versions
are not independent samples): :func:`level_scores`, :func:`paired_levels`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from attnreid.errors import AttnReidError
from attnreid.evaluation.options import RankingOptions
from attnreid.evaluation.stats import bootstrap_ci, format_ci, format_diff, format_p, paired_bootstrap, sign_test
from attnreid.robustness.occlusion import OCCLUDER_KINDS, POSITIONS, QueryOccluder
from attnreid.safe_io import save_figure, write_text_atomic

DEFAULT_LEVELS = (0, 10, 20, 30, 40, 50)
METRICS = ("rank1", "rank3", "mAP", "mINP")  # the partial protocol gives rank1 and rank3 only
PER_QUERY = ("rank1", "ap", "valid")  # kept per condition for the intervals and paired tests


@dataclass(frozen=True)
class Condition:
    """One evaluation: ``level`` is a fraction of the image area; level 0 has no kind/position."""

    level: float
    kind: str = "none"
    position: str = "none"


@dataclass
class ModelUnderTest:
    """A loaded model and what the report needs to know about it."""

    label: str
    checkpoint: str
    model: Any
    data_cfg: Any  # image size / normalisation the model was trained with, plus the test loader settings
    model_name: str


def parse_levels(text: str) -> List[float]:
    """``"0,0.1,0.2"`` (fractions of the image area, as :func:`run_robustness` takes them) or
    ``"0,10%,20%"`` (per cent) -> ``[0.0, 0.1, 0.2]``, sorted, unique.

    A number above 1 without a % sign could mean either (10 % or ten times the image), so it
    is refused in one line rather than guessed.
    """
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        percent = part.endswith("%")
        try:
            value = float(part[:-1] if percent else part)
        except ValueError:
            raise AttnReidError(f"--levels: '{part}' is not a number; give fractions of the image area (0.1) "
                                "or per cent (10%)") from None
        if percent:
            if not 0.0 <= value <= 100.0:
                raise AttnReidError(f"--levels: {part} is outside 0%..100%")
            value /= 100.0
        elif value > 1.0:
            raise AttnReidError(f"--levels: {part} is ambiguous; write {part}% for per cent or {value / 100:g} "
                                "for a fraction of the image area")
        elif not value >= 0.0:
            raise AttnReidError(f"--levels: {part} is outside 0..1 (a fraction of the image area)")
        out.append(value)
    if not out:
        raise AttnReidError("--levels: give at least one level, e.g. 0,0.1,0.2,0.3 (or 0,10%,20%,30%)")
    return sorted(set(out))


def parse_names(text: str, allowed: Sequence[str], option: str) -> List[str]:
    """A comma-separated subset of ``allowed``, in the given order, without repeats."""
    out: List[str] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if part not in allowed:
            raise AttnReidError(f"{option}: '{part}' is unknown; expected some of: {', '.join(allowed)}")
        if part not in out:
            out.append(part)
    if not out:
        raise AttnReidError(f"{option}: give at least one of: {', '.join(allowed)}")
    return out


def build_conditions(levels: Sequence[float], kinds: Sequence[str], positions: Sequence[str]) -> List[Condition]:
    """Level 0 once (nothing to vary), every kind x position at each other level."""
    out = []
    for level in levels:
        if level == 0:
            out.append(Condition(0.0))
        else:
            out.extend(Condition(level, k, p) for k in kinds for p in positions)
    return out


def occlude_queries(
    query: Sequence[Tuple[str, int, int]],
    cond: Condition,
    seed: int,
    donors: Sequence[Tuple[str, int]],
    read_image: Callable,
    folder: Path,
) -> Tuple[List[Tuple[str, int, int]], float]:
    """Write the occluded queries of one condition under ``folder``; return items and mean coverage."""
    if cond.level == 0:
        return list(query), 0.0
    occluder = QueryOccluder(cond.level, cond.kind, cond.position, seed, donors=donors, read_image=read_image)
    folder.mkdir(parents=True, exist_ok=True)
    items, covered = [], []
    for index, (path, pid, camid) in enumerate(query):
        image, cover = occluder(read_image(path), index, pid)
        out = folder / f"{index:06d}.png"
        image.save(out)
        items.append((str(out), pid, camid))
        covered.append(cover)
    return items, float(np.mean(covered)) if covered else 0.0


def _metrics(result: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: float(result[k]) for k in METRICS if k in result}
    for k in ("num_valid_queries", "num_skipped_queries"):
        if k in result:
            out[k] = int(result[k])
    return out


def evaluate_robustness(
    models: Sequence[ModelUnderTest],
    dataset,
    eval_cfg,
    conditions: Sequence[Condition],
    seed: int = 0,
    device: str = "cpu",
    log: Optional[Callable[[str], None]] = None,
    extract: Optional[Callable] = None,
    evaluate: Optional[Callable] = None,
    read_image: Optional[Callable] = None,
    extract_options: Optional[Dict[str, Any]] = None,
) -> Dict[str, List[Dict[str, Any]]]:
    """Metrics of every model under every condition: ``{label: [row, ...]}``.

    ``extract``/``evaluate``/``read_image`` default to the engine's
    ``extract_with_precision`` (backend and precision settled once per model on its gallery,
    ``eval_cfg.backend``), ``protocols.evaluate`` and the data layer's ``read_image``;
    ``extract_options`` are passed on to ``extract`` (channels_last, amp).
    """
    if evaluate is None:
        from attnreid.evaluation.protocols import evaluate
    if read_image is None:
        from attnreid.data.io import read_image
    if not dataset.query or not dataset.gallery:
        raise AttnReidError(f"dataset '{dataset.name}' has an empty query or gallery split; nothing to evaluate")
    flip = bool(getattr(eval_cfg, "flip", False))
    ranking = RankingOptions.from_config(eval_cfg)

    options = dict(extract_options or {})
    # Per model, how its gallery was computed (backend, precision; an ONNX session): every query
    # set reuses it, so the features are computed alike and auto's choice and export happen once.
    # Auto decides for the size of `attnreid eval`'s job, so level 0 is computed as eval computes it.
    how: Dict[str, Any] = {}
    images = len(dataset.gallery) + len(dataset.query)

    def features(m: ModelUnderTest, items):
        if extract is not None:
            feats, pids, camids = extract(m.model, items, m.data_cfg, device=device, flip=flip, **options)
            return feats, np.asarray(pids), np.asarray(camids)
        from attnreid.inference.extract import extract_with_precision

        amp = how.get(m.label, options.get("amp", getattr(eval_cfg, "amp", "auto")))
        feats, pids, camids, _, how[m.label] = extract_with_precision(
            m.model, items, m.data_cfg, device=device, flip=flip, channels_last=bool(options.get("channels_last")),
            amp=amp, backend=getattr(eval_cfg, "backend", "auto"), num_images=images)
        return feats, np.asarray(pids), np.asarray(camids)

    gallery = {m.label: features(m, dataset.gallery) for m in models}
    donors = [(path, pid) for path, pid, _ in dataset.gallery]
    rows: Dict[str, List[Dict[str, Any]]] = {m.label: [] for m in models}
    with tempfile.TemporaryDirectory(prefix="attnreid-occluded-") as tmp:
        for n, cond in enumerate(conditions):
            items, coverage = occlude_queries(dataset.query, cond, seed, donors, read_image, Path(tmp) / str(n))
            for m in models:
                qf, qp, qc = features(m, items)
                gf, gp, gc = gallery[m.label]
                result = evaluate(
                    qf, gf, qp, gp, qc, gc,
                    protocol=getattr(dataset, "protocol", "market"), ranking=ranking, per_query=True,
                )
                row = {"level": round(cond.level * 100, 6), "kind": cond.kind, "position": cond.position,
                       "coverage": round(coverage * 100, 3), **_metrics(result)}
                if "per_query" in result:  # numpy arrays: build_report keeps them out of the JSON
                    row["per_query"] = {k: np.asarray(result["per_query"][k]) for k in PER_QUERY
                                        if k in result["per_query"]}
                rows[m.label].append(row)
                if log:
                    scores = "  ".join(f"{k} {row[k] * 100:.1f}%" for k in ("rank1", "mAP") if k in row)
                    log(f"{m.label}: level {row['level']:g}% {cond.kind}/{cond.position}: {scores}")
            shutil.rmtree(Path(tmp) / str(n), ignore_errors=True)
    return rows


def level_scores(rows: Sequence[Dict[str, Any]]) -> Dict[float, Dict[str, np.ndarray]]:
    """Per level, each query's rank-1 and AP averaged over the level's conditions.

    ``{level: {"rank1": ..., "ap": ...}}`` over the queries valid in every condition (validity
    depends on the gallery, so it is the same in all of them); empty without per-query rows.
    Their means are the level's rank-1 and mAP.
    """
    out: Dict[float, Dict[str, np.ndarray]] = {}
    for level in sorted({r["level"] for r in rows}):
        at = [r["per_query"] for r in rows if r["level"] == level and "per_query" in r]
        if not at:
            continue
        valid = np.logical_and.reduce([np.asarray(pq.get("valid", np.ones_like(pq["rank1"])), bool) for pq in at])
        out[level] = {k: np.mean([np.asarray(pq[k], np.float64)[valid] for pq in at], axis=0)
                      for k in ("rank1", "ap") if all(k in pq for pq in at)}
    return out


def summarize(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per level, the mean of each metric over the level's kinds x positions, and, given
    per-query rows, 95 % bootstrap intervals of rank-1 and mAP over the queries."""
    out = []
    scores = level_scores(rows)
    for level in sorted({r["level"] for r in rows}):
        at = [r for r in rows if r["level"] == level]
        entry: Dict[str, Any] = {"level": level, "conditions": len(at)}
        for k in METRICS + ("coverage",):
            if all(k in r for r in at):
                entry[k] = float(np.mean([r[k] for r in at]))
        for name, key in (("rank1", "rank1"), ("mAP", "ap")):
            if key in scores.get(level, {}) and len(scores[level][key]):
                entry[f"{name}_ci"] = list(bootstrap_ci(scores[level][key]))
        out.append(entry)
    return out


def _paired(a: np.ndarray, b: np.ndarray) -> Dict[str, Any]:
    boot, sign = paired_bootstrap(a, b), sign_test(a - b)
    return {"diff": boot["diff"], "ci": boot["ci"], "p": sign["p"], "n_a_better": sign["n_pos"],
            "n_b_better": sign["n_neg"]}


def paired_levels(rows_a: Sequence[Dict[str, Any]], rows_b: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Model A against model B on the same occluded queries, level by level.

    Per level: ``rank1``/``mAP``, A minus B (paired bootstrap interval, exact sign test), and
    for occluded levels ``rank1_drop``/``mAP_drop``: how much more A loses than B from its
    clean score (each query's clean minus occluded score, A's minus B's; negative: A loses
    less, i.e. is more robust). Empty without per-query rows or a clean level.
    """
    sa, sb = level_scores(rows_a), level_scores(rows_b)
    out = []
    for level in sorted(set(sa) & set(sb)):
        entry: Dict[str, Any] = {"level": level}
        for name, key in (("rank1", "rank1"), ("mAP", "ap")):
            if key not in sa[level] or key not in sb[level]:
                continue
            entry[name] = _paired(sa[level][key], sb[level][key])
            if level > 0 and 0 in sa and 0 in sb and key in sa[0] and key in sb[0]:
                entry[f"{name}_drop"] = _paired(sa[0][key] - sa[level][key], sb[0][key] - sb[level][key])
        out.append(entry)
    return out


def build_report(
    models: Sequence[ModelUnderTest],
    rows: Dict[str, List[Dict[str, Any]]],
    dataset,
    levels: Sequence[float],
    kinds: Sequence[str],
    positions: Sequence[str],
    seed: int,
) -> Dict[str, Any]:
    """The JSON document: settings, then per model the per-level summary and every condition."""
    return {
        "dataset": dataset.name,
        "protocol": getattr(dataset, "protocol", "market"),
        "num_query": len(dataset.query),
        "num_gallery": len(dataset.gallery),
        "levels": [round(lv * 100, 6) for lv in levels],
        "kinds": list(kinds),
        "positions": list(positions),
        "seed": int(seed),
        # Files left out because data.skip_bad_images was set (unreadable, empty, misnamed).
        "skipped_images": [path for path, _ in getattr(dataset, "bad_images", [])],
        "models": [
            {
                "label": m.label,
                "checkpoint": m.checkpoint,
                "model": m.model_name,
                "per_level": summarize(rows[m.label]),
                "conditions": [{k: v for k, v in r.items() if k != "per_query"} for r in rows[m.label]],
            }
            for m in models
        ],
        # Every further model against the first one, on the same occluded queries.
        "paired": [
            {"a": m.label, "b": models[0].label, "levels": paired_levels(rows[m.label], rows[models[0].label])}
            for m in models[1:]
        ],
    }


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 100:.1f}"


def _cell(entry: Dict[str, Any], metric: str) -> str:
    return "-" if entry.get(metric) is None else format_ci(entry[metric], entry.get(f"{metric}_ci"))


def _paired_table(report: Dict[str, Any], pair: Dict[str, Any]):
    """A minus B per level: the scores, and the extra loss from the clean score (negative: A is
    more robust), each with its paired interval and sign-test p."""
    from rich.table import Table

    t = Table(title=f"{pair['a']} minus {pair['b']} (points, paired 95 % interval; drop: loss from the "
                    f"clean score, negative = {pair['a']} loses less)")
    t.add_column("occluded", justify="right", no_wrap=True)
    keys = [k for k in ("rank1", "rank1_drop", "mAP", "mAP_drop") if any(k in lv for lv in pair["levels"])]
    for k in keys:
        t.add_column(k.replace("_", " "), justify="right", no_wrap=True)
    for lv in pair["levels"]:
        t.add_row(f"{lv['level']:g}%", *(f"{format_diff(lv[k])} {format_p(lv[k]['p'])}" if k in lv else "-"
                                         for k in keys))
    return t


def report_tables(report: Dict[str, Any]) -> list:
    """Rich tables: rank-1 / mAP per level for every model, then per kind/position when several."""
    from rich.table import Table

    tables = []
    main = Table(title=f"Occlusion robustness on {report['dataset']} ({report['num_query']} queries, "
                       f"{report['num_gallery']} gallery; seed {report['seed']}; %, ± 95 % interval over queries)")
    main.add_column("occluded", justify="right", no_wrap=True)
    for m in report["models"]:
        main.add_column(f"{m['label']}\nrank-1", justify="right", no_wrap=True)
        main.add_column(f"{m['label']}\nmAP", justify="right", no_wrap=True)
    for i, level in enumerate(report["levels"]):
        cells = [f"{level:g}%"]
        for m in report["models"]:
            entry = m["per_level"][i]
            cells += [_cell(entry, "rank1"), _cell(entry, "mAP")]
        main.add_row(*cells)
    tables.append(main)
    tables.extend(_paired_table(report, pair) for pair in report.get("paired", []) if pair["levels"])
    if len(report["kinds"]) * len(report["positions"]) > 1:
        levels = [lv for lv in report["levels"] if lv > 0]
        for m in report["models"]:
            t = Table(title=f"{m['label']}: rank-1 / mAP per occluder (%)")
            t.add_column("kind / position", no_wrap=True)
            for lv in levels:
                t.add_column(f"{lv:g}%", justify="right", no_wrap=True)
            for kind in report["kinds"]:
                for pos in report["positions"]:
                    cells = [f"{kind} / {pos}"]
                    for lv in levels:
                        r = next(r for r in m["conditions"] if r["level"] == lv and r["kind"] == kind and r["position"] == pos)
                        cells.append(f"{_pct(r.get('rank1'))} / {_pct(r.get('mAP'))}")
                    t.add_row(*cells)
            tables.append(t)
    return tables


def plot_report(report: Dict[str, Any], path: str | Path) -> Path:
    """PNG: rank-1 and mAP against the occluded share, one curve per model.

    With several occluder kinds a second row shows each kind (mean over positions),
    one colour per model and one line style per kind.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len(report["kinds"]) > 1
    fig, axes = plt.subplots(2 if several else 1, 2, figsize=(10, 7.5 if several else 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["--", ":", "-."]
    for col, (metric, name) in enumerate((("rank1", "rank-1"), ("mAP", "mAP"))):
        ax = axes[0][col]
        for i, m in enumerate(report["models"]):
            pts = [(e["level"], e[metric] * 100) for e in m["per_level"] if metric in e]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=colors[i % len(colors)], label=m["label"])
        ax.set_title(f"{name} (mean over occluders)")
        if several:
            ax2 = axes[1][col]
            for i, m in enumerate(report["models"]):
                clean = [r for r in m["conditions"] if r["level"] == 0]
                for j, kind in enumerate(report["kinds"]):
                    pts = [(0.0, clean[0][metric])] if clean and metric in clean[0] else []
                    for lv in report["levels"]:
                        at = [r[metric] for r in m["conditions"]
                              if r["level"] == lv and r["kind"] == kind and metric in r]
                        if lv > 0 and at:
                            pts.append((lv, float(np.mean(at))))
                    ax2.plot([p[0] for p in pts], [p[1] * 100 for p in pts], styles[j % len(styles)], marker=".",
                             color=colors[i % len(colors)], label=f"{m['label']}: {kind}")
            ax2.set_title(f"{name} per occluder kind")
        for ax in axes[:, col]:
            ax.set_xlabel("occluded share of the query image (%)")
            ax.set_ylabel(f"{name} (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Occlusion robustness on {report['dataset']}")
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: Dict[str, Any], out_dir: str | Path) -> Tuple[Path, Path]:
    """``robustness.json`` and ``robustness.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AttnReidError(f"cannot create the output folder {out_dir}: {exc.strerror}") from None

    json_path = write_text_atomic(out_dir / "robustness.json", json.dumps(report, indent=2))
    return json_path, plot_report(report, out_dir / "robustness.png")


def model_label(checkpoint: str | Path, model_name: str, taken: Sequence[str]) -> str:
    """``<run folder>/<checkpoint stem>``, made unique among ``taken``."""
    ckpt = Path(checkpoint)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    base = f"{run.name or model_name}/{ckpt.stem}"
    label, n = base, 2
    while label in taken:
        label, n = f"{base}#{n}", n + 1
    return label


def load_models(checkpoints: Sequence[str], cfg, device: str) -> List[ModelUnderTest]:
    """Load each checkpoint (``weights_only``, via the engine); keep its own image settings.

    The image size and normalisation are the ones the model was trained with (from the
    checkpoint's config); the loader settings (batch size, workers, bad images) are the
    user's config.
    """
    from attnreid.engine.build import load_model

    out: List[ModelUnderTest] = []
    for ckpt in checkpoints:
        model, ckpt_cfg = load_model(ckpt, None, device=device)
        data_cfg = replace(
            cfg.data,
            height=ckpt_cfg.data.height, width=ckpt_cfg.data.width,
            mean=list(ckpt_cfg.data.mean), std=list(ckpt_cfg.data.std),
        )
        name = getattr(model, "model_name", ckpt_cfg.model.name)
        out.append(ModelUnderTest(model_label(ckpt, name, [m.label for m in out]), str(ckpt), model, data_cfg, name))
    return out


def run_robustness(
    cfg,
    checkpoints: Sequence[str],
    levels: Sequence[float] = tuple(lv / 100 for lv in DEFAULT_LEVELS),
    kinds: Sequence[str] = OCCLUDER_KINDS,
    positions: Sequence[str] = POSITIONS,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """The whole report for ``checkpoints`` on the evaluation set of ``cfg``.

    The set is ``cfg.eval.dataset``/``cfg.eval.root`` when given, else
    ``cfg.data.dataset``/``cfg.data.root``; ``cfg.train.threads`` (when > 0) sets torch's
    CPU threads, ``cfg.train.device``/``channels_last`` and ``cfg.eval.amp`` the extraction.
    """
    import torch

    from attnreid.data.datasets import build_dataset_from_config
    from attnreid.engine.build import eval_data_config, resolve_device

    cfg = replace(cfg, data=eval_data_config(cfg))
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    dataset = build_dataset_from_config(cfg.data)
    if cfg.data.skip_bad_images:
        # Decode query and gallery once up front: the occluders read the queries (and the
        # person donors) outside the loader, so a bad file must be gone before they run.
        import copy

        from attnreid.data.loader import check_images

        dataset = copy.copy(dataset)
        dataset.train = []
        dataset = check_images(dataset, skip_bad_images=True)
    from attnreid.data.datasets.base import warn_bad, warn_unknown_cameras

    if getattr(dataset, "bad_images", None):
        warn_bad(dataset.bad_images)
    warn_unknown_cameras(dataset)
    models = load_models(checkpoints, cfg, device)
    conditions = build_conditions(levels, kinds, positions)
    extract_options = {
        "channels_last": bool(cfg.train.channels_last),
        "amp": cfg.eval.amp,
    }
    rows = evaluate_robustness(models, dataset, cfg.eval, conditions, seed=seed, device=device, log=log,
                               extract_options=extract_options)
    return build_report(models, rows, dataset, levels, kinds, positions, seed)
