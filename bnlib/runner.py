"""The grid runner: cell states on disk, one papermill execution of the cell notebook per cell, executors, the
lock, twins and time estimates.

Each cell's notebook is written to ``results/<grid>/runs/<cell>.ipynb``; its metrics file ``<cell>.json``,
written last by atomic rename by the notebook itself, is the done marker. A failed cell leaves ``<cell>.error``
beside its partial notebook.

With ``stack_seeds``, the pending cells that differ only in their seed run as one notebook execution
(:func:`bnlib.train.train_seeds`: the seeds as one stacked model, several times faster at small batches):
the notebook of the group's first cell writes every member's metrics file, and each member gets a copy of
that notebook with a note on top. Each seed's numbers equal its solo run to float tolerance, not bit for
bit, so ``bnlib verify`` re-runs a stacked cell in its stack; the metrics file records ``stacked_seeds``.

Two cells that train exactly the same models (``Cell.same_as``) run once; the other gets the results under
its own id (:func:`copy_shared_results`). That holds across grids too: a grid that names another under
``reuse`` copies the cells that grid trained (once they are finished there) instead of training them again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import paths, published, train
from .grid import Cell, Grid, GridError, condition_key
from .provenance import is_current
from .record import ABSENT, CorruptRun, atomic_write, read_run, write_json

NOTEBOOK = paths.NOTEBOOK
KERNEL = "bnlib"
# Notebook parameters filled in by the runner, not by grid files: (interactive default, comment).
RUNNER_PARAMETERS = {
    "cell_id": ('"interactive"', "this cell's id in its grid"),
    "output_path": ('""', "where to write the metrics file, last (empty: do not write)"),
    "threads": ("0", "torch threads in this kernel (0: torch's default)"),
    "checkpoint_path": ('""', "where to keep this cell's checkpoint; a re-run resumes from it (empty: none)"),
    "stack": (
        "{}",
        'cells differing only in seed, trained with this one as one stacked model: {cell id: {"seed", "output_path"}}',
    ),
    "stop_after_step": ("None", "train only the first steps of the run (`bnlib verify --steps`; None: all of it)"),
}
# train.Config has no budget by default (a grid gives exactly one); the notebook run by hand trains this one.
INTERACTIVE = {"epochs": 2}
# Kernels of this process, so Ctrl-C can stop them (jupyter starts kernels in their own session: the
# terminal's SIGINT never reaches them), and whether the user interrupted.
_KERNEL_PIDS: set[int] = set()
_INTERRUPTED = threading.Event()


def estimate_seconds(grid: Grid, results: Path, cells: list[Cell]) -> dict[str, float | None]:
    """Expected seconds per cell from this grid's history (cells.jsonl): the mean of finished cells with the
    same dataset, batch size and budget; else a linear model fitted to the dataset's finished cells, seconds =
    fixed (evaluation, start-up) + per step x steps + per sample x samples trained (or without the per-step term
    while the finished cells cannot tell the two apart); else the mean of all finished cells; else None."""
    log = paths.grid_results(grid.name, results) / "cells.jsonl"
    history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    seconds = {h["cell"]: h["seconds"] for h in history if h.get("ok") and h.get("seconds")}
    by_id = {c.id: c for c in grid.cells}

    def kind(c: Cell):
        cfg = c.config()
        return cfg.dataset, cfg.batch_size, cfg.steps, cfg.epochs, cfg.samples

    def features(c: Cell) -> list[float] | None:  # epochs budgets need the dataset's size: left to the other estimates
        cfg = c.config()
        if cfg.epochs is not None:
            return None
        steps = train.total_steps(cfg, 0)
        return [1.0, float(steps), float(steps * cfg.batch_size)]

    groups: dict = {}
    points: dict = {}
    for cid, sec in seconds.items():
        if cid in by_id:
            groups.setdefault(kind(by_id[cid]), []).append(sec)
            if features(by_id[cid]) is not None:
                points.setdefault(by_id[cid].config().dataset, []).append((features(by_id[cid]), sec))
    models = {}
    for dataset, pts in points.items():
        design, target = np.array([f for f, _ in pts]), np.array([t for _, t in pts])
        for columns in ([0, 1, 2], [0, 2]):  # the fullest model the finished cells determine
            if np.linalg.matrix_rank(design[:, columns]) == len(columns):
                models[dataset] = (columns, np.linalg.lstsq(design[:, columns], target, rcond=None)[0])
                break
    overall = sum(seconds.values()) / len(seconds) if seconds else None

    def estimate(c: Cell) -> float | None:
        if kind(c) in groups:
            return sum(groups[kind(c)]) / len(groups[kind(c)])
        model = models.get(c.config().dataset)
        if model and features(c) is not None:
            columns, coef = model
            return max(1.0, float(np.array(features(c))[columns] @ coef))
        return overall

    return {c.id: estimate(c) for c in cells}


def notebook_parameters(notebook: Path = NOTEBOOK) -> set[str]:
    import papermill

    return set(papermill.inspect_notebook(str(notebook)))


def _literal(value) -> str:
    """A default as Python source, strings in double quotes (as the notebook reads)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return repr(value)


