"""Distances, CMC / mAP / mINP and the protocols, against hand-worked examples and a slow reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnreid.errors import AttnReidError
from attnreid.evaluation.distance import compute_distance
from attnreid.evaluation.options import RankingOptions
from attnreid.evaluation.protocols import evaluate, multi_query_features
from attnreid.evaluation.rank import evaluate_cuhk03_single_shot, evaluate_rank


def slow_reference(distmat, q_pids, g_pids, q_camids=None, g_camids=None, max_rank=50):
    """Obviously-correct per-query evaluation: torchreid's algorithm plus fast-reid's mINP.

    Ties are broken by gallery index (stable sort); pid -1 in the gallery is junk.
    """
    distmat = np.asarray(distmat, dtype=np.float32)
    cmcs, aps, inps = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        keep = []
        for j in order:
            if g_pids[j] == -1:
                continue
            if q_camids is not None and g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i]:
                continue
            keep.append(j)
        matches = [1 if g_pids[j] == q_pids[i] and q_pids[i] != -1 else 0 for j in keep]
        if not any(matches):
            continue
        hits, precisions, first, last = 0, [], None, None
        for pos, m in enumerate(matches, start=1):
            if m:
                hits += 1
                precisions.append(hits / pos)
                first = pos if first is None else first
                last = pos
        aps.append(sum(precisions) / hits)
        inps.append(hits / last)
        cmcs.append([1.0 if first <= k else 0.0 for k in range(1, max_rank + 1)])
    cmc = np.mean(cmcs, axis=0)
    return {"mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)), "cmc": cmc, "num_valid_queries": len(aps)}


def random_problem(seed, q=30, g=120, ids=12, cams=4, ties=False):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, ids, q)
    g_pids = rng.integers(-1, ids + 2, g)  # -1 junk, ids..ids+1 distractors
    q_cams = rng.integers(0, cams, q)
    g_cams = rng.integers(0, cams, g)
    if ties:
        dist = rng.integers(0, 6, (q, g)).astype(np.float32)
    else:
        dist = rng.random((q, g)).astype(np.float32)
    return dist, q_pids, g_pids, q_cams, g_cams


def assert_matches_reference(res, ref):
    assert res["num_valid_queries"] == ref["num_valid_queries"]
    assert res["mAP"] == pytest.approx(ref["mAP"], abs=1e-9)
    assert res["mINP"] == pytest.approx(ref["mINP"], abs=1e-9)
    np.testing.assert_allclose(res["cmc"], ref["cmc"], atol=1e-12)


# --- hand-worked examples -------------------------------------------------------------------


def test_hand_worked_example_with_junk_distractor_and_same_camera():
    # One query, pid 1, camera 0. Gallery (index: pid, cam, distance):
    # 0: 1, 0, 0.1  same pid and camera -> removed
    # 1: 0, 1, 0.2  distractor          -> rank 1 (wrong)
    # 2: 1, 1, 0.3  match               -> rank 2
    # 3: -1, 2, 0.35 junk               -> removed
    # 4: 2, 1, 0.4  wrong               -> rank 3
    # 5: 1, 2, 0.5  match               -> rank 4
    dist = np.array([[0.1, 0.2, 0.3, 0.35, 0.4, 0.5]], dtype=np.float32)
    res = evaluate_rank(dist, [1], [1, 0, 1, -1, 2, 1], [0], [0, 1, 1, 2, 1, 2], max_rank=5)
    assert res["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert res["mINP"] == pytest.approx(2 / 4)
    assert res["cmc"] == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert res["rank1"] == 0.0 and res["rank5"] == 1.0
    assert res["num_valid_queries"] == 1 and res["num_skipped_queries"] == 0


def test_query_without_valid_match_is_skipped_and_counted():
    # Query 0 (pid 5) has its only gallery image in its own camera; query 1 is matched at rank 1.
    dist = np.array([[0.1, 0.2, 0.3], [0.3, 0.1, 0.2]], dtype=np.float32)
    res = evaluate_rank(dist, [5, 7], [5, 7, 8], [0, 0], [0, 1, 1], max_rank=3)
    assert res["num_valid_queries"] == 1
    assert res["num_skipped_queries"] == 1
    assert res["mAP"] == 1.0 and res["cmc"] == [1.0, 1.0, 1.0]


def test_ties_are_ordered_by_gallery_index():
    # All distances equal: the ranked list is the gallery order 0, 1, 2, 3.
    dist = np.zeros((1, 4), dtype=np.float32)
    res = evaluate_rank(dist, [3], [9, 3, 9, 3], [0], [1, 1, 1, 1], max_rank=4)
    assert res["cmc"] == [0.0, 1.0, 1.0, 1.0]
    assert res["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert res["mINP"] == pytest.approx(2 / 4)
    # Same tie with the match first in index order: rank 1.
    res = evaluate_rank(dist, [3], [3, 9, 9, 3], [0], [1, 1, 1, 1], max_rank=4)
    assert res["cmc"][0] == 1.0


def test_no_cameras_means_no_same_camera_filtering():
    dist = np.array([[0.1, 0.2]], dtype=np.float32)
    res = evaluate_rank(dist, [1], [1, 2], max_rank=2)
    assert res["rank1"] == 1.0
    with pytest.raises(AttnReidError, match="none of the 1 queries"):
        evaluate_rank(dist, [1], [1, 2], [0], [0, 0], max_rank=2)


# --- against the slow reference and properties ----------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_matches_slow_reference(seed, ties):
    dist, qp, gp, qc, gc = random_problem(seed, ties=ties)
    res = evaluate_rank(dist, qp, gp, qc, gc, chunk_size=7)
    assert_matches_reference(res, slow_reference(dist, qp, gp, qc, gc))


def test_matches_slow_reference_without_cameras():
    dist, qp, gp, _, _ = random_problem(11, ties=True)
    assert_matches_reference(evaluate_rank(dist, qp, gp), slow_reference(dist, qp, gp))


def test_gallery_permutation_leaves_map_unchanged():
    dist, qp, gp, qc, gc = random_problem(5)
    perm = np.random.default_rng(1).permutation(len(gp))
    a = evaluate_rank(dist, qp, gp, qc, gc)
    b = evaluate_rank(dist[:, perm], qp, gp[perm], qc, gc[perm])
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-12)
    assert a["cmc"] == b["cmc"] and a["mINP"] == pytest.approx(b["mINP"], abs=1e-12)


def test_perfect_distance_matrix_gives_map_one():
    rng = np.random.default_rng(2)
    qp, gp = rng.integers(0, 10, 25), rng.integers(0, 10, 90)
    qc, gc = np.zeros(25, int), np.ones(90, int)
    dist = (qp[:, None] != gp[None, :]).astype(np.float32) + rng.random((25, 90)).astype(np.float32) * 0.5
    res = evaluate_rank(dist, qp, gp, qc, gc)
    assert res["mAP"] == 1.0 and res["mINP"] == 1.0 and res["rank1"] == 1.0


def test_torch_input_and_float64_agree_with_numpy():
    dist, qp, gp, qc, gc = random_problem(3)
    a = evaluate_rank(dist, qp, gp, qc, gc)
    b = evaluate_rank(torch.from_numpy(dist.astype(np.float64)), torch.from_numpy(qp), gp, qc, gc)
    assert a == b


# --- distances -----------------------------------------------------------------------------


def test_distances_match_direct_formulas():
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((7, 5)), rng.standard_normal((11, 5))
    d = compute_distance(q, g, "euclidean_sq", chunk_size=3)  # numpy in, numpy out
    np.testing.assert_allclose(d, ((q[:, None] - g[None]) ** 2).sum(-1), rtol=1e-10, atol=1e-12)
    c = compute_distance(torch.from_numpy(q).float(), g.astype(np.float32), "cosine", chunk_size=2).numpy()
    cos = (q @ g.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(g, axis=1)[None]
    np.testing.assert_allclose(c, 1 - cos, atol=1e-6)
    assert compute_distance(q, q).diagonal().min() >= 0  # clamped, never negative


def test_distance_rejects_bad_features():
    with pytest.raises(AttnReidError, match="dimension 5 .* 4"):
        compute_distance(np.zeros((2, 5)), np.zeros((3, 4)))
    with pytest.raises(AttnReidError, match="NaN"):
        compute_distance(np.array([[np.nan, 1.0]]), np.zeros((3, 2)))
    with pytest.raises(AttnReidError, match="unknown distance metric"):
        compute_distance(np.zeros((2, 2)), np.zeros((3, 2)), metric="manhattan")


# --- protocols -----------------------------------------------------------------------------


def test_cuhk03_single_shot_hand_worked_and_seeded():
    # Query pid 1 cam 0. Gallery: pid 1 at distances 0.1 and 0.9 (other camera), pid 2 at 0.5.
    # One image per identity: the match is at rank 1 when its 0.1 image is drawn, else rank 2.
    dist = np.array([[0.1, 0.9, 0.5]], dtype=np.float32)
    args = (dist, [1], [1, 1, 2], [0], [1, 1, 1])
    res = evaluate_cuhk03_single_shot(*args, max_rank=2, num_repeats=200, seed=0)
    assert 0.4 < res["rank1"] < 0.6 and res["cmc"][1] == pytest.approx(1.0)
    assert res["mAP"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # full list, as torchreid
    again = evaluate_cuhk03_single_shot(*args, max_rank=2, num_repeats=200, seed=0)
    assert again == res


def test_cuhk03_single_shot_with_one_image_per_identity_equals_market():
    dist, qp, _, qc, _ = random_problem(7, g=12, ids=12)
    gp, gc = np.arange(12), np.full(12, 9)
    a = evaluate_cuhk03_single_shot(dist, qp, gp, qc, gc, chunk_size=5)
    b = evaluate_rank(dist, qp, gp, qc, gc)
    np.testing.assert_allclose(a["cmc"], b["cmc"], atol=1e-12)


def test_evaluate_from_features_market_and_partial():
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((6, 16))
    qp, gp = np.arange(6), np.repeat(np.arange(6), 3)
    qf = centres[qp] + 0.1 * rng.standard_normal((6, 16))
    gf = centres[gp] + 0.1 * rng.standard_normal((18, 16))
    res = evaluate(qf, gf, qp, gp, np.zeros(6, int), np.ones(18, int), chunk_size=4)
    direct = evaluate_rank(compute_distance(qf, gf), qp, gp, np.zeros(6, int), np.ones(18, int))
    assert {k: res[k] for k in direct} == direct and res["mAP"] == 1.0
    assert res["protocol"] == "market" and res["rerank"] is False
    partial = evaluate(qf, gf, qp, gp, protocol="partial", ranking=RankingOptions(metric="cosine"))
    assert partial["rank1"] == 1.0 and partial["rank3"] == 1.0


def test_multi_query_averages_same_pid_same_camera_group():
    groups = np.array([[1.0, 0.0], [3.0, 2.0], [10.0, 10.0], [5.0, 5.0]])
    g_pids, g_cams = np.array([1, 1, 1, 2]), np.array([0, 0, 1, 0])
    qf = np.array([[0.0, 0.0], [7.0, 7.0], [9.0, 9.0]])
    out = multi_query_features(qf, [1, 1, 3], [0, 1, 0], groups, g_pids, g_cams)
    np.testing.assert_allclose(out, [[2.0, 1.0], [10.0, 10.0], [9.0, 9.0]])  # pid 3: no group


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        ((np.zeros((2, 3)), [1, 2, 3], [1, 2, 3]), "q_pids has 3 entries"),
        ((np.zeros((2, 3)), [1, 2], [1, 2]), "g_pids has 2 entries"),
        ((np.full((2, 3), np.nan), [1, 2], [1, 2, 3]), "NaN/inf"),
        ((np.zeros((0, 3)), [], [1, 2, 3]), "query set is empty"),
        ((np.zeros(3), [1], [1, 2, 3]), "must be 2-D"),
    ],
)
def test_bad_inputs_raise_one_line_errors(args, needle):
    with pytest.raises(AttnReidError, match=needle) as info:
        evaluate_rank(*args)
    assert "\n" not in str(info.value)


def test_all_queries_without_match_is_an_error():
    with pytest.raises(AttnReidError, match="none of the 1 queries"):
        evaluate_rank(np.zeros((1, 2)), [1], [1, 2], [0], [0, 0])


def test_camids_for_one_side_only_is_an_error():
    with pytest.raises(AttnReidError, match="g_camids is missing"):
        evaluate_rank(np.zeros((1, 2)), [1], [1, 2], [0], None)


def test_multi_query_evaluation_ranks_the_averaged_queries():
    # HA Table 2's multi-query setting: evaluate() ranks each query's (pid, camera) group mean.
    rng = np.random.default_rng(8)
    qf, gf = rng.standard_normal((4, 6)), rng.standard_normal((15, 6))
    qp, qc = np.array([0, 1, 2, 3]), np.array([0, 1, 0, 1])
    gp, gc = rng.integers(0, 4, 15), rng.integers(0, 3, 15)
    groups, group_pids, group_cams = rng.standard_normal((9, 6)), np.array([0, 0, 1, 1, 1, 2, 3, 3, 0]), np.array(
        [0, 0, 1, 1, 0, 0, 1, 1, 1])
    averaged = multi_query_features(qf, qp, qc, groups, group_pids, group_cams)
    mq = evaluate(qf, gf, qp, gp, qc, gc, multi_query=(groups, group_pids, group_cams))
    direct = evaluate_rank(compute_distance(averaged, gf), qp, gp, qc, gc)
    assert {k: mq[k] for k in direct} == direct
    assert not np.allclose(averaged, qf)


def test_cuhk03_single_shot_needs_cameras():
    with pytest.raises(AttnReidError, match="single-shot protocol needs camera ids"):
        evaluate_cuhk03_single_shot(np.zeros((1, 2)), [1], [1, 2], None, None)
