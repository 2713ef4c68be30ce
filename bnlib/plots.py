"""Figures, and how methods look in them: one display name and one colour per method across the whole book, and
one line style per family of methods, so a figure with many methods reads by family first. Every method of
:data:`bnlib.norms.REGISTRY` has its style here (tests/test_book.py checks)."""

from __future__ import annotations

# No backend is forced: kernels use the inline backend (figures become PNG outputs); elsewhere matplotlib
# falls back to Agg by itself when there is no display.
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from . import norms, stats
from .record import RunRecord

sns.set_theme(context="notebook", style="whitegrid")


def vector_figures() -> None:
    """Book pages show figures as SVG (sharp at any width; each lands in _build/html/_images, downloadable)."""
    from matplotlib_inline.backend_inline import set_matplotlib_formats

    set_matplotlib_formats("svg")


# Per method id: its display name and its colour, in the registry's order.
STYLES = {
    "bn": ("BN", "#1f77b4"),
    "bnrs": ("BN, running stats (BNRS)", "#d62728"),
    "brn": ("Batch Renorm (BRN)", "#2ca02c"),
    "brnc": ("Batch Renorm, clipped (BRNC)", "#98df8a"),
    "brnc_warmup": ("BRNC, paper's warm-up", "#17becf"),
    "bnrs_orig": ("BNRS as the original", "#ff9896"),
    "brn_orig": ("BRN as the original", "#bcbd22"),
    "brnc_orig": ("BRNC as the original", "#dbdb8d"),
    "bnwos": ("BN without sync (BNWoS)", "#ff7f0e"),
    "bn_detached": ("BN, no gradient through mu_B, var_B", "#393b79"),
    "bn_detached_mean": ("BN, no gradient through mu_B", "#6b6ecf"),
    "bn_detached_var": ("BN, no gradient through var_B", "#9c9ede"),
    "bnrs_m001": ("BNRS, momentum 0.01", "#67000d"),
    "bnrs_m003": ("BNRS, momentum 0.03", "#a50f15"),
    "bnrs_m030": ("BNRS, momentum 0.3", "#fb6a4a"),
    "bnrs_m100": ("BNRS, momentum 1", "#fcae91"),
    "bnrs_orig_m001": ("BNRS as the original, momentum 0.01", "#49006a"),
    "bnrs_orig_m003": ("BNRS as the original, momentum 0.03", "#7a0177"),
    "bnrs_orig_m030": ("BNRS as the original, momentum 0.3", "#dd3497"),
    "bnrs_orig_m100": ("BNRS as the original, momentum 1", "#fa9fb5"),
    "online": ("Online Norm", "#e6550d"),
    "cbn": ("Cross-Iteration BN (CBN)", "#31a354"),
    "gbn": ("Ghost BN (16 per ghost batch)", "#aec7e8"),
    "mabn": ("Moving Average BN (MABN)", "#9467bd"),
    "bln": ("Batchless Norm (BLN)", "#8c564b"),
    "gn": ("GroupNorm (GN)", "#e377c2"),
    "gn_ws": ("GN + Weight Std (GN+WS)", "#f7b6d2"),
    "frn": ("Filter Response Norm (FRN)", "#c5b0d5"),
    "evonorm": ("EvoNorm-S0", "#c49c94"),
    "none": ("No normalisation", "#7f7f7f"),
}


def display_name(method: str) -> str:
    """The method's name in tables, legends and prose (an unknown id is shown as it is)."""
    return STYLES[method][0] if method in STYLES else method


def colour(method: str) -> str:
    return STYLES[method][1]


