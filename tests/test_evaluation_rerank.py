"""k-reciprocal re-ranking against a slow dense transcription of the reference formulation.

The transcription (``re_ranking_dense``) is a line-by-line copy of the algorithm of the reference
``re_ranking.py`` (Zhong et al.; torchreid ``torchreid/utils/rerank.py``, float32 V), test-suite and
benchmark use only. Two deliberate differences from the original, both documented: the input is the
features (the Euclidean distances the original takes, and then squares, are computed here), and
``np.argsort`` uses ``kind="stable"`` so that tied distances have a defined order (by index).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnreid.errors import AttnReidError
from attnreid.evaluation.options import RankingOptions
from attnreid.evaluation.protocols import evaluate
from attnreid.evaluation.rerank import re_ranking


def euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Plain Euclidean distance matrix (the original function squares its inputs)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def squared_euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What torchreid's engine hands its re_ranking: compute_distance_matrix(..., "euclidean") is squared."""
    return euclidean(a, b) ** 2


def re_ranking_dense(
    qf: np.ndarray, gf: np.ndarray, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, stable: bool = True,
    distance=euclidean,
):
    """The reference algorithm on features; ``stable=False`` is numpy's default argsort, as in the original.

    ``distance`` makes the three matrices the original function is given (Euclidean for Zhong et
    al.'s use; ``squared_euclidean`` for torchreid's engine).
    """
    q_g_dist, q_q_dist, g_g_dist = distance(qf, gf), distance(qf, qf), distance(gf, gf)
    original_dist = np.concatenate(
        [np.concatenate([q_q_dist, q_g_dist], axis=1), np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0
    )
    del q_g_dist, q_q_dist, g_g_dist
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(1.0 * original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist, kind="stable" if stable else None).astype(np.int32)

    query_num = qf.shape[0]
    gallery_num = qf.shape[0] + gf.shape[0]
    all_num = gallery_num

    for i in range(all_num):
        forward_k_neigh_index = initial_rank[i, : k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, : k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for j in range(len(k_reciprocal_index)):
            candidate = k_reciprocal_index[j]
            candidate_forward_k_neigh_index = initial_rank[candidate, : int(np.around(k1 / 2.0)) + 1]
            candidate_backward_k_neigh_index = initial_rank[
                candidate_forward_k_neigh_index, : int(np.around(k1 / 2.0)) + 1
            ]
            fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
            candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
            if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2.0 / 3 * len(
                candidate_k_reciprocal_index
            ):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index, candidate_k_reciprocal_index)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = 1.0 * weight / np.sum(weight)
    original_dist = original_dist[:query_num,]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    del initial_rank
    invIndex = []
    for i in range(gallery_num):
        invIndex.append(np.where(V[:, i] != 0)[0])

    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)

    for i in range(query_num):
        temp_min = np.zeros(shape=[1, gallery_num], dtype=np.float32)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(
                V[i, indNonZero[j]], V[indImages[j], indNonZero[j]]
            )
        jaccard_dist[i] = 1 - temp_min / (2.0 - temp_min)

    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    del original_dist, V, jaccard_dist
    return final_dist[:query_num, query_num:]


def clustered_features(seed, num_q=25, num_g=70, dim=8, ids=10, noise=0.6, dtype=np.float64, with_pids=False):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids, dim))
    qp, gp = rng.integers(0, ids, num_q), rng.integers(0, ids, num_g)
    qf = centres[qp] + noise * rng.standard_normal((num_q, dim))
    gf = centres[gp] + noise * rng.standard_normal((num_g, dim))
    if with_pids:
        return qf.astype(dtype), gf.astype(dtype), qp, gp
    return qf.astype(dtype), gf.astype(dtype)


