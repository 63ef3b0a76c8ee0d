"""Bootstrap intervals, paired comparisons, sign test and the per-query output of rank.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnreid.errors import AttnReidError
from attnreid.evaluation import stats
from attnreid.evaluation.rank import evaluate_cuhk03_single_shot, evaluate_rank
from test_evaluation_rank import random_problem, slow_reference


def _quantile_linear(sorted_values, q):
    """numpy's default ('linear') quantile, by hand."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def slow_bootstrap(per_query, resamples, level, seed, max_rank):
    """A Python loop over resamples and queries, on the same draws (one generator call)."""
    valid = [i for i, v in enumerate(per_query["valid"]) if v]
    n = len(valid)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    samples = {"rank1": [], "mAP": [], "mINP": []}
    cmc = [[] for _ in range(max_rank)]
    for row in idx:
        picked = [valid[int(j)] for j in row]
        samples["mAP"].append(sum(per_query["ap"][i] for i in picked) / n)
        samples["mINP"].append(sum(per_query["inp"][i] for i in picked) / n)
        samples["rank1"].append(sum(per_query["rank1"][i] for i in picked) / n)
        for k in range(1, max_rank + 1):
            cmc[k - 1].append(sum(1 for i in picked if per_query["first_rank"][i] <= k) / n)
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    out = {f"{k}_ci": [_quantile_linear(sorted(v), lo_q), _quantile_linear(sorted(v), hi_q)] for k, v in samples.items()}
    out["cmc_ci"] = [[_quantile_linear(sorted(v), lo_q), _quantile_linear(sorted(v), hi_q)] for v in cmc]
    return out


# --- per-query output of rank.py ------------------------------------------------------------


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True)])
def test_per_query_output_leaves_the_summary_unchanged_and_matches_it(seed, ties):
    dist, qp, gp, qc, gc = random_problem(seed, ties=ties)
    plain = evaluate_rank(dist, qp, gp, qc, gc, max_rank=10)
    res = evaluate_rank(dist, qp, gp, qc, gc, max_rank=10, per_query=True)
    pq = res.pop("per_query")
    assert res == plain  # bit-identical summary
    ref = slow_reference(dist, qp, gp, qc, gc, max_rank=10)
    assert pq["valid"].sum() == ref["num_valid_queries"] and pq["valid"].shape == (len(qp),)
    v = pq["valid"]
    assert np.nanmean(pq["ap"]) == pytest.approx(plain["mAP"], abs=1e-12)
    assert np.nanmean(pq["inp"]) == pytest.approx(plain["mINP"], abs=1e-12)
    assert pq["rank1"][v].mean() == pytest.approx(plain["rank1"], abs=1e-12)
    assert np.isnan(pq["ap"][~v]).all() and (pq["first_rank"][~v] == 0).all()
    for k in range(1, 11):
        assert (pq["first_rank"][v] <= k).mean() == pytest.approx(plain["cmc"][k - 1], abs=1e-12)
    np.testing.assert_array_equal(pq["rank1"][v], (pq["first_rank"][v] == 1).astype(float))


def test_per_query_first_rank_hand_worked():
    # Query 0 sees distractor, match, wrong, match; query 1 the reverse: match, wrong, match, distractor.
    dist = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]], dtype=np.float32)
    res = evaluate_rank(dist, [1, 1], [0, 1, 2, 1], [0, 0], [1, 1, 1, 1], per_query=True)
    pq = res["per_query"]
    np.testing.assert_array_equal(pq["first_rank"], [2, 1])
    np.testing.assert_allclose(pq["ap"], [(1 / 2 + 2 / 4) / 2, (1 / 1 + 2 / 3) / 2])
    np.testing.assert_allclose(pq["inp"], [2 / 4, 2 / 3])


def test_cuhk03_per_query_rank1_is_the_share_of_draws():
    dist, qp, gp, qc, gc = random_problem(2)
    res = evaluate_cuhk03_single_shot(dist, qp, gp, qc, gc, num_repeats=4, per_query=True)
    pq = res["per_query"]
    assert "first_rank" not in pq
    assert np.nanmean(pq["rank1"]) == pytest.approx(res["rank1"], abs=1e-12)
    assert set(np.unique(pq["rank1"][pq["valid"]] * 4)) <= {0.0, 1.0, 2.0, 3.0, 4.0}


# --- bootstrap intervals ----------------------------------------------------------------------


