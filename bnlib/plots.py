"""Figures, and how methods look in them: one display name and one colour per method across the whole book, and
one line style per family of methods, so a figure with many methods reads by family first. Every method of
:data:`bnlib.norms.REGISTRY` has its style in :mod:`bnlib.methods` (tests/test_house.py checks)."""

from __future__ import annotations

# No backend is forced: kernels use the inline backend (figures become PNG outputs); elsewhere matplotlib
# falls back to Agg by itself when there is no display.
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import FuncFormatter, MaxNLocator

from . import methods as methods_mod
from . import stats
from .record import RunRecord

sns.set_theme(context="notebook", style="whitegrid")


def vector_figures() -> None:
    """Book pages show figures as SVG (sharp at any width; each lands in _build/html/_images, downloadable), each
    titled with :func:`describe` (the book's extension makes that title the image's alt text)."""
    import io

    from IPython import get_ipython
    from matplotlib.figure import Figure
    from matplotlib_inline.backend_inline import set_matplotlib_formats

    set_matplotlib_formats("svg")

    def svg(fig: Figure) -> str:
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Title": describe(fig)})
        return buffer.getvalue()

    shell = get_ipython()
    if shell is not None:
        shell.display_formatter.formatters["image/svg+xml"].for_type(Figure, svg)


def describe(fig) -> str:
    """A figure in words, from what it draws: its axes' labels, its panels' titles and its legends' entries (the
    alt text of the book's figures)."""
    axes = [ax for ax in fig.axes if ax.has_data()]

    def unique(items):
        return list(dict.fromkeys(i for i in items if i))

    ys, xs = unique(ax.get_ylabel() for ax in axes), unique(ax.get_xlabel() for ax in axes)
    if ys:
        text = " and ".join(ys) + (" against " + " and ".join(xs) if xs else "")
    else:  # a row per item, named by the tick labels (the differences against BN)
        rows = unique(t.get_text().replace("\n", " ") for t in axes[0].get_yticklabels()) if axes else []
        text = (" and ".join(xs) or "A figure") + (" for " + ", ".join(rows) if rows else "")
    titles = unique(ax.get_title() for ax in axes)
    if titles:
        text += "; panels: " + ", ".join(titles)
    legends = [lg for lg in [*fig.legends, *(ax.get_legend() for ax in fig.axes)] if lg is not None]
    for legend in legends:
        title = legend.get_title().get_text()
        text += f"; {title or 'lines'}: " + ", ".join(t.get_text().replace("\n", " ") for t in legend.get_texts())
    return text + "."


# How methods look: one display name and colour per method, the panels and the line families -- read from
# bnlib.methods, the one table of what a method is for the reader.
OKABE_ITO = methods_mod.OKABE_ITO
STYLES = {m.id: (m.name, m.hex) for m in methods_mod.TABLE}
PANELS = methods_mod.PANELS


def panels(methods) -> list[tuple[str, list[str]]]:
    """The panels for ``methods``: (title, BN first when present, then the panel's members present); a panel
    whose members present are all drawn in an earlier panel is left out (BNRS's momentum without its sweep), and
    with BN alone there is one panel."""
    present = set(map(str, methods))
    ref = ["bn"] if "bn" in present else []
    out, drawn = [], set()
    for title, members in PANELS.items():
        shown = [m for m in members if m in present]
        if set(shown) - drawn:
            out.append((title, ref + shown))
            drawn |= set(shown)
    return out or [("BN", ref)]


def display_name(method: str) -> str:
    """The method's name in tables, legends and prose (an unknown id is shown as it is)."""
    return STYLES[method][0] if method in STYLES else method


def colour(method: str) -> str:
    return STYLES[method][1]


# Families of methods, in the order legends list them: members (registry order), dash pattern and its name
FAMILIES = {
    family: (tuple(m.id for m in methods_mod.TABLE if m.family == family), dashes, style)
    for family, (dashes, style) in methods_mod.FAMILY_LINES.items()
}
_FAMILY_OF = {m: family for family, (members, _, _) in FAMILIES.items() for m in members}


def family(method: str) -> str:
    return _FAMILY_OF[method]


def dashes(method: str) -> tuple:
    """The method's family's dash pattern (seaborn's ``dashes`` form)."""
    return FAMILIES[family(method)][1]


def linestyle(method: str):
    """The same pattern as a matplotlib ``linestyle``."""
    pattern = dashes(method)
    return (0, pattern) if pattern else "-"