def parameters_cell() -> str:
    """The source of the cell notebook's ``parameters`` cell, generated from :class:`bnlib.train.Config` (its
    fields, defaults and comments, in order; :data:`INTERACTIVE` aside) and :data:`RUNNER_PARAMETERS`.
    tests/test_house.py checks that the notebook holds exactly this; ``python -m bnlib.runner`` rewrites it."""
    import inspect
    import re

    comments = dict(re.findall(r"^    (\w+): [^=]+=.*?  # (.*)$", inspect.getsource(train.Config), flags=re.M))
    lines = [
        "# Training configuration: the fields of bnlib.train.Config, with its defaults. The grid runner sets every "
        "one per cell."
    ]
    for f in dataclasses.fields(train.Config):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        value = INTERACTIVE.get(f.name, default)
        note = comments.get(f.name, "")
        if f.name in INTERACTIVE:
            note = f"{note} [Config: {_literal(default)}; this value when the notebook is run by hand]"
        lines.append(f"{f.name} = {_literal(value)}" + (f"  # {note}" if note else ""))
    lines += ["", "# Filled in by the grid runner"]
    lines += [f"{name} = {value}  # {note}" for name, (value, note) in RUNNER_PARAMETERS.items()]
    return "\n".join(lines)


def write_parameters_cell(notebook: Path = NOTEBOOK) -> bool:
    """Rewrite the notebook's parameters cell from :func:`parameters_cell`; whether it changed."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    if cell.source == parameters_cell():
        return False
    cell.source = parameters_cell()
    atomic_write(notebook, lambda tmp: nbformat.write(nb, tmp))
    return True


def check_notebook(grid: Grid, notebook: Path = NOTEBOOK) -> None:
    """Papermill only warns about unknown parameters; a grid key the notebook lacks is an error here."""
    declared = notebook_parameters(notebook)
    missing = sorted({k for c in grid.cells for k in c.parameters} - declared)
    if missing:
        raise GridError(f"{grid.path}: key(s) {', '.join(missing)} are not parameters of {notebook}")
    missing = sorted(set(RUNNER_PARAMETERS) - declared)
    if missing:
        raise GridError(f"{notebook} lacks the runner's parameter(s) {', '.join(missing)}")


def check_datasets(grid: Grid) -> None:
    """Load (and if needed download) each dataset once, so missing data fails before any cell runs."""
    from .train import data

    seen = set()
    for cell in grid.cells:
        cfg = cell.config()
        key = (cfg.dataset, cfg.data_dir)
        if key not in seen:
            seen.add(key)
            data.load(cfg.dataset, cfg.data_dir, cfg.download)


# --- cell states on disk ------------------------------------------------------------------------


def groups(cells: list[Cell], stack_seeds: bool) -> list[list[Cell]]:
    """The units the runner executes: one cell each, or with ``stack_seeds`` the cells that differ only in
    their seed together (in grid order, the first cell leading)."""
    if not stack_seeds:
        return [[c] for c in cells]
    out: dict[str, list[Cell]] = {}
    for c in cells:
        out.setdefault(condition_key(c), []).append(c)
    return list(out.values())


def runs_dir(results: Path | None, grid: Grid) -> Path:
    """``<results>/<grid>/runs``, absolute (see :func:`bnlib.paths.results_root`)."""
    return paths.runs_dir(grid.name, results)


def state(runs: Path, cell: Cell) -> str:
    """done (a valid metrics file of the whole run), stale (done, by training code other than the current: its recorded
    ``training_code_sha256`` differs and is not one the current code reproduces, see
    :func:`bnlib.provenance.is_current`; files written before that field existed count as done), corrupt (a
    metrics file that does not parse, lacks keys or names another cell), failed (error recorded), started
    (notebook only) or pending. A prefix re-execution's file (``stopped_at_step``) is corrupt: never done."""
    if (runs / f"{cell.id}.json").exists():
        try:
            run = read_run(runs / f"{cell.id}.json")
        except CorruptRun:
            return "corrupt"
        if run.stopped_at_step:
            return "corrupt"
        return "done" if is_current(run.provenance.training_code_sha256) else "stale"
    if (runs / f"{cell.id}.error").exists():
        return "failed"
    if (runs / f"{cell.id}.ipynb").exists():
        return "started"
    return "pending"


