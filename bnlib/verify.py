"""Re-execute committed cells and compare their final numbers with the committed ones.

``bnlib verify GRID --cells N`` picks N finished cells (a fixed seed, so everyone re-runs the same ones),
runs each through the same papermill notebook into a temporary folder -- with the torch thread count the
committed cell recorded, since the order of floating-point reductions depends on it -- and prints, per cell
and method, the committed and the re-executed final test accuracy and their difference. A cell trained with
stacked seeds (``stack_seeds``) is re-executed in the same stack.

Tolerance: on the same machine type and software the re-execution is bit-identical (every operation is
seeded and deterministic on the CPU), so any difference there is a real change. On another CPU, oneDNN
picks other vector kernels whose rounding differs in the last bits; over thousands of optimiser steps that
moves a final accuracy by a few tenths of a point (a test set of 1,000 images moves in steps of 0.1). The
default tolerance, 0.5 points, accepts that and still fails on any change of method, data or budget,
which moves numbers by whole points.
"""

from __future__ import annotations

import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import grid as grid_mod
from . import runner
from .record import RunRecord, read_run

TOLERANCE_POINTS = 0.5
METRICS = ("test_acc", "test_acc_recomputed")


@dataclass
class Comparison:
    cell: str
    method: str
    metric: str
    committed: float | None
    rerun: float | None

    @property
    def difference(self) -> float:
        """Re-executed minus committed, in percentage points (NaN where either is missing)."""
        if self.committed is None or self.rerun is None:
            return 0.0 if self.committed is None and self.rerun is None else math.nan
        return 100.0 * (self.rerun - self.committed)


def choose(done: list[str], count: int, seed: int = 1) -> list[str]:
    """``count`` of the finished cells, the same ones for everyone with the same seed."""
    return sorted(random.Random(seed).sample(sorted(done), min(count, len(done))))


def compare(committed: RunRecord, rerun: RunRecord) -> list[Comparison]:
    out = []
    for method, rec in committed.methods.items():
        new = rerun.methods.get(method)
        for metric in METRICS:
            out.append(Comparison(committed.cell, method, metric, getattr(rec.final, metric),
                                  getattr(new.final, metric) if new is not None else None))
    return out


def verify(grid: grid_mod.Grid, results: Path, cells: list[str] | None = None, count: int = 1, seed: int = 1,
           progress: bool = True) -> list[Comparison]:
    """Re-execute the chosen committed cells of ``grid`` into a temporary folder; their comparisons."""
    runs = runner.runs_dir(results, grid)
    by_id = {c.id: c for c in grid.cells}
    # stale cells too: whether the current code still reproduces them is what one wants to know
    done = [c.id for c in grid.cells if runner.state(runs, c) in ("done", "stale")]
    if cells:
        unknown = [c for c in cells if c not in by_id]
        if unknown:
            raise grid_mod.GridError(f"{grid.path}: no cell {', '.join(unknown)} in this grid (`bnlib status {grid.name} -v` lists them)")
        missing = [c for c in cells if c not in done]
        if missing:
            raise grid_mod.GridError(f"cell(s) {', '.join(missing)} have no committed metrics file in {runs}")
        chosen = cells
    else:
        if not done:
            raise grid_mod.GridError(f"{runs}: no finished cells to verify; run `bnlib run {grid.name}` first")
        chosen = choose(done, count, seed)
    runner.check_notebook(grid)
    comparisons = []
    with tempfile.TemporaryDirectory(prefix="bnlib-verify-") as tmp:
        for i, cid in enumerate(chosen, 1):
            committed = read_run(runs / f"{cid}.json")
            threads = committed.provenance.torch_threads or 1
            if progress:
                print(f"[{i}/{len(chosen)}] re-executing {cid} ({threads} thread(s)) ...", flush=True)
            stack = _stack_of(grid, by_id[cid], committed)
            if len(stack) > 1 and progress:
                print(f"  it was trained stacked with seeds {committed.stacked_seeds}: re-executing that stack", flush=True)
            outcomes = {o["cell"]: o for o in runner.execute_group(stack, Path(tmp), threads=threads)}
            if not outcomes[cid]["ok"]:
                raise RuntimeError(f"re-executing {cid} failed: {outcomes[cid]['error']}")
            rerun = read_run(Path(tmp) / f"{cid}.json")
            comparisons += compare(committed, rerun)
            if progress:
                differ = differing_curves(committed, rerun)
                print(f"  every recorded curve of {cid}: " + (f"{len(differ)} differ ({', '.join(differ[:6])}"
                      f"{', ...' if len(differ) > 6 else ''})" if differ else "identical"), flush=True)
    return comparisons


def _stack_of(grid: grid_mod.Grid, cell: grid_mod.Cell, committed: RunRecord) -> list[grid_mod.Cell]:
    """The cells ``cell`` was trained with, in their stack's order (a stacked seed equals its solo run to float
    tolerance only, so it is re-executed in the same stack); just the cell when it was trained alone."""
    seeds = committed.stacked_seeds or []
    if len(seeds) < 2:
        return [cell]
    key = grid_mod.condition_key(cell)
    by_seed = {c.config().seed: c for c in grid.cells if grid_mod.condition_key(c) == key}
    missing = [s for s in seeds if s not in by_seed]
    if missing:
        raise grid_mod.GridError(f"{cell.id} was trained stacked with seeds {seeds}, but {grid.path} has no cell of seed "
                                 f"{', '.join(map(str, missing))} for it; put the seeds back to re-execute it")
    return [by_seed[s] for s in seeds]


TIMINGS = ("train_seconds", "samples_per_second")


def differing_curves(committed: RunRecord, rerun: RunRecord) -> list[str]:
    """``method: key`` of every per-method record (training loss, every evaluation, divergence...) that is not
    exactly the committed one; timings aside."""
    out = []
    for method, rec in committed.methods.items():
        old = rec.to_dict()
        new = rerun.methods[method].to_dict() if method in rerun.methods else {}
        out += [f"{method}: {key}" for key in sorted(set(old) | set(new)) if key not in TIMINGS and old.get(key) != new.get(key)]
    return out


def report(comparisons: list[Comparison], tolerance: float = TOLERANCE_POINTS) -> tuple[str, bool]:
    """A printable table and whether every difference is within ``tolerance`` points."""
    import pandas as pd

    pct = lambda v: None if v is None else round(100 * v, 2)  # noqa: E731
    frame = pd.DataFrame([{"cell": c.cell, "method": c.method, "metric": c.metric, "committed %": pct(c.committed),
                           "re-executed %": pct(c.rerun), "difference (points)": c.difference} for c in comparisons])
    bad = [c for c in comparisons if not abs(c.difference) <= tolerance]  # NaN (one side missing) is bad too
    identical = all(c.committed == c.rerun for c in comparisons)
    verdict = ("bit-identical" if identical else
               f"all within {tolerance:g} points" if not bad else f"{len(bad)} value(s) differ by more than {tolerance:g} points")
    return frame.to_string(index=False) + f"\n{len(comparisons)} values compared: {verdict}", not bad
