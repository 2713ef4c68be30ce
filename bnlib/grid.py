"""Grid files, cell ids, and the runner that executes one papermill notebook per cell.

A grid file (YAML, ``grids/<name>.yaml``)::

    description: what the grid is for
    methods: [bn, bnrs, brn]          # trained together, in lockstep, in every cell
    settings: {epochs: 2, lr: 0.001}  # shared by every cell (any training-config key)
    axes:                             # the cells are the cross product of the axes
      dataset: [digits]               # an axis named after a config key lists its values
      seed: [0, 1, 2]
      batching:                       # any other name is a zipped axis: each entry sets several keys
        - {batch_size: 2, sampler: iid}
        - {batch_size: 16, sampler: noniid, classes_per_batch: 2}
    slurm: {partition: gpu, gpus_per_task: 1}   # optional, for --executor slurm
    stack_seeds: true                 # optional: the cells that differ only in seed train as one model

Every cell gets a stable id from its parameters. Its notebook is written to
``results/<grid>/runs/<cell>.ipynb``; its metrics file ``<cell>.json``, written last by atomic rename by
the notebook itself, is the done marker. A failed cell leaves ``<cell>.error`` beside its partial notebook.

With ``stack_seeds``, the pending cells that differ only in their seed run as one notebook execution
(:func:`bnlib.train.train_seeds`: the seeds as one stacked model, several times faster at small batches):
the notebook of the group's first cell writes every member's metrics file, and each member gets a copy of
that notebook with a note on top. Each seed's numbers equal its solo run to float tolerance, not bit for
bit, so ``bnlib verify`` re-runs a stacked cell in its stack; the metrics file records ``stacked_seeds``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
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
import yaml

from . import train

ROOT = Path(__file__).resolve().parent.parent
GRIDS_DIR = ROOT / "grids"
NOTEBOOK = ROOT / "book" / "notebooks" / "run.ipynb"
KERNEL = "bnlib"
TOP_KEYS = {"description", "methods", "settings", "axes", "slurm", "stack_seeds"}
CONFIG_KEYS = {f for f in train.Config.__dataclass_fields__}
RUNNER_PARAMETERS = ("cell_id", "output_path", "threads", "checkpoint_path", "stack")  # filled in by the runner, not by grid files
# Kernels of this process, so Ctrl-C can stop them (jupyter starts kernels in their own session: the
# terminal's SIGINT never reaches them), and whether the user interrupted.
_KERNEL_PIDS: set[int] = set()
_INTERRUPTED = threading.Event()


class GridError(ValueError):
    """A grid file that cannot run; the message names the file and the key."""


@dataclass
class Cell:
    id: str
    parameters: dict  # training-config keys only
    # another cell of the grid that trains exactly the same models (e.g. 50 steps at batch 128 and 6,400
    # samples at batch 128): this cell is not executed, its results are copied from that one
    same_as: str | None = None

    def config(self) -> train.Config:
        return train.Config.from_dict(self.parameters)


@dataclass
class Grid:
    name: str
    path: Path
    description: str
    cells: list[Cell]
    slurm: dict = field(default_factory=dict)
    stack_seeds: bool = False  # run the cells that differ only in seed as one stacked model


def resolve(grid: str | Path) -> Path:
    """A grid by name (``grids/<name>.yaml``) or by path."""
    path = Path(grid)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise GridError(f"grid file {path} does not exist")
        return path
    path = GRIDS_DIR / f"{grid}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in GRIDS_DIR.glob("*.yaml")))
        raise GridError(f"no grid named {grid!r}: {path} does not exist (known grids: {known})")
    return path


LOCAL_KEYS = train.LOCAL_KEYS  # where a cell runs, not what it computes: left out of the cell id
# Keys added after grids were run, left out of the id while at the value that reproduces the earlier
# results (adding an option must not orphan finished cells); any other value is hashed as usual.
ID_NEUTRAL = {"eval_batch_stats": False}


def _resolved(config: train.Config) -> dict:
    """Every setting of a cell, defaults included, less the ones about where it runs."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in LOCAL_KEYS}