# --- executing one cell ---------------------------------------------------------------------------


def _kernel_manager_class(log_path: Path, env: dict[str, str] | None = None):
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        """Unix sockets in a private folder, so concurrent kernels never race for TCP ports; the kernel
        process's own output goes to the cell's ``.kernel.log`` instead of the runner's terminal."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = os.path.join(tempfile.mkdtemp(prefix="bnlib-kernel-"), "k")

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            if env:  # e.g. the CPU kernels a re-executed cell recorded (bnlib.machine.force_env)
                kw["env"] = {**(kw.get("env") or os.environ), **env}
            with open(log_path, "ab") as log:  # the kernel process keeps its own copy of the descriptor
                kw.setdefault("stdout", log)
                kw.setdefault("stderr", log)
                info = await super()._async_launch_kernel(kernel_cmd, **kw)
            self._pid = getattr(self.provisioner, "pid", None)
            if self._pid:
                _KERNEL_PIDS.add(self._pid)
            return info

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            _KERNEL_PIDS.discard(getattr(self, "_pid", None))
            await super()._async_cleanup_resources(restart=restart)
            if not restart:
                shutil.rmtree(os.path.dirname(self.ip), ignore_errors=True)

    return IPCKernelManager


def execute_cell(
    cell: Cell,
    runs: Path,
    threads: int = 0,
    device: str | None = None,
    notebook: Path = NOTEBOOK,
    env: dict[str, str] | None = None,
    stop_after: int | None = None,
) -> dict:
    """Run one cell's notebook through papermill; returns {'cell', 'ok', 'seconds', 'error'}.

    The notebook writes ``<cell>.json`` as its last act; a cell whose notebook raised, or that ended
    without writing it, is failed and its error goes to ``<cell>.error``.
    """
    return execute_group([cell], runs, threads, device, notebook, env, stop_after)[0]


def execute_group(
    cells: list[Cell],
    runs: Path,
    threads: int = 0,
    device: str | None = None,
    notebook: Path = NOTEBOOK,
    env: dict[str, str] | None = None,
    stop_after: int | None = None,
) -> list[dict]:
    """Run cells that differ only in their seed as ONE notebook execution, the seeds stacked into one model
    (see :func:`groups`); one cell is :func:`execute_cell`. The first cell leads: its notebook trains every
    seed and writes every member's metrics file; each member gets a copy of the notebook. Returns each
    cell's outcome. ``env``: extra environment variables of the kernel process; ``stop_after``: train only
    the first steps (a prefix re-execution, for ``bnlib verify --steps``)."""
    import papermill

    lead = cells[0]
    runs = Path(runs).resolve()  # the kernel starts in the repository, not in the runner's working folder
    runs.mkdir(parents=True, exist_ok=True)
    for c in cells:
        (runs / f"{c.id}.error").unlink(missing_ok=True)
    (runs / f"{lead.id}.kernel.log").unlink(missing_ok=True)
    # Every config key, defaults included, so the notebook's interactive defaults never leak into a cell.
    params = {**dataclasses.asdict(train.Config()), **lead.parameters}
    if device is not None and params.get("device", "auto") == "auto":
        params["device"] = device
    checkpoint = runs / f"{lead.id}.ckpt"  # a killed cell resumes from it; removed once the cell is done
    params.update(
        cell_id=lead.id,
        output_path=str((runs / f"{lead.id}.json").resolve()),
        threads=threads,
        checkpoint_path=str(checkpoint.resolve()),
        stop_after_step=stop_after,
        stack={
            c.id: {"seed": c.config().seed, "output_path": str((runs / f"{c.id}.json").resolve())} for c in cells[1:]
        },
    )
    started = time.perf_counter()
    error = None
    try:
        papermill.execute_notebook(
            str(notebook),
            str(runs / f"{lead.id}.ipynb"),
            parameters=params,
            kernel_name=KERNEL,
            progress_bar=False,
            cwd=str(paths.ROOT),
            kernel_manager_class=_kernel_manager_class(runs / f"{lead.id}.kernel.log", env),
        )
        missing = [c.id for c in cells if not (runs / f"{c.id}.json").exists()]
        if missing:
            error = f"the notebook finished without writing the metrics file of {', '.join(missing)}"
        else:
            checkpoint.unlink(missing_ok=True)
    except Exception as err:  # noqa: BLE001 - a failed cell is a result; the others go on
        if hasattr(err, "ename"):  # papermill: the exception raised inside the notebook
            error = f"{err.ename}: {err.evalue} (notebook cell [{err.exec_count}])\n{err}"
        else:
            error = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
    # each cell's share of a stack's time: what `bnlib run --dry-run` estimates a cell of this grid from
    seconds = (time.perf_counter() - started) / len(cells)
    if (runs / f"{lead.id}.ipynb").exists():
        published.compact_notebook(runs / f"{lead.id}.ipynb")  # its figures as 256-colour PNGs: a third of the bytes
    copy_stacked_notebooks(cells, runs)
    outcomes = []
    for c in cells:
        ok = (runs / f"{c.id}.json").exists()  # written last by the notebook: done, whatever failed after it
        if not ok and _INTERRUPTED.is_set():
            outcomes.append({"cell": c.id, "ok": False, "seconds": seconds, "error": "interrupted"})  # stays 'started'
            continue
        if not ok:
            write_error(runs, c.id, error)
        outcomes.append({"cell": c.id, "ok": ok, "seconds": seconds, "error": None if ok else error})
    return outcomes


def copy_stacked_notebooks(cells: list[Cell], runs: Path) -> list[str]:
    """Give each finished cell that was trained in another cell's stack (its metrics file's ``stacked_in``) a
    copy of that cell's notebook, with a note on top, unless it has it. Runs after every group and at the
    start of every run, so a runner killed between the two still leaves every finished cell its notebook."""
    import nbformat

    written = []
    for cell in cells:
        metrics = runs / f"{cell.id}.json"
        if not metrics.exists():
            continue
        raw = metrics.read_text()
        if '"stacked_in"' not in raw:  # most cells: skip the parse (the study's metrics files are ~30 MB in all)
            continue
        try:
            run = read_run(metrics)
        except CorruptRun:
            continue  # redone by the runner
        lead = run.stacked_in
        if not lead or lead == cell.id or not (runs / f"{lead}.ipynb").exists():
            continue
        target = runs / f"{cell.id}.ipynb"
        seeds = run.stacked_seeds or []
        nb = nbformat.read(runs / f"{lead}.ipynb", as_version=4)
        nb.cells.insert(
            0,
            nbformat.v4.new_markdown_cell(
                f"**Cell `{cell.id}` (seed {run.config['seed']}) was trained in one stacked model with seeds "
                f"{', '.join(map(str, seeds))}**, in the notebook of cell `{lead}`, which wrote this "
                f"cell's metrics file. Below is that notebook as it ran: the curves are seed "
                f"{(seeds or ['?'])[0]}'s, the last table has every seed's final numbers."
            ),
        )
        text = nbformat.writes(nb) + "\n"
        if target.exists() and target.read_text() == text:
            continue  # written earlier: a finished cell's files never change
        atomic_write(target, text)
        written.append(cell.id)
    return written


def write_error(runs: Path, cell_id: str, error: str) -> None:
    """A failed cell's error note, ``<cell>.error``, written atomically (its existence marks the cell failed)."""
    atomic_write(runs / f"{cell_id}.error", error if error.endswith("\n") else error + "\n")