def style_key() -> str:
    """The line-style legend of every figure, as a Markdown list (the book's Results page shows it)."""
    return "\n".join(
        f"- {style}: {family} ({'; '.join(display_name(m) for m in members)})"
        for family, (members, _, style) in FAMILIES.items()
    )


def palette(methods) -> dict[str, str]:
    return {m: colour(m) for m in methods}


def _order(methods) -> list[str]:
    """Family by family, in registry order within a family."""
    present = set(methods)
    return [m for members, _, _ in FAMILIES.values() for m in methods_mod.METHODS if m in members and m in present]


def _styled(methods) -> dict:
    """relplot keywords: colour per method, dash pattern per family, one legend entry per method."""
    return {
        "hue": "method",
        "hue_order": methods,
        "palette": palette(methods),
        "style": "method",
        "style_order": methods,
        "dashes": {m: dashes(m) for m in methods},
    }


def _handles(methods) -> list:
    """Legend entries drawn as the lines are (colour, family's dashes)."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=colour(m), ls=linestyle(m), lw=1.8, label=wrapped(display_name(m))) for m in methods]


def wrapped(text: str, width: int = 22) -> str:
    """A long name over lines, so that legends and tick labels beside the panels stay narrow."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


# Figures are drawn for the book's article column: 757 px at a 1,400 px window (sphinx-book-theme, measured in
# chromium); a wider figure is scaled down, and its text must stay at or above MIN_TEXT_PT there
# (tests/test_book.py measures every figure function).
COLUMN_PT, MIN_TEXT_PT, TEXT_PT = 757 * 0.75, 9.0, 10.5
PANEL_WIDTH, PANEL_HEIGHT = 1.9, 2.0  # inches


def _thousands(value: float, _position=None) -> str:
    """A tick label in thousands: 0, 500, 25k, 1.5M."""
    if abs(value) >= 1e6:
        return f"{value / 1e6:g}M"
    return f"{value / 1e3:g}k" if abs(value) >= 1e3 else f"{value:g}"


def _panel_figure(data: pd.DataFrame, col: str | None, draw, xlabel: str, ylabel: str, col_label=str):
    """Small multiples: a row per panel of methods (:func:`panels`), a column per value of ``col``; ``draw(ax,
    frame, method)`` draws one method's line; each row's legend beside it, titled with the panel."""
    groups = panels(data["method"].unique())
    cols = sorted(data[col].unique()) if col else [None]
    fig, axes = plt.subplots(
        len(groups),
        len(cols),
        squeeze=False,
        sharey=True,
        figsize=(max(PANEL_WIDTH * len(cols), 3.0) + 2.2, PANEL_HEIGHT * len(groups) + 0.5),
    )
    for i, (title, methods) in enumerate(groups):
        for j, value in enumerate(cols):
            ax = axes[i][j]
            part = data if col is None else data[data[col] == value]
            for m in methods:
                draw(ax, part[part["method"].astype(str) == m], m)
            if i == 0 and col is not None:
                ax.set_title(col_label(value), fontsize="medium")
            ax.set_xlabel(xlabel if i == len(groups) - 1 else "")
            ax.set_ylabel(ylabel if j == 0 else "")
            if xlabel == "samples seen":  # 25k, not 25000: a narrow panel's ticks stay apart
                ax.xaxis.set_major_locator(MaxNLocator(3))
                ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
        axes[i][-1].legend(
            handles=_handles(methods),
            title=title,
            loc="upper left",
            bbox_to_anchor=(1.03, 1.0),
            frameon=False,
            fontsize=TEXT_PT,
            title_fontsize=TEXT_PT,
            alignment="left",
        )
    fig.tight_layout()
    return fig


def _mean_band(ax, frame: pd.DataFrame, x: str, y: str, method: str, **kw) -> None:
    """The mean over seeds against ``x`` with its Student-t 95% band."""
    g = frame[frame[y].notna()].groupby(x)[y]
    if not len(g):
        return
    mean = g.mean()
    band = g.apply(lambda v: stats.t_interval(v.to_numpy()))
    ax.plot(mean.index, mean.values, color=colour(method), ls=linestyle(method), lw=1.5, **kw)
    ax.fill_between(mean.index, [b[0] for b in band], [b[1] for b in band], color=colour(method), alpha=0.15, lw=0)