def cell_id(parameters: dict) -> str:
    """Readable prefix + hash of the full resolved configuration (``train.Config``'s defaults included, so
    changing a default gives new cells instead of silently counting old results as done); stable across
    runs and machines."""
    resolved = {k: v for k, v in _resolved(train.Config.from_dict(parameters)).items()
                if not (k in ID_NEUTRAL and v == ID_NEUTRAL[k])}
    canonical = json.dumps(resolved, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:10]
    p = parameters
    prefix = f"{p.get('dataset', 'digits')}-b{p.get('batch_size', 16)}-{p.get('sampler', 'iid')}"
    if p.get("norm_placement", "all") != "all":
        prefix += f"-{p['norm_placement']}"
    return f"{prefix}-s{p.get('seed', 0)}-{digest}"


def training_key(parameters: dict) -> str:
    """What a cell trains: its resolved configuration with the budget as a number of steps, so two cells
    whose budgets name the same steps differently (``steps: 50`` and ``samples: 6400`` at batch 128) share
    it. Budgets in epochs depend on the dataset's size and are kept as given."""
    config = train.Config.from_dict(parameters)
    resolved = _resolved(config)
    if config.epochs is None:
        resolved.update(steps=train.total_steps(config, 0), samples=None)
    return json.dumps(resolved, sort_keys=True, separators=(",", ":"))


def parse_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as a settings mapping (VALUE read as YAML: ``lr=3e-4``, ``recompute=false``)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in CONFIG_KEYS:
            raise GridError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(CONFIG_KEYS))}")
        out[key] = yaml.safe_load(raw)
    return out


def load(grid: str | Path, overrides: dict | None = None) -> Grid:
    """Read and check a grid file; every cell is validated before anything runs. ``overrides`` (from
    ``--set``) replace a setting in every cell, axes included, so the cell ids follow the values that run,
    and name the grid ``<grid>+KEY=VALUE``: its results go to their own folder."""
    path = resolve(grid)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(spec, dict):
        raise GridError(f"{path}: expected a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    unknown = sorted(set(spec) - TOP_KEYS)
    if unknown:
        raise GridError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(TOP_KEYS))}")
    settings = spec.get("settings") or {}
    axes = spec.get("axes") or {}
    if not isinstance(settings, dict) or not isinstance(axes, dict):
        raise GridError(f"{path}: 'settings' and 'axes' must be mappings")
    for key in settings:
        if key not in CONFIG_KEYS or key == "methods":
            raise GridError(f"{path}: settings: unknown key {key!r}; known keys: {', '.join(sorted(CONFIG_KEYS - {'methods'}))}")
    choices = []
    for axis, values in axes.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"{path}: axes.{axis} must be a non-empty list")
        if axis in CONFIG_KEYS:
            choices.append([{axis: v} for v in values])
            continue
        for i, entry in enumerate(values):
            if not isinstance(entry, dict):
                raise GridError(
                    f"{path}: axes.{axis}: {axis!r} is not a config key, so it must list mappings of config keys "
                    f"(a zipped axis); entry {i} is {entry!r}. Config keys: {', '.join(sorted(CONFIG_KEYS))}"
                )
            for key in entry:
                if key not in CONFIG_KEYS:
                    raise GridError(f"{path}: axes.{axis}[{i}]: unknown key {key!r}; known keys: {', '.join(sorted(CONFIG_KEYS))}")
        choices.append(values)
    methods = spec.get("methods")
    if methods is not None and not isinstance(methods, list):
        raise GridError(f"{path}: 'methods' must be a list of method ids")
    cells, seen = [], set()
    for combo in itertools.product(*choices):
        params = dict(settings)
        if methods is not None:
            params["methods"] = list(methods)
        for part in combo:
            params.update(part)
        params.update(overrides or {})
        try:
            config = train.Config.from_dict(params, source=str(path))
            train.validate(config)
        except (train.ConfigError, TypeError) as err:
            raise GridError(f"{path}: cell {params}: {err}") from None
        params = {k: getattr(config, k) for k in params}  # typed: lr "1e-3" (YAML 1.1) is the float 0.001
        cid = cell_id(params)
        if cid not in seen:
            seen.add(cid)
            cells.append(Cell(cid, params))
    first_of: dict[str, str] = {}
    for cell in cells:  # the first cell of each training runs; later ones take its results
        key = training_key(cell.parameters)
        if key in first_of:
            cell.same_as = first_of[key]
        else:
            first_of[key] = cell.id
    slurm = spec.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise GridError(f"{path}: 'slurm' must be a mapping")
    # an overridden grid keeps its results apart (results/<grid>+lr=0.0003/): aggregation never mixes them
    typed = cells[0].parameters if cells else {}
    name = path.stem + "".join(f"+{k}={json.dumps(typed.get(k, v), separators=(',', ':')).strip(chr(34))}"
                               for k, v in sorted((overrides or {}).items()))
    stack_seeds = spec.get("stack_seeds", False)
    if not isinstance(stack_seeds, bool):
        raise GridError(f"{path}: 'stack_seeds' must be true or false, not {stack_seeds!r}")
    return Grid(name, path, spec.get("description", ""), cells, slurm, stack_seeds)


