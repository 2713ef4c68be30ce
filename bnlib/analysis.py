"""The pre-registered analysis (book/analysis-plan.md): the 2x2 mechanism design's effects, equivalence tests,
the plateau criterion, and the split into a primary family (Holm) and exploratory comparisons (Benjamini-Hochberg).

Everything here works on the final scores of :func:`bnlib.stats.final_scores` (one row per cell x method, a
``score`` column) or on the tidy evaluation table of :func:`bnlib.tables.evaluations`, per condition
(:data:`bnlib.stats.CONDITION_KEYS`), paired by seed: the same seed means the same batches and initial weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats as sps

from . import stats

# The 2x2 design: method -> (statistics in the forward pass, gradient through the batch statistics)
CORNERS = {
    "bn": ("batch", "with"),
    "bn_detached": ("batch", "without"),
    "brn": ("running", "with"),
    "bnrs": ("running", "without"),
}
# Each effect as weights on the four corners' scores (a per-seed contrast):
EFFECTS = {
    # running minus batch statistics in the forward pass, averaged over the two gradient levels
    "forward statistics (running - batch)": {"brn": 0.5, "bnrs": 0.5, "bn": -0.5, "bn_detached": -0.5},
    # no gradient minus gradient through the batch statistics, averaged over the two forward levels
    "gradient through the statistics (without - with)": {"bn_detached": 0.5, "bnrs": 0.5, "bn": -0.5, "brn": -0.5},
    # how much the gradient's effect differs between running and batch statistics
    "interaction": {"bnrs": 1.0, "brn": -1.0, "bn_detached": -1.0, "bn": 1.0},
}
# The four simple effects (amendment of 2026-12-07): each factor's effect at each level of the other, read where the
# interaction is not negligible (its amended verdict is not "equivalent"), in a Benjamini-Hochberg family of their own
SIMPLE_EFFECTS = {
    "running - batch statistics, with the gradient (brn - bn)": {"brn": 1.0, "bn": -1.0},
    "running - batch statistics, without it (bnrs - bn_detached)": {"bnrs": 1.0, "bn_detached": -1.0},
    "without - with the gradient, batch statistics (bn_detached - bn)": {"bn_detached": 1.0, "bn": -1.0},
    "without - with the gradient, running statistics (bnrs - brn)": {"bnrs": 1.0, "brn": -1.0},
}
SIMPLE = tuple(f"2x2 simple: {name}" for name in SIMPLE_EFFECTS)
SIMPLE_FAMILY = "simple effects"
MARGIN = 0.01  # the equivalence margin: +-1 point of accuracy (book/analysis-plan.md)
PLATEAU_MARGIN = 0.01  # the plateau criterion's bound: 1 point
PLATEAU_WINDOW = 3  # evaluations averaged at the end and around 75% of the run


def contrast(final: pd.DataFrame, weights: dict[str, float]) -> pd.Series:
    """Per seed, sum of weight x score over the methods (seeds missing any of them left out)."""
    scores = final.pivot_table(index="seed", columns="method", values="score", aggfunc="first")
    missing = [m for m in weights if m not in scores]
    if missing:
        return pd.Series(dtype=float)
    scores = scores[list(weights)].dropna()
    return sum(w * scores[m] for m, w in weights.items())


def tost(values, margin: float | None = None) -> float:
    """p-value of the two one-sided t-tests that the mean of ``values`` lies within +-margin (default
    :data:`MARGIN`; the larger of the two one-sided p-values); NaN below two values, 0 or 1 for values that do not
    vary."""
    margin = MARGIN if margin is None else margin
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float("nan")
    if np.all(v == v[0]):
        return 0.0 if abs(v[0]) < margin else 1.0
    lower = sps.ttest_1samp(v, -margin, alternative="greater").pvalue
    upper = sps.ttest_1samp(v, margin, alternative="less").pvalue
    return float(max(lower, upper))


def compare(values, family: str, name: str, condition: dict) -> dict:
    """One comparison's row: mean with its t interval, seeds above zero, t-test and TOST p-values."""
    v = np.asarray(values, dtype=float)
    low, high = stats.t_interval(v)
    return {
        **condition,
        "comparison": name,
        "family": family,
        "n_seeds": len(v),
        "mean": v.mean() if len(v) else np.nan,
        "ci_low": low,
        "ci_high": high,
        "positive": int((v > 0).sum()),
        "p_value": stats.paired_test(v),
        "p_tost": tost(v),
    }


