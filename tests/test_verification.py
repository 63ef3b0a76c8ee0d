"""The verification numbers (attnreid.evaluation.verification), each against a hand computation."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from attnreid.errors import AttnReidError
from attnreid.evaluation import verification as v


def test_module_is_numpy_only():
    roots = set()
    for node in ast.walk(ast.parse(Path(v.__file__).read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    assert roots == {"__future__", "math", "dataclasses", "typing", "numpy", "attnreid"}, roots


def test_threshold_at_fpr_by_hand():
    neg = [5, 1, 3, 2, 4, 6, 7, 8, 9, 10]  # order does not matter
    # FPR 0.2 allows k = 2 accepted negatives: the threshold is the 3rd smallest, 3 (accept d < 3)
    assert v.threshold_at_fpr(neg, 0.2) == 3 and v.accept_rate(neg, 3) == 0.2
    assert v.threshold_at_fpr(neg, 0.25) == 3  # floor(2.5) = 2
    assert v.threshold_at_fpr(neg, 0.0) == 1  # nothing accepted
    assert v.threshold_at_fpr(neg, 1.0) == math.inf
    assert v.threshold_at_fpr(np.arange(100), 0.29) == 29  # 0.29 x 100 is 28.999... in floats: still 29
    # ties at the cut are all rejected: 1, 2, 2, 2, 5 at FPR 0.4 (k = 2) accepts only the 1
    assert v.threshold_at_fpr([1, 2, 2, 2, 5], 0.4) == 2 and v.accept_rate([1, 2, 2, 2, 5], 2) == 0.2
    # weighted: weights 1, 3, 1, target 0.3 of W = 5 (1.5): the cumulative 1, 4, 5 first exceeds it at d = 2
    assert v.threshold_at_fpr([1, 2, 3], 0.3, weights=[1, 3, 1]) == 2
    assert v.accept_rate([1, 2, 3], 2, weights=[1, 3, 1]) == 0.2


def test_roc_and_eer_by_hand():
    t, fpr, tpr = v.roc_curve([1, 3], [2, 4])
    assert t.tolist() == [1, 2, 3, 4, math.inf]
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    # max(FPR, FNR) = 1, .5, .5, .5, 1: EER 0.5, first reached at t = 2
    assert v.equal_error_rate([1, 3], [2, 4]) == (0.5, 2.0)
    assert v.equal_error_rate([1, 2], [3, 4]) == (0.0, 3.0)  # separable: d < 3 splits them
    # weights count as repeated pairs: positive 3 twice -> TPR below 4 is 1/3 then 1
    t, fpr, tpr = v.roc_curve([1, 3], [2, 4], pos_weights=[1, 2])
    assert tpr.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1, 1])


def test_pair_distances_by_hand():
    f = np.array([[0.0], [1.0], [3.0], [6.0]])
    p = v.pair_distances(f, pids=[1, 1, 2, 2], camids=[0, 1, 0, 0])
    # positives: (0, 1) only: (2, 3) share a camera
    assert p.pos.tolist() == [1.0] and p.pos_id.tolist() == [0]
    pairs = sorted(zip(p.neg.tolist(), p.neg_a.tolist(), p.neg_b.tolist()))
    assert pairs == [(4.0, 0, 1), (9.0, 0, 1), (25.0, 0, 1), (36.0, 0, 1)]  # squared distances
    assert p.neg_total == 4 and p.ids.tolist() == [1, 2]
    c = v.pair_distances(np.array([[1.0, 0], [2.0, 0], [0, 1.0]]), [1, 1, 2], [0, 1, 0], metric="cosine")
    assert c.pos.tolist() == pytest.approx([0.0]) and sorted(c.neg.tolist()) == pytest.approx([1.0, 1.0])
    with pytest.raises(AttnReidError, match="no positive pairs"):
        v.pair_distances(f, [1, 1, 2, 2], [0, 0, 0, 0])
    sampled = v.pair_distances(np.random.default_rng(0).normal(size=(200, 4)), np.arange(200) // 4,
                               np.arange(200) % 4, max_negatives=1000)
    assert sampled.neg_total == (200 ** 2 - 50 * 16) // 2 and 800 < sampled.neg_sampled < 1200


def test_identity_bootstrap_weights_by_hand():
    """Identities A, B, C drawn (2, 1, 0) times: A's positives weigh 2, B's 1, C's 0; the
    negative pair (A, B) weighs 2 x 1, pairs with C nothing."""
    pairs = v.Pairs(pos=np.array([1.0, 2.0, 3.0]), pos_id=np.array([0, 1, 2]),
                    neg=np.array([1.5, 2.5, 3.5]), neg_a=np.array([0, 0, 1]), neg_b=np.array([1, 2, 2]),
                    ids=np.array([10, 20, 30]), neg_total=3, num_images=6)
    m = np.array([2.0, 1.0, 0.0])
    wn = m[pairs.neg_a] * m[pairs.neg_b]
    wp = m[pairs.pos_id]
    assert wn.tolist() == [2, 0, 0] and wp.tolist() == [2, 1, 0]
    # with these weights: every negative weight sits on 1.5, so any target < 1 gives threshold 1.5,
    # the TPR there is 2/3 (positive 1.0 of weight 2 out of 3), the fixed (unweighted) threshold at
    # FPR 0.34 is 2.5 and accepts the 1.5 pair: weighted FPR 1
    assert v.threshold_at_fpr(pairs.neg, 0.5, wn) == 1.5
    assert v.accept_rate(pairs.pos, 1.5, wp) == pytest.approx(2 / 3)
    assert v.threshold_at_fpr(pairs.neg, 0.34) == 2.5 and v.accept_rate(pairs.neg, 2.5, wn) == 1.0
    # the bootstrap applies exactly these formulas to each resample: redraw its multiplicities
    boot = v.identity_bootstrap(pairs, [0.34], resamples=50, seed=3)
    rng = np.random.default_rng(3)
    fixed = v.threshold_at_fpr(pairs.neg, 0.34)
    seen = 0
    while seen < 50:
        m = v.identity_weights(rng, 3)
        wn, wp = m[pairs.neg_a] * m[pairs.neg_b], m[pairs.pos_id]
        if wn.sum() <= 0 or wp.sum() <= 0:
            continue
        t = v.threshold_at_fpr(pairs.neg, 0.34, wn)
        assert boot["thresholds"][seen, 0] == t
        assert boot["tpr"][seen, 0] == pytest.approx(v.accept_rate(pairs.pos, t, wp))
        assert boot["fpr_at_threshold"][seen, 0] == pytest.approx(v.accept_rate(pairs.neg, fixed, wn))
        assert boot["eer"][seen] == pytest.approx(v.equal_error_rate(pairs.pos, pairs.neg, wp, wn)[0])
        seen += 1


def test_bootstrap_rate_by_hand():
    acc = np.array([[0, 1], [0, 0]], dtype=float)  # identity pair (0, 1): 1 of 4 accepted
    tot = np.array([[0, 4], [0, 0]], dtype=float)
    r = v.bootstrap_rate(acc, tot, resamples=20, seed=0)
    assert r["rate"] == 0.25 and r["pairs"] == 4 and r["accepted"] == 1
    assert r["ci"] == [0.25, 0.25]  # one identity pair: every resample that has it gives 1/4


def blobs(num_ids: int, per_id: int, dim: int = 8, spread: float = 0.6, seed: int = 0):
    """Identity centres with Gaussian images around them; camera = image index within the identity."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    f = np.repeat(centres, per_id, axis=0) + spread * rng.normal(size=(num_ids * per_id, dim))
    return f, np.repeat(np.arange(num_ids), per_id), np.tile(np.arange(per_id), num_ids)


