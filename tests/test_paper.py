"""The paper's rendering rules on constructed tables (fast: no build): a number from fewer than three seeds says so and
has no interval, nothing prints NaN, and the abstract, the Summary's answer and the README render each shared number
as one string."""

import math

import pandas as pd
import pytest

from bnlib import paper
from bnlib.paper import words


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (5, "-2.5 [-3.0, -2.0] points"),
        (3, "-2.5 [-3.0, -2.0] points"),
        (2, "-2.5 points (n = 2, no interval)"),
        (1, "-2.5 points (n = 1, no interval)"),
    ],
)
def test_a_difference_from_fewer_than_three_seeds_says_so_instead_of_an_interval(n, expected):
    assert words.difference(-0.025, -0.03, -0.02, n) == expected


def test_no_rendering_prints_nan():
    nan = float("nan")
    assert words.difference(-0.025, nan, nan, 1) == "-2.5 points (n = 1, no interval)"
    assert words.difference(nan, nan, nan, 0) == "–"
    assert words.percent_interval(0.885, nan, nan, n=1, unit="%") == "88.5% (n = 1, no interval)"
    assert words.percent_interval(0.885, 0.88, 0.89, n=5, unit="%") == "88.5% [88.0, 89.0]"
    assert words.percent_interval(0.885, nan, nan) == "88.5"  # no seed count given: the number alone
    assert "nan" not in words.percent_interval(0.1, 0.0, nan, signed=True, n=4).lower()


def _summary(gn_seeds_at_128: int) -> pd.DataFrame:
    """A planned summary of the headline condition: BN, BNRS, BRN with 5 seeds at batches 2 and 128, GroupNorm with 5
    at batch 2 and ``gn_seeds_at_128`` at 128 (one seed: no interval, as the published study's GN at 128)."""
    rows = []
    for b in (2, 128):
        for m, d in (("bn", None), ("bnrs", -0.2), ("brn", -0.01), ("gn", 0.03 if b == 2 else -0.025)):
            n = gn_seeds_at_128 if (m, b) == ("gn", 128) else 5
            one = n < 2
            rows.append(
                {
                    "dataset": "fashionmnist",
                    "batch_size": b,
                    "sampler": "iid",
                    "norm_placement": "all",
                    "budget": f"{40000 if b == 2 else 2000} steps",
                    "method": m,
                    "n_seeds": n,
                    "mean": 0.85 + (d or 0),
                    "ci_low": math.nan if one else 0.84 + (d or 0),
                    "ci_high": math.nan if one else 0.86 + (d or 0),
                    "diff_vs_bn": d,
                    "diff_ci_low": math.nan if d is None or one else d - 0.005,
                    "diff_ci_high": math.nan if d is None or one else d + 0.005,
                    "n_pairs": None if d is None else n,
                    "wins": None if d is None else 0,
                    "p_value": None if d is None or one else 0.001,
                    "family": None if d is None else ("exploratory" if m == "gn" else "primary"),
                    "verdict": None if d is None else ("cannot tell" if one else "below" if d < 0 else "above"),
                }
            )
    return pd.DataFrame(rows)


def test_the_abstract_answer_and_readme_say_n_1_and_print_one_string_for_each_shared_number(tmp_path):
    summary = _summary(gn_seeds_at_128=1)
    facts = paper.study.headline(summary)
    assert facts["gn_large_text"] == "-2.5 points (n = 1, no interval)"
    assert facts["bnrs_small_text"] == "-20.0 [-20.5, -19.5] points"
    tables = paper.tables.Tables("study", tmp_path, pd.DataFrame(), pd.DataFrame(), summary, None, None, [], None)
    abstract = paper.study.abstract(tables)
    answer = paper.study.answer(summary)
    readme = paper.readme.readme_findings(summary, 1, 1)
    for text in (abstract, answer, readme):
        assert "nan" not in text.lower()
        assert "-20.0 [-20.5, -19.5] points" in text
    for text in (abstract, answer):  # the README names BNRS, BRN and BNWoS, not GroupNorm
        assert "-2.5 points (n = 1, no interval)" in text
    assert "-2.5 [-3.0, -2.0] points" in paper.study.answer(_summary(gn_seeds_at_128=5))
