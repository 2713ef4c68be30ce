"""The study's answer as the intro and the Summary tell it by hand: the numbers they glue (:func:`facts`), the key
numbers' table, and the claims their sentences make, each a rule on those numbers (:data:`CLAIMS`). A page states
a claim in its own words and calls :func:`check` in a hidden cell beside it, so the build fails when the tables
stop supporting the sentence (:mod:`.guards`).

Two regimes. With i.i.d. batches (the pre-registered primary comparisons) BNRS loses to BN at every batch size, and
the mechanism grid's 2x2 says why: the normalising backward pass is left out. With one-class batches of 2
(exploratory: BN had not plateaued there) the order reverses: BN's batch statistics in training are one class's,
its running statistics at inference are every class's, and the methods that normalise with running statistics or
none at all beat it.
"""

from __future__ import annotations

from typing import Callable

import pandas as pd

from .. import analysis
from .guards import guard
from .study import headline
from .tables import BATCHSTATS_GRID, Tables, headline_condition, mechanism_tables, tables
from .words import and_list, difference, percent_interval, pp

ANSWER_METHODS = ("bnrs", "brn", "gn")  # the methods the answer names against BN
# the 2x2's simple effects (bnlib.analysis.SIMPLE) by the names the prose's glue keys use
SIMPLE_KEYS = dict(
    zip(analysis.SIMPLE, ("running_with", "running_without", "no_backward_batch", "no_backward_running"))
)
SMALL_SHARE = 0.1  # "a tenth or less": running statistics with the backward pass kept, against leaving it out
NEARLY_ALL = 0.9  # "BRN wins back nearly all of BNRS's loss": at least this share of it, at every i.i.d. batch size


# what the intro and the Summary glue: a condition or method the grid has not run reads as a dash, never an unknown
# glue key (which fails a strict build of another grid's book)
GLUED = (
    "dataset_name", "budget", "seeds", "small", "large",
    *(f"{m}_{k}_text" for m in ANSWER_METHODS for k in ("small", "large")),
    "oc_batch", "oc_bn_text", *(f"oc_{m}_text" for m in ANSWER_METHODS), "oc_bn_own_stats_text",
    "brn_won_min", "no_backward_at", "no_backward_at_text", "ablation_sizes",
    *(f"{key}_{b}_text" for key in ("running_with", "no_backward_batch", "no_backward_running") for b in (2, 16)),
)  # fmt: skip