def select(grid: Grid, only: list[str]) -> Grid:
    """The grid restricted to cells matching every ``KEY=VALUE`` (VALUE read as YAML: ``batch_size=2``)."""
    keep = grid.cells
    for item in only:
        key, sep, raw = item.partition("=")
        if not sep or key not in CONFIG_KEYS:
            raise GridError(f"--only {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(CONFIG_KEYS))}")
        value = yaml.safe_load(raw)
        keep = [c for c in keep if c.config().__dict__[key] == value]
    if not keep:
        raise GridError(f"{grid.path}: no cell matches {' and '.join(only)}")
    kept = {c.id for c in keep}
    # a selected cell whose twin is not selected trains itself
    keep = [c if c.same_as in kept or c.same_as is None else dataclasses.replace(c, same_as=None) for c in keep]
    return dataclasses.replace(grid, cells=keep)


def estimate_seconds(grid: Grid, results: Path, cells: list[Cell]) -> dict[str, float | None]:
    """Expected seconds per cell from this grid's history (cells.jsonl): the mean of finished cells with the
    same dataset, batch size and budget; else a linear model fitted to the dataset's finished cells, seconds =
    fixed (evaluation, start-up) + per step x steps + per sample x samples trained (or without the per-step term
    while the finished cells cannot tell the two apart); else the mean of all finished cells; else None."""
    log = Path(results) / grid.name / "cells.jsonl"
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
    from . import data

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


def condition_key(cell: Cell) -> str:
    """A cell's resolved configuration less its seed: the cells sharing it can be stacked."""
    key = {k: v for k, v in _resolved(cell.config()).items() if k != "seed"}
    return json.dumps(key, sort_keys=True, default=str)


def runs_dir(results: Path, grid: Grid) -> Path:
    return Path(results) / grid.name / "runs"


def state(runs: Path, cell: Cell) -> str:
    """done (a valid metrics file), stale (done, by training code other than the current: its recorded
    ``training_code_sha256`` differs and is not one the current code reproduces, see
    :data:`bnlib.results.REPRODUCED_TRAINING_CODE`; files written before that field existed count as done), corrupt (a
    metrics file that does not parse, lacks keys or names another cell), failed (error recorded), started
    (notebook only) or pending."""
    from .results import CorruptRun, is_current, read_run

    if (runs / f"{cell.id}.json").exists():
        try:
            run = read_run(runs / f"{cell.id}.json")
        except CorruptRun:
            return "corrupt"
        return "done" if is_current(run.get("provenance", {}).get("training_code_sha256")) else "stale"
    if (runs / f"{cell.id}.error").exists():
        return "failed"
    if (runs / f"{cell.id}.ipynb").exists():
        return "started"
    return "pending"


# --- executing one cell ---------------------------------------------------------------------------


