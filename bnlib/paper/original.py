"""The original study side by side with ours (the Original page): its figures' numbers beside our re-run, and its
four claims judged on our data.
"""

from __future__ import annotations

import pandas as pd

from .. import methods
from ..plots import display_name
from .tables import ORIGINAL_DATASETS, equal_steps, headline_condition, original_results
from .words import DATASET_NAMES, budget_words, percent_interval, pp


def slower_answer(speed: pd.DataFrame, method: str = "bnrs", dataset: str = "fashionmnist") -> str:
    """The original's "converges much slower" read from the curves (:func:`convergence` rows, i.i.d. batches): per
    batch size the level ``method`` settles at and when, against BN's level and when BN reaches it; whether the
    method ever comes within the plateau margin of BN's level (it converges slower) or not (it converges to less)."""
    from .. import analysis

    part = speed[(speed["dataset"] == dataset) & (speed["sampler"] == "iid")]
    bn, it = (
        part[part["method"] == "bn"].set_index("batch_size"),
        part[part["method"] == method].set_index("batch_size"),
    )
    sizes = sorted(set(bn.index) & set(it.index))
    if not sizes:
        return ""
    margin, said = f"{pp(analysis.PLATEAU_MARGIN):.0f} point", []
    for b in sizes:
        m, ref = it.loc[b], bn.loc[b]
        reach = (
            f"comes within {margin} of BN's {pp(ref['level']):.1f}% at step {int(m['steps_to_bn_level']):,} (BN: "
            f"{int(ref['steps_to_bn_level']):,})"
            if pd.notna(m["steps_to_bn_level"])
            else f"never comes within {margin} of BN's {pp(ref['level']):.1f}% "
            f"(BN: step {int(ref['steps_to_bn_level']):,})"
        )
        decline = (
            f"; it was still losing accuracy at the end ({pp(m['gain_last_quarter']):+.1f} points over the last "
            f"quarter, 95% upper bound {pp(m['gain_ci_high']):+.1f}), so it passes the plateau criterion, which bounds "
            "a gain, while declining"
            if analysis.still_declining(m.get("gain_ci_high"))
            else ""
        )
        said.append(
            f"at batch {b} it ends at {pp(m['level']):.1f}% (first within {margin} of that at step "
            f"{int(m['steps_to_own_level']):,}) and {reach}{decline}"
        )
    never = it.loc[sizes, "steps_to_bn_level"].isna()
    verdict = (
        "it does not converge slower, it converges to less"
        if never.all()
        else "it converges slower"
        if not never.any()
        else "slower at some batch sizes, to less at others"
    )
    return (
        f"Read from the curves (exploratory; a level is the mean of a curve's last three evaluations, over seeds): "
        f"{display_name(method)}: " + "; ".join(said) + f". On these curves {verdict}."
    )


PLANNED_CLAIMS = (
    "Judged by the pre-registered analysis plan's rules from its primary verdicts (Fashion-MNIST, i.i.d. "
    "batches, every batch size trained until BN plateaued). A comparison that is not primary -- BN not plateaued, "
    "or a condition without cells -- counts as unknown. The *amended* column reads the plan's amendment of "
    '2026-12-07 beside it: a difference within the margin can still match, and "converges slower" is read by the '
    "plateau criterion (BNRS not plateaued where BN has)."
)
DIGITS_EXPLORATORY = (
    " The original's digits are exploratory there, so their column applies the same rules to exploratory verdicts "
    "and is labelled so."
)


def original_page_budget(summary: pd.DataFrame) -> dict[str, str]:
    """The side-by-side page's words on our budget (glued): the original's kind of budget on the short study; the
    plateau budgets on a grid with the re-run study's plan."""
    if "family" in summary:
        return {
            "our_budget": f"each batch size trained until BN plateaued: {budget_words(headline_condition(summary))} on "
            f"{DATASET_NAMES['fashionmnist']}",
            "budget_note": "Our budgets differ from the original's 10,001 steps at every batch size: each is what "
            "BN needed to plateau here",
        }
    return {
        "our_budget": "under the same kind of budget: the same number of optimiser steps at every batch size",
        "budget_note": "Our budget is also much shorter than the original's 10,001 steps",
    }


def claims_rule(summary: pd.DataFrame) -> str:
    """How the side-by-side page's verdicts on the original's claims are reached."""
    if "family" in summary:
        digits = DIGITS_EXPLORATORY if (equal_steps(summary)["dataset"] == "mnist5k").any() else ""
        return (
            PLANNED_CLAIMS
            + digits
            + " The rules are `bnlib.analysis.original_claims`, fixed by the analysis plan before its cells ran."
        )
    budgets = sorted(equal_steps(summary)["budget"].unique())
    return (
        "Each verdict comes from paired differences against BN (same seed: same batches, same initial weights) "
        f"with 95% intervals, under the equal-steps budget ({budgets[0] if budgets else 'no equal-steps cells yet'}): "
        "*holds* when the intervals say so, *does not hold* when they say the opposite, *cannot tell* when an "
        "interval includes the boundary or a condition has fewer than two seeds so far."
    )


def claims_table(summary: pd.DataFrame, plateau: pd.DataFrame | None = None) -> pd.DataFrame | None:
    """The original's four claims (rows) by dataset (columns; "exploratory" where the plan leaves it so), or None
    where this grid cannot judge them (no equal-steps cells). On a grid with the plan, each dataset's pre-registered
    verdicts stand beside the amended reading's (:func:`bnlib.analysis.original_claims`; ``plateau`` is the grid's
    plateau.csv, which claim 2's amended reading reads)."""
    from .. import analysis

    datasets = sorted(equal_steps(summary)["dataset"].unique())
    if not datasets:
        return None
    sets = {d: original_claims(summary, d, plateau) for d in datasets}

    def label(d):
        return DATASET_NAMES.get(d, d) + (" (exploratory)" if sets[d][0].get("family") == "exploratory" else "")

    columns = {}
    for d, cs in sets.items():
        columns[label(d)] = [c["verdict"] for c in cs]
        if "amended" in cs[0]:
            columns[f"{label(d)}: amended {analysis.AMENDED}"] = [c["amended"] for c in cs]
    first = next(iter(sets.values()))
    return pd.DataFrame(columns, index=pd.Index([c["claim"] for c in first], name="claim"))