def _legend_names(ax) -> None:
    """The axes' legend with display names, beside the axes (a cell draws every method of its grid in one axes)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(
            handles,
            [display_name(lbl) if lbl in methods_mod.METHODS else lbl for lbl in labels],
            fontsize="small",
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            frameon=False,
        )


def cell_curves(result: RunRecord):
    """One cell: training loss and test accuracy over steps, a line per method."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8))
    for m, rec in result.methods.items():
        ax_loss.plot(rec.train_step, rec.train_loss, color=colour(m), ls=linestyle(m), label=m, lw=1.2)
        acc = [100 * a if a is not None else np.nan for a in rec.test_acc]  # in %
        ax_acc.plot(rec.eval_step, acc, color=colour(m), ls=linestyle(m), label=m, marker="o", ms=3, lw=1.2)
        if rec.diverged:
            ax_acc.axvline(rec.diverged_step, color=colour(m), ls=":", lw=1)
    ax_loss.set(xlabel="step", ylabel="training loss (window mean)", yscale="log", title="Training loss")
    ax_acc.set(xlabel="step", ylabel="test accuracy (%)", title="Test accuracy (eval mode)")
    _legend_names(ax_acc)
    fig.tight_layout()
    return fig


def final_table(result: RunRecord) -> pd.DataFrame:
    """One cell: the final numbers per method."""
    rows = []
    for m, rec in result.methods.items():
        rows.append(
            {
                "method": display_name(m),
                "final test acc": rec.final.test_acc,
                "with recomputed stats": rec.final.test_acc_recomputed,
                "final train loss": rec.final.train_loss,
                "diverged at step": rec.diverged_step,
                "samples / s": rec.samples_per_second,
            }
        )
    return pd.DataFrame(rows).set_index("method")


def _batch_label(value) -> str:
    return f"batch {value}"


def accuracy_over_training(
    evals: pd.DataFrame, column: str = "test_acc", x: str = "samples_seen", col: str = "batch_size"
):
    """The original study's figure with statistics: mean test accuracy over seeds with its Student-t 95% band, a
    row per panel of methods, a column per ``col`` value."""
    data = evals[evals[column].notna()]
    data = data.assign(**{column: 100 * data[column]})  # in %, as every accuracy of the book
    return _panel_figure(
        data,
        col,
        lambda ax, f, m: _mean_band(ax, f, x, column, m),
        "samples seen" if x == "samples_seen" else x,
        "test accuracy (%)",
        _batch_label if col == "batch_size" else str,
    )


def loss_over_training(losses: pd.DataFrame, col: str = "batch_size"):
    """Training loss (window means) over samples seen, as :func:`accuracy_over_training`, log scale."""
    fig = _panel_figure(
        losses,
        col,
        lambda ax, f, m: _mean_band(ax, f, "samples_seen", "train_loss", m),
        "samples seen",
        "training loss",
        _batch_label if col == "batch_size" else str,
    )
    for ax in fig.axes:
        ax.set_yscale("log")
    return fig


