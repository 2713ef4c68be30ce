"""The README's findings section and headline figure, written from the published grid's tables by
``bnlib aggregate study --readme``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from .. import analysis, paths
from ..plots import display_name
from . import answer
from .answer import one_class
from .guards import UnsupportedSentence
from .original import claims_table, original_claims
from .study import HEADLINE_METHODS, correction_sentence, differences, headline
from .tables import PUBLISHED_GRID, Tables, equal_steps, headline_condition
from .words import DATASET_NAMES, budget_words, seed_count

README = paths.README


HEADLINE_ALT = (
    "Final test accuracy against batch size for BN, BN with running statistics (BNRS), Batch "
    "Renormalization (BRN) and GroupNorm with i.i.d. batches, and beside it with one-class batches, mean over seeds "
    "with 95% intervals"
)


README_MARKERS = (
    "<!-- study-findings:start (written by `bnlib aggregate study --readme`) -->",
    "<!-- study-findings:end -->",
)


def readme_findings(
    summary: pd.DataFrame,
    cells_done: int,
    commits: list[str] = (),
    folder: Path | None = None,
    mechanism: pd.DataFrame | None = None,
    batchstats: pd.DataFrame | None = None,
) -> str:
    """The README's first screen: the headline figure, then the answer. For a grid with the analysis plan
    (``summary`` carries ``family``), the intro's three sentences (:func:`.answer.in_short`) with the numbers of the
    committed tables -- BN's plateau status from ``folder``'s plateau.csv, the mechanism grid's ``analysis.csv``
    (``mechanism``) and the one-class check's ``summary_batchstats.csv`` (``batchstats``); a claim they no longer
    support stops the writer (:class:`.guards.UnsupportedSentence`) -- then how it was measured and the original
    study's four claims by the plan's rules. For a grid without one, the paired differences of the headline
    condition and the claims under the original's equal-steps budget."""
    planned = "family" in summary
    ran = f", run with the code of commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}" if commits else ""
    f = headline(summary)
    figure = paths.README_FIGURE.relative_to(paths.ROOT).as_posix()
    lines = [f"![{HEADLINE_ALT}]({figure})", "", f"*{headline_digest(summary)[1]}*", ""]
    if planned:
        plateau = folder / "plateau.csv" if folder is not None else None
        plateau = pd.read_csv(plateau) if plateau is not None and plateau.exists() else None
        tables = Tables(PUBLISHED_GRID, folder or Path("."), None, None, summary, None, None, [], None, plateau)
        facts = answer.facts(tables, mechanism, batchstats)
        if failed := answer.unsupported(facts, *answer.IN_SHORT_CLAIMS):
            raise UnsupportedSentence("the README's answer no longer holds: " + "; ".join(failed))
        lines += [
            answer.in_short(facts),
            "",
            f"Measured on {f['dataset_name']} with {f['seeds']} per condition, each batch size trained until BN's "
            f"accuracy stopped improving ({f['budget']}), every method in lockstep on the same batches from the same "
            "weights; differences are paired by seed with Student-t 95% intervals, and "
            + correction_sentence(summary)
            + f" Computed from the {cells_done} committed cells of `results/study/`{ran}, with the mechanism grid's "
            "`results/mechanism/` for the backward pass; the book has every method and condition, the mechanism "
            "and the controls.",
        ]
    else:
        small, large = f["small"], f["large"]
        compared = [m for m in ("bnrs", "brn", "bnwos") if f"{m}_small_diff" in f or f"{m}_large_diff" in f]
        lines.append(
            f"**The answer so far** ({cells_done} cells committed{ran}; computed from `results/study/summary.csv`). "
            f"On {f['dataset_name']} with i.i.d. batches and a budget of {f['budget']} ({f['seeds']}), BN ends at "
            f"{f['bn_small_text']} at batch {small} and {f['bn_large_text']} at batch {large}. Against it, paired by "
            "seed: "
            + "; ".join(f"{display_name(m)} {differences(f, m)}" for m in compared)
            + ". Intervals are Student-t 95%; a verdict is a paired t-test at 5% after Holm's correction over all "
            f'{f["family"]} comparisons with BN in the grid, so at {f["seeds"]} many read "cannot tell". These '
            "networks were not trained to a plateau: the numbers describe training under a short budget. The book's "
            "Summary page has every method and condition."
        )
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
    drawn = pd.concat([shown, one_class(summary)])  # and the one-class panel's
    numbers = drawn[["method", "batch_size", "n_seeds", "mean", "ci_low", "ci_high"]].round(6).to_csv(index=False)
    oc = one_class(summary)
    caption = (
        f"Final test accuracy on {DATASET_NAMES.get(shown['dataset'].iloc[0], shown['dataset'].iloc[0])}, mean over "
        f"{seed_count(drawn)} with Student-t 95% intervals. Left, i.i.d. batches, budget {budget_words(shown)}"
        + (
            f"; right, batches of {int(oc['batch_size'].iloc[0])} that hold one class (exploratory), tested with the "
            "running statistics."
            if len(oc)
            else "."
        )
    )
    return hashlib.sha256(numbers.encode()).hexdigest()[:16], caption


def save_headline_png(summary: pd.DataFrame, path: Path = paths.README_FIGURE) -> Path:
    """The headline figure as PNG (the README's), its numbers' fingerprint in the PNG's Description."""
    import matplotlib.pyplot as plt

    from .. import plots

    fig = plots.headline_figure(headline_condition(summary), HEADLINE_METHODS, one_class(summary))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(
        path, dpi=100, metadata={"Description": f"bnlib headline {headline_digest(summary)[0]}", "Software": None}
    )
    plt.close(fig)
    return path


def write_readme_findings(
    summary: pd.DataFrame,
    cells_done: int,
    readme: Path = README,
    commits: list[str] = (),
    folder: Path | None = None,
    mechanism: pd.DataFrame | None = None,
    batchstats: pd.DataFrame | None = None,
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
        + readme_findings(summary, cells_done, commits, folder, mechanism, batchstats)
        + "\n"
        + end
        + rest.split(end, 1)[1]
    )
