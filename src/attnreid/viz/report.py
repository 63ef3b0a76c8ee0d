"""The HTML report of one or several runs: metrics table, plots, ranked lists, attention.

``write_report(run_dirs, out_dir)`` writes ``out_dir/index.html`` and its pictures in
the sibling folder ``out_dir/report_files/``. The page fetches nothing from the network
(no scripts, fonts or styles from elsewhere) and works opened straight from disk.

Per run it reads what the run folder holds (docs/design.md, Engine) and shows what is
there: ``config.yaml`` (model, backbone, data set), ``eval.json`` (metrics table, CMC),
``log.jsonl`` (training curves), ``eval_ranks.npz`` (ranked lists of the worst queries),
``checkpoints/{best,last}.pth`` (attention overlays of those queries, for MHSA-Net
and HA-CNN) and ``checkpoints/calibration.json`` (``attnreid calibrate``: ROC/DET curves and
thresholds). A run that has not been evaluated yet is said to be so on the page.
"""

from __future__ import annotations

import datetime as _dt
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence
from urllib.parse import quote

import yaml

from attnreid import __version__
from attnreid.errors import AttnReidError, DataError
from attnreid.evaluation.paired import PER_QUERY_FILE, compare_evaluated, load_run
from attnreid.evaluation.stats import format_diff, format_p, level_text, metric_text, verdict
from attnreid.models.registry import find_spec
from attnreid.safe_io import BoundedSafeLoader, read_json
from attnreid.viz import ranking
from attnreid.viz.page import CSS, GENERATOR_TAG, check_page_folder

ASSETS = "report_files"
MAX_CONFIG_BYTES = 1 << 20  # a run's config.yaml is a few KiB

# The papers' tables: Rank-1/5/10 and mAP (MHSA-Net Tables I-V, HA-CNN Tables 1-4); the
# partial sets report Rank-1 and Rank-3 (MHSA-Net Table VI).
COLUMNS = {
    "market": [("Rank-1", "rank1"), ("Rank-5", "rank5"), ("Rank-10", "rank10"), ("mAP", "mAP")],
    "partial": [("R1", "rank1"), ("R3", "rank3")],
}



@dataclass
class RunInfo:
    """What one run folder holds, read leniently: the report shows what is there."""

    path: Path
    label: str
    config: Optional[dict] = None
    eval: Optional[dict] = None
    log: List[dict] = field(default_factory=list)
    ranks_path: Optional[Path] = None
    checkpoint: Optional[Path] = None
    calibration: Optional[dict] = None
    notes: List[str] = field(default_factory=list)

    @property
    def model(self) -> str:
        name = (self.eval or {}).get("model") or _get(self.config, "model.name")
        return str(name) if name else "?"

    @property
    def dataset(self) -> str:
        name = (self.eval or {}).get("dataset") or _get(self.config, "data.dataset")
        return str(name) if name else "?"

    @property
    def protocol(self) -> str:
        return str((self.eval or {}).get("protocol") or "market")


