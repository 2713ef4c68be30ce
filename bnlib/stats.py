"""The study's statistics: intervals that hold at a handful of seeds, and verdicts corrected for many comparisons.

- A mean over n seeds gets a Student-t 95% interval, mean +- t(0.975, n-1) * s / sqrt(n) (scipy). With 5
  seeds a percentile bootstrap covers far less than 95% (3 values have at most 10 distinct resamples), so
  no bootstrap is used for seed-level statistics; the t interval assumes roughly normal seed-to-seed
  variation, which a coverage simulation in the tests checks at n = 5.
- A method is compared with BN by the *paired* difference over seeds (same seed: same batches and
  initial weights): its mean, its t interval, a paired t-test (scipy's ``ttest_1samp`` of the differences
  against 0) and the number of seeds in which the method beat BN.
- Verdict words come from the t-test p-values after Holm's step-down correction (statsmodels) across the
  family of comparisons a page states -- here every method-vs-BN comparison of the grid -- at level 5%:
  "above" / "below" BN when the corrected p < 0.05, otherwise "cannot tell".
- :func:`summarise` reduces a grid's tidy table (:mod:`bnlib.tables`) to one row per condition and method.
  A diverged run counts as chance accuracy (1 / number of classes): a network whose weights are NaN predicts
  nothing. The ``diverged`` column says how many runs that was.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

CONFIDENCE = 0.95
ALPHA = 0.05
CORRECTION = "Holm"
REFERENCE = "bn"  # every method is compared with it
# Condition columns that identify a comparison (everything a grid may vary except the seed).
CONDITION_KEYS = (
    "dataset",
    "batch_size",
    "sampler",
    "classes_per_batch",
    "norm_placement",
    "budget",
    "width",
    "depth",
    "optimizer",
    "lr",
    "lr_schedule",
    "lr_drop_at",
)


def t_interval(values) -> tuple[float, float]:
    """Student-t interval of the mean (NaN below two values; the point itself when they do not vary)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float("nan"), float("nan")
    if np.all(v == v[0]):
        return float(v[0]), float(v[0])
    ci = sps.ttest_1samp(v, 0.0).confidence_interval(CONFIDENCE)
    return float(ci.low), float(ci.high)


def paired_test(differences) -> float:
    """Two-sided p-value of a paired t-test (the differences against 0); NaN where it is undefined
    (fewer than two pairs, or differences that do not vary)."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2 or np.all(d == d[0]):
        return float("nan")
    return float(sps.ttest_1samp(d, 0.0).pvalue)


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values (statsmodels); NaN stays NaN and is not counted in the family."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], alpha=ALPHA, method="holm")[1]
    return out


def verdict(diff: float, p_adjusted: float) -> str:
    """The words for a comparison with BN after the correction."""
    if np.isnan(p_adjusted) or p_adjusted >= ALPHA:
        return "cannot tell"
    return "above" if diff > 0 else "below"


def add_verdicts(summary: pd.DataFrame) -> pd.DataFrame:
    """Holm across every comparison with BN in ``summary`` (its family), then a verdict per row."""
    out = summary.copy()
    if "p_value" not in out:
        return out
    out["p_holm"] = holm(out["p_value"].to_numpy(dtype=float))
    out["verdict"] = [None if pd.isna(d) else verdict(d, p) for d, p in zip(out["diff_vs_bn"], out["p_holm"])]
    return out


def halfwidth_by_seeds(final: pd.DataFrame, keys: list[str], reference: str = "bn") -> pd.DataFrame:
    """How the paired interval narrows with seeds: for every comparison with BN and every n from 2 to the
    seeds available, the half-width (points) of the t interval of the first n seeds' differences."""
    rows = []
    for cond, group in final.groupby(keys, dropna=False, sort=True):
        ref = group[group["method"] == reference].set_index("seed")["score"]
        for method, g in group.groupby("method", sort=False):
            if method == reference:
                continue
            scores = g.set_index("seed")["score"]
            common = sorted(scores.index.intersection(ref.index))
            diff = (scores[common] - ref[common]).to_numpy(dtype=float)
            for n in range(2, len(diff) + 1):
                low, high = t_interval(diff[:n])
                rows.append(
                    {
                        **dict(zip(keys, cond if isinstance(cond, tuple) else (cond,))),
                        "method": method,
                        "n_seeds": n,
                        "halfwidth_points": 100 * (high - low) / 2,
                    }
                )
    return pd.DataFrame(rows)


def final_scores(table: pd.DataFrame, column: str = "test_acc") -> pd.DataFrame:
    """One row per cell x method with its final score; a diverged run scores chance (1 / classes)."""
    final = table[table["final"]].copy()
    chance = 1.0 / final["num_classes"]
    final["score"] = final[column].where(~final["diverged"], chance).astype(float)
    return final


def summarise(table: pd.DataFrame, column: str = "test_acc") -> pd.DataFrame:
    """Per condition x method: mean final score over seeds with a t interval, and the paired difference
    against BN (same condition, same seed: identical batches and initial weights) with its t interval, a
    paired t-test and a verdict after Holm's correction across every comparison of the table."""
    final = final_scores(table, column)
    final = final[final["score"].notna()]
    keys = [k for k in CONDITION_KEYS if k in final]
    rows = []
    for cond, group in final.groupby(keys, dropna=False, sort=True):
        cond = dict(zip(keys, cond if isinstance(cond, tuple) else (cond,)))
        ref = group[group["method"] == REFERENCE].set_index("seed")["score"]
        for method, g in group.groupby("method", sort=False):
            scores = g.set_index("seed")["score"]
            low, high = t_interval(scores.values)
            row = {
                **cond,
                "method": method,
                "n_seeds": len(scores),
                "diverged": int(g["diverged"].sum()),
                "mean": scores.mean(),
                "std": scores.std(ddof=1) if len(scores) > 1 else float("nan"),
                "ci_low": low,
                "ci_high": high,
            }
            common = scores.index.intersection(ref.index)
            if method != REFERENCE and len(common):
                diff = scores[common] - ref[common]
                d_low, d_high = t_interval(diff.values)
                row.update(
                    {
                        "diff_vs_bn": diff.mean(),
                        "diff_ci_low": d_low,
                        "diff_ci_high": d_high,
                        "n_pairs": len(common),
                        "wins": int((diff > 0).sum()),
                        "p_value": paired_test(diff.values),
                    }
                )
            rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out = add_verdicts(out)
    from .methods import METHODS

    out["method"] = pd.Categorical(
        out["method"], categories=[m for m in METHODS if m in set(out["method"])], ordered=True
    )
    return out.sort_values(keys + ["method"]).reset_index(drop=True)