def side_by_side(summary: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One table per original dataset: its numbers (one run) per batch size and method, and beside them ours (mean
    [95% interval], n seeds) on each of our datasets that stands in for it and has cells (``ORIGINAL_DATASETS``);
    for BNRS, BRN and BRNC also our run of the original's own code (``*_orig``: statistics updated before use, eps
    0). A dataset we did not re-run shows the original's numbers alone; a method we have not run there, a dash."""
    ours = equal_steps(summary)
    orig = original_results()

    def ours_cell(ds: str, batch: int, method: str) -> str:
        hit = ours[(ours["dataset"] == ds) & (ours["batch_size"] == batch) & (ours["method"] == method)]
        if hit.empty:
            return "–"
        h = hit.iloc[0]
        text = percent_interval(h["mean"], h["ci_low"], h["ci_high"], n=h["n_seeds"])  # says n where no interval
        return text if "(n = " in text else f"{text} (n = {int(h['n_seeds'])})"

    tables = {}
    for dataset, part in orig.groupby("dataset", sort=False):
        ran = [ds for ds in ORIGINAL_DATASETS.get(dataset, ()) if (ours["dataset"] == ds).any()]
        rows = []
        for r in part.itertuples():
            row = {
                "batch": r.batch_size,
                "method": display_name(r.method),
                "original (%)": ("< " if r.relation == "below" else "") + f"{r.final_acc:g}",
            }
            for ds in ran:
                name = DATASET_NAMES.get(ds, ds)
                row[f"ours on {name} (%)"] = ours_cell(ds, r.batch_size, r.method)
                twin = f"{r.method}_orig"
                row[f"ours, the original's code, on {name} (%)"] = (
                    ours_cell(ds, r.batch_size, twin) if twin in methods.METHODS else "same as ours"
                )
            rows.append(row)
        table = pd.DataFrame(rows).set_index(["batch", "method"])
        unrun = [
            c for c in table if c.startswith("ours, the original's code") and table[c].isin(["–", "same as ours"]).all()
        ]
        tables[DATASET_NAMES.get(dataset, dataset)] = table.drop(columns=unrun)  # a column with no run of ours: gone
    return tables


def _as_comparisons(s: pd.DataFrame, family, verdict, amended) -> pd.DataFrame:
    """Summary rows against BN as the comparison rows :func:`bnlib.analysis.original_claims` reads."""
    return pd.DataFrame(
        {
            "comparison": s["method"] + " - bn",
            "outcome": "accuracy",
            "family": family,
            "verdict": verdict,
            "verdict_amended": amended,
            "dataset": s["dataset"],
            "sampler": s["sampler"],
            "batch_size": s["batch_size"],
            "mean": s["diff_vs_bn"],
            "ci_low": s["diff_ci_low"],
            "ci_high": s["diff_ci_high"],
        }
    )


def planned_claims(summary: pd.DataFrame, dataset: str, plateau: pd.DataFrame | None = None) -> list[dict]:
    """The original's four claims on a grid with the re-run study's plan (its summary carries ``family``): the
    plan's rules (:func:`bnlib.analysis.original_claims`) on its primary verdicts, or -- on a dataset the plan
    leaves exploratory -- the same rules on the exploratory verdicts, each claim marked with the family read."""
    from .. import analysis

    s = equal_steps(summary)
    s = s[(s["dataset"] == dataset) & (s["method"] != "bn") & s["diff_vs_bn"].notna()]
    family = "primary" if (s["family"] == "primary").any() else "exploratory"
    amended = s["verdict_amended"] if "verdict_amended" in s else s["verdict"]
    comparisons = _as_comparisons(s, s["family"], s["verdict"], amended)
    return [
        {**claim, "family": family}
        for claim in analysis.original_claims(comparisons, dataset=dataset, family=family, plateau=plateau)
    ]


def original_claims(summary: pd.DataFrame, dataset: str, plateau: pd.DataFrame | None = None) -> list[dict]:
    """The original study's four claims, each judged on one of our datasets by the one set of rules,
    :func:`bnlib.analysis.original_claims`: on a grid with the pre-registered plan from its verdicts
    (:func:`planned_claims`); on a grid without one from each paired 95% interval against BN under the equal-steps
    budget (:func:`bnlib.analysis.interval_verdict`), labelled exploratory, without the plan's amended readings."""
    from .. import analysis

    if "family" in summary:
        return planned_claims(summary, dataset, plateau)
    ours = equal_steps(summary)
    s = ours[(ours["dataset"] == dataset) & (ours["method"] != "bn") & ours["diff_vs_bn"].notna()]
    verdicts = [analysis.interval_verdict(lo, hi) for lo, hi in zip(s["diff_ci_low"], s["diff_ci_high"])]
    comparisons = _as_comparisons(s, "exploratory", verdicts, verdicts)
    sizes = tuple(sorted(ours.loc[ours["dataset"] == dataset, "batch_size"].unique())) or None
    claims = analysis.original_claims(comparisons, dataset=dataset, family="exploratory", sizes=sizes)
    return [
        {k: v for k, v in claim.items() if not k.startswith("amended")} | {"family": "exploratory"} for claim in claims
    ]
