"""Verification, "same person or unknown?": ROC, EER, thresholds at a false-positive rate,
and their bootstrap intervals over identities. numpy only.

A pair of images is **accepted** (called the same person) when its distance is *below*
the threshold: ``d < t``. Positive pairs are two images of one identity from different
cameras (for sets without cameras: different files, the per-file pseudo-cameras of
docs/data.md); negative pairs are images of two different identities, any cameras.

- ``FPR(t)`` = share of negative pairs with ``d < t``; ``TPR(t)`` = share of positive pairs
  with ``d < t``; ``FNR = 1 - TPR``.
- :func:`threshold_at_fpr`: the largest threshold whose FPR does not exceed the target
  ``a``: the ``(k+1)``-th smallest negative distance with ``k = floor(a N)`` (every tie at
  it rejected). Weighted: the smallest negative distance whose cumulative weight (itself
  included) exceeds ``a W``.
- :func:`equal_error_rate`: ``min over t of max(FPR(t), FNR(t))`` with ``t`` over the
  distinct distances and +inf, and the ``t`` reaching it (the smallest, on ties).
- :func:`identity_bootstrap`: resample the identities with replacement; an identity drawn
  ``m`` times weighs its positive pairs by ``m`` and a negative pair of identities ``i, j`` by
  ``m_i m_j``. Pairs share identities, so pairs are not independent; resampling pairs
  would make the intervals far too narrow. (Weighting a negative pair by one side's ``m``
  alone would halve its standard error: a U-statistic's leading variance term comes from
  both sides.) Percentile intervals.

The threshold a calibration promises holds for *new* people to the extent that they
resemble the calibration identities (same cameras, same kind of crops): the interval
covers the sampling of identities, not a change of domain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from attnreid.errors import AttnReidError

DEFAULT_TARGETS = (1e-2, 1e-3, 1e-4)
DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
DEFAULT_MAX_NEGATIVES = 2_000_000
MIN_ACCEPTED_NEGATIVES = 10  # fewer false accepts at a threshold: its FPR rests on too few pairs
METRICS = ("euclidean_sq", "cosine")
_REL = 1e-9  # a target's a W is compared with this relative slack: 0.29 x 100 must allow 29 pairs
ROC_POINTS_PER_DECADE = 20
TABLE_POINTS_PER_DECADE = 10


def _weights(values: np.ndarray, weights: Optional[np.ndarray]) -> np.ndarray:
    if weights is None:
        return np.ones(len(values), dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != values.shape:
        raise AttnReidError(f"weights have shape {weights.shape} but the distances {values.shape}")
    return weights


def _sorted(values: Sequence[float], weights: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64).ravel()
    w = _weights(v, None if weights is None else np.asarray(weights).ravel())
    order = np.argsort(v, kind="stable")
    return v[order], w[order]


def _threshold_sorted(neg: np.ndarray, cum: np.ndarray, target: float) -> float:
    """:func:`threshold_at_fpr` on sorted negatives and their cumulative weights."""
    total = cum[-1] if len(cum) else 0.0
    if total <= 0:
        raise AttnReidError("no negative pairs (or all of weight 0): cannot set a threshold")
    k = int(np.searchsorted(cum, target * total * (1 + _REL), side="right"))
    return math.inf if k >= len(neg) else float(neg[k])


def threshold_at_fpr(negatives: Sequence[float], target: float, weights: Optional[Sequence[float]] = None) -> float:
    """The largest ``t`` with ``FPR(t) <= target`` (accept ``d < t``); +inf when ``target >= 1``."""
    if not 0 <= target:
        raise AttnReidError(f"target false-positive rate {target} must be >= 0")
    neg, w = _sorted(negatives, weights)
    return _threshold_sorted(neg, np.cumsum(w), target)


def accept_rate(distances: Sequence[float], threshold: float, weights: Optional[Sequence[float]] = None) -> float:
    """The (weighted) share of ``distances`` below ``threshold``."""
    d = np.asarray(distances, dtype=np.float64).ravel()
    w = _weights(d, None if weights is None else np.asarray(weights).ravel())
    total = w.sum()
    if total <= 0:
        raise AttnReidError("no pairs (or all of weight 0): the rate is undefined")
    return float(w[d < threshold].sum() / total)


def roc_curve(positives: Sequence[float], negatives: Sequence[float], pos_weights: Optional[Sequence[float]] = None,
              neg_weights: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thresholds, fpr, tpr)`` at every distinct distance and +inf, increasing."""
    pos, wp = _sorted(positives, pos_weights)
    neg, wn = _sorted(negatives, neg_weights)
    if wp.sum() <= 0 or wn.sum() <= 0:
        raise AttnReidError("the ROC needs at least one positive and one negative pair")
    thresholds = np.append(np.unique(np.concatenate([pos, neg])), math.inf)
    cum_p = np.concatenate([[0.0], np.cumsum(wp)])
    cum_n = np.concatenate([[0.0], np.cumsum(wn)])
    tpr = cum_p[np.searchsorted(pos, thresholds, side="left")] / cum_p[-1]
    fpr = cum_n[np.searchsorted(neg, thresholds, side="left")] / cum_n[-1]
    return thresholds, fpr, tpr


