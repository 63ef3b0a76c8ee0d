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

``rerank_input`` says what the reference function was given. ``"zhong"`` (default; Zhong et
al.'s formulation, the paper's): Euclidean distances, which it squares, so D above is the
squared Euclidean distance. ``"torchreid"``: torchreid's engine hands ``re_ranking`` the
*squared* distances of its ``compute_distance_matrix`` and the function squares them again,
so it works on the fourth power of the Euclidean distance; after the row scaling that is
``R**2``: the Gaussian weights of step 3 become ``exp(-R**2)`` and the last term of step 6
``lambda R**2``. The neighbour sets are the same (squaring keeps every order). Use it to
reproduce numbers reported with torchreid's re-ranking.

Memory: square blocks of the N x N distances (on and above the diagonal; each also serves its
mirror) are computed, used for the row maxima and each row's k1+1 best candidates (``topk``), and
dropped; a row's candidates are merged into its top-(k1+1) once at the end. V is sparse: each
row of V holds the expanded set, at most ``(k1+1) + (k1+1)(round(k1/2)+1)`` entries (252 for
k1 = 20; typically tens); after query expansion a row holds at most k2 times that. The Jaccard
term is computed only for the Q x G block: the gallery rows of V are inverted (column -> list of
(gallery row, value)) into dense tables padded to a few widths per power of two, and each query
entry (q, column, value) is min-ed against its column's table row and scatter-added into row q.
The output is streamed (:func:`iter_re_ranking`): a block of query rows at a time, their
distances to the gallery are computed again (one matrix product), combined with their Jaccard
term and handed on, so neither the N x N nor the Q x G matrix is ever allocated.

Threads: the block products and top-k selections use torch's intra-op threads; the sparse phases
after them (many small gathers, sorts and scatters) run on one thread (see ``_one_cpu_thread``).

Ties (equal distances) are ordered by index, as a stable sort orders them; the reference calls
``np.argsort`` with numpy's default non-stable sort, whose order of tied entries is unspecified.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch

from attnreid.errors import AttnReidError
from attnreid.evaluation.distance import ArrayLike, as_feature_tensor
from attnreid.evaluation.options import RankingOptions
from attnreid.evaluation.rank import _default_chunk

_BUDGET = 1 << 24  # elements per temporary block (64 MB in float32)
# The sparse phases hold several int64 arrays per element of their blocks: blocks an eighth as large.
_SPARSE_SHARE = 8
_MERGE_EVERY = 8  # candidate neighbour sets kept per row strip before they are merged


@contextmanager
def _one_cpu_thread(dev: torch.device) -> Iterator[None]:
    """Run the enclosed torch CPU ops on one intra-op thread (restored afterwards).

    The sparse phases are sequences of many small, memory-bound gathers, sorts and scatters: extra
    threads gain little there, and on a busy machine every op waits for its slowest thread (measured
    on the shared 2-core benchmark machine: 2 threads made these phases 7-10x slower than 1).
    """
    old = torch.get_num_threads()
    if dev.type != "cpu" or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _order(vals: torch.Tensor, idx: torch.Tensor, k: int):
    """The first k of each row's (value, index) pairs in (value, index) order."""
    idx, perm = torch.sort(idx, dim=1)
    vals, perm2 = torch.sort(vals.gather(1, perm), dim=1, stable=True)
    return vals[:, :k], idx.gather(1, perm2)[:, :k]


def _merge(vals: torch.Tensor, idx: torch.Tensor, k: int):
    """The k smallest (value, index) pairs of each row, in (value, index) order (needs k <= width).

    One ``topk`` on the values; only rows with equal values among their first k + 1 (where the
    value order alone does not decide set or order) go through the exact two-key sort.
    """
    kk = min(k + 1, vals.shape[1])
    v, p = torch.topk(vals, kk, dim=1, largest=False, sorted=True)
    i = idx.gather(1, p)
    if kk > 1:
        amb = (v[:, 1:] == v[:, :-1]).any(dim=1)
        if bool(amb.any()):
            rows = torch.nonzero(amb).flatten()
            ov, oi = _order(vals[rows], idx[rows], k)
            v[rows, :k], i[rows, :k] = ov, oi
    return v[:, :k], i[:, :k]