def bh(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (statsmodels); NaN stays NaN and is not counted."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], alpha=stats.ALPHA, method="fdr_bh")[1]
    return out


def verdict(mean: float, p_adjusted: float, p_tost_adjusted: float) -> str:
    """below / above zero, within the margin (equivalent), or cannot tell -- after the family's correction."""
    if not np.isnan(p_adjusted) and p_adjusted < stats.ALPHA:
        return "above" if mean > 0 else "below"
    if not np.isnan(p_tost_adjusted) and p_tost_adjusted < stats.ALPHA:
        return "equivalent"
    return "cannot tell"


WITHIN_MARGIN = ", within the margin"
AMENDED = "2026-12-07"  # the plan's amendment of the verdict and of claim 2's reading (book/analysis-plan.md)


def amended_verdict(mean: float, p_adjusted: float, p_tost_adjusted: float) -> str:
    """The verdict as the plan's amendment of 2026-12-07 reads it: a difference that is significant *and* within the
    margin is "below, within the margin" (or above) -- different, but by less than the margin; otherwise the
    pre-registered :func:`verdict`. Both are reported."""
    said = verdict(mean, p_adjusted, p_tost_adjusted)
    if said in ("below", "above") and not np.isnan(p_tost_adjusted) and p_tost_adjusted < stats.ALPHA:
        return said + WITHIN_MARGIN
    return said


def interval_verdict(low: float, high: float, margin: float | None = None) -> str:
    """The verdict of a grid without a plan, read off a paired 95% interval (no family, no correction): above or
    below 0 when the interval excludes 0, equivalent when it lies within +-margin (default :data:`MARGIN`), else
    cannot tell."""
    margin = MARGIN if margin is None else margin
    if pd.isna(low) or pd.isna(high):
        return "cannot tell"
    if low > 0 or high < 0:
        return "above" if low > 0 else "below"
    return "equivalent" if -margin <= low and high <= margin else "cannot tell"


def correct(rows: pd.DataFrame) -> pd.DataFrame:
    """Adjust within each family (primary: Holm, t-tests and TOSTs each; exploratory: Benjamini-Hochberg) and add
    the verdicts; the columns say which correction made which p."""
    out = rows.copy()
    out["correction"] = out["family"].map(
        {"primary": "Holm", "exploratory": "Benjamini-Hochberg", SIMPLE_FAMILY: "Benjamini-Hochberg"}
    )
    out["p_adjusted"], out["p_tost_adjusted"] = np.nan, np.nan
    for family, method in (("primary", stats.holm), ("exploratory", bh), (SIMPLE_FAMILY, bh)):
        mask = out["family"] == family
        if mask.any():
            out.loc[mask, "p_adjusted"] = method(out.loc[mask, "p_value"].to_numpy(dtype=float))
            out.loc[mask, "p_tost_adjusted"] = method(out.loc[mask, "p_tost"].to_numpy(dtype=float))
    adjusted = list(zip(out["mean"], out["p_adjusted"], out["p_tost_adjusted"]))
    out["verdict"] = [verdict(m, p, q) for m, p, q in adjusted]
    out["verdict_amended"] = [amended_verdict(m, p, q) for m, p, q in adjusted]
    return out


def subset_evaluations(table: pd.DataFrame) -> pd.DataFrame:
    """The in-training evaluations on the fixed test subset (the final full-set evaluation is another test set and
    left out); every evaluation where a run used one test set throughout."""
    size = table.groupby("cell")["eval_size"]
    same = size.transform("min") == size.transform("max")
    return table[table["test_acc"].notna() & ((table["eval_size"] < size.transform("max")) | same)]


def plateau(table: pd.DataFrame, window: int = PLATEAU_WINDOW, bound: float = PLATEAU_MARGIN) -> pd.DataFrame:
    """The plateau criterion per condition and method: per seed, the mean test accuracy of the last ``window``
    in-training evaluations (the fixed subset; the final full-set evaluation is left out, it is another test set;
    a run evaluated on one test set throughout uses every evaluation)
    minus the mean of the ``window`` evaluations nearest 75% of the run; over seeds, its mean and the upper end of
    its 95% t interval. Plateaued when that upper end is below ``bound``."""
    evals = subset_evaluations(table)
    keys = [k for k in stats.CONDITION_KEYS if k in evals]
    columns = [*keys, "method", "n_seeds", "gain_last_quarter", "gain_ci_high", "plateaued"]
    rows = []
    for key, group in evals.groupby([*keys, "method"], dropna=False, sort=True):
        gains = []
        for _, run in group.sort_values("step").groupby("seed"):
            acc, steps = run["test_acc"].to_numpy(float), run["step"].to_numpy()
            if len(acc) < 2 * window:
                continue
            around = np.argsort(np.abs(steps - 0.75 * run["steps_total"].iloc[0]), kind="stable")[:window]
            gains.append(acc[-window:].mean() - acc[around].mean())
        low, high = stats.t_interval(gains)
        rows.append(
            {
                **dict(zip([*keys, "method"], key)),
                "n_seeds": len(gains),
                "gain_last_quarter": float(np.mean(gains)) if gains else np.nan,
                "gain_ci_high": high,
                "plateaued": bool(high < bound) if gains and not np.isnan(high) else False,
            }
        )
    return pd.DataFrame(rows, columns=columns)


def convergence(table: pd.DataFrame, window: int = PLATEAU_WINDOW, margin: float = PLATEAU_MARGIN) -> pd.DataFrame:
    """How fast each method converges, read from the curves (exploratory: book/analysis-plan.md asks for it in
    steps and in images seen; this rule was written after the first cells were seen). Per condition and method, the
    mean over seeds of the subset evaluations at each step; a curve's *level* is the mean of its last ``window``
    points (as in the plateau criterion). ``steps_to_bn_level``: the first evaluated step at which the method's mean
    curve comes within ``margin`` of BN's level there (empty when it never does within the budget: a method that
    ends lower converges to less, not slower); ``steps_to_own_level``: the same for the method's own level. The
    images seen at those steps are the steps times the batch size."""
    evals = subset_evaluations(table)
    keys = [k for k in stats.CONDITION_KEYS if k in evals]
    columns = [
        *keys,
        "method",
        "n_seeds",
        "steps_total",
        "level",
        "bn_level",
        "steps_to_bn_level",
        "images_to_bn_level",
        "steps_to_own_level",
        "images_to_own_level",
    ]
    rows = []
    for key, condition in evals.groupby(keys, dropna=False, sort=True):
        curves = {
            m: run.groupby("step")["test_acc"].mean().sort_index() for m, run in condition.groupby("method", sort=True)
        }
        # as in the plateau criterion, a level needs 2 x window evaluations: fewer do not show a curve's end
        level = {m: float(c.iloc[-window:].mean()) if len(c) >= 2 * window else np.nan for m, c in curves.items()}
        bn_level = level.get("bn", np.nan)

        def first_step(curve: pd.Series, target: float) -> float:
            reached = curve.index[curve.to_numpy() >= target - margin]
            return float(reached[0]) if not np.isnan(target) and len(reached) else np.nan

        batch = dict(zip(keys, key))["batch_size"]
        for method, curve in curves.items():
            to_bn, to_own = first_step(curve, bn_level), first_step(curve, level[method])
            part = condition[condition["method"] == method]
            rows.append(
                {
                    **dict(zip(keys, key)),
                    "method": method,
                    "n_seeds": part["seed"].nunique(),
                    "steps_total": int(part["steps_total"].max()),
                    "level": level[method],
                    "bn_level": bn_level,
                    "steps_to_bn_level": to_bn,
                    "images_to_bn_level": to_bn * batch,
                    "steps_to_own_level": to_own,
                    "images_to_own_level": to_own * batch,
                }
            )
    out = pd.DataFrame(rows, columns=columns)
    for column in ("steps_to_bn_level", "images_to_bn_level", "steps_to_own_level", "images_to_own_level"):
        out[column] = out[column].astype("Int64")  # whole steps; empty where never reached
    return out


# --- the plan applied to a grid ----------------------------------------------------------------------------

TWO_BY_TWO = tuple(f"2x2: {name}" for name in EFFECTS)


@dataclass(frozen=True)
class Plan:
    """A grid's pre-registered analysis (book/analysis-plan.md): the comparisons that form its primary family, each
    at the conditions named, all of which share ``settings``. Comparisons are named as :func:`comparisons` names
    them: ``2x2: <effect>`` and ``<a> - <b>``. Everything else a grid holds is exploratory."""

    name: str
    settings: dict = field(default_factory=dict)
    primary: tuple[tuple[dict, tuple[str, ...]], ...] = ()
    # the grid file the plan named when it was committed (grids/<registered_as>.yaml), where the grid was renamed
    # since (the re-run study ran as "plateau" before it replaced "study"); the default: its name
    registered_as: str = ""

    @property
    def grid_file(self) -> str:
        return f"grids/{self.registered_as or self.name}.yaml"

    def primary_at(self, condition: dict) -> tuple[str, ...]:
        """The comparisons this plan makes primary at ``condition`` (none outside its conditions)."""
        if not self.primary or any(condition.get(k) != v for k, v in self.settings.items()):
            return ()
        return tuple(
            name
            for where, names in self.primary
            if all(condition.get(k) == v for k, v in where.items())
            for name in names
        )


# Fashion-MNIST, Adam at 1e-3: the 2x2's effects at each of the three conditions, and BNRS - BN at non-i.i.d. batch 2
MECHANISM = Plan(
    "mechanism",
    {"dataset": "fashionmnist", "optimizer": "adam", "lr": 0.001},
    (
        ({"batch_size": 16, "sampler": "iid"}, TWO_BY_TWO),
        ({"batch_size": 2, "sampler": "iid"}, TWO_BY_TWO),
        ({"batch_size": 2, "sampler": "noniid"}, (*TWO_BY_TWO, "bnrs - bn")),
    ),
)
# The re-run study trained to a plateau (grids/study.yaml; registered and run as grids/plateau.yaml until its primary
# tier was complete and it replaced the short study): the original's methods against BN with i.i.d. batches of 2, 16
# and 128 on Fashion-MNIST, each comparison once
STUDY = Plan(
    "study",
    {"dataset": "fashionmnist", "optimizer": "adam", "lr": 0.001},
    tuple(
        ({"batch_size": b, "sampler": "iid"}, ("bnrs - bn", "brn - bn", "brnc - bn", "bnwos - bn"))
        for b in (2, 16, 128)
    ),
    registered_as="plateau",
)
# The budget-doubling control (grids/doubling.yaml): its primary family compares two grids -- the change of each
# study comparison from the study's budget to twice it (budget_change) -- so within the grid every comparison is
# exploratory; listed here so that the test that its plan predates its cells covers it
DOUBLING = Plan("doubling", {"dataset": "fashionmnist", "optimizer": "adam", "lr": 0.001})
# The causal test of weight growth (grids/intervention.yaml): its primary family pairs its arms with the mechanism
# grid's free arms, so within the grid every comparison is exploratory; listed for the pre-registration test
INTERVENTION = Plan("intervention", {"dataset": "fashionmnist", "optimizer": "adam", "lr": 0.001})
PLANS = {plan.name: plan for plan in (MECHANISM, STUDY, DOUBLING, INTERVENTION)}  # by grid name
NO_PLAN = Plan("none")  # a grid without a plan of its own: every comparison exploratory

# Exploratory pairs (a - b) wherever both ran: which statistic's gradient, the sweep against its base, the
# relation of the original's BNRS at momentum 1 to bn_detached, and what fixes running statistics.
EXPLORATORY_PAIRS = (
    [("bn_detached_mean", "bn_detached"), ("bn_detached_var", "bn_detached")]
    + [(f"bnrs_m{round(100 * m):03d}", "bnrs") for m in (0.01, 0.03, 0.3, 1.0)]
    + [(f"bnrs_orig_m{round(100 * m):03d}", "bnrs_orig") for m in (0.01, 0.03, 0.3, 1.0)]
    + [("bnrs_orig_m100", "bn_detached"), ("brn", "bnrs"), ("online", "bnrs"), ("cbn", "bnrs"), ("cbn", "bn")]
)


def _as_key(values) -> tuple:
    """A condition's key values as a tuple in which a missing value is None, whether it came as NaN or pd.NA (i.i.d.
    conditions have no classes_per_batch), so the same condition meets itself across tables."""
    return tuple(None if pd.isna(v) else v for v in (values if isinstance(values, tuple) else (values,)))


def plan_for(grid_name: str) -> Plan:
    """The plan a grid's results are analysed under (its own, by name; else everything exploratory)."""
    return PLANS.get(grid_name, NO_PLAN)


def comparisons(table: pd.DataFrame, train_loss: pd.DataFrame | None = None, plan: Plan = MECHANISM) -> pd.DataFrame:
    """Every comparison the plan names, for every condition of a grid's tidy table, corrected per family.

    Outcome: the final test accuracy with the layers' own statistics (``outcome`` = "accuracy"): every method
    against BN, the exploratory pairs, and the 2x2 effects wherever its four corners ran; the 2x2 effects are also
    computed, as exploratory, on the accuracy after recomputed statistics and on the last training-loss window
    ("recomputed accuracy", "training loss"). A comparison is primary where ``plan`` names it at its condition
    and BN plateaued there (:func:`plateau`); where BN did not, it is exploratory and ``note`` says why."""
    plateaus = plateau(table)
    # the amendment's simple-effects family belongs to a plan whose primary family holds the 2x2; else exploratory
    simple_family = SIMPLE_FAMILY if any(set(TWO_BY_TWO) & set(names) for _, names in plan.primary) else "exploratory"
    keys = [k for k in stats.CONDITION_KEYS if k in table]
    outcomes = {"accuracy": stats.final_scores(table)}
    if table["test_acc_recomputed"].notna().any():
        outcomes["recomputed accuracy"] = stats.final_scores(table, "test_acc_recomputed")
    final = outcomes["accuracy"]
    if train_loss is not None and len(train_loss):  # the last window of each run (lower is better)
        last = train_loss.sort_values("step").groupby(["cell", "method"]).tail(1)[["cell", "method", "train_loss"]]
        outcomes["training loss"] = (
            final.drop(columns="score").merge(last, on=["cell", "method"]).rename(columns={"train_loss": "score"})
        )

    # the same condition's rows of every table, by the tuple of its keys; a missing key is None in every table (one
    # table's NaN is another's pd.NA: i.i.d. conditions, without classes_per_batch, must still meet)
    def by_condition(frame):
        return {_as_key(k): g for k, g in frame.groupby(keys, dropna=False)}

    plateau_of = by_condition(plateaus[plateaus["method"] == "bn"]) if len(plateaus) else {}
    outcome_of = {name: by_condition(frame) for name, frame in outcomes.items()}
    rows = []
    for cond, group in final.groupby(keys, dropna=False, sort=True):
        condition = dict(zip(keys, cond if isinstance(cond, tuple) else (cond,)))
        cond = _as_key(cond)
        bn = plateau_of.get(cond, pd.DataFrame())
        plateaued = bool(len(bn) and bn["plateaued"].iloc[0])
        primary = plan.primary_at(condition)

        def row(values, name: str, outcome: str = "accuracy") -> dict:
            is_primary = outcome == "accuracy" and name in primary
            return {
                **compare(values, "primary" if is_primary and plateaued else "exploratory", name, condition),
                "outcome": outcome,
                "note": "BN not plateaued: primary by the plan, counted as exploratory"
                if is_primary and not plateaued
                else "",
            }

        for outcome in outcomes:
            sub = outcome_of[outcome].get(cond, pd.DataFrame(columns=["seed", "method", "score"]))
            for name, weights in EFFECTS.items():
                values = contrast(sub, weights)
                if len(values):
                    rows.append(row(values, f"2x2: {name}", outcome))
        if set(CORNERS) <= set(group["method"]):  # the simple effects: their own family under a 2x2 plan
            for name, weights in SIMPLE_EFFECTS.items():
                rows.append(
                    {
                        **compare(contrast(group, weights), simple_family, f"2x2 simple: {name}", condition),
                        "outcome": "accuracy",
                        "note": "",
                    }
                )
        methods = set(group["method"])
        pairs = [(m, "bn") for m in sorted(methods - {"bn"}, key=list(group["method"].unique()).index)]
        pairs += [p for p in EXPLORATORY_PAIRS if set(p) <= methods and p not in pairs]  # each comparison once
        for a, b in pairs:
            rows.append(row(contrast(group, {a: 1.0, b: -1.0}), f"{a} - {b}"))
    if not rows:
        return pd.DataFrame()
    return correct(pd.DataFrame(rows))


def two_by_two_readout(comparisons: pd.DataFrame) -> pd.DataFrame:
    """Per condition of the 2x2 (accuracy), which read-out the amended plan reads: the main effects where the
    interaction is negligible (its amended verdict "equivalent"), else the four simple effects -- with the
    interaction's row, so a page can say why."""
    keys = [k for k in stats.CONDITION_KEYS if k in comparisons]
    inter = comparisons[(comparisons["comparison"] == "2x2: interaction") & (comparisons["outcome"] == "accuracy")]
    column = "verdict_amended" if "verdict_amended" in inter else "verdict"
    out = inter[[*keys, "family", "mean", "ci_low", "ci_high", column]].rename(columns={column: "interaction"})
    out["readout"] = np.where(out["interaction"] == "equivalent", "main effects", "simple effects")
    return out.reset_index(drop=True)


def _at(table: pd.DataFrame, condition: dict) -> pd.DataFrame:
    """The rows of ``table`` at ``condition`` (its keys that the table has)."""
    keep = np.ones(len(table), dtype=bool)
    for key, value in condition.items():
        if key in table:
            keep &= (table[key] == value).to_numpy()
    return table[keep]


def still_declining(gain_ci_high: float) -> bool:
    """Whether a curve was still losing accuracy at the end of its run: the plateau criterion's 95% upper bound of the
    gain over the last quarter lies below zero. Such a curve passes the criterion (which bounds a gain) while
    declining."""
    return bool(pd.notna(gain_ci_high) and gain_ci_high < 0)


def budget_change(short: pd.DataFrame, long: pd.DataFrame, plan: Plan = STUDY) -> pd.DataFrame:
    """The budget-doubling control's primary family (book/analysis-plan.md, "The budget-doubling control"): for each
    of ``plan``'s primary comparisons ``<m> - bn`` at each of its conditions, per seed the change of the difference
    to BN from ``short`` (the study's tidy evaluation table, 1x) to ``long`` (the doubled budget's, 2x), paired by
    seed (the seeds both have); a t-test and a TOST of that change, each Holm-corrected over the family. Verdict:
    ``moved toward BN`` / ``moved away from BN`` (the difference to BN shrank / grew in size), ``equivalent`` (the
    difference unchanged within the margin: converged), ``cannot tell``; ``diff_short``/``diff_long``: the mean
    differences to BN at each budget over those seeds."""
    short_final, long_final = stats.final_scores(short), stats.final_scores(long)
    rows = []
    for where, names in plan.primary:
        condition = {**plan.settings, **where}
        before, after = _at(short_final, condition), _at(long_final, condition)
        for name in names:
            method, reference = name.split(" - ")
            d_short = contrast(before, {method: 1.0, reference: -1.0})
            d_long = contrast(after, {method: 1.0, reference: -1.0})
            seeds = d_short.index.intersection(d_long.index)
            change = d_long[seeds] - d_short[seeds]
            row = compare(change.to_numpy(), "primary", name, where)
            row.update(
                diff_short=float(d_short[seeds].mean()) if len(seeds) else np.nan,
                diff_long=float(d_long[seeds].mean()) if len(seeds) else np.nan,
            )
            rows.append(row)
    if not rows:
        return pd.DataFrame()
    out = correct(pd.DataFrame(rows))
    moved = out["verdict"].isin(["above", "below"])
    toward = out["diff_long"].abs() < out["diff_short"].abs()
    out.loc[moved & toward, "verdict"] = "moved toward BN"
    out.loc[moved & ~toward, "verdict"] = "moved away from BN"
    return out


# The causal test of weight growth (book/analysis-plan.md): per arm, its kind, the free arm it is read against
# (results/mechanism/) and the network whose filter norms it follows (the registry's ``follows``; None: decayed)
INTERVENTION_ARMS = {
    "bn_detached_to_bn": ("necessity", "bn_detached", "bn"),
    "bnrs_to_bn": ("necessity", "bnrs", "bn"),
    "bn_to_bn_detached": ("sufficiency", "bn_detached", "bn_detached"),
    "bn_detached_wd": ("decay", "bn_detached", None),
    "bnrs_wd": ("decay", "bnrs", None),
}
FOLLOW_CHECK = (0.8, 1.25)  # a follow arm's final filter-norm ratio to its target, every layer
DECAY_CHECK = 0.5  # a decay arm's final filter-norm ratio to its free arm's, at most, every layer


def intervention_tests(free: pd.DataFrame, arms: pd.DataFrame, batch_sizes=(16, 2)) -> pd.DataFrame:
    """The causal test's primary family (book/analysis-plan.md, "The causal test of weight growth"): per batch size
    and arm, per seed the recovery of a necessity or decay arm A against its free arm F, (acc_A - acc_F) - g_F / 2,
    or the cost of the sufficiency arm, (acc_BN - acc_A) - g_F / 2, where g_F = acc_BN - acc_F comes from ``free``
    (the mechanism grid's tidy table) and acc_A from ``arms`` (the intervention grid's), paired by seed; a two-sided
    t-test each, one Holm family over every batch size and arm. Verdict: ``at least half`` / ``less than half`` of
    the gap, ``cannot tell``; ``no gap`` where the free arm's gap lies within the margin (TOST p < alpha, before any
    correction) -- no test there. The gate (the free no-gradient arm below BN at that batch size in the mechanism
    grid) is the caller's: pass only batch sizes where it holds."""
    free_final, arm_final = stats.final_scores(free), stats.final_scores(arms)
    rows = []
    for b in batch_sizes:
        condition = {"dataset": "fashionmnist", "sampler": "iid", "batch_size": b}
        f, a = _at(free_final, condition), _at(arm_final, condition)
        for arm, (kind, reference, _) in INTERVENTION_ARMS.items():
            scores = pd.concat([f[f["method"].isin(["bn", reference])], a[a["method"] == arm]])
            gap = contrast(scores, {"bn": 1.0, reference: -1.0})
            if kind == "sufficiency":
                values = contrast(scores, {"bn": 1.0, arm: -1.0}) - gap / 2
            else:
                values = contrast(scores, {arm: 1.0, reference: -1.0}) - gap / 2
            row = compare(values.dropna().to_numpy(), "primary", f"{arm}: {kind}", {**condition})
            row.update(
                arm=arm,
                kind=kind,
                free=reference,
                gap=float(gap.mean()) if len(gap) else np.nan,
                no_gap=bool(tost(gap.to_numpy()) < stats.ALPHA) if len(gap) > 1 else False,
            )
            rows.append(row)
    if not rows:
        return pd.DataFrame()
    out = correct(pd.DataFrame(rows))
    significant = out["p_adjusted"] < stats.ALPHA
    out["verdict"] = np.where(significant, np.where(out["mean"] > 0, "at least half", "less than half"), "cannot tell")
    out.loc[out["no_gap"], "verdict"] = "no gap"
    return out


def growth_reading(tests: pd.DataFrame, checks: pd.DataFrame | None = None) -> dict[int, str | None]:
    """What the book says about filter growth at each batch size, by the plan's rule (book/analysis-plan.md, "The
    causal test of weight growth"), from :func:`intervention_tests` and :func:`manipulation_checks`: "growth is the
    cause" where both necessity arms and the sufficiency arm say *at least half*; "growth is necessary, not
    sufficient" where the necessity arms do and the sufficiency arm says *less than half*; "growth is not necessary"
    where a necessity arm says *less than half*; None (arm by arm, no summary sentence) otherwise. An arm whose
    manipulation check failed is a failed manipulation, not evidence: its verdict counts as *cannot tell*."""
    failed = set()
    if checks is not None and len(checks):
        failed = {
            (int(b), arm) for (b, arm), ok in checks.groupby(["batch_size", "arm"])["passed"].first().items() if not ok
        }
    out = {}
    for b, part in tests.groupby("batch_size"):
        verdict = {r.arm: ("cannot tell" if (int(b), r.arm) in failed else r.verdict) for r in part.itertuples()}
        necessity = [verdict.get(a) for a, (kind, _, _) in INTERVENTION_ARMS.items() if kind == "necessity"]
        sufficiency = [verdict.get(a) for a, (kind, _, _) in INTERVENTION_ARMS.items() if kind == "sufficiency"]
        if "less than half" in necessity:
            out[int(b)] = "growth is not necessary"
        elif all(v == "at least half" for v in necessity) and sufficiency == ["at least half"]:
            out[int(b)] = "growth is the cause"
        elif all(v == "at least half" for v in necessity) and sufficiency == ["less than half"]:
            out[int(b)] = "growth is necessary, not sufficient"
        else:
            out[int(b)] = None
    return out


def manipulation_checks(arm_traces: pd.DataFrame, free_traces: pd.DataFrame) -> pd.DataFrame:
    """Per batch size, arm and norm layer: the final traced filter norm of the arm over its target's, averaged over
    seeds -- the followed network's in the same cell for a follow arm (within :data:`FOLLOW_CHECK`), the free arm's
    in ``free_traces`` (the mechanism grid) for a decay arm (at most :data:`DECAY_CHECK`); ``passed`` per arm and batch
    size is every layer's check (tidy trace tables, :func:`bnlib.tables.traces`)."""

    def last(frame):
        final = frame.sort_values("step").groupby(["batch_size", "seed", "method", "layer"]).tail(1)
        return final.set_index(["batch_size", "seed", "method", "layer"])["conv_weight_norm"].astype(float)

    own, free = last(arm_traces), last(free_traces)
    rows = []
    for arm, (kind, reference, target) in INTERVENTION_ARMS.items():
        if arm not in own.index.get_level_values("method"):
            continue
        mine = own.xs(arm, level="method")
        goal = (own if target is not None else free).xs(target or reference, level="method")
        ratio = (mine / goal.reindex(mine.index)).groupby(level=["batch_size", "layer"]).mean()
        for (b, layer), value in ratio.items():
            ok = FOLLOW_CHECK[0] <= value <= FOLLOW_CHECK[1] if target is not None else value <= DECAY_CHECK
            rows.append({"batch_size": b, "arm": arm, "kind": kind, "layer": layer, "norm_ratio": value, "ok": ok})
    out = pd.DataFrame(rows)
    if len(out):
        out["passed"] = out.groupby(["batch_size", "arm"])["ok"].transform("all")
    return out


def sampler_cost(table: pd.DataFrame, of: str = "noniid", against: str = "iid") -> pd.DataFrame:
    """What batches drawn by the sampler ``of`` (one class per batch) cost each method against ``against`` (i.i.d.),
    per condition and method trained under both: the final accuracy under ``of`` minus under ``against``, paired by
    seed (the same seed: the same initial weights; the batch streams differ), and the 2x2's effects on that cost
    (``2x2: <effect>``: which factor makes a method sensitive to the batches' composition). Not in any plan: its own
    exploratory family, Benjamini-Hochberg, verdicts as :func:`verdict`."""
    final = stats.final_scores(table)
    keys = [k for k in stats.CONDITION_KEYS if k in final and k not in ("sampler", "classes_per_batch")]
    rows = []
    for cond, group in final.groupby(keys, dropna=False, sort=True):
        condition = dict(zip(keys, cond if isinstance(cond, tuple) else (cond,)))
        scores = group.pivot_table(index=["method", "seed"], columns="sampler", values="score", aggfunc="first")
        if of not in scores or against not in scores:
            continue
        cost = (scores[of] - scores[against]).dropna().rename("score").reset_index()
        for method, part in cost.groupby("method", sort=False):
            rows.append(
                {**compare(part["score"], "exploratory", f"{method}: {of} - {against}", condition), "method": method}
            )
        for name, weights in EFFECTS.items():
            if len(values := contrast(cost, weights)):
                rows.append({**compare(values, "exploratory", f"2x2: {name}", condition), "method": None})
    return correct(pd.DataFrame(rows)) if rows else pd.DataFrame()


def evaluation_gap(table: pd.DataFrame, column: str = "test_acc_batchstats", against: str = "test_acc") -> pd.DataFrame:
    """Per condition and method, the final accuracy evaluated as ``column`` minus as ``against`` (the same network
    evaluated two ways), paired by seed; methods or runs without both left out. Its own exploratory family,
    Benjamini-Hochberg, verdicts as :func:`verdict`."""
    final = table[table["final"]]
    keys = [k for k in stats.CONDITION_KEYS if k in final]
    rows = []
    for cond, group in final.groupby(keys, dropna=False, sort=True):
        condition = dict(zip(keys, cond if isinstance(cond, tuple) else (cond,)))
        for method, part in group.groupby("method", sort=False):
            values = (part[column].astype(float) - part[against].astype(float)).dropna()
            if len(values):
                rows.append(
                    {**compare(values, "exploratory", f"{method}: {column} - {against}", condition), "method": method}
                )
    return correct(pd.DataFrame(rows)) if rows else pd.DataFrame()


PLAN_COLUMNS = ("family", "correction", "p_adjusted", "p_tost_adjusted", "verdict", "verdict_amended", "note")


def with_plan(summary: pd.DataFrame, comparisons: pd.DataFrame) -> pd.DataFrame:
    """``summary.csv`` of a grid with a plan: each comparison with BN carries the plan's family, correction, adjusted
    p-values and verdict (its ``<method> - bn`` row of :func:`comparisons`) instead of the summary's own Holm over
    every row, so one criterion reaches every page."""
    out = summary.drop(columns=["p_holm", "verdict"], errors="ignore")
    if comparisons.empty:
        return out
    vs_bn = comparisons[(comparisons["outcome"] == "accuracy") & comparisons["comparison"].str.endswith(" - bn")]
    vs_bn = vs_bn.assign(method=vs_bn["comparison"].str.removesuffix(" - bn"))
    keys = [k for k in stats.CONDITION_KEYS if k in out and k in vs_bn]

    # the same condition in both: missing keys (NaN or pd.NA) as None, as in comparisons()
    def rows(frame):
        return [_as_key(r) for r in frame[[*keys, "method"]].astype(object).itertuples(index=False, name=None)]

    plan = dict(zip(rows(vs_bn), vs_bn[list(PLAN_COLUMNS)].to_dict("records")))
    found = [plan.get(k, {}) for k in rows(out.assign(method=out["method"].astype(str)))]
    for column in PLAN_COLUMNS:
        out[column] = [row.get(column) for row in found]
    return out


def exploratory_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """A secondary summary of a grid with a plan (accuracy after recomputed or with batch statistics): every comparison
    with BN there is exploratory by the plan, so it carries the exploratory family's correction (Benjamini-Hochberg
    over this table's comparisons) and verdict in the columns of :func:`with_plan`, not a Holm of its own."""
    out = summary.drop(columns=["p_holm", "verdict"], errors="ignore")
    compared = out["p_value"].notna() if "p_value" in out else pd.Series(False, index=out.index)
    out["family"] = np.where(compared, "exploratory", None)
    out["correction"] = np.where(compared, "Benjamini-Hochberg", None)
    out["p_adjusted"] = bh(out["p_value"].to_numpy(dtype=float)) if "p_value" in out else np.nan
    out["p_tost_adjusted"] = np.nan  # no equivalence question is asked of these tables
    out["verdict"] = [
        verdict(d, p, np.nan) if f == "exploratory" else None
        for d, p, f in zip(out.get("diff_vs_bn", np.nan), out["p_adjusted"], out["family"])
    ]
    out["verdict_amended"] = out["verdict"]  # no equivalence question: no "within the margin"
    out["note"] = ""
    return out


# The original study's four claims, judged from the re-run study's primary verdicts (book/analysis-plan.md fixes
# these rules before its data): claim -> how it reads the verdicts (batch size -> verdict) of each comparison.
CLAIMS = (
    "BRN(C) beats BN only at tiny batches",
    "BNRS converges much slower than BN",
    "BNWoS fails at batch 2",
    "BNWoS matches BN at larger batches",
)


def original_claims(
    comparisons: pd.DataFrame,
    plan: Plan = STUDY,
    dataset: str = "fashionmnist",
    family: str = "primary",
    plateau: pd.DataFrame | None = None,
    sizes: tuple[int, ...] | None = None,
) -> list[dict]:
    """Each claim's verdict -- "holds", "does not hold" or "cannot tell" -- and the verdicts it was read from. Only
    rows of ``family`` count: a comparison that is not primary (BN not plateaued, or not run) is read as missing.
    ``family="exploratory"`` reads the same rules off a dataset the plan leaves exploratory (labelled so).

    ``amended`` is each claim under the plan's amendment of 2026-12-07, shown beside the pre-registered verdict:
    "BNWoS matches BN" also holds where BNWoS is below or above BN *within the margin* (:func:`amended_verdict`);
    "BNRS converges much slower" is read by the plan's plateau criterion (from ``plateau``, the grid's plateau.csv):
    it holds where BNRS has not plateaued at a batch size where BN has, and does not hold where BNRS plateaued
    wherever BN did (it then converges to less, not slower). The other two claims read as pre-registered."""
    ours = comparisons[
        (comparisons.get("outcome") == "accuracy")
        & (comparisons.get("dataset") == dataset)
        & (comparisons.get("sampler") == "iid")
    ]
    rows = ours[ours.get("family") == family]
    run = {(r["comparison"], int(r["batch_size"])) for _, r in ours.iterrows()}
    sizes = sorted(sizes or {w["batch_size"] for w, _ in plan.primary})  # a grid without the plan: its own sizes
    tiny, larger = sizes[0], sizes[1:]
    got = {(r["comparison"], int(r["batch_size"])): r for _, r in rows.iterrows()}

    def v(method, b, column="verdict"):
        row = got.get((f"{method} - bn", b))
        if row is None:
            return None
        return row[column] if column in row and isinstance(row[column], str) else row["verdict"]

    def said(method: str, b: int, column: str = "verdict") -> str:
        row = got.get((f"{method} - bn", b))
        if row is None:
            return f"{method} at batch {b}: " + (f"not {family}" if (f"{method} - bn", b) in run else "not run yet")
        if all(c in row and pd.notna(row[c]) for c in ("mean", "ci_low", "ci_high")):
            return (
                f"{method} at batch {b}: {100 * row['mean']:+.1f} [{100 * row['ci_low']:+.1f}, "
                f"{100 * row['ci_high']:+.1f}] points, {v(method, b, column)}"
            )
        return f"{method} at batch {b}: {v(method, b, column)}"

    settled = ("below", "equivalent")

    def brn():
        if any(v(m, b) == "above" for m in ("brn", "brnc") for b in larger):
            return "does not hold"
        if any(v(m, tiny) == "above" for m in ("brn", "brnc")):
            return "holds"
        if all(v(m, tiny) in settled for m in ("brn", "brnc")):
            return "does not hold"
        return "cannot tell"

    def slower():
        found = [v("bnrs", b) for b in sizes]
        if any(x in ("equivalent", "above") for x in found):
            return "does not hold"
        return "holds" if all(x == "below" for x in found) else "cannot tell"

    def fails():
        x = v("bnwos", tiny)
        return "holds" if x == "below" else "does not hold" if x in ("equivalent", "above") else "cannot tell"

    def matches():
        found = [v("bnwos", b) for b in larger]
        if any(x in ("below", "above") for x in found):
            return "does not hold"
        return "holds" if all(x == "equivalent" for x in found) else "cannot tell"

    def matches_within_margin():
        found = [v("bnwos", b, "verdict_amended") for b in larger]
        if any(x in ("below", "above") for x in found):
            return "does not hold"
        close = ("equivalent", "below" + WITHIN_MARGIN, "above" + WITHIN_MARGIN)
        return "holds" if all(x in close for x in found) else "cannot tell"

    status = _plateau_status(plateau, dataset, sizes)

    def slower_by_plateau():
        gated = [b for b in sizes if status.get(("bn", b)) is True and ("bnrs", b) in status]
        if not gated:
            return "cannot tell"
        if all(status[("bnrs", b)] is False for b in gated):
            return "holds"
        return "does not hold" if all(status[("bnrs", b)] is True for b in gated) else "cannot tell"

    def plateau_said(b: int) -> str:
        words = {True: "plateaued", False: "not plateaued", None: "no plateau status"}
        return f"batch {b}: BNRS {words[status.get(('bnrs', b))]}, BN {words[status.get(('bn', b))]}"

    read = {
        CLAIMS[0]: [(m, b) for m in ("brn", "brnc") for b in sizes],
        CLAIMS[1]: [("bnrs", b) for b in sizes],
        CLAIMS[2]: [("bnwos", tiny)],
        CLAIMS[3]: [("bnwos", b) for b in larger],
    }
    pre_registered = dict(zip(CLAIMS, (brn, slower, fails, matches)))
    amended = dict(zip(CLAIMS, (brn, slower_by_plateau, fails, matches_within_margin)))
    out = []
    for claim in CLAIMS:
        evidence = "; ".join(said(m, b) for m, b in read[claim])
        out.append(
            {
                "claim": claim,
                "verdict": pre_registered[claim](),
                "evidence": evidence,
                "amended": amended[claim](),
                "amended_evidence": "; ".join(plateau_said(b) for b in sizes)
                if claim == CLAIMS[1]
                else "; ".join(said(m, b, "verdict_amended") for m, b in read[claim]),
            }
        )
    return out


def _plateau_status(plateau: pd.DataFrame | None, dataset: str, sizes) -> dict:
    """(method, batch size) -> whether it plateaued by the plan's criterion (plateau.csv), i.i.d. batches."""
    if plateau is None or plateau.empty:
        return {}
    part = plateau[(plateau["dataset"] == dataset) & (plateau["sampler"] == "iid")]
    part = part[part["batch_size"].isin(sizes)]
    return {(r.method, int(r.batch_size)): bool(r.plateaued) for r in part.itertuples()}
