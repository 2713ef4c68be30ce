"""Re-execute committed cells and say, per cell, whether the current code reproduces them.

``bnlib verify GRID`` re-executes finished cells (``--cells N`` of them chosen with a fixed seed, so everyone
re-runs the same ones, or ``--cell ID``) through the same papermill notebook into a temporary folder -- with the
thread count the cell recorded, in its stack if it was trained stacked, and with the CPU kernels it recorded
(:mod:`bnlib.machine`) wherever this machine has them -- and compares everything the record holds: every
training-loss window, every evaluation, divergence, the final numbers. ``--steps K`` re-executes only the
first K steps of each cell and compares what the record holds up to step K (a checkpointed run replays the
same seeded stream, so a prefix is a faithful re-execution of the start of the run).

One verdict per cell:

* **bit-identical** -- every recorded number is the committed one;
* **within tolerance** -- the structure (steps, evaluations, divergence) is the committed one and every number
  differs by no more than :data:`TOLERANCE`; only where the two runs used different kernels or software
  (:func:`bnlib.machine.same_bits` is false: another ISA, an older file that did not record its kernels);
* **differs** -- anything else; also any difference at all when the kernels and software were the same, since
  then the code, not the rounding, changed.

The tolerance was measured, not guessed: committed study cells of 50, 400 and 3,200 steps re-executed with
another instruction set's kernels (no-SIMD instead of the AVX2 they ran with; the Reproducibility page shows
the measurement, ``book/data/verify_cross_isa.csv``, and the command that made it). The rule, fixed before the
long cells' numbers were seen: twice the largest difference measured over every recorded number of those
cells, rounded up (accuracies to a tenth of a point, losses to one significant digit), and never below 0.5
points for an accuracy (two or three test images of a 500-image evaluation subset) or 0.001 for a loss.
Measured (2026-12-02, 2-core AMD EPYC): no accuracy moved at all, in any evaluation of any of the three cells;
the largest loss moved by a relative 4.8e-06 (BNWoS's final test loss after 3,200 steps at batch 2), so the
floors decide: 0.5 points and 0.001.
"""

from __future__ import annotations

import math
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import grid as grid_mod
from . import machine, paths, runner
from .record import ABSENT, RunRecord, read_run

# Curves of a method record, aligned with its train_step (the training loss) or its eval_step (the rest).
ACCURACY_CURVES = ("test_acc", "test_acc_recomputed", "test_acc_batchstats")
LOSS_CURVES = ("test_loss", "test_loss_recomputed", "test_loss_batchstats")
FINAL_KEYS = ("test_acc", "test_loss", "test_acc_recomputed", "test_acc_batchstats", "train_loss")
SAVED_CROSS_ISA = paths.BOOK_DATA / "verify_cross_isa.csv"  # the tolerance's measurement, shown in the book


@dataclass(frozen=True)
class Tolerance:
    """How far a re-execution with other kernels may move a number: an accuracy by ``accuracy_points``
    percentage points, a loss by ``loss_relative`` of the committed value (a loss below ``loss_floor`` counts
    as ``loss_floor``, so a loss near zero is not judged by its last digits)."""

    accuracy_points: float = 0.5
    loss_relative: float = 0.001
    loss_floor: float = 0.05


TOLERANCE = Tolerance()
# A compiled run (``compile: on``/``auto``, bnlib.train.compiling) against an eager one, or a compiled cell re-executed
# eager: inductor sums in another order, and training amplifies that difference step by step, far beyond the
# kernels' (above). Measured 2026-12-02 on a 2-core AMD EPYC, the study's 12 methods on Fashion-MNIST (`bnlib
# bench long`, and a batch-16 cell of 400 steps): the largest differences were 0.37 points and a relative 0.0073
# of a loss after 100 steps at batch 128, 0.40 points and 0.0079 after 400 at batch 16, and 1.50 points (BRNC,
# on the 2,000-image subset) and 0.033 (BRN's final test loss) after 3,000 at batch 2. The same rule as above:
# twice the largest, rounded up.
COMPILED_VS_EAGER = Tolerance(accuracy_points=3.0, loss_relative=0.07)


