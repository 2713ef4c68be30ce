"""The study's pages (intro, results, summary): the headline, the abstract, the answer and the summary tables, from
a grid's ``summary.csv``, ``analysis.csv`` and curves.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import analysis, methods, stats
from ..plots import display_name
from .original import PLANNED_CLAIMS
from .tables import headline_condition
from .words import (
    DATASET_NAMES,
    EFFECT_WORDS,
    adjusted_p,
    and_list,
    budget_words,
    condition_label,
    difference,
    percent_interval,
    pp,
    seed_count,
)

HEADLINE_METHODS = methods.HEADLINE  # the headline figure's (bnlib.methods)


def headline(summary: pd.DataFrame) -> dict:
    """The numbers of the one-paragraph answer (:func:`headline_condition`, smallest and largest batch)."""
    s = summary
    part = headline_condition(summary)
    dataset = str(part["dataset"].iloc[0])
    small, large = int(part["batch_size"].min()), int(part["batch_size"].max())
    family = int(s["p_value"].notna().sum()) if "p_value" in s else 0
    budget = budget_words(part)  # one per batch size (headline_condition)
    facts: dict = {
        "dataset": dataset,
        "dataset_name": DATASET_NAMES.get(dataset, dataset),
        "small": small,
        "large": large,
        "budget": budget,
        "seeds": seed_count(part),
        "family": family,
    }
    for size, tag in ((small, "small"), (large, "large")):
        rows = part[part["batch_size"] == size].set_index("method")
        if "bn" in rows.index:
            facts[f"bn_{tag}"] = pp(rows.loc["bn", "mean"])
            facts[f"bn_{tag}_low"], facts[f"bn_{tag}_high"] = (
                pp(rows.loc["bn", "ci_low"]),
                pp(rows.loc["bn", "ci_high"]),
            )
            bn = rows.loc["bn"]
            facts[f"bn_{tag}_text"] = percent_interval(
                bn["mean"], bn["ci_low"], bn["ci_high"], n=bn["n_seeds"], unit="%"
            )
        for m in rows.index:
            if m == "bn" or pd.isna(rows.loc[m, "diff_vs_bn"]):
                continue
            facts[f"{m}_{tag}_diff"] = pp(rows.loc[m, "diff_vs_bn"])
            facts[f"{m}_{tag}_text"] = difference(  # the one rendering the abstract, summary and README print
                rows.loc[m, "diff_vs_bn"],
                rows.loc[m, "diff_ci_low"],
                rows.loc[m, "diff_ci_high"],
                rows.loc[m, "n_pairs"],
            )
            facts[f"{m}_{tag}_low"], facts[f"{m}_{tag}_high"] = (
                pp(rows.loc[m, "diff_ci_low"]),
                pp(rows.loc[m, "diff_ci_high"]),
            )
            v = rows.loc[m, "verdict"] if "verdict" in rows else None
            facts[f"{m}_{tag}_verdict"] = v if isinstance(v, str) else "cannot tell"
            facts[f"{m}_{tag}_wins"] = (
                f"{int(rows.loc[m, 'wins'])} of {int(rows.loc[m, 'n_pairs'])}" if "wins" in rows else "–"
            )
            facts[f"{m}_{tag}_mean"] = pp(rows.loc[m, "mean"])
    return facts


def differences(facts: dict, method: str) -> str:
    """``method`` against BN at the smallest and the largest batch of :func:`headline`'s ``facts``, as the abstract
    and the README say it: '+2.8 points [+2.4, +3.2] at batch 2 (above) and ...'."""
    return " and ".join(
        f"{facts[f'{method}_{k}_text']} at batch {facts[k]} ({facts[f'{method}_{k}_verdict']})"
        for k in ("small", "large")
        if f"{method}_{k}_diff" in facts
    )


def plateau_sentence(folder: Path, part: pd.DataFrame) -> str:
    """Whether BN had finished training in the headline condition, by the analysis plan's criterion
    (``plateau.csv`` of the grid)."""
    path = folder / "plateau.csv"
    plateau = pd.read_csv(path) if path.exists() else pd.DataFrame()
    keys = [k for k in stats.CONDITION_KEYS if k in part and k in plateau]
    bn = plateau[plateau["method"] == "bn"].merge(part[keys].drop_duplicates(), on=keys) if len(plateau) else plateau
    assessed = bn[bn["n_seeds"] > 0] if len(bn) else bn
    if not len(assessed):
        return (
            f"These runs were evaluated too rarely to tell by the analysis plan's plateau criterion (needing "
            f"{2 * analysis.PLATEAU_WINDOW} evaluations) whether they finished training: the numbers describe this "
            "budget."
        )
    done = sorted(int(b) for b in assessed.loc[assessed["plateaued"].astype(bool), "batch_size"])
    not_done = sorted(int(b) for b in assessed.loc[~assessed["plateaued"].astype(bool), "batch_size"])
    # what the criterion shows, and no more: no gain over the last quarter of the run (its windows overlap, and at
    # batch 2 both follow the learning-rate drop), not that a longer run would gain nothing (the doubling control)
    bound = f"{100 * analysis.PLATEAU_MARGIN:g} point"
    return (
        "By the analysis plan's plateau criterion BN gained less than "
        f"{bound} over the last quarter of its run (the 95% upper bound) "
        + (f"at batch {and_list(map(str, done))}" if done else "at no batch size")
        + (f" and not at batch {and_list(map(str, not_done))}" if not_done else "")
        + "; whether a longer run gains more is the budget-doubling control's question."
    )


def convergence_table(speed: pd.DataFrame) -> pd.DataFrame:
    """One condition's rows of :func:`convergence` as the page shows them."""

    def steps(col):
        return speed[col].map(lambda v: "never" if pd.isna(v) else f"{int(v):,}")

    out = pd.DataFrame(
        {
            "method": speed["method"].map(display_name).to_numpy(),
            "level (%)": speed["level"].map(lambda v: f"{pp(v):.1f}").to_numpy(),
            "steps to BN's level": steps("steps_to_bn_level").to_numpy(),
            "images to BN's level": steps("images_to_bn_level").to_numpy(),
            "steps to its own level": steps("steps_to_own_level").to_numpy(),
            "images to its own level": steps("images_to_own_level").to_numpy(),
        }
    )
    if "plateaued" in speed:
        out["plateaued"] = speed["plateaued"].map({True: "yes", False: "no"}).fillna("–").to_numpy()
    return out


