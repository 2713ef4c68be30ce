"""The Controls chapter: the budget-doubling control (has the study converged?) and the causal test of filter growth,
each read as its plan fixed (:func:`bnlib.analysis.budget_change`, :func:`bnlib.analysis.intervention_tests`,
:func:`bnlib.analysis.manipulation_checks`, :func:`bnlib.analysis.growth_reading`). A grid shows its verdicts only
once every cell is committed (the plans' families are fixed in size); until then, one line says how far it is.
"""

from __future__ import annotations

import pandas as pd

from .. import analysis
from ..plots import display_name
from .words import and_list, difference, percent_interval


def progress_line(grid: str, committed: int, planned: int) -> str:
    """'4 of 20 cells committed; ...' for a grid that has not finished, '' for one that has."""
    if committed >= planned:
        return ""
    return (
        f"{committed} of {planned} cells of `grids/{grid}.yaml` are committed; the rest run in the background, and "
        "this section shows the verdicts when the last is in (the plan's families are read whole)."
    )


def convergence_table(change: pd.DataFrame) -> pd.DataFrame:
    """The doubling control's primary family: per comparison and batch size, the difference to BN at the study's
    budget and at twice it (mean over the paired seeds), the change with its interval, and the verdict."""
    rows = [
        {
            "comparison": display_name(r.comparison.split(" - ")[0]) + " - BN",
            "batch": int(r.batch_size),
            "at 1x (points)": percent_interval(r.diff_short, float("nan"), float("nan"), signed=True),
            "at 2x (points)": percent_interval(r.diff_long, float("nan"), float("nan"), signed=True),
            "change (points)": difference(r.mean, r.ci_low, r.ci_high, r.n_seeds).replace(" points", ""),
            "verdict": r.verdict,
        }
        for r in change.itertuples()
    ]
    return pd.DataFrame(rows).set_index(["comparison", "batch"])


def convergence_said(change: pd.DataFrame) -> str:
    """What the book says, as the plan decided it: converged everywhere, or which comparisons moved or cannot be
    told."""
    by = change.assign(
        said=[
            f"{display_name(c.split(' - ')[0])} at batch {int(b)}"
            for c, b in zip(change["comparison"], change["batch_size"])
        ]
    )
    if (by["verdict"] == "equivalent").all():
        return "Every difference to BN is unchanged within the margin at twice the budget: the study's verdicts hold."
    text = []
    for verdict, words in (
        ("moved toward BN", "moved toward BN at twice the budget; its verdict is a verdict at the study's budget"),
        (
            "moved away from BN",
            "moved away from BN at twice the budget; its verdict is a verdict at the study's budget",
        ),
        ("cannot tell", "cannot be told converged or not by this control"),
    ):
        names = by.loc[by["verdict"] == verdict, "said"]
        if len(names):
            text.append(f"{and_list(names)}: {words}.")
    return " ".join(text)


def growth_table(tests: pd.DataFrame, checks: pd.DataFrame) -> pd.DataFrame:
    """The causal test's primary family: per batch size and arm, the gap of its free arm to BN, the recovery (or
    the cost, for the sufficiency arm) beyond half that gap with its interval, the verdict, and the manipulation
    check (the arm's filter norms against their target, every layer)."""
    passed = checks.groupby(["batch_size", "arm"])["passed"].first() if len(checks) else pd.Series(dtype=bool)
    rows = []
    for r in tests.itertuples():
        check = passed.get((r.batch_size, r.arm))
        rows.append(
            {
                "batch": int(r.batch_size),
                "arm": display_name(r.arm),
                "test": r.kind,
                "gap of the free arm (points)": percent_interval(r.gap, float("nan"), float("nan")),
                "beyond half the gap (points)": difference(r.mean, r.ci_low, r.ci_high, r.n_seeds).replace(
                    " points", ""
                ),
                "verdict": r.verdict if check is None or bool(check) else f"{r.verdict} (failed manipulation)",
                "manipulation check": "–" if check is None else "passed" if check else "failed",
            }
        )
    return pd.DataFrame(rows).set_index(["batch", "arm"])


def growth_said(tests: pd.DataFrame, checks: pd.DataFrame) -> str:
    """The plan's sentence at each batch size where its rule gives one (:func:`bnlib.analysis.growth_reading`)."""
    read = analysis.growth_reading(tests, checks)
    said = [f"At batch {b}: {reading}." for b, reading in read.items() if reading]
    rest = [str(b) for b, reading in read.items() if not reading]
    if rest:
        said.append(f"At batch {and_list(rest)} the arms give no pattern the plan summarises: read them arm by arm.")
    return " ".join(said)