@dataclass
class Difference:
    """One recorded number that differs: where, both values, and its size (points for an accuracy, a fraction of
    the committed value for a loss)."""

    method: str
    quantity: str  # a curve (test_acc, train_loss, ...) or final.<key>
    step: int | None
    committed: float | None
    rerun: float | None
    size: float
    kind: str  # "accuracy" or "loss"

    def describe(self) -> str:
        amount = f"{self.size:.2f} points" if self.kind == "accuracy" else f"a relative {self.size:.2g}"
        where = f" at step {self.step}" if self.step is not None else ""
        return f"{amount} on {self.method} {self.quantity}{where}"


@dataclass
class CellCheck:
    """A cell's re-execution compared with its committed record."""

    cell: str
    steps_compared: int  # the committed run's steps, or K of a prefix re-execution
    steps_total: int
    kernels: str  # how the kernels were chosen, for the reader
    same_bits: bool  # both runs recorded the same numerics: bit-identity is required
    structure: list[str] = field(default_factory=list)  # steps, evaluations, divergence that do not match
    differences: list[Difference] = field(default_factory=list)
    finals: list[tuple] = field(
        default_factory=list
    )  # (method, metric, step, committed, rerun) at the last compared evaluation
    compared: int = 0  # recorded numbers compared
    tolerance: Tolerance = TOLERANCE
    recorded: str | None = None  # the CPU capability the committed run recorded (None: not recorded)
    rerun_capability: str | None = None  # and the re-execution's
    seconds: float | None = None  # the re-execution's wall time

    def largest(self, kind: str) -> Difference | None:
        found = [d for d in self.differences if d.kind == kind]
        return max(found, key=lambda d: (not math.isfinite(d.size), d.size)) if found else None

    @property
    def identical(self) -> bool:
        return not self.structure and not self.differences

    @property
    def within_tolerance(self) -> bool:
        acc, loss = self.largest("accuracy"), self.largest("loss")
        return (
            not self.structure
            and (acc is None or acc.size <= self.tolerance.accuracy_points)
            and (loss is None or loss.size <= self.tolerance.loss_relative)
        )

    @property
    def verdict(self) -> str:
        """ "bit-identical", "within tolerance" or "differs"."""
        if self.identical:
            return "bit-identical"
        if self.same_bits or not self.within_tolerance:
            return "differs"
        return "within tolerance"

    @property
    def ok(self) -> bool:
        return self.verdict != "differs"

    def explain(self) -> str:
        """The verdict with what decided it."""
        largest = [d.describe() for d in (self.largest("accuracy"), self.largest("loss")) if d is not None]
        if self.identical:
            return f"bit-identical: all {self.compared} recorded numbers are the committed ones"
        if self.structure:
            return "differs: " + "; ".join(self.structure[:4]) + (" ..." if len(self.structure) > 4 else "")
        if self.same_bits:
            return (
                "differs: the same kernels, threads and software as the committed run, so every number must be "
                f"identical, and {len(self.differences)} are not (largest {', '.join(largest)})"
            )
        tol = self.tolerance
        limits = f"accuracies {tol.accuracy_points:g} points, losses a relative {tol.loss_relative:g}"
        if self.within_tolerance:
            return f"within tolerance (largest difference {'; '.join(largest)}; tolerance {limits})"
        return f"differs: beyond the tolerance ({limits}): largest difference {'; '.join(largest)}"


def choose(done: list[str], count: int, seed: int = 1) -> list[str]:
    """``count`` of the finished cells, the same ones for everyone with the same seed."""
    return sorted(random.Random(seed).sample(sorted(done), min(count, len(done))))


