"""`attnreid compare A B`: is model A really better than model B on the same queries?

``A`` and ``B`` are each either a **run folder** (its ``eval_per_query.npz``, written by every
evaluation since this version, and ``eval.json``) or a **metrics/feature file** (``.npz`` as
``attnreid extract --split query --split gallery`` or ``attnreid metrics`` read it), which is
evaluated here under ``protocol`` / ``metric``. The two must hold the same queries: the same images
(by file name, see :func:`attnreid.evaluation.stats.item_keys`), identities and cameras, in any
order (B is put in A's order), and, where both record it, the same gallery. Otherwise the
comparison is refused in one line: a paired test on different queries would compare different
tasks.

The statistics are :func:`attnreid.evaluation.stats.compare`: per-query AP and rank-1 hit
differences, a paired bootstrap interval of the mean difference and an exact sign test; the
verdict ("A better", "B better" or "no significant difference") is decided on mAP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from attnreid.errors import AttnReidError, DataError
from attnreid.evaluation import stats

PER_QUERY_FILE = "eval_per_query.npz"
_PER_QUERY_KEYS = ("ap", "inp", "rank1", "valid")


@dataclass
class Evaluated:
    """One side of a comparison: a model's per-query results and what identifies its queries."""

    label: str
    source: Path
    query_keys: List[str]
    query_pids: np.ndarray
    query_camids: np.ndarray
    per_query: Dict[str, np.ndarray]
    gallery_signature: Optional[str] = None
    metrics: Dict[str, Any] = field(default_factory=dict)


def load_run(path: str | Path, label: Optional[str] = None) -> Evaluated:
    """A run folder's ``eval_per_query.npz`` (and ``eval.json`` for the summary metrics)."""
    path = Path(path)
    file = path / PER_QUERY_FILE
    if not file.is_file():
        raise DataError(f"{path}: no {PER_QUERY_FILE} in this run folder (evaluate it again with this version: "
                        f"attnreid eval CONFIG --checkpoint CKPT --out {path})")
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{file} is not a readable .npz file ({type(exc).__name__})") from None
    missing = [k for k in ("query_paths", "query_pids", "query_camids") + _PER_QUERY_KEYS if k not in arrays]
    if missing:
        raise DataError(f"{file}: missing key '{missing[0]}'")
    metrics: Dict[str, Any] = {}
    if (path / "eval.json").is_file():
        try:
            metrics = json.loads((path / "eval.json").read_text())
        except json.JSONDecodeError:
            metrics = {}
    per_query = {k: arrays[k] for k in _PER_QUERY_KEYS + ("first_rank",) if k in arrays}
    sig = arrays.get("gallery_signature")
    return Evaluated(label or path.name, path, stats.item_keys(list(arrays["query_paths"])),
                     arrays["query_pids"], arrays["query_camids"], per_query,
                     str(sig) if sig is not None else None, metrics if isinstance(metrics, dict) else {})


def load_feature_file(path: str | Path, protocol: str = "market", metric: str = "euclidean_sq",
                      label: Optional[str] = None) -> Evaluated:
    """Evaluate a metrics/feature ``.npz`` (see :mod:`attnreid.evaluation.npz`) query by query.

    Without ``query_paths`` the queries are named by their position, so two such files pair up
    only when they list the same identities and cameras in the same order.
    """
    from attnreid.evaluation.npz import evaluate_npz

    path = Path(path)
    res = evaluate_npz(path, protocol=protocol, metric=metric, per_query=True)
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


def align(a: Evaluated, b: Evaluated) -> Evaluated:
    """``b`` with its queries in ``a``'s order; a one-line error when the query sets differ."""
    if a.gallery_signature and b.gallery_signature and a.gallery_signature != b.gallery_signature:
        raise AttnReidError(f"{a.source} and {b.source} were evaluated against different galleries; "
                            "a paired comparison needs the same queries and gallery")
    if len(set(b.query_keys)) != len(b.query_keys):
        raise AttnReidError(f"{b.source}: query names repeat, so its queries cannot be paired with {a.source}'s")
    pos = {k: i for i, k in enumerate(b.query_keys)}
    only_a = [k for k in a.query_keys if k not in pos]
    only_b = len(b.query_keys) - (len(a.query_keys) - len(only_a))
    if only_a or only_b:
        example = f" (e.g. {only_a[0]} is only in A)" if only_a else ""
        raise AttnReidError(f"{a.source} and {b.source} were evaluated on different queries: {len(a.query_keys)} vs "
                            f"{len(b.query_keys)} queries, {len(only_a)} only in A and {only_b} only in B{example}")
    order = np.array([pos[k] for k in a.query_keys], dtype=np.int64)
    pids, cams = np.asarray(b.query_pids)[order], np.asarray(b.query_camids)[order]
    bad = np.nonzero((pids != np.asarray(a.query_pids)) | (cams != np.asarray(a.query_camids)))[0]
    if bad.size:
        i = int(bad[0])
        raise AttnReidError(f"{a.source} and {b.source} were evaluated on different queries: query {a.query_keys[i]} "
                            f"has identity/camera {int(a.query_pids[i])}/{int(a.query_camids[i])} in A and "
                            f"{int(pids[i])}/{int(cams[i])} in B")
    return Evaluated(b.label, b.source, list(a.query_keys), pids, cams,
                     {k: np.asarray(v)[order] for k, v in b.per_query.items()}, b.gallery_signature, b.metrics)


def compare_evaluated(a: Evaluated, b: Evaluated, resamples: int = stats.DEFAULT_RESAMPLES,
                      level: float = stats.DEFAULT_LEVEL, seed: int = stats.DEFAULT_SEED) -> Dict[str, Any]:
    """:func:`attnreid.evaluation.stats.compare` of two aligned sides, with labels and the verdict."""
    b = align(a, b)
    result = stats.compare(a.per_query, b.per_query, resamples, level, seed)
    result.update(A=a.label, B=b.label, A_source=str(a.source), B_source=str(b.source),
                  verdict=stats.verdict(result))
    return result


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
