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
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from attnreid.errors import AttnReidError

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]

_NAMES = {
    "distmat": "distmat",
    "q_pids": "q_pids",
    "g_pids": "g_pids",
    "q_camids": "q_camids",
    "g_camids": "g_camids",
}

JUNK_PID = -1


def check_finite(d: torch.Tensor, name: str) -> None:
    """Raise a one-line error naming the first NaN/inf entry of ``d``.

    Checked a block of rows at a time with a min/max reduction (NaN propagates through both), so
    no Q x G boolean array is allocated.
    """
    step = max(1, (1 << 22) // max(d.shape[1], 1))
    for s in range(0, d.shape[0], step):
        lo, hi = torch.aminmax(d[s : s + step])
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            continue
        bad = ~torch.isfinite(d[s : s + step])
        r, c = (int(v) for v in torch.nonzero(bad)[0])
        count = sum(int((~torch.isfinite(d[t : t + step])).sum()) for t in range(s, d.shape[0], step))
        raise AttnReidError(f"{name} (shape {tuple(d.shape)}) has {count} NaN/inf value(s), first at [{r + s}, {c}]")


def _ids(x: ArrayLike, name: str, expected: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() != 1:
        raise AttnReidError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.shape[0] != expected:
        raise AttnReidError(f"{name} has {t.shape[0]} entries but the distance matrix needs {expected}")
    if t.is_floating_point():
        if t.numel() and not bool((t == t.round()).all() & torch.isfinite(t).all()):
            raise AttnReidError(f"{name} must hold integer ids")
    elif t.dtype == torch.bool or t.is_complex():
        raise AttnReidError(f"{name} must hold integer ids, got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.int64).contiguous()


def check_rank_inputs(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: Optional[ArrayLike],
    g_camids: Optional[ArrayLike],
    names: Optional[Mapping[str, str]] = None,
):
    """Validate the evaluator's inputs; return them as tensors (distmat on its own device).

    Every problem raises :class:`AttnReidError` with one line naming the array (``names`` maps the
    argument names to what the user calls them, e.g. npz keys) and its shape.
    """
    n = dict(_NAMES, **(names or {}))
    d = distmat if isinstance(distmat, torch.Tensor) else torch.as_tensor(np.asarray(distmat))
    if d.dim() != 2:
        raise AttnReidError(f"{n['distmat']} must be 2-D (queries x gallery), got shape {tuple(d.shape)}")
    if d.shape[0] == 0:
        raise AttnReidError(f"{n['distmat']} has shape {tuple(d.shape)}: the query set is empty")
    if d.shape[1] == 0:
        raise AttnReidError(f"{n['distmat']} has shape {tuple(d.shape)}: the gallery is empty")
    if not d.is_floating_point():
        d = d.to(torch.float32)
    check_finite(d, n["distmat"])
    dev = d.device
    qp = _ids(q_pids, n["q_pids"], d.shape[0], dev)
    gp = _ids(g_pids, n["g_pids"], d.shape[1], dev)
    if (q_camids is None) != (g_camids is None):
        missing = n["q_camids"] if q_camids is None else n["g_camids"]
        raise AttnReidError(f"{missing} is missing: give camera ids for both query and gallery, or for neither")
    qc = gc = None
    if q_camids is not None:
        qc = _ids(q_camids, n["q_camids"], d.shape[0], dev)
        gc = _ids(g_camids, n["g_camids"], d.shape[1], dev)
    return d, qp, gp, qc, gc


class _Gallery:
    """Gallery ids arranged for fast lookup of each query's true-match candidates."""

    def __init__(self, g_pids: torch.Tensor, g_camids: Optional[torch.Tensor]):
        self.pids = g_pids
        self.camids = g_camids
        self.size = g_pids.shape[0]
        order = torch.argsort(g_pids, stable=True)
        self.by_pid = order
        self.unique_pids, counts = torch.unique_consecutive(g_pids[order], return_counts=True)
        self.counts = counts
        self.offsets = torch.cumsum(counts, 0) - counts
        self.junk = torch.nonzero(g_pids == JUNK_PID).flatten()

    def candidates(self, q_pids: torch.Tensor) -> torch.Tensor:
        """c x M gallery indices that share each query's pid (padded with -1)."""
        pos = torch.searchsorted(self.unique_pids, q_pids).clamp_(max=max(len(self.unique_pids) - 1, 0))
        found = self.unique_pids[pos] == q_pids if len(self.unique_pids) else torch.zeros_like(q_pids, dtype=torch.bool)
        found &= q_pids != JUNK_PID
        count = torch.where(found, self.counts[pos], 0)
        width = max(int(count.max()) if count.numel() else 0, 1)
        slot = torch.arange(width, device=q_pids.device)
        ok = slot.unsqueeze(0) < count.unsqueeze(1)
        flat = (self.offsets[pos].unsqueeze(1) + slot.unsqueeze(0)).clamp_(max=self.size - 1)
        return torch.where(ok, self.by_pid[flat], -1)


_POOL = None


def _sort_rows(x: torch.Tensor) -> torch.Tensor:
    """Row-wise values-only sort of a fresh (contiguous, disposable) tensor, in place."""
    if x.device.type != "cpu":
        return torch.sort(x, dim=1).values
    # numpy's vectorised (AVX-512/AVX2) float sort is several times faster than torch.sort on CPU;
    # it releases the GIL, so row blocks are sorted on torch's number of threads.
    global _POOL
    arr = x.numpy()
    threads = max(1, min(torch.get_num_threads(), arr.shape[0]))
    if threads == 1:
        arr.sort(axis=1)
        return x
    if _POOL is None or _POOL._max_workers < threads:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=threads)
    bounds = np.linspace(0, arr.shape[0], threads + 1).astype(int)
    list(_POOL.map(lambda i: arr[bounds[i] : bounds[i + 1]].sort(axis=1), range(threads)))
    return x


def _chunk_ranks(
    dist: torch.Tensor,
    q_pids: torch.Tensor,
    q_camids: Optional[torch.Tensor],
    gallery: _Gallery,
):
    """Ranks (1-based, in the filtered list) of every true match of each query of a chunk.

    Returns ``(ranks, positive, masked)``: ``ranks`` c x M sorted ascending with padding set to a
    huge value, ``positive`` the matching c x M mask (true matches, also sorted first), and
    ``masked`` the chunk's distances with removed gallery entries set to +inf.
    """
    c, g = dist.shape
    dev = dist.device
    d = torch.empty(dist.shape, dtype=torch.float32, device=dev).copy_(dist)  # contiguous, ours
    if gallery.junk.numel():
        d[:, gallery.junk] = float("inf")
    cand = gallery.candidates(q_pids)
    has = cand >= 0
    safe = cand.clamp(min=0)
    positive = has.clone()
    if q_camids is not None:
        same_cam = has & (gallery.camids[safe] == q_camids.unsqueeze(1))
        positive &= ~same_cam
        rows, slots = torch.nonzero(same_cam, as_tuple=True)
        d[rows, cand[rows, slots]] = float("inf")
    thresh = torch.where(positive, d.gather(1, safe), float("inf"))
    srt = _sort_rows(d.clone())
    left = torch.searchsorted(srt, thresh, side="left")
    rank = left + 1
    # srt[left] is the match's own distance; another equal value can only sit right after it.
    after = srt.gather(1, (left + 1).clamp_(max=g - 1))
    tied = positive & (left + 1 < g) & (after == thresh)
    tie_r, tie_s = torch.nonzero(tied, as_tuple=True)
    if tie_r.numel():
        # Equal distances: gallery images with a smaller index come first (stable order).
        col = torch.arange(g, device=dev)
        for s in range(0, tie_r.numel(), 256):
            r, sl = tie_r[s : s + 256], tie_s[s : s + 256]
            before = (d[r] == thresh[r, sl].unsqueeze(1)) & (col.unsqueeze(0) < cand[r, sl].unsqueeze(1))
            rank[r, sl] += before.sum(dim=1)
    big = torch.iinfo(torch.int64).max
    ranks = torch.sort(torch.where(positive, rank, big), dim=1).values
    return ranks, ranks < big, d


def _ap_inp(ranks: torch.Tensor, positive: torch.Tensor):
    """Per-query AP (whole list) and INP from the sorted true-match ranks."""
    m = positive.sum(dim=1)
    hits = torch.arange(1, ranks.shape[1] + 1, device=ranks.device, dtype=torch.float64)
    prec = torch.where(positive, hits.unsqueeze(0) / ranks.clamp(max=2**52).to(torch.float64), 0.0)
    mf = m.to(torch.float64).clamp(min=1)
    ap = prec.sum(dim=1) / mf
    last = ranks.gather(1, (m - 1).clamp(min=0).unsqueeze(1)).squeeze(1).clamp(max=2**52)
    inp = m.to(torch.float64) / last.to(torch.float64)
    return ap, inp, m > 0


def _per_query(ap: torch.Tensor, inp: torch.Tensor, hit1: torch.Tensor, valid: torch.Tensor,
               first_rank: Optional[torch.Tensor]) -> Dict[str, np.ndarray]:
    """Per-query arrays over *all* queries, in query order (skipped queries: NaN / 0 / False).

    ``ap``, ``inp`` (float64), ``rank1`` (float64: the query's rank-1 hit, 0 or 1; under the CUHK03
    single-shot protocol the share of the draws that hit), ``valid`` (bool) and, for the Market
    protocol, ``first_rank`` (int64: 1-based rank of the first true match; 0 when skipped).
    These are what :mod:`attnreid.evaluation.stats` resamples.
    """
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=ap.device)
    out = {
        "ap": torch.where(valid, ap, nan).cpu().numpy(),
        "inp": torch.where(valid, inp, nan).cpu().numpy(),
        "rank1": torch.where(valid, hit1, nan).cpu().numpy(),
        "valid": valid.cpu().numpy(),
    }
    if first_rank is not None:
        out["first_rank"] = torch.where(valid, first_rank, 0).cpu().numpy().astype(np.int64)
    return out


def _summary(first_cmc: torch.Tensor, ap: torch.Tensor, inp: torch.Tensor, num_queries: int) -> Dict:
    num_valid = int(ap.numel())
    if num_valid == 0:
        raise AttnReidError(
            f"none of the {num_queries} queries has a valid match in the gallery "
            "(no gallery image with the query's identity from another camera)"
        )
    cmc = (first_cmc.sum(dim=0) / num_valid).tolist()
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


def iter_rank_chunks(distmat: torch.Tensor, chunk_size: int):
    for s in range(0, distmat.shape[0], chunk_size):
        yield s, distmat[s : s + chunk_size]


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
) -> Dict:
    """CMC, mAP and mINP under the Market-1501 single-query protocol (see the module docstring).

    ``distmat`` is Q x G (numpy or torch, CPU or GPU; smaller = closer). Without camera ids no
    same-camera filtering is done (partial re-ID protocols). Returns ``{"mAP", "mINP", "cmc"
    (max_rank fractions), "rank1", "rank3", "rank5", "rank10", "num_valid_queries",
    "num_skipped_queries"}``, all scores fractions in [0, 1]; with ``per_query=True`` also
    ``"per_query"``: numpy arrays over all queries (see :func:`_per_query`). The summary values are
    the same either way.
    """
    d, qp, gp, qc, gc = check_rank_inputs(distmat, q_pids, g_pids, q_camids, g_camids, names)
    return evaluate_rank_chunks(iter_rank_chunks(d, chunk_size or _default_chunk(d.shape[1])), qp, gp, qc, gc, max_rank,
                                per_query=per_query)


