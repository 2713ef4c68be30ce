"""The book: what its pages compute from ``results/<grid>/``, and the offline build.

Pages call :func:`tables` for the grid being shown (``BNLIB_BOOK_GRID``, default ``study``, the published
grid whose results are committed; results in ``BNLIB_RESULTS``, default the repository's ``results/``) and glue
every number they print, so no number is typed. A plain ``jupyter-book build .`` therefore builds the published
book from the committed ``results/study/`` without training; ``bnlib book --grid default`` builds a quick-start
grid's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import yaml

from . import norms, paths, stats
from . import tables as tables_mod
from .plots import display_name
from .record import RunRecord, load_runs

CELLS_DIR = paths.BOOK_CELLS


PUBLISHED_GRID = "study"


def grid_name() -> str:
    return os.environ.get("BNLIB_BOOK_GRID", PUBLISHED_GRID)


def results_dir() -> Path:
    return paths.results_root()


@dataclass
class Tables:
    grid: str
    folder: Path
    evaluations: pd.DataFrame
    training_loss: pd.DataFrame
    summary: pd.DataFrame
    summary_recomputed: pd.DataFrame | None
    summary_batchstats: pd.DataFrame | None
    runs: list[RunRecord]
    cell_log: pd.DataFrame


def tables(grid: str | None = None, folder: Path | None = None) -> Tables:
    grid = grid or grid_name()
    folder = folder or results_dir() / grid
    if not (folder / "summary.csv").exists():
        raise FileNotFoundError(f"{folder / 'summary.csv'} is missing: run `bnlib run {grid}` (it aggregates) first")

    def read(name):
        return pd.read_csv(folder / f"{name}.csv") if (folder / f"{name}.csv").exists() else None

    log = folder / "cells.jsonl"
    cell_log = (
        pd.DataFrame([json.loads(line) for line in log.read_text().splitlines() if line.strip()])
        if log.exists()
        else pd.DataFrame()
    )
    return Tables(
        grid,
        folder,
        read("evaluations"),
        read("training_loss"),
        read("summary"),
        read("summary_recomputed"),
        read("summary_batchstats"),
        load_runs(folder / "runs"),
        cell_log,
    )


# --- numbers for the prose ------------------------------------------------------------------------


def pp(x: float) -> float:
    """A fraction as percentage points."""
    return 100.0 * float(x)


def standard_placement(frame: pd.DataFrame) -> pd.DataFrame:
    """Only the rows of the original network (a norm after every conv) when a grid also varies the placement."""
    if "norm_placement" in frame and (frame["norm_placement"] == "all").any():
        return frame[frame["norm_placement"] == "all"]
    return frame


# How the prose names the datasets (bnlib.train.data's ids)
DATASET_NAMES = {
    "digits": "the 8x8 digits",
    "mnist5k": "MNIST (5,000 digits)",
    "mnist": "MNIST",
    "fashionmnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
}

# The headline figure's methods: BN, the two ways of normalising with running statistics in training, and the
# batch-independent reference
HEADLINE_METHODS = ("bn", "bnrs", "brn", "gn")


def headline_condition(summary: pd.DataFrame, sampler: str = "iid") -> pd.DataFrame:
    """The summary rows of the condition the answer is told on: the harder real dataset when the grid has it
    (Fashion-MNIST in the published study, else the first), ``sampler``'s batches (when the grid has them), the
    original network, the equal-samples budget when the grid has several; every batch size."""
    s = summary.copy()
    s["method"] = s["method"].astype(str)
    dataset = "fashionmnist" if (s["dataset"] == "fashionmnist").any() else sorted(s["dataset"].unique())[0]
    part = (
        s[(s["dataset"] == dataset) & (s["sampler"] == sampler)]
        if (s["sampler"] == sampler).any()
        else s[s["dataset"] == dataset]
    )
    part = standard_placement(part)
    if "budget" in part and part.groupby("batch_size")["budget"].nunique().max() > 1:
        # equal samples (a budget in samples or epochs) when a batch size has several; a grid that gives each batch
        # size its own budget (trained to a plateau) keeps them all
        budgets = sorted(part["budget"].unique(), key=lambda b: (str(b).endswith(" steps"), str(b)))
        part = part[part["budget"] == budgets[0]]
    return part


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
        for m in rows.index:
            if m == "bn" or pd.isna(rows.loc[m, "diff_vs_bn"]):
                continue
            facts[f"{m}_{tag}_diff"] = pp(rows.loc[m, "diff_vs_bn"])
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
        best = rows["mean"].astype(float).idxmax()
        facts[f"best_{tag}"], facts[f"best_{tag}_acc"] = display_name(best), pp(rows.loc[best, "mean"])
    return facts


def _plateau_sentence(folder: Path, part: pd.DataFrame) -> str:
    """Whether BN had finished training in the headline condition, by the analysis plan's criterion
    (``plateau.csv`` of the grid)."""
    from . import analysis

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
    return (
        "By the analysis plan's plateau criterion BN had finished training "
        + (f"at batch {and_list(map(str, done))}" if done else "at no batch size")
        + (f" and had not at batch {and_list(map(str, not_done))}." if not_done else ".")
    )


def and_list(items) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    return " and ".join([", ".join(items[:-1]), items[-1]]) if len(items) > 1 else "".join(items)


def convergence(folder: Path) -> pd.DataFrame:
    """``convergence.csv`` (:func:`bnlib.analysis.convergence`) of the original network, beside each method's plateau
    status from ``plateau.csv``; empty where the grid has neither."""
    path, status = folder / "convergence.csv", folder / "plateau.csv"
    if not path.exists():
        return pd.DataFrame()
    speed = standard_placement(pd.read_csv(path))
    if status.exists():
        plateau = pd.read_csv(status)
        keys = [k for k in (*stats.CONDITION_KEYS, "method") if k in speed and k in plateau]
        speed = speed.merge(plateau[[*keys, "plateaued"]], on=keys, how="left")
    return speed[speed["level"].notna()]


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


def slower_answer(speed: pd.DataFrame, method: str = "bnrs", dataset: str = "fashionmnist") -> str:
    """The original's "converges much slower" read from the curves (:func:`convergence` rows, i.i.d. batches): per
    batch size the level ``method`` settles at and when, against BN's level and when BN reaches it; whether the
    method ever comes within the plateau margin of BN's level (it converges slower) or not (it converges to less)."""
    from . import analysis

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
        said.append(
            f"at batch {b} it ends at {pp(m['level']):.1f}% (first within {margin} of that at step "
            f"{int(m['steps_to_own_level']):,}) and {reach}"
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


def convergence_sentence(speed: pd.DataFrame) -> str:
    """What one condition's :func:`convergence` rows say: when BN reaches its level, which methods never reach it
    (they converge to less, not slower) and which reach it later, and how many reach their own level only after
    the learning rate drops."""
    from . import analysis

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


def why_sentence(comparisons: pd.DataFrame) -> str:
    """The mechanism grid's answer in a sentence or two (for the abstract): the 2x2's two main effects on the final
    accuracy wherever both are primary comparisons, and what they say when their verdicts agree on one cause ('' where
    the grid has no primary 2x2 effect)."""
    primary = comparisons[(comparisons["family"] == "primary") & (comparisons["outcome"] == "accuracy")]
    effects = {name: [] for name in EFFECT_WORDS}
    causes = set()
    for (batch, sampler), part in primary.groupby(["batch_size", "sampler"], sort=False):
        eff = part.set_index("comparison")
        if not all(f"2x2: {name}" in eff.index for name in EFFECT_WORDS):
            continue
        for name in EFFECT_WORDS:
            e = eff.loc[f"2x2: {name}"]
            effects[name].append(
                f"{percent_interval(e['mean'], e['ci_low'], e['ci_high'], signed=True)} points at "
                f"{condition_label({'batch_size': batch, 'sampler': sampler})} ({e['verdict']})"
            )
        forward, gradient = (eff.loc[f"2x2: {name}", "verdict"] for name in EFFECT_WORDS)
        causes.add("gradient" if gradient == "below" and forward in ("equivalent", "above") else "other")
    if not causes:
        return ""
    (fw, forward), (gw, gradient) = ((EFFECT_WORDS[name], " and ".join(said)) for name, said in effects.items())
    text = (
        f"Why, from a pre-registered 2x2 ablation (each effect averaged over the other factor): {fw} changes the "
        f"final accuracy by {forward}; {gw} by {gradient}."
    )
    if causes == {"gradient"}:
        text += (
            " The accuracy is lost by cutting the gradient through the statistics, not by normalising with running "
            "ones."
        )
    return text


def abstract(t: Tables, mechanism: pd.DataFrame | None = None) -> str:
    """The intro's abstract: the question and the answer in a few sentences, every number from the summary; with the
    mechanism grid's comparisons (``mechanism``), its answer to why (:func:`why_sentence`)."""
    part = headline_condition(t.summary)
    f = headline(t.summary)
    small, large = f["small"], f["large"]

    def ends(m: str) -> str:
        said = [
            f"{f[f'{m}_{k}_diff']:+.1f} points [{f[f'{m}_{k}_low']:+.1f}, {f[f'{m}_{k}_high']:+.1f}] at batch {b} "
            f"({f[f'{m}_{k}_verdict']})"
            for k, b in (("small", small), ("large", large))
            if f"{m}_{k}_diff" in f
        ]
        return " and ".join(said)

    text = [
        "Batch normalisation (BN) normalises with each batch's statistics in training and with running averages "
        "at inference, and the two differ when batches are small or hold few classes. Why not normalise with the "
        "running statistics in training too?"
    ]
    if "bn_small" in f:
        text.append(
            f"On {f['dataset_name']} with i.i.d. batches ({f['budget']}, {f['seeds']}), BN ends at "
            f"{f['bn_small']:.1f}% at batch {small} and {f['bn_large']:.1f}% at batch {large}."
        )
    clauses = {
        "bnrs": "Against BN, normalising with running statistics in training (BNRS) differs by {}",
        "brn": "Batch Renormalization, which normalises with the same running statistics but keeps the gradient "
        "through the batch's, by {}",
        "gn": "GroupNorm, which needs no batch statistics, by {}",
    }
    said = [c.format(ends(m)) for m, c in clauses.items() if ends(m)]
    if said:
        text.append("; ".join(said) + ".")
    text.append(_plateau_sentence(t.folder, part))
    if mechanism is not None and (why := why_sentence(mechanism)):
        text.append(why)
    text.append("Differences are paired by seed with Student-t 95% intervals; " + correction_sentence(t.summary))
    return " ".join(text)


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
        f"two one-sided tests put the difference within ±{EQUIVALENCE_POINTS:g} point."
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


PLANNED_CLAIMS = (
    "Judged by the pre-registered analysis plan's rules from its primary verdicts (Fashion-MNIST, i.i.d. "
    "batches, every batch size trained until BN plateaued); the original's digits are exploratory there, "
    "so their column applies the same rules to exploratory verdicts and is labelled so. A comparison "
    "that is not primary -- not run yet, or BN not plateaued -- counts as unknown."
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


def budget_words(part: pd.DataFrame) -> str:
    """The budget of one condition's rows: '6400 samples' where every batch size has the same, else each batch
    size's, '40,000 steps at batch 2, 8,000 at batch 16 and 2,000 at batch 128' (a grid trained to a plateau)."""
    budgets = part.groupby("batch_size")["budget"].first()
    if budgets.nunique() == 1:
        return str(budgets.iloc[0])
    return and_list(
        f"{int(str(b).split()[0]):,}{' ' + str(b).split()[1] if k == 0 else ''} at batch {int(size)}"
        for k, (size, b) in enumerate(budgets.items())
    )


def by_budget(frame: pd.DataFrame):
    """(dataset, budget words, rows) for each figure of a page: one per dataset and budget where a batch size has
    several budgets (the short study's equal samples and equal steps do not share an axis); one per dataset where
    each batch size has its own (a grid trained to a plateau: its columns are the batch sizes)."""
    per_batch = frame.groupby(["dataset", "batch_size"])["budget"].nunique().max() == 1
    keys = ["dataset"] if per_batch else ["dataset", "budget"]
    for key, part in frame.groupby(keys, sort=True):
        dataset = key[0] if isinstance(key, tuple) else key
        yield dataset, budget_words(part), part


def condition_words(part: pd.DataFrame) -> str:
    """'Fashion-MNIST, i.i.d. batches, budget 6400 samples, 5 seeds' for one condition's summary rows."""
    dataset = part["dataset"].iloc[0]
    return (
        f"{DATASET_NAMES.get(dataset, dataset)}, {'i.i.d.' if part['sampler'].iloc[0] == 'iid' else 'non-i.i.d.'} "
        f"batches, budget {budget_words(part)}, {seed_count(part)}"
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
        return (
            PLANNED_CLAIMS
            + " The rules are `bnlib.analysis.original_claims`, fixed by the analysis plan before its cells ran."
        )
    budgets = sorted(equal_steps(summary)["budget"].unique())
    return (
        "Each verdict comes from paired differences against BN (same seed: same batches, same initial weights) "
        f"with 95% intervals, under the equal-steps budget ({budgets[0] if budgets else 'no equal-steps cells yet'}): "
        "*holds* when the intervals say so, *does not hold* when they say the opposite, *cannot tell* when an "
        "interval includes the boundary or a condition has fewer than two seeds so far."
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


def claims_table(summary: pd.DataFrame) -> pd.DataFrame | None:
    """The original's four claims (rows) by dataset (columns; "exploratory" where the plan leaves it so), or None
    where this grid cannot judge them (no equal-steps cells)."""
    datasets = sorted(equal_steps(summary)["dataset"].unique())
    if not datasets:
        return None
    sets = {d: original_claims(summary, d) for d in datasets}

    def label(d):
        return DATASET_NAMES.get(d, d) + (" (exploratory)" if sets[d][0].get("family") == "exploratory" else "")

    first = next(iter(sets.values()))
    return pd.DataFrame(
        {label(d): [c["verdict"] for c in cs] for d, cs in sets.items()},
        index=pd.Index([c["claim"] for c in first], name="claim"),
    )


ANSWER_CLAUSES = {
    "bnrs": "normalising with running statistics during training (BNRS)",
    "brn": "keeping BN's gradient through the batch statistics while correcting to the running ones (BRN)",
    "gn": "batch-independent normalisation (GroupNorm)",
}


def answer(summary: pd.DataFrame) -> str:
    """The Summary's answer in one paragraph (Markdown): BNRS, BRN and GroupNorm against BN at the smallest and the
    largest batch of :func:`headline_condition`, verdict, difference and interval; a method the grid has not run
    there is left out."""
    f = headline(summary)
    said = []
    for m, clause in ANSWER_CLAUSES.items():
        ends = [
            f"at batch {f[k]}: **{f[f'{m}_{k}_verdict']}** ({f[f'{m}_{k}_diff']:+.1f} points, 95% interval "
            f"{f[f'{m}_{k}_low']:+.1f} to {f[f'{m}_{k}_high']:+.1f})"
            for k in ("small", "large")
            if f"{m}_{k}_diff" in f
        ]
        if ends:
            said.append(f"{clause} " + ", ".join(ends))
    head = f"Against BN on {f['dataset_name']} ({f['budget']}, i.i.d. batches): "
    return head + ("; ".join(said) + "." if said else "no method other than BN has run in this condition yet.")


def headline_caption(t: Tables) -> str:
    part = headline_condition(t.summary)
    f = headline(t.summary)
    return (
        f"Final test accuracy against batch size on {f['dataset_name']}, i.i.d. batches, budget {f['budget']}: the "
        f"mean over {seed_count(part)} with its Student-t 95% interval, from `results/{t.grid}/summary.csv`."
    )


def adjusted_p(row) -> dict:
    """A summary row's adjusted p-value as the book shows it: the plan's (with its correction and family) in a grid
    with an analysis plan, else the summary's Holm over every comparison."""
    if hasattr(row, "p_adjusted"):
        label = "-" if not isinstance(row.family, str) else f"{row.family}, {row.correction}"
        return {"adjusted p": "–" if pd.isna(row.p_adjusted) else f"{row.p_adjusted:.2g} ({label})"}
    p = getattr(row, "p_holm", float("nan"))
    return {"Holm p": "–" if pd.isna(p) else f"{p:.2g}"}


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
                    "vs BN (points)": percent_interval(r.diff_vs_bn, r.diff_ci_low, r.diff_ci_high, signed=True),
                    "verdict": r.verdict if isinstance(r.verdict, str) else "cannot tell",
                    **adjusted_p(r),
                    "wins": f"{int(r.wins)}/{int(r.n_pairs)}" if not pd.isna(r.wins) else "–",
                }
            )
    return pd.DataFrame(rows).set_index(["method", "batch"]) if rows else pd.DataFrame()


def verdict_sentence(part: pd.DataFrame, method: str) -> str:
    """One method against BN in one condition, every batch size: difference, interval, verdict."""
    rows = part[part["method"].astype(str) == method].sort_values("batch_size")
    said = [
        f"{percent_interval(r.diff_vs_bn, r.diff_ci_low, r.diff_ci_high, signed=True)} points at batch "
        f"{int(r.batch_size)} ({r.verdict if isinstance(r.verdict, str) else 'cannot tell'})"
        for r in rows.itertuples()
        if not pd.isna(r.diff_vs_bn)
    ]
    return f"{display_name(method)} against BN: " + ("; ".join(said) if said else "not run in this condition") + "."


def advice(summary: pd.DataFrame) -> pd.DataFrame:
    """What to use, condition by condition (sampler x batch size of the headline dataset and budget): the methods
    the data put above BN (else BN), those they put below, and how many they cannot tell from BN (Holm verdicts)."""
    rows = []
    for sampler in sorted(summary["sampler"].unique()):
        part = headline_condition(summary, sampler)
        for size, g in part.groupby("batch_size"):
            g = g[g["method"] != "bn"]
            verdicts = g["verdict"].fillna("cannot tell")

            def names(v):
                return ", ".join(display_name(m) for m in g.loc[verdicts == v, "method"]) or "none"

            rows.append(
                {
                    "batches": f"{'i.i.d.' if sampler == 'iid' else 'non-i.i.d.'}, {int(size)}",
                    "use (above BN)": names("above") if (verdicts == "above").any() else "BN: nothing is above it",
                    "avoid (below BN)": names("below"),
                    "cannot tell from BN": int((verdicts == "cannot tell").sum()),
                }
            )
    return pd.DataFrame(rows).set_index("batches")


def percent_interval(mean: float, low: float, high: float, signed: bool = False) -> str:
    """A fraction as 'mean [low, high]' in percent (points with a sign for differences)."""
    if pd.isna(mean):
        return "–"
    f = (lambda v: f"{100 * v:+.1f}") if signed else (lambda v: f"{100 * v:.1f}")
    return f(mean) + ("" if pd.isna(low) else f" [{f(low)}, {f(high)}]")


def summary_tables(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Per condition (dataset, sampler, budget, ...): a row per method and batch size with the final accuracy in %
    and its 95% interval, the paired difference against BN in points with its interval, the verdict, the
    Holm-adjusted p-value and the seeds in which the method beat BN, each in its own column (narrow enough for
    the book's column)."""
    s = summary.copy()
    s["method"] = s["method"].astype(str)
    keys = [k for k in ("dataset", "budget", "sampler", "norm_placement", "classes_per_batch") if k in s]
    keys = [k for k in keys if k in ("dataset", "sampler") or s[k].nunique(dropna=False) > 1]
    order = {m: i for i, m in enumerate(norms.METHODS)}
    out = []
    for cond, part in s.groupby([k for k in keys if k != "classes_per_batch"], dropna=False, sort=True):
        cond = cond if isinstance(cond, tuple) else (cond,)
        title = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in zip(keys, cond))
        rows = []
        for r in part.sort_values(
            ["method", "batch_size"], key=lambda c: c.map(order) if c.name == "method" else c
        ).itertuples():
            compared = r.method != "bn" and isinstance(getattr(r, "verdict", None), str)
            accuracy = percent_interval(r.mean, r.ci_low, r.ci_high)
            if r.n_seeds != part["n_seeds"].min():  # n beside the interval wherever it differs from the title's
                accuracy += f" n={int(r.n_seeds)}"
            if r.diverged:
                accuracy += f" ({r.diverged} diverged)"
            rows.append(
                {
                    "method": display_name(r.method),
                    "batch": int(r.batch_size),
                    "accuracy (%)": accuracy,
                    "vs BN (points)": percent_interval(r.diff_vs_bn, r.diff_ci_low, r.diff_ci_high, signed=True)
                    if compared
                    else "",
                    "verdict": r.verdict if compared else "",
                    **({k: v if compared else "" for k, v in adjusted_p(r).items()}),
                    "wins": f"{int(r.wins)}/{int(r.n_pairs)}" if compared else "",
                }
            )
        out.append((f"{title} ({int(part['n_seeds'].min())} seeds)", pd.DataFrame(rows).set_index(["method", "batch"])))
    return out


README = paths.README
HEADLINE_ALT = (
    "Final test accuracy against batch size for BN, BN with running statistics (BNRS), Batch "
    "Renormalization (BRN) and GroupNorm, mean over seeds with 95% intervals"
)
README_MARKERS = (
    "<!-- study-findings:start (written by `bnlib aggregate study --readme`) -->",
    "<!-- study-findings:end -->",
)


def run_commits(runs_dir: Path) -> list[str]:
    """The short git commits whose code ran a grid's finished cells, in the order they first finished."""
    runs = sorted(load_runs(runs_dir), key=lambda r: r.provenance.finished_at or "")
    return list(dict.fromkeys((r.provenance.git_commit or "unknown")[:7] for r in runs))


def why_from(folder: Path) -> str:
    """:func:`why_sentence` from a mechanism grid's results folder ('' where it has no analysis yet)."""
    table = folder / "analysis.csv"
    return why_sentence(pd.read_csv(table)) if table.exists() else ""


def readme_findings(
    summary: pd.DataFrame,
    cells_done: int,
    cells_total: int,
    commits: list[str] = (),
    folder: Path | None = None,
    why: str = "",
) -> str:
    """The README's first screen: the answer so far in a few sentences from the committed summary (the
    headline condition's paired differences against BN with their intervals and verdicts), ``why`` (the mechanism
    grid's answer, :func:`why_from`) where given, then the original study's four claims judged on every dataset: by
    the re-run study's plan where the summary carries one (and BN's plateau status from ``folder``'s plateau.csv),
    else under the original's equal-steps budget."""
    planned = "family" in summary
    ran = f", run with the code of commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}" if commits else ""
    f = headline(summary)
    figure = paths.README_FIGURE.relative_to(paths.ROOT).as_posix()
    small, large = f["small"], f["large"]

    def diffs(m: str) -> str:
        parts = [
            f"{f[f'{m}_{t}_diff']:+.1f} [{f[f'{m}_{t}_low']:+.1f}, {f[f'{m}_{t}_high']:+.1f}] points at batch {b} "
            f"({f[f'{m}_{t}_verdict']})"
            for t, b in (("small", small), ("large", large))
            if f"{m}_{t}_diff" in f
        ]
        return " and ".join(parts)

    compared = [m for m in ("bnrs", "brn", "bnwos") if f"{m}_small_diff" in f or f"{m}_large_diff" in f]
    lines = [
        f"![{HEADLINE_ALT}]({figure})",
        "",
        f"*{headline_digest(summary)[1]}*",
        "",
        f"**The answer so far** ({cells_done} of the study grid's {cells_total} cells committed{ran}; computed from "
        "`results/study/summary.csv`). On "
        f"{f['dataset_name']} with i.i.d. batches and a budget of {f['budget']} ({f['seeds']}), BN ends at "
        f"{f['bn_small']:.1f}% [{f['bn_small_low']:.1f}, {f['bn_small_high']:.1f}] at batch {small} and "
        f"{f['bn_large']:.1f}% [{f['bn_large_low']:.1f}, {f['bn_large_high']:.1f}] at batch {large}. Against it, "
        "paired by seed: "
        + "; ".join(f"{display_name(m)} {diffs(m)}" for m in compared)
        + ". "
        + (
            f"Intervals are Student-t 95%; {correction_sentence(summary)} "
            + (_plateau_sentence(folder, headline_condition(summary)) + " " if folder is not None else "")
            if planned
            else f"Intervals are Student-t 95%; a verdict is a paired t-test at 5% after Holm's correction over all "
            f'{f["family"]} comparisons with BN in the grid, so at {f["seeds"]} many read "cannot tell". '
            "These networks were not trained to a plateau: the numbers describe training under a short budget, "
            "and a re-run to a plateau under a pre-registered analysis plan is planned. "
        )
        + "The book's Summary page has every method and condition.",
    ]
    if why:
        lines += [
            "",
            f"**{why.split(':', 1)[0]}** (computed from `results/{MECHANISM_GRID}/analysis.csv`; the book's "
            f'chapter "Why running statistics fail in training"):{why.split(":", 1)[1]}',
        ]
    datasets = [d for d in ("mnist5k", "fashionmnist") if d in set(equal_steps(summary)["dataset"])]
    if datasets and planned:
        table = claims_table(summary)
        digits = (
            "; the digits' column reads the same rules off exploratory verdicts"
            if "mnist5k" in datasets
            else "; the digits have no cell yet"
        )
        lines += [
            "",
            "**The original study's claims**, judged by the pre-registered analysis plan's rules from its "
            f"primary verdicts (Fashion-MNIST{digits}):",
            "",
            "| claim | " + " | ".join(table.columns) + " |",
            "|---" * (len(table.columns) + 1) + "|",
        ]
        lines += [f"| {claim} | " + " | ".join(row) + " |" for claim, row in zip(table.index, table.to_numpy())]
    elif datasets:
        verdicts = {d: original_claims(summary, d) for d in datasets}
        lines += [
            "",
            "**The original study's claims**, judged from our paired 95% intervals against BN under its budget "
            "(the same number of steps at every batch size, i.i.d. batches):",
            "",
            "| claim | " + " | ".join(datasets) + " |",
            "|---" * (len(datasets) + 1) + "|",
        ]
        for i, claim in enumerate(verdicts[datasets[0]]):
            lines.append(f"| {claim['claim']} | " + " | ".join(verdicts[d][i]["verdict"] for d in datasets) + " |")
    return "\n".join(lines)


def headline_digest(summary: pd.DataFrame) -> tuple[str, str]:
    """A fingerprint of the numbers the headline figure draws (kept in its PNG, so a test can tell a stale image)
    and the figure's caption."""
    part = headline_condition(summary)
    shown = part[part["method"].isin(HEADLINE_METHODS)].sort_values(["method", "batch_size"])
    numbers = shown[["method", "batch_size", "n_seeds", "mean", "ci_low", "ci_high"]].round(6).to_csv(index=False)
    caption = (
        f"Final test accuracy on {DATASET_NAMES.get(shown['dataset'].iloc[0], shown['dataset'].iloc[0])}, i.i.d. "
        f"batches, budget {budget_words(shown)}: "
        f"mean over {seed_count(shown)}, Student-t 95% intervals."
    )
    return hashlib.sha256(numbers.encode()).hexdigest()[:16], caption


def save_headline_png(summary: pd.DataFrame, path: Path = paths.README_FIGURE) -> Path:
    """The headline figure as PNG (the README's), its numbers' fingerprint in the PNG's Description."""
    import matplotlib.pyplot as plt

    from . import plots

    fig = plots.headline_figure(headline_condition(summary), HEADLINE_METHODS)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(
        path, dpi=100, metadata={"Description": f"bnlib headline {headline_digest(summary)[0]}", "Software": None}
    )
    plt.close(fig)
    return path


def write_readme_findings(
    summary: pd.DataFrame,
    cells_done: int,
    cells_total: int,
    readme: Path = README,
    commits: list[str] = (),
    folder: Path | None = None,
    why: str = "",
) -> None:
    """The findings between the README's markers (:func:`readme_findings`), and the headline figure they show
    beside the README."""
    text = readme.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        raise ValueError(f"{readme}: the markers {start} and {end} are missing; add them where the tables belong")
    save_headline_png(summary, readme.parent / paths.README_FIGURE.relative_to(paths.ROOT))
    head, rest = text.split(start, 1)
    readme.write_text(
        head
        + start
        + "\n"
        + readme_findings(summary, cells_done, cells_total, commits, folder, why)
        + "\n"
        + end
        + rest.split(end, 1)[1]
    )


def runs_table(runs: list[RunRecord]) -> str:
    """The Runs page's table: one row per finished cell, linked to its notebook page (HTML)."""
    import html as html_mod

    rows = []
    for r in sorted(runs, key=lambda r: r.cell):
        cfg, prov = r.config, r.provenance
        rows.append(
            {
                "cell": f'<a href="cells/{r.cell}.html">{html_mod.escape(r.cell)}</a>',
                "dataset": cfg["dataset"],
                "budget": tables_mod.budget_label(cfg),
                "batch": cfg["batch_size"],
                "sampler": cfg["sampler"]
                + (f" ({cfg['classes_per_batch']} classes)" if cfg.get("classes_per_batch") else ""),
                "placement": cfg.get("norm_placement", "all"),
                "seed": cfg["seed"],
                "training (s)": round(r.wall_seconds, 1),
                "device": prov.device_name,
                "commit": (prov.git_commit or "")[:12],
            }
        )
    table = pd.DataFrame(rows).to_html(index=False, escape=False, classes="table bnlib-sortable", table_id="runs-table")
    return table + SORT_SCRIPT


# Click a column header of a .bnlib-sortable table to sort by it (again: reverse); numbers sort as numbers.
SORT_SCRIPT = """<script>
document.querySelectorAll("table.bnlib-sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, col) {
    th.style.cursor = "pointer";
    th.title = "sort by this column";
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.from(body.rows), up = th.dataset.order !== "up";
      var key = function (row) { var t = row.cells[col].textContent.trim(), n = parseFloat(t); \
return isNaN(n) || String(n) !== t && !/^-?[0-9.]+$/.test(t) ? t : n; };
      rows.sort(function (a, b) { var x = key(a), y = key(b); \
var c = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1); \
return up ? c : -c; });
      rows.forEach(function (row) { body.appendChild(row); });
      th.dataset.order = up ? "up" : "down";
    });
  });
});
</script>"""


def seed_count(frame: pd.DataFrame, counts: pd.Series | None = None) -> str:
    """'5 seeds', or '4 to 5 seeds' where a table's rows (its ``n_seeds``, or ``counts``) differ."""
    counts = frame["n_seeds"] if counts is None else counts
    low, high = int(counts.min()), int(counts.max())
    return (f"{low} seed" + ("" if low == 1 else "s")) if low == high else f"{low} to {high} seeds"


def seeds_caption(frame: pd.DataFrame, what: str) -> str:
    """A figure's caption: what it shows and over how many seeds (per condition, fewest to most)."""
    if "seed" in frame:
        keys = [k for k in ("dataset", "budget", "batch_size", "sampler", "norm_placement", "method") if k in frame]
        counts = frame.groupby(keys, dropna=False)["seed"].nunique()
    else:  # a summary: its n_seeds column
        counts = frame["n_seeds"]
    seeds = seed_count(frame, counts)
    seeds += " per condition" if counts.min() != counts.max() else ""
    return f"*{what}; mean over {seeds}, Student-t 95% intervals.*"


def seed_halfwidths(evaluations: pd.DataFrame) -> pd.DataFrame:
    """Half-width of the paired interval against BN by number of seeds, for every comparison of the grid."""
    final = stats.final_scores(evaluations)
    final = final[final["score"].notna()]
    keys = [k for k in stats.CONDITION_KEYS if k in final]
    return stats.halfwidth_by_seeds(final, keys)


def diverged_runs(evaluations: pd.DataFrame) -> pd.DataFrame:
    """Every diverged run by cell (it counts as chance accuracy in the statistics)."""
    div = evaluations[evaluations["diverged"].astype(bool) & evaluations["final"].astype(bool)]
    cols = [
        c for c in ("cell", "method", "dataset", "budget", "batch_size", "sampler", "seed", "diverged_step") if c in div
    ]
    return div[cols].assign(method=div["method"].map(display_name)).reset_index(drop=True)


# --- building ------------------------------------------------------------------------------------


# The grid's aggregated tables, as the appendix "All results" offers them for download (those a grid computed)
TABLE_FILES = {
    "summary.csv": "final accuracy per method and condition, with the comparisons against BN",
    "summary_recomputed.csv": "the same after recomputing population statistics",
    "summary_batchstats.csv": "the same with batch statistics at test time",
    "plateau.csv": "every method's plateau status by the analysis plan's criterion",
    "convergence.csv": "how fast each method converges: steps and images to BN's level and to its own",
    "analysis.csv": "the analysis plan's comparisons (mechanism grids)",
    "evaluations.csv": "every evaluation of every run",
    "training_loss.csv": "every training-loss window of every run",
    "cells.jsonl": "the runner's log: one line per cell run",
}


def scrolling_table(frame: pd.DataFrame, max_height_em: int = 30) -> str:
    """A table as HTML in a box that scrolls both ways (the appendix's full tables: wider than the column)."""
    return (
        f'<div class="bnlib-scroll" style="overflow:auto; max-height:{max_height_em}em">'
        + frame.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", classes="table")
        + "</div>"
    )


def gather_runs(folder: Path) -> int:
    """Copy the grid's executed cell notebooks into the book, titled by their cell ids, and its aggregated
    tables (:data:`TABLE_FILES`) for download (results untouched). Called by the book's Sphinx extension
    (:mod:`bnlib.book_extension`) at the start of every build."""
    for target in (CELLS_DIR, paths.BOOK_TABLES):
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
    for name in TABLE_FILES:
        if (folder / name).exists():
            shutil.copy2(folder / name, paths.BOOK_TABLES / name)
    count = 0
    for path in sorted((folder / "runs").glob("*.ipynb")):
        if not (folder / "runs" / f"{path.stem}.json").exists():
            continue  # failed or unfinished cells are not part of the study
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "markdown" and cell.source.startswith("# "):
                cell.source = (
                    f"# Cell `{path.stem}`" + cell.source[cell.source.index("\n") :]
                    if "\n" in cell.source
                    else f"# Cell `{path.stem}`"
                )
                break
        else:  # a notebook without a title (a cell copied from another grid): its page still needs one
            nb.cells.insert(0, nbformat.v4.new_markdown_cell(f"# Cell `{path.stem}`"))
        nbformat.write(nb, CELLS_DIR / path.name)
        count += 1
    return count


def repository_url() -> str | None:
    """Where the book's source lives, for its repository, Binder and Colab buttons: ``$BNLIB_REPOSITORY_URL``;
    else, in GitHub Actions, the repository being built (``$GITHUB_SERVER_URL/$GITHUB_REPOSITORY``, so a fork
    publishes buttons that open the fork); else ``repository.url`` in _config.yml; else None (no buttons)."""
    if os.environ.get("BNLIB_REPOSITORY_URL"):
        return os.environ["BNLIB_REPOSITORY_URL"].rstrip("/")
    if os.environ.get("GITHUB_REPOSITORY"):
        return f"{os.environ.get('GITHUB_SERVER_URL', 'https://github.com')}/{os.environ['GITHUB_REPOSITORY']}"
    return (yaml.safe_load(paths.BOOK_CONFIG.read_text()).get("repository") or {}).get("url")


def _config_with_buttons(url: str, folder: Path) -> Path:
    """_config.yml with the repository and launch buttons turned on for ``url`` (written into ``folder``)."""
    config = yaml.safe_load(paths.BOOK_CONFIG.read_text())
    config["repository"] = {**(config.get("repository") or {}), "url": url, "path_to_book": "", "branch": "main"}
    config["html"] = {**config.get("html", {}), "use_repository_button": True, "use_issues_button": True}
    config["launch_buttons"] = {
        "notebook_interface": "jupyterlab",
        "binderhub_url": "https://mybinder.org",
        "colab_url": "https://colab.research.google.com",
    }
    path = folder / "_config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def build(
    grid: str = PUBLISHED_GRID,
    results_root: str | Path | None = None,
    strict: bool = True,
    output: str | Path = paths.ROOT,
) -> Path:
    """Aggregate the grid and build the book offline (warnings as errors) into ``output``/_build/html;
    the build gathers the notebooks. With a :func:`repository_url`, the pages get repository, Binder and
    Colab buttons."""
    from . import grid as grid_mod

    results_root = paths.results_root(results_root)
    folder = results_root / grid
    if not any((folder / "runs").glob("*.json")):
        raise FileNotFoundError(f"no finished cells in {folder / 'runs'}: run `bnlib run {grid}` first")
    try:  # the grid file's cells only ("default+lr=0.0003": the default grid with that override)
        base, *overrides = grid.split("+")
        cells = {c.id for c in grid_mod.load(base, grid_mod.parse_overrides(overrides)).cells}
    except grid_mod.GridError:
        cells = None  # no grid file of that name here: every finished cell
    tables_mod.aggregate(folder, cells)
    env = {**os.environ, "BNLIB_BOOK_GRID": grid, "BNLIB_RESULTS": str(results_root)}
    exe = Path(sys.executable).with_name("jupyter-book")
    # --all: the pages read results/, which Sphinx cannot see change; never serve numbers from its cache
    cmd = [
        str(exe) if exe.exists() else "jupyter-book",
        "build",
        str(paths.ROOT),
        "--path-output",
        str(output),
        "--all",
    ]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    html_dir = Path(output) / "_build" / "html"
    shutil.rmtree(html_dir, ignore_errors=True)  # no page of an earlier build survives
    with tempfile.TemporaryDirectory() as tmp:
        url = repository_url()
        if url:
            cmd += ["--config", str(_config_with_buttons(url, Path(tmp)))]
        proc = subprocess.run(cmd, env=env, cwd=paths.ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed (exit {proc.returncode}); see the messages above")
    return html_dir / "index.html"


# --- the original study, side by side -------------------------------------------------------------

ORIGINAL_CSV = paths.BOOK_DATA / "original_study.csv"
ORIGINAL_DATASETS = {"mnist": ("mnist5k", "fashionmnist"), "cifar100": ()}  # ours that stand in for theirs
EQUIVALENCE_POINTS = 1.0  # "matches BN": the paired 95% interval lies within +-1 point of BN


def original_results() -> pd.DataFrame:
    """The original study's final accuracies (%), read off its figures; one run each (see the file's source column)."""
    return pd.read_csv(ORIGINAL_CSV)


def equal_steps(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows of the original's budget (the same number of steps at every batch size), i.i.d., original network."""
    s = standard_placement(summary)
    s = s[(s["sampler"] == "iid") & s["budget"].astype(str).str.endswith(" steps")]
    return s.assign(method=s["method"].astype(str))


def side_by_side(summary: pd.DataFrame) -> pd.DataFrame:
    """Original (one run) beside ours (mean [95% interval], n seeds) per dataset, batch size and method; for
    BNRS, BRN and BRNC also our run of the original's own code (``*_orig``: statistics updated before use, eps 0)."""
    ours = equal_steps(summary)
    orig = original_results()

    def ours_cell(dataset: str, ds: str, batch: int, method: str) -> str:
        if dataset == "cifar100":
            return "not re-run"
        hit = ours[(ours["dataset"] == ds) & (ours["batch_size"] == batch) & (ours["method"] == method)]
        if hit.empty:
            return "not run yet" if method in norms.REGISTRY else ""
        h = hit.iloc[0]
        return f"{percent_interval(h['mean'], h['ci_low'], h['ci_high'])} (n={int(h['n_seeds'])})"

    rows = []
    for r in orig.itertuples():
        row = {
            "original dataset": r.dataset,
            "batch": r.batch_size,
            "method": display_name(r.method),
            "original (%)": ("< " if r.relation == "below" else "") + f"{r.final_acc:g}",
        }
        for ds in ("mnist5k", "fashionmnist"):
            row[f"ours: {ds}"] = ours_cell(r.dataset, ds, r.batch_size, r.method)
            twin = f"{r.method}_orig"
            row[f"ours, the original's code: {ds}"] = (
                ours_cell(r.dataset, ds, r.batch_size, twin) if twin in norms.REGISTRY else "same as ours"
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _diff(ours: pd.DataFrame, dataset: str, batch: int, method: str) -> tuple[float, float, float] | None:
    hit = ours[(ours["dataset"] == dataset) & (ours["batch_size"] == batch) & (ours["method"] == method)]
    if hit.empty or pd.isna(hit.iloc[0].get("diff_ci_low", float("nan"))):
        return None
    h = hit.iloc[0]
    return pp(h["diff_vs_bn"]), pp(h["diff_ci_low"]), pp(h["diff_ci_high"])


def planned_claims(summary: pd.DataFrame, dataset: str) -> list[dict]:
    """The original's four claims on a grid with the re-run study's plan (its summary carries ``family``): the
    plan's rules (:func:`bnlib.analysis.original_claims`) on its primary verdicts, or -- on a dataset the plan
    leaves exploratory -- the same rules on the exploratory verdicts, each claim marked with the family read."""
    from . import analysis

    s = equal_steps(summary)
    s = s[(s["dataset"] == dataset) & (s["method"] != "bn") & s["diff_vs_bn"].notna()]
    family = "primary" if (s["family"] == "primary").any() else "exploratory"
    comparisons = pd.DataFrame(
        {
            "comparison": s["method"] + " - bn",
            "outcome": "accuracy",
            "family": s["family"],
            "verdict": s["verdict"],
            "dataset": s["dataset"],
            "sampler": s["sampler"],
            "batch_size": s["batch_size"],
            "mean": s["diff_vs_bn"],
            "ci_low": s["diff_ci_low"],
            "ci_high": s["diff_ci_high"],
        }
    )
    return [
        {**claim, "family": family} for claim in analysis.original_claims(comparisons, dataset=dataset, family=family)
    ]


def original_claims(summary: pd.DataFrame, dataset: str) -> list[dict]:
    """The original study's four claims, each judged on one of our datasets: on a grid with a pre-registered plan
    by its rules (:func:`planned_claims`); otherwise under the equal-steps budget from the paired 95% intervals
    against BN: "holds", "does not hold" or "cannot tell" (an interval that includes the boundary, or a condition
    not run / with fewer than 2 seeds)."""
    if "family" in summary:
        return planned_claims(summary, dataset)
    ours = equal_steps(summary)
    sizes = sorted(ours.loc[ours["dataset"] == dataset, "batch_size"].unique())
    small, larger = (sizes[0], sizes[1:]) if sizes else (None, [])

    def d(batch, method):
        return _diff(ours, dataset, batch, method) if batch is not None else None

    def fmt(x):
        return "not run" if x is None else f"{x[0]:+.1f} [{x[1]:+.1f}, {x[2]:+.1f}]"

    claims = []
    # 1. BRN(C) beats BN only at tiny batches (the original: on the harder task)
    tiny = [d(small, m) for m in ("brn", "brnc")]
    big = [d(b, m) for b in larger for m in ("brn", "brnc")]
    if any(x is None for x in tiny + big) or not larger:
        v1 = "cannot tell"
    elif any(x[1] > 0 for x in big):
        v1 = "does not hold"  # it also beats BN at a larger batch
    elif any(x[1] > 0 for x in tiny):
        v1 = "holds"
    elif all(x[2] < 0 for x in tiny):
        v1 = "does not hold"  # BN is better at the tiny batch
    else:
        v1 = "cannot tell"
    claims.append(
        {
            "claim": "BRN(C) beats BN only at tiny batches",
            "verdict": v1,
            "evidence": "; ".join(f"{m} at batch {small}: {fmt(x)}" for m, x in zip(("brn", "brnc"), tiny)),
        }
    )
    # 2. BNRS converges much slower: below BN at the end of the budget at every batch size
    rs = [d(b, "bnrs") for b in sizes]
    if not sizes or any(x is None for x in rs):
        v2 = "cannot tell"
    elif all(x[2] < 0 for x in rs):
        v2 = "holds"
    elif any(x[1] > 0 for x in rs):
        v2 = "does not hold"
    else:
        v2 = "cannot tell"
    claims.append(
        {
            "claim": "BNRS converges much slower than BN (below BN at the end of the budget, every batch size)",
            "verdict": v2,
            "evidence": "; ".join(f"batch {b}: {fmt(x)}" for b, x in zip(sizes, rs)),
        }
    )
    # 3. BNWoS fails at batch 2
    w2 = d(small, "bnwos")
    v3 = "cannot tell" if w2 is None else ("holds" if w2[2] < 0 else ("does not hold" if w2[1] >= 0 else "cannot tell"))
    tiny_batch = small if small is not None else 2  # the original's batch 2 when this grid has no such cells
    claims.append(
        {
            "claim": f"BNWoS fails at batch {tiny_batch} (below BN)",
            "verdict": v3,
            "evidence": f"batch {tiny_batch}: {fmt(w2)}",
        }
    )
    # 4. BNWoS matches BN at larger batches: every paired interval within +-EQUIVALENCE_POINTS
    wl = [d(b, "bnwos") for b in larger]
    if not larger or any(x is None for x in wl):
        v4 = "cannot tell"
    elif all(-EQUIVALENCE_POINTS <= x[1] and x[2] <= EQUIVALENCE_POINTS for x in wl):
        v4 = "holds"
    elif any(x[1] > EQUIVALENCE_POINTS or x[2] < -EQUIVALENCE_POINTS for x in wl):
        v4 = "does not hold"
    else:
        v4 = "cannot tell"
    claims.append(
        {
            "claim": f"BNWoS matches BN at larger batches (within ±{EQUIVALENCE_POINTS:g} point)",
            "verdict": v4,
            "evidence": "; ".join(f"batch {b}: {fmt(x)}" for b, x in zip(larger, wl)),
        }
    )
    return claims


# --- the mechanism chapter -------------------------------------------------------------------------

MECHANISM_GRID = "mechanism"
ROBUSTNESS_GRID = "mechanism-robustness"  # the 2x2 under other optimisers and learning rates (its own family)


def condition_label(row) -> str:
    """'i.i.d. batch 16', 'non-i.i.d. batch 2' ... for a row with batch_size and sampler."""
    return f"{'i.i.d.' if row['sampler'] == 'iid' else 'non-i.i.d.'} batch {int(row['batch_size'])}"


OPTIMIZER_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD with momentum 0.9"}  # as bnlib.train builds them


def optimisation_label(row) -> str:
    """'Adam, lr 0.001', 'SGD with momentum 0.9, lr 0.03' ... for a row with optimizer and lr."""
    return f"{OPTIMIZER_NAMES.get(row['optimizer'], row['optimizer'])}, lr {float(row['lr']):g}"


# how the 2x2's read-outs tell its conditions apart: by batch and sampler (the mechanism grid), or by optimiser and
# learning rate (its robustness grid, one batch and sampler)
BY_CONDITION = (("batch_size", "sampler"), condition_label)
BY_OPTIMISATION = (("optimizer", "lr"), optimisation_label)


def plateau_answer(plateau: pd.DataFrame, by=BY_CONDITION) -> str:
    """BN's plateau per condition (``by``) by the plan's criterion, in one line (Markdown) from a grid's plateau.csv:
    whether it plateaued, the gain over the last quarter of training and its 95% upper bound, the seeds."""
    from . import analysis

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


def mechanism_tables(folder: Path | None = None, grid: str = MECHANISM_GRID) -> Tables | None:
    """The committed tables of the mechanism grid (or of ``grid``, e.g. its robustness checks) from the
    repository's results/<grid>/, or None before any of its cells is committed."""
    folder = folder or paths.ROOT / "results" / grid
    return tables(grid, folder) if (folder / "summary.csv").exists() else None


def twobytwo(summary: pd.DataFrame, comparisons: pd.DataFrame, by=BY_CONDITION) -> pd.DataFrame:
    """Per condition (``by``: its keys and how to name it): the four corners' final accuracy (mean [95% t interval],
    %) and the three effects of the 2x2 on it (points [interval], verdict after the family's correction, the
    family)."""
    from . import analysis

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


def twobytwo_answer(comparisons: pd.DataFrame, by=BY_CONDITION) -> str:
    """The 2x2's answer in words, condition by condition (``by``: its keys and how to name it): each effect on the
    final accuracy with its interval, its verdict and its family (Markdown; what the table beside it holds, read
    out)."""
    from . import analysis

    said = {**EFFECT_WORDS, "interaction": "the two together beyond their sum"}
    acc = comparisons[comparisons["comparison"].str.startswith("2x2") & (comparisons["outcome"] == "accuracy")]
    lines = []
    keys, label = by
    for cond, part in acc.groupby(list(keys), sort=False):
        eff = part.set_index("comparison")
        parts = [
            f"{said[name]} {percent_interval(e['mean'], e['ci_low'], e['ci_high'], signed=True)} points "
            f"({e['verdict']}, {e['family']})"
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
    from . import analysis

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


def _layer_means(trace_summary: pd.DataFrame, phase: str) -> pd.DataFrame:
    """The trace summary at one phase, averaged over the norm layers: a row per condition (batch_size, sampler) and
    method."""
    part = trace_summary[trace_summary["phase"] == phase]
    metrics = [
        c
        for c in part.columns
        if c in ("log_r_p90", "d_p90", "conv_weight_norm", "gamma_norm", "input_rms", "conv_grad_norm")
    ]
    return part.groupby(["batch_size", "sampler", "method"], sort=False)[[*metrics, "n_seeds"]].mean()


def _size(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _times(x: float) -> str:
    """A ratio as a multiple: '0.073x', '6.3x', '165x', '3,600x'."""
    return f"{x:.2g}x" if x < 10 else f"{x:,.0f}x"


# short names for the prose of the mechanism chapter (tables and figures use plots.display_name)
SHORT = {
    "bn": "BN",
    "bn_detached": "bn_detached",
    "bn_detached_mean": "bn_detached_mean",
    "bn_detached_var": "bn_detached_var",
    "bnrs": "BNRS",
    "brn": "BRN",
    "online": "Online Norm",
    "cbn": "CBN",
    "gn": "GN",
}


def _short(method: str) -> str:
    return SHORT.get(method, display_name(method))


def trace_answer(trace_summary: pd.DataFrame) -> str:
    """The traces of the 2x2's corners read out, condition by condition (Markdown): at the end of training, mean over
    seeds and the norm layers, BN's convolution weight norm (from its start), input RMS of the norm layers and gradient
    norm of the convolution weights, and the other corners' as multiples of BN's; and the gap between the batch's
    statistics and those used by the two running-statistics corners (what the figure shows, in numbers)."""
    lines = []
    first, last = _layer_means(trace_summary, "first"), _layer_means(trace_summary, "last")
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
            f"BN's {metrics['conv_weight_norm']} {_size(first.loc[(batch, sampler, 'bn'), 'conv_weight_norm'])} at the "
            f"start, {_size(bn['conv_weight_norm'])} at the end, {metrics['input_rms']} {_size(bn['input_rms'])}, "
            f"{metrics['conv_grad_norm']} {_size(bn['conv_grad_norm'])}"
        ]
        for m in [m for m in ("bn_detached", "bnrs", "brn") if m in at.index]:
            said.append(f"{_short(m)} " + ", ".join(f"{_times(at.loc[m, k] / bn[k])}" for k in metrics))
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


def _effect(comparisons: pd.DataFrame, name: str, batch: int, sampler: str, outcome: str = "accuracy") -> dict | None:
    rows = comparisons[
        (comparisons["comparison"] == name)
        & (comparisons["batch_size"] == batch)
        & (comparisons["sampler"] == sampler)
        & (comparisons["outcome"] == outcome)
    ]
    return None if rows.empty else rows.iloc[0].to_dict()


def _points(e: dict) -> str:
    """'+7.5 [+6.2, +8.7] points (above, primary)' for one comparison row."""
    return (
        f"{percent_interval(e['mean'], e['ci_low'], e['ci_high'], signed=True)} points ({e['verdict']}, {e['family']})"
    )


EFFECT_WORDS = {
    "forward statistics (running - batch)": "normalising with running instead of batch statistics",
    "gradient through the statistics (without - with)": "cutting the gradient through the statistics",
}


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
            loss = _effect(comparisons, f"2x2: {name}", batch, sampler, "training loss")
            acc = _effect(comparisons, f"2x2: {name}", batch, sampler, "recomputed accuracy")
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
            said.append(
                f"{words}: training loss {loss['mean']:+.3f} [{loss['ci_low']:+.3f}, {loss['ci_high']:+.3f}] "
                f"({loss['verdict']}), accuracy with recomputed statistics {_points(acc)} - {reading}"
            )
        if said:
            lines.append(
                f"- **{condition_label({'batch_size': batch, 'sampler': sampler})}**: " + "; ".join(said) + "."
            )
    return "\n".join(lines)


SPLIT = {"bn_detached_mean": "the variance's gradient only", "bn_detached_var": "the mean's gradient only"}  # kept


def split_answer(summary: pd.DataFrame, comparisons: pd.DataFrame) -> str:
    """Which statistic's gradient matters, read out per condition (Markdown): BN and bn_detached (gradient through both
    statistics, through neither), then each half-cut variant with its accuracy, against bn_detached with its verdict,
    and how many of the points cutting both costs it wins back by keeping one gradient."""
    lines = []
    for (batch, sampler), part in summary.groupby(["batch_size", "sampler"], sort=False):
        acc = part.assign(method=part["method"].astype(str)).set_index("method")["mean"]
        halves = [m for m in SPLIT if m in acc.index]
        if not halves or not {"bn", "bn_detached"} <= set(acc.index):
            continue
        lost = acc["bn"] - acc["bn_detached"]
        said = [
            f"BN {100 * acc['bn']:.1f}%, bn_detached {100 * acc['bn_detached']:.1f}% (cutting both gradients "
            + (f"costs {100 * lost:.1f} points)" if lost > 0 else f"gains {-100 * lost:.1f} points)")
        ]
        for m in halves:
            e = _effect(comparisons, f"{m} - bn_detached", batch, sampler)
            said.append(
                f"keeping {SPLIT[m]} ({m}) {100 * acc[m]:.1f}%"
                + (f", {_points(e)} against bn_detached" if e else "")
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


SWEEP = {"bnrs_m001": 0.01, "bnrs_m003": 0.03, "bnrs": 0.1, "bnrs_m030": 0.3, "bnrs_m100": 1.0}  # BNRS's momentum


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
            e = _effect(comparisons, f"{m} - bnrs", batch, sampler)
            said.append(
                f"momentum {SWEEP[m]:g} {100 * acc.loc[m, 'mean']:.1f}% ({seed_count(acc.loc[[m]])})"
                + (f", {_points(e)} against 0.1" if e else "")
            )
        if "bnrs" in acc.index:
            said.insert(
                sum(SWEEP[m] < 0.1 for m in swept),
                f"momentum 0.1 (BNRS) {100 * acc.loc['bnrs', 'mean']:.1f}% ({seed_count(acc.loc[['bnrs']])})",
            )
        orig = _effect(comparisons, "bnrs_orig_m100 - bn_detached", batch, sampler)
        tail = f" The original's BNRS at momentum 1 against bn_detached: {_points(orig)}" if orig else ""
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
                    f"{_times((of(method)[common] / of(ref)[common]).median())} {_short(ref)}'s time per step in "
                    "its cells"
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
            parts = [f"{_short(m)} {100 * acc.loc[m, 'mean']:.1f}%"]
            for base in ("bnrs", "bn"):
                if (e := _effect(comparisons, f"{m} - {base}", batch, sampler)) is not None:
                    parts.append(f"{_points(e)} against {_short(base)}")
            if cost := relative_cost(batch, sampler, m):
                parts.append(cost)
            said.append(", ".join(parts))
        lines.append(f"- **{condition_label({'batch_size': batch, 'sampler': sampler})}**: " + "; ".join(said) + ".")
    return "\n".join(lines)


def cost_per_step(evaluations: pd.DataFrame) -> pd.DataFrame:
    """Median training milliseconds per step, one row per method and one column per batch size and machine: time per
    step is only comparable on one machine, and a grid's groups of methods may have run on different ones."""
    final = evaluations[evaluations["final"]]
    ms = final.assign(
        ms=1000 * final["train_seconds"] / final["steps_total"],
        machine=final["device_name"].fillna("unknown machine").astype(str).str.replace(r"\(R\)", "", regex=True),
    )
    table = (
        ms.groupby(["method", "batch_size", "machine"])["ms"]
        .median()
        .unstack(["batch_size", "machine"])
        .sort_index(axis=1)
    )
    table.columns = [f"batch {b}, {m}" for b, m in table.columns]
    table.index = [display_name(m) for m in table.index]
    return table.round(1)


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
        e = _effect(comparisons, "bnrs - bn", batch, sampler)
        if e is None:
            continue
        said = [
            f"{_short(m)}: training loss {loss.get((batch, sampler, m), float('nan')):.2f}, test accuracy "
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
            f"BNRS - BN {_points(e)}. " + "; ".join(said) + "." + reading + (" " + gap if gap else "")
        )
    return "\n".join(lines)


def gap_sentence(trace_summary: pd.DataFrame, batch: int, sampler: str, method: str = "brn") -> str:
    """How far a batch's statistics sit from the running ones, at the first and the last trace, under ``sampler``
    and with i.i.d. batches of the same size: measured in BRN, which normalises with running statistics corrected
    to the batch's and so traces r = sigma_B / sigma_running and d = (mu_B - mu_running) / sigma_running in a network
    trained like BN (90th percentiles over channels, mean over the norm layers and seeds)."""
    ends = {phase: _layer_means(trace_summary, phase) for phase in ("first", "last")}

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
        f"How far a batch's statistics sit from the running ones over training, measured in {_short(method)} (its "
        f"traced r = sigma_B / sigma_running and d, 90th percentiles over channels): {here}"
        + (f"; with i.i.d. batches of {batch}: {iid}" if iid else "")
        + "."
    )


# Where the current batch's statistics enter a method in training: (its forward pass, its gradient). BRN (unclipped)
# normalises with the running statistics, as BNRS, and takes its gradient through the batch's; Online Norm takes its
# gradient through streaming estimates (its control process); CBN pools the current batch with earlier ones; GN's
# statistics are each image's own.
CURRENT_BATCH = {
    "bn": (True, True),
    "bn_detached": (True, False),
    "bn_detached_mean": (True, True),
    "bn_detached_var": (True, True),
    "cbn": (True, True),
    "brn": (False, True),
    "bnrs": (False, False),
    "online": (False, False),
    "gn": (False, False),
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
            return ", ".join(f"{_short(r['method'])} {points(r)}" for _, r in rows.iterrows())

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
            forward = [_short(m) for m in known.loc[enters, "method"] if CURRENT_BATCH[m][0]]
            gradient = [_short(m) for m in known.loc[enters, "method"] if not CURRENT_BATCH[m][0]]
            line += (
                " Read together (a grouping written after the cells were seen): one-class batches hurt every method "
                "here whose training uses the current batch's statistics, in its forward pass ("
                + ", ".join(forward)
                + ")"
                + (f" or only in its gradient ({', '.join(gradient)})" if gradient else "")
                + ", and none of those where the current batch enters neither ("
                + ", ".join(_short(m) for m in known.loc[~enters, "method"])
                + ")."
            )
        lines.append(line)
    return "\n".join(lines)


BATCHSTATS_GRID = "mechanism-batchstats"  # the reversal's check: one-class networks on one-class test batches


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
            e = _effect(gap, f"{method}: test_acc_batchstats - test_acc", int(runs["batch_size"].iloc[0]), sampler)
            if e is None:
                continue

            def of(c):
                return percent_interval(runs[c].mean(), *stats.t_interval(runs[c].dropna()))

            said.append(
                f"{_short(method)}: accuracy (%) {of('test_acc')} with its running statistics, "
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
        bn = _effect(gap, "bn: test_acc_batchstats - test_acc", batch, sampler)
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
    last = _layer_means(trace_summary, "last") if trace_summary is not None and len(trace_summary) else None
    rows = []
    for check in TEXTBOOK:
        for (batch, sampler), _ in comparisons.groupby(["batch_size", "sampler"], sort=False):
            e = _effect(comparisons, check["comparison"], batch, sampler)
            if e is None or (sampler == "iid" and batch > check.get("small_batches", batch)):
                continue  # not run, or not what the account speaks of
            reading = (
                "agrees"
                if e["verdict"] in check["agrees"]
                else "contradicts"
                if e["verdict"] in check["contradicts"]
                else "cannot tell"
            )
            data = f"{check['comparison']}: {_points(e)}"
            if check.get("grows") and last is not None and (batch, sampler, "bn") in last.index:
                grown = {
                    m: last.loc[(batch, sampler, m), "conv_weight_norm"]
                    / last.loc[(batch, sampler, "bn"), "conv_weight_norm"]
                    for m in ("bn_detached", "bnrs")
                    if (batch, sampler, m) in last.index
                }
                data += "; weight norm at the end " + ", ".join(
                    f"{_short(m)} {_times(x)} BN's" for m, x in grown.items()
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