# --- executors ------------------------------------------------------------------------------------


def default_jobs() -> tuple[int, int]:
    """(parallel cells, torch threads per cell): a cell per GPU, else the CPU cores shared out."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), max(1, (os.cpu_count() or 1) // torch.cuda.device_count())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Small models are overhead-bound: one single-threaded process per core beats threads.
    return max(1, cores), 1


class LocalExecutor:
    """Cells in parallel local kernels; each worker slot owns a GPU when there are GPUs."""

    def __init__(self, jobs: int | None = None, threads: int | None = None):
        default_j, default_t = default_jobs()
        self.jobs = jobs or default_j
        if threads is None:
            threads = default_t if jobs is None else max(1, (os.cpu_count() or 1) // self.jobs)
        self.threads = threads

    def run(self, groups: list[list[Cell]], runs: Path, on_done, notebook: Path = NOTEBOOK) -> None:
        """Execute each group (:func:`groups`: one cell, or cells stacked), calling ``on_done`` per cell."""
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        slots: queue.Queue[int] = queue.Queue()
        for i in range(self.jobs):
            slots.put(i)

        def task(group: list[Cell]) -> list[dict]:
            slot = slots.get()
            try:
                device = f"cuda:{slot % gpus}" if gpus > 1 else None
                return execute_group(group, runs, self.threads, device, notebook)
            finally:
                slots.put(slot)

        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures: dict[Future, list[Cell]] = {pool.submit(task, g): g for g in groups}
            try:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                    for f in done:
                        for outcome in f.result():
                            on_done(outcome)
            except KeyboardInterrupt:
                _INTERRUPTED.set()
                for f in futures:
                    f.cancel()
                for pid in list(_KERNEL_PIDS):  # the running cells end now; their notebooks stay, unfinished
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                raise


@dataclass
class Report:
    grid: str
    total: int
    skipped: int
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    stale_kept: int = 0  # done with other training code, kept (not redone without --stale)
    copied: list[str] = field(default_factory=list)  # cells given the results of the cell they train the same as

    @property
    def ok(self) -> bool:
        return not self.failed


@contextlib.contextmanager
def runner_lock(folder: Path, wait: bool = False):
    """One runner per grid results folder.

    ``fcntl.flock`` on ``<folder>/.runner.lock``: the kernel releases it when its holder exits or dies,
    so a lock left by a killed runner is taken over without any clean-up; on NFS, Linux turns flock into
    POSIX locks that the server arbitrates (NFSv4 and lockd-enabled NFSv3 -- the shared filesystems of
    Slurm clusters), so runners on different nodes exclude each other too. The file holds the holder's
    host, PID and start time for the refusal message.
    """
    import fcntl
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".runner.lock", "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another runner"
            if not wait:
                raise GridError(
                    f"{folder} is being run by {holder}; wait for it to end, or pass --wait "
                    "to start when it does (finished cells are then skipped)"
                ) from None
            print(f"waiting for {holder} to finish with {folder} ...", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:  # e.g. a filesystem mounted without lock support
            raise GridError(
                f"cannot lock {folder / '.runner.lock'} ({err}): this filesystem does not support "
                "file locks; run the grid from a folder on one that does"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {socket.gethostname()}, PID {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def run(
    grid: Grid,
    results: Path,
    executor=None,
    force: bool = False,
    progress: bool = True,
    notebook: Path = NOTEBOOK,
    wait: bool = False,
    stale: bool = False,
) -> Report:
    """Run the grid's cells that are not done (all with ``force``; stale ones too with ``stale``); finished
    cells are never redone otherwise (stale ones are kept and counted in the report).
    Holds the grid's :func:`runner_lock` throughout (``wait``: wait for another runner instead of refusing)."""
    with runner_lock(paths.grid_results(grid.name, results), wait):
        return _run(grid, results, executor, force, progress, notebook, stale)


