"""The mechanism chapter: the 2x2 design's effects, the traces, the momentum sweep, the fixes and the one-class
reversal, each turned into the sentences of book/mechanism.md.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import methods
from ..plots import display_name
from .tables import comparison_row, layer_means
from .words import (
    BY_CONDITION,
    EFFECT_WORDS,
    SIMPLE_WORDS,
    condition_label,
    loss_interval,
    magnitude,
    multiple,
    optimisation_label,
    percent_interval,
    seed_count,
    verdict_points,
)


def plateau_answer(plateau: pd.DataFrame, by=BY_CONDITION) -> str:
    """BN's plateau per condition (``by``) by the plan's criterion, in one line (Markdown) from a grid's plateau.csv:
    whether it plateaued, the gain over the last quarter of training and its 95% upper bound, the seeds."""
    from .. import analysis

    keys, label = by
    bn = plateau[plateau["method"] == "bn"]
    return (
        "**BN's plateau** (the plan's criterion: the 95% upper bound of the gain over the last quarter below "
        f"{100 * analysis.PLATEAU_MARGIN:g} point): "
        + "; ".join(
            f"{label(r)}: {'plateaued' if r['plateaued'] else 'not plateaued'} "
            f"({100 * r['gain_last_quarter']:+.2f} points"
            + ("" if pd.isna(r["gain_ci_high"]) else f", upper bound {100 * r['gain_ci_high']:+.2f}")
            + f", {int(r['n_seeds'])} seed{'s' if r['n_seeds'] > 1 else ''})"
            for _, r in bn.iterrows()
        )
    )


def twobytwo(summary: pd.DataFrame, comparisons: pd.DataFrame, by=BY_CONDITION) -> pd.DataFrame:
    """Per condition (``by``: its keys and how to name it): the four corners' final accuracy (mean [95% t interval],
    %) and the three effects of the 2x2 on it (points [interval], verdict after the family's correction, the
    family)."""
    from .. import analysis

    keys, label = by
    s = summary.copy()
    s["method"] = s["method"].astype(str)
    rows = []
    for cond, part in s.groupby(list(keys), sort=False):
        row = {"condition": label(dict(zip(keys, cond)))}
        means = part.set_index("method")
        for m in analysis.CORNERS:
            if m in means.index:
                row[display_name(m)] = percent_interval(
                    means.loc[m, "mean"], means.loc[m, "ci_low"], means.loc[m, "ci_high"]
                )
        here = np.logical_and.reduce([comparisons[k] == v for k, v in zip(keys, cond)])
        eff = comparisons[here & (comparisons["outcome"] == "accuracy")].set_index("comparison")
        for name in analysis.EFFECTS:
            key = f"2x2: {name}"
            if key in eff.index:
                e = eff.loc[key]
                row[name] = (
                    f"{percent_interval(e['mean'], e['ci_low'], e['ci_high'], signed=True)} "
                    f"{e['verdict']} ({e['family']})"
                )
        rows.append(row)
    return pd.DataFrame(rows).set_index("condition")


def simple_effects(comparisons: pd.DataFrame, by=BY_CONDITION) -> pd.DataFrame:
    """Per condition (``by``): the interaction, the read-out the amended plan takes there (main effects where the
    interaction is equivalent to 0, else the simple effects) and the four simple effects of the 2x2 on the final
    accuracy (points [interval], verdict; their own Benjamini-Hochberg family)."""
    from .. import analysis

    keys, label = by
    acc = comparisons[comparisons["outcome"] == "accuracy"]
    readout = analysis.two_by_two_readout(acc)
    rows = []
    for _, r in readout.iterrows():
        cond = tuple(r[k] for k in keys)
        here = np.logical_and.reduce([acc[k] == v for k, v in zip(keys, cond)])
        eff = acc[here].set_index("comparison")
        row = {
            "condition": label(dict(zip(keys, cond))),
            "interaction": f"{percent_interval(r['mean'], r['ci_low'], r['ci_high'], signed=True)} {r['interaction']}",
            "read-out": r["readout"],
        }
        for name in analysis.SIMPLE_EFFECTS:
            if (key := f"2x2 simple: {name}") in eff.index:
                e = eff.loc[key]
                header = SIMPLE_WORDS[name[name.rindex("(") + 1 : -1]]  # by the contrast in its name
                row[header] = f"{percent_interval(e['mean'], e['ci_low'], e['ci_high'], signed=True)} {e['verdict']}"
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows).set_index("condition")
    return table.drop(columns="read-out") if table["read-out"].nunique() == 1 else table  # said once, in the prose


def twobytwo_answer(comparisons: pd.DataFrame, by=BY_CONDITION) -> str:
    """The 2x2's answer in words, condition by condition (``by``: its keys and how to name it): each effect on the
    final accuracy with its interval, its verdict and its family (Markdown; what the table beside it holds, read
    out)."""
    from .. import analysis

    said = {**EFFECT_WORDS, "interaction": "their interaction"}
    acc = comparisons[comparisons["comparison"].str.startswith("2x2") & (comparisons["outcome"] == "accuracy")]
    lines = []
    keys, label = by
    for cond, part in acc.groupby(list(keys), sort=False):
        eff = part.set_index("comparison")
        parts = [
            f"{said[name]} {verdict_points(e)}"
            for name in analysis.EFFECTS
            if (key := f"2x2: {name}") in eff.index
            for e in [eff.loc[key]]
        ]
        lines.append(f"- **{label(dict(zip(keys, cond)))}** ({seed_count(part)}): " + "; ".join(parts) + ".")
    return "\n".join(lines)


def robustness_answer(comparisons: pd.DataFrame) -> str:
    """Whether the 2x2's answer survives other optimisers and learning rates (Markdown, one line per effect): how
    many of the settings give each verdict on the final accuracy, and which settings disagree with the most common
    one."""
    from .. import analysis

    acc = comparisons[comparisons["comparison"].str.startswith("2x2") & (comparisons["outcome"] == "accuracy")]
    settings = acc[["optimizer", "lr"]].drop_duplicates()
    lines = []
    for name in analysis.EFFECTS:
        part = acc[acc["comparison"] == f"2x2: {name}"]
        if part.empty:
            continue
        counts = part["verdict"].value_counts()
        common = counts.index[0]
        others = [
            f"{r.verdict} with {optimisation_label(r._asdict())}" for r in part.itertuples() if r.verdict != common
        ]
        lines.append(
            f"- {name}: {common} in {counts.iloc[0]} of the {len(part)} settings"
            + (f" ({'; '.join(others)})" if others else "")
            + "."
        )
    return (f"Across the {len(settings)} optimiser settings:\n\n" + "\n".join(lines)) if lines else ""


def trace_answer(trace_summary: pd.DataFrame) -> str:
    """The traces of the 2x2's corners read out, condition by condition (Markdown): at the end of training, mean over
    seeds and the norm layers, BN's convolution weight norm (from its start), input RMS of the norm layers and gradient
    norm of the convolution weights, and the other corners' as multiples of BN's; and the gap between the batch's
    statistics and those used by the two running-statistics corners (what the figure shows, in numbers)."""
    lines = []
    first, last = layer_means(trace_summary, "first"), layer_means(trace_summary, "last")
    metrics = {
        "conv_weight_norm": "convolution weight norm",
        "input_rms": "input RMS",
        "conv_grad_norm": "gradient norm",
    }
    for (batch, sampler), part in last.groupby(level=["batch_size", "sampler"], sort=False):
        at = part.droplevel(["batch_size", "sampler"])
        if "bn" not in at.index:
            continue
        bn = at.loc["bn"]
        said = [
            f"BN's {metrics['conv_weight_norm']} {magnitude(first.loc[(batch, sampler, 'bn'), 'conv_weight_norm'])} "
            f"at the start, {magnitude(bn['conv_weight_norm'])} at the end, {metrics['input_rms']} "
            f"{magnitude(bn['input_rms'])}, "
            f"{metrics['conv_grad_norm']} {magnitude(bn['conv_grad_norm'])}"
        ]
        for m in [m for m in ("bn_detached", "bnrs", "brn") if m in at.index]:
            said.append(f"{methods.short(m)} " + ", ".join(f"{multiple(at.loc[m, k] / bn[k])}" for k in metrics))
        gap = ""
        if {"brn", "bnrs"} <= set(at.index):
            gap = (
                " The gap between the batch's statistics and those the layer normalised with (90th percentiles over "
                f"channels): |log r| {at.loc['brn', 'log_r_p90']:.2g} with BRN and {at.loc['bnrs', 'log_r_p90']:.2g} "
                f"with BNRS, |d| {at.loc['brn', 'd_p90']:.2g} and {at.loc['bnrs', 'd_p90']:.2g}."
            )
        n = int(bn["n_seeds"])
        lines.append(
            f"- **{condition_label({'batch_size': batch, 'sampler': sampler})}** ({n} seeds), at the end of "
            "training, mean over the norm layers: " + "; ".join(said) + " (weight norm, input RMS and gradient "
            "norm as multiples of BN's)." + gap
        )
    return "\n".join(lines)


def failure_answer(comparisons: pd.DataFrame) -> str:
    """Training failure or train/test mismatch, read out per condition (Markdown): for the 2x2's two main effects,
    the effect on the last training loss and on the accuracy after recomputing population statistics, and the reading
    their verdicts give: a higher loss with a lower accuracy is a failure to train; a lower accuracy without a higher
    loss is a train/test mismatch that recomputing does not undo; a lower loss with a higher accuracy trains better; a
    higher loss with a higher accuracy fits the training batches in a way that does not carry to the test set."""
    lines = []
    for (batch, sampler), _ in comparisons.groupby(["batch_size", "sampler"], sort=False):
        said = []
        for name, words in EFFECT_WORDS.items():
            loss = comparison_row(comparisons, f"2x2: {name}", batch, sampler, "training loss")
            acc = comparison_row(comparisons, f"2x2: {name}", batch, sampler, "recomputed accuracy")
            if loss is None or acc is None:
                continue
            reading = (
                "a failure to train"
                if loss["verdict"] == "above" and acc["verdict"] == "below"
                else "a train/test mismatch"
                if loss["verdict"] in ("below", "equivalent") and acc["verdict"] == "below"
                else "it trains better"
                if loss["verdict"] == "below" and acc["verdict"] == "above"
                else "a worse fit of the training batches that tests better: the lower loss did not carry to the test "
                "set"
                if loss["verdict"] == "above" and acc["verdict"] == "above"
                else "no reading (the verdicts do not fit one)"
            )
            change = loss_interval(loss["mean"], loss["ci_low"], loss["ci_high"], loss.get("n_seeds"))
            said.append(
                f"{words}: training loss {change} "
                f"({loss['verdict']}), accuracy with recomputed statistics {verdict_points(acc)} - {reading}"
            )
        if said:
            lines.append(
                f"- **{condition_label({'batch_size': batch, 'sampler': sampler})}**: " + "; ".join(said) + "."
            )
    return "\n".join(lines)


SPLIT = {"bn_detached_mean": "the variance's term only", "bn_detached_var": "the mean's term only"}  # kept


def split_answer(summary: pd.DataFrame, comparisons: pd.DataFrame) -> str:
    """Which statistic's gradient matters, read out per condition (Markdown): BN and bn_detached (gradient through both
    statistics, through neither), then each one-term variant with its accuracy, against bn_detached with its verdict,
    and how many of the points that leaving out both terms costs it wins back by keeping one."""
    lines = []
    for (batch, sampler), part in summary.groupby(["batch_size", "sampler"], sort=False):
        acc = part.assign(method=part["method"].astype(str)).set_index("method")["mean"]
        halves = [m for m in SPLIT if m in acc.index]
        if not halves or not {"bn", "bn_detached"} <= set(acc.index):
            continue
        lost = acc["bn"] - acc["bn_detached"]
        said = [
            f"BN {100 * acc['bn']:.1f}%, bn_detached {100 * acc['bn_detached']:.1f}% (leaving out both terms "
            + (f"costs {100 * lost:.1f} points)" if lost > 0 else f"gains {-100 * lost:.1f} points)")
        ]
        for m in halves:
            e = comparison_row(comparisons, f"{m} - bn_detached", batch, sampler)
            said.append(
                f"keeping {SPLIT[m]} ({m}) {100 * acc[m]:.1f}%"
                + (f", {verdict_points(e)} against bn_detached" if e else "")
                + (
                    f", winning back {100 * (acc[m] - acc['bn_detached']) / lost:.0f}% of those points"
                    if lost > 0
                    else ""
                )
            )
        read = part[part["method"].astype(str).isin(["bn", "bn_detached", *halves])]
        lines.append(
            f"- **{condition_label({'batch_size': batch, 'sampler': sampler})}** ({seed_count(read)}): "
            + "; ".join(said)
            + "."
        )
    return "\n".join(lines)


SWEEP = {m: methods.momentum(m) for m in methods.PANELS["BNRS's momentum"]}  # BNRS's arms and their momentum


def same_training(evaluations: pd.DataFrame, a: str, b: str, batch: int, sampler: str) -> tuple[int, int, float] | None:
    """Whether two methods trained the same network, judged where their inference statistics cannot differ: the final
    accuracy after recomputing population statistics, paired by seed. (seeds that agree to the image, seeds with
    both, the largest difference); None where no seed has both."""
    final = evaluations[
        evaluations["final"] & (evaluations["batch_size"] == batch) & (evaluations["sampler"] == sampler)
    ]
    acc = final.groupby(["seed", "method"])["test_acc_recomputed"].first().unstack("method")
    if a not in acc or b not in acc or not len(both := acc[[a, b]].dropna()):
        return None
    gap = (both[a] - both[b]).abs()
    return int((gap == 0).sum()), len(both), float(gap.max())


def sweep_answer(summary: pd.DataFrame, comparisons: pd.DataFrame, evaluations: pd.DataFrame | None = None) -> str:
    """The momentum sweep read out per condition (Markdown): BNRS's final accuracy at each momentum, each against the
    default 0.1 with its verdict, and the original's BNRS at momentum 1 against bn_detached (the plan expects
    equivalence: the same forward pass up to the variance's bias, no gradient through the statistics). With
    ``evaluations``: whether the two trained the same network (:func:`same_training`) - at momentum 1 the original
    keeps the last batch's statistics for inference, so the two can differ at test time alone."""
    lines = []
    for (batch, sampler), part in summary.groupby(["batch_size", "sampler"], sort=False):
        acc = part.assign(method=part["method"].astype(str)).set_index("method")
        swept = [m for m in SWEEP if m in acc.index and m != "bnrs"]
        if not swept:
            continue
        said = []
        for m in swept:
            e = comparison_row(comparisons, f"{m} - bnrs", batch, sampler)
            said.append(
                f"momentum {SWEEP[m]:g} {100 * acc.loc[m, 'mean']:.1f}% ({seed_count(acc.loc[[m]])})"
                + (f", {verdict_points(e)} against 0.1" if e else "")
            )
        if "bnrs" in acc.index:
            said.insert(
                sum(SWEEP[m] < 0.1 for m in swept),
                f"momentum 0.1 (BNRS) {100 * acc.loc['bnrs', 'mean']:.1f}% ({seed_count(acc.loc[['bnrs']])})",
            )
        orig = comparison_row(comparisons, "bnrs_orig_m100 - bn_detached", batch, sampler)
        tail = f" The original's BNRS at momentum 1 against bn_detached: {verdict_points(orig)}" if orig else ""
        if (
            orig
            and evaluations is not None
            and (same := same_training(evaluations, "bnrs_orig_m100", "bn_detached", batch, sampler))
        ):
            agree, n, largest = same
            tail += (
                f"; with recomputed population statistics the two get the same number of test images right in "
                f"{agree} of {n} seed{'s' if n > 1 else ''}"
            )
            tail += (
                ": what they train is the same, and the gap is in what momentum 1 keeps for inference, the last "
                "batch's statistics"
                if agree == n
                else f" (the largest difference {100 * largest:.2f} points)"
            )
        tail += "." if orig else ""
        lines.append(
            f"- **{condition_label({'batch_size': batch, 'sampler': sampler})}**: " + "; ".join(said) + "." + tail
        )
    return "\n".join(lines)