def convergence_sentence(speed: pd.DataFrame) -> str:
    """What one condition's :func:`convergence` rows say: when BN reaches its level, which methods never reach it
    (they converge to less, not slower) and which reach it later, and how many reach their own level only after
    the learning rate drops."""
    row = speed.iloc[0]
    bn = speed[speed["method"] == "bn"]
    if bn.empty:
        return "BN is not among these runs: no level to compare with."
    b, bn_steps = int(row["batch_size"]), bn["steps_to_bn_level"].iloc[0]
    text = [
        f"BN comes within {pp(analysis.PLATEAU_MARGIN):.0f} point of its level ({pp(bn['level'].iloc[0]):.1f}%) "
        f"after {int(bn_steps):,} steps ({int(bn_steps) * b:,} images)."
    ]
    others = speed[speed["method"] != "bn"]
    never = others[others["steps_to_bn_level"].isna()]
    later = others[others["steps_to_bn_level"].notna() & (others["steps_to_bn_level"] > bn_steps)]

    # names hold commas
    def names(frame):
        return "; ".join(display_name(m) for m in frame["method"])

    if len(never):
        text.append(
            f"{names(never)} never come{'s' if len(never) == 1 else ''} within it in "
            f"{int(row['steps_total']):,} steps: {'it ends' if len(never) == 1 else 'they end'} lower, at "
            f"a level {'it reaches' if len(never) == 1 else 'they reach'} by step "
            f"{int(never['steps_to_own_level'].max()):,} at the latest."
        )
    if len(later):
        later_steps = "; ".join(
            f"{display_name(m)} ({int(s):,} steps)" for m, s in zip(later["method"], later["steps_to_bn_level"])
        )
        text.append(f"Later than BN: {later_steps}.")
    if len(others) and not len(never) and not len(later):
        text.append("No method reaches it later than BN.")
    if row.get("lr_schedule") == "step":
        drop = round(float(row["lr_drop_at"]) * int(row["steps_total"]))
        after = int((speed["steps_to_own_level"] > drop).sum())
        reach = "reaches its own level" if after == 1 else "reach their own level"
        text.append(
            f"{after} of the {len(speed)} methods {reach} only after the learning rate drops (step {drop:,})"
            + (
                ", so with this schedule the step counts say more about the schedule than about the methods."
                if after > len(speed) / 2
                else "."
            )
        )
    return " ".join(text)


