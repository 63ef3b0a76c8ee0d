"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017) in memory that grows with N x k, not N x N.

Reference formulation: the widely used ``re_ranking.py`` (Zhong's Python port, as shipped in
torchreid ``torchreid/utils/rerank.py`` with float32 ``V``). With N = Q + G images, D the
squared distance between all of them and ``R[i, j] = D[i, j] / max_j D[i, j]`` (each row scaled
by its maximum):

1. ``N(i, k)``: the k + 1 nearest images of i (itself included); k-reciprocal set
   ``R(i, k1) = {j in N(i, k1) : i in N(j, k1)}`` (paper Eq. 4).
2. Expansion (Eq. 6): for each ``c in R(i, k1)``, add ``R(c, round(k1/2))`` when more than 2/3 of
   it lies in ``R(i, k1)``.
3. ``V[i, j] = exp(-R[i, j])`` on the expanded set, normalised to sum 1 (Eq. 7).
4. Local query expansion (Eq. 10): ``V[i] <- mean of V[j]`` over the k2 nearest j of i.
5. Jaccard distance (Eq. 11): ``d_J(i, j) = 1 - s / (2 - s)`` with ``s = sum_k min(V[i,k], V[j,k])``.
6. ``d* = (1 - lambda) d_J + lambda R`` (Eq. 12), returned for the Q x G block.

Here the distance of the features is the squared Euclidean distance (``metric="euclidean_sq"``;
what reid-strong-baseline's feature version uses, and what torchreid's function computes when
given Euclidean distances, since it squares its input) or, with ``metric="cosine"``, the
squared Euclidean distance of the L2-normalised features (``2 x`` the cosine distance; the row
scaling makes the factor irrelevant).

Memory: row chunks of the N x N distances are computed, used for the top-(k1+1) neighbours and
the row maxima, and dropped, except that the query rows' Q x G block is kept as the output
buffer. V is sparse: each row of V holds the expanded set, at most ``(k1+1) + (k1+1)(round(k1/2)+1)``
entries (252 for k1 = 20; typically tens); after query expansion a row holds at most k2 times
that. The Jaccard term is accumulated only for the Q x G block, by walking the columns of V
shared by a query and a gallery image. Nothing N x N is ever allocated.

Ties (equal distances) are ordered by index, as a stable sort orders them; the reference calls
``np.argsort`` with numpy's default non-stable sort, whose order of tied entries is unspecified.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from attnreid.errors import AttnReidError
from attnreid.evaluation.distance import METRICS, ArrayLike, as_feature_tensor

_BUDGET = 1 << 24  # elements per temporary block (64 MB in float32)


def _order(vals: torch.Tensor, idx: torch.Tensor, k: int):
    """The first k of each row's (value, index) pairs in (value, index) order."""
    idx, perm = torch.sort(idx, dim=1)
    vals, perm2 = torch.sort(vals.gather(1, perm), dim=1, stable=True)
    return vals[:, :k], idx.gather(1, perm2)[:, :k]


def _block_topk(block: torch.Tensor, k: int, col0: int):
    """The k smallest entries of each row of ``block`` in (value, column) order: values, columns + col0."""
    k = min(k, block.shape[1])
    extra = 1 if k < block.shape[1] else 0
    vals, idx = torch.topk(block, k + extra, dim=1, largest=False)
    # A row whose (k+1)-th smallest value equals its k-th has a tie across the cut: topk may have
    # picked any of the tied columns, so such rows are redone with a full stable sort.
    if extra:
        tied = vals[:, k] == vals[:, k - 1]
        vals, idx = vals[:, :k], idx[:, :k]
        if bool(tied.any()):
            rows = torch.nonzero(tied).flatten()
            srt = torch.sort(block[rows], dim=1, stable=True)
            vals[rows], idx[rows] = srt.values[:, :k], srt.indices[:, :k]
    vals, idx = _order(vals, idx, k)
    return vals, idx + col0