def _size(a: float | None, b: float | None, kind: str, tol: Tolerance) -> float:
    """The size of a difference between a committed ``a`` and a re-executed ``b`` (inf where one is missing or
    not finite and the other not the same)."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    if kind == "accuracy":
        return 100 * abs(a - b)
    return abs(a - b) / max(abs(a), tol.loss_floor)


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def compare(
    committed: RunRecord,
    rerun: RunRecord,
    upto: int | None = None,
    tolerance: Tolerance = TOLERANCE,
    kernels: str = "",
    same_bits: bool = False,
) -> CellCheck:
    """Every number ``committed`` holds (up to step ``upto``: a prefix re-execution) against ``rerun``."""
    steps = upto if upto is not None and upto < committed.steps else committed.steps
    check = CellCheck(committed.cell or "", steps, committed.steps, kernels, same_bits, tolerance=tolerance)
    if set(committed.methods) != set(rerun.methods):
        check.structure.append(f"methods {sorted(committed.methods)} were re-executed as {sorted(rerun.methods)}")
    for method, old in committed.methods.items():
        new = rerun.methods.get(method)
        if new is None:
            continue
        old_diverged = old.diverged and old.diverged_step <= steps
        if old_diverged != new.diverged or (old_diverged and old.diverged_step != new.diverged_step):
            check.structure.append(
                f"{method} diverged at step {old.diverged_step if old_diverged else 'never'} in the committed run, "
                f"{new.diverged_step if new.diverged else 'never'} in the re-execution"
            )
            continue
        aligned = True
        for axis, curves in (
            ("train_step", ("train_loss",)),
            ("eval_step", ("eval_size",) + ACCURACY_CURVES + LOSS_CURVES),
        ):
            old_steps = [s for s in getattr(old, axis) if s <= steps]
            new_steps = list(getattr(new, axis))
            if old_steps != new_steps:
                check.structure.append(f"{method} {axis} {old_steps[:5]}... re-executed as {new_steps[:5]}...")
                aligned = False
                continue
            for curve in curves:
                old_values, new_values = getattr(old, curve), getattr(new, curve)
                if old_values is ABSENT or new_values is ABSENT:  # an older file without this curve
                    continue
                if curve == "eval_size":
                    if list(old_values[: len(old_steps)]) != list(new_values):
                        check.structure.append(
                            f"{method} evaluated on {old_values} test images, re-executed on {new_values}"
                        )
                    continue
                kind = "accuracy" if curve in ACCURACY_CURVES else "loss"
                for step, a, b in zip(old_steps, old_values, new_values):
                    check.compared += a is not None
                    if not _same(a, b):
                        check.differences.append(
                            Difference(method, curve, step, a, b, _size(a, b, kind, tolerance), kind)
                        )
        if steps == committed.steps:  # the final numbers, and that they are what the run's last step holds
            for key in FINAL_KEYS:
                a, b = getattr(old.final, key), getattr(new.final, key)
                check.compared += a is not None and a is not ABSENT
                if a is ABSENT or b is ABSENT or _same(a, b):
                    continue
                kind = "accuracy" if "acc" in key else "loss"
                check.differences.append(
                    Difference(method, f"final.{key}", None, a, b, _size(a, b, kind, tolerance), kind)
                )
        if aligned and new.eval_step:
            for metric in ("test_acc", "test_acc_recomputed"):
                old_values = getattr(old, metric)
                if old_values is not ABSENT and old_values[len(new.eval_step) - 1] is not None:
                    check.finals.append(
                        (
                            method,
                            metric,
                            new.eval_step[-1],
                            old_values[len(new.eval_step) - 1],
                            getattr(new, metric)[-1],
                        )
                    )
    return check


def plan_kernels(recorded: dict | None, isa: str, native: str) -> tuple[dict[str, str], str]:
    """The environment a re-execution's kernel gets, and how it was chosen (for the report).

    ``isa``: "recorded" (the kernels the committed run used, where this machine has them; else its own),
    "native" (this machine's own) or a capability name (DEFAULT, AVX2, AVX512) to force."""
    if isa == "native":
        return {}, f"this machine's own ({native})"
    if isa != "recorded":
        wanted = isa.upper()
        if not machine.can_run(wanted, native):
            levels = machine.X86_LEVELS
            choices = ", ".join(levels[: levels.index(native) + 1]) if native in levels else "native"
            raise grid_mod.GridError(
                f"--isa {isa}: this machine's widest CPU capability is {native}; it cannot run "
                f"{wanted} kernels (choose one of {choices})"
            )
        return machine.force_env(wanted), f"forced to {wanted} (--isa; this machine: {native})"
    if not recorded:
        return {}, (
            f"this machine's own ({native}): the committed file does not record its kernels (written before "
            "bnlib recorded them), so bit-identity cannot be required"
        )
    capability = recorded.get("torch_cpu_capability")
    forced = {k: v for k, v in (recorded.get("env") or {}).items() if k in machine.ISA_ENV["AVX2"]}
    if forced and machine.can_run(capability, native):
        return forced, f"forced as the committed run was ({capability}; this machine: {native})"
    if capability == native:
        return {}, f"this machine's own, as recorded ({native})"
    if machine.can_run(capability, native):
        return machine.force_env(capability), f"forced to the recorded {capability} (this machine: {native})"
    return {}, f"this machine's own ({native}): it cannot run the recorded {capability} kernels"


def verify(
    grid: grid_mod.Grid,
    results: Path,
    cells: list[str] | None = None,
    count: int = 1,
    seed: int = 1,
    steps: int | None = None,
    isa: str = "recorded",
    tolerance: Tolerance = TOLERANCE,
    progress: bool = True,
) -> list[CellCheck]:
    """Re-execute the chosen committed cells of ``grid`` into a temporary folder (their first ``steps`` steps, or
    all); one :class:`CellCheck` per cell. Bad arguments fail before anything runs."""
    runs = runner.runs_dir(results, grid)
    by_id = {c.id: c for c in grid.cells}
    if steps is not None and steps < 1:
        raise grid_mod.GridError(f"--steps {steps}: give a positive number of steps")
    # stale cells too: whether the current code still reproduces them is what one wants to know
    done = [c.id for c in grid.cells if runner.state(runs, c) in ("done", "stale")]
    if cells:
        unknown = [c for c in cells if c not in by_id]
        if unknown:
            raise grid_mod.GridError(
                f"{grid.path}: no cell {', '.join(unknown)} in this grid (`bnlib status {grid.name} -v` lists them)"
            )
        missing = [c for c in cells if c not in done]
        if missing:
            raise grid_mod.GridError(f"cell(s) {', '.join(missing)} have no committed metrics file in {runs}")
        chosen = cells
    else:
        if not done:
            raise grid_mod.GridError(f"{runs}: no finished cells to verify; run `bnlib run {grid.name}` first")
        chosen = choose(done, count, seed)
    runner.check_notebook(grid)
    native = machine.native_capability()
    plans = {}
    for cid in chosen:  # every cell's kernels and stack decided before the first one runs
        committed = read_run(runs / f"{cid}.json")
        first = _first_recorded_step(committed)
        if steps is not None and steps < min(first, committed.steps):  # a prefix with nothing in it proves nothing
            raise grid_mod.GridError(
                f"--steps {steps}: cell {cid} records nothing in its first {steps} steps (its first "
                f"recorded number is at step {first}); give --steps {first} or more"
            )
        plans[cid] = (
            committed,
            _stack_of(grid, by_id[cid], committed),
            *plan_kernels(committed.provenance.numerics, isa, native),
        )
    checks = []
    with tempfile.TemporaryDirectory(prefix="bnlib-verify-") as tmp:
        for i, cid in enumerate(chosen, 1):
            committed, stack, env, kernels = plans[cid]
            threads = committed.provenance.torch_threads or 1
            prefix = steps if steps is not None and steps < committed.steps else None
            if progress:
                span = f"the first {prefix} of {committed.steps} steps" if prefix else f"all {committed.steps} steps"
                print(
                    f"[{i}/{len(chosen)}] re-executing {cid}: {span}, {threads} thread(s), CPU kernels {kernels}"
                    + (f", in its stack of seeds {committed.stacked_seeds}" if len(stack) > 1 else ""),
                    flush=True,
                )
            folder = Path(tmp) / cid
            outcomes = {
                o["cell"]: o for o in runner.execute_group(stack, folder, threads=threads, env=env, stop_after=prefix)
            }
            if not outcomes[cid]["ok"]:
                raise RuntimeError(f"re-executing {cid} failed: {outcomes[cid]['error']}")
            rerun = read_run(folder / f"{cid}.json")
            # identical bits are expected only on the same kernels and the same path (compiled or eager) as recorded;
            # across paths the default tolerance is the compiled-vs-eager one
            same_path = bool(committed.compiled) == bool(rerun.compiled)
            check = compare(
                committed,
                rerun,
                prefix,
                COMPILED_VS_EAGER if not same_path and tolerance == TOLERANCE else tolerance,
                kernels,
                same_path and machine.same_bits(committed.provenance.numerics, rerun.provenance.numerics),
            )
            check.recorded = (committed.provenance.numerics or {}).get("torch_cpu_capability")
            check.rerun_capability = (rerun.provenance.numerics or {}).get("torch_cpu_capability")
            check.seconds = outcomes[cid]["seconds"]
            checks.append(check)
            if progress:
                print("  " + check.explain(), flush=True)
    return checks


def _first_recorded_step(run: RunRecord) -> int:
    """The earliest step at which the record holds a number (a training-loss window or an evaluation)."""
    steps = [s for m in run.methods.values() for s in (m.train_step or [])[:1] + (m.eval_step or [])[:1]]
    return min(steps, default=run.steps)


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
        raise grid_mod.GridError(
            f"{cell.id} was trained stacked with seeds {seeds}, but {grid.path} has no cell of seed "
            f"{', '.join(map(str, missing))} for it; put the seeds back to re-execute it"
        )
    return [by_seed[s] for s in seeds]


def report(checks: list[CellCheck]) -> tuple[str, bool]:
    """A printable report -- per cell the accuracies at the last compared evaluation and the verdict -- and
    whether no cell differs."""
    import pandas as pd

    blocks = []
    for check in checks:
        frame = pd.DataFrame(
            [
                {
                    "method": m,
                    "metric": metric,
                    "step": step,
                    "committed %": round(100 * a, 2),
                    "re-executed %": None if b is None else round(100 * b, 2),
                    "difference (points)": None if b is None else round(100 * (b - a), 3),
                }
                for m, metric, step, a, b in check.finals
            ]
        )
        span = (
            f"first {check.steps_compared} of {check.steps_total} steps"
            if check.steps_compared < check.steps_total
            else f"all {check.steps_total} steps"
        )
        blocks.append(
            f"{check.cell} ({span}; CPU kernels {check.kernels})\n"
            + (frame.to_string(index=False) + "\n" if len(frame) else "")
            + f"verdict: {check.explain()}"
        )
    counts = {v: sum(c.verdict == v for c in checks) for v in ("bit-identical", "within tolerance", "differs")}
    summary = f"{len(checks)} cell(s) re-executed: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    return "\n\n".join(blocks + [summary]), counts["differs"] == 0


def rows(checks: list[CellCheck]) -> list[dict]:
    """Per cell, method and quantity, its largest difference (for ``--save``); a cell with none gets one row."""
    out = []
    for check in checks:
        base = {
            "cell": check.cell,
            "steps_compared": check.steps_compared,
            "steps_total": check.steps_total,
            "kernels_committed": check.recorded or "not recorded",
            "kernels_rerun": check.rerun_capability,
            "seconds": check.seconds,
            "verdict": check.verdict,
        }
        largest: dict[tuple, Difference] = {}
        for d in check.differences:
            key = (d.method, d.quantity)
            if key not in largest or d.size > largest[key].size:
                largest[key] = d
        for d in largest.values():
            out.append(
                {
                    **base,
                    "method": d.method,
                    "quantity": d.quantity,
                    "step": d.step,
                    "committed": d.committed,
                    "rerun": d.rerun,
                    "difference": d.size,
                }
            )
        if not largest:
            out.append(
                {
                    **base,
                    "method": None,
                    "quantity": None,
                    "step": None,
                    "committed": None,
                    "rerun": None,
                    "difference": 0.0,
                }
            )
    return out


def cross_isa_markdown(frame, tolerance: Tolerance = TOLERANCE) -> str:
    """A saved ``--save`` table as the book shows it: per cell, the largest accuracy and loss differences and
    how they stand against ``tolerance`` (judged now, so the table follows the tolerance it set)."""
    import pandas as pd

    lines = [
        "| cell | steps compared | kernels: committed -> re-executed | re-execution (s) | "
        "largest accuracy difference | largest loss difference (relative) | within the tolerance |",
        "|" + "---|" * 7,
    ]
    for cell, rows in frame.groupby("cell", sort=False):
        first = rows.iloc[0]
        found = rows.dropna(subset=["quantity"])
        is_acc = found["quantity"].str.contains("acc")
        acc, loss = found[is_acc], found[~is_acc]

        def largest(part, fmt):
            if part.empty:
                return "none", 0.0
            top = part.loc[part["difference"].idxmax()]
            step = "" if pd.isna(top["step"]) else f" at step {int(top['step'])}"
            return f"{fmt(top['difference'])} ({top['method']} {top['quantity']}{step})", float(top["difference"])

        acc_text, acc_max = largest(acc, lambda v: f"{v:.2f} points")
        loss_text, loss_max = largest(loss, lambda v: f"{v:.2g}")
        within = acc_max <= tolerance.accuracy_points and loss_max <= tolerance.loss_relative
        seconds = "" if pd.isna(first.get("seconds")) else f"{first['seconds']:.0f}"
        lines.append(
            f"| {cell} | {int(first['steps_compared'])} of {int(first['steps_total'])} | "
            f"{first['kernels_committed']} -> {first['kernels_rerun']} | {seconds} | {acc_text} | {loss_text} | "
            f"{'yes' if within else 'no'} |"
        )
    return "\n".join(lines)