def evaluate_rank_chunks(chunks, qp, gp, qc, gc, max_rank: int = 50, per_query: bool = False) -> Dict:
    """:func:`evaluate_rank` over ``(first_row, distance block)`` pairs (e.g. computed on the fly)."""
    if max_rank < 1:
        raise AttnReidError(f"max_rank must be >= 1, got {max_rank}")
    gallery = _Gallery(gp, gc)
    firsts, aps, inps = [], [], []
    all_ap, all_inp, all_first, all_valid = [], [], [], []
    ks = None
    for start, block in chunks:
        rows = slice(start, start + block.shape[0])
        ranks, positive, _ = _chunk_ranks(block, qp[rows], None if qc is None else qc[rows], gallery)
        ap, inp, valid = _ap_inp(ranks, positive)
        if ks is None:
            ks = torch.arange(1, max_rank + 1, device=ranks.device)
        firsts.append((ranks[valid, :1] <= ks.unsqueeze(0)).to(torch.float64))
        aps.append(ap[valid])
        inps.append(inp[valid])
        if per_query:
            all_ap.append(ap)
            all_inp.append(inp)
            all_first.append(torch.where(valid, ranks[:, 0], 0))
            all_valid.append(valid)
    out = _summary(torch.cat(firsts), torch.cat(aps), torch.cat(inps), int(qp.shape[0]))
    if per_query:
        first = torch.cat(all_first)
        out["per_query"] = _per_query(torch.cat(all_ap), torch.cat(all_inp), (first == 1).to(torch.float64),
                                      torch.cat(all_valid), first)
    return out


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
) -> Dict:
    """CUHK03 classic single-shot protocol (torchreid's ``use_metric_cuhk03``).

    After the Market filtering, for every query and every repeat one gallery image is drawn at
    random for each gallery identity; the CMC is computed on that one-image-per-identity gallery
    and averaged over ``num_repeats`` draws. As in torchreid, mAP and mINP are computed on the full
    filtered gallery (the draw only affects the CMC). Draws come from a ``torch.Generator``
    seeded with ``seed``, so results are reproducible (they cannot equal torchreid's, which draws
    from numpy's global RNG). Ties as in :func:`evaluate_rank`. ``per_query`` as there, without
    ``first_rank`` (a query's rank-1 hit is the share of draws that hit).
    """
    d, qp, gp, qc, gc = check_rank_inputs(distmat, q_pids, g_pids, q_camids, g_camids, names)
    if qc is None:
        raise AttnReidError("the CUHK03 single-shot protocol needs camera ids for query and gallery")
    if num_repeats < 1:
        raise AttnReidError(f"num_repeats must be >= 1, got {num_repeats}")
    num_g = d.shape[1]
    if num_g >= 1 << 22:
        raise AttnReidError(f"gallery of {num_g} images is too large for the CUHK03 sampler (max 4194303)")
    gallery = _Gallery(gp, gc)
    dev = d.device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    _, pid_index = torch.unique(gp, return_inverse=True)
    num_pids = int(pid_index.max()) + 1
    col = torch.arange(num_g, device=dev)
    ks = torch.arange(1, max_rank + 1, device=dev)
    firsts, aps, inps = [], [], []
    all_ap, all_inp, all_hit, all_valid = [], [], [], []
    for start, block in iter_rank_chunks(d, chunk_size or _default_chunk(num_g)):
        c = block.shape[0]
        rows = slice(start, start + c)
        ranks, positive, masked = _chunk_ranks(block, qp[rows], qc[rows], gallery)
        ap, inp, valid = _ap_inp(ranks, positive)
        kept = torch.isfinite(masked)
        is_match = gp.unsqueeze(0) == qp[rows].unsqueeze(1)
        cmc = torch.zeros((c, max_rank), dtype=torch.float64, device=dev)
        for _ in range(num_repeats):
            # Unique random keys (random high bits, gallery index low bits): the largest key of
            # each identity picks its image, with no ties possible.
            key = torch.randint(0, 1 << 40, (c, num_g), generator=gen).to(dev) * (1 << 22) + col
            key = torch.where(kept, key, -1)
            best = torch.full((c, num_pids), -1, dtype=torch.int64, device=dev)
            best.scatter_reduce_(1, pid_index.expand(c, -1), key, reduce="amax")
            chosen = kept & (key == best.gather(1, pid_index.expand(c, -1)))
            dist = torch.where(chosen, masked, float("inf"))
            target = chosen & is_match
            t_idx = torch.where(target, col, num_g).min(dim=1).values.clamp(max=num_g - 1)
            t_val = dist.gather(1, t_idx.unsqueeze(1))
            before = (dist < t_val) | ((dist == t_val) & (col.unsqueeze(0) < t_idx.unsqueeze(1)))
            rank = before.sum(dim=1, keepdim=True) + 1
            cmc += (rank <= ks.unsqueeze(0)).to(torch.float64) / num_repeats
        firsts.append(cmc[valid])
        aps.append(ap[valid])
        inps.append(inp[valid])
        if per_query:
            all_ap.append(ap)
            all_inp.append(inp)
            all_hit.append(cmc[:, 0])
            all_valid.append(valid)
    out = _summary(torch.cat(firsts), torch.cat(aps), torch.cat(inps), int(qp.shape[0]))
    if per_query:
        out["per_query"] = _per_query(torch.cat(all_ap), torch.cat(all_inp), torch.cat(all_hit),
                                      torch.cat(all_valid), None)
    return out