def _neighbours(feats: torch.Tensor, k: int, num_q: int):
    """Top-k neighbours (N x k, by (distance, index)), row maxima of the squared distances and the
    raw Q x G distance block, from square blocks of the N x N matrix.

    D is symmetric, so only blocks on and above the diagonal are computed; each also serves its
    mirror (half the matrix products). Per row, a running top-k is merged with each block's.
    """
    n, dev, dtype = feats.shape[0], feats.device, feats.dtype
    sq = (feats * feats).sum(dim=1)
    best_val = torch.full((n, k), float("inf"), dtype=dtype, device=dev)
    best_idx = torch.full((n, k), n, dtype=torch.int64, device=dev)
    row_max = torch.zeros(n, dtype=dtype, device=dev)
    qg = torch.empty((num_q, n - num_q), dtype=dtype, device=dev)
    size = max(1, int(_BUDGET**0.5))
    starts = list(range(0, n, size))

    def update(r0: int, block: torch.Tensor, c0: int) -> None:
        r1 = r0 + block.shape[0]
        torch.maximum(row_max[r0:r1], block.max(dim=1).values, out=row_max[r0:r1])
        v, i = _block_topk(block, k, c0)
        best_val[r0:r1], best_idx[r0:r1] = _order(
            torch.cat([best_val[r0:r1], v], dim=1), torch.cat([best_idx[r0:r1], i], dim=1), k
        )
        if r0 < num_q and c0 + block.shape[1] > num_q:
            rq, cg = min(r1, num_q), max(c0, num_q)
            qg[r0:rq, cg - num_q : c0 + block.shape[1] - num_q] = block[: rq - r0, cg - c0 :]

    for a in starts:
        fa = feats[a : a + size]
        for b in starts:
            if b < a:
                continue
            fb = feats[b : b + size]
            block = torch.addmm(sq[b : b + size].unsqueeze(0), fa, fb.T, beta=1.0, alpha=-2.0)
            block += sq[a : a + size].unsqueeze(1)
            block.clamp_(min=0.0)
            update(a, block, b)
            if b != a:
                update(b, block.T.contiguous(), a)
            del block
    return best_idx, row_max, qg


def _reciprocal(top: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Mask (N x k): ``top[i, s]`` is a k-reciprocal neighbour of i (i is among its first k)."""
    n = top.shape[0]
    fwd = top[:, :k]
    out = torch.empty((n, k), dtype=torch.bool, device=top.device)
    for s in range(0, n, chunk):
        f = fwd[s : s + chunk]
        me = torch.arange(s, s + f.shape[0], device=top.device).view(-1, 1, 1)
        out[s : s + chunk] = (fwd[f] == me).any(dim=2)
    return out


def _pair_sq_dist(feats: torch.Tensor, sq: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance of the listed (row, col) pairs, in batches."""
    out = torch.empty(rows.shape[0], dtype=feats.dtype, device=feats.device)
    step = max(1, _BUDGET // max(feats.shape[1], 1))
    for s in range(0, rows.shape[0], step):
        r, c = rows[s : s + step], cols[s : s + step]
        dot = (feats[r] * feats[c]).sum(dim=1)
        out[s : s + step] = (sq[r] + sq[c] - 2.0 * dot).clamp_(min=0.0)
    return out


def _csr_rows(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, rows: torch.Tensor):
    """Entries of the listed CSR rows: (position in ``rows``, column, value), row-major."""
    start, length = crow[rows], crow[rows + 1] - crow[rows]
    which = torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), length)
    offs = torch.arange(which.shape[0], device=rows.device) - (torch.cumsum(length, 0) - length)[which]
    pos = start[which] + offs
    return which, col[pos], val[pos]


