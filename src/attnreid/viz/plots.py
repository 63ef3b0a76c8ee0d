"""Plots of a run: CMC curves and training curves, drawn with matplotlib (Agg) to PNG.

Inputs are the run folder's files (see docs/design.md, Engine): ``eval.json`` holds
``cmc`` (a list of fractions, rank 1 first) and ``log.jsonl`` one JSON object a line,
``{"type": "train", "epoch", "step", "loss", <loss terms>, ...}`` and
``{"type": "eval", "epoch", "mAP", "rank1", ...}``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, never need a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogFormatterSciNotation, MaxNLocator  # noqa: E402

from attnreid.errors import DataError  # noqa: E402
from attnreid.safe_io import save_figure  # noqa: E402

# Keys of a train record that are bookkeeping, not loss terms.
_NOT_LOSS_TERMS = {"type", "epoch", "step", "lr", "img_per_s", "data_wait", "time", "elapsed", "iter"}


def read_log(path: str | Path) -> List[dict]:
    """Read a ``log.jsonl``; lines that are not a JSON object are skipped.

    A run that is still writing (or was killed) may leave a half-written last line; the
    report must still show the epochs that are complete, so such lines are dropped
    rather than failing. A missing file gives an empty list.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path, "rb") as fh:  # a log over MAX_LOG_BYTES: its newest records (memory stays bounded)
        size = fh.seek(0, 2)
        fh.seek(max(0, size - MAX_LOG_BYTES))
        text = fh.read().decode("utf-8", errors="replace")
    lines = text.splitlines()[1 if size > MAX_LOG_BYTES else 0:]  # the first may be cut
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):  # half-written, or nested without end
            continue
        if isinstance(obj, dict):
            records.append(obj)
    return records


MAX_LOG_BYTES = 256 << 20


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Records that state how many epochs were complete when they were written (the trainer's
# "run" and "resume" at the start, "diagnostics" after each epoch, "eval"/"val" after an evaluation).
_EPOCH_MARKERS = ("eval", "val", "interrupted", "resume", "run", "diagnostics", "epoch")


def training_series(records: Sequence[Mapping]) -> Dict[str, Dict[str, List[float]]]:
    """Per-epoch series from log records, complete epochs only.

    Returns ``{"loss": {term: [..]}, "loss_epochs": [..], "eval": {"rank1": [..],
    "mAP": [..]}, "eval_epochs": [..], "val": {"rank1": [..], "mAP": [..]}, "val_epochs": [..],
    "epochs_trained": n}`` (``eval``: the test split's evaluations; ``val``: the held-out
    validation identities', ``data.val_ids``). Train records are averaged
    over each epoch (the log holds one record every ``log_every`` steps); a term missing
    in some records of an epoch is averaged over the records that have it.

    An epoch that did not complete is left out. Such an epoch is recognised two ways:
    a later record of :data:`_EPOCH_MARKERS` says fewer epochs were complete (a run
    stopped by Ctrl-C or its time budget mid-epoch, whose epoch is redone on resume); or
    it is the last epoch of the log and has fewer steps than the epochs before it (a run
    still training, or killed).
    """
    sums: Dict[int, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    last_step: Dict[int, int] = {}
    evals: Dict[int, dict] = {}
    vals: Dict[int, dict] = {}
    confirmed = 0
    for r in records:
        epoch = r.get("epoch")
        if not _finite(epoch):
            continue
        kind = r.get("type")
        if kind == "train":
            for k, v in r.items():
                if k not in _NOT_LOSS_TERMS and _finite(v):
                    sums[int(epoch)][k].append(float(v))
            if _finite(r.get("step")):
                last_step[int(epoch)] = max(last_step.get(int(epoch), 0), int(r["step"]))
        if kind in ("eval", "val"):
            (evals if kind == "eval" else vals)[int(epoch)] = r  # a re-evaluated epoch: the last record wins
        if kind in _EPOCH_MARKERS:
            done = int(epoch)
            for e in [e for e in sums if e > done]:  # begun, never finished: redone or abandoned
                del sums[e]
                last_step.pop(e, None)
            confirmed = max(confirmed, done)
    epochs = sorted(sums)
    if epochs and epochs[-1] > confirmed:
        spans = _epoch_steps(epochs, last_step)
        earlier = [n for n in spans[:-1] if n is not None]
        if spans[-1] is not None and earlier and spans[-1] < max(earlier):
            epochs = epochs[:-1]
    terms = sorted({k for e in epochs for k in sums[e]}, key=lambda k: (k != "loss", k))
    loss = {t: [(sum(sums[e][t]) / len(sums[e][t])) if sums[e][t] else math.nan for e in epochs] for t in terms}
    def series(records: Dict[int, dict]) -> Dict[str, List[float]]:
        return {key: [float(records[e][key]) if _finite(records[e].get(key)) else math.nan for e in sorted(records)]
                for key in ("rank1", "mAP")}

    trained = max([confirmed, *(epochs[-1:] or [0])])
    return {"loss": loss, "loss_epochs": epochs, "eval": series(evals), "eval_epochs": sorted(evals),
            "val": series(vals), "val_epochs": sorted(vals), "epochs_trained": trained}


def _epoch_steps(epochs: List[int], last_step: Dict[int, int]) -> List[Optional[int]]:
    """Steps run in each epoch (global step at its end minus at the previous one's), None if unknown."""
    out: List[Optional[int]] = []
    for i, e in enumerate(epochs):
        before = last_step.get(e - 1) if i and epochs[i - 1] == e - 1 else (0 if e == 1 else None)
        out.append(last_step[e] - before if e in last_step and before is not None else None)
    return out


def plot_cmc(curves: Mapping[str, Sequence[float]], out_path: str | Path, max_rank: int = 20,
             title: Optional[str] = None,
             bands: Optional[Mapping[str, Sequence[Sequence[float]]]] = None) -> Path:
    """Draw the CMC curves of several runs (``{label: cmc}``, fractions) in one PNG.

    The y axis is the matching rate in percent, as in the papers' CMC figures; curves
    are cut at ``max_rank`` (or their own length when shorter). ``bands`` (``{label:
    [[lo, hi], ...]}``, e.g. eval.json's ``cmc_ci``) shades each curve's interval at every
    rank in the curve's colour; labels without a band are drawn as lines only.
    """
    if not curves:
        raise DataError("plot_cmc needs at least one CMC curve")
    out_path = Path(out_path)
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=100)
    for label, cmc in curves.items():
        values = [100.0 * float(c) for c in list(cmc)[:max_rank]]
        ranks = range(1, len(values) + 1)
        (line,) = ax.plot(ranks, values, marker="o", markersize=3, label=label)
        band = list((bands or {}).get(label) or [])[: len(values)]
        if len(band) == len(values):
            ax.fill_between(ranks, [100.0 * float(lo) for lo, _ in band], [100.0 * float(hi) for _, hi in band],
                            color=line.get_color(), alpha=0.18, linewidth=0)
    ax.set_xlabel("rank")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("matching rate (%)")
    ax.set_title(title or ("CMC (shaded: interval over queries)" if bands else "CMC"))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_path)
    plt.close(fig)
    return out_path


