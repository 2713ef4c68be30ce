"""``bnlib``: run a grid, see its status, aggregate it, benchmark, build the book."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import paths

RESULTS_HELP = (
    "results folder (default: $BNLIB_RESULTS, else the repository's results/, wherever the command is typed; "
    "a relative path is taken from the working folder)"
)


def _grid_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "grid", help="a grid name (grids/<name>.yaml: smoke, default, study, paper) or a path to a grid file"
    )
    p.add_argument("--results", type=paths.results_root, default=None, help=RESULTS_HELP)


def cmd_run(args) -> int:
    from . import grid as grid_mod
    from . import runner
    from .tables import aggregate

    args.results = paths.results_root(args.results)
    g = grid_mod.load(args.grid, grid_mod.parse_overrides(args.set))
    every_cell = {c.id for c in g.cells}  # aggregation covers the whole grid, whatever --only ran
    if args.only:
        g = grid_mod.select(g, args.only)
    if args.dry_run:
        runs = runner.runs_dir(args.results, g)
        chosen = set(runner.to_run({c.id: runner.state(runs, c) for c in g.cells}, args.force, args.stale))
        todo = [c for c in g.cells if c.id in chosen and c.same_as is None]
        for c in g.cells:
            if c.id in chosen and c.same_as is not None:
                print(f"  would copy {c.id}  (trains what {c.same_as} trains)")
        estimates = runner.estimate_seconds(g, args.results, todo)
        jobs = args.jobs or runner.default_jobs()[0]
        for c in todo:
            est = estimates[c.id]
            print(f"  would run {c.id}" + (f"  (~{est / 60:.1f} min)" if est is not None else ""))
        known = [e for e in estimates.values() if e is not None]
        total = (
            f"; about {sum(known) / 3600 / jobs:.1f} h with {jobs} at a time (from this grid's finished cells)"
            if known
            else ""
        )
        print(f"grid {g.name}: {len(todo)} of {len(g.cells)} cells would run{total}")
        return 0
    if args.isa:  # the kernels inherit the environment (Slurm jobs too): every cell computes with these kernels
        from . import machine

        native = machine.native_capability()
        if not machine.can_run(args.isa.upper(), native):
            print(
                f"bnlib run: --isa {args.isa}: this machine's widest CPU capability is {native}; it cannot run "
                f"{args.isa.upper()} kernels",
                file=sys.stderr,
            )
            return 2
        os.environ.update(machine.force_env(args.isa))
        print(f"grid {g.name}: every cell computes with {args.isa} kernels (this machine's own: {native})")
    if args.executor == "slurm":
        from .slurm import SlurmExecutor

        executor = SlurmExecutor.from_options(g, args.results, args)
    else:
        executor = runner.LocalExecutor(args.jobs, args.threads)
    report = runner.run(
        g, args.results, executor, force=args.force, progress=not args.no_progress, wait=args.wait, stale=args.stale
    )
    if report.stale_kept:  # never mixed silently
        print(
            f"grid {g.name}: keeping {report.stale_kept} stale cells (done with other training code than the "
            "current; `bnlib status -v` lists them, `bnlib run --stale` redoes them)"
        )
    if report.copied:
        print(
            f"grid {g.name}: {len(report.copied)} cells train exactly what another cell trains; given its results: "
            + ", ".join(report.copied)
        )
    if report.skipped == report.total and not args.force:
        # e.g. a clone with the published results committed: nothing is executed, rewritten or re-aggregated
        print(
            f"grid {g.name}: all {report.total} cells are done; nothing to run (their results are kept; "
            "--force redoes them, `bnlib verify` re-executes some into a temporary folder)"
        )
        return 0
    print(
        f"grid {g.name}: {len(report.finished)} cells run, {report.skipped} already done, "
        f"{len(report.failed)} failed, in {report.seconds:.0f} s"
    )
    for cell, error in report.failed.items():
        print(f"  FAILED {cell}: {error}\n         notebook: {runner.runs_dir(args.results, g) / (cell + '.ipynb')}")
    if report.finished or report.skipped:
        written = aggregate(paths.grid_results(g.name, args.results), every_cell)
        print(f"aggregated: {written['summary']}")
    return 0 if report.ok else 1


def _source_done(same_as: str, runs: Path, results: Path | None) -> bool:
    """Whether the cell a twin or reused cell trains as (``same_as``: an id, or ``<grid>/<id>``) has its metrics
    file."""
    other, _, cell = same_as.rpartition("/")
    return ((paths.runs_dir(other, results) if other else runs) / f"{cell}.json").exists()


def cmd_status(args) -> int:
    from . import grid as grid_mod
    from . import runner

    g = grid_mod.load(args.grid, grid_mod.parse_overrides(args.set))
    st = runner.status(g, args.results)
    extra = {}
    try:
        from .slurm import slurm_states

        extra = slurm_states(paths.grid_results(g.name, args.results))
    except ImportError:
        pass
    print(f"grid {g.name} ({g.path}): {len(g.cells)} cells")
    for key in ("done", "stale", "corrupt", "failed", "started", "pending"):
        print(f"  {key:8s} {len(st[key])}")
    if extra:
        for key, cells in extra.items():
            print(f"  slurm {key:8s} {len(cells)}")
    runs = runner.runs_dir(args.results, g)
    for cell in st["corrupt"]:
        print(
            f"  corrupt: {runs / (cell + '.json')} (unreadable or not this cell's; `bnlib run` redoes it, keeping "
            "the file as .json.corrupt)"
        )
    for cell in st["failed"]:
        first = (runs / f"{cell}.error").read_text().splitlines()[:1]
        print(f"  failed: {cell}: {first[0] if first else ''}")
    if st["stale"]:
        print(
            f"  {len(st['stale'])} stale: done with training code other than the current; kept, "
            "`bnlib run --stale` redoes them"
        )
    resumable = [c for c in st["started"] + st["failed"] if (runs / f"{c}.ckpt").exists()]
    if resumable:
        print(f"  {len(resumable)} unfinished cells have a checkpoint; `bnlib run` resumes them from it")
    twins = {c.id: c.same_as for c in g.cells if c.same_as}
    waiting = [c for c in st["pending"] if c in twins]
    if waiting:
        print(
            f"  {len(waiting)} of the pending cells train what another cell trains; `bnlib run` copies its results "
            "once it is done"
        )
    elsewhere = sorted({twins[c].partition("/")[0] for c in waiting if "/" in twins[c]})
    if elsewhere:
        print(
            f"  ... of which {sum('/' in twins[c] for c in waiting)} are trained by grid(s) {', '.join(elsewhere)} "
            f"(this grid's 'reuse'): run {' and '.join(f'`bnlib run {g}`' for g in elsewhere)} for them"
        )
    ready = [c for c in waiting if _source_done(twins[c], runs, args.results)]
    if ready:
        print(
            f"  {len(ready)} of the pending cells can be copied now (what they train is done): `bnlib run {g.name}` "
            "copies them before it trains anything"
        )
    if args.verbose:
        for key in ("done", "stale", "started", "pending"):
            for cell in st[key]:
                print(
                    f"  {key}: {cell}"
                    + (f" (same training as {twins[cell]})" if cell in twins else "")
                    + (" (has a checkpoint)" if cell in resumable else "")
                )
    return 0


def cmd_aggregate(args) -> int:
    from .grid import load, parse_overrides
    from .tables import aggregate

    g = load(args.grid, parse_overrides(args.set))
    folder = paths.grid_results(g.name, args.results)
    written = aggregate(folder, {c.id for c in g.cells})
    for name, path in written.items():
        print(f"wrote {path}")
    if args.readme:
        import pandas as pd

        from . import paper

        done = len({p.stem for p in (folder / "runs").glob("*.json")} & {c.id for c in g.cells})
        commits = paper.tables.run_commits(folder / "runs")
        mechanism = paths.grid_results(paper.tables.MECHANISM_GRID, args.results) / "analysis.csv"
        checked = paper.tables.mechanism_tables(grid=paper.tables.BATCHSTATS_GRID)
        paper.readme.write_readme_findings(
            pd.read_csv(written["summary"]),
            done,
            commits=commits,
            folder=folder,
            mechanism=pd.read_csv(mechanism) if mechanism.exists() else None,
            batchstats=checked.summary_batchstats if checked else None,
        )
        print(f"wrote the findings tables into {paper.readme.README}")
    return 0


def _report(rows: list[dict], save, device: str) -> None:
    """Print a benchmark's table; with ``save`` (a bench_tables.save_*) keep it with where and when it ran."""
    import time

    import torch

    from . import bench_tables
    from .provenance import device_name

    print(bench_tables.format_table(rows))
    if save:
        save(
            rows,
            f"{device_name(device)}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}",
        )
        print("saved: the table in book/data/ (shown on the book's Reproducibility page)")


