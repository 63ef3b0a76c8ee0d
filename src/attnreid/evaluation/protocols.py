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

Without re-ranking the distances are streamed in query chunks, so the Q x G matrix is never held.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from attnreid.errors import AttnReidError
from attnreid.evaluation.distance import METRICS, as_feature_tensor, compute_distance, iter_distance_chunks
from attnreid.evaluation.rank import (
    ArrayLike,
    _default_chunk,
    _ids,
    evaluate_cuhk03_single_shot,
    evaluate_rank,
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
) -> torch.Tensor:
    """Market-1501 multi-query: each query's feature becomes the mean of the group images with its
    pid and camera (Market's ``gt_bbox`` set, which contains the query images themselves).

    A query whose (pid, camera) has no group image keeps its own feature. Returns Q x D.
    """
    qf = as_feature_tensor(query_features, "query features")
    gf = as_feature_tensor(group_features, "group features", qf.device).to(qf.dtype)
    if gf.shape[1] != qf.shape[1]:
        raise AttnReidError(f"group features have dimension {gf.shape[1]} but query features have {qf.shape[1]}")
    dev = qf.device
    qp = _ids(query_pids, "query_pids", qf.shape[0], dev)
    qc = _ids(query_camids, "query_camids", qf.shape[0], dev)
    gp = _ids(group_pids, "group_pids", gf.shape[0], dev)
    gc = _ids(group_camids, "group_camids", gf.shape[0], dev)
    if gf.shape[0] == 0:
        return qf.clone()
    cam_base = int(torch.cat([qc, gc]).max()) + 1
    g_key = gp * cam_base + gc
    keys, inverse = torch.unique(g_key, return_inverse=True)
    sums = torch.zeros((len(keys), gf.shape[1]), dtype=gf.dtype, device=dev).index_add_(0, inverse, gf)
    counts = torch.bincount(inverse, minlength=len(keys)).to(gf.dtype)
    means = sums / counts.unsqueeze(1)
    q_key = qp * cam_base + qc
    pos = torch.searchsorted(keys, q_key).clamp_(max=len(keys) - 1)
    found = keys[pos] == q_key
    return torch.where(found.unsqueeze(1), means[pos], qf)


def evaluate(
    qf: ArrayLike,
    gf: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: Optional[ArrayLike] = None,
    g_camids: Optional[ArrayLike] = None,
    protocol: str = "market",
    metric: str = "euclidean_sq",
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_rank: int = 50,
    rerank_input: str = "zhong",
    multi_query: Optional[Tuple[ArrayLike, ArrayLike, ArrayLike]] = None,
    num_repeats: int = 10,
    seed: int = 0,
    chunk_size: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    per_query: bool = False,
) -> Dict:
    """Metrics of query features ``qf`` (Q x D) against gallery features ``gf`` (G x D).

    Returns the dict of :func:`attnreid.evaluation.rank.evaluate_rank` (``mAP``, ``mINP``,
    ``cmc``, ``rank1``, ``rank3``, ``rank5``, ``rank10``, ``num_valid_queries``,
    ``num_skipped_queries``) plus ``protocol``, ``metric`` and ``rerank``; ``per_query=True`` adds
    the per-query arrays (``"per_query"``, see :func:`attnreid.evaluation.rank.evaluate_rank`).
    ``rerank_input`` (``zhong`` | ``torchreid``) is :func:`attnreid.evaluation.rerank.re_ranking`'s.
    """
    if protocol not in PROTOCOLS:
        raise AttnReidError(f"unknown evaluation protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if metric not in METRICS:
        raise AttnReidError(f"unknown distance metric {metric!r}; expected one of {', '.join(METRICS)}")
    q = as_feature_tensor(qf, "query features", device)
    g = as_feature_tensor(gf, "gallery features", q.device)
    if q.shape[1] != g.shape[1]:
        raise AttnReidError(f"query features have dimension {q.shape[1]} but gallery features have {g.shape[1]}")
    if q.shape[0] == 0:
        raise AttnReidError(f"query features have shape {tuple(q.shape)}: the query set is empty")
    if multi_query is not None:
        if q_camids is None:
            raise AttnReidError("multi-query evaluation needs query camera ids")
        q = multi_query_features(q, q_pids, q_camids, *multi_query)
    dtype = torch.promote_types(q.dtype, g.dtype)
    q, g = q.to(dtype), g.to(dtype)
    if protocol == "partial":
        q_camids = g_camids = None

    if rerank:
        from attnreid.evaluation.rerank import re_ranking

        distmat = re_ranking(q, g, k1=k1, k2=k2, lambda_value=lambda_value, metric=metric, rerank_input=rerank_input)
    elif protocol == "cuhk03_classic":
        distmat = compute_distance(q, g, metric)
    else:
        distmat = None

    if protocol == "cuhk03_classic":
        res = evaluate_cuhk03_single_shot(
            distmat, q_pids, g_pids, q_camids, g_camids, max_rank, num_repeats, seed, chunk_size, per_query=per_query
        )
    elif distmat is not None:
        res = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, chunk_size, per_query=per_query)
    else:
        dev = q.device
        qp = _ids(q_pids, "q_pids", q.shape[0], dev)
        gp = _ids(g_pids, "g_pids", g.shape[0], dev)
        if (q_camids is None) != (g_camids is None):
            raise AttnReidError("give camera ids for both query and gallery, or for neither")
        qc = None if q_camids is None else _ids(q_camids, "q_camids", q.shape[0], dev)
        gc = None if g_camids is None else _ids(g_camids, "g_camids", g.shape[0], dev)
        chunks = iter_distance_chunks(q, g, metric, chunk_size or _default_chunk(g.shape[0]))
        res = evaluate_rank_chunks(chunks, qp, gp, qc, gc, max_rank, per_query=per_query)
    res.update(protocol=protocol, metric=metric, rerank=bool(rerank))
    return res


__all__: Sequence[str] = ("PROTOCOLS", "evaluate", "multi_query_features")