def _kernel_manager_class(log_path: Path):
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        """Unix sockets in a private folder, so concurrent kernels never race for TCP ports; the kernel
        process's own output goes to the cell's ``.kernel.log`` instead of the runner's terminal."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = os.path.join(tempfile.mkdtemp(prefix="bnlib-kernel-"), "k")

        async def _async_launch_kernel(self, kernel_cmd, **kw):
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


def execute_cell(cell: Cell, runs: Path, threads: int = 0, device: str | None = None, notebook: Path = NOTEBOOK) -> dict:
    """Run one cell's notebook through papermill; returns {'cell', 'ok', 'seconds', 'error'}.

    The notebook writes ``<cell>.json`` as its last act; a cell whose notebook raised, or that ended
    without writing it, is failed and its error goes to ``<cell>.error``.
    """
    return execute_group([cell], runs, threads, device, notebook)[0]


def execute_group(cells: list[Cell], runs: Path, threads: int = 0, device: str | None = None,
                  notebook: Path = NOTEBOOK) -> list[dict]:
    """Run cells that differ only in their seed as ONE notebook execution, the seeds stacked into one model
    (see :func:`groups`); one cell is :func:`execute_cell`. The first cell leads: its notebook trains every
    seed and writes every member's metrics file; each member gets a copy of the notebook. Returns each
    cell's outcome."""
    import papermill

    lead = cells[0]
    runs.mkdir(parents=True, exist_ok=True)
    for c in cells:
        (runs / f"{c.id}.error").unlink(missing_ok=True)
    (runs / f"{lead.id}.kernel.log").unlink(missing_ok=True)
    # Every config key, defaults included, so the notebook's interactive defaults never leak into a cell.
    params = {**dataclasses.asdict(train.Config()), **lead.parameters}
    if device is not None and params.get("device", "auto") == "auto":
        params["device"] = device
    checkpoint = runs / f"{lead.id}.ckpt"  # a killed cell resumes from it; removed once the cell is done
    params.update(cell_id=lead.id, output_path=str((runs / f"{lead.id}.json").resolve()), threads=threads,
                  checkpoint_path=str(checkpoint.resolve()),
                  stack={c.id: {"seed": c.config().seed, "output_path": str((runs / f"{c.id}.json").resolve())}
                         for c in cells[1:]})
    started = time.perf_counter()
    error = None
    try:
        papermill.execute_notebook(
            str(notebook), str(runs / f"{lead.id}.ipynb"), parameters=params, kernel_name=KERNEL,
            progress_bar=False, cwd=str(ROOT), kernel_manager_class=_kernel_manager_class(runs / f"{lead.id}.kernel.log"),
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
            payload = json.loads(raw)
        except ValueError:
            continue  # corrupt: redone by the runner
        lead = payload.get("stacked_in")
        if not lead or lead == cell.id or not (runs / f"{lead}.ipynb").exists():
            continue
        target = runs / f"{cell.id}.ipynb"
        nb = nbformat.read(runs / f"{lead}.ipynb", as_version=4)
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(
            f"**Cell `{cell.id}` (seed {payload['config']['seed']}) was trained in one stacked model with seeds "
            f"{', '.join(map(str, payload.get('stacked_seeds', [])))}**, in the notebook of cell `{lead}`, which wrote this "
            f"cell's metrics file. Below is that notebook as it ran: the curves are seed "
            f"{payload.get('stacked_seeds', ['?'])[0]}'s, the last table has every seed's final numbers."))
        text = nbformat.writes(nb) + "\n"
        if target.exists() and target.read_text() == text:
            continue  # written earlier: a finished cell's files never change
        tmp = runs / f"{cell.id}.ipynb.tmp"
        tmp.write_text(text)
        os.replace(tmp, target)
        written.append(cell.id)
    return written


