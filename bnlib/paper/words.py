"""How the book writes numbers and names: percentage points, intervals, seed counts, lists, budgets, conditions.
Shared by every page's module; decides nothing.
"""

from __future__ import annotations

import pandas as pd


def pp(x: float) -> float:
    """A fraction as percentage points."""
    return 100.0 * float(x)


# How the prose names the datasets (bnlib.train.data's ids)
DATASET_NAMES = {
    "digits": "the 8x8 digits",
    "mnist5k": "MNIST (5,000 digits)",
    "mnist": "MNIST",
    "fashionmnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
}


def and_list(items) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    return " and ".join([", ".join(items[:-1]), items[-1]]) if len(items) > 1 else "".join(items)


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


def adjusted_p(row) -> dict:
    """A summary row's adjusted p-value as the book shows it: the plan's (with its correction and family) in a grid
    with an analysis plan, else the summary's Holm over every comparison."""
    if hasattr(row, "p_adjusted"):
        label = "-" if not isinstance(row.family, str) else f"{row.family}, {row.correction}"
        return {"adjusted p": "–" if pd.isna(row.p_adjusted) else f"{row.p_adjusted:.2g} ({label})"}
    p = getattr(row, "p_holm", float("nan"))
    return {"Holm p": "–" if pd.isna(p) else f"{p:.2g}"}


MIN_SEEDS = 3  # an interval is shown from this many seeds; below, the number says "n = 2, no interval"


def _no_interval(n) -> bool:
    return n is not None and (pd.isna(n) or int(n) < MIN_SEEDS)


def percent_interval(
    mean: float, low: float, high: float, signed: bool = False, n: int | None = None, unit: str = ""
) -> str:
    """A fraction as 'mean [low, high]' in percent (points with a sign for differences), ``unit`` after the mean
    ('88.9% [88.2, 89.5]'); from fewer than :data:`MIN_SEEDS` seeds (``n``), or without an interval, 'mean (n = 2,
    no interval)'. Never NaN."""
    if pd.isna(mean):
        return "–"
    f = (lambda v: f"{100 * v:+.1f}") if signed else (lambda v: f"{100 * v:.1f}")
    if _no_interval(n) or pd.isna(low) or pd.isna(high):
        return f(mean) + unit + ("" if n is None or pd.isna(n) else f" (n = {int(n)}, no interval)")
    return f"{f(mean)}{unit} [{f(low)}, {f(high)}]"


def loss_interval(mean: float, low: float, high: float, n: int | None = None) -> str:
    """A change of a loss (cross-entropy, not a fraction) as '+0.123 [+0.100, +0.150]', with the rules of
    :func:`percent_interval`: 'n = 2, no interval' from fewer than :data:`MIN_SEEDS` seeds, a dash for no number."""
    if pd.isna(mean):
        return "–"
    if _no_interval(n) or pd.isna(low) or pd.isna(high):
        return f"{mean:+.3f}" + ("" if n is None or pd.isna(n) else f" (n = {int(n)}, no interval)")
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def difference(mean: float, low: float, high: float, n: int | None) -> str:
    """A paired difference against BN as the prose writes it: '+2.8 [+2.4, +3.2] points', or '-2.5 points (n = 1,
    no interval)' from fewer than :data:`MIN_SEEDS` seeds. Never NaN."""
    if pd.isna(mean) or _no_interval(n) or pd.isna(low) or pd.isna(high):
        return percent_interval(mean, low, high, signed=True, n=n, unit=" points")
    return f"{percent_interval(mean, low, high, signed=True)} points"


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


EFFECT_WORDS = {
    "forward statistics (running - batch)": "normalising with running instead of batch statistics",
    # what the factor computes (book/methods.md): BN's and BRN's backward passes project the gradient off 1 and x_hat,
    # bn_detached's and BNRS's do not -- nothing is "cut" in BNRS, whose statistics do not depend on the batch
    "gradient through the statistics (without - with)": "leaving out the normalising backward pass",
}


# The 2x2's simple effects (bnlib.analysis.SIMPLE_EFFECTS) as a table's headers name them
SIMPLE_WORDS = dict(
    zip(
        ("brn - bn", "bnrs - bn_detached", "bn_detached - bn", "bnrs - brn"),
        (
            "running statistics, backward pass kept (BRN - BN)",
            "running statistics, no normalising backward (BNRS - bn_detached)",
            "no normalising backward, batch statistics (bn_detached - BN)",
            "no normalising backward, running statistics (BNRS - BRN)",
        ),
    )
)


def verdict_points(e: dict) -> str:
    """'+7.5 [+6.2, +8.7] points (above, primary)' for one comparison row."""
    return f"{difference(e['mean'], e['ci_low'], e['ci_high'], e.get('n_seeds'))} ({e['verdict']}, {e['family']})"


def magnitude(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def multiple(x: float) -> str:
    """A ratio as a multiple: '0.073x', '6.3x', '165x', '3,600x'."""
    return f"{x:.2g}x" if x < 10 else f"{x:,.0f}x"