def plot_training(records: Sequence[Mapping], out_path: str | Path, title: Optional[str] = None) -> Optional[Path]:
    """Draw loss terms and rank-1 / mAP over epochs; ``None`` when the log has neither.

    Left panel: the total ``loss`` and each term (``ce_global``, ``tri_saffm``, ``fdrt``,
    ...) averaged per epoch, on a log scale when every value is positive (the terms
    differ by orders of magnitude: FDRT and ACM are weighted 1e-4 and 1e-3), its ticks
    written as plain numbers between 0.001 and 1000 (``0.5``, not ``5×10⁻¹``). Right
    panel: rank-1 and mAP (%) of the evaluations during training: the test split's
    (solid) and the validation identities' (dashed, ``data.val_ids``).
    """
    s = training_series(records)
    if not s["loss_epochs"] and not s["eval_epochs"] and not s["val_epochs"]:
        return None
    fig = training_figure(s, title)
    out_path = Path(out_path)
    save_figure(fig, out_path)
    plt.close(fig)
    return out_path


class PlainLogFormatter(LogFormatterSciNotation):
    """Log-axis tick labels as plain numbers from 0.001 to 1000 (``6``, ``0.5``), as a reader
    writes them; matplotlib's default gives ``6×10⁰`` for a tick that is not a power of ten."""

    def __call__(self, x, pos=None):
        with matplotlib.rc_context({"axes.formatter.min_exponent": 3}):
            return super().__call__(x, pos)