def _block_select(block: torch.Tensor, k: int):
    """Values and columns of the k smallest entries of each row under (value, column) order, in
    no particular order (a row's set is exact even when tied values straddle the cut)."""
    w = block.shape[1]
    if k >= w:
        return block.clone(), torch.arange(w, device=block.device).expand(block.shape[0], w).clone()
    vals, idx = torch.topk(block, k + 1, dim=1, largest=False, sorted=True)
    # A row whose (k+1)-th smallest value equals its k-th has a tie across the cut: topk may have
    # picked any of the tied columns, so such rows are redone with a full stable sort.
    tied = vals[:, k] == vals[:, k - 1]
    vals, idx = vals[:, :k], idx[:, :k]
    if bool(tied.any()):
        rows = torch.nonzero(tied).flatten()
        srt = torch.sort(block[rows], dim=1, stable=True)
        vals[rows], idx[rows] = srt.values[:, :k], srt.indices[:, :k]
    return vals, idx


def _neighbours(feats: torch.Tensor, k: int):
    """Top-k neighbours (N x k, by (distance, index)) and row maxima of the squared distances,
    from square blocks of the N x N matrix.

    D is symmetric, so only blocks on and above the diagonal are computed; each also serves its
    mirror (half the matrix products). Each block contributes its rows' k best candidates
    (``topk``); the candidates of a row strip are merged once at the end (or every
    ``_MERGE_EVERY`` blocks, so that memory stays N x k x _MERGE_EVERY at most).
    """
    n, dev, dtype = feats.shape[0], feats.device, feats.dtype
    sq = (feats * feats).sum(dim=1)
    row_max = torch.zeros(n, dtype=dtype, device=dev)
    size = max(1, int(_BUDGET**0.5))
    starts = list(range(0, n, size))
    cands = [[] for _ in starts]
    buf = torch.empty(min(size, n) ** 2, dtype=dtype, device=dev)
    tbuf = torch.empty_like(buf) if len(starts) > 1 else buf

    def update(strip: int, r0: int, block: torch.Tensor, c0: int) -> None:
        r1 = r0 + block.shape[0]
        torch.maximum(row_max[r0:r1], block.amax(dim=1), out=row_max[r0:r1])
        v, i = _block_select(block, k)
        found = cands[strip]
        found.append((v, i + c0))
        if len(found) >= _MERGE_EVERY:
            found[:] = [_merge(torch.cat([x[0] for x in found], 1), torch.cat([x[1] for x in found], 1), k)]

    for ai, a in enumerate(starts):
        fa = feats[a : a + size]
        for bi in range(ai, len(starts)):
            b = starts[bi]
            fb = feats[b : b + size]
            block = buf[: fa.shape[0] * fb.shape[0]].view(fa.shape[0], fb.shape[0])
            torch.addmm(sq[b : b + size].unsqueeze(0), fa, fb.T, beta=1.0, alpha=-2.0, out=block)
            block.add_(sq[a : a + size].unsqueeze(1)).clamp_(min=0.0)
            update(ai, a, block, b)
            if b != a:
                mirror = tbuf[: block.numel()].view(fb.shape[0], fa.shape[0])
                _transpose_into(mirror, block)
                update(bi, b, mirror, a)
    del buf, tbuf
    top = torch.empty((n, k), dtype=torch.int64, device=dev)
    for strip, s in enumerate(starts):
        found = cands[strip]
        top[s : s + size] = _merge(torch.cat([x[0] for x in found], 1), torch.cat([x[1] for x in found], 1), k)[1]
        cands[strip] = None
    # A row whose features all coincide has max distance 0: its scaled distances are 0, not 0/0 = NaN.
    return top, row_max.clamp_(min=torch.finfo(row_max.dtype).tiny)