def one_class(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary rows of one-class batches at the smallest batch size with them (empty where the grid has none)."""
    if "classes_per_batch" not in summary or not (summary["sampler"] == "noniid").any():
        return summary.iloc[0:0]
    part = headline_condition(summary, "noniid")
    part = part[part["classes_per_batch"] == 1]
    return part[part["batch_size"] == part["batch_size"].min()] if len(part) else part


def facts(t: Tables, mechanism: pd.DataFrame | None = None, batchstats: pd.DataFrame | None = None) -> dict:
    """Every number the answer's sentences glue, and the verdicts its claims read: :func:`.study.headline`'s
    (i.i.d. batches, smallest and largest batch), each answer method's verdict at every i.i.d. batch size, the
    one-class condition's (``oc_*``), BN's plateau status, the 2x2's simple effects from the mechanism grid's
    ``analysis.csv`` (``mechanism``), and BN's one-class accuracy with test-batch statistics (``batchstats``, the
    check's ``summary_batchstats.csv``)."""
    f = headline(t.summary)
    iid = headline_condition(t.summary).set_index(["method", "batch_size"])
    f["iid_verdicts"] = {
        m: {int(b): str(iid.loc[(m, b), "verdict"]) for (mm, b) in iid.index if mm == m} for m in ANSWER_METHODS
    }
    f["iid_diffs"] = {
        m: {int(b): float(iid.loc[(m, b), "diff_vs_bn"]) for (mm, b) in iid.index if mm == m} for m in ANSWER_METHODS
    }
    bnrs, brn = f["iid_diffs"]["bnrs"], f["iid_diffs"]["brn"]
    # the share of BNRS's loss that BRN wins back at each i.i.d. batch size (where BNRS lost), and the least of them
    f["brn_won"] = {b: 1 - brn[b] / d for b, d in bnrs.items() if d < 0 and b in brn}
    if f["brn_won"]:
        f["brn_won_min"] = int(100 * min(f["brn_won"].values()))  # whole percent, rounded down
    plateau = t.plateau if t.plateau is not None else pd.DataFrame(columns=["method", "sampler", "plateaued"])
    bn_plateau = plateau[plateau["method"] == "bn"]
    f["bn_plateaued_iid"] = {
        int(r.batch_size): bool(r.plateaued) for r in bn_plateau[bn_plateau["sampler"] == "iid"].itertuples()
    }
    one = one_class(t.summary).set_index("method")
    if "bn" in one.index:
        size = int(one["batch_size"].iloc[0])
        bn = one.loc["bn"]
        f.update(
            oc_batch=size,
            oc_bn=pp(bn["mean"]),
            oc_bn_text=percent_interval(bn["mean"], bn["ci_low"], bn["ci_high"], n=bn["n_seeds"], unit="%"),
        )
        f["oc_verdicts"] = {m: str(one.loc[m, "verdict"]) for m in one.index if m != "bn"}
        for m in one.index.drop("bn"):
            r = one.loc[m]
            f[f"oc_{m}_text"] = difference(r["diff_vs_bn"], r["diff_ci_low"], r["diff_ci_high"], r["n_pairs"])
            f[f"oc_{m}_diff"] = pp(r["diff_vs_bn"])
        oc_plateau = bn_plateau[(bn_plateau["sampler"] == "noniid") & (bn_plateau["batch_size"] == size)]
        if "classes_per_batch" in oc_plateau:
            oc_plateau = oc_plateau[oc_plateau["classes_per_batch"] == 1]
        f["oc_bn_plateaued"] = bool(oc_plateau["plateaued"].all()) if len(oc_plateau) else None
    if batchstats is not None and "oc_batch" in f:
        own = batchstats[
            (batchstats["method"] == "bn")
            & (batchstats["sampler"] == "noniid")
            & (batchstats["batch_size"] == f["oc_batch"])
        ]
        if len(own):
            r = own.iloc[0]
            f["oc_bn_own_stats"] = pp(r["mean"])
            f["oc_bn_own_stats_text"] = percent_interval(r["mean"], r["ci_low"], r["ci_high"], n=r["n_seeds"], unit="%")
    if mechanism is not None:  # the 2x2's four simple effects at each i.i.d. condition, by short name
        acc = mechanism[(mechanism["outcome"] == "accuracy") & (mechanism["sampler"] == "iid")]
        f["simple"] = {}
        for r in acc[acc["comparison"].isin(SIMPLE_KEYS)].itertuples():
            key, b = SIMPLE_KEYS[r.comparison], int(r.batch_size)
            f["simple"].setdefault(b, {})[key] = (r.verdict, r.mean)
            f[f"{key}_{b}_text"] = difference(r.mean, r.ci_low, r.ci_high, r.n_seeds)
        # the prose quotes the largest batch size of the 2x2, where BN's forward pass is least noisy
        if f["simple"]:
            f["ablation_sizes"] = and_list(str(b) for b in sorted(f["simple"]))
            at = max(f["simple"])
            f["no_backward_at"], f["no_backward_at_text"] = at, f.get(f"no_backward_batch_{at}_text", "–")
    for key in GLUED:
        f.setdefault(key, "–")
    return f


def page_facts(t: Tables | None = None) -> dict:
    """:func:`facts` as a page reads them: the grid shown (``t``, default the published one), the mechanism grid's
    comparisons and the one-class check's test-batch statistics, each where it is committed; every number glued
    into the page (myst-nb's glue, under its key)."""
    from myst_nb import glue

    t = t or tables()
    mechanism, checked = mechanism_tables(), mechanism_tables(grid=BATCHSTATS_GRID)
    comparisons = mechanism.folder / "analysis.csv" if mechanism else None
    f = facts(
        t,
        pd.read_csv(comparisons) if comparisons is not None and comparisons.exists() else None,
        checked.summary_batchstats if checked else None,
    )
    for key, value in f.items():
        if isinstance(value, (str, int, float)):
            glue(key, value, display=False)
    return f


def key_numbers(f: dict) -> pd.DataFrame:
    """The intro's small table: BN's accuracy and each answer method's difference from it, at the smallest and
    largest i.i.d. batch and with one-class batches."""
    columns = {
        f"i.i.d., batch {f['small']}": "small",
        f"i.i.d., batch {f['large']}": "large",
    }
    if "oc_batch" in f:
        columns[f"one class, batch {f['oc_batch']}"] = "oc"
    names = {
        "bn": "BN (accuracy)",
        "bnrs": "BNRS (points vs BN)",
        "brn": "BRN (points vs BN)",
        "gn": "GroupNorm (points vs BN)",
    }

    def cell(m: str, k: str) -> str:
        if k == "oc":
            key = "oc_bn_text" if m == "bn" else f"oc_{m}_text"
        else:
            key = f"bn_{k}_text" if m == "bn" else f"{m}_{k}_text"
        return f.get(key, "–").replace(" points", "")

    return pd.DataFrame({c: {names[m]: cell(m, k) for m in ("bn", *ANSWER_METHODS)} for c, k in columns.items()})


def _bnrs_below(f):
    v = f["iid_verdicts"]["bnrs"]
    return bool(v) and all(x == "below" for x in v.values()), f"BNRS's verdicts by batch size {v}"


def _brn_nearly_all(f):
    won = f["brn_won"]
    shares = {b: round(w, 3) for b, w in won.items()}
    return (
        bool(won) and len(won) == len(f["iid_diffs"]["bnrs"]) and all(w >= NEARLY_ALL for w in won.values()),
        f"share of BNRS's loss BRN wins back by batch size {shares}, needed >= {NEARLY_ALL}",
    )


def _no_backward_costs(f):
    seen = {
        b: {k: v[k][0] for k in ("no_backward_batch", "no_backward_running") if k in v}
        for b, v in f.get("simple", {}).items()
    }
    return (
        bool(seen)
        and all(
            v.get("no_backward_batch") == "below" and v.get("no_backward_running") == "below" for v in seen.values()
        ),
        f"2x2 simple effects of leaving out the normalising backward pass {seen}",
    )


def _running_costs_little(f):
    ratio = {
        b: abs(v["running_with"][1]) / abs(v["no_backward_batch"][1])
        for b, v in f.get("simple", {}).items()
        if "running_with" in v and "no_backward_batch" in v
    }
    return (
        bool(ratio) and all(x <= SMALL_SHARE for x in ratio.values()),
        f"|BRN - BN| over |bn_detached - BN| by batch size { ({b: round(x, 3) for b, x in ratio.items()}) }, "
        f"needed <= {SMALL_SHARE}",
    )


def _gn_above_small(f):
    v = f["iid_verdicts"]["gn"].get(f["small"])
    return v == "above", f"GroupNorm against BN at batch {f['small']}: {v}"


def _bn_plateaued_iid(f):
    seen = f["bn_plateaued_iid"]
    return bool(seen) and all(seen.values()), f"BN plateaued by batch size {seen}"


def _one_class_reverses(f):
    v = {m: f.get("oc_verdicts", {}).get(m) for m in ANSWER_METHODS}
    return (
        all(x == "above" for x in v.values()),
        f"one-class verdicts against BN {v}",
    )


def _bn_not_plateaued_one_class(f):
    return f.get("oc_bn_plateaued") is False, f"BN plateaued with one-class batches: {f.get('oc_bn_plateaued')}"


def _own_statistics_recover(f):
    own, running = f.get("oc_bn_own_stats"), f.get("oc_bn")
    return (
        own is not None and running is not None and own > running,
        f"BN on one-class batches: {running} with running statistics, {own} with the test batches' own",
    )


# claim -> rule on :func:`facts` (holds, the numbers it read); the pages' sentences name these
CLAIMS: dict[str, Callable[[dict], tuple[bool, str]]] = {
    "BNRS is below BN at every i.i.d. batch size": _bnrs_below,
    "BRN wins back nearly all of BNRS's loss": _brn_nearly_all,
    "leaving out the normalising backward pass costs accuracy with either statistics": _no_backward_costs,
    "running statistics, backward pass kept, cost a tenth of leaving it out or less": _running_costs_little,
    "GroupNorm is above BN at the smallest i.i.d. batch": _gn_above_small,
    "BN plateaued at every i.i.d. batch size": _bn_plateaued_iid,
    "with one-class batches BNRS, BRN and GroupNorm beat BN": _one_class_reverses,
    "BN had not plateaued with one-class batches": _bn_not_plateaued_one_class,
    "one-class BN networks work with the test batches' own statistics": _own_statistics_recover,
}


# The answer in three sentences, as the intro opens and the README tells it: hand-written, the numbers filled in
# from :func:`facts`; the claims it makes are :data:`IN_SHORT_CLAIMS` (the intro checks them beside it)
IN_SHORT = (
    "**Because with i.i.d. batches it makes training worse, whatever their size.** The final accuracy of "
    "normalising with running statistics in training (BNRS) differs from BN's by {bnrs_small_text} at batch {small} "
    "and {bnrs_large_text} at batch {large}. What costs the accuracy is not the running statistics but the backward "
    "pass that goes with them: Batch Renormalization normalises with the same running statistics, keeps BN's gradient "
    "through the batch's mean and variance, and wins back nearly all of the loss (the ablation that separates the two "
    "ran at batches {ablation_sizes}). The exception is a batch that holds one class: there BN fails at inference "
    "({oc_bn_text} at batch {oc_batch}), and BNRS, BRN and GroupNorm beat it by {oc_bnrs_text}, {oc_brn_text} and "
    "{oc_gn_text} -- an exploratory finding, as BN had not finished training there."
)
IN_SHORT_CLAIMS = (
    "BNRS is below BN at every i.i.d. batch size",
    "BRN wins back nearly all of BNRS's loss",
    "leaving out the normalising backward pass costs accuracy with either statistics",
    "with one-class batches BNRS, BRN and GroupNorm beat BN",
    "BN had not plateaued with one-class batches",
)


def in_short(f: dict) -> str:
    """:data:`IN_SHORT` with the numbers of ``f`` (:func:`facts`)."""
    return IN_SHORT.format(**f)


def unsupported(f: dict, *claims: str) -> list[str]:
    """The claims (keys of :data:`CLAIMS`) that ``f`` does not support, each with the numbers it read."""
    return [f"{claim}: {evidence}" for claim in claims for holds, evidence in [CLAIMS[claim](f)] if not holds]


def check(page: str, f: dict, *claims: str) -> None:
    """Guard the page's sentences that make ``claims`` (keys of :data:`CLAIMS`) against ``f``."""
    for claim in claims:
        holds, evidence = CLAIMS[claim](f)
        guard(f"{page}: {claim}", holds, evidence)
