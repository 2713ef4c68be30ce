"""The mechanism chapter's non-i.i.d. reversal: what one-class batches cost each method, where the current batch
enters it, the gap between a batch's statistics and the ones a layer normalises with, and one-class networks on
one-class test batches -- the sentences of book/mechanism.md's "The non-i.i.d. reversal".
"""

from __future__ import annotations

import pandas as pd

from .. import methods, stats
from .tables import comparison_row, layer_means
from .words import EFFECT_WORDS, condition_label, percent_interval, seed_count, verdict_points


def reversal_answer(
    summary: pd.DataFrame,
    recomputed: pd.DataFrame,
    training_loss: pd.DataFrame,
    comparisons: pd.DataFrame,
    sampler: str = "noniid",
    trace_summary: pd.DataFrame | None = None,
) -> str:
    """The non-i.i.d. reversal read out (Markdown): BNRS against BN where both images of a batch share a class, and
    for BN, BNRS and BRN there the last training loss beside the test accuracy with the layers' own and with
    recomputed population statistics -- a low training loss with a low test accuracy is a train/test mismatch,
    a high training loss a failure to train. With ``trace_summary``: how far a batch's statistics sit from the
    running ones over training (:func:`gap_sentence`)."""
    last = training_loss.sort_values("step").groupby(["cell", "method"]).tail(1)
    loss = last.groupby(["batch_size", "sampler", "method"])["train_loss"].mean()
    lines = []
    for batch, part in summary[summary["sampler"] == sampler].groupby("batch_size", sort=False):
        acc = part.assign(method=part["method"].astype(str)).set_index("method")
        rec = recomputed[(recomputed["sampler"] == sampler) & (recomputed["batch_size"] == batch)]
        rec = rec.assign(method=rec["method"].astype(str)).set_index("method")["mean"]
        e = comparison_row(comparisons, "bnrs - bn", batch, sampler)
        if e is None:
            continue
        said = [
            f"{methods.short(m)}: training loss {loss.get((batch, sampler, m), float('nan')):.2f}, test accuracy "
            f"{100 * acc.loc[m, 'mean']:.1f}% ({100 * rec.get(m, float('nan')):.1f}% with recomputed statistics)"
            for m in ("bn", "bnrs", "brn")
            if m in acc.index
        ]
        bn_loss, bnrs_loss = loss.get((batch, sampler, "bn")), loss.get((batch, sampler, "bnrs"))
        reading = ""
        if bn_loss is not None and bnrs_loss is not None and e["verdict"] == "above":
            reading = (
                " BN reaches the lower training loss and the lower test accuracy: it fits its training batches and "
                "fails on the test set, a train/test mismatch; recomputing population statistics does not "
                "rescue it."
                if bn_loss < bnrs_loss and rec.get("bn", 1.0) < rec.get("bnrs", 0.0)
                else " BN's training loss is not below BNRS's: BN fails to train here, not only to generalise."
            )
        gap = gap_sentence(trace_summary, batch, sampler) if trace_summary is not None and len(trace_summary) else ""
        lines.append(
            f"- **{condition_label({'batch_size': batch, 'sampler': sampler})}** ({int(e['n_seeds'])} seeds): "
            f"BNRS - BN {verdict_points(e)}. " + "; ".join(said) + "." + reading + (" " + gap if gap else "")
        )
    return "\n".join(lines)


def gap_sentence(trace_summary: pd.DataFrame, batch: int, sampler: str, method: str = "brn") -> str:
    """How far a batch's statistics sit from the running ones, at the first and the last trace, under ``sampler``
    and with i.i.d. batches of the same size: measured in BRN, which normalises with running statistics corrected
    to the batch's and so traces r = sigma_B / sigma_running and d = (mu_B - mu_running) / sigma_running in a network
    trained like BN (90th percentiles over channels, mean over the norm layers and seeds)."""
    ends = {phase: layer_means(trace_summary, phase) for phase in ("first", "last")}

    def at(s):
        key = (batch, s, method)
        if not all(key in f.index for f in ends.values()):
            return None
        first, last = ends["first"].loc[key], ends["last"].loc[key]
        return (
            f"|log r| {first['log_r_p90']:.2f} at the first trace and {last['log_r_p90']:.2f} at the last, |d| "
            f"{first['d_p90']:.2f} and {last['d_p90']:.2f}"
        )

    here, iid = at(sampler), at("iid") if sampler != "iid" else None
    if here is None:
        return ""
    return (
        "How far a batch's statistics sit from the running ones over training, measured in "
        f"{methods.short(method)} (its traced r = sigma_B / sigma_running and d, 90th percentiles over channels): "
        f"{here}" + (f"; with i.i.d. batches of {batch}: {iid}" if iid else "") + "."
    )


# Where the current batch's statistics enter a method in training: (its forward pass, its gradient). BRN (unclipped)
# normalises with the running statistics, as BNRS, and takes its gradient through the batch's; Online Norm takes its
# gradient through streaming estimates (its control process); CBN pools the current batch with earlier ones; GN's
# statistics are each image's own.
CURRENT_BATCH = {
    m.id: (m.forward_uses_batch, m.gradient_through_batch) for m in methods.TABLE if m.forward_uses_batch is not None
}