def _effect_said(row) -> str:
    return f"{difference(row['mean'], row['ci_low'], row['ci_high'], row.get('n_seeds'))} ({row['verdict']})"


def _simple_effects_said(simple: pd.DataFrame) -> tuple[str, dict]:
    """The four simple effects at one condition in words, and their verdicts by short name."""
    by = {name: simple.loc[f"2x2 simple: {name}"] for name in analysis.SIMPLE_EFFECTS}
    (fg, fn, gb, gr) = by.values()
    (fw, gw) = EFFECT_WORDS.values()
    text = (
        f"{gw} changes the final accuracy by {_effect_said(gb)} with batch statistics in the forward pass and "
        f"{_effect_said(gr)} with running ones; {fw} by {_effect_said(fg)} with the gradient and {_effect_said(fn)} "
        "without it"
    )
    return text, {
        "forward with": fg["verdict"],
        "forward without": fn["verdict"],
        "gradient batch": gb["verdict"],
        "gradient running": gr["verdict"],
    }


def why_sentence(comparisons: pd.DataFrame) -> str:
    """The mechanism grid's answer for the abstract, from its 2x2 on the final accuracy. At each condition where the
    2x2's effects are primary: the two main effects where the interaction is negligible (or not measured), else --
    the amended read-out (:func:`bnlib.analysis.two_by_two_readout`) -- the four simple effects, each factor at each
    level of the other. Then the one-class batches, where the picture differs, labelled exploratory. A conclusion is
    drawn only where every primary condition agrees ('' where the grid has no primary 2x2 effect)."""
    acc = comparisons[comparisons["outcome"] == "accuracy"]
    primary = acc[acc["family"] == "primary"]
    readout = analysis.two_by_two_readout(acc) if "2x2: interaction" in set(acc["comparison"]) else pd.DataFrame()
    interacting = {
        (int(r["batch_size"]), r["sampler"]) for _, r in readout.iterrows() if r["readout"] == "simple effects"
    }
    effects = {name: [] for name in EFFECT_WORDS}
    simple_said, causes = [], set()
    for (batch, sampler), part in primary.groupby(["batch_size", "sampler"], sort=False):
        eff = part.set_index("comparison")
        if not all(f"2x2: {name}" in eff.index for name in EFFECT_WORDS):
            continue
        label = condition_label({"batch_size": batch, "sampler": sampler})
        here = acc[(acc["batch_size"] == batch) & (acc["sampler"] == sampler)].set_index("comparison")
        if (int(batch), sampler) in interacting and set(analysis.SIMPLE) <= set(here.index):
            said, v = _simple_effects_said(here)
            inter = here.loc["2x2: interaction"]
            how = (
                "the two factors interact"
                if inter["verdict"] in ("above", "below")
                else "an interaction is not ruled out"
            )
            inter_said = f"{difference(inter['mean'], inter['ci_low'], inter['ci_high'], inter.get('n_seeds'))}"
            simple_said.append(f"at {label}, where {how} (interaction {inter_said}, {inter['verdict']}), {said}")
            gradient = v["gradient batch"] == "below" and v["gradient running"] == "below"
            forward_kept = v["forward with"] in ("equivalent", "above")
            causes.add("gradient" if gradient and forward_kept else "gradient only" if gradient else "other")
            continue
        for name in EFFECT_WORDS:
            e = eff.loc[f"2x2: {name}"]
            effects[name].append(
                f"{percent_interval(e['mean'], e['ci_low'], e['ci_high'], signed=True)} points at {label} "
                f"({e['verdict']})"
            )
        forward, gradient = (eff.loc[f"2x2: {name}", "verdict"] for name in EFFECT_WORDS)
        causes.add("gradient" if gradient == "below" and forward in ("equivalent", "above") else "other")
    if not causes:
        return ""
    text = "Why, from a pre-registered 2x2 ablation: "
    parts = []
    if any(effects.values()):
        (fw, forward), (gw, gradient) = ((EFFECT_WORDS[name], " and ".join(said)) for name, said in effects.items())
        parts.append(
            f"(each effect averaged over the other factor) {fw} changes the final accuracy by {forward}; "
            f"{gw} by {gradient}"
        )
    parts += simple_said
    text += "; ".join(parts) + "."
    if causes == {"gradient"}:
        text += (
            " The accuracy is lost by leaving out the normalising backward pass, not by normalising with running "
            "statistics."
        )
    elif causes <= {"gradient", "gradient only"}:
        text += " Leaving out the normalising backward pass loses accuracy whichever statistics the forward pass uses."
    one_class = acc[(acc["sampler"] == "noniid") & (acc.get("classes_per_batch") == 1)]
    for batch, part in one_class.groupby("batch_size"):
        here = part.set_index("comparison")
        if not set(analysis.SIMPLE) <= set(here.index):
            continue
        said, v = _simple_effects_said(here)
        plateau_note = (
            "BN had not plateaued there" if here["note"].fillna("").str.contains("not plateaued").any() else ""
        )
        label = f"one-class batches of {int(batch)}"
        turn = (
            "the picture reverses" if v["forward with"] == "above" and v["forward without"] == "above" else "it differs"
        )
        text += f" With {label} ({'; '.join(filter(None, ['exploratory', plateau_note]))}) {turn}: {said}."
    return text