def training_figure(s: Dict, title: Optional[str] = None):
    """The figure of :func:`plot_training` from :func:`training_series`'s dict (the caller closes it)."""
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(10.0, 3.8), dpi=100)
    positive = True
    for term, values in s["loss"].items():
        ax_l.plot(s["loss_epochs"], values, label=term, linewidth=2.0 if term == "loss" else 1.2)
        positive &= all(v > 0 for v in values if not math.isnan(v))
    if s["loss"] and positive:
        ax_l.set_yscale("log")
        ax_l.yaxis.set_major_formatter(PlainLogFormatter())
        ax_l.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
    for ax in (ax_l, ax_r):
        # min_n_ticks=1: with one or two epochs MaxNLocator would otherwise fall back to 0.5 steps.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("loss")
    ax_l.set_title("training loss (mean per epoch)")
    ax_l.grid(True, alpha=0.3)
    if s["loss"]:
        ax_l.legend(fontsize=7, ncol=2, loc="best")
    else:
        ax_l.text(0.5, 0.5, "no training records", ha="center", va="center", transform=ax_l.transAxes)
    for split, style, suffix in (("val", "--", " (validation)"), ("eval", "-", " (test)")):
        for key, values in s[split].items():
            if s[f"{split}_epochs"]:
                ax_r.plot(s[f"{split}_epochs"], [100.0 * v for v in values], style, marker="o", markersize=3,
                          label=("Rank-1" if key == "rank1" else key) + suffix)
    ax_r.set_xlabel("epoch")
    ax_r.set_ylabel("%")
    ax_r.set_title("evaluation during training")
    ax_r.grid(True, alpha=0.3)
    if s["eval_epochs"] or s["val_epochs"]:
        ax_r.legend(fontsize=8)
    else:
        ax_r.text(0.5, 0.5, "no evaluation records", ha="center", va="center", transform=ax_r.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_calibration(cal: Mapping, out_path: str | Path, title: Optional[str] = None) -> Path:
    """ROC (TPR against FPR) and DET (FNR against FPR) of a calibration.json, both with a log FPR
    axis, the operating points marked with their TPR intervals and the EER on the DET curve."""
    roc = cal.get("roc") or {}
    fpr, tpr = list(roc.get("fpr") or []), list(roc.get("tpr") or [])
    if not fpr or len(fpr) != len(tpr):
        raise DataError("plot_calibration needs a calibration with a ROC (roc.fpr, roc.tpr)")
    out_path = Path(out_path)
    floor = 0.5 / max(int(cal.get("negative_pairs") or 1), 1)  # where FPR 0 is drawn on the log axis
    x = [max(f, floor) for f in fpr]
    fig, (ax_r, ax_d) = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=100)
    ax_r.plot(x, [100 * t for t in tpr], color="C0")
    ax_d.plot(x, [100 * max(1 - t, floor) for t in tpr], color="C0")
    for i, p in enumerate(cal.get("operating_points") or []):
        px = max(p["fpr"], floor)
        lo, hi = p["tpr_ci"]
        th = "inf" if p["threshold"] is None else f"{p['threshold']:.4g}"
        ax_r.errorbar([px], [100 * p["tpr"]], yerr=[[100 * (p["tpr"] - lo)], [100 * (hi - p["tpr"])]], fmt="o",
                      color=f"C{i + 1}", markersize=4, capsize=3,
                      label=f"FPR {p['target_fpr']:.0e}: d < {th}, TPR {100 * p['tpr']:.1f} %")
        ax_d.plot([px], [100 * max(1 - p["tpr"], floor)], "o", color=f"C{i + 1}", markersize=4)
    if cal.get("operating_points"):
        ax_r.legend(fontsize=7, loc="upper left")
    if cal.get("eer") is not None:
        ax_d.plot([max(cal["eer"], floor)], [100 * max(cal["eer"], floor)], "s", color="k", markersize=5,
                  label=f"EER {100 * cal['eer']:.2f} %")
        ax_d.legend(fontsize=8, loc="lower left")
    fnr = [1 - t for t in tpr if 1 - t > 0]
    ax_d.set_ylim(100 * min(fnr) / 2 if fnr else 100 * floor, 150)
    for ax in (ax_r, ax_d):
        ax.set_xscale("log")
        ax.set_xlabel("false-positive rate (different people accepted)")
        ax.grid(True, which="both", alpha=0.3)
    ax_r.set_ylabel("true-positive rate (%)")
    ax_r.set_title("ROC (bars: interval over identities)")
    ax_d.set_yscale("log")
    ax_d.set_ylabel("false-negative rate (%)")
    ax_d.set_title("DET")
    feature = cal.get("feature") or {}
    data = cal.get("data") or {}
    fig.suptitle(title or f"{feature.get('model', '?')} ({feature.get('metric', '?')}) on {data.get('dataset', '?')}: "
                 f"{cal.get('identities', '?')} identities, {cal.get('positive_pairs', '?')} positive / "
                 f"{cal.get('negative_pairs', '?')} negative pairs", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_path)
    plt.close(fig)
    return out_path