def final_vs_batch(summary: pd.DataFrame, col: str | None = None, value: str = "mean"):
    """Final accuracy against batch size: mean over seeds with the t interval as error bars, a row per panel of
    methods, a column per ``col`` value."""
    sizes = sorted(summary["batch_size"].unique())

    def draw(ax, g, m):
        g = g.set_index("batch_size").reindex(sizes)
        err = [(g[value] - g["ci_low"]).clip(lower=0).fillna(0), (g["ci_high"] - g[value]).clip(lower=0).fillna(0)]
        k = list(map(str, summary["method"].unique())).index(m)  # dodge overlapping bars
        xs = [p * (1 + 0.025 * (k % 6 - 2.5)) for p in sizes]
        ax.errorbar(
            xs, g[value], yerr=err, color=colour(m), ls=linestyle(m), label=m, marker="o", ms=4, capsize=2, lw=1.4
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()

    in_percent = summary.assign(**{c: 100 * summary[c] for c in (value, "ci_low", "ci_high")})
    return _panel_figure(
        in_percent.assign(method=summary["method"].astype(str)), col, draw, "batch size", "final test accuracy (%)", str
    )


# Runs that are not methods (the pilots' budgets and schedules): the palette's colours after BN's black, in order
PILOT_COLOURS = [c for name, c in OKABE_ITO.items() if name not in ("black", "grey")]
VERDICT_COLOURS = {
    "below": OKABE_ITO["vermillion"],
    "above": OKABE_ITO["blue"],
    "equivalent": OKABE_ITO["bluish green"],
    "cannot tell": OKABE_ITO["grey"],
}


def differences(part: pd.DataFrame, methods) -> plt.Figure:
    """Each method against BN in one condition: the paired difference in points with its 95% t interval, a panel
    per batch size, a row per method, zero marked; coloured by the summary's verdict (below, above, equivalent where
    a plan tests equivalence, cannot tell)."""
    shown = [m for m in methods if m in set(part["method"].astype(str)) and m != "bn"]
    sizes = sorted(part["batch_size"].unique())
    # the method names and the legend need about 2.6 inches whatever the number of panels
    fig, axes = plt.subplots(
        1,
        len(sizes),
        figsize=(min(6.2, 2.6 + 1.5 * len(sizes)), 1.3 + 0.5 * max(len(shown), 1)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for ax, size in zip(axes[0], sizes):
        for k, m in enumerate(shown):
            r = part[(part["method"].astype(str) == m) & (part["batch_size"] == size)]
            if r.empty or pd.isna(r["diff_vs_bn"].iloc[0]):
                continue
            d, lo, hi = (100 * r[c].iloc[0] for c in ("diff_vs_bn", "diff_ci_low", "diff_ci_high"))
            verdict = r["verdict"].iloc[0] if isinstance(r["verdict"].iloc[0], str) else "cannot tell"
            ax.errorbar(
                [d],
                [k],
                xerr=[[max(d - lo, 0)], [max(hi - d, 0)]],
                color=VERDICT_COLOURS.get(verdict, OKABE_ITO["grey"]),
                marker="o",
                ms=5,
                capsize=3,
                lw=1.8,
            )
        ax.axvline(0, color=colour("bn"), lw=1)
        ax.set_title(f"batch {size}", fontsize="medium")
    fig.supxlabel("difference from BN (points)", fontsize=TEXT_PT)  # once: per panel the labels ran into each other
    axes[0][0].set_yticks(range(len(shown)), [wrapped(display_name(m)) for m in shown])
    axes[0][0].set_ylim(len(shown) - 0.5, -0.5)
    from matplotlib.lines import Line2D

    verdicts = set(part["verdict"].dropna()) if "verdict" in part else set()
    axes[0][-1].legend(
        handles=[
            Line2D([], [], color=c, marker="o", lw=1.8, label=v)
            for v, c in VERDICT_COLOURS.items()
            if v != "equivalent" or v in verdicts
        ],
        title="verdict",
        loc="upper left",
        bbox_to_anchor=(1.03, 1.0),
        frameon=False,
        fontsize=TEXT_PT,
        title_fontsize=TEXT_PT,
    )
    fig.tight_layout()
    return fig


def headline_figure(part: pd.DataFrame, methods, one_class: pd.DataFrame | None = None) -> plt.Figure:
    """The book's headline: final test accuracy against batch size for ``methods`` (mean over seeds, Student-t
    95% interval); with ``one_class`` (summary rows of one-class batches at one batch size) a narrow second panel
    beside it on the same axis. The legend above, in one row of short names, so that it stays readable on a phone."""
    shown = [m for m in methods if m in set(part["method"].astype(str))]
    panels = 2 if one_class is not None and len(one_class) else 1
    fig, axes = plt.subplots(
        1, panels, figsize=(7.6, 3.9), sharey=True, squeeze=False, gridspec_kw={"width_ratios": [3, 1.25][:panels]}
    )
    ax = axes[0, 0]
    sizes = sorted(part["batch_size"].unique())

    def draw(ax, rows, xs, m, **kw):
        err = [
            (rows["mean"] - rows["ci_low"]).clip(lower=0).fillna(0),
            (rows["ci_high"] - rows["mean"]).clip(lower=0).fillna(0),
        ]
        style = dict(color=colour(m), marker="o", ms=5, capsize=3, lw=1.8)
        ax.errorbar(xs, 100 * rows["mean"], yerr=[100 * e for e in err], **style, **kw)

    for k, m in enumerate(shown):
        g = part[part["method"].astype(str) == m].set_index("batch_size").reindex(sizes)
        draw(
            ax,
            g,
            [b * (1 + 0.04 * (k - (len(shown) - 1) / 2)) for b in sizes],
            m,
            ls=linestyle(m),
            label=methods_mod.short(m),
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set(xlabel="batch size", ylabel="final test accuracy (%)", title="i.i.d. batches")
    if panels == 2:
        oc = axes[0, 1]
        rows = one_class.assign(method=one_class["method"].astype(str)).set_index("method")
        here = [m for m in shown if m in rows.index]
        for k, m in enumerate(here):
            draw(oc, rows.loc[[m]], [k], m, ls="none")
        oc.set_xticks(
            range(len(here)), [methods_mod.short(m) for m in here], rotation=35, ha="right", rotation_mode="anchor"
        )
        oc.set_xlim(-0.6, len(here) - 0.4)
        oc.set(title=f"one class per batch,\nbatch {int(one_class['batch_size'].iloc[0])}")
    fig.legend(
        *ax.get_legend_handles_labels(), loc="upper center", ncol=len(shown), frameon=False, bbox_to_anchor=(0.5, 1.0)
    )
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig


def _rename_legend(grid) -> None:
    """A seaborn figure's legend: display names, beside the panels."""
    if grid.legend is not None:
        for text in grid.legend.texts:
            if text.get_text() in methods_mod.METHODS:
                text.set_text(display_name(text.get_text()))
        sns.move_legend(grid, "upper left", bbox_to_anchor=(1.0, 0.98), title=None, frameon=False)


def seeds_needed(halfwidths: pd.DataFrame):
    """Half-width of the paired 95% interval against BN (points) by number of seeds: median over conditions, a
    panel per group of methods."""
    if halfwidths.empty:
        fig, ax = plt.subplots(figsize=(7, 2.5))
        ax.text(0.5, 0.5, "fewer than two seeds per condition so far", ha="center", va="center", transform=ax.transAxes)
        return fig

    def draw(ax, g, m):
        g = g.groupby("n_seeds")["halfwidth_points"].median()
        ax.plot(g.index, g.values, marker="o", ms=3.5, color=colour(m), ls=linestyle(m), lw=1.5)
        ax.set_yscale("log")
        ax.set_xticks(sorted(halfwidths["n_seeds"].unique()))

    return _panel_figure(halfwidths, None, draw, "seeds", "95% half-width (points)")


TRACE_LABELS = {
    "log_r_p90": "|log r|, 90th pct. of channels",
    "d_p90": "|d|, 90th pct. of channels",
    "conv_weight_norm": "conv weight norm",
    "gamma_norm": "gamma norm",
    "input_rms": "input RMS",
    "conv_grad_norm": "conv weight gradient norm",
}


def _decade_label(y: float, _pos=None) -> str:
    """A log10 value's tick label as the plain number: 0.01, 0.3, 3, 30, 1,000."""
    x = 10**y
    return f"{x:,.0f}" if x >= 100 else f"{x:.2g}"


def traces_over_training(
    frame: pd.DataFrame, methods, metrics=tuple(TRACE_LABELS), col: str = "condition", smooth: int = 9
):
    """The norm layers' traces over training: a row per metric, a column per condition, a line per method (the
    mean over layers, each seed's trace smoothed for display by a centred running mean over ``smooth`` traces, then
    the mean over seeds with the t band over seeds); norms and RMS on a log scale (their log10 averaged, so a band
    never reaches below zero); the legend above the panels."""
    keys = [col, "method", "seed"]
    data = frame[frame["method"].isin(methods)].groupby([*keys, "step"], as_index=False)[list(metrics)].mean()
    logged = [m for m in metrics if any(w in TRACE_LABELS[m] for w in ("norm", "RMS"))]
    data[logged] = np.log10(data[logged].clip(lower=1e-12))
    data = data.sort_values([*keys, "step"])
    data[list(metrics)] = data.groupby(keys)[list(metrics)].transform(
        lambda v: v.rolling(smooth, center=True, min_periods=1).mean()
    )
    long = data.melt(id_vars=[*keys, "step"], value_vars=list(metrics), var_name="metric")
    long["metric"] = long["metric"].map(TRACE_LABELS)
    order = [m for m in methods if m in set(data["method"])]
    grid = sns.relplot(
        data=long,
        x="step",
        y="value",
        **_styled(order),
        row="metric",
        col=col,
        kind="line",
        legend=False,
        errorbar=stats.t_interval,
        height=1.7,
        aspect=1.3,
        facet_kws={"sharex": False, "sharey": False, "legend_out": False},
    )
    grid.set_titles(template="{col_name}", size=TEXT_PT)
    logged_labels = {TRACE_LABELS[m] for m in logged}
    for i, (label, row) in enumerate(zip(grid.row_names, grid.axes)):  # the metric as the row's y label
        row[0].set_ylabel(wrapped(label + (" (log)" if label in logged_labels else ""), 18), fontsize=TEXT_PT)
        for ax in row:
            if i:
                ax.set_title("")
            ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
            ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
            if label in logged_labels:
                ax.yaxis.set_major_locator(MaxNLocator(nbins=4, steps=[1, 2, 5, 10]))
                ax.yaxis.set_major_formatter(FuncFormatter(_decade_label))
    import warnings

    with warnings.catch_warnings():  # tight_layout cannot account for the figure legend: room is made for it below
        warnings.simplefilter("ignore", UserWarning)
        grid.figure.tight_layout()
    grid.figure.subplots_adjust(top=1 - 0.85 / grid.figure.get_figheight())  # room for the legend and the titles
    grid.figure.legend(
        handles=_handles(order),
        labels=[wrapped(display_name(m), 20) for m in order],
        loc="upper center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=len(order),
        frameon=False,
        fontsize=TEXT_PT,
        columnspacing=1.0,
        handlelength=1.8,
    )
    return grid


def two_by_two_figure(summary: pd.DataFrame, corners: dict[str, tuple[str, str]]) -> plt.Figure:
    """The mechanism's 2x2 as an interaction plot, one panel per condition: final test accuracy (%, mean over seeds
    with its Student-t 95% interval) against the forward pass's statistics, one line with the normalising backward
    pass and one without (``corners``: method -> (forward statistics, backward pass), as
    :data:`bnlib.analysis.CORNERS`). Parallel lines: no interaction."""
    s = summary[summary["method"].astype(str).isin(corners)].copy()
    s["method"] = s["method"].astype(str)
    keys = ["sampler", "batch_size"] + (["classes_per_batch"] if "classes_per_batch" in s else [])
    conditions = [
        c for c, part in s.groupby(keys, dropna=False, sort=False) if part["method"].nunique() == len(corners)
    ]
    conditions.sort(key=lambda c: (c[0] != "iid", c[1]))
    fig, axes = plt.subplots(1, len(conditions), figsize=(7.6, 3.4), sharey=True, squeeze=False)
    forwards = list(dict.fromkeys(f for f, _ in corners.values()))
    lines = {  # BN's black and BNRS's vermillion: the corners the two lines start from
        "with": (methods_mod.METHODS["bn"].hex, "-", "with the normalising backward pass"),
        "without": (methods_mod.METHODS["bnrs"].hex, "--", "without it"),
    }
    for ax, cond in zip(axes[0], conditions):
        part = s.set_index(keys).loc[[cond]].set_index("method")
        for backward, (col, ls, label) in lines.items():
            ms = [m for f in forwards for m, (ff, bb) in corners.items() if ff == f and bb == backward]
            rows = part.loc[ms]
            err = [
                100 * (rows["mean"] - rows["ci_low"]).clip(lower=0).fillna(0),
                100 * (rows["ci_high"] - rows["mean"]).clip(lower=0).fillna(0),
            ]
            ax.errorbar(
                range(len(ms)),
                100 * rows["mean"],
                yerr=err,
                color=col,
                ls=ls,
                marker="o",
                ms=5,
                capsize=3,
                lw=1.8,
                label=label,
            )
            for k, m in enumerate(ms):  # the corner's name beside its point, inside the panel
                ax.annotate(
                    methods_mod.short(m),
                    (k, 100 * rows.loc[m, "mean"]),
                    textcoords="offset points",
                    xytext=(7 if k == 0 else -7, 4),
                    ha="left" if k == 0 else "right",
                    fontsize=8,
                    color=col,
                )
        sampler, batch = cond[0], int(cond[1])
        classes = cond[2] if len(cond) > 2 else None
        title = (
            f"i.i.d., batch {batch}"
            if sampler == "iid"
            else f"{int(classes) if classes == classes else 'few'} class, batch {batch}"
        )
        ax.set(title=title, xlim=(-0.4, len(forwards) - 0.6))
        ax.set_xticks(range(len(forwards)), forwards)
    axes[0, 0].set_ylabel("final test accuracy (%)")
    fig.legend(
        *axes[0, 0].get_legend_handles_labels(), loc="upper center", ncol=2, frameon=False, bbox_to_anchor=(0.5, 1.0)
    )
    fig.supxlabel("statistics the forward pass normalises with", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig
