"""The Slurm executor: a grid's pending cells as ONE Slurm job array, through submitit.

Each array task runs :func:`bnlib.runner.execute_group` (one cell, or the cells of a ``stack_seeds`` group) on
the cluster, so it writes the same notebook, metrics
file (the done marker, by atomic rename) and error file into the shared results folder as a local run; the
grid logic (cell ids, skipping done cells, failures, aggregation) is the runner's, unchanged. A task that
Slurm ends without a result (cancelled, time limit, out of memory, node failure) is recorded as a failed
cell with Slurm's state; the runner polls ``sacct`` and never waits on it forever.

Requeueing (``retries``, ``--retries N``): each task is a submitit ``Checkpointable``, so a task that Slurm
preempts is requeued (always) and one that reaches its time limit is requeued up to N times (Slurm warns it
``signal_delay_s`` seconds before the limit; submitit then runs ``scontrol requeue``); with N > 0 the tasks are
also submitted with ``--requeue``, so Slurm requeues them when their node fails. A requeued task keeps its
array task id and resumes its cell from the checkpoint the training loop saved (``<cell>.ckpt``, every
``checkpoint_minutes``).

Re-running while an earlier submission is still alive (its runner was interrupted; the tasks keep running):
cells whose task ``squeue`` lists as pending or running are not submitted again; the runner waits for those
tasks and records their outcome like its own.

Logs of every task: ``results/<grid>/slurm/<job id>_<task>_log.{out,err}``; the submitted job ids:
``results/<grid>/slurm/jobs.json`` (read by ``bnlib status``).
"""

from __future__ import annotations

import getpass
import json
import shutil
import subprocess
import time
from pathlib import Path

import submitit

from . import grid as grid_mod
from . import paths, runner
from .record import write_json

DEFAULTS = {
    "partition": None,
    "gpus_per_task": 0,
    "cpus_per_task": 1,
    "mem_gb": 4.0,
    "time_min": 60,
    "array_parallelism": 64,
    "retries": 0,
    "signal_delay_s": 90,
    "sbatch": {},
}
OPTION_KEYS = set(DEFAULTS)
# Slurm states of a task that may still write its cell's result
LIVE_STATES = (
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
)


class CellTask(submitit.helpers.Checkpointable):
    """One cell as a requeueable array task: on preemption or at the time limit submitit calls
    ``checkpoint`` (inherited: the same call again) and requeues the task, which resumes the cell from
    the checkpoint its training loop saves every ``checkpoint_minutes`` (``<cell>.ckpt``)."""

    def __call__(self, cells, runs, threads, device, notebook):
        return runner.execute_group(cells, runs, threads, device, notebook)


class SlurmUnavailable(RuntimeError):
    pass


def _merge_options(grid_options: dict, args) -> dict:
    unknown = sorted(set(grid_options) - OPTION_KEYS)
    if unknown:
        raise grid_mod.GridError(
            f"slurm: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(OPTION_KEYS))}"
        )
    options = {**DEFAULTS, **grid_options}
    for key in ("partition", "gpus_per_task", "cpus_per_task", "mem_gb", "time_min", "array_parallelism", "retries"):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    extra = dict(options.get("sbatch") or {})
    for item in getattr(args, "sbatch", None) or []:
        if "=" not in item:
            raise grid_mod.GridError(f"--sbatch {item!r}: expected KEY=VALUE, e.g. --sbatch account=myproject")
        key, value = item.split("=", 1)
        extra[key.strip().lstrip("-")] = value
    options["sbatch"] = extra
    if int(options["retries"]) < 0:
        raise grid_mod.GridError(f"slurm: retries must be 0 or more, got {options['retries']}")
    return options


class SlurmExecutor:
    """Submits the cells as one job array (``map_array``) and waits for them, polling ``sacct``."""

    def __init__(self, folder: Path, options: dict, poll_s: float = 15.0):
        if any(shutil.which(tool) is None for tool in ("sbatch", "sacct", "squeue")):
            raise SlurmUnavailable(
                "--executor slurm needs Slurm's sbatch, squeue and sacct on PATH (and SLURM_CONF if the "
                "configuration is not in its default place)"
            )
        self.folder = Path(folder)
        self.options = options
        self.poll_s = poll_s

    @classmethod
    def from_options(cls, grid: grid_mod.Grid, results: Path, args) -> "SlurmExecutor":
        return cls(
            paths.grid_results(grid.name, results) / "slurm",
            _merge_options(grid.slurm, args),
            poll_s=getattr(args, "poll_s", 15.0) or 15.0,
        )

    def _executor(self):
        o = self.options
        ex = submitit.SlurmExecutor(folder=str(self.folder / "%j"), max_num_timeout=int(o["retries"]))
        extra = dict(o["sbatch"])
        if int(o["retries"]) > 0:
            extra.setdefault("requeue", True)  # Slurm requeues the task when its node fails
        params = {
            "cpus_per_task": int(o["cpus_per_task"]),
            "time": int(o["time_min"]),
            "mem": f"{int(float(o['mem_gb']) * 1024)}M",
            "array_parallelism": int(o["array_parallelism"]),
            "job_name": "bnlib",
            "signal_delay_s": int(o["signal_delay_s"]),
            "additional_parameters": extra,
        }
        if o["partition"]:
            params["partition"] = o["partition"]
        if o["gpus_per_task"]:
            params["gpus_per_node"] = int(o["gpus_per_task"])
        ex.update_parameters(**params)
        return ex

    def _job(self, job_id: str):
        return submitit.SlurmJob(folder=str(self.folder / "%j"), job_id=job_id)

    def _live(self, cells: list[grid_mod.Cell], record: dict[str, str]) -> dict[str, str]:
        """{cell id: job id} of the cells whose task from an earlier submission is still pending or running."""
        # A task that has written its result can write nothing more, even while squeue still lists it
        # (COMPLETING, on a busy node for seconds): it is over, and its cell is submitted again if unfinished.
        wanted = {
            c.id: record[c.id]
            for c in cells
            if c.id in record and not self._job(record[c.id]).paths.result_pickle.exists()
        }
        if not wanted:
            return {}
        # squeue asks slurmctld itself: sacct reads the accounting database, which may not list a task yet
        out = subprocess.run(
            ["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"], capture_output=True, text=True, timeout=60
        ).stdout
        states = dict(line.partition("|")[::2] for line in out.splitlines() if "|" in line)
        return {cell: job for cell, job in wanted.items() if states.get(job, "") in LIVE_STATES}

    def run(self, groups: list[list[grid_mod.Cell]], runs: Path, on_done, notebook: Path = runner.NOTEBOOK) -> None:
        """One array task per group (:func:`bnlib.grid.groups`), ``on_done`` per cell."""
        self.folder.mkdir(parents=True, exist_ok=True)
        submitted = _read_record(self.folder / "jobs.json")  # every cell's latest task, updated below
        live = self._live([c for g in groups for c in g], submitted)
        pending: dict = {}  # task -> the cells it runs
        for cell, job in live.items():  # a live task is waited for with every cell it runs
            pending.setdefault(job, []).append(next(c for g in groups for c in g if c.id == cell))
        pending = {self._job(job): cells for job, cells in pending.items()}
        if live:
            arrays = ", ".join(sorted({j.split("_")[0] for j in live.values()}))
            print(
                f"{len(live)} cells are still pending or running in Slurm from an earlier submission (array {arrays}): "
                "not submitted again; waiting for them",
                flush=True,
            )
        fresh = [kept for g in groups if (kept := [c for c in g if c.id not in live])]
        if fresh:
            ex = self._executor()
            n = len(fresh)
            threads = int(self.options["cpus_per_task"])
            # GPUs: the task sees only its own (Slurm sets CUDA_VISIBLE_DEVICES), so device stays "auto".
            jobs = ex.map_array(CellTask(), fresh, [runs] * n, [threads] * n, [None] * n, [notebook] * n)
            submitted.update({c.id: j.job_id for g, j in zip(fresh, jobs) for c in g})
            pending.update(zip(jobs, fresh))
            print(
                f"submitted Slurm job array {jobs[0].job_id.split('_')[0]} with {n} tasks; logs in {self.folder}",
                flush=True,
            )
        write_json(self.folder / "jobs.json", {"submitted_at": time.time(), "cells": submitted})
        try:
            while pending:
                next(iter(pending)).watcher.update()  # one sacct call for every job
                for job in list(pending):
                    if not job.done():
                        continue
                    for outcome in self._outcomes(job, pending.pop(job), runs):
                        on_done(outcome)
                if pending:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            arrays = " ".join(sorted({j.job_id.split("_")[0] for j in pending}))
            print(
                f"\nthe Slurm tasks keep running; `bnlib status` shows them, `scancel {arrays}` stops them; "
                "`bnlib run` again waits for them instead of submitting them twice",
                flush=True,
            )
            raise

    @staticmethod
    def _outcomes(job, cells: list[grid_mod.Cell], runs: Path) -> list[dict]:
        try:
            by_cell = {o["cell"]: o for o in job.result()}
            outcomes = [by_cell[c.id] for c in cells]
        except Exception as err:  # noqa: BLE001 - Slurm ended the task without a result: record why, keep going
            why = f"{type(err).__name__} without a result; log: {job.paths.stdout}"
            # a cell whose metrics file exists finished its work before Slurm ended the task
            outcomes = [
                {
                    "cell": c.id,
                    "ok": (runs / f"{c.id}.json").exists(),
                    "seconds": None,
                    "error": None if (runs / f"{c.id}.json").exists() else why,
                }
                for c in cells
            ]
        if all(o["ok"] for o in outcomes):
            return outcomes
        # A task that Slurm cancels or kills often still returns a result (its kernel died first): say so.
        job.watcher.update()
        state = job.state
        if state.split()[0] not in ("COMPLETED", "RUNNING", "COMPLETING"):
            for o in outcomes:
                if not o["ok"]:
                    o["error"] = f"Slurm task {job.job_id} ended with state {state}: {o['error']}"
                    runner.write_error(runs, o["cell"], o["error"])
        return outcomes