def correction_sentence(summary: pd.DataFrame) -> str:
    """How the verdicts of ``summary`` were reached: the pre-registered plan's families where the grid has one (the
    summary carries ``family``), else Holm over every comparison with BN."""
    if "family" not in summary:
        n = int(summary["p_value"].notna().sum()) if "p_value" in summary else 0
        return f"verdicts are paired t-tests at 5%, Holm-corrected over the grid's {n} comparisons with BN."
    primary = int((summary["family"] == "primary").sum())
    exploratory = int((summary["family"] == "exploratory").sum())
    return (
        f"verdicts are paired t-tests at 5% under the pre-registered analysis plan: Holm over its {primary} primary "
        f'comparisons with BN here, Benjamini-Hochberg over the {exploratory} exploratory ones; "equivalent" where '
        f"two one-sided tests put the difference within ±{100 * analysis.MARGIN:g} point."
    )


def questions_preamble(summary: pd.DataFrame) -> str:
    """The Results page's note on how its questions are answered: on which condition, and by which verdict rule
    (:func:`correction_sentence`)."""
    planned = "family" in summary
    budget = (
        "each batch size trained until BN plateaued, by the analysis plan's criterion"
        if planned
        else "the equal-samples budget"
    )
    return (
        f"Each question on the condition the book's answer is told on (the grid's harder dataset, the original "
        f"network, {budget}): a figure, the verdict in a sentence, and the numbers. Every difference is paired by "
        f"seed against BN with its Student-t 95% interval; the "
        + correction_sentence(summary)
        + " Readings across batch sizes or samplers compare intervals by eye and are exploratory."
    )


def claims_preamble(summary: pd.DataFrame) -> str:
    """How the original's claims are judged on this grid: by the re-run study's plan (its primary verdicts), or
    under the original's equal-steps budget from the paired intervals."""
    if "family" in summary:
        return PLANNED_CLAIMS + " The evidence is on [The original study, side by side](original.md):"
    return (
        "Judged under the original's budget (the same number of steps at every batch size) on "
        "[The original study, side by side](original.md):"
    )


