"""The study's statistics with known answers: t intervals (by hand and their coverage), paired tests, Holm."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bnlib import stats


def test_t_interval_is_the_textbook_formula():
    v = np.array([0.91, 0.93, 0.90, 0.95, 0.92])
    half = sps.t.ppf(0.975, 4) * v.std(ddof=1) / np.sqrt(5)
    assert stats.t_interval(v) == pytest.approx((v.mean() - half, v.mean() + half), abs=1e-12)
    assert np.isnan(stats.t_interval([0.9])).all()  # one seed: no interval
    assert stats.t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)  # no spread


@pytest.mark.parametrize("n", [3, 5])
def test_t_interval_covers_95_percent_of_the_time(n):
    """Seeds drawn from a known distribution: the interval must contain the true mean ~95% of the time
    (a percentile bootstrap of 5 values covers about 80%: the reason it is not used)."""
    rng = np.random.default_rng(0)
    draws = 4000
    samples = rng.normal(0.8, 0.03, size=(draws, n))
    covered = np.mean([lo <= 0.8 <= hi for lo, hi in map(stats.t_interval, samples)])
    assert 0.93 <= covered <= 0.97, covered


def test_paired_test_matches_scipy_and_handles_degenerate_input():
    d = np.array([-0.1, -0.09, -0.08, -0.07])
    assert stats.paired_test(d) == pytest.approx(sps.ttest_rel(d + 1.0, np.ones(4)).pvalue)
    assert np.isnan(stats.paired_test([0.1]))  # one pair
    assert np.isnan(stats.paired_test([0.0, 0.0, 0.0]))  # no spread: undefined, never "significant"


def test_holm_by_hand():
    # p sorted: 0.01, 0.02, 0.03, 0.5 with m = 4 -> 0.04, max(0.04, 0.06), max(0.06, 0.06), max(0.06, 0.5)
    adjusted = stats.holm([0.03, 0.5, 0.01, 0.02, float("nan")])
    assert adjusted[:4] == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert np.isnan(adjusted[4])  # a comparison without a test is not in the family


def test_verdicts_need_the_corrected_p_value():
    summary = pd.DataFrame(
        {
            "method": ["bn", "a", "b", "c"],
            "diff_vs_bn": [np.nan, 0.02, -0.05, 0.01],
            "p_value": [np.nan, 0.02, 0.001, 0.4],
        }
    )
    out = stats.add_verdicts(summary).set_index("method")
    # a: 0.02 alone would pass at 5%, but Holm over 3 comparisons makes it 0.04 -> still above; b: 0.003 -> below
    assert out.loc["a", "verdict"] == "above" and out.loc["b", "verdict"] == "below"
    assert out.loc["c", "verdict"] == "cannot tell" and pd.isna(out.loc["bn", "verdict"])  # BN is the reference
    many = pd.DataFrame({"method": list("abcdef"), "diff_vs_bn": [0.01] * 6, "p_value": [0.02] * 6})
    assert (stats.add_verdicts(many)["verdict"] == "cannot tell").all()  # 6 x 0.02 = 0.12 after Holm


def test_halfwidth_shrinks_with_seeds():
    rng = np.random.default_rng(1)
    rows = [
        {"dataset": "d", "method": m, "seed": s, "score": 0.9 + (0.02 if m == "x" else 0) + rng.normal(0, 0.01)}
        for s in range(6)
        for m in ("bn", "x")
    ]
    out = stats.halfwidth_by_seeds(pd.DataFrame(rows), ["dataset"])
    assert list(out["n_seeds"]) == [2, 3, 4, 5, 6] and set(out["method"]) == {"x"}
    assert out["halfwidth_points"].iloc[-1] < out["halfwidth_points"].iloc[0]