def cmd_bench(args) -> int:
    import torch

    from . import bench, bench_cells, bench_tables
    from .provenance import device_name

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {torch.get_num_threads()} torch thread(s); {device_name(device)}")
    if args.what in ("step", "all"):
        print(
            "# step: training step (forward+backward+Adam) and evaluation vs this machine's matrix-product peak, "
            f"{device} (median of {args.repeats})"
        )
        _report(bench.bench_step(device, repeats=args.repeats), args.save and bench_tables.save_step, device)
    if args.what in ("seeds", "all"):
        print(f"\n# seeds: three seeds as one stacked model vs one run per seed (training + 2 evaluations), {device}")
        print(bench_tables.format_table(bench.bench_seeds(device, repeats=max(1, args.repeats // 3))))
    if args.what in ("cell", "all"):
        print(
            "\n# cell: a whole cell, every evaluation on the full test set vs the default test subset in training, "
            f"{device}"
        )
        print(bench_tables.format_table(bench.bench_cell(device)))
    if args.what in ("fusion", "all"):
        print(
            "\n# fusion: one model's step at 28x28, batch 128: eager, channels-last, torch.compile, and without norms, "
            f"{device}"
        )
        _report(bench.bench_fusion(device, repeats=args.repeats), args.save and bench_tables.save_fusion, device)
    if args.what in ("norms", "all"):
        print(f"# norms: forward+backward vs torch.nn.BatchNorm2d, C=32, 28x28, {device} (median of {args.repeats})")
        print(bench_tables.format_table(bench.bench_norms(device, repeats=args.repeats)))
    if args.what == "isa":  # not in "all": it starts a process per run
        print(
            "\n# isa: a cell's training (the original five methods, mnist5k, 1 thread) with each instruction set's "
            f"kernels this machine can run vs its own widest (median of {max(1, args.repeats // 2)})"
        )
        _report(bench_cells.bench_isa(repeats=max(1, args.repeats // 2)), args.save and bench_tables.save_isa, device)
    if args.what == "long":  # not in "all": whole cells, an hour or more on a 2-core CPU
        print(
            "\n# long: whole Fashion-MNIST cells (the study's methods) on the old path (eager) vs the new "
            f"(compile: on), and without norm layers, each a fresh process (median of {args.long_repeats})"
        )
        steps = {n: args.long_steps for n in args.long_sizes} if args.long_steps else None
        _report(
            bench_cells.bench_long(device, sizes=tuple(args.long_sizes), steps=steps, repeats=args.long_repeats),
            args.save and bench_tables.save_long,
            device,
        )
    if args.what == "traces":  # not in "all": a few minutes of Fashion-MNIST training
        print(
            "\n# traces: the cost of trace_every (the 2x2's methods, Fashion-MNIST batch 16), eager and compiled, "
            f"{device}"
        )
        print(bench_tables.format_table(bench.bench_traces(device, repeats=max(1, args.repeats // 3))))
    if args.what in ("loop", "all"):
        print(f"\n# loop: lockstep steps/s (5 methods) vs DataLoader+ToTensor reference, {device}")
        print(bench_tables.format_table(bench.bench_loop(device, repeats=max(1, args.repeats // 2))))
    return 0


def cmd_verify(args) -> int:
    from . import grid as grid_mod
    from . import verify
    from .tables import write_csv

    g = grid_mod.load(args.grid)
    tolerance = verify.Tolerance(
        accuracy_points=verify.TOLERANCE.accuracy_points if args.tolerance is None else args.tolerance,
        loss_relative=verify.TOLERANCE.loss_relative if args.loss_tolerance is None else args.loss_tolerance,
        loss_floor=verify.TOLERANCE.loss_floor,
    )
    try:
        checks = verify.verify(
            g,
            args.results,
            cells=args.cell,
            count=args.cells,
            seed=args.seed,
            steps=args.steps,
            isa=args.isa,
            tolerance=tolerance,
        )
    except RuntimeError as err:
        print(f"bnlib verify: {err}", file=sys.stderr)
        return 1
    text, ok = verify.report(checks)
    print(text)
    if args.save:
        import pandas as pd

        print("wrote", write_csv(pd.DataFrame(verify.rows(checks)), args.save))
    return 0 if ok else 1


def cmd_compact(args) -> int:
    from . import published

    folder = paths.grid_results(args.grid, args.results)
    if not (folder / "runs").is_dir():
        print(f"bnlib compact: {folder / 'runs'} does not exist; nothing to compact", file=sys.stderr)
        return 1
    rewritten, saved = published.compact(folder)
    print(
        f"{folder}: {rewritten} notebook(s) rewritten (256-colour figures, relative paths), {saved / 1e6:.1f} MB saved"
    )
    return 0


def cmd_book(args) -> int:
    from .paper.site import build

    try:
        index = build(args.grid, args.results, strict=not args.no_strict)
    except RuntimeError as err:
        print(f"bnlib book: {err}", file=sys.stderr)
        return 1
    print(f"book built: open {index}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bnlib",
        description="A reproducible study of batch normalisation under small and "
        "non-i.i.d. batches: run grids of experiments, aggregate them, build the book.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser(
        "run",
        help="run a grid's cells that are not done yet (one papermill notebook per cell)",
        description="Run every cell of GRID that has no metrics file yet, then aggregate. Resumable: "
        "interrupt at any time and run again; finished cells are never redone (unless --force).",
    )
    _grid_arg(r)
    r.add_argument(
        "-j", "--jobs", type=int, default=None, help="cells in parallel (default: one per GPU, else one per CPU core)"
    )
    r.add_argument("--threads", type=int, default=None, help="torch threads per cell (default: CPU cores / jobs)")
    r.add_argument("--force", action="store_true", help="redo cells that are already done")
    r.add_argument(
        "--stale",
        action="store_true",
        help="redo stale cells: done with training code (bnlib's data, "
        "models, norms, train and the cell notebook) other than the current; kept otherwise",
    )
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting in every cell for this run, e.g. --set lr=3e-4 (repeatable; the cells "
        "get the ids of the values that run, so they never mix with the grid's own)",
    )
    r.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run only the cells with this setting (repeatable, all must match), e.g. --only dataset=mnist5k",
    )
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="list the cells that would run, with times estimated from this grid's finished cells, and run nothing",
    )
    r.add_argument(
        "--wait",
        action="store_true",
        help="if another runner holds this grid's results folder, wait for it "
        "instead of refusing (one runner per grid: a lock in results/<grid>/.runner.lock)",
    )
    r.add_argument(
        "--executor",
        choices=["local", "slurm"],
        default="local",
        help="local process pool (default) or a Slurm job array",
    )
    r.add_argument(
        "--isa",
        type=str.upper,
        choices=["DEFAULT", "AVX2", "AVX512"],
        default=None,
        help="compute every cell with this CPU instruction set's kernels (ATen, oneDNN and MKL; x86), e.g. so a "
        "grid run on machines of several generations compares bit for bit; default: each machine's own. "
        "Recorded in every metrics file either way",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    slurm = r.add_argument_group("slurm options (--executor slurm; override the grid file's slurm section)")
    slurm.add_argument("--partition", help="Slurm partition")
    slurm.add_argument("--gpus-per-task", type=int, help="GPUs per cell")
    slurm.add_argument("--cpus-per-task", type=int, help="CPU cores per cell")
    slurm.add_argument("--mem-gb", type=float, help="memory per cell in GB")
    slurm.add_argument("--time-min", type=int, help="time limit per cell in minutes")
    slurm.add_argument(
        "--retries",
        type=int,
        help="requeue a cell up to N times when it reaches its time limit; preempted "
        "cells are always requeued, cells on a failed node by Slurm (default: 0)",
    )
    slurm.add_argument("--array-parallelism", type=int, help="array tasks running at once")
    slurm.add_argument(
        "--poll-s", type=float, default=15.0, help="seconds between sacct polls while waiting (default: 15)"
    )
    slurm.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra sbatch option, repeatable (e.g. --sbatch account=abc)",
    )
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="how many cells of a grid are done, failed, running or pending")
    _grid_arg(s)
    s.add_argument("-v", "--verbose", action="store_true", help="list every cell")
    s.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="the cells of `bnlib run --set KEY=VALUE`"
    )
    s.set_defaults(func=cmd_status)

    a = sub.add_parser("aggregate", help="gather a grid's finished cells into results/<grid>/*.csv")
    _grid_arg(a)
    a.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="the cells of `bnlib run --set KEY=VALUE`"
    )
    a.add_argument(
        "--readme",
        action="store_true",
        help="also write the findings tables into README.md between its study-findings markers "
        "(for the published grid, before committing its results)",
    )
    a.set_defaults(func=cmd_aggregate)

    b = sub.add_parser("bench", help="benchmark the layers and the training loop against references in the same run")
    b.add_argument(
        "what",
        nargs="?",
        choices=["step", "seeds", "cell", "fusion", "norms", "loop", "isa", "long", "traces", "all"],
        default="all",
        help="step: training step and evaluation vs the matrix-product peak; seeds: three seeds as one stacked "
        "model vs one run each; cell: a whole cell, old vs new "
        "evaluation; fusion: batch 128 eager vs channels-last vs torch.compile vs no norms; norms: layers vs "
        "torch.nn.BatchNorm2d; loop: lockstep vs a DataLoader loop; isa: a cell's training with each "
        "instruction set's kernels this machine can run (what `bnlib run --isa` costs; not in all); long: whole "
        "long cells, old path vs compiled (an hour or more; not in all) (default: all)",
    )
    b.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default: 1, as every grid cell on a CPU; 0: torch's default)",
    )
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument("--repeats", type=int, default=7, help="timed repeats; the median is reported")
    b.add_argument(
        "--long-sizes", type=int, nargs="+", default=[128, 2], metavar="N", help="long: batch sizes (default: 128 2)"
    )
    b.add_argument(
        "--long-steps",
        type=int,
        default=None,
        metavar="K",
        help="long: steps of every cell (default: 100 at batch 128 with 5 evaluations, 3000 at batch 2 with 15)",
    )
    b.add_argument("--long-repeats", type=int, default=1, metavar="R", help="long: runs of each path (default: 1)")
    b.add_argument(
        "--save",
        action="store_true",
        help="step, fusion, isa, long: keep the table (book/data/bench_step.csv, "
        "bench_fusion.csv, bench_isa.csv, bench_long.csv, shown on the book's Reproducibility page)",
    )
    b.set_defaults(func=cmd_bench)

    v = sub.add_parser(
        "verify",
        help="re-execute committed cells and say whether the current code reproduces them",
        description="Re-execute N finished cells of GRID (chosen with a fixed seed, or named with --cell) "
        "through the same notebook into a temporary folder -- with the thread count, stack and CPU kernels "
        "each recorded -- and compare every recorded number: training-loss windows, evaluations, "
        "divergence, final numbers. One verdict per cell: bit-identical; within tolerance (only where the "
        "kernels or software differ from the committed run's); or differs. Exits 1 when a cell differs. "
        "Stale cells can be verified too. Results are not touched.",
    )
    _grid_arg(v)
    v.add_argument("--cells", type=int, default=1, help="how many cells to re-execute (default: 1)")
    v.add_argument(
        "--cell",
        action="append",
        default=None,
        metavar="ID",
        help="re-execute this cell (repeatable; overrides --cells)",
    )
    v.add_argument("--seed", type=int, default=1, help="seed of the choice of cells (default: 1)")
    v.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="K",
        help="re-execute only the first K steps of each cell and "
        "compare what its record holds up to step K (cheap for long cells; default: the whole run)",
    )
    v.add_argument(
        "--isa",
        type=lambda s: s if s in ("recorded", "native") else s.upper(),
        choices=["recorded", "native", "DEFAULT", "AVX2", "AVX512"],
        default="recorded",
        help="CPU kernels of the re-execution: recorded (default: those the cell recorded, where this machine has "
        "them), native (this machine's own), or an instruction set to force",
    )
    v.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="POINTS",
        help="largest accepted difference of an "
        "accuracy, in points, where the kernels differ (default: the measured one, bnlib.verify.TOLERANCE)",
    )
    v.add_argument(
        "--loss-tolerance",
        type=float,
        default=None,
        metavar="FRACTION",
        help="largest accepted relative "
        "difference of a loss, where the kernels differ (default: the measured one, bnlib.verify.TOLERANCE)",
    )
    v.add_argument(
        "--save",
        type=Path,
        default=None,
        metavar="CSV",
        help="also write every cell's largest difference per "
        "method and quantity to this CSV (how book/data/verify_cross_isa.csv is made)",
    )
    v.set_defaults(func=cmd_verify)

    c = sub.add_parser(
        "compact",
        help="store the figures of a grid's finished run notebooks as 256-colour PNGs (a third of the bytes) and "
        "make the paths they print relative to the repository (no machine's paths); the runner does both for new "
        "cells; `published.check` requires them",
    )
    c.add_argument("grid", help="grid name: results/<grid>/runs is compacted")
    c.add_argument("--results", type=paths.results_root, default=None, help=RESULTS_HELP)
    c.set_defaults(func=cmd_compact)

    k = sub.add_parser("book", help="build the Jupyter Book from a grid's results (offline, warnings as errors)")
    k.add_argument("--grid", default="study", help="whose results the book shows (default: study, the published grid)")
    k.add_argument("--results", type=paths.results_root, default=None, help=RESULTS_HELP)
    k.add_argument("--no-strict", action="store_true", help="do not turn warnings into errors")
    k.set_defaults(func=cmd_book)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .grid import GridError
    from .record import CorruptRun
    from .slurm import SlurmUnavailable
    from .train import ConfigError
    from .train.data import DatasetUnavailable

    try:
        return args.func(args)
    except (GridError, ConfigError, DatasetUnavailable, FileNotFoundError, SlurmUnavailable, CorruptRun) as err:
        print(f"bnlib {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\nbnlib {args.command}: interrupted. Finished cells are kept; run the same command again to resume.",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # `bnlib status study | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit must not raise again
        return 0


if __name__ == "__main__":
    sys.exit(main())