def _sq_distances(feats: torch.Tensor, sq: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """Squared distances of the listed rows to the listed columns, as :func:`_neighbours` computes them."""
    block = torch.addmm(sq[cols].unsqueeze(0), feats[rows], feats[cols].T, beta=1.0, alpha=-2.0)
    return block.add_(sq[rows].unsqueeze(1)).clamp_(min=0.0)


def _transpose_into(out: torch.Tensor, block: torch.Tensor, strip: int = 64) -> None:
    """``out[:] = block.T``, a strip of ``block``'s rows at a time: about twice as fast as one
    strided copy on a CPU (each strip's columns stay in cache)."""
    for i in range(0, block.shape[0], strip):
        out[:, i : i + strip].copy_(block[i : i + strip].T)


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
    """Squared Euclidean distance of the listed (row, col) pairs, in cache-sized batches."""
    out = torch.empty(rows.shape[0], dtype=feats.dtype, device=feats.device)
    step = max(1, min(_BUDGET, 1 << 21) // max(feats.shape[1], 1))
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


def _bucket_width(length: torch.Tensor) -> torch.Tensor:
    """Padded width for lists of the given lengths: L rounded up to a multiple of 2^(floor(log2 L) - 2)
    (at most 25% padding, about 4 widths per power of two); 0 stays 0."""
    e = torch.floor(torch.log2(length.clamp(min=1).to(torch.float64))).to(torch.int64)
    q = torch.pow(2, (e - 2).clamp(min=0))
    return (length + q - 1) // q * q


def _gallery_buckets(g_rows: torch.Tensor, g_cols: torch.Tensor, g_vals: torch.Tensor, n: int):
    """Inverted index of the gallery rows of V (column -> its (gallery row, value) list), laid out
    as dense padded tables, one per list width: a column's list is one table row, padded with
    (row 0, value 0) entries, which add 0 to the Jaccard sums.

    Returns (bucket of each column (-1: empty), row of each column in its bucket's table,
    list of (rows table, values table) per bucket).
    """
    dev = g_rows.device
    order = torch.argsort(g_cols, stable=True)
    g_rows, g_vals = g_rows[order], g_vals[order]
    col_ptr = _to_csr(g_cols, n)
    col_len = col_ptr[1:] - col_ptr[:-1]
    width = _bucket_width(col_len)
    bucket = torch.full((n,), -1, dtype=torch.int64, device=dev)
    slot = torch.zeros(n, dtype=torch.int64, device=dev)
    tables = []
    for b, w in enumerate(torch.unique(width[col_len > 0]).tolist()):
        cs = torch.nonzero(width == w).flatten()
        bucket[cs] = b
        slot[cs] = torch.arange(cs.shape[0], device=dev)
        offs = torch.arange(w, device=dev)
        pos = (col_ptr[cs].unsqueeze(1) + offs).clamp_(max=g_rows.shape[0] - 1)
        valid = offs < col_len[cs].unsqueeze(1)
        tables.append((torch.where(valid, g_rows[pos], 0), torch.where(valid, g_vals[pos], 0)))
    return bucket, slot, tables


def _sparse_v(
    feats: torch.Tensor,
    top: torch.Tensor,
    row_max: torch.Tensor,
    k: int,
    k_half: int,
    k_qe: int,
    squared: bool = False,
):
    """Steps 2-4 of the module docstring from the neighbour table: the sparse rows of V after
    query expansion, as CSR (``crow``, ``cols``, ``vals``). ``squared``: the weights use ``R**2``
    (``rerank_input="torchreid"``)."""
    n, dtype, dev = feats.shape[0], feats.dtype, feats.device
    # k-reciprocal sets (Eq. 4) and their expansion (Eq. 6), in row chunks: the members of each
    # row's expanded set are collected as keys row * N + column, made unique (and row-major) once.
    recip = _reciprocal(top, k, max(1, _BUDGET // (k * k)))
    recip_half = _reciprocal(top, k_half, max(1, _BUDGET // (k_half * k_half)))
    top_half = top[:, :k_half]
    keys = []
    step = max(1, _BUDGET // (k * k_half * k))
    for s in range(0, n, step):
        nb = top[s : s + step, :k]
        rec = recip[s : s + step]
        c = rec.shape[0]
        mine = torch.where(rec, nb, -1)  # R(i, k1), padded with -1
        cand = top_half[nb]  # c x k x k_half: N(c, k1/2) for every c in N(i, k1)
        cand_ok = recip_half[nb]  # ... restricted to R(c, k1/2)
        inside = (cand.unsqueeze(3) == mine.view(c, 1, 1, k)).any(dim=3) & cand_ok
        # |R(c, k1/2) & R(i, k1)| > 2/3 |R(c, k1/2)|, in integers (equal to the float test for all sizes)
        keep = rec & (3 * inside.sum(dim=2) > 2 * cand_ok.sum(dim=2))
        base = (torch.arange(s, s + c, device=dev) * n).view(c, 1)
        keys.append((base + nb)[rec])
        keys.append((base.view(c, 1, 1) + cand)[cand_ok & keep.unsqueeze(2)])
    keys = torch.unique(torch.cat(keys))
    del recip, recip_half, top_half
    rows, cols = keys // n, keys % n
    del keys
    sq = (feats * feats).sum(dim=1)
    scaled = _pair_sq_dist(feats, sq, rows, cols) / row_max[rows]
    weight = torch.exp(-(scaled * scaled if squared else scaled))
    del scaled
    total = torch.zeros(n, dtype=dtype, device=dev).index_add_(0, rows, weight)
    vals = weight / total[rows]
    crow = _to_csr(rows, n)
    del rows, weight

    # Local query expansion (Eq. 10): V[i] = mean of the rows of its k2 nearest neighbours.
    if k_qe != 1:
        qe_keys, qe_vals = [], []
        per_row = int((crow[1:] - crow[:-1]).max())
        step = max(1, _BUDGET // _SPARSE_SHARE // (k_qe * max(per_row, 1)))
        for s in range(0, n, step):
            nb = top[s : s + step, :k_qe].reshape(-1)
            which, c_, v_ = _csr_rows(crow, cols, vals, nb)
            key, inv = torch.unique((which // k_qe + s) * n + c_, return_inverse=True)
            qe_keys.append(key)
            qe_vals.append(torch.zeros(key.shape[0], dtype=dtype, device=dev).index_add_(0, inv, v_) / k_qe)
        key = torch.cat(qe_keys)
        del qe_keys
        rows, cols, vals = key // n, key % n, torch.cat(qe_vals)
        del key, qe_vals
        crow = _to_csr(rows, n)
        del rows
    return crow, cols, vals


def _jaccard_similarity(crow: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, gallery, s: int, e: int,
                        acc: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``s / (2 - s)`` (= 1 - d_J, Eq. 11) of query rows ``s..e`` against every gallery row, in ``acc``.

    ``s`` sums, over the columns a query row and a gallery row share, min(V[q, col], V[g, col]).
    Each query entry (q, col, v) is paired with the column's gallery list (one row of a padded
    table, :func:`_gallery_buckets`), min-ed and scatter-added into q's row.
    """
    bucket, slot, tables = gallery
    num_g = acc.shape[1]
    flat = acc.view(-1).zero_()
    which, qc, qv = _csr_rows(crow, cols, vals, torch.arange(s, e, device=acc.device))
    qb = bucket[qc]
    for b, (t_rows, t_vals) in enumerate(tables):
        sel = torch.nonzero(qb == b).flatten()
        if sel.numel() == 0:
            continue
        sl, v, base = slot[qc[sel]], qv[sel].unsqueeze(1), (which[sel] * num_g).unsqueeze(1)
        per = max(1, _BUDGET // _SPARSE_SHARE // t_rows.shape[1])
        for t in range(0, sel.shape[0], per):
            mins = torch.minimum(t_vals.index_select(0, sl[t : t + per]), v[t : t + per])
            target = t_rows.index_select(0, sl[t : t + per]).add_(base[t : t + per])
            flat.index_add_(0, target.view(-1), mins.view(-1))
    torch.sub(2.0, acc, out=den)
    return acc.div_(den)


def _check_options(options: RankingOptions) -> None:
    # RankingOptions checks its values when built; a duck-typed stand-in is checked here.
    RankingOptions(options.metric, True, options.k1, options.k2, options.lambda_value, options.rerank_input)


def iter_re_ranking(
    qf: ArrayLike,
    gf: ArrayLike,
    options: Optional[RankingOptions] = None,
    device: Optional[Union[str, torch.device]] = None,
    rows: Optional[int] = None,
) -> Iterator[Tuple[int, np.ndarray]]:
    """Re-ranked distances of ``qf`` (Q x D) to ``gf`` (G x D), a block of query rows at a time.

    Yields ``(first_row, block)``, ``block`` a numpy array of ``rows`` query rows x G (default:
    about 8M distances, as the evaluator's chunks), float32 for float32 features, so that the
    Q x G matrix is never held whole. Each block's distances come from one matrix product of its
    rows, so another ``rows`` can change their last bits (as any change of product shape can). ``options`` give the metric, k1, k2, lambda and ``rerank_input`` (its ``rerank``
    flag is not read). Runs on ``device`` (default: the features' device; ``"cuda"`` for a GPU).
    See the module docstring for the formulation and the memory bound.
    """
    options = options or RankingOptions(rerank=True)
    _check_options(options)
    q = as_feature_tensor(qf, "query features", device)
    g = as_feature_tensor(gf, "gallery features", q.device)
    if q.shape[1] != g.shape[1]:
        raise AttnReidError(f"query features have dimension {q.shape[1]} but gallery features have {g.shape[1]}")
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise AttnReidError(f"re-ranking needs non-empty query and gallery sets, got {q.shape[0]} and {g.shape[0]}")
    dtype = torch.promote_types(q.dtype, g.dtype)
    num_q = q.shape[0]
    feats = torch.cat([q.to(dtype), g.to(dtype)])
    del q, g
    if options.metric == "cosine":
        feats = torch.nn.functional.normalize(feats, dim=1)
    k1, lam = options.k1, options.lambda_value
    n = feats.shape[0]
    num_g = n - num_q
    dev = feats.device
    k = min(k1 + 1, n)
    k_half = min(int(round(k1 / 2.0)) + 1, n)
    k_qe = min(options.k2, n)

    # Neighbours and row maxima from blocks of the N x N distances. Query expansion needs the
    # k2 nearest, which can be more than the k1 + 1 the reciprocal sets use.
    top, row_max = _neighbours(feats, max(k, k_qe))
    squared = options.rerank_input == "torchreid"
    with _one_cpu_thread(dev):
        crow, cols, vals = _sparse_v(feats, top, row_max, k, k_half, k_qe, squared)
        del top
        # The gallery rows of V, inverted (column -> its (gallery row, value) list) for the Jaccard sums.
        g0 = int(crow[num_q])
        g_rows = torch.repeat_interleave(torch.arange(num_g, device=dev), crow[num_q + 1 :] - crow[num_q:-1])
        gallery = _gallery_buckets(g_rows, cols[g0:], vals[g0:], n)
        del g_rows
    sq = (feats * feats).sum(dim=1)
    step = max(1, min(num_q, rows or _default_chunk(num_g)))
    acc_buf = torch.empty(step * num_g, dtype=dtype, device=dev)
    den_buf = torch.empty_like(acc_buf)
    for s in range(0, num_q, step):
        e = min(s + step, num_q)
        # d* = (1 - lambda) (1 - s / (2 - s)) + lambda R, R the row-scaled distance (squared for torchreid)
        out = _sq_distances(feats, sq, slice(s, e), slice(num_q, n)).div_(row_max[s:e].unsqueeze(1))
        if squared:
            out.square_()
        with _one_cpu_thread(dev):
            acc = acc_buf[: (e - s) * num_g].view(e - s, num_g)
            jac_sim = _jaccard_similarity(crow, cols, vals, gallery, s, e, acc,
                                          den_buf[: (e - s) * num_g].view(e - s, num_g))
            out.mul_(lam).add_(jac_sim, alpha=-(1.0 - lam)).add_(1.0 - lam)
        yield s, out.cpu().numpy()


def re_ranking(
    qf: ArrayLike,
    gf: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "euclidean_sq",
    device: Optional[Union[str, torch.device]] = None,
    rerank_input: str = "zhong",
) -> np.ndarray:
    """Re-ranked Q x G distance matrix (numpy, float32 for float32 features) of ``qf`` vs ``gf``.

    The blocks of :func:`iter_re_ranking`, put together (the same numbers). Runs on ``device``
    (default: the features' device; pass ``"cuda"`` to use a GPU). See the module docstring for
    the formulation, ``rerank_input`` (``zhong`` | ``torchreid``) and the memory bound.
    """
    options = RankingOptions(metric=metric, rerank=True, k1=k1, k2=k2, lambda_value=lambda_value,
                             rerank_input=rerank_input)
    blocks = list(iter_re_ranking(qf, gf, options, device))
    return np.concatenate([b for _, b in blocks]) if len(blocks) > 1 else blocks[0][1]