# Families of methods, in the order legends list them: members, dash pattern (matplotlib on/off lengths in
# points; () is a solid line) and the pattern's name for the key under the figures.
FAMILIES = {
    "batch statistics in training": (("bn", "bnwos", "gbn", "bn_detached", "bn_detached_mean", "bn_detached_var"), (),
                                     "solid"),
    "running statistics in training": (("bnrs", "brn", "brnc", "brnc_warmup", "mabn", "bln", "online", "cbn", "bnrs_m001",
                                        "bnrs_m003", "bnrs_m030", "bnrs_m100"), (5, 2), "dashed"),
    "running statistics, the original's code": (("bnrs_orig", "brn_orig", "brnc_orig", "bnrs_orig_m001", "bnrs_orig_m003",
                                                 "bnrs_orig_m030", "bnrs_orig_m100"), (6, 2, 1.5, 2), "dash-dot"),
    "batch-independent": (("gn", "gn_ws", "frn", "evonorm"), (1.5, 1.5), "dotted"),
    "no normalisation": (("none",), (9, 3), "long dashes"),
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
    return "\n".join(f"- {style}: {family} ({'; '.join(display_name(m) for m in members)})"
                     for family, (members, _, style) in FAMILIES.items())


def palette(methods) -> dict[str, str]:
    return {m: colour(m) for m in methods}


def _order(methods) -> list[str]:
    """Family by family, in registry order within a family."""
    present = set(methods)
    return [m for members, _, _ in FAMILIES.values() for m in norms.METHODS if m in members and m in present]


def _styled(methods) -> dict:
    """relplot keywords: colour per method, dash pattern per family, one legend entry per method."""
    return {"hue": "method", "hue_order": methods, "palette": palette(methods), "style": "method", "style_order": methods,
            "dashes": {m: dashes(m) for m in methods}}


def _legend_names(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, [display_name(lbl) if lbl in norms.REGISTRY else lbl for lbl in labels], fontsize="small")


def cell_curves(result: RunRecord):
    """One cell: training loss and test accuracy over steps, a line per method."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.8))
    for m, rec in result.methods.items():
        ax_loss.plot(rec.train_step, rec.train_loss, color=colour(m), ls=linestyle(m), label=m, lw=1.2)
        ax_acc.plot(rec.eval_step, rec.test_acc, color=colour(m), ls=linestyle(m), label=m, marker="o", ms=3, lw=1.2)
        if rec.diverged:
            ax_acc.axvline(rec.diverged_step, color=colour(m), ls=":", lw=1)
    ax_loss.set(xlabel="step", ylabel="training loss (window mean)", yscale="log", title="Training loss")
    ax_acc.set(xlabel="step", ylabel="test accuracy", title="Test accuracy (eval mode)")
    _legend_names(ax_acc)
    fig.tight_layout()
    return fig


def final_table(result: RunRecord) -> pd.DataFrame:
    """One cell: the final numbers per method."""
    rows = []
    for m, rec in result.methods.items():
        rows.append({"method": display_name(m), "final test acc": rec.final.test_acc,
                     "with recomputed stats": rec.final.test_acc_recomputed, "final train loss": rec.final.train_loss,
                     "diverged at step": rec.diverged_step, "samples / s": rec.samples_per_second})
    return pd.DataFrame(rows).set_index("method")


def accuracy_over_training(evals: pd.DataFrame, column: str = "test_acc", x: str = "samples_seen", col: str = "batch_size",
                           row: str | None = None):
    """The original study's figure with statistics: mean test accuracy over seeds, Student-t 95% band."""
    data = evals[evals[column].notna()]
    methods = _order(data["method"].unique())
    grid = sns.relplot(data=data, x=x, y=column, **_styled(methods), col=col, row=row, kind="line",
                       errorbar=stats.t_interval, height=3.2, aspect=1.15, facet_kws={"sharex": False, "sharey": True}, legend="full")
    grid.set_axis_labels("samples seen" if x == "samples_seen" else x, "test accuracy")
    _rename_legend(grid)
    return grid


def loss_over_training(losses: pd.DataFrame, col: str = "batch_size", row: str | None = None):
    methods = _order(losses["method"].unique())
    grid = sns.relplot(data=losses, x="samples_seen", y="train_loss", **_styled(methods), col=col, row=row, kind="line",
                       errorbar=stats.t_interval, height=3.2, aspect=1.15, facet_kws={"sharex": False, "sharey": True})
    grid.set(yscale="log")
    grid.set_axis_labels("samples seen", "training loss")
    _rename_legend(grid)
    return grid


def final_vs_batch(summary: pd.DataFrame, col: str | None = None, row: str | None = None, value: str = "mean"):
    """Final accuracy against batch size: mean over seeds with the t interval as error bars."""
    methods = _order(summary["method"].astype(str).unique())
    facets_c = sorted(summary[col].unique()) if col else [None]
    facets_r = sorted(summary[row].unique()) if row else [None]
    fig, axes = plt.subplots(len(facets_r), len(facets_c), figsize=(max(10.0, 4.6 * len(facets_c)), 3.6 * len(facets_r)), squeeze=False, sharey=True)
    for i, rv in enumerate(facets_r):
        for j, cv in enumerate(facets_c):
            ax = axes[i][j]
            part = summary
            if col:
                part = part[part[col] == cv]
            if row:
                part = part[part[row] == rv]
            sizes = sorted(part["batch_size"].unique())
            for k, m in enumerate(methods):
                g = part[part["method"].astype(str) == m].set_index("batch_size").reindex(sizes)
                xs = [p * (1 + 0.03 * (k - len(methods) / 2)) for p in sizes]  # dodge overlapping bars
                err = [(g[value] - g["ci_low"]).clip(lower=0).fillna(0), (g["ci_high"] - g[value]).clip(lower=0).fillna(0)]
                ax.errorbar(xs, g[value], yerr=err, color=colour(m), ls=linestyle(m), label=m, marker="o", ms=4, capsize=2, lw=1.4)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.set(xlabel="batch size", ylabel="final test accuracy" if j == 0 else "",
                   title=" / ".join(str(v) for v in (rv, cv) if v is not None))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, [display_name(lbl) for lbl in labels], loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(5, len(labels)), frameon=False)
    fig.tight_layout()
    return fig