FIXES = ("brn", "online", "cbn")  # the methods built to make running statistics work in training


def fixes_answer(summary: pd.DataFrame, comparisons: pd.DataFrame, evaluations: pd.DataFrame) -> str:
    """What makes running statistics work, read out per condition (Markdown): each fix's final accuracy, against BNRS
    and against BN with verdicts, and its training time per step as a multiple of a reference's in the same cells
    (the same machine and batches; median over cells): BN's, or GroupNorm's where BN is not in its cells."""
    final = evaluations[evaluations["final"]]
    per_step = final.assign(per_step=final["train_seconds"] / final["steps_total"])

    def relative_cost(batch, sampler, method):
        here = per_step[(per_step["batch_size"] == batch) & (per_step["sampler"] == sampler)]

        def of(m):
            return here[here["method"] == m].set_index("cell")["per_step"]

        for ref in ("bn", "gn"):
            common = of(method).index.intersection(of(ref).index)
            if len(common):
                return (
                    f"{multiple((of(method)[common] / of(ref)[common]).median())} {methods.short(ref)}'s time per "
                    "step in its cells"
                )
        return ""

    lines = []
    for (batch, sampler), part in summary.groupby(["batch_size", "sampler"], sort=False):
        acc = part.assign(method=part["method"].astype(str)).set_index("method")
        fixes = [m for m in FIXES if m in acc.index]
        if not fixes:
            continue
        said = []
        for m in fixes:
            parts = [f"{methods.short(m)} {100 * acc.loc[m, 'mean']:.1f}%"]
            for base in ("bnrs", "bn"):
                if (e := comparison_row(comparisons, f"{m} - {base}", batch, sampler)) is not None:
                    parts.append(f"{verdict_points(e)} against {methods.short(base)}")
            if cost := relative_cost(batch, sampler, m):
                parts.append(cost)
            said.append(", ".join(parts))
        lines.append(f"- **{condition_label({'batch_size': batch, 'sampler': sampler})}**: " + "; ".join(said) + ".")
    return "\n".join(lines)