def intro_design(summary: pd.DataFrame) -> dict[str, str]:
    """The intro's words (glued) on how this grid tests and what budget it trains for."""
    if "family" in summary:
        return {
            "design_tests": "paired t-tests under a pre-registered analysis plan (Holm over its primary "
            "comparisons, Benjamini-Hochberg over the exploratory ones, an equivalence test where "
            'the claim is "no difference")',
            "design_budget": f"every batch size trained until BN's test accuracy has plateaued by a stated "
            f"criterion ({budget_words(headline_condition(summary))} on {DATASET_NAMES['fashionmnist']}), where the "
            f"original's 10,001 steps at every batch size gave batch 2 1/64 of the images batch "
            f"128 saw",
        }
    return {
        "design_tests": "paired t-tests corrected for the number of comparisons (Holm)",
        "design_budget": "an equal budget of *samples* at every batch size, removing the original's confound in "
        "which batch 2 saw 1/64 of the images batch 128 saw",
    }


def versus_bn(part: pd.DataFrame, methods) -> pd.DataFrame:
    """A compact table of one condition: per method present and batch size, the paired difference against BN
    (points, 95% t interval), the Holm verdict, the Holm-adjusted p and the seeds in which it beat BN."""
    rows = []
    for m in [m for m in methods if m in set(part["method"].astype(str)) and m != "bn"]:
        for r in part[part["method"].astype(str) == m].sort_values("batch_size").itertuples():
            rows.append(
                {
                    "method": display_name(m),
                    "batch": int(r.batch_size),
                    "vs BN (points)": percent_interval(
                        r.diff_vs_bn, r.diff_ci_low, r.diff_ci_high, signed=True, n=r.n_pairs
                    ),
                    "verdict": r.verdict if isinstance(r.verdict, str) else "cannot tell",
                    **_amended(r),
                    **adjusted_p(r),
                    "wins": f"{int(r.wins)}/{int(r.n_pairs)}" if not pd.isna(r.wins) else "–",
                }
            )
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows).set_index(["method", "batch"])
    amended = f"amended {analysis.AMENDED}"
    if amended in table and (table[amended] == table["verdict"]).all():
        table = table.drop(columns=amended)  # the amendment reads every row as the plan did: one column
    return table


def _amended(row) -> dict:
    """The amended verdict (plan amendment of 2026-12-07: "below, within the margin") where the summary has one."""
    said = getattr(row, "verdict_amended", None)
    return {f"amended {analysis.AMENDED}": said} if isinstance(said, str) else {}


def verdict_sentence(part: pd.DataFrame, method: str) -> str:
    """One method against BN in one condition, every batch size: difference, interval, verdict."""
    rows = part[part["method"].astype(str) == method].sort_values("batch_size")

    def verdicts(r) -> str:
        said = r.verdict if isinstance(r.verdict, str) else "cannot tell"
        amended = getattr(r, "verdict_amended", None)
        return said + (f"; amended: {amended}" if isinstance(amended, str) and amended != said else "")

    said = [
        f"{percent_interval(r.diff_vs_bn, r.diff_ci_low, r.diff_ci_high, signed=True)} points at batch "
        f"{int(r.batch_size)} ({verdicts(r)})"
        for r in rows.itertuples()
        if not pd.isna(r.diff_vs_bn)
    ]
    return f"{display_name(method)} against BN: " + ("; ".join(said) if said else "not run in this condition") + "."


def advice(summary: pd.DataFrame) -> pd.DataFrame:
    """What to use, condition by condition (sampler x batch size of the headline dataset and budget): the methods
    the data put above BN (else BN), those they put below it by more than the margin, those within the margin of it
    (equivalent, or below/above within the margin by the plan's amendment where the summary has it) and how many
    they cannot tell from BN; the ablation and intervention arms (:data:`bnlib.methods.ABLATIONS`) are not methods
    to use."""
    rows = []
    for sampler in sorted(summary["sampler"].unique()):
        part = headline_condition(summary, sampler)
        for size, g in part.groupby("batch_size"):
            g = g[(g["method"] != "bn") & ~g["method"].isin(methods.ABLATIONS)]  # methods one could use
            column = "verdict_amended" if "verdict_amended" in g else "verdict"
            verdicts = (
                g[column]
                .fillna("cannot tell")
                .replace({"below, within the margin": "equivalent", "above, within the margin": "equivalent"})
            )

            def names(v):
                return ", ".join(display_name(m) for m in g.loc[verdicts == v, "method"]) or "none"

            rows.append(
                {
                    "batches": f"{'i.i.d.' if sampler == 'iid' else 'non-i.i.d.'}, {int(size)}",
                    "use (above BN)": names("above") if (verdicts == "above").any() else "BN: nothing is above it",
                    "avoid (below BN)": names("below"),
                    "as good as BN (within the margin)": names("equivalent"),
                    "cannot tell from BN": int((verdicts == "cannot tell").sum()),
                }
            )
    return pd.DataFrame(rows).set_index("batches")