def _read_record(path: Path) -> dict[str, str]:
    """{cell id: job id} of every submission recorded in ``jobs.json`` (empty if none)."""
    return json.loads(path.read_text())["cells"] if path.exists() else {}


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """sacct's state of each array task ``<array>_<task>``; a pending array often shows as one line
    ``<array>_[0-9]``, whose tasks are reported PENDING."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    arrays = sorted({job.split("_")[0] for job in job_ids})
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(arrays)],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    rows = dict(line.partition("|")[::2] for line in out.splitlines() if "|" in line)
    states = {}
    for job in job_ids:
        if job in rows:
            states[job] = rows[job]
        elif any(j.startswith(job.split("_")[0] + "_[") for j in rows):
            states[job] = "PENDING"
    return states


def slurm_states(grid_folder: Path) -> dict[str, list[str]]:
    """Slurm's state of each submitted cell that is not done: {'PENDING': [...], 'RUNNING': [...], ...}."""
    cells = _read_record(Path(grid_folder) / "slurm" / "jobs.json")
    runs = Path(grid_folder) / "runs"
    open_cells = {cell: job for cell, job in cells.items() if not (runs / f"{cell}.json").exists()}
    known = sacct_states(sorted(set(open_cells.values())))
    if not known and shutil.which("sacct") is None:
        return {}
    states: dict[str, list[str]] = {}
    for cell, job in open_cells.items():
        states.setdefault(known.get(job, "UNKNOWN").split(" ")[0], []).append(cell)
    return states