def one_class_answer(cost: pd.DataFrame) -> str:
    """What one-class batches cost each method, read out per batch size (Markdown) from
    :func:`bnlib.analysis.sampler_cost`: the methods they hurt and those they are not shown to hurt, each with its
    cost in points and verdict, and the 2x2's effects on that cost. Where every method of :data:`CURRENT_BATCH` is
    hurt exactly when the current batch enters its forward pass or its gradient, a last sentence says so (a rule
    written after the cells were seen: exploratory)."""
    lines = []
    for batch, part in cost.groupby("batch_size", sort=False):
        per = part[part["method"].notna()]

        def points(r):
            return f"{percent_interval(r['mean'], r['ci_low'], r['ci_high'], signed=True)} ({r['verdict']})"

        def said(rows):
            return ", ".join(f"{methods.short(r['method'])} {points(r)}" for _, r in rows.iterrows())

        hurt, spared = per[per["verdict"] == "below"], per[per["verdict"] != "below"]
        line = (
            f"- **Batch {batch}** ({seed_count(per)} per method), points of accuracy: one-class batches instead of "
            "i.i.d. ones cost "
            + (said(hurt) if len(hurt) else "no method accuracy")
            + "."
            + (f" They are not shown to hurt {said(spared)}." if len(spared) else "")
        )
        effect = part.set_index("comparison")
        effects = [
            f"{EFFECT_WORDS[name]} changes that cost by {points(effect.loc[f'2x2: {name}'])}"
            for name in EFFECT_WORDS
            if f"2x2: {name}" in effect.index
        ]
        line += (
            (" Across the 2x2's four corners (a positive change: a smaller cost), " + "; ".join(effects) + ".")
            if effects
            else ""
        )
        known = per[per["method"].isin(list(CURRENT_BATCH))]
        enters = known["method"].map(lambda m: any(CURRENT_BATCH[m]))
        if (
            len(known) == len(per)
            and enters.any()
            and (~enters).any()
            and ((known["verdict"] == "below") == enters).all()
        ):
            forward = [methods.short(m) for m in known.loc[enters, "method"] if CURRENT_BATCH[m][0]]
            gradient = [methods.short(m) for m in known.loc[enters, "method"] if not CURRENT_BATCH[m][0]]
            line += (
                " Read together (a grouping written after the cells were seen): one-class batches hurt every method "
                "here whose training uses the current batch's statistics, in its forward pass ("
                + ", ".join(forward)
                + ")"
                + (f" or only in its gradient ({', '.join(gradient)})" if gradient else "")
                + ", and none of those where the current batch enters neither ("
                + ", ".join(methods.short(m) for m in known.loc[~enters, "method"])
                + ")."
            )
        lines.append(line)
    return "\n".join(lines)


def batchstats_answer(evaluations: pd.DataFrame, gap: pd.DataFrame) -> str:
    """The check of the non-i.i.d. reversal read out per training sampler (Markdown): each method's final accuracy
    with its running statistics, with recomputed population statistics and with the statistics of test batches
    composed as its training batches were, and the last minus the first (:func:`bnlib.analysis.evaluation_gap`,
    with its verdict). Where BN trained on one-class batches is above with them, the reading the analysis plan
    wrote before the cells ran: what it learned works, and its loss is a mismatch between the statistics it
    trained with and those it is tested with; where it is not, that it failed to learn."""
    final = evaluations[evaluations["final"]]
    gap = gap.assign(outcome="accuracy")  # _effect reads a comparisons table; the gap is one in accuracy
    lines = []
    for sampler, part in final.groupby("sampler", sort=False):
        said = []
        for method, runs in part.groupby("method", sort=False):
            e = comparison_row(
                gap, f"{method}: test_acc_batchstats - test_acc", int(runs["batch_size"].iloc[0]), sampler
            )
            if e is None:
                continue

            def of(c):
                return percent_interval(runs[c].mean(), *stats.t_interval(runs[c].dropna()))

            said.append(
                f"{methods.short(method)}: accuracy (%) {of('test_acc')} with its running statistics, "
                f"{of('test_acc_recomputed')} with recomputed ones, {of('test_acc_batchstats')} with the test "
                f"batches' own, {percent_interval(e['mean'], e['ci_low'], e['ci_high'], signed=True)} points "
                f"({e['verdict']})"
            )
        if not said:
            continue
        batch = int(part["batch_size"].iloc[0])
        kind = "one-class" if sampler == "noniid" else "i.i.d."
        line = (
            f"- **Trained on {kind} batches of {batch}** ({seed_count(part, part.groupby('method')['seed'].nunique())}"
            f", tested on {kind} batches of {batch}): " + "; ".join(said) + "."
        )
        bn = comparison_row(gap, "bn: test_acc_batchstats - test_acc", batch, sampler)
        if sampler == "noniid" and bn is not None:
            line += {
                "above": " As the plan reads it: BN's network works with the statistics it trained with, and its "
                "loss with one-class batches is a mismatch between those statistics and the ones it is "
                "tested with, not a failure to learn.",
                "cannot tell": " As the plan reads it: cannot tell whether BN's network works with the statistics "
                "it trained with.",
            }.get(
                bn["verdict"],
                " As the plan reads it: BN's network does not "
                "work better even with the statistics it trained with: it failed to learn.",
            )
            with_own = part.loc[part["method"] == "bn", "test_acc_batchstats"].mean()
            iid = final.loc[(final["sampler"] == "iid") & (final["method"] == "bn"), "test_acc"]
            if bn["verdict"] == "above" and len(iid) and with_own > iid.max():
                line += (
                    f" Read after the cells were seen: its {100 * with_own:.1f}% is above BN trained and tested on "
                    f"i.i.d. batches here (at most {100 * iid.max():.1f}% in any seed), so a one-class batch's "
                    "statistics tell the network something about the class, and it uses that."
                )
        lines.append(line)
    return "\n".join(lines)