def _rename_legend(grid) -> None:
    """Display names, and the legend under the panels where it never covers a curve."""
    if grid.legend is not None:
        for text in grid.legend.texts:
            if text.get_text() in norms.REGISTRY:
                text.set_text(display_name(text.get_text()))
        sns.move_legend(grid, "upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(5, len(grid.legend.texts)), title=None, frameon=False)


def seeds_needed(halfwidths: pd.DataFrame):
    """Half-width of the paired 95% interval against BN (points) by number of seeds: median over conditions."""
    fig, ax = plt.subplots(figsize=(9, 4))
    if halfwidths.empty:
        ax.text(0.5, 0.5, "fewer than two seeds per condition so far", ha="center", va="center", transform=ax.transAxes)
        return fig
    for m in _order(halfwidths["method"].unique()):
        g = halfwidths[halfwidths["method"] == m].groupby("n_seeds")["halfwidth_points"].median()
        ax.plot(g.index, g.values, marker="o", color=colour(m), ls=linestyle(m), label=display_name(m), lw=1.5)
    ax.set_xlabel("seeds")
    ax.set_ylabel("half-width of the 95% interval (points)")
    ax.set_yscale("log")
    ax.set_xticks(sorted(halfwidths["n_seeds"].unique()))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


TRACE_LABELS = {"log_r_p90": "|log r|, 90th pct. of channels", "d_p90": "|d|, 90th pct. of channels",
                "conv_weight_norm": "conv weight norm", "gamma_norm": "gamma norm", "input_rms": "input RMS",
                "conv_grad_norm": "conv weight gradient norm"}


def traces_over_training(frame: pd.DataFrame, methods, metrics=tuple(TRACE_LABELS), col: str = "condition"):
    """The norm layers' traces over training: a row per metric, a column per condition, a line per method (the
    mean over seeds and layers, with the t band over seeds of the layer mean)."""
    data = frame[frame["method"].isin(methods)].groupby([col, "method", "seed", "step"], as_index=False)[list(metrics)].mean()
    long = data.melt(id_vars=[col, "method", "seed", "step"], value_vars=list(metrics), var_name="metric")
    long["metric"] = long["metric"].map(TRACE_LABELS)
    order = [m for m in methods if m in set(data["method"])]
    grid = sns.relplot(data=long, x="step", y="value", **_styled(order), row="metric", col=col, kind="line",
                       errorbar=stats.t_interval, height=2.3, aspect=1.5, facet_kws={"sharex": False, "sharey": False})
    grid.set_titles("{row_name} | {col_name}", size="small")
    for ax in grid.axes.flat:
        if any(w in ax.get_title() for w in ("norm", "RMS")):
            ax.set_yscale("log")
    _rename_legend(grid)
    return grid