@pytest.mark.parametrize("seed", range(4))
def test_equals_dense_reference_random_features(seed):
    qf, gf = clustered_features(seed)
    ours = re_ranking(qf, gf)
    ref = re_ranking_dense(qf, gf)
    assert ours.shape == ref.shape == (25, 70)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_equals_dense_reference_with_duplicates_and_ties(seed):
    # Small integer features: many exactly equal distances and duplicated images, so the
    # neighbour lists depend on how ties are ordered (by index in both).
    rng = np.random.default_rng(100 + seed)
    base = rng.integers(0, 3, (12, 4)).astype(np.float64)
    qf = base[rng.integers(0, 12, 15)]
    gf = np.concatenate([base, base[rng.integers(0, 12, 30)]])
    ours = re_ranking(qf, gf, k1=6, k2=3)
    ref = re_ranking_dense(qf, gf, k1=6, k2=3)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("k1, k2, lam", [(20, 6, 0.3), (7, 1, 0.5), (5, 3, 0.0), (150, 4, 0.3)])
def test_equals_dense_reference_other_parameters(k1, k2, lam):
    # k2 = 1 skips query expansion; k1 + 1 > N uses every image.
    qf, gf = clustered_features(7, num_q=20, num_g=60, dtype=np.float32)
    ours = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lam)
    ref = re_ranking_dense(qf.astype(np.float64), gf.astype(np.float64), k1=k1, k2=k2, lambda_value=lam)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_cosine_metric_is_euclidean_of_normalised_features():
    qf, gf = clustered_features(3)
    nq = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    ng = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    np.testing.assert_allclose(re_ranking(qf, gf, metric="cosine"), re_ranking_dense(nq, ng), atol=1e-4, rtol=0)


def test_rerank_through_evaluate_uses_reranked_distances():
    qf, gf, qp, gp = clustered_features(9, num_q=30, num_g=120, ids=12, noise=0.9, with_pids=True)
    from attnreid.evaluation.rank import evaluate_rank

    rr = evaluate(qf, gf, qp, gp, ranking=RankingOptions(rerank=True, k1=10, k2=3))
    direct = evaluate_rank(re_ranking(qf, gf, k1=10, k2=3), qp, gp)
    assert rr["rerank"] is True and {k: rr[k] for k in direct} == direct
    assert rr["mAP"] != evaluate(qf, gf, qp, gp)["mAP"]


def test_bad_rerank_arguments():
    qf, gf = clustered_features(0, num_q=3, num_g=5)
    with pytest.raises(AttnReidError, match="k1 >= 1"):
        re_ranking(qf, gf, k1=0)
    with pytest.raises(AttnReidError, match="lambda"):
        re_ranking(qf, gf, lambda_value=1.5)
    with pytest.raises(AttnReidError, match="dimension 8 .* 3"):
        re_ranking(qf, gf[:, :3])
    with pytest.raises(AttnReidError, match="non-empty"):
        re_ranking(qf[:0], gf)


def test_torch_input_gives_same_result():
    qf, gf = clustered_features(1, dtype=np.float32)
    a = re_ranking(torch.from_numpy(qf), torch.from_numpy(gf))
    np.testing.assert_array_equal(a, re_ranking(qf, gf))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("merge_every", [8, 2])
def test_tiny_memory_budget_gives_the_same_result(monkeypatch, ties, merge_every):
    # A budget of 64 elements forces 8 x 8 distance blocks (so the per-block candidates, the
    # mirrored blocks and, with merge_every=2, the intermediate candidate merges are used), many
    # expansion chunks, and Jaccard batches of a few query entries per padded gallery table.
    from attnreid.evaluation import rerank

    monkeypatch.setattr(rerank, "_MERGE_EVERY", merge_every)

    if ties:
        rng = np.random.default_rng(5)
        base = rng.integers(0, 3, (10, 4)).astype(np.float64)
        qf, gf = base[rng.integers(0, 10, 13)], base[rng.integers(0, 10, 37)]
    else:
        qf, gf = clustered_features(4, num_q=13, num_g=37)
    expected = re_ranking_dense(qf, gf, k1=6, k2=3)
    monkeypatch.setattr(rerank, "_BUDGET", 64)
    np.testing.assert_allclose(re_ranking(qf, gf, k1=6, k2=3), expected, atol=1e-4, rtol=0)