def _to_csr(rows: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=n)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def re_ranking(
    qf: ArrayLike,
    gf: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "euclidean_sq",
    device: Optional[Union[str, torch.device]] = None,
) -> np.ndarray:
    """Re-ranked Q x G distance matrix (numpy, float32 for float32 features) of ``qf`` vs ``gf``.

    Runs on ``device`` (default: the features' device; pass ``"cuda"`` to use a GPU). See the
    module docstring for the formulation and the memory bound.
    """
    if metric not in METRICS:
        raise AttnReidError(f"unknown distance metric {metric!r}; expected one of {', '.join(METRICS)}")
    if k1 < 1 or k2 < 1:
        raise AttnReidError(f"re-ranking needs k1 >= 1 and k2 >= 1, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise AttnReidError(f"re-ranking lambda must be in [0, 1], got {lambda_value}")
    q = as_feature_tensor(qf, "query features", device)
    g = as_feature_tensor(gf, "gallery features", q.device)
    if q.shape[1] != g.shape[1]:
        raise AttnReidError(f"query features have dimension {q.shape[1]} but gallery features have {g.shape[1]}")
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise AttnReidError(f"re-ranking needs non-empty query and gallery sets, got {q.shape[0]} and {g.shape[0]}")
    dtype = torch.promote_types(q.dtype, g.dtype)
    feats = torch.cat([q.to(dtype), g.to(dtype)])
    if metric == "cosine":
        feats = torch.nn.functional.normalize(feats, dim=1)
    num_q, n = q.shape[0], feats.shape[0]
    dev = feats.device
    k = min(k1 + 1, n)
    k_half = min(int(round(k1 / 2.0)) + 1, n)
    k_qe = min(k2, n)

    # Neighbours, row maxima and the Q x G block, from blocks of the N x N distances.
    top, row_max, out = _neighbours(feats, k, num_q)
    out /= row_max[:num_q].unsqueeze(1)

    # k-reciprocal sets (Eq. 4) and their expansion (Eq. 6), in row chunks.
    recip = _reciprocal(top, k, max(1, _BUDGET // (k * k)))
    recip_half = _reciprocal(top, k_half, max(1, _BUDGET // (k_half * k_half)))
    top_half = top[:, :k_half]
    sentinel = n
    sq = (feats * feats).sum(dim=1)
    v_rows, v_cols, v_vals = [], [], []
    step = max(1, _BUDGET // (k * k_half * k))
    for s in range(0, n, step):
        rec = recip[s : s + step]
        c = rec.shape[0]
        mine = torch.where(rec, top[s : s + step], sentinel)  # R(i, k1), padded
        cand = top_half[top[s : s + step]]  # c x k x k_half: N(c, k1/2) for every c in N(i, k1)
        cand_ok = recip_half[top[s : s + step]]  # ... restricted to R(c, k1/2)
        inside = (cand.unsqueeze(3) == mine.view(c, 1, 1, k)).any(dim=3) & cand_ok
        size = cand_ok.sum(dim=2).to(torch.float64)
        keep = rec & (inside.sum(dim=2).to(torch.float64) > (2.0 / 3.0) * size)
        extra = torch.where(cand_ok & keep.unsqueeze(2), cand, sentinel).view(c, -1)
        members = torch.sort(torch.cat([mine, extra], dim=1), dim=1).values
        first = torch.ones_like(members, dtype=torch.bool)
        first[:, 1:] = members[:, 1:] != members[:, :-1]
        r, slot = torch.nonzero(first & (members != sentinel), as_tuple=True)
        v_rows.append(r + s)
        v_cols.append(members[r, slot])
    rows, cols = torch.cat(v_rows), torch.cat(v_cols)
    del v_rows, v_cols, recip, recip_half
    weight = torch.exp(-_pair_sq_dist(feats, sq, rows, cols) / row_max[rows])
    total = torch.zeros(n, dtype=dtype, device=dev).index_add_(0, rows, weight)
    vals = weight / total[rows]
    crow = _to_csr(rows, n)
    del rows, weight

    # Local query expansion (Eq. 10): V[i] = mean of the rows of its k2 nearest neighbours.
    if k_qe != 1:
        qe_rows, qe_cols, qe_vals = [], [], []
        per_row = int((crow[1:] - crow[:-1]).max())
        step = max(1, _BUDGET // (k_qe * max(per_row, 1)))
        for s in range(0, n, step):
            nb = top[s : s + step, :k_qe].reshape(-1)
            which, c_, v_ = _csr_rows(crow, cols, vals, nb)
            local = which // k_qe
            keys, inv = torch.unique(local * n + c_, return_inverse=True)
            summed = torch.zeros(keys.shape[0], dtype=dtype, device=dev).index_add_(0, inv, v_)
            qe_rows.append(keys // n + s)
            qe_cols.append(keys % n)
            qe_vals.append(summed / k_qe)
        rows = torch.cat(qe_rows)
        cols, vals = torch.cat(qe_cols), torch.cat(qe_vals)
        crow = _to_csr(rows, n)
        del qe_rows, qe_cols, qe_vals, rows

    # Jaccard distance (Eq. 11) for the Q x G block: for every column shared by a query row and a
    # gallery row, add min(V[q, col], V[g, col]).
    g_start = int(crow[num_q])
    g_rows = torch.repeat_interleave(
        torch.arange(n - num_q, device=dev), crow[num_q + 1 :] - crow[num_q:-1]
    )
    g_cols, g_vals = cols[g_start:], vals[g_start:]
    order = torch.argsort(g_cols, stable=True)
    g_rows, g_cols, g_vals = g_rows[order], g_cols[order], g_vals[order]
    col_ptr = _to_csr(g_cols, n)
    col_len = col_ptr[1:] - col_ptr[:-1]
    num_g = n - num_q
    q_chunk = max(1, _BUDGET // num_g)
    for s in range(0, num_q, q_chunk):
        e = min(s + q_chunk, num_q)
        acc = torch.zeros((e - s) * num_g, dtype=dtype, device=dev)
        which, qc, qv = _csr_rows(crow, cols, vals, torch.arange(s, e, device=dev))
        pairs = col_len[qc]
        ends = torch.cumsum(pairs, 0)
        lo = 0
        while lo < which.shape[0]:
            budget_end = int(torch.searchsorted(ends, (ends[lo] - pairs[lo]) + _BUDGET, right=True))
            hi = max(budget_end, lo + 1)
            pp = pairs[lo:hi]
            # Pair p of entry e reads gallery entry col_ptr[col_e] + (p - first pair of e).
            base = col_ptr[qc[lo:hi]] - (torch.cumsum(pp, 0) - pp)
            rep = torch.repeat_interleave(torch.arange(hi - lo, device=dev), pp)
            gi = base[rep] + torch.arange(rep.shape[0], device=dev)
            target = (which[lo:hi] * num_g)[rep] + g_rows[gi]
            acc.index_add_(0, target, torch.minimum(qv[lo:hi][rep], g_vals[gi]))
            lo = hi
        acc = acc.view(e - s, num_g)
        jaccard = 1.0 - acc / (2.0 - acc)
        out[s:e] = (1.0 - lambda_value) * jaccard + lambda_value * out[s:e]
    return out.cpu().numpy()
