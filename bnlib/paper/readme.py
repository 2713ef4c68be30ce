"""The README's findings section and headline figure, written from the published grid's tables by
``bnlib aggregate study --readme``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from .. import analysis, paths
from ..plots import display_name
from .original import claims_table, original_claims
from .study import HEADLINE_METHODS, correction_sentence, differences, headline, plateau_sentence, why_sentence
from .tables import MECHANISM_GRID, equal_steps, headline_condition
from .words import DATASET_NAMES, budget_words, seed_count

README = paths.README


HEADLINE_ALT = (
    "Final test accuracy against batch size for BN, BN with running statistics (BNRS), Batch "
    "Renormalization (BRN) and GroupNorm, mean over seeds with 95% intervals"
)


README_MARKERS = (
    "<!-- study-findings:start (written by `bnlib aggregate study --readme`) -->",
    "<!-- study-findings:end -->",
)


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

    compared = [m for m in ("bnrs", "brn", "bnwos") if f"{m}_small_diff" in f or f"{m}_large_diff" in f]
    lines = [
        f"![{HEADLINE_ALT}]({figure})",
        "",
        f"*{headline_digest(summary)[1]}*",
        "",
        f"**The answer so far** ({cells_done} of the study grid's {cells_total} cells committed{ran}; computed from "
        "`results/study/summary.csv`). On "
        f"{f['dataset_name']} with i.i.d. batches and a budget of {f['budget']} ({f['seeds']}), BN ends at "
        f"{f['bn_small_text']} at batch {small} and {f['bn_large_text']} at batch {large}. Against it, "
        "paired by seed: "
        + "; ".join(f"{display_name(m)} {differences(f, m)}" for m in compared)
        + ". "
        + (
            f"Intervals are Student-t 95%; {correction_sentence(summary)} "
            + (plateau_sentence(folder, headline_condition(summary)) + " " if folder is not None else "")
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
        plateau = folder / "plateau.csv" if folder is not None else None
        table = claims_table(summary, pd.read_csv(plateau) if plateau is not None and plateau.exists() else None)
        digits = (
            "; the digits' column reads the same rules off exploratory verdicts"
            if "mnist5k" in datasets
            else "; the digits have no cell yet"
        )
        lines += [
            "",
            "**The original study's claims**, judged by the pre-registered analysis plan's rules from its "
            f"primary verdicts (Fashion-MNIST{digits}), and beside them the plan's amendment of "
            f'{analysis.AMENDED} (a difference within the margin can still match; "converges slower" read by the '
            "plateau criterion):",
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

    from .. import plots

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
