"""The saved benchmark tables (``book/data/bench_*.csv``, written by ``bnlib bench ... --save``) and how the
Reproducibility page shows them; no torch: the page reads them without running a benchmark.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import paths

SAVED_STEP = paths.BOOK_DATA / "bench_step.csv"
SAVED_FUSION = paths.BOOK_DATA / "bench_fusion.csv"
SAVED_ISA = paths.BOOK_DATA / "bench_isa.csv"
SAVED_LONG = paths.BOOK_DATA / "bench_long.csv"


def save_step(rows: list[dict], header: str, csv_path: Path = SAVED_STEP) -> Path:
    """Keep a ``bench step`` run: the CSV the book's Reproducibility page shows as a table (:func:`step_markdown`)."""
    return _save(rows, header, csv_path)


def save_fusion(rows: list[dict], header: str, csv_path: Path = SAVED_FUSION) -> Path:
    """Keep a ``bench fusion`` run, as :func:`save_step` does (:func:`fusion_markdown`)."""
    return _save(rows, header, csv_path)


def save_isa(rows: list[dict], header: str, csv_path: Path = SAVED_ISA) -> Path:
    """Keep a ``bench isa`` run, as :func:`save_step` does (:func:`isa_markdown`)."""
    return _save(rows, header, csv_path)


def save_long(rows: list[dict], header: str, csv_path: Path = SAVED_LONG) -> Path:
    """Keep a ``bench long`` run, as :func:`save_step` does (:func:`long_markdown`)."""
    return _save(rows, header, csv_path)


def long_markdown(frame) -> str:
    """A ``bench long`` table as markdown (the comparison of the numbers under it)."""

    cols = [
        "batch",
        "path",
        "steps",
        "evaluations",
        "training s",
        "evaluation s",
        "total s",
        "training GFLOP/s",
        "of peak",
        "training vs old",
        "evaluation vs old",
        "total vs old",
    ]
    lines = [f"Measured on: {frame['machine'].iloc[0]}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        lines.append(
            "| "
            + " | ".join(
                str(c)
                for c in [
                    int(r["N"]),
                    r["path"] + ("" if r["compiled"] or "eager" in r["path"] else " (ran eager)"),
                    int(r["steps"]),
                    int(r["evals"]),
                    f"{r['train_s']:.0f}",
                    f"{r['eval_s']:.0f}",
                    f"{r['total_s']:.0f}",
                    f"{r['train_GFLOP/s']:.1f}",
                    f"{100 * r['train_of_peak']:.0f}%",
                    f"{r['train_vs_old']:.2f}x",
                    f"{r['eval_vs_old']:.2f}x",
                    f"{r['total_vs_old']:.2f}x",
                ]
            )
            + " |"
        )
    notes = [
        f"- batch {int(r['N'])}: the new path's numbers against the old path's: {r['vs_old_numbers']}"
        for _, r in frame.iterrows()
        if isinstance(r["vs_old_numbers"], str) and r["vs_old_numbers"]
    ]
    notes += [
        f"- batch {int(r['N'])}: the new path's training throughput is {100 * r['vs_no_norm']:.0f}% of the same "
        "cell's without norm layers"
        for _, r in frame.iterrows()
        if "vs_no_norm" in r and not pd.isna(r["vs_no_norm"])
    ]
    return "\n".join(lines + [""] + notes)


def isa_markdown(frame) -> str:
    """A ``bench isa`` table as markdown."""
    lines = [
        f"Measured on: {frame['machine'].iloc[0]}",
        "",
        "| kernels | batch | steps | training s | time vs the machine's own | same numbers as its own |",
        "|" + "---|" * 6,
    ]
    lines += [
        f"| {r['kernels']} | {int(r['N'])} | {int(r['steps'])} | {r['train_s']:.1f} | {r['time_vs_native']:.2f}x | "
        f"{'yes' if r['same_numbers_as_native'] else 'no'} |"
        for _, r in frame.iterrows()
    ]
    return "\n".join(lines)


def _save(rows, header, csv_path) -> Path:

    from .record import atomic_write

    frame = pd.DataFrame(rows)
    frame.insert(0, "machine", header)
    return atomic_write(csv_path, lambda tmp: frame.to_csv(tmp, index=False))


def fusion_markdown(frame) -> str:
    """A ``bench fusion`` table as markdown."""

    # empty cells read back from the CSV are NaN
    def num(v, fmt):
        return "" if pd.isna(v) else format(v, fmt)

    def txt(v):
        return "" if pd.isna(v) else str(v)

    cols = ["net", "layout", "ms", "GFLOP/s", "of peak", "vs eager", "compile s", "error"]
    lines = [f"Measured on: {frame['machine'].iloc[0]}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        cells = [
            txt(r["net"]),
            txt(r["layout"]),
            num(r["ms"], ".1f"),
            num(r["GFLOP/s"], ".1f"),
            "" if pd.isna(r["of_peak"]) else f"{100 * r['of_peak']:.0f}%",
            num(r["vs_eager"], ".2f") + ("x" if not pd.isna(r["vs_eager"]) else ""),
            num(r["compile_s"], ".1f"),
            txt(r["error"]),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def step_markdown(frame) -> str:
    """The lockstep rows and the peaks of a ``bench step`` table as markdown (per-method rows stay in the CSV)."""

    keep = frame[frame["what"].isin(["matmul", "lockstep", "eval 1000"])].copy()
    keep["input"] = [("" if pd.isna(s) else f"{int(s)}x{int(s)}") for s in keep["side"]]
    keep["batch"] = ["" if pd.isna(n) else int(n) for n in keep["N"]]
    keep["ms"] = [("" if pd.isna(v) else f"{v:.1f}") for v in keep["ms"]]
    keep["GFLOP/s"] = keep["GFLOP/s"].map(lambda v: f"{v:.1f}")
    keep["of peak"] = keep["of_peak"].map(lambda v: f"{100 * v:.0f}%")
    cols = ["what", "precision", "input", "batch", "ms", "GFLOP/s", "of peak"]
    lines = [f"Measured on: {frame['machine'].iloc[0]}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for _, r in keep.iterrows()]
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:

    frame = pd.DataFrame(rows)
    if "ratio" in frame:
        frame["ok"] = frame["ratio"] <= frame["target"]
    if "speedup" in frame and "target" in frame:
        frame["ok"] = [None if t is None or t != t else s >= t for s, t in zip(frame["speedup"], frame["target"])]
    return frame.to_string(index=False, float_format=lambda v: f"{v:.3f}")