def test_merge_equals_two_key_sort_with_ties():
    # _merge takes one topk and re-sorts only rows with equal values among their first k + 1.
    from attnreid.evaluation.rerank import _merge, _order

    gen = torch.Generator().manual_seed(0)
    for width, k, levels in [(30, 7, 4), (30, 7, 1000), (12, 12, 3), (9, 1, 2)]:
        vals = torch.randint(0, levels, (50, width), generator=gen).to(torch.float32)
        idx = torch.stack([torch.randperm(100, generator=gen)[:width] for _ in range(50)])
        mv, mi = _merge(vals, idx, k)
        ov, oi = _order(vals, idx, k)
        assert torch.equal(mv, ov) and torch.equal(mi, oi)


def test_bucket_width_pads_at_most_a_quarter():
    from attnreid.evaluation.rerank import _bucket_width

    lengths = torch.arange(0, 5000)
    width = _bucket_width(lengths)
    assert width[:8].tolist() == list(range(8))
    assert _bucket_width(torch.tensor([9, 15, 17, 100, 1025])).tolist() == [10, 16, 20, 112, 1280]
    assert bool((width >= lengths).all()) and bool((width[1:] <= 1.25 * lengths[1:]).all())
    assert torch.unique(width[1025:2049]).tolist() == [1280, 1536, 1792, 2048]


def test_thread_count_is_restored():
    # The sparse phases run on one intra-op thread; the caller's setting comes back afterwards.
    qf, gf = clustered_features(2, dtype=np.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        re_ranking(qf, gf)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


def test_query_expansion_wider_than_the_reciprocal_neighbourhood():
    # k2 > k1 + 1: query expansion averages over more neighbours than the k-reciprocal sets use
    # (found by the property test; the neighbour table used to hold only k1 + 1 columns).
    qf, gf = np.array([[0.0]]), np.array([[0.0], [1.0]])
    np.testing.assert_allclose(re_ranking(qf, gf, k1=1, k2=3, lambda_value=0.0), [[0.0, 0.0]], atol=1e-6)
    qf, gf = clustered_features(6, num_q=10, num_g=30)
    np.testing.assert_allclose(re_ranking(qf, gf, k1=3, k2=9), re_ranking_dense(qf, gf, k1=3, k2=9), atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_torchreid_input_equals_the_reference_fed_squared_distances(seed):
    qf, gf = clustered_features(seed)
    ours = re_ranking(qf, gf, rerank_input="torchreid")
    ref = re_ranking_dense(qf, gf, distance=squared_euclidean)
    assert np.abs(ours - ref).max() < 1e-4
    zhong = re_ranking(qf, gf)
    assert np.abs(zhong - ref).max() > 1e-2  # the two inputs give different distances


def test_torchreid_input_through_evaluate_and_the_metrics_cli(tmp_path):
    import json

    from helpers import assert_one_line_error, run_cli

    qf, gf, qp, gp = clustered_features(5, with_pids=True)
    qc, gc = np.zeros(len(qp), int), np.ones(len(gp), int)
    ref = re_ranking_dense(qf, gf, distance=squared_euclidean)
    from attnreid.evaluation.rank import evaluate_rank

    expected = evaluate_rank(ref, qp, gp, qc, gc)
    got = evaluate(qf, gf, qp, gp, qc, gc, ranking=RankingOptions(rerank=True, rerank_input="torchreid"))
    assert got["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    path = tmp_path / "feats.npz"
    np.savez(path, query_features=qf, gallery_features=gf, query_pids=qp, gallery_pids=gp,
             query_camids=qc, gallery_camids=gc)
    code, out, err = run_cli(["metrics", path, "--rerank", "--rerank-input", "torchreid", "--json"])
    assert code == 0, err
    assert json.loads(out)["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    code, _, err = run_cli(["metrics", path, "--rerank", "--rerank-input", "squared", "--json"])
    assert_one_line_error(code, err, "--rerank-input", "torchreid")
    with pytest.raises(AttnReidError, match="re-ranking input"):
        re_ranking(qf, gf, rerank_input="torchreid4")


def test_identical_features_give_finite_distances():
    """A collapsed model (every feature the same: an untrained network, a dead layer) has row
    maxima of 0; Eq. 3's scaling must give 0 there, not 0/0."""
    q, g = np.ones((3, 4), np.float32), np.ones((7, 4), np.float32)
    out = np.asarray(re_ranking(q, g, k1=4, k2=2, lambda_value=0.3))
    assert out.shape == (3, 7) and np.isfinite(out).all() and (out >= 0).all()