def _get(d: Optional[dict], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def read_run(path: str | Path, label: Optional[str] = None) -> RunInfo:
    """Collect a run folder's files; a folder with none of them is a DataError."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"run folder not found: {path}")
    run = RunInfo(path=path, label=label or path.name)
    known = [p for p in ("config.yaml", "eval.json", "log.jsonl", "checkpoints", "calibration.json")
             if (path / p).exists()]
    if not known:
        raise DataError(f"{path} is not a run folder (no config.yaml, eval.json, log.jsonl or checkpoints/)")
    if (path / "config.yaml").is_file():
        try:  # bounded: a hostile run folder's anchors must not expand into the page
            cfg = yaml.load((path / "config.yaml").read_bytes()[:MAX_CONFIG_BYTES], Loader=BoundedSafeLoader)
            run.config = cfg if isinstance(cfg, dict) else None
        except (yaml.YAMLError, RecursionError, OSError):
            run.notes.append("config.yaml could not be parsed")
    if (path / "eval.json").is_file():
        try:
            ev = read_json(path / "eval.json", "eval.json")
            run.eval = ev if isinstance(ev, dict) else None
        except DataError:
            run.notes.append("eval.json could not be parsed")
    from attnreid.viz.plots import read_log  # matplotlib: imported when a report is written

    run.log = read_log(path / "log.jsonl")
    if (path / "eval_ranks.npz").is_file():
        run.ranks_path = path / "eval_ranks.npz"
    # The overlays should come from the weights the ranked lists came from: the checkpoint
    # eval.json names (`attnreid eval --out DIR`), else the final weights (last.pth: a run's
    # closing evaluation is of those), else best.pth.
    evaluated = (run.eval or {}).get("checkpoint")
    candidates = [Path(evaluated), path / evaluated] if isinstance(evaluated, str) else []
    candidates += [path / "checkpoints" / "last.pth", path / "checkpoints" / "best.pth"]
    run.checkpoint = next((c for c in candidates if c.is_file()), None)
    for cal in (path / "checkpoints" / "calibration.json", path / "calibration.json"):
        if cal.is_file():
            try:  # bounded, as eval.json
                value = read_json(cal, cal.name)
                run.calibration = value if isinstance(value, dict) else None
            except DataError:
                run.notes.append(f"{cal.name} could not be parsed")
            break
    return run


def _calibration_section(run: RunInfo, slug: str, out_dir: Path) -> List[str]:
    """ROC/DET plot and the thresholds of the run's calibration.json."""
    from attnreid.viz import plots

    cal = run.calibration or {}
    e = html.escape
    try:
        png = plots.plot_calibration(cal, out_dir / ASSETS / f"{slug}_calibration.png", title=run.label)
    except (DataError, KeyError, TypeError, ValueError):
        return ['<p class="note">calibration.json is incomplete; run <code>attnreid calibrate</code> again.</p>']
    data = cal.get("data") or {}
    rows = "".join(
        f"<tr><td>{p['target_fpr']:.0e}</td><td>{'inf' if p['threshold'] is None else format(p['threshold'], '.4g')}"
        f" [{p['threshold_ci'][0]:.4g}, {p['threshold_ci'][1]:.4g}]</td><td>{100 * p['tpr']:.2f} "
        f"[{100 * p['tpr_ci'][0]:.2f}, {100 * p['tpr_ci'][1]:.2f}]</td><td>{100 * p['fpr']:.3f} "
        f"[{100 * p['fpr_ci'][0]:.3f}, {100 * p['fpr_ci'][1]:.3f}]</td></tr>"
        for p in cal.get("operating_points") or [])
    return ["<h3>Verification: same person or not</h3>",
            f'<p class="meta">{e(str(data.get("dataset")))} {e(str(data.get("split")))}: {cal.get("identities")} '
            f'identities, {cal.get("positive_pairs")} positive / {cal.get("negative_pairs")} negative pairs; EER '
            f'{100 * cal.get("eer", float("nan")):.2f} %. A pair is the same person when its distance is below the '
            f'threshold; intervals over resampled identities.</p>',
            "<table><tr><th>target FPR</th><th>threshold [interval]</th><th>TPR % [interval]</th>"
            f"<th>FPR % on new identities [interval]</th></tr>{rows}</table>",
            _img(png, out_dir, f"ROC and DET of {run.label}", "ROC (left) and DET (right), log FPR axis.")]


def _labels(paths: Sequence[Path]) -> List[str]:
    """Folder names, with the parent prepended where two runs share a name."""
    names = [p.name or str(p) for p in paths]
    return [f"{p.parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def _slug(i: int, label: str) -> str:
    return f"run{i}_" + re.sub(r"[^A-Za-z0-9_-]+", "-", label)[:40]


def _numbers(v: Any) -> bool:
    """A non-empty list of finite numbers (eval.json is read from a folder, not trusted)."""
    import math

    return isinstance(v, list) and bool(v) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)


def _pct(v: Any) -> str:
    return f"{100.0 * float(v):.1f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


def _value(metrics: dict, key: str) -> str:
    """A metric in percent with its bootstrap interval when eval.json has one (``62.3 ± 1.6``)."""
    v = metrics.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "–"
    return metric_text(metrics, key)


def comparison_section(runs: Sequence[RunInfo]) -> str:
    """Each run against the first (the reference) on the same queries: paired bootstrap interval of
    the mAP and rank-1 differences, sign-test p-values and the verdict (attnreid.evaluation.stats).
    Runs without per-query results, or evaluated on other queries, get a note instead."""
    e = html.escape
    with_pq = [r for r in runs if (r.path / PER_QUERY_FILE).is_file()]
    if len(runs) < 2:
        return ""
    if len(with_pq) < 2:
        return (f'<h2>Paired comparison</h2><p class="note">Fewer than two runs hold {PER_QUERY_FILE} '
                '(written by evaluations since attnreid compare exists): no paired comparison.</p>')
    ref = load_run(with_pq[0].path, with_pq[0].label)
    rows, notes = [], []
    for r in with_pq[1:]:
        try:
            res = compare_evaluated(load_run(r.path, r.label), ref)
        except AttnReidError as exc:
            notes.append(f'<p class="note">{e(r.label)}: {e(str(exc))}</p>')
            continue
        m, h = res["mAP"], res["rank1"]
        rows.append(f'<tr><td class="name">{e(r.label)}</td><td class="val">{e(format_diff(m))}</td>'
                    f'<td class="val">{e(format_p(m["p"]))}</td><td class="val">{e(format_diff(h))}</td>'
                    f'<td class="val">{e(format_p(h["p"]))}</td><td class="val">{res["num_queries"]}</td>'
                    f'<td class="name">{e(verdict(res, r.label, ref.label))}</td></tr>')
    skipped = [r.label for r in runs if r not in with_pq]
    if skipped:
        notes.append(f'<p class="note">No {PER_QUERY_FILE} (not compared): {e(", ".join(skipped))}.</p>')
    table = ""
    if rows:
        table = ('<table class="metrics"><caption class="meta">Each run minus the reference, in points, with the '
                 '95% paired bootstrap interval over queries; p: exact two-sided sign test over the queries '
                 '(rank-1: the queries only one of the two hits). The verdict is decided on mAP: a run is better '
                 'when p &lt; 0.05 and the interval excludes 0.</caption><thead><tr><th class="name">run</th>'
                 '<th>ΔmAP [95% CI]</th><th>p</th><th>ΔRank-1 [95% CI]</th><th>p</th><th>queries</th>'
                 f'<th class="name">verdict</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')
    return (f'<h2>Paired comparison (reference: {e(ref.label)})</h2>' + table + "".join(notes))


def metrics_tables(runs: Sequence[RunInfo]) -> str:
    """One table per (protocol): a row per evaluated run, values in percent as in the
    papers, the best value of each column in bold."""
    e = html.escape
    out = []
    by_protocol: Dict[str, List[RunInfo]] = {}
    for r in runs:
        if r.eval is not None:
            by_protocol.setdefault("partial" if r.protocol == "partial" else "market", []).append(r)
    for protocol, group in by_protocol.items():
        cols = COLUMNS[protocol]
        best = {}
        for _, key in cols:
            vals = [r.eval.get(key) for r in group if isinstance(r.eval.get(key), (int, float))]
            best[key] = max(vals) if vals else None
        head = "".join(f"<th>{e(name)}</th>" for name, _ in cols)
        rows = []
        for r in group:
            extra = " +re-rank" if r.eval.get("rerank") else ""
            cells = "".join(
                f'<td class="val">{"<b>" if r.eval.get(k) == best[k] and len(group) > 1 else ""}'
                f'{e(_value(r.eval, k))}{"</b>" if r.eval.get(k) == best[k] and len(group) > 1 else ""}</td>'
                for _, k in cols)
            rows.append(f'<tr><td class="name">{e(r.label)}</td><td class="name">{e(r.model)}</td>'
                        f'<td class="name">{e(r.dataset + extra)}</td>{cells}</tr>')
        caption = "partial re-ID protocol (single-shot, %)" if protocol == "partial" else "single query, % (CMC rank-k and mAP)"
        levels = [level_text(r.eval) for r in group if level_text(r.eval)]
        if levels:
            caption += f"; {levels[0]} (an interval whose sides differ by more than 1.5x is shown as +up/-down)"
        out.append(f'<table class="metrics"><caption class="meta">{e(caption)}</caption>'
                   f'<thead><tr><th class="name">run</th><th class="name">model</th><th class="name">data set</th>'
                   f'{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    pending = [r for r in runs if r.eval is None]
    if pending:
        names = ", ".join(r.label for r in pending)
        out.append(f'<p class="note">Not evaluated yet (no eval.json): {e(names)}.</p>')
    return "\n".join(out)


def _img(src: Path, out_dir: Path, alt: str, caption: str = "") -> str:
    rel = quote(src.relative_to(out_dir).as_posix())
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{rel}" alt="{html.escape(alt)}" loading="eager">{cap}</figure>'


def _config_summary(run: RunInfo) -> str:
    e = html.escape
    items = [("model", run.model), ("data set", run.dataset)]
    c = run.config
    if c:
        items += [("backbone", _get(c, "model.backbone.name")),
                  ("input", f"{_get(c, 'data.height')} x {_get(c, 'data.width')}" if _get(c, "data.height") else None)]
        spec = find_spec(run.model)
        for label, keys in (spec.summary if spec is not None else ()):
            values = [_get(c, k) for k in keys]
            items.append((label, None if None in values else " / ".join(map(str, values))))
        items.append(("epochs trained", _epochs_trained(run, _get(c, "train.epochs"))))
    if run.eval:
        items += [("evaluated at epoch", run.eval.get("epoch")), ("mINP", _pct(run.eval.get("mINP")) if "mINP" in run.eval else None),
                  ("valid queries", run.eval.get("num_valid_queries")), ("metric", run.eval.get("metric"))]
    items.append(("checkpoint", run.checkpoint.name if run.checkpoint else "none"))
    body = "".join(f"<dt>{e(str(k))}</dt><dd>{e(str(v))}</dd>" for k, v in items if v not in (None, ""))
    return f'<dl class="cfg">{body}</dl>'


def _epochs_trained(run: RunInfo, configured: Any) -> Optional[str]:
    """``12 of 400``: the complete epochs the log (or the evaluation) shows, and the configured count."""
    from attnreid.viz.plots import training_series  # matplotlib: imported when a report is written

    trained = training_series(run.log)["epochs_trained"] if run.log else 0
    evaluated = (run.eval or {}).get("epoch")
    if isinstance(evaluated, int) and not isinstance(evaluated, bool):
        trained = max(trained, evaluated)
    if not trained:
        return None
    return f"{trained} of {configured}" if isinstance(configured, int) and configured != trained else str(trained)


def _ranked_section(run: RunInfo, ranks: dict, picked: List[int], slug: str, out_dir: Path, topk: int,
                    explicit: bool, worst_by: str, image_reader) -> List[str]:
    e = html.escape
    how = "chosen" if explicit else \
        ("worst by AP within the top-k" if worst_by == "ap" else "worst by rank of the first true match")
    parts = [f"<h3>Ranked lists ({e(how)})</h3>",
             '<p class="legend meta"><span style="background:#2856dc">query</span>'
             '<span style="background:#28aa3c">true match</span>'
             '<span style="background:#dc2828">false match</span> d = distance to the query '
             '(smaller is closer); same-camera images of the query\'s identity are left out.</p>']
    if not picked:
        parts.append('<p class="meta">No query to show.</p>')
    for qi in picked:
        png = ranking.draw_ranked_list([(run.label, ranks, qi)], out_dir / ASSETS / f"{slug}_rank_q{qi}.png",
                                       topk=topk, protocol=run.protocol, reader=image_reader)
        parts.append(_img(png, out_dir, f"ranked list of query {qi} ({run.label})",
                          f"query {qi}: {ranks['query_paths'][qi]}"))
    return parts


def _attention_section(run: RunInfo, image_paths: List[str], slug: str, out_dir: Path) -> List[str]:
    """Overlays of the given queries from the run's checkpoint; any problem is a note on
    the page (a report must not fail because a checkpoint moved or a model has none)."""
    # torch (model, overlays) is imported only by a report that draws attention
    from attnreid.engine.build import load_model
    from attnreid.viz.attention import LEGENDS, attention_kind, diversity_text, explain, read_images

    e = html.escape
    parts = ["<h3>Attention of these queries</h3>"]
    spec = find_spec(run.model)
    if spec is not None and spec.attention is None:
        return parts + [f'<p class="meta">The {e(spec.label)} model has no attention maps.</p>']
    if run.checkpoint is None:
        return parts + ['<p class="note">No checkpoint in this run (checkpoints/best.pth or last.pth): '
                        'attention overlays are not available.</p>']
    try:
        images = read_images(image_paths)
        model, cfg = load_model(run.checkpoint)
        result = explain(model, images, out_dir / ASSETS, cfg.data, prefix=f"{slug}_", index=False)
    except AttnReidError as exc:
        return parts + [f'<p class="note">Attention overlays not available: {e(str(exc))}</p>']
    parts.append(f'<p class="meta">{e(LEGENDS.get(attention_kind(result["model"]), ""))} '
                 f'(from {e(run.checkpoint.name)})</p>')
    stats = (run.eval or {}).get("attention_stats")
    if isinstance(stats, dict) and diversity_text(stats):
        parts.append(f'<p class="meta">Head diversity over {int(stats.get("num_images", 0))} query images '
                     f'(eval.json): {e(diversity_text(stats))}. Head overlap is the mean over head pairs of '
                     'Σ_j min(α_a,j, α_b,j): 1 = identical maps, 0 = disjoint. β entropy 0 = SAFFM uses one '
                     'head, ln K = all heads equally.</p>')
    for entry in result["images"]:
        caption = entry["image"] + (f" ({diversity_text(entry)})" if diversity_text(entry) else "")
        parts.append(_img(Path(entry["png"]), out_dir, f"attention of {entry['image']}", caption))
    return parts


def check_queries(runs: Sequence[RunInfo], queries: Sequence[int]) -> None:
    """Chosen query indices must exist in every run that has ranked lists: one line otherwise."""
    import numpy as np

    for run in runs:
        if run.ranks_path is None:
            continue
        try:
            with np.load(run.ranks_path, allow_pickle=False) as z:
                q = len(z["query_paths"])
        except Exception:  # an unreadable file is reported in the page, as without --queries
            continue
        bad = [int(x) for x in queries if not 0 <= int(x) < q]
        if bad:
            raise DataError(f"--queries {','.join(map(str, bad))} out of range: run {run.label} has {q} queries "
                            f"(0..{q - 1})")


def write_report(run_dirs: Sequence[str | Path] | str | Path, out_dir: str | Path, title: Optional[str] = None, *,
                 topk: int = 10, num_queries: int = 3, queries: Optional[Sequence[int]] = None,
                 worst_by: str = "ap", overlays: int = 3,
                 image_reader: Optional[Callable[[str], Any]] = None, overwrite: bool = False) -> Path:
    """Write ``out_dir/index.html`` for the given run folders and return its path.

    ``queries``: query indices to draw ranked lists for; by default the ``num_queries``
    worst queries of each run (lowest AP within the top-k, or latest first hit with
    ``worst_by="first_hit"``). ``overlays``: how many of those queries get attention
    overlays (0: none; they need the run's checkpoint and an attention model).
    ``image_reader`` (path -> PIL image) defaults to :func:`attnreid.data.io.read_image`.
    With two or more evaluated runs on the same queries, the first two are compared
    query by query, and every run is compared with the first one statistically
    (:func:`comparison_section`). A folder that holds files but no attnreid page is refused
    unless ``overwrite`` (:func:`attnreid.viz.page.check_page_folder`); the page is written
    atomically.
    """
    from attnreid.viz import plots  # matplotlib: imported when a report is written

    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise DataError("write_report needs at least one run folder")
    runs = [read_run(p, lab) for p, lab in zip(paths, _labels(paths))]
    if queries is not None:
        check_queries(runs, queries)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"report folder {out_dir} is a file; expected a folder (or a new path)")
    check_page_folder(out_dir, overwrite)
    assets = out_dir / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    e = html.escape
    title = title or ("attnreid report: " + ", ".join(r.label for r in runs))
    parts: List[str] = []

    parts.append("<h2>Results</h2>")
    parts.append(metrics_tables(runs))
    curves = {r.label: r.eval["cmc"] for r in runs if r.eval and _numbers(r.eval.get("cmc"))}
    bands = {r.label: r.eval["cmc_ci"] for r in runs if r.label in curves and isinstance(r.eval.get("cmc_ci"), list)
             and all(isinstance(b, list) and _numbers(b) for b in r.eval["cmc_ci"])}
    if curves:
        png = plots.plot_cmc(curves, assets / "cmc.png", max_rank=20, bands=bands)
        parts.append(_img(png, out_dir, "CMC curves",
                          "CMC: the share of queries whose first true match is within the top k"
                          + ("; shaded: the bootstrap interval over queries at each rank." if bands else ".")))
    parts.append(comparison_section(runs))

    ranks_cache: Dict[int, dict] = {}
    chosen: Dict[int, List[int]] = {}
    for i, run in enumerate(runs):
        slug = _slug(i, run.label)
        parts.append(f'<h2 id="{e(slug)}">Run {e(run.label)}</h2>')
        parts.append(f'<p class="meta">{e(str(run.path))}</p>')
        for n in run.notes:
            parts.append(f'<p class="note">{e(n)}</p>')
        if run.eval is None:
            parts.append('<p class="note">This run has not been evaluated yet (no eval.json): '
                         'no metrics, CMC or ranked lists. Run <code>attnreid eval</code> on it.</p>')
        parts.append(_config_summary(run))
        png = plots.plot_training(run.log, assets / f"{slug}_training.png", title=run.label)
        if png:
            parts.append("<h3>Training</h3>" + _img(png, out_dir, f"training curves of {run.label}",
                                                    "Left: loss terms averaged per epoch. Right: Rank-1 and mAP of "
                                                    "the evaluations during training."))
        elif not run.log:
            parts.append('<p class="meta">No training log (log.jsonl) in this run.</p>')
        if run.calibration is not None:
            parts.extend(_calibration_section(run, slug, out_dir))
        if run.eval is not None and run.ranks_path is None:
            parts.append('<p class="note">No eval_ranks.npz: ranked lists are not available for this run.</p>')
        if run.ranks_path is None:
            continue
        try:
            ranks = ranking.load_ranks(run.ranks_path)
        except DataError as exc:
            parts.append(f'<p class="note">{e(str(exc))}</p>')
            continue
        ranks_cache[i] = ranks
        q = len(ranks["query_paths"])
        picked = [int(x) for x in queries if 0 <= int(x) < q] if queries is not None else \
            ranking.select_queries(ranks, num_queries, by=worst_by, protocol=run.protocol)
        chosen[i] = picked
        dropped = [int(x) for x in queries or () if not 0 <= int(x) < q]
        if dropped:
            parts.append(f'<p class="note">Query index(es) {e(", ".join(map(str, dropped)))} out of range: '
                         f'this run has {q} queries.</p>')
        parts.extend(_ranked_section(run, ranks, picked, slug, out_dir, topk, queries is not None, worst_by,
                                     image_reader))
        if overlays > 0 and picked:
            parts.extend(_attention_section(run, [str(ranks["query_paths"][qi]) for qi in picked[:overlays]],
                                            slug, out_dir))

    with_ranks = [i for i in range(len(runs)) if i in ranks_cache]
    if len(with_ranks) >= 2:
        a, b = with_ranks[:2]
        pairs = []
        for qi in chosen[a]:
            qj = ranking.find_query(ranks_cache[b], str(ranks_cache[a]["query_paths"][qi]))
            if qj is not None:
                pairs.append((qi, qj))
        if pairs:
            parts.append(f"<h2>Comparison: {e(runs[a].label)} vs {e(runs[b].label)}</h2>")
            parts.append(f'<p class="meta">The worst queries of {e(runs[a].label)}, each with both runs\' '
                         f'top-{topk} (upper row: {e(runs[a].label)}, lower row: {e(runs[b].label)}).</p>')
            for qi, qj in pairs:
                png = ranking.draw_ranked_list(
                    [(runs[a].label, ranks_cache[a], qi), (runs[b].label, ranks_cache[b], qj)],
                    assets / f"compare_q{qi}.png", topk=topk, protocol=runs[a].protocol, reader=image_reader)
                parts.append(_img(png, out_dir, f"comparison of query {qi}", str(ranks_cache[a]["query_paths"][qi])))

    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = (
        f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{GENERATOR_TAG}"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{e(title)}</h1><p class=\"meta\">attnreid {e(__version__)} · {e(stamp)} · "
        f"{len(runs)} run(s)</p>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    from attnreid.safe_io import write_text_atomic

    return write_text_atomic(out_dir / "index.html", page)