# Accounts of why running statistics fail or how to fix them, each checked against the mechanism grid by a rule: the
# comparison that tests it, and the verdicts that agree with it (the opposite ones contradict it; "cannot tell" and
# a missing comparison decide nothing).
TEXTBOOK = (
    {
        "account": "Normalising outside the gradient step lets the weights grow while the loss does not improve: "
        "training fails",
        "source": "Ioffe & Szegedy (2015), section 2; Ioffe (2017), section 2",
        "comparison": "2x2: gradient through the statistics (without - with)",
        "agrees": ("below",),
        "contradicts": ("equivalent", "above"),
        "grows": True,
    },
    {
        "account": "Running statistics lag the weights, and their stale values in the forward pass cost accuracy",
        "source": "Yao et al. (2021), the motivation of Cross-Iteration BN",
        "comparison": "2x2: forward statistics (running - batch)",
        "agrees": ("below",),
        "contradicts": ("equivalent", "above"),
    },
    {
        "account": "Batch Renormalization beats BN with small or non-i.i.d. batches",
        "source": "Ioffe (2017)",
        "comparison": "brn - bn",
        "agrees": ("above",),
        "contradicts": ("equivalent", "below"),
        "small_batches": 4,
    },
)


def textbook_checks(comparisons: pd.DataFrame, trace_summary: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each account of :data:`TEXTBOOK` against the data, per condition of the mechanism grid: the comparison that
    tests it (points, interval, verdict, family) and whether the data agree with it, contradict it or cannot tell.
    The account of growing weights also needs the traces: it agrees only where the corners without the gradient end
    with larger convolution weights than BN's. An account of small batches (``small_batches``: the largest) is read at
    those and at non-i.i.d. batches only."""
    last = layer_means(trace_summary, "last") if trace_summary is not None and len(trace_summary) else None
    rows = []
    for check in TEXTBOOK:
        for (batch, sampler), _ in comparisons.groupby(["batch_size", "sampler"], sort=False):
            e = comparison_row(comparisons, check["comparison"], batch, sampler)
            if e is None or (sampler == "iid" and batch > check.get("small_batches", batch)):
                continue  # not run, or not what the account speaks of
            reading = (
                "agrees"
                if e["verdict"] in check["agrees"]
                else "contradicts"
                if e["verdict"] in check["contradicts"]
                else "cannot tell"
            )
            data = f"{check['comparison']}: {verdict_points(e)}"
            if check.get("grows") and last is not None and (batch, sampler, "bn") in last.index:
                grown = {
                    m: last.loc[(batch, sampler, m), "conv_weight_norm"]
                    / last.loc[(batch, sampler, "bn"), "conv_weight_norm"]
                    for m in ("bn_detached", "bnrs")
                    if (batch, sampler, m) in last.index
                }
                data += "; weight norm at the end " + ", ".join(
                    f"{methods.short(m)} {multiple(x)} BN's" for m, x in grown.items()
                )
                if reading == "agrees" and not all(x > 1 for x in grown.values()):
                    reading = "cannot tell"
            rows.append(
                {
                    "account": check["account"],
                    "source": check["source"],
                    "condition": condition_label({"batch_size": batch, "sampler": sampler}),
                    "what the data say": data,
                    "the data": reading,
                }
            )
    return pd.DataFrame(rows, columns=["account", "source", "condition", "what the data say", "the data"])


def textbook_answer(checks: pd.DataFrame) -> str:
    """:func:`textbook_checks` as Markdown: each account with its source, then per condition what the data say and
    whether they agree with it, contradict it or cannot tell."""
    lines = []
    for (account, source), part in checks.groupby(["account", "source"], sort=False):
        lines.append(f"- **{account}** ({source}):")
        lines += [f"  - {r['condition']}: {r['what the data say']}: **{r['the data']}**." for _, r in part.iterrows()]
    return "\n".join(lines)