def to_run(states: dict[str, str], force: bool = False, stale: bool = False) -> list[str]:
    """The cell ids to execute, given each cell's :func:`state`."""
    keep = {"done"} if stale else {"done", "stale"}
    return [cid for cid, s in states.items() if force or s not in keep]


def _run(
    grid: Grid, results: Path, executor, force: bool, progress: bool, notebook: Path, stale: bool = False
) -> Report:
    from tqdm.auto import tqdm

    _INTERRUPTED.clear()  # a Ctrl-C of an earlier run in this process is not this run's
    check_notebook(grid, notebook)
    runs = runs_dir(results, grid)
    states = {c.id: state(runs, c) for c in grid.cells}
    chosen = set(to_run(states, force, stale))
    todo = [c for c in grid.cells if c.id in chosen and c.same_as is None]
    for c in todo:  # a corrupt marker is redone; the file is kept aside for inspection, never deleted
        if states[c.id] == "corrupt":
            os.replace(runs / f"{c.id}.json", runs / f"{c.id}.json.corrupt")
    if todo:  # loading (or downloading) the data is only worth it when a cell will run
        check_datasets(dataclasses.replace(grid, cells=todo))
    runs.mkdir(parents=True, exist_ok=True)
    copy_stacked_notebooks(grid.cells, runs)  # a runner killed after a stack wrote its metrics, before the copies
    copied = copy_shared_results(grid, runs, results)  # twins of cells finished earlier need no wait
    report = Report(grid.name, len(grid.cells), len(grid.cells) - len(todo))
    report.stale_kept = sum(1 for c in grid.cells if states[c.id] == "stale" and c.id not in chosen)
    executor = executor or LocalExecutor()
    started = time.perf_counter()
    log = paths.grid_results(grid.name, results) / "cells.jsonl"
    with tqdm(total=len(todo), desc=f"grid {grid.name}", unit="cell", disable=not progress) as bar:

        def on_done(outcome: dict) -> None:
            if outcome["ok"]:
                report.finished.append(outcome["cell"])
            else:
                report.failed[outcome["cell"]] = outcome["error"].splitlines()[0] if outcome["error"] else "failed"
            with log.open("a") as f:
                f.write(json.dumps({k: outcome.get(k) for k in ("cell", "ok", "seconds")} | {"at": time.time()}) + "\n")
            bar.set_postfix(failed=len(report.failed), refresh=False)
            bar.update(1)

        if todo:
            executor.run(groups(todo, grid.stack_seeds), runs, on_done, notebook)
    report.copied = copied + copy_shared_results(grid, runs, results)
    report.seconds = time.perf_counter() - started
    return report


