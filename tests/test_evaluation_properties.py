"""Property tests (hypothesis) of the evaluation protocol and of re-ranking against slow references.

Derandomised (a fixed example sequence, no example database) so that CI cannot flake; distances
and features are small integers, exact in float32 and float64, so that ties are exact ties on
every CPU and kernel path and a tie is never an artefact of rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnreid.errors import AttnReidError
from attnreid.evaluation.rank import evaluate_rank
from attnreid.evaluation.rerank import re_ranking
from test_evaluation_rank import slow_reference
from test_evaluation_rerank import re_ranking_dense

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, distinct=False, max_q=6, max_g=14):
    """A random query x gallery problem: ids with junk (-1) and distractors, cameras, distances.

    ``distinct``: all distances in a row differ (a random permutation), else small integers with ties.
    """
    q = draw(st.integers(1, max_q))
    g = draw(st.integers(1, max_g))
    ids = draw(st.integers(1, 4))
    cams = draw(st.integers(1, 3))
    q_pids = np.array(draw(st.lists(st.integers(0, ids - 1), min_size=q, max_size=q)))
    g_pids = np.array(draw(st.lists(st.integers(-1, ids + 1), min_size=g, max_size=g)))  # -1 junk, >= ids distractors
    q_cams = np.array(draw(st.lists(st.integers(0, cams - 1), min_size=q, max_size=q)))
    g_cams = np.array(draw(st.lists(st.integers(0, cams - 1), min_size=g, max_size=g)))
    if distinct:
        rows = [draw(st.permutations(range(g))) for _ in range(q)]
        dist = np.array(rows, dtype=np.float32).reshape(q, g)
    else:
        dist = np.array(draw(st.lists(st.integers(0, 4), min_size=q * g, max_size=q * g)), dtype=np.float32).reshape(q, g)
    return dist, q_pids, g_pids, q_cams, g_cams


def _evaluate_or_none(*args, **kw):
    """``evaluate_rank``, or None where no query can be scored (it raises then, by design)."""
    try:
        return evaluate_rank(*args, **kw)
    except AttnReidError as exc:
        assert "none of the" in str(exc)
        return None


def _assert_equal_results(res, ref):
    if ref["num_valid_queries"] == 0:
        assert res is None
        return
    assert res is not None
    assert res["num_valid_queries"] == ref["num_valid_queries"]
    assert res["num_skipped_queries"] == len(ref["q"]) - ref["num_valid_queries"]
    assert res["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
    assert res["mINP"] == pytest.approx(ref["mINP"], abs=1e-12)
    np.testing.assert_allclose(res["cmc"], ref["cmc"], atol=1e-12)


def _reference(dist, qp, gp, qc=None, gc=None, max_rank=10):
    import warnings

    with warnings.catch_warnings():  # no valid query: the reference's means of empty lists are NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = slow_reference(dist, qp, gp, qc, gc, max_rank=max_rank)
    ref["q"] = qp
    return ref


@SETTINGS
@given(problems(), st.booleans(), st.integers(1, 7))
def test_map_cmc_minp_equal_the_slow_reference(problem, with_cameras, chunk):
    dist, qp, gp, qc, gc = problem
    cams = (qc, gc) if with_cameras else (None, None)
    res = _evaluate_or_none(dist, qp, gp, *cams, max_rank=10, chunk_size=chunk)
    _assert_equal_results(res, _reference(dist, qp, gp, *cams))


@SETTINGS
@given(problems(distinct=True), st.randoms(use_true_random=False))
def test_permuting_the_gallery_changes_nothing(problem, rnd):
    dist, qp, gp, qc, gc = problem
    perm = np.array(rnd.sample(range(len(gp)), len(gp)))
    a = _evaluate_or_none(dist, qp, gp, qc, gc, max_rank=10)
    b = _evaluate_or_none(dist[:, perm], qp, gp[perm], qc, gc[perm], max_rank=10)
    if a is None:
        assert b is None
        return
    assert a["cmc"] == b["cmc"] and a["num_valid_queries"] == b["num_valid_queries"]
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-12) and a["mINP"] == pytest.approx(b["mINP"], abs=1e-12)


@SETTINGS
@given(problems(), st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2)), min_size=1, max_size=5),
       st.randoms(use_true_random=False))
def test_junk_gallery_images_change_nothing_wherever_they_rank(problem, junk, rnd):
    """pid -1 is junk: removed from every ranked list, whatever its distance and camera."""
    dist, qp, gp, qc, gc = problem
    extra = np.array([[d for d, _ in junk]] * len(qp), dtype=np.float32)
    d2 = np.concatenate([dist, extra], axis=1)
    gp2 = np.concatenate([gp, np.full(len(junk), -1)])
    gc2 = np.concatenate([gc, [c for _, c in junk]])
    perm = np.array(rnd.sample(range(d2.shape[1]), d2.shape[1]))
    # tie order is by gallery index, so compare against the reference, which drops junk first
    res = _evaluate_or_none(d2[:, perm], qp, gp2[perm], qc, gc2[perm], max_rank=10)
    _assert_equal_results(res, _reference(d2[:, perm], qp, gp2[perm], qc, gc2[perm]))
    keep = gp2[perm] != -1
    base = _evaluate_or_none(d2[:, perm][:, keep], qp, gp2[perm][keep], qc, gc2[perm][keep], max_rank=10)
    if base is None:
        assert res is None
    else:
        assert res["cmc"] == base["cmc"] and res["mAP"] == pytest.approx(base["mAP"], abs=1e-12)


@SETTINGS
@given(problems(distinct=True), st.integers(1, 4))
def test_distractors_count_as_wrong_matches_and_same_camera_matches_are_removed(problem, n_extra):
    """Distractors (ids no query has) stay in the gallery as non-matches: farther than every image
    they change nothing, nearer than every image they push each true match down by one rank.
    A gallery image with the query's id and camera is removed, wherever it ranks."""
    dist, qp, gp, qc, gc = problem
    base = _evaluate_or_none(dist, qp, gp, qc, gc, max_rank=10)
    far = np.concatenate([dist, np.full((len(qp), n_extra), dist.max() + 1.0, np.float32)], axis=1)
    near = np.concatenate([dist, np.full((len(qp), n_extra), -1.0, np.float32)], axis=1)
    gp2 = np.concatenate([gp, np.full(n_extra, 99)])
    gc2 = np.concatenate([gc, np.zeros(n_extra, int)])
    after_far = _evaluate_or_none(far, qp, gp2, qc, gc2, max_rank=10)
    after_near = _evaluate_or_none(near, qp, gp2, qc, gc2, max_rank=10)
    if base is None:
        assert after_far is None and after_near is None
        return
    assert after_far["cmc"] == base["cmc"] and after_far["mAP"] == pytest.approx(base["mAP"], abs=1e-12)
    assert after_near["cmc"][n_extra:] == base["cmc"][: 10 - n_extra] and after_near["cmc"][:n_extra] == [0.0] * n_extra
    assert after_near["mAP"] < base["mAP"]
    # one query at a time: its own-camera copies of its identity, nearest of all, are never counted
    for i in range(len(qp)):
        d1 = np.concatenate([dist[i : i + 1], np.full((1, n_extra), -1.0, np.float32)], axis=1)
        gp1 = np.concatenate([gp, np.full(n_extra, qp[i])])
        gc1 = np.concatenate([gc, np.full(n_extra, qc[i])])
        one = _evaluate_or_none(dist[i : i + 1], qp[i : i + 1], gp, qc[i : i + 1], gc, max_rank=10)
        with_copies = _evaluate_or_none(d1, qp[i : i + 1], gp1, qc[i : i + 1], gc1, max_rank=10)
        if one is None:
            assert with_copies is None
        else:
            assert with_copies["cmc"] == one["cmc"] and with_copies["mAP"] == pytest.approx(one["mAP"], abs=1e-12)