def equal_error_rate(positives: Sequence[float], negatives: Sequence[float],
                     pos_weights: Optional[Sequence[float]] = None,
                     neg_weights: Optional[Sequence[float]] = None) -> Tuple[float, float]:
    """``(eer, threshold)``: the smallest ``max(FPR, FNR)`` over thresholds, and where."""
    thresholds, fpr, tpr = roc_curve(positives, negatives, pos_weights, neg_weights)
    worst = np.maximum(fpr, 1.0 - tpr)
    i = int(np.argmin(worst))
    return float(worst[i]), float(thresholds[i])


# -- pairs -----------------------------------------------------------------------------

@dataclass
class Pairs:
    """The positive and negative pair distances of a labelled set of features.

    ``pos_id``: the identity (index into ``ids``) of each positive pair; ``neg_a``/``neg_b``:
    the two identities of each negative pair. Negatives may be a uniform sample
    (``neg_sampled`` of ``neg_total``).
    """

    pos: np.ndarray
    pos_id: np.ndarray
    neg: np.ndarray
    neg_a: np.ndarray
    neg_b: np.ndarray
    ids: np.ndarray
    neg_total: int
    num_images: int

    @property
    def neg_sampled(self) -> int:
        return int(len(self.neg))


def _as_features(features: Any) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or not len(f):
        raise AttnReidError(f"features must be an N x D array with N >= 1, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise AttnReidError("features hold NaN or inf values")
    return f


def _blocks(n: int, block: int) -> Iterator[Tuple[int, int]]:
    for s in range(0, n, block):
        yield s, min(n, s + block)


def distance_rows(f: np.ndarray, rows: slice, metric: str, norms: np.ndarray) -> np.ndarray:
    """Distances of ``f[rows]`` to every row of ``f`` (float64; squared Euclidean or 1 - cosine)."""
    if metric == "cosine":
        unit = f / np.maximum(norms, 1e-12)[:, None]
        return 1.0 - unit[rows] @ unit.T
    sq = norms ** 2
    return np.maximum(sq[rows, None] + sq[None, :] - 2.0 * (f[rows] @ f.T), 0.0)


def pair_distances(features: Any, pids: Sequence[int], camids: Sequence[int], metric: str = "euclidean_sq",
                   max_negatives: int = DEFAULT_MAX_NEGATIVES, seed: int = 0) -> Pairs:
    """Every positive pair (same pid, different camid) and the negative pairs (different pids),
    a uniform random sample of at most about ``max_negatives`` of them; memory: a block of rows."""
    if metric not in METRICS:
        raise AttnReidError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    f = _as_features(features)
    pid = np.asarray(pids).ravel()
    cam = np.asarray(camids).ravel()
    if len(pid) != len(f) or len(cam) != len(f):
        raise AttnReidError(f"{len(f)} features but {len(pid)} pids and {len(cam)} camids")
    ids, ident = np.unique(pid, return_inverse=True)
    if len(ids) < 2:
        raise AttnReidError(f"verification needs at least two identities, got {len(ids)}")
    counts = np.bincount(ident)
    neg_total = int((len(f) ** 2 - int((counts ** 2).sum())) // 2)
    keep = min(1.0, max_negatives / max(neg_total, 1))
    rng = np.random.default_rng(seed)
    norms = np.linalg.norm(f, axis=1)
    block = max(1, (1 << 22) // len(f))
    parts: Dict[str, List[np.ndarray]] = {k: [] for k in ("pos", "pos_id", "neg", "neg_a", "neg_b")}
    cols = np.arange(len(f))
    for s, e in _blocks(len(f), block):
        d = distance_rows(f, slice(s, e), metric, norms)
        upper = cols[None, :] > np.arange(s, e)[:, None]  # each unordered pair once
        same = ident[s:e, None] == ident[None, :]
        r, c = np.nonzero(upper & same & (cam[s:e, None] != cam[None, :]))
        parts["pos"].append(d[r, c])
        parts["pos_id"].append(ident[s + r])
        r, c = np.nonzero(upper & ~same)
        if keep < 1.0:
            chosen = rng.random(len(r)) < keep
            r, c = r[chosen], c[chosen]
        parts["neg"].append(d[r, c])
        parts["neg_a"].append(ident[s + r])
        parts["neg_b"].append(ident[c])
    out = {k: np.concatenate(v) for k, v in parts.items()}
    if not len(out["pos"]):
        raise AttnReidError("no positive pairs: no identity has images from two cameras (or two files)")
    return Pairs(out["pos"], out["pos_id"].astype(np.int64), out["neg"], out["neg_a"].astype(np.int64),
                 out["neg_b"].astype(np.int64), ids, neg_total, len(f))


# -- the identity bootstrap ------------------------------------------------------------

def identity_weights(rng: np.random.Generator, num_ids: int) -> np.ndarray:
    """How often each identity is drawn in one resample of ``num_ids`` identities with replacement."""
    return np.bincount(rng.integers(0, num_ids, size=num_ids), minlength=num_ids).astype(np.float64)


def _interval(values: np.ndarray, level: float) -> List[float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def identity_bootstrap(pairs: Pairs, targets: Sequence[float], resamples: int = DEFAULT_RESAMPLES,
                       level: float = DEFAULT_LEVEL, seed: int = 0) -> Dict[str, Any]:
    """Bootstrap over identities (module doc) of, per target FPR ``a``: the threshold ``t_b(a)``,
    the TPR there, and the FPR at the full data's threshold ``t(a)``; and of the EER.

    Returns ``{"thresholds": R x T, "tpr": R x T, "fpr_at_threshold": R x T, "eer": R}`` arrays
    (R resamples; resamples whose positives or negatives all have weight 0 are redrawn).
    """
    if resamples < 1:
        raise AttnReidError(f"resamples is {resamples}; it must be >= 1")
    order = np.argsort(pairs.neg, kind="stable")
    neg, na, nb = pairs.neg[order], pairs.neg_a[order], pairs.neg_b[order]
    porder = np.argsort(pairs.pos, kind="stable")
    pos, pid = pairs.pos[porder], pairs.pos_id[porder]
    fixed = [_threshold_sorted(neg, np.arange(1, len(neg) + 1, dtype=np.float64), a) for a in targets]
    fixed_idx = np.searchsorted(neg, fixed, side="left")
    merged = np.concatenate([pos, neg])
    morder = np.argsort(merged, kind="stable")
    is_pos = morder < len(pos)
    values = merged[morder]
    first = np.concatenate([[True], values[1:] != values[:-1]])
    rng = np.random.default_rng(seed)
    out = {k: [] for k in ("thresholds", "tpr", "fpr_at_threshold", "eer")}
    while len(out["eer"]) < resamples:
        m = identity_weights(rng, len(pairs.ids))
        wn, wp = m[na] * m[nb], m[pid]
        if wn.sum() <= 0 or wp.sum() <= 0:
            continue
        cum_n, cum_p = np.cumsum(wn), np.cumsum(wp)
        ts = [_threshold_sorted(neg, cum_n, a) for a in targets]
        below = np.searchsorted(pos, ts, side="left")
        out["thresholds"].append(ts)
        out["tpr"].append([cum_p[k - 1] / cum_p[-1] if k else 0.0 for k in below])
        out["fpr_at_threshold"].append([cum_n[k - 1] / cum_n[-1] if k else 0.0 for k in fixed_idx])
        # EER: FPR and FNR before each distinct value, from the merged order
        w = np.where(is_pos, wp[np.minimum(morder, len(pos) - 1)], wn[np.maximum(morder - len(pos), 0)])
        cp = np.concatenate([[0.0], np.cumsum(np.where(is_pos, w, 0.0))])[:-1][first]
        cn = np.concatenate([[0.0], np.cumsum(np.where(is_pos, 0.0, w))])[:-1][first]
        worst = np.maximum(np.append(cn / cum_n[-1], 1.0), np.append(1.0 - cp / cum_p[-1], 0.0))
        out["eer"].append(float(worst.min()))
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


# -- calibration -----------------------------------------------------------------------

def _log_grid(smallest: float, per_decade: int) -> np.ndarray:
    lo = math.floor(math.log10(smallest) * per_decade) / per_decade
    return np.unique(np.clip(10.0 ** np.arange(lo, 0 + 1e-9, 1.0 / per_decade), smallest, 1.0))


def roc_summary(thresholds: np.ndarray, fpr: np.ndarray, tpr: np.ndarray, smallest: float) -> Dict[str, List[float]]:
    """The ROC at a log grid of FPRs (for the JSON and the plot): the last point at or below each."""
    grid = _log_grid(smallest, ROC_POINTS_PER_DECADE)
    idx = np.unique(np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, len(fpr) - 1))
    keep = np.unique(np.concatenate([[0], idx, [len(fpr) - 1]]))
    return {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(),
            "threshold": [float(t) if math.isfinite(t) else None for t in thresholds[keep]]}


def calibrate_pairs(pairs: Pairs, targets: Sequence[float] = DEFAULT_TARGETS, resamples: int = DEFAULT_RESAMPLES,
                    level: float = DEFAULT_LEVEL, seed: int = 0) -> Dict[str, Any]:
    """The calibration of :func:`calibrate` from already computed pairs."""
    targets = sorted({float(a) for a in targets})
    if not 0 < level < 1:
        raise AttnReidError(f"level {level} must be between 0 and 1")
    for a in targets:
        if not 0 < a < 1:
            raise AttnReidError(f"target false-positive rate {a} must be between 0 and 1")
    n_neg = len(pairs.neg)
    thresholds, fpr, tpr = roc_curve(pairs.pos, pairs.neg)
    eer, eer_t = equal_error_rate(pairs.pos, pairs.neg)
    boot = identity_bootstrap(pairs, targets, resamples, level, seed)
    points = []
    for i, a in enumerate(targets):
        t = threshold_at_fpr(pairs.neg, a)
        accepted = int((pairs.neg < t).sum())
        points.append({
            "target_fpr": a,
            "threshold": t if math.isfinite(t) else None,
            "threshold_ci": _interval(boot["thresholds"][:, i], level),
            "fpr": accepted / n_neg,
            "fpr_ci": _interval(boot["fpr_at_threshold"][:, i], level),
            "fpr_se": float(boot["fpr_at_threshold"][:, i].std(ddof=1)) if resamples > 1 else None,
            "tpr": accept_rate(pairs.pos, t),
            "tpr_ci": _interval(boot["tpr"][:, i], level),
            "accepted_negatives": accepted,
            "enough_negatives": accepted >= MIN_ACCEPTED_NEGATIVES,
        })
    grid = _log_grid(1.0 / n_neg, TABLE_POINTS_PER_DECADE)
    table = [[float(a), threshold_at_fpr(pairs.neg, a)] for a in grid if a < 1]
    return {
        "accept": "distance < threshold",
        "positive_pairs": int(len(pairs.pos)),
        "negative_pairs": n_neg,
        "negative_pairs_total": int(pairs.neg_total),
        "identities": int(len(pairs.ids)),
        "images": int(pairs.num_images),
        "eer": eer,
        "eer_threshold": eer_t if math.isfinite(eer_t) else None,
        "eer_ci": _interval(boot["eer"], level),
        "operating_points": points,
        "fpr_table": [[a, t if math.isfinite(t) else None] for a, t in table],
        "roc": roc_summary(thresholds, fpr, tpr, 1.0 / n_neg),
        "bootstrap": {"unit": "identity", "resamples": int(resamples), "level": float(level), "seed": int(seed)},
    }


def calibrate(features: Any, pids: Sequence[int], camids: Sequence[int], metric: str = "euclidean_sq",
              targets: Sequence[float] = DEFAULT_TARGETS, resamples: int = DEFAULT_RESAMPLES,
              level: float = DEFAULT_LEVEL, seed: int = 0,
              max_negatives: int = DEFAULT_MAX_NEGATIVES) -> Dict[str, Any]:
    """ROC, EER and a threshold per target FPR, with identity-bootstrap intervals (JSON-ready).

    ``operating_points``: per target ``a``, the ``threshold`` (accept ``d < threshold``) and its
    interval, the calibration data's ``fpr`` there (<= a) with the interval and standard error of
    the FPR that threshold gives on resampled identities (what new people of the same kind should
    meet), and ``tpr`` there with the interval of the TPR at FPR ``a``. ``fpr_table``: thresholds
    at a log grid of FPRs down to 1 / (negative pairs), for other targets (:func:`threshold_for`).
    """
    pairs = pair_distances(features, pids, camids, metric, max_negatives, seed)
    return dict(calibrate_pairs(pairs, targets, resamples, level, seed), metric=metric)


def threshold_for(calibration: Dict[str, Any], fpr: float) -> Tuple[float, Dict[str, Any]]:
    """``(threshold, operating point)`` of a calibration for the target ``fpr``.

    A target the calibration computed gives its operating point; another gives the
    ``fpr_table`` entry with the largest FPR not above it (never a looser threshold than
    asked). A target below 1 / (negative pairs) cannot be promised: one-line error.
    """
    if not 0 < fpr < 1:
        raise AttnReidError(f"--fpr {fpr} must be between 0 and 1")
    for point in calibration.get("operating_points", []):
        if math.isclose(point["target_fpr"], fpr, rel_tol=1e-9) and point["threshold"] is not None:
            return float(point["threshold"]), point
    table = [(a, t) for a, t in calibration.get("fpr_table", []) if a <= fpr * (1 + _REL) and t is not None]
    if not table:
        raise AttnReidError(f"--fpr {fpr:g} is below what the calibration can promise: it saw "
                            f"{calibration.get('negative_pairs')} negative pairs (smallest FPR "
                            f"{1 / max(calibration.get('negative_pairs') or 1, 1):.1e}); calibrate on more identities")
    a, t = max(table)
    return float(t), {"target_fpr": fpr, "threshold": float(t), "table_fpr": a}


# -- a fixed threshold on other identities ---------------------------------------------

def pair_counts(features: Any, pids: Sequence[int], camids: Sequence[int], threshold: float,
                metric: str = "euclidean_sq", query: Optional[Sequence[bool]] = None) -> Dict[str, np.ndarray]:
    """Accepted and total pairs per identity pair at a fixed ``threshold`` (all pairs, no sample).

    ``neg_accepted``/``neg_total`` (K x K, unordered pairs counted once, in ``[min, max]``) and
    ``pos_accepted``/``pos_total`` (K), with ``ids`` (K). With ``query`` (a mask), only pairs of
    one query and one non-query image count: the search of unknown people against a gallery.
    """
    f = _as_features(features)
    pid, cam = np.asarray(pids).ravel(), np.asarray(camids).ravel()
    ids, ident = np.unique(pid, return_inverse=True)
    k = len(ids)
    is_q = None if query is None else np.asarray(query, dtype=bool).ravel()
    norms = np.linalg.norm(f, axis=1)
    out = {"neg_accepted": np.zeros((k, k)), "neg_total": np.zeros((k, k)), "pos_accepted": np.zeros(k),
           "pos_total": np.zeros(k), "ids": ids}
    cols = np.arange(len(f))
    block = max(1, (1 << 22) // len(f))
    for s, e in _blocks(len(f), block):
        d = distance_rows(f, slice(s, e), metric, norms)
        if is_q is None:
            use = cols[None, :] > np.arange(s, e)[:, None]
        else:
            use = is_q[s:e, None] & ~is_q[None, :]
        same = ident[s:e, None] == ident[None, :]
        acc = d < threshold
        r, c = np.nonzero(use & ~same)
        a, b = np.minimum(ident[s + r], ident[c]), np.maximum(ident[s + r], ident[c])
        out["neg_total"] += np.bincount(a * k + b, minlength=k * k).reshape(k, k)
        out["neg_accepted"] += np.bincount(a * k + b, weights=acc[r, c], minlength=k * k).reshape(k, k)
        r, c = np.nonzero(use & same & (cam[s:e, None] != cam[None, :]))
        out["pos_total"] += np.bincount(ident[s + r], minlength=k)
        out["pos_accepted"] += np.bincount(ident[s + r], weights=acc[r, c], minlength=k)
    return out


def bootstrap_rate(accepted: np.ndarray, total: np.ndarray, resamples: int = DEFAULT_RESAMPLES,
                   level: float = DEFAULT_LEVEL, seed: int = 0) -> Dict[str, Any]:
    """The accept rate ``sum(accepted) / sum(total)`` of :func:`pair_counts`'s arrays with its
    identity-bootstrap interval and standard error (K x K: weights ``m_i m_j``; K: ``m_i``)."""
    accepted, total = np.asarray(accepted, np.float64), np.asarray(total, np.float64)
    if total.sum() <= 0:
        raise AttnReidError("no pairs to measure a rate on")
    rng = np.random.default_rng(seed)
    rates = []
    while len(rates) < resamples:
        m = identity_weights(rng, len(total))
        w = np.outer(m, m) if total.ndim == 2 else m
        den = float((w * total).sum())
        if den > 0:
            rates.append(float((w * accepted).sum()) / den)
    rates = np.asarray(rates)
    return {"rate": float(accepted.sum() / total.sum()), "ci": _interval(rates, level),
            "se": float(rates.std(ddof=1)) if resamples > 1 else None, "pairs": int(total.sum()),
            "accepted": int(accepted.sum())}


__all__ = [
    "DEFAULT_TARGETS", "Pairs", "accept_rate", "bootstrap_rate", "calibrate", "calibrate_pairs", "equal_error_rate",
    "identity_bootstrap", "pair_counts", "pair_distances", "roc_curve", "threshold_at_fpr", "threshold_for",
]
