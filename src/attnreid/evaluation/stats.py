"""How much a re-ID number can be trusted: intervals over queries, paired tests, seeds.

Two sources of noise, measured separately (docs/evaluation.md):

- **Query noise** -- the benchmark's queries are a sample; another sample of the same size would
  give another mAP. :func:`bootstrap_metrics` resamples the queries with replacement (a
  *percentile bootstrap*: ``resamples`` draws, the ``(1 - level) / 2`` and ``(1 + level) / 2``
  quantiles of the resampled means) and gives a ``level`` interval for rank-1, mAP, mINP and each
  CMC rank. Draws come from ``numpy.random.default_rng(seed)``, so an interval is reproducible.
  It says nothing about training noise: the model is held fixed.
- **Training noise** -- another seed gives another model. :func:`mean_std` summarises a metric
  over training seeds (mean and sample standard deviation, ``ddof=1``).

Comparisons of two models on the **same** queries (:func:`compare`) are paired: the per-query
differences are resampled together (:func:`paired_bootstrap`, an interval for the mean
difference) and an exact two-sided sign test (:func:`sign_test`) counts the queries on which each
model is better (for rank-1: the discordant pairs, i.e. the exact McNemar test). :func:`verdict`
decides on mAP, chosen in advance so the verdict cannot pick whichever metric happens to agree: a
model is "better" only when the sign test gives ``p < 1 - level`` **and** the bootstrap interval of
the mean AP difference excludes 0 on the same side. Everything else is "no significant difference".

Inputs are the per-query arrays of :func:`attnreid.evaluation.rank.evaluate_rank` with
``per_query=True`` (``ap``, ``inp``, ``rank1``, ``valid`` and, under the Market protocol,
``first_rank``). Skipped queries (``valid`` False) take no part, as in the metrics themselves.
Everything is vectorised over a block of resamples at a time (a resample is a row of query
indices), so 1,000 resamples of Market's 3,368 queries take well under a second
(benchmarks/bench_evaluation.py ``stats``).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from attnreid.errors import AttnReidError
from attnreid.text import plural

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
DEFAULT_SEED = 0
# A per-query difference at most this large counts as a tie in the sign test: AP values of two
# models that rank a query identically can differ in the last bits when computed on other paths.
TIE_TOLERANCE = 1e-9
# Resampled query indices held at once (blocks of resamples): bounds memory at MSMT17 size.
_BLOCK_ELEMENTS = 1 << 21
# Printed as "v ± h" while the longer side of the interval is at most this times the shorter.
ASYMMETRY_RATIO = 1.5

CI_KEYS = {"rank1": "rank1", "mAP": "ap", "mINP": "inp"}


MAX_RESAMPLES = 100_000  # the arrays of resampled means (and CMCs) grow with it


def _check_options(resamples: int, level: float) -> None:
    if not 1 <= int(resamples) <= MAX_RESAMPLES:
        raise AttnReidError(f"bootstrap resamples is {resamples}; it must be in 1..{MAX_RESAMPLES}")
    if not 0.0 < float(level) < 1.0:
        raise AttnReidError(f"confidence level is {level}; it must be in (0, 1), e.g. 0.95")


def _resample_blocks(n: int, resamples: int, seed: int):
    """Yield ``(rows, idx)``: ``idx`` a ``len(rows) x n`` block of query indices drawn with
    replacement; all blocks together are the ``resamples`` rows of one seeded draw."""
    rng = np.random.default_rng(seed)
    step = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for s in range(0, resamples, step):
        b = min(step, resamples - s)
        yield slice(s, s + b), rng.integers(0, n, size=(b, n))


def _quantiles(samples: np.ndarray, level: float) -> np.ndarray:
    """``2 x ...`` lower and upper percentile-bootstrap bounds over axis 0."""
    return np.quantile(samples, [(1.0 - level) / 2.0, (1.0 + level) / 2.0], axis=0)


def resample_means(columns: Mapping[str, np.ndarray], resamples: int = DEFAULT_RESAMPLES,
                   seed: int = DEFAULT_SEED, first_rank: Optional[np.ndarray] = None,
                   max_rank: int = 0) -> Dict[str, np.ndarray]:
    """Means of each column (all of length n) over the same ``resamples`` resamples of n rows.

    Returns ``{name: array of resamples}``. The columns share the draws, so the resampled
    metrics stay jointly consistent (e.g. a difference of two resampled means is the resampled
    mean of the differences). Given ``first_rank`` (1-based, length n) and ``max_rank``, also
    ``"cmc"``: ``resamples x max_rank``, each resample's CMC (the cumulative histogram of its
    rows' first-match ranks, one ``bincount`` per block).
    """
    cols = {k: np.asarray(v, dtype=np.float64) for k, v in columns.items()}
    lengths = {len(v) for v in cols.values()}
    if len(lengths) != 1:
        raise AttnReidError(f"resample_means needs columns of one length, got {sorted(lengths)}")
    n = lengths.pop()
    if n == 0:
        raise AttnReidError("cannot bootstrap an empty set of queries")
    out = {k: np.empty(int(resamples)) for k in cols}
    m = int(max_rank)
    if first_rank is not None and m:
        bins = np.minimum(np.asarray(first_rank, dtype=np.int64), m + 1) - 1  # rank > max_rank -> bin m
        out["cmc"] = np.empty((int(resamples), m))
    for rows, idx in _resample_blocks(n, int(resamples), seed):
        for k, v in cols.items():
            out[k][rows] = v[idx].mean(axis=1)
        if "cmc" in out:
            b = idx.shape[0]
            flat = (np.arange(b)[:, None] * (m + 1) + bins[idx]).ravel()
            counts = np.bincount(flat, minlength=b * (m + 1)).reshape(b, m + 1)[:, :m]
            out["cmc"][rows] = np.cumsum(counts, axis=1) / n
    return out


def bootstrap_ci(values: Sequence[float], resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                 seed: int = DEFAULT_SEED) -> Tuple[float, float]:
    """Percentile-bootstrap ``level`` interval of the mean of ``values`` (one value per query)."""
    _check_options(resamples, level)
    means = resample_means({"v": values}, resamples, seed)["v"]
    lo, hi = _quantiles(means, level)
    return float(lo), float(hi)


def _valid(per_query: Mapping[str, np.ndarray]) -> np.ndarray:
    if "valid" in per_query:
        return np.asarray(per_query["valid"], dtype=bool)
    return np.isfinite(np.asarray(per_query["ap"], dtype=np.float64))


def bootstrap_metrics(per_query: Mapping[str, np.ndarray], resamples: int = DEFAULT_RESAMPLES,
                      level: float = DEFAULT_LEVEL, seed: int = DEFAULT_SEED,
                      max_rank: Optional[int] = None) -> Dict[str, Any]:
    """Intervals for rank-1, mAP and mINP (and, given ``first_rank`` and ``max_rank``, every CMC rank).

    Returns ``{"rank1_ci": [lo, hi], "mAP_ci": [lo, hi], "mINP_ci": [lo, hi], "cmc_ci": [[lo, hi],
    ...] (max_rank pairs; only with first_rank), "ci": {"method", "resamples", "level", "seed",
    "num_queries"}}``, fractions in [0, 1] like the metrics. The CMC bands come from the same
    draws: a resample's CMC is the cumulative histogram of its queries' first-match ranks.
    """
    _check_options(resamples, level)
    valid = _valid(per_query)
    n = int(valid.sum())
    if n == 0:
        raise AttnReidError("no valid query to bootstrap (every query was skipped)")
    cols = {name: np.asarray(per_query[key], dtype=np.float64)[valid] for name, key in CI_KEYS.items()}
    first = per_query.get("first_rank")
    samples = resample_means(cols, resamples, seed, None if first is None else np.asarray(first)[valid],
                             int(max_rank or 0))
    cmc = samples.pop("cmc", None)
    out: Dict[str, Any] = {}
    for k in cols:
        lo, hi = _quantiles(samples[k], level)
        out[f"{k}_ci"] = [float(lo), float(hi)]
    if cmc is not None:
        bounds = _quantiles(cmc, level)
        out["cmc_ci"] = [[float(lo), float(hi)] for lo, hi in zip(bounds[0], bounds[1])]
    out["ci"] = {"method": "percentile bootstrap over queries", "resamples": int(resamples), "level": float(level),
                 "seed": int(seed), "num_queries": n}
    return out


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = DEFAULT_RESAMPLES,
                     level: float = DEFAULT_LEVEL, seed: int = DEFAULT_SEED) -> Dict[str, Any]:
    """Mean of ``a - b`` (two models' per-query scores on the same queries) and its interval.

    The queries are resampled as pairs, so what the two models share (easy and hard queries)
    cancels out of the interval; it is much narrower than two separate intervals would suggest.
    """
    _check_options(resamples, level)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise AttnReidError(f"paired_bootstrap needs two 1-D arrays of one length, got {a.shape} and {b.shape}")
    d = a - b
    lo, hi = _quantiles(resample_means({"d": d}, resamples, seed)["d"], level)
    return {"diff": float(d.mean()), "ci": [float(lo), float(hi)]}


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (Binomial(n, 1/2))."""
    if n == 0:
        return 1.0
    k = min(int(k), int(n) - int(k))
    term, tail = 1, 1
    for i in range(k):  # C(n, i + 1) from C(n, i), exact integers
        term = term * (n - i) // (i + 1)
        tail += term
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


def sign_test(diff: Sequence[float], tol: float = TIE_TOLERANCE) -> Dict[str, Any]:
    """Exact two-sided sign test of per-query differences: are positive and negative equally likely?

    Ties (``|d| <= tol``) are dropped, as the test prescribes. For rank-1 hits (0/1) the
    non-tied queries are the discordant pairs, and this is the exact McNemar test.
    """
    d = np.asarray(diff, dtype=np.float64)
    pos, neg = int((d > tol).sum()), int((d < -tol).sum())
    return {"n_pos": pos, "n_neg": neg, "n_ties": int(d.size - pos - neg), "p": binomial_two_sided(pos, pos + neg)}


def compare(per_query_a: Mapping[str, np.ndarray], per_query_b: Mapping[str, np.ndarray],
            resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
            seed: int = DEFAULT_SEED) -> Dict[str, Any]:
    """Paired comparison of two models' per-query results on the same queries (same order).

    Returns ``{"num_queries", "level", "resamples", "seed", "mAP": {...}, "rank1": {...},
    "winner": "A" | "B" | None}`` where each metric holds ``A``, ``B`` (the metric of each, over
    the queries valid for both), ``diff`` (A - B), ``ci`` (paired bootstrap), ``p`` (sign test),
    ``n_a_better``, ``n_b_better``, ``n_ties``.
    """
    _check_options(resamples, level)
    va, vb = _valid(per_query_a), _valid(per_query_b)
    if va.shape != vb.shape:
        raise AttnReidError(f"the two results cover different numbers of queries ({va.size} and {vb.size})")
    both = va & vb
    if not both.any():
        raise AttnReidError("no query is valid in both results")
    out: Dict[str, Any] = {"num_queries": int(both.sum()), "level": float(level), "resamples": int(resamples),
                           "seed": int(seed)}
    for name, key in (("mAP", "ap"), ("rank1", "rank1")):
        a = np.asarray(per_query_a[key], dtype=np.float64)[both]
        b = np.asarray(per_query_b[key], dtype=np.float64)[both]
        boot = paired_bootstrap(a, b, resamples, level, seed)
        sign = sign_test(a - b)
        out[name] = {"A": float(a.mean()), "B": float(b.mean()), "diff": boot["diff"], "ci": boot["ci"],
                     "p": sign["p"], "n_a_better": sign["n_pos"], "n_b_better": sign["n_neg"],
                     "n_ties": sign["n_ties"]}
    out["winner"] = winner(out)
    return out


def winner(result: Mapping[str, Any]) -> Optional[str]:
    """"A", "B" or None from a :func:`compare` result (the rule in the module docstring)."""
    m = result["mAP"]
    lo, hi = m["ci"]
    if m["p"] >= 1.0 - result["level"]:
        return None
    if lo > 0 and m["n_a_better"] > m["n_b_better"]:
        return "A"
    if hi < 0 and m["n_b_better"] > m["n_a_better"]:
        return "B"
    return None


def verdict(result: Mapping[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """``"<A> better"``, ``"<B> better"`` or ``"no significant difference"``."""
    w = result.get("winner", winner(result))
    return f"{name_a} better" if w == "A" else f"{name_b} better" if w == "B" else "no significant difference"


def format_p(p: float, prefix: bool = True) -> str:
    """``p = 0.031`` (three decimals below 0.1, two above; ``p < 0.001``); ``prefix=False``: the number."""
    text = "< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.1 else f"{p:.2f}"
    return ("p " + text if text.startswith("<") else "p = " + text) if prefix else text


def format_diff(entry: Mapping[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    """``+4.9 [+1.2, +8.6]`` (points) from a :func:`compare` metric entry."""
    def signed(x: float) -> str:
        x = scale * x
        return f"{0.0 if abs(x) < 0.5 * 10 ** -digits else x:+.{digits}f}"  # never "-0.0"

    lo, hi = entry["ci"]
    return f"{signed(entry['diff'])} [{signed(lo)}, {signed(hi)}]"


def format_ci(value: float, ci: Optional[Sequence[float]], scale: float = 100.0, digits: int = 1) -> str:
    """``62.3 ± 1.6``: the value and the half-width of its interval, in points.

    When the interval is lopsided (one side more than :data:`ASYMMETRY_RATIO` times the other,
    e.g. rank-1 near 0 or 100 %), both sides are printed instead: ``97.9 +1.1/-2.6``. Without an
    interval, the value alone.
    """
    v = f"{scale * value:.{digits}f}"
    if not ci:
        return v
    lo, hi = (scale * float(x) for x in ci)
    up, down = max(hi - scale * value, 0.0), max(scale * value - lo, 0.0)
    if max(up, down) > ASYMMETRY_RATIO * min(up, down) and max(up, down) >= 10 ** -digits:
        return f"{v} +{up:.{digits}f}/-{down:.{digits}f}"
    return f"{v} ± {(hi - lo) / 2:.{digits}f}"


def mean_std(values: Sequence[float]) -> Dict[str, Any]:
    """Mean and sample standard deviation (``ddof=1``) of one metric over training seeds.

    ``{"mean", "std", "n", "values"}``; ``std`` is None for a single seed (no spread measured).
    """
    v = [float(x) for x in values]
    if not v:
        raise AttnReidError("mean_std needs at least one value")
    arr = np.asarray(v)
    std = float(arr.std(ddof=1)) if len(v) > 1 else None
    return {"mean": float(arr.mean()), "std": std, "n": len(v), "values": v}


def format_mean_std(summary: Mapping[str, Any], scale: float = 100.0, digits: int = 1, note: bool = True) -> str:
    """``62.3 ± 1.6 (sd, 3 seeds)`` (``note=False``: without the parenthesis), or the value alone
    for one seed."""
    m = f"{scale * summary['mean']:.{digits}f}"
    if summary.get("std") is None:
        return m
    text = f"{m} ± {scale * summary['std']:.{digits}f}"
    return f"{text} (sd, {plural(summary['n'], 'seed')})" if note else text


def summarise_seeds(results: Sequence[Mapping[str, Any]], keys: Sequence[str] = ("rank1", "mAP", "mINP")
                    ) -> Dict[str, Dict[str, Any]]:
    """:func:`mean_std` of each metric key present in every one of ``results`` (one dict per seed)."""
    return {k: mean_std([r[k] for r in results]) for k in keys
            if results and all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in results)}


def per_query_arrays(result: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """The ``per_query`` dict of an evaluation result, or a one-line error."""
    pq = result.get("per_query")
    if not isinstance(pq, Mapping):
        raise AttnReidError("the evaluation result has no per-query arrays (evaluate with per_query=True)")
    return {k: np.asarray(v) for k, v in pq.items()}


def with_intervals(result: Dict[str, Any], resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                   seed: int = DEFAULT_SEED) -> Dict[str, Any]:
    """``result`` (an evaluation dict with ``per_query``) plus its intervals (:func:`bootstrap_metrics`);
    CMC bands as long as its ``cmc``. ``resamples=0`` adds nothing."""
    if resamples <= 0:
        return result
    max_rank = len(result.get("cmc") or []) or None
    result.update(bootstrap_metrics(per_query_arrays(result), resamples, level, seed, max_rank=max_rank))
    return result


def item_keys(paths: Sequence[str]) -> List[str]:
    """How a query or gallery image is named for pairing two evaluations: its file name (so two runs
    of one data set generated or unpacked in different folders pair up), or the whole path when
    file names repeat within the set."""
    names = [str(p).replace("::", "/").replace("\\", "/").rsplit("/", 1)[-1] for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def set_signature(paths: Sequence[str], pids: Sequence[int], camids: Optional[Sequence[int]]) -> str:
    """A short hash of a set of images (names from :func:`item_keys`, identities, cameras), in order."""
    import hashlib

    cams = [-1] * len(pids) if camids is None else [int(c) for c in camids]
    text = "\n".join(f"{k}\t{int(p)}\t{c}" for k, p, c in zip(item_keys(paths), pids, cams))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def per_query_record(query_paths: Sequence[str], query_pids, query_camids, gallery_paths: Sequence[str],
                     gallery_pids, gallery_camids, per_query: Mapping[str, np.ndarray],
                     **info: str) -> Dict[str, np.ndarray]:
    """The arrays of ``eval_per_query.npz``: ``query_paths``, ``query_pids``, ``query_camids``, the
    per-query results (``ap``, ``inp``, ``rank1``, ``valid``, ``first_rank``), ``gallery_signature``
    (:func:`set_signature` of the gallery) and ``info`` strings (e.g. ``protocol``); no pickled objects."""
    out = {"query_paths": np.array([str(p) for p in query_paths]),
           "query_pids": np.asarray(query_pids, dtype=np.int64),
           "query_camids": np.asarray(query_camids if query_camids is not None else [-1] * len(query_paths),
                                      dtype=np.int64),
           "gallery_signature": np.array(set_signature(gallery_paths, gallery_pids, gallery_camids))}
    out.update({k: np.asarray(v) for k, v in per_query.items()})
    out.update({k: np.array(str(v)) for k, v in info.items()})
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def ci_of(metrics: Mapping[str, Any], key: str) -> Optional[List[float]]:
    """The ``[lo, hi]`` interval stored for ``key`` in a metrics dict (eval.json), if well formed;
    ``rankK`` falls back to the CMC band ``cmc_ci[K - 1]``."""
    ci = metrics.get(f"{key}_ci")
    if ci is None and key.startswith("rank") and key[4:].isdigit() and isinstance(metrics.get("cmc_ci"), list):
        k = int(key[4:])
        ci = metrics["cmc_ci"][k - 1] if 0 < k <= len(metrics["cmc_ci"]) else None
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_number(x) for x in ci):
        return [float(ci[0]), float(ci[1])]
    return None


def metric_text(metrics: Mapping[str, Any], key: str, digits: int = 1) -> str:
    """``metrics[key]`` in points with its interval when there is one (:func:`format_ci`)."""
    return format_ci(float(metrics[key]), ci_of(metrics, key), digits=digits)


def level_text(metrics: Mapping[str, Any]) -> str:
    """``95% CI over 316 queries`` from a metrics dict's ``ci`` entry ("" without one)."""
    ci = metrics.get("ci")
    if not isinstance(ci, Mapping):
        return ""
    return f"± = half-width of the {100 * float(ci['level']):g}% bootstrap interval over {plural(ci['num_queries'], 'query', 'queries')}"


__all__ = [
    "DEFAULT_LEVEL", "DEFAULT_RESAMPLES", "DEFAULT_SEED", "binomial_two_sided", "bootstrap_ci", "bootstrap_metrics",
    "ci_of", "compare", "item_keys", "per_query_record", "set_signature", "format_ci", "format_diff", "format_mean_std", "format_p", "level_text", "mean_std", "metric_text", "paired_bootstrap",
    "per_query_arrays", "resample_means", "sign_test", "summarise_seeds", "verdict", "winner", "with_intervals",
]