def write_error(runs: Path, cell_id: str, error: str) -> None:
    """A failed cell's error note, ``<cell>.error``, written atomically (its existence marks the cell failed)."""
    tmp = runs / f"{cell_id}.error.tmp"
    tmp.write_text(error if error.endswith("\n") else error + "\n")
    os.replace(tmp, runs / f"{cell_id}.error")


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
                raise GridError(f"{folder} is being run by {holder}; wait for it to end, or pass --wait "
                                "to start when it does (finished cells are then skipped)") from None
            print(f"waiting for {holder} to finish with {folder} ...", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:  # e.g. a filesystem mounted without lock support
            raise GridError(f"cannot lock {folder / '.runner.lock'} ({err}): this filesystem does not support "
                            "file locks; run the grid from a folder on one that does") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {socket.gethostname()}, PID {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def run(grid: Grid, results: Path, executor=None, force: bool = False, progress: bool = True, notebook: Path = NOTEBOOK,
        wait: bool = False, stale: bool = False) -> Report:
    """Run the grid's cells that are not done (all with ``force``; stale ones too with ``stale``); finished
    cells are never redone otherwise (stale ones are kept and counted in the report).
    Holds the grid's :func:`runner_lock` throughout (``wait``: wait for another runner instead of refusing)."""
    with runner_lock(Path(results) / grid.name, wait):
        return _run(grid, results, executor, force, progress, notebook, stale)


def to_run(states: dict[str, str], force: bool = False, stale: bool = False) -> list[str]:
    """The cell ids to execute, given each cell's :func:`state`."""
    keep = {"done"} if stale else {"done", "stale"}
    return [cid for cid, s in states.items() if force or s not in keep]


def _run(grid: Grid, results: Path, executor, force: bool, progress: bool, notebook: Path, stale: bool = False) -> Report:
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
    copied = copy_shared_results(grid, runs)  # twins of cells finished earlier need no wait
    report = Report(grid.name, len(grid.cells), len(grid.cells) - len(todo))
    report.stale_kept = sum(1 for c in grid.cells if states[c.id] == "stale" and c.id not in chosen)
    executor = executor or LocalExecutor()
    started = time.perf_counter()
    log = Path(results) / grid.name / "cells.jsonl"
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
    report.copied = copied + copy_shared_results(grid, runs)
    report.seconds = time.perf_counter() - started
    return report


def copy_shared_results(grid: Grid, runs: Path) -> list[str]:
    """Give every cell that trains the same as another (``same_as``) that cell's results, once it has them:
    the metrics file with this cell's own id, parameters and config (so it is aggregated under its own
    budget) and ``same_training_as``, and the notebook with a note on top. Rewritten only when they differ,
    so a finished cell's files never change unless its twin was re-run. Returns the cells written."""
    import nbformat

    from .results import CorruptRun, read_run, write_json_atomic

    written = []
    for cell in grid.cells:
        if cell.same_as is None or not (runs / f"{cell.same_as}.json").exists():
            continue
        try:
            source = read_run(runs / f"{cell.same_as}.json")
        except CorruptRun:
            continue  # its twin is redone first
        config = train.Config.from_dict(cell.parameters)
        budget = {k: getattr(config, k) for k in ("steps", "epochs", "samples")}
        payload = {**source, "cell": cell.id, "same_training_as": cell.same_as,
                   "parameters": {**source["parameters"], **budget}, "config": {**source["config"], **budget}}
        target = runs / f"{cell.id}.json"
        if target.exists() and "same_training_as" not in target.read_text():
            continue  # it ran itself (e.g. before its twin was in the grid): its own results stay
        if target.exists() and json.dumps(json.loads(target.read_text()), sort_keys=True) == json.dumps(payload, sort_keys=True):
            continue  # compared as text: NaN never equals itself
        nb = nbformat.read(runs / f"{cell.same_as}.ipynb", as_version=4)
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(
            f"**Cell `{cell.id}` trains exactly what cell `{cell.same_as}` trains** (the same resolved configuration; "
            f"its budget, {', '.join(f'{k}={v}' for k, v in budget.items() if v is not None)}, is the same number of "
            f"steps). The runner ran that cell once and copied its results here; below is its notebook as it ran."))
        tmp = runs / f"{cell.id}.ipynb.tmp"
        nbformat.write(nb, tmp)
        os.replace(tmp, runs / f"{cell.id}.ipynb")
        write_json_atomic(target, payload)  # last: the done marker
        written.append(cell.id)
    return written


def status(grid: Grid, results: Path) -> dict[str, list[str]]:
    runs = runs_dir(results, grid)
    out: dict[str, list[str]] = {"done": [], "stale": [], "corrupt": [], "failed": [], "started": [], "pending": []}
    for cell in grid.cells:
        out[state(runs, cell)].append(cell.id)
    return out