def test_bootstrap_matches_slow_reference():
    dist, qp, gp, qc, gc = random_problem(3, q=40)
    pq = evaluate_rank(dist, qp, gp, qc, gc, max_rank=8, per_query=True)["per_query"]
    fast = stats.bootstrap_metrics(pq, resamples=200, level=0.9, seed=7, max_rank=8)
    slow = slow_bootstrap(pq, 200, 0.9, 7, 8)
    for key in ("rank1_ci", "mAP_ci", "mINP_ci"):
        np.testing.assert_allclose(fast[key], slow[key], atol=1e-12)
    np.testing.assert_allclose(fast["cmc_ci"], slow["cmc_ci"], atol=1e-12)
    assert fast["ci"]["num_queries"] == int(pq["valid"].sum()) and fast["ci"]["resamples"] == 200


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    values = rng.random(300)
    a = stats.bootstrap_ci(values, seed=1)
    assert a == stats.bootstrap_ci(values, seed=1)
    assert a != stats.bootstrap_ci(values, seed=2)
    assert a[0] < values.mean() < a[1]
    # The half-width is about 1.96 standard errors of the mean.
    se = values.std(ddof=1) / math.sqrt(len(values))
    assert (a[1] - a[0]) / 2 == pytest.approx(1.96 * se, rel=0.15)


def _coverage(draw, truth, trials, level, resamples, seed):
    rng = np.random.default_rng(seed)
    hits = 0
    for t in range(trials):
        lo, hi = stats.bootstrap_ci(draw(rng), resamples=resamples, level=level, seed=t)
        hits += lo <= truth <= hi
    return hits / trials


def test_coverage_of_bernoulli_hits_with_known_p(monkeypatch):
    # Small blocks: the coverage must hold across the blocked draws too.
    monkeypatch.setattr(stats, "_BLOCK_ELEMENTS", 4096)
    p, n = 0.3, 200

    def draw(rng):
        return (rng.random(n) < p).astype(float)

    # 300 seeded trials: the expected 95 % coverage has a standard error of 1.3 points; the
    # percentile bootstrap of a mean at n = 200 covers slightly less than nominal.
    cov95 = _coverage(draw, p, trials=300, level=0.95, resamples=400, seed=11)
    assert 0.90 <= cov95 <= 0.985, cov95
    # A 50 % interval covers about half the time: the check can tell levels apart.
    cov50 = _coverage(draw, p, trials=300, level=0.5, resamples=400, seed=11)
    assert 0.38 <= cov50 <= 0.62, cov50


def test_coverage_of_skewed_continuous_scores():
    # AP-like scores: Beta(0.5, 2) has mean 0.2 and a long right tail.
    cov = _coverage(lambda rng: rng.beta(0.5, 2.0, 150), 0.2, trials=300, level=0.95, resamples=400, seed=5)
    assert 0.90 <= cov <= 0.985, cov


def test_bootstrap_bad_options():
    with pytest.raises(AttnReidError, match="resamples"):
        stats.bootstrap_ci([0.1, 0.2], resamples=0)
    with pytest.raises(AttnReidError, match="level"):
        stats.bootstrap_ci([0.1, 0.2], level=1.0)
    with pytest.raises(AttnReidError, match="empty"):
        stats.bootstrap_ci([])
    with pytest.raises(AttnReidError, match="no valid query"):
        stats.bootstrap_metrics({"ap": np.array([np.nan]), "inp": np.array([np.nan]), "rank1": np.array([np.nan]),
                                 "valid": np.array([False])})


# --- paired comparison --------------------------------------------------------------------------


def test_binomial_two_sided_against_hand_computation():
    assert stats.binomial_two_sided(2, 10) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert stats.binomial_two_sided(8, 10) == stats.binomial_two_sided(2, 10)
    assert stats.binomial_two_sided(5, 10) == 1.0
    assert stats.binomial_two_sided(0, 0) == 1.0
    assert stats.binomial_two_sided(0, 20) == pytest.approx(2 / 2 ** 20)
    for n in (7, 31, 200):
        for k in (0, n // 3, n // 2):
            ref = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n)
            assert stats.binomial_two_sided(k, n) == pytest.approx(ref, rel=1e-12)


def test_sign_test_counts_and_drops_ties():
    s = stats.sign_test([0.2, -0.1, 0.0, 1e-12, 0.3, 0.4])
    assert (s["n_pos"], s["n_neg"], s["n_ties"]) == (3, 1, 2)
    assert s["p"] == pytest.approx(2 * (1 + 4) / 16)


def test_paired_bootstrap_of_a_constant_shift_is_that_shift():
    a = np.random.default_rng(0).random(50)
    res = stats.paired_bootstrap(a + 0.05, a)
    assert res["diff"] == pytest.approx(0.05)
    np.testing.assert_allclose(res["ci"], [0.05, 0.05], atol=1e-12)