def test_calibrate_and_threshold_for():
    f, pids, cams = blobs(60, 5)
    cal = v.calibrate(f, pids, cams, targets=[1e-2, 1e-3], resamples=100)
    pair = v.pair_distances(f, pids, cams)
    assert cal["positive_pairs"] == 60 * 10 and cal["negative_pairs"] == (300 ** 2 - 60 * 25) // 2
    for point in cal["operating_points"]:
        t = v.threshold_at_fpr(pair.neg, point["target_fpr"])
        assert point["threshold"] == t and point["fpr"] <= point["target_fpr"]
        assert point["tpr"] == v.accept_rate(pair.pos, t)
        lo, hi = point["threshold_ci"]
        assert lo <= t <= hi and point["fpr_ci"][0] <= point["fpr"] <= point["fpr_ci"][1]
    assert cal["eer"] == v.equal_error_rate(pair.pos, pair.neg)[0]
    assert v.threshold_for(cal, 1e-3)[0] == cal["operating_points"][0]["threshold"]  # sorted: 1e-3 first
    # another target: the table's threshold at the largest FPR not above it, never looser
    t, point = v.threshold_for(cal, 5e-3)
    assert point["table_fpr"] <= 5e-3 and v.accept_rate(pair.neg, t) <= 5e-3
    with pytest.raises(AttnReidError, match="below what the calibration can promise"):
        v.threshold_for(cal, 1e-7)
