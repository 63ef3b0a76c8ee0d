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
                  verdict=stats.verdict(result, a.label, b.label))  # names the runs; "winner": A or B
    return result


