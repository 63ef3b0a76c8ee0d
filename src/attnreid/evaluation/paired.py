"""Two evaluations of the same queries, paired query by query (for ``attnreid compare`` and the report).

An evaluation's per-query results are an :class:`Evaluated`: the arrays of
:func:`attnreid.evaluation.rank.evaluate_rank` with ``per_query=True``, with the names, identities
and cameras of its queries and a signature of its gallery. A run folder holds them in
``eval_per_query.npz`` (:func:`attnreid.evaluation.stats.per_query_record`), read by
:func:`load_run`. :func:`align` pairs two of them: the same images (by file name,
:func:`attnreid.evaluation.stats.item_keys`), identities and cameras, in any order, and, where both
record it, the same gallery; otherwise it refuses in one line, since a paired test on different
queries would compare different tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from attnreid.errors import AttnReidError, DataError
from attnreid.evaluation import stats
from attnreid.safe_io import load_npz, read_json

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
    arrays = load_npz(file)
    missing = [k for k in ("query_paths", "query_pids", "query_camids") + _PER_QUERY_KEYS if k not in arrays]
    if missing:
        raise DataError(f"{file}: missing key '{missing[0]}'")
    n = len(arrays["query_paths"]) if arrays["query_paths"].ndim == 1 else -1
    for key, kinds in (("query_paths", "US"), ("query_pids", "iu"), ("query_camids", "iu"), ("ap", "f"),
                       ("inp", "f"), ("rank1", "fiub"), ("valid", "b")):
        a = arrays[key]
        if a.ndim != 1 or len(a) != n or a.dtype.kind not in kinds:
            raise DataError(f"{file}: '{key}' is {a.dtype} of shape {a.shape}; expected {max(n, 0)} "
                            f"{'names' if kinds == 'US' else 'values'} of kind {kinds!r}, one per query")
    metrics: Dict[str, Any] = {}
    if (path / "eval.json").is_file():
        try:
            metrics = read_json(path / "eval.json", "eval.json")
        except DataError:
            metrics = {}
    per_query = {k: arrays[k] for k in _PER_QUERY_KEYS + ("first_rank",) if k in arrays}
    sig = arrays.get("gallery_signature")
    return Evaluated(label or path.name, path, stats.item_keys(list(arrays["query_paths"])),
                     arrays["query_pids"], arrays["query_camids"], per_query,
                     str(sig) if sig is not None else None, metrics if isinstance(metrics, dict) else {})


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


def check_per_query(side: Evaluated) -> None:
    """Per-query AP and rank-1 of the valid queries must be numbers in [0, 1]: a NaN would make
    every statistic NaN, which a test reads as "no significant difference"."""
    valid = np.asarray(side.per_query["valid"], dtype=bool)
    for key in ("ap", "rank1"):
        v = np.asarray(side.per_query[key], dtype=np.float64)[valid]
        bad = ~(np.isfinite(v) & (v >= 0) & (v <= 1))
        if bad.any():
            raise DataError(f"{side.source}: '{key}' of {int(bad.sum())} valid queries is NaN or outside [0, 1] "
                            f"(e.g. {v[bad][0]}); it cannot be compared (evaluate the run again)")


def compare_evaluated(a: Evaluated, b: Evaluated, resamples: int = stats.DEFAULT_RESAMPLES,
                      level: float = stats.DEFAULT_LEVEL, seed: int = stats.DEFAULT_SEED) -> Dict[str, Any]:
    """:func:`attnreid.evaluation.stats.compare` of two aligned sides, with labels and the verdict."""
    b = align(a, b)
    for side in (a, b):
        check_per_query(side)
    result = stats.compare(a.per_query, b.per_query, resamples, level, seed)
    result.update(A=a.label, B=b.label, A_source=str(a.source), B_source=str(b.source),
                  verdict=stats.verdict(result, a.label, b.label))  # names the runs; "winner": A or B
    return result