def _per_query(ap, hit):
    ap = np.asarray(ap, dtype=float)
    return {"ap": ap, "inp": ap, "rank1": np.asarray(hit, dtype=float), "valid": np.ones(len(ap), bool)}


def test_verdict_identical_runs_no_difference_and_clearly_better_named():
    rng = np.random.default_rng(0)
    ap = rng.beta(2, 3, 300)
    hit = (rng.random(300) < ap).astype(float)
    same = stats.compare(_per_query(ap, hit), _per_query(ap, hit))
    assert same["winner"] is None and stats.verdict(same) == "no significant difference"
    assert same["mAP"]["p"] == 1.0 and same["mAP"]["ci"] == [0.0, 0.0]
    better_ap = np.clip(ap + rng.uniform(0.0, 0.15, 300), 0, 1)
    better_hit = np.maximum(hit, (rng.random(300) < 0.2).astype(float))
    res = stats.compare(_per_query(better_ap, better_hit), _per_query(ap, hit))
    assert res["winner"] == "A" and stats.verdict(res, "MHSA-Net", "Baseline") == "MHSA-Net better"
    assert res["mAP"]["ci"][0] > 0 and res["mAP"]["p"] < 1e-6 and res["rank1"]["n_b_better"] == 0
    flipped = stats.compare(_per_query(ap, hit), _per_query(better_ap, better_hit))
    assert flipped["winner"] == "B" and stats.verdict(flipped) == "B better"


def test_verdict_needs_both_tests_small_noisy_difference_is_not_significant():
    rng = np.random.default_rng(1)
    ap = rng.beta(2, 3, 300)
    noisy = np.clip(ap + rng.normal(0.005, 0.1, 300), 0, 1)
    res = stats.compare(_per_query(noisy, ap > 0.5), _per_query(ap, ap > 0.5))
    assert res["winner"] is None


def test_compare_refuses_mismatched_lengths():
    with pytest.raises(AttnReidError, match="different numbers of queries"):
        stats.compare(_per_query([0.1, 0.2], [0, 1]), _per_query([0.1], [0]))


# --- formatting and seeds ------------------------------------------------------------------------


def test_format_ci_symmetric_and_asymmetric():
    assert stats.format_ci(0.623, [0.607, 0.639]) == "62.3 ± 1.6"
    assert stats.format_ci(0.979, [0.953, 0.990]) == "97.9 +1.1/-2.6"
    assert stats.format_ci(0.5, None) == "50.0"
    assert stats.format_ci(1.0, [1.0, 1.0]) == "100.0 ± 0.0"
    assert stats.metric_text({"rank5": 0.5, "cmc_ci": [[0.1, 0.2]] * 4 + [[0.48, 0.52]]}, "rank5") == "50.0 ± 2.0"


def test_format_diff_and_p():
    entry = {"diff": 0.049, "ci": [0.012, 0.086]}
    assert stats.format_diff(entry) == "+4.9 [+1.2, +8.6]"
    assert stats.format_p(0.0123) == "p = 0.012" and stats.format_p(0.5) == "p = 0.50"
    assert stats.format_p(1e-5) == "p < 0.001" and stats.format_p(0.0123, prefix=False) == "0.012"


def test_mean_std_over_seeds():
    s = stats.mean_std([0.1, 0.2, 0.3])
    assert s["mean"] == pytest.approx(0.2) and s["std"] == pytest.approx(0.1) and s["n"] == 3
    assert stats.format_mean_std(s) == "20.0 ± 10.0 (sd, 3 seeds)"
    assert stats.mean_std([0.4])["std"] is None and stats.format_mean_std(stats.mean_std([0.4])) == "40.0"
    summary = stats.summarise_seeds([{"mAP": 0.1, "rank1": 0.3}, {"mAP": 0.3, "rank1": 0.5}], ("mAP", "mINP"))
    assert set(summary) == {"mAP"} and summary["mAP"]["mean"] == pytest.approx(0.2)
    with pytest.raises(AttnReidError):
        stats.mean_std([])


def test_item_keys_and_signature():
    assert stats.item_keys(["/a/x/1.jpg", "/z.zip::b/2.jpg"]) == ["1.jpg", "2.jpg"]
    assert stats.item_keys(["/a/1.jpg", "/b/1.jpg"]) == ["/a/1.jpg", "/b/1.jpg"]
    s1 = stats.set_signature(["/r1/g/1.jpg", "/r1/g/2.jpg"], [1, 2], [1, 2])
    assert s1 == stats.set_signature(["/other/g/1.jpg", "/other/g/2.jpg"], [1, 2], [1, 2])
    assert s1 != stats.set_signature(["/r1/g/1.jpg", "/r1/g/2.jpg"], [1, 3], [1, 2])
