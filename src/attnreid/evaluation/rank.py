"""CMC, mAP and mINP from a query x gallery distance matrix, vectorised over query chunks.

Protocol (Market-1501 single query, the one torchreid and fast-reid use):

- the gallery is ranked by increasing distance; for each query, gallery images with the query's
  identity **and** camera are removed (same-camera matches are too easy), and so are gallery
  images with pid -1 (junk; the loaders drop them already, but arrays from elsewhere may hold
  them). Distractors (pid 0 in Market) stay: they are simply never a match;
- a query whose identity has no image left in the gallery cannot be scored: it is skipped and
  counted in ``num_skipped_queries``;
- AP is computed over the whole ranked list (no top-k cut); CMC up to ``max_rank``
  (rank k > number of gallery images: the curve stays flat); mINP is fast-reid's "mean inverse
  negative penalty": (number of true matches) / (rank of the hardest true match);
- with no cameras (``q_camids``/``g_camids`` None; Partial-REID, Partial-iLIDS) nothing is removed
  but junk.

**Ties.** Distances are compared in float32, as torchreid's evaluator does (float64 input is
rounded first). Equal distances are ordered by gallery index (a stable sort). torchreid calls
``np.argsort`` with numpy's default, non-stable sort, so its order of tied gallery images is
unspecified (in practice stable only for short rows); with distinct distances, the results are
identical. **No full argsort.** Only the ranks of the true matches matter for all three metrics.
For a chunk of queries the rows are sorted by value (a values-only sort is several times cheaper
than an argsort plus the ``Q x G`` match matrix torchreid builds), invalid gallery entries having
been set to +inf; the rank of each true match is then two binary searches, with an exact
by-index correction only for matches whose distance occurs more than once in the row.

Everything here is numpy (no torch import). Distance blocks may come as torch tensors (the
engine's features, on any device); each block is copied to the CPU as it is ranked.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np

from attnreid.errors import AttnReidError
from attnreid.evaluation.distance import ArrayLike, as_numpy

_NAMES = {
    "distmat": "distmat",
    "q_pids": "q_pids",
    "g_pids": "g_pids",
    "q_camids": "q_camids",
    "g_camids": "g_camids",
}

JUNK_PID = -1
_BIG = np.iinfo(np.int64).max


def check_finite(d: np.ndarray, name: str, first_row: int = 0, shape: Optional[Tuple[int, int]] = None) -> None:
    """Raise a one-line error naming the first NaN/inf entry of ``d``.

    Checked a block of rows at a time with a min/max reduction (NaN propagates through both), so
    no Q x G boolean array is allocated. ``d`` may be the rows from ``first_row`` on of a matrix
    of ``shape`` (the message then names the matrix's row and shape).
    """
    step = max(1, (1 << 22) // max(d.shape[1], 1))
    for s in range(0, d.shape[0], step):
        block = d[s : s + step]
        if np.isfinite(block.min()) and np.isfinite(block.max()):
            continue
        r, c = (int(v[0]) for v in np.nonzero(~np.isfinite(block)))
        count = sum(int((~np.isfinite(d[t : t + step])).sum()) for t in range(s, d.shape[0], step))
        where = "" if first_row == 0 and shape is None else f" in rows {first_row}..{first_row + d.shape[0] - 1}"
        raise AttnReidError(f"{name} (shape {tuple(shape or d.shape)}) has {count} NaN/inf value(s){where}, "
                            f"first at [{first_row + r + s}, {c}]")


def _ids(x: ArrayLike, name: str, expected: int) -> np.ndarray:
    a = as_numpy(x)
    if a.ndim != 1:
        raise AttnReidError(f"{name} must be 1-D, got shape {tuple(a.shape)}")
    if a.shape[0] != expected:
        raise AttnReidError(f"{name} has {a.shape[0]} entries but the distance matrix needs {expected}")
    if a.dtype.kind == "f":
        if a.size and not bool(np.isfinite(a).all() and (a == np.round(a)).all()):
            raise AttnReidError(f"{name} must hold integer ids")
    elif a.dtype.kind not in "iu":
        raise AttnReidError(f"{name} must hold integer ids, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


def check_ids(n_query: int, n_gallery: int, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: Optional[ArrayLike],
              g_camids: Optional[ArrayLike], names: Optional[Mapping[str, str]] = None):
    """The ids and cameras as int64 arrays (cameras None when not given), each checked in one line."""
    n = dict(_NAMES, **(names or {}))
    qp = _ids(q_pids, n["q_pids"], n_query)
    gp = _ids(g_pids, n["g_pids"], n_gallery)
    if (q_camids is None) != (g_camids is None):
        missing = n["q_camids"] if q_camids is None else n["g_camids"]
        raise AttnReidError(f"{missing} is missing: give camera ids for both query and gallery, or for neither")
    qc = gc = None
    if q_camids is not None:
        qc = _ids(q_camids, n["q_camids"], n_query)
        gc = _ids(g_camids, n["g_camids"], n_gallery)
    return qp, gp, qc, gc


def check_rank_inputs(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: Optional[ArrayLike],
    g_camids: Optional[ArrayLike],
    names: Optional[Mapping[str, str]] = None,
    finite: bool = True,
):
    """Validate the evaluator's inputs; return them as numpy arrays (a tensor is copied to the CPU).

    Every problem raises :class:`AttnReidError` with one line naming the array (``names`` maps the
    argument names to what the user calls them, e.g. npz keys) and its shape. ``finite=False``
    leaves the NaN/inf check to the caller (who checks each block as it is ranked).
    """
    n = dict(_NAMES, **(names or {}))
    d = as_numpy(distmat)
    if d.ndim != 2:
        raise AttnReidError(f"{n['distmat']} must be 2-D (queries x gallery), got shape {tuple(d.shape)}")
    if d.shape[0] == 0:
        raise AttnReidError(f"{n['distmat']} has shape {tuple(d.shape)}: the query set is empty")
    if d.shape[1] == 0:
        raise AttnReidError(f"{n['distmat']} has shape {tuple(d.shape)}: the gallery is empty")
    if d.dtype.kind != "f":
        d = d.astype(np.float32)
    if finite:
        check_finite(d, n["distmat"])
    return (d,) + check_ids(d.shape[0], d.shape[1], q_pids, g_pids, q_camids, g_camids, names)


class _Gallery:
    """Gallery ids arranged for fast lookup of each query's true-match candidates."""

    def __init__(self, g_pids: np.ndarray, g_camids: Optional[np.ndarray]):
        self.pids = g_pids
        self.camids = g_camids
        self.size = g_pids.shape[0]
        order = np.argsort(g_pids, kind="stable")
        self.by_pid = order
        self.unique_pids, self.counts = np.unique(g_pids[order], return_counts=True)
        self.offsets = np.cumsum(self.counts) - self.counts
        self.junk = np.flatnonzero(g_pids == JUNK_PID)

    def candidates(self, q_pids: np.ndarray) -> np.ndarray:
        """c x M gallery indices that share each query's pid (padded with -1)."""
        if len(self.unique_pids):
            pos = np.minimum(np.searchsorted(self.unique_pids, q_pids), len(self.unique_pids) - 1)
            found = (self.unique_pids[pos] == q_pids) & (q_pids != JUNK_PID)
            count = np.where(found, self.counts[pos], 0)
        else:
            pos, count = np.zeros_like(q_pids), np.zeros_like(q_pids)
        width = max(int(count.max()) if count.size else 0, 1)
        slot = np.arange(width)
        ok = slot[None, :] < count[:, None]
        flat = np.minimum(self.offsets[pos][:, None] + slot[None, :], self.size - 1) if len(self.unique_pids) \
            else np.zeros((len(q_pids), width), dtype=np.int64)
        return np.where(ok, self.by_pid[flat], -1)


_POOL = None


def num_threads() -> int:
    """Threads for the row sorts: torch's setting when torch is loaded, else OMP_NUM_THREADS, else the CPUs."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return max(1, torch.get_num_threads())
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _sort_rows(arr: np.ndarray) -> np.ndarray:
    """Row-wise values-only sort of a fresh (contiguous, disposable) array, in place.

    numpy's vectorised (AVX-512/AVX2) float sort is several times faster than an argsort; it
    releases the GIL, so row blocks are sorted on :func:`num_threads` threads.
    """
    global _POOL
    threads = max(1, min(num_threads(), arr.shape[0]))
    if threads == 1:
        arr.sort(axis=1)
        return arr
    if _POOL is None or _POOL._max_workers < threads:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=threads)
    bounds = np.linspace(0, arr.shape[0], threads + 1).astype(int)
    list(_POOL.map(lambda i: arr[bounds[i] : bounds[i + 1]].sort(axis=1), range(threads)))
    return arr


def _masked_copy(dist: np.ndarray, junk: np.ndarray, removed: Optional[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """A contiguous float32 copy of ``dist`` with the removed gallery entries at +inf: the junk
    columns and the ``(row, column)`` pairs of ``removed`` (same identity, same camera)."""
    d = np.array(dist, dtype=np.float32, order="C", copy=True)
    if junk.size:
        d[:, junk] = np.inf
    if removed is not None:
        d[removed] = np.inf
    return d


def _chunk_ranks(
    dist: np.ndarray,
    q_pids: np.ndarray,
    q_camids: Optional[np.ndarray],
    gallery: _Gallery,
    keep_masked: bool = False,
):
    """Ranks (1-based, in the filtered list) of every true match of each query of a chunk.

    Returns ``(ranks, positive, masked)``: ``ranks`` c x M sorted ascending with padding set to a
    huge value, ``positive`` the matching c x M mask (true matches, also sorted first), and, with
    ``keep_masked``, ``masked`` the chunk's distances with removed gallery entries set to +inf
    (else None). ``dist`` is only read.
    """
    c, g = dist.shape
    cand = gallery.candidates(q_pids)
    has = cand >= 0
    safe = np.maximum(cand, 0)
    positive = has.copy()
    removed = None
    if q_camids is not None:
        same_cam = has & (gallery.camids[safe] == q_camids[:, None])
        positive &= ~same_cam
        rows, slots = np.nonzero(same_cam)
        removed = (rows, cand[rows, slots])
    srt = _masked_copy(dist, gallery.junk, removed)  # sorted in place below: the chunk's one copy
    thresh = np.where(positive, np.take_along_axis(srt, safe, axis=1), np.float32(np.inf))
    masked = srt.copy() if keep_masked else None
    _sort_rows(srt)
    left = np.empty(thresh.shape, dtype=np.int64)
    for r in range(c):  # one binary search per true match, row by row (numpy has no batched form)
        left[r] = np.searchsorted(srt[r], thresh[r], side="left")
    rank = left + 1
    # srt[left] is the match's own distance; another equal value can only sit right after it.
    after = np.take_along_axis(srt, np.minimum(left + 1, g - 1), axis=1)
    tied = positive & (left + 1 < g) & (after == thresh)
    tie_r, tie_s = np.nonzero(tied)
    if tie_r.size:
        # Equal distances: gallery images with a smaller index come first (stable order).
        col = np.arange(g)
        for s in range(0, tie_r.size, 256):
            r, sl = tie_r[s : s + 256], tie_s[s : s + 256]
            rows_d = masked[r] if masked is not None else _masked_rows(dist, r, gallery.junk, removed)
            before = (rows_d == thresh[r, sl][:, None]) & (col[None, :] < cand[r, sl][:, None])
            rank[r, sl] += before.sum(axis=1)
    ranks = np.sort(np.where(positive, rank, _BIG), axis=1)
    return ranks, ranks < _BIG, masked


def _masked_rows(dist: np.ndarray, rows: np.ndarray, junk: np.ndarray,
                 removed: Optional[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """:func:`_masked_copy` of the listed rows of ``dist`` only (``rows`` may repeat)."""
    unique, inverse = np.unique(rows, return_inverse=True)
    part = None
    if removed is not None:
        sel = np.isin(removed[0], unique)
        part = (np.searchsorted(unique, removed[0][sel]), removed[1][sel])
    return _masked_copy(dist[unique], junk, part)[inverse]


def _ap_inp(ranks: np.ndarray, positive: np.ndarray):
    """Per-query AP (whole list) and INP from the sorted true-match ranks."""
    m = positive.sum(axis=1)
    hits = np.arange(1, ranks.shape[1] + 1, dtype=np.float64)
    prec = np.where(positive, hits[None, :] / np.minimum(ranks, 2**52).astype(np.float64), 0.0)
    ap = prec.sum(axis=1) / np.maximum(m, 1).astype(np.float64)
    last = np.minimum(np.take_along_axis(ranks, np.maximum(m - 1, 0)[:, None], axis=1)[:, 0], 2**52)
    inp = m.astype(np.float64) / last.astype(np.float64)
    return ap, inp, m > 0


def _per_query(ap: np.ndarray, inp: np.ndarray, hit1: np.ndarray, valid: np.ndarray,
               first_rank: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
    """Per-query arrays over *all* queries, in query order (skipped queries: NaN / 0 / False).

    ``ap``, ``inp`` (float64), ``rank1`` (float64: the query's rank-1 hit, 0 or 1; under the CUHK03
    single-shot protocol the share of the draws that hit), ``valid`` (bool) and, for the Market
    protocol, ``first_rank`` (int64: 1-based rank of the first true match; 0 when skipped).
    These are what :mod:`attnreid.evaluation.stats` resamples.
    """
    out = {
        "ap": np.where(valid, ap, np.nan),
        "inp": np.where(valid, inp, np.nan),
        "rank1": np.where(valid, hit1, np.nan),
        "valid": valid.copy(),
    }
    if first_rank is not None:
        out["first_rank"] = np.where(valid, first_rank, 0).astype(np.int64)
    return out


def _summary(first_cmc: np.ndarray, ap: np.ndarray, inp: np.ndarray, num_queries: int) -> Dict:
    num_valid = int(ap.size)
    if num_valid == 0:
        raise AttnReidError(
            f"none of the {num_queries} queries has a valid match in the gallery "
            "(no gallery image with the query's identity from another camera)"
        )
    cmc = (first_cmc.sum(axis=0) / num_valid).tolist()
    out = {
        "mAP": float(ap.mean()),
        "mINP": float(inp.mean()),
        "cmc": [float(v) for v in cmc],
        "rank1": float(cmc[0]),
    }
    for k in (3, 5, 10):
        out[f"rank{k}"] = float(cmc[min(k, len(cmc)) - 1])
    out["num_valid_queries"] = num_valid
    out["num_skipped_queries"] = num_queries - num_valid
    return out


def _default_chunk(num_gallery: int) -> int:
    # About 8M distances per chunk (~32 MB float32): small enough for any machine, large enough
    # that the per-chunk Python overhead is negligible.
    return max(16, min(4096, (1 << 23) // max(num_gallery, 1)))


def iter_rank_chunks(distmat, chunk_size: int):
    for s in range(0, distmat.shape[0], chunk_size):
        yield s, distmat[s : s + chunk_size]


def top_k(block: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (int64) and float32 distances of each row's ``k`` smallest entries, in (distance,
    gallery index) order: ties are ordered by index, even across the cut."""
    d = np.asarray(block, dtype=np.float32)
    g = d.shape[1]
    k = min(k, g)
    if k >= g:
        idx = np.argsort(d, axis=1, kind="stable")
    else:
        idx = np.argpartition(d, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(d, idx, axis=1)
        idx = np.take_along_axis(idx, np.lexsort((idx, vals), axis=1), axis=1)
        # argpartition picks any of the values tied with the k-th: such rows get a stable sort.
        kth = np.take_along_axis(d, idx[:, -1:], axis=1)
        straddle = np.flatnonzero((d <= kth).sum(axis=1) > k)
        if straddle.size:
            idx[straddle] = np.argsort(d[straddle], axis=1, kind="stable")[:, :k]
    idx = np.ascontiguousarray(idx[:, :k], dtype=np.int64)
    return idx, np.take_along_axis(d, idx, axis=1)


class _Lists:
    """Collects what :func:`evaluate_rank_chunks` returns besides the summary."""

    def __init__(self, per_query: bool, ranked_k: int):
        self.per_query, self.ranked_k = per_query, ranked_k
        self.ap, self.inp, self.hit1, self.valid, self.first = [], [], [], [], []
        self.topk_index, self.topk_dist = [], []

    def add(self, block, ap, inp, hit1, valid, first) -> None:
        if self.per_query:
            self.ap.append(ap)
            self.inp.append(inp)
            self.hit1.append(hit1)
            self.valid.append(valid)
        if self.per_query or self.ranked_k:
            self.first.append(np.where(valid, first, 0))
        if self.ranked_k:
            i, v = top_k(block, self.ranked_k)
            self.topk_index.append(i)
            self.topk_dist.append(v)

    def into(self, out: Dict, with_first_rank: bool) -> Dict:
        first = np.concatenate(self.first).astype(np.int64) if self.first else None
        if self.per_query:
            out["per_query"] = _per_query(np.concatenate(self.ap), np.concatenate(self.inp),
                                          np.concatenate(self.hit1), np.concatenate(self.valid),
                                          first if with_first_rank else None)
        if self.ranked_k:
            out["ranked"] = {"topk_index": np.concatenate(self.topk_index),
                             "topk_dist": np.concatenate(self.topk_dist), "first_match_rank": first}
        return out


def evaluate_rank(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: Optional[ArrayLike] = None,
    g_camids: Optional[ArrayLike] = None,
    max_rank: int = 50,
    chunk_size: Optional[int] = None,
    names: Optional[Mapping[str, str]] = None,
    per_query: bool = False,
    ranked_k: int = 0,
) -> Dict:
    """CMC, mAP and mINP under the Market-1501 single-query protocol (see the module docstring).

    ``distmat`` is Q x G (numpy, or a torch tensor on any device; smaller = closer). Without camera
    ids no same-camera filtering is done (partial re-ID protocols). Returns ``{"mAP", "mINP", "cmc"
    (max_rank fractions), "rank1", "rank3", "rank5", "rank10", "num_valid_queries",
    "num_skipped_queries"}``, all scores fractions in [0, 1]; with ``per_query=True`` also
    ``"per_query"``: numpy arrays over all queries (see :func:`_per_query`); with ``ranked_k > 0``
    also ``"ranked"`` (see :func:`evaluate_rank_chunks`). The summary values are the same either way.
    """
    d, qp, gp, qc, gc = check_rank_inputs(distmat, q_pids, g_pids, q_camids, g_camids, names)
    return evaluate_rank_chunks(iter_rank_chunks(d, chunk_size or _default_chunk(d.shape[1])), qp, gp, qc, gc, max_rank,
                                per_query=per_query, ranked_k=ranked_k)


def evaluate_rank_chunks(chunks: Iterable, qp: np.ndarray, gp: np.ndarray, qc: Optional[np.ndarray],
                         gc: Optional[np.ndarray], max_rank: int = 50, per_query: bool = False,
                         ranked_k: int = 0) -> Dict:
    """:func:`evaluate_rank` over ``(first_row, distance block)`` pairs in row order, each
    consumed as it comes (computed on the fly, re-ranked, or slices of a whole matrix: the same
    numbers). ``qp``/``gp``/``qc``/``gc`` as :func:`check_ids` returns them.

    ``ranked_k > 0`` adds ``"ranked"``: ``topk_index`` / ``topk_dist`` (Q x k, each row's k
    nearest gallery images by (distance, index), nothing removed) and ``first_match_rank`` (Q:
    the 1-based rank of the query's first true match in its filtered list, as the metrics
    count it; 0 for a query without one).
    """
    if max_rank < 1:
        raise AttnReidError(f"max_rank must be >= 1, got {max_rank}")
    gallery = _Gallery(gp, gc)
    ks = np.arange(1, max_rank + 1)
    firsts, aps, inps = [], [], []
    lists = _Lists(per_query, ranked_k)
    for start, block in chunks:
        block = as_numpy(block)
        rows = slice(start, start + block.shape[0])
        ranks, positive, _ = _chunk_ranks(block, qp[rows], None if qc is None else qc[rows], gallery)
        ap, inp, valid = _ap_inp(ranks, positive)
        firsts.append((ranks[valid, :1] <= ks[None, :]).astype(np.float64))
        aps.append(ap[valid])
        inps.append(inp[valid])
        lists.add(block, ap, inp, (ranks[:, 0] == 1).astype(np.float64), valid, ranks[:, 0])
    out = _summary(np.concatenate(firsts), np.concatenate(aps), np.concatenate(inps), int(qp.shape[0]))
    return lists.into(out, with_first_rank=True)


def _draw_keys(rng: np.random.RandomState, shape: Tuple[int, int]) -> np.ndarray:
    """``torch.randint(0, 2**40, shape, generator=g)`` for a CPU generator seeded like ``rng``:
    torch draws each value as two 32-bit Mersenne-Twister outputs (high word first) modulo the
    range, which numpy's legacy ``RandomState`` (the same MT19937 and seeding) reproduces."""
    n = shape[0] * shape[1]
    raw = rng.randint(0, 1 << 32, size=2 * n, dtype=np.uint64)
    return ((raw[0::2] << np.uint64(32) | raw[1::2]) % np.uint64(1 << 40)).astype(np.int64).reshape(shape)


def evaluate_cuhk03_single_shot(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
    num_repeats: int = 10,
    seed: int = 0,
    chunk_size: Optional[int] = None,
    names: Optional[Mapping[str, str]] = None,
    per_query: bool = False,
    ranked_k: int = 0,
) -> Dict:
    """CUHK03 classic single-shot protocol (torchreid's ``use_metric_cuhk03``).

    After the Market filtering, for every query and every repeat one gallery image is drawn at
    random for each gallery identity; the CMC is computed on that one-image-per-identity gallery
    and averaged over ``num_repeats`` draws. As in torchreid, mAP and mINP are computed on the full
    filtered gallery (the draw only affects the CMC). Draws are those of a ``torch.Generator``
    seeded with ``seed`` (reproduced in numpy, :func:`_draw_keys`), so results are reproducible
    (they cannot equal torchreid's, which draws from numpy's global RNG). Ties as in
    :func:`evaluate_rank`. ``per_query`` as there, without ``first_rank`` (a query's rank-1 hit is
    the share of draws that hit); ``ranked_k`` as there.
    """
    d, qp, gp, qc, gc = check_rank_inputs(distmat, q_pids, g_pids, q_camids, g_camids, names)
    return evaluate_cuhk03_chunks(iter_rank_chunks(d, chunk_size or _default_chunk(d.shape[1])), qp, gp, qc, gc,
                                  max_rank, num_repeats, seed, per_query, ranked_k)


def evaluate_cuhk03_chunks(chunks: Iterable, qp: np.ndarray, gp: np.ndarray, qc: Optional[np.ndarray],
                           gc: Optional[np.ndarray], max_rank: int = 50, num_repeats: int = 10, seed: int = 0,
                           per_query: bool = False, ranked_k: int = 0) -> Dict:
    """:func:`evaluate_cuhk03_single_shot` over ``(first_row, distance block)`` pairs in row order."""
    if qc is None:
        raise AttnReidError("the CUHK03 single-shot protocol needs camera ids for query and gallery")
    if num_repeats < 1:
        raise AttnReidError(f"num_repeats must be >= 1, got {num_repeats}")
    if max_rank < 1:
        raise AttnReidError(f"max_rank must be >= 1, got {max_rank}")
    num_g = gp.shape[0]
    if num_g >= 1 << 22:
        raise AttnReidError(f"gallery of {num_g} images is too large for the CUHK03 sampler (max 4194303)")
    gallery = _Gallery(gp, gc)
    rng = np.random.RandomState(int(seed) & 0xFFFFFFFF)
    _, pid_index = np.unique(gp, return_inverse=True)
    by_pid = np.argsort(pid_index, kind="stable")
    pid_starts = np.flatnonzero(np.r_[True, np.diff(pid_index[by_pid]) != 0])
    col = np.arange(num_g)
    ks = np.arange(1, max_rank + 1)
    firsts, aps, inps = [], [], []
    lists = _Lists(per_query, ranked_k)
    for start, block in chunks:
        block = as_numpy(block)
        c = block.shape[0]
        rows = slice(start, start + c)
        ranks, positive, masked = _chunk_ranks(block, qp[rows], qc[rows], gallery, keep_masked=True)
        ap, inp, valid = _ap_inp(ranks, positive)
        kept = np.isfinite(masked)
        is_match = gp[None, :] == qp[rows][:, None]
        cmc = np.zeros((c, max_rank), dtype=np.float64)
        for _ in range(num_repeats):
            # Unique random keys (random high bits, gallery index low bits): the largest key of
            # each identity picks its image, with no ties possible.
            key = _draw_keys(rng, (c, num_g)) * (1 << 22) + col
            key = np.where(kept, key, -1)
            best = np.maximum(np.maximum.reduceat(key[:, by_pid], pid_starts, axis=1), -1)
            chosen = kept & (key == best[:, pid_index])
            dist = np.where(chosen, masked, np.float32(np.inf))
            target = chosen & is_match
            t_idx = np.minimum(np.where(target, col, num_g).min(axis=1), num_g - 1)
            t_val = np.take_along_axis(dist, t_idx[:, None], axis=1)
            before = (dist < t_val) | ((dist == t_val) & (col[None, :] < t_idx[:, None]))
            rank = before.sum(axis=1, keepdims=True) + 1
            cmc += (rank <= ks[None, :]).astype(np.float64) / num_repeats
        firsts.append(cmc[valid])
        aps.append(ap[valid])
        inps.append(inp[valid])
        lists.add(block, ap, inp, cmc[:, 0], valid, ranks[:, 0])
    out = _summary(np.concatenate(firsts), np.concatenate(aps), np.concatenate(inps), int(qp.shape[0]))
    return lists.into(out, with_first_rank=False)


__all__: Sequence[str] = ("evaluate_cuhk03_single_shot", "evaluate_rank", "evaluate_rank_chunks",
                          "evaluate_cuhk03_chunks", "check_ids", "check_rank_inputs", "top_k")
