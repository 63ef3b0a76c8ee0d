"""`attnreid compare A B`: is model A really better than model B on the same queries?

``A`` and ``B`` are each either a **run folder** (its ``eval_per_query.npz``, written by every
evaluation since this version, and ``eval.json``) or a **metrics/feature file** (``.npz`` as
``attnreid extract --split query --split gallery`` or ``attnreid metrics`` read it), which is
evaluated here under ``protocol`` / ``metric``. The two must hold the same queries: the same images
(by file name, see :func:`attnreid.evaluation.stats.item_keys`), identities and cameras, in any
order (B is put in A's order), and, where both record it, the same gallery. Otherwise the
comparison is refused in one line (:func:`attnreid.evaluation.paired.align`).

The statistics are :func:`attnreid.evaluation.stats.compare`: per-query AP and rank-1 hit
differences, a paired bootstrap interval of the mean difference and an exact sign test; the
verdict ("<A> better" or "<B> better", naming the run or file, or "no significant difference") is
decided on mAP; ``winner`` in the result says ``A``, ``B`` or None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from attnreid.errors import DataError
from attnreid.evaluation import stats
from attnreid.evaluation.paired import Evaluated, compare_evaluated, load_run


def load_feature_file(path: str | Path, protocol: str = "market", metric: str = "euclidean_sq",
                      label: Optional[str] = None) -> Evaluated:
    """Evaluate a metrics/feature ``.npz`` (see :mod:`attnreid.evaluation.npz`) query by query.

    Without ``query_paths`` the queries are named by their position, so two such files pair up
    only when they list the same identities and cameras in the same order.
    """
    from attnreid.evaluation.npz import evaluate_npz
    from attnreid.evaluation.options import RankingOptions

    path = Path(path)
    res = evaluate_npz(path, protocol=protocol, ranking=RankingOptions(metric=metric), per_query=True)
    arrays = res.pop("arrays")
    n_q = len(arrays["query_pids"])
    q_paths = [str(p) for p in arrays["query_paths"]] if "query_paths" in arrays else None
    keys = stats.item_keys(q_paths) if q_paths else [f"#{i}" for i in range(n_q)]
    q_cams = arrays.get("query_camids", np.full(n_q, -1))
    g_sig = None
    if "gallery_paths" in arrays:
        g_sig = stats.set_signature([str(p) for p in arrays["gallery_paths"]], arrays["gallery_pids"],
                                    arrays.get("gallery_camids"))
    per_query = {k: np.asarray(v) for k, v in res.pop("per_query").items()}
    return Evaluated(label or path.name, path, keys, np.asarray(arrays["query_pids"]), np.asarray(q_cams),
                     per_query, g_sig, res)


def load_input(path: str | Path, protocol: str = "market", metric: str = "euclidean_sq",
               label: Optional[str] = None) -> Evaluated:
    """A run folder or an ``.npz`` file."""
    path = Path(path)
    if path.is_dir():
        return load_run(path, label)
    if path.suffix == ".npz":
        return load_feature_file(path, protocol, metric, label)
    if not path.exists():
        raise DataError(f"{path}: no such run folder or .npz file")
    raise DataError(f"{path} is neither a run folder nor an .npz feature file")


def compare_paths(path_a: str | Path, path_b: str | Path, protocol: str = "market", metric: str = "euclidean_sq",
                  resamples: int = stats.DEFAULT_RESAMPLES, level: float = stats.DEFAULT_LEVEL,
                  seed: int = stats.DEFAULT_SEED) -> Dict[str, Any]:
    """``attnreid compare A B`` as a function: returns the JSON-able result."""
    a = load_input(path_a, protocol, metric)
    b = load_input(path_b, protocol, metric)
    if a.label == b.label:
        a.label, b.label = str(path_a), str(path_b)
    return compare_evaluated(a, b, resamples, level, seed)


def result_lines(result: Dict[str, Any]) -> List[str]:
    """The human-readable comparison: one line per metric, then the verdict."""
    pct = 100 * result["level"]
    lines = [f"A = {result['A']}   B = {result['B']}   ({result['num_queries']} paired queries; "
             f"{pct:g}% paired bootstrap interval of A - B, {result['resamples']} resamples; exact sign test)"]
    for key, name in (("mAP", "mAP"), ("rank1", "Rank-1")):
        m = result[key]
        what = "queries with higher AP" if key == "mAP" else "queries hit at rank 1 by one model only"
        lines.append(f"{name:7s} A {100 * m['A']:5.1f}  B {100 * m['B']:5.1f}  A - B {stats.format_diff(m)} points, "
                     f"{stats.format_p(m['p'])} ({what}: A {m['n_a_better']}, B {m['n_b_better']})")
    lines.append(f"verdict: {result['verdict']} (decided on mAP)")
    return lines