# ----------------------------------------------------------------------------- re-ranking


@st.composite
def rerank_inputs(draw):
    """Small integer features (many exact ties and duplicate images) and re-ranking parameters."""
    q = draw(st.integers(1, 6))
    g = draw(st.integers(1, 12))
    dim = draw(st.integers(1, 4))
    high = draw(st.sampled_from([1, 2, 4]))
    values = draw(st.lists(st.integers(-high, high), min_size=(q + g) * dim, max_size=(q + g) * dim))
    feats = np.array(values, dtype=np.float64).reshape(q + g, dim)
    k1 = draw(st.integers(1, 12))
    k2 = draw(st.integers(1, 5))
    lam = draw(st.sampled_from([0.0, 0.3, 1.0]))
    return feats[:q], feats[q:], k1, k2, lam


@SETTINGS
@given(rerank_inputs())
def test_rerank_equals_the_dense_reference_with_ties(inputs):
    qf, gf, k1, k2, lam = inputs
    feats = np.concatenate([qf, gf])
    if (feats == feats[0]).all():  # every distance 0: both normalise by a zero row maximum
        return
    ours = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lam)
    ref = re_ranking_dense(qf, gf, k1=k1, k2=k2, lambda_value=lam)
    assert ours.shape == ref.shape == (len(qf), len(gf))
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