def copy_shared_results(grid: Grid, runs: Path, results: Path | None = None) -> list[str]:
    """Give every cell that trains the same as another (``same_as``) that cell's results, once it has them:
    the metrics file with this cell's own id, parameters and config (so it is aggregated under its own
    budget) and ``same_training_as``, and a notebook that says so. A twin in this grid gets its twin's
    notebook with a note on top; a cell of another grid (``reuse``) gets a one-cell notebook naming the
    source's, and its metrics file leaves the per-layer traces in the source's (they are that grid's
    subject and most of its size). Rewritten only when they differ, so a finished cell's files never change
    unless its source was re-run. ``results``: the results root the other grids' folders are in. Returns the cells
    written."""
    import nbformat

    written = []
    for cell in grid.cells:
        if cell.same_as is None:
            continue
        other, source_id = cell.reused or (None, cell.same_as)
        source_runs = runs if other is None else paths.runs_dir(other, results)
        if not (source_runs / f"{source_id}.json").exists():
            continue
        try:
            source = read_run(source_runs / f"{source_id}.json")
        except CorruptRun:
            continue  # its source is redone first
        config = train.Config.from_dict(cell.parameters)
        budget = {k: getattr(config, k) for k in ("steps", "epochs", "samples")}
        methods = (
            source.methods
            if other is None
            else {m: dataclasses.replace(rec, traces=ABSENT) for m, rec in source.methods.items()}
        )
        payload = dataclasses.replace(
            source,
            cell=cell.id,
            same_training_as=cell.same_as,
            methods=methods,
            parameters={**source.parameters, **budget},
            config={**source.config, **budget},
        ).to_dict()
        target = runs / f"{cell.id}.json"
        if target.exists() and "same_training_as" not in target.read_text():
            continue  # it ran itself (e.g. before its twin was in the grid): its own results stay
        if target.exists() and json.dumps(json.loads(target.read_text()), sort_keys=True) == json.dumps(
            payload, sort_keys=True
        ):
            continue  # compared as text: NaN never equals itself
        steps = ", ".join(f"{k}={v}" for k, v in budget.items() if v is not None)
        if other is None:
            nb = nbformat.read(runs / f"{source_id}.ipynb", as_version=4)
            nb.cells.insert(
                0,
                nbformat.v4.new_markdown_cell(
                    f"**Cell `{cell.id}` trains exactly what cell `{source_id}` trains** (the same resolved "
                    f"configuration; its budget, {steps}, is the same number of steps). The runner ran that cell once "
                    "and copied its results here; below is its notebook as it ran."
                ),
            )
        else:
            nb = nbformat.v4.new_notebook(
                cells=[
                    nbformat.v4.new_markdown_cell(
                        f"**Cell `{cell.id}` trains exactly what cell `{source_id}` of grid `{other}` trains** "
                        f"(the same resolved configuration; budget {steps}), so this grid did not train it again: its "
                        f"results are copied from `results/{other}/runs/{source_id}.json`, less the per-layer "
                        f"traces, which stay there. The notebook that trained it is "
                        f"`results/{other}/runs/{source_id}.ipynb`."
                    )
                ]
            )
        atomic_write(runs / f"{cell.id}.ipynb", lambda tmp: nbformat.write(nb, tmp))
        write_json(target, payload)  # last: the done marker
        written.append(cell.id)
    return written


def status(grid: Grid, results: Path) -> dict[str, list[str]]:
    runs = runs_dir(results, grid)
    out: dict[str, list[str]] = {"done": [], "stale": [], "corrupt": [], "failed": [], "started": [], "pending": []}
    for cell in grid.cells:
        out[state(runs, cell)].append(cell.id)
    return out


if __name__ == "__main__":  # python -m bnlib.runner: regenerate the cell notebook's parameters cell from train.Config
    print("rewrote" if write_parameters_cell() else "unchanged:", NOTEBOOK)