def summary_tables(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Per condition (dataset, sampler, budget, ...): a row per method and batch size with the final accuracy in %
    and its 95% interval, the paired difference against BN in points with its interval, the verdict, the
    Holm-adjusted p-value and the seeds in which the method beat BN, each in its own column (narrow enough for
    the book's column)."""
    s = summary.copy()
    s["method"] = s["method"].astype(str)
    keys = [k for k in ("dataset", "budget", "sampler", "norm_placement", "classes_per_batch") if k in s]
    keys = [k for k in keys if k in ("dataset", "sampler") or s[k].nunique(dropna=False) > 1]
    if "budget" in keys and s.groupby(["dataset", "batch_size"])["budget"].nunique().max() == 1:
        keys.remove("budget")  # each batch size its own budget (trained to a plateau): the title says them all
    order = {m: i for i, m in enumerate(methods.METHODS)}
    out = []
    for cond, part in s.groupby([k for k in keys if k != "classes_per_batch"], dropna=False, sort=True):
        cond = cond if isinstance(cond, tuple) else (cond,)
        said = dict(zip([k for k in keys if k != "classes_per_batch"], cond))
        if "budget" not in keys:
            said["budget"] = budget_words(part)
        named = {
            "dataset": DATASET_NAMES.get(said.pop("dataset"), "?"),
            "sampler": "i.i.d. batches" if said.pop("sampler") == "iid" else "non-i.i.d. batches",
        }
        classes = part["classes_per_batch"].dropna().unique() if "classes_per_batch" in part else []
        if len(classes) == 1:
            named["sampler"] += f" of {int(classes[0])} class" + ("es" if classes[0] != 1 else "")
        title = ", ".join([*named.values(), *(f"{k.replace('_', ' ')} {v}" for k, v in said.items())])
        typical = int(part["n_seeds"].mode().max())  # the title's seed count; a row with another says its own
        rows = []
        for r in part.sort_values(
            ["method", "batch_size"], key=lambda c: c.map(order) if c.name == "method" else c
        ).itertuples():
            compared = r.method != "bn" and isinstance(getattr(r, "verdict", None), str)
            accuracy = percent_interval(r.mean, r.ci_low, r.ci_high, n=r.n_seeds)  # says n where no interval
            if r.n_seeds != typical and "(n = " not in accuracy:  # and wherever it differs from the title's
                accuracy += f" (n = {int(r.n_seeds)})"
            if r.diverged:
                accuracy += f" ({r.diverged} diverged)"
            rows.append(
                {
                    "method": display_name(r.method),
                    "batch": int(r.batch_size),
                    "accuracy (%)": accuracy,
                    "vs BN (points)": percent_interval(
                        r.diff_vs_bn, r.diff_ci_low, r.diff_ci_high, signed=True, n=r.n_pairs
                    )
                    if compared
                    else "",
                    "verdict": r.verdict if compared else "",
                    **({k: v if compared else "" for k, v in adjusted_p(r).items()}),
                    "wins": f"{int(r.wins)}/{int(r.n_pairs)}" if compared else "",
                }
            )
        seeds = f"{typical} seeds" + ("" if (part["n_seeds"] == typical).all() else ", n where a row has another")
        out.append((f"{title} ({seeds})", pd.DataFrame(rows).set_index(["method", "batch"])))
    return out
