"""Evaluation protocols from features: the one call the engine and notebooks use.

``protocol``:

- ``"market"``: Market-1501 single query (also DukeMTMC-reID, CUHK03-NP, Occluded-Duke,
  P-DukeMTMC, MSMT17): gallery images with the query's pid and camera removed, CMC + mAP + mINP
  (:func:`attnreid.evaluation.rank.evaluate_rank`). Market multi-query (HA-CNN Table 2): pass
  ``multi_query=(group_features, group_pids, group_camids)`` (the ``gt_bbox`` images); each query
  feature is replaced by the mean of its group (:func:`multi_query_features`).
- ``"cuhk03_classic"``: CUHK03 classic single-shot, 10 seeded draws of one gallery image per
  identity (:func:`attnreid.evaluation.rank.evaluate_cuhk03_single_shot`).
- ``"partial"``: Partial-REID / Partial-iLIDS: query = partial images, gallery = whole-body images.
  These sets have no camera labels and query and gallery images of a person are different
  crops, so **no camera filtering** is done (camera ids, if given, are ignored); Rank-1 and Rank-3
  are the reported numbers (mAP and the full CMC are returned too).

One pass: the distances (or the re-ranked distances) are produced a block of query rows at a
time, and each block gives its queries' metrics, per-query values and, when asked, their top-k
ranked lists before the next is computed, so the Q x G matrix is never held (``save_distmat``
writes it to a file as the blocks pass). Each distance or re-ranked matrix is computed once per
call. numpy features never import torch unless re-ranking is asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np

from attnreid.errors import AttnReidError
from attnreid.evaluation.distance import ArrayLike, as_numpy, is_tensor, iter_distance_chunks, matched_features
from attnreid.evaluation.options import RankingOptions
from attnreid.evaluation.rank import (
    _default_chunk,
    _ids,
    check_finite,
    check_ids,
    evaluate_cuhk03_chunks,
    evaluate_rank_chunks,
)

PROTOCOLS = ("market", "cuhk03_classic", "partial")


def multi_query_features(
    query_features: ArrayLike,
    query_pids: ArrayLike,
    query_camids: ArrayLike,
    group_features: ArrayLike,
    group_pids: ArrayLike,
    group_camids: ArrayLike,
):
    """Market-1501 multi-query: each query's feature becomes the mean of the group images with its
    pid and camera (Market's ``gt_bbox`` set, which contains the query images themselves).

    A query whose (pid, camera) has no group image keeps its own feature. Returns Q x D, a
    tensor on the query features' device for tensor input, else a numpy array.
    """
    qf, gf = matched_features(query_features, group_features, names=("query features", "group features"))
    tensor = is_tensor(qf)
    q, g = as_numpy(qf), as_numpy(gf)
    qp = _ids(query_pids, "query_pids", q.shape[0])
    qc = _ids(query_camids, "query_camids", q.shape[0])
    gp = _ids(group_pids, "group_pids", g.shape[0])
    gc = _ids(group_camids, "group_camids", g.shape[0])
    if g.shape[0] == 0:
        out = q.copy()
    else:
        cam_base = int(np.concatenate([qc, gc]).max()) + 1
        keys, inverse = np.unique(gp * cam_base + gc, return_inverse=True)
        sums = np.zeros((len(keys), g.shape[1]), dtype=g.dtype)
        np.add.at(sums, inverse, g)  # in group order, as a sequential index_add
        means = sums / np.bincount(inverse, minlength=len(keys)).astype(g.dtype)[:, None]
        q_key = qp * cam_base + qc
        pos = np.minimum(np.searchsorted(keys, q_key), len(keys) - 1)
        out = np.where((keys[pos] == q_key)[:, None], means[pos], q)
    if tensor:
        import torch

        return torch.from_numpy(out).to(qf.device)
    return out


def ranked_blocks(q, g, ranking: RankingOptions, chunk_size: Optional[int] = None) -> Iterator[Tuple[int, Any]]:
    """``(first_row, block)`` of the ranking distances of checked features (:func:`matched_features`):
    plain distances (chunked) or re-ranked ones (:func:`attnreid.evaluation.rerank.iter_re_ranking`),
    a block of query rows at a time."""
    rows = chunk_size or _default_chunk(g.shape[0])
    if ranking.rerank:
        from attnreid.evaluation.rerank import iter_re_ranking

        return iter_re_ranking(q, g, ranking, rows=rows)
    return iter_distance_chunks(q, g, ranking.metric, rows)


def checked_blocks(blocks: Iterable, name: str, shape: Tuple[int, int]) -> Iterator[Tuple[int, np.ndarray]]:
    """The blocks as numpy arrays, each checked for NaN/inf (named as ``name`` of ``shape``)."""
    for start, block in blocks:
        block = as_numpy(block)
        check_finite(block, name, start, shape)
        yield start, block


def save_rows(blocks: Iterable, path: Path, shape: Tuple[int, int]) -> Iterator[Tuple[int, np.ndarray]]:
    """Pass the blocks on, writing their rows to the ``.npy`` file ``path`` as they pass.

    The file is written atomically: to a temporary file of this process next to ``path``, made
    durable and renamed over ``path`` once the last row is in; if the blocks stop early (an error),
    the temporary file is removed and ``path`` is left as it was. Rows go straight to the file
    (nothing is memory-mapped), so memory stays one block.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fh, rows = None, 0
    try:
        for start, block in blocks:
            block = as_numpy(block)
            if fh is None:
                fh = open(tmp, "wb")
                header = {"descr": np.lib.format.dtype_to_descr(block.dtype), "fortran_order": False,
                          "shape": tuple(shape)}
                np.lib.format.write_array_header_1_0(fh, header)
            if start != rows:
                raise AttnReidError(f"distance blocks out of order: row {start} after {rows} rows")
            fh.write(np.ascontiguousarray(block).tobytes())
            rows += block.shape[0]
            yield start, block
        if fh is None or rows != shape[0]:
            raise AttnReidError(f"{path}: got {rows} distance rows, expected {shape[0]}")
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        fh = None
        os.replace(tmp, path)
    finally:
        if fh is not None:
            fh.close()
        if tmp.exists():
            tmp.unlink()


def evaluate_blocks(blocks: Iterable, ids: Tuple, shape: Tuple[int, int], protocol: str = "market",
                    max_rank: int = 50, num_repeats: int = 10, seed: int = 0, per_query: bool = False,
                    ranked_k: int = 0, save_distmat: Optional[Path] = None, name: str = "distance matrix") -> Dict:
    """The protocol's metrics over ``(first_row, block)`` distance blocks in row order, consumed as
    they come; ``ids`` = ``(q_pids, g_pids, q_camids, g_camids)`` as :func:`attnreid.evaluation.rank.check_ids`
    returns them (cameras None for the partial protocol)."""
    if protocol not in PROTOCOLS:
        raise AttnReidError(f"unknown evaluation protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    blocks = checked_blocks(blocks, name, shape)
    if save_distmat is not None:
        blocks = save_rows(blocks, save_distmat, shape)
    if protocol == "cuhk03_classic":
        return evaluate_cuhk03_chunks(blocks, *ids, max_rank=max_rank, num_repeats=num_repeats, seed=seed,
                                      per_query=per_query, ranked_k=ranked_k)
    return evaluate_rank_chunks(blocks, *ids, max_rank=max_rank, per_query=per_query, ranked_k=ranked_k)


def evaluate(
    qf: ArrayLike,
    gf: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: Optional[ArrayLike] = None,
    g_camids: Optional[ArrayLike] = None,
    protocol: str = "market",
    ranking: Optional[RankingOptions] = None,
    max_rank: int = 50,
    multi_query: Optional[Tuple[ArrayLike, ArrayLike, ArrayLike]] = None,
    num_repeats: int = 10,
    seed: int = 0,
    chunk_size: Optional[int] = None,
    device: Optional[Any] = None,
    per_query: bool = False,
    ranked_k: int = 0,
    save_distmat: Optional[Path] = None,
    names: Tuple[str, str] = ("query features", "gallery features"),
) -> Dict:
    """Metrics of query features ``qf`` (Q x D) against gallery features ``gf`` (G x D), in one pass.

    ``ranking`` (:class:`~attnreid.evaluation.options.RankingOptions`, default: squared Euclidean,
    no re-ranking) says how the gallery is ranked. Returns the dict of
    :func:`attnreid.evaluation.rank.evaluate_rank` (``mAP``, ``mINP``, ``cmc``, ``rank1``,
    ``rank3``, ``rank5``, ``rank10``, ``num_valid_queries``, ``num_skipped_queries``) plus
    ``protocol``, ``metric`` and ``rerank``; ``per_query=True`` adds the per-query arrays
    (``"per_query"``), ``ranked_k > 0`` each query's top-k list and first-match rank
    (``"ranked"``, see :func:`attnreid.evaluation.rank.evaluate_rank_chunks`), and
    ``save_distmat`` writes the Q x G (re-ranked) distances to that ``.npy`` file (atomically).
    numpy features are ranked in numpy; tensors on their device (``device`` moves them).
    """
    if protocol not in PROTOCOLS:
        raise AttnReidError(f"unknown evaluation protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    ranking = ranking or RankingOptions()
    q, g = matched_features(qf, gf, device, names)
    if q.shape[0] == 0:
        raise AttnReidError(f"{names[0]} have shape {tuple(q.shape)}: the query set is empty")
    if g.shape[0] == 0:
        raise AttnReidError(f"{names[1]} have shape {tuple(g.shape)}: the gallery is empty")
    if multi_query is not None:
        if q_camids is None:
            raise AttnReidError("multi-query evaluation needs query camera ids")
        q = multi_query_features(q, q_pids, q_camids, *multi_query)
    if protocol == "partial":
        q_camids = g_camids = None
    shape = (int(q.shape[0]), int(g.shape[0]))
    ids = check_ids(*shape, q_pids, g_pids, q_camids, g_camids)
    name = "re-ranked distance matrix" if ranking.rerank else "distance matrix"
    res = evaluate_blocks(ranked_blocks(q, g, ranking, chunk_size), ids, shape, protocol, max_rank, num_repeats,
                          seed, per_query, ranked_k, save_distmat, name)
    res.update(protocol=protocol, metric=ranking.metric, rerank=ranking.rerank)
    return res


__all__: Sequence[str] = ("PROTOCOLS", "evaluate", "evaluate_blocks", "multi_query_features", "ranked_blocks",
                          "save_rows")
