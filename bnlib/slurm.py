"""The Slurm executor: a grid's pending cells as ONE Slurm job array, through submitit.

Each array task runs :func:`bnlib.grid.execute_cell` on the cluster, so it writes the same notebook, metrics
file (the done marker, by atomic rename) and error file into the shared results folder as a local run; the
grid logic (cell ids, skipping done cells, failures, aggregation) is the runner's, unchanged. A task that
Slurm ends without a result (cancelled, time limit, out of memory, node failure) is recorded as a failed
cell with Slurm's state; the runner polls ``sacct`` and never waits on it forever.

Logs of every task: ``results/<grid>/slurm/<job id>_<task>_log.{out,err}``; the submitted job ids:
``results/<grid>/slurm/jobs.json`` (read by ``bnlib status``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from . import grid as grid_mod
from .results import write_json_atomic

DEFAULTS = {"partition": None, "gpus_per_task": 0, "cpus_per_task": 1, "mem_gb": 4.0, "time_min": 60,
            "array_parallelism": 64, "sbatch": {}}
OPTION_KEYS = set(DEFAULTS)


class SlurmUnavailable(RuntimeError):
    pass


def _merge_options(grid_options: dict, args) -> dict:
    unknown = sorted(set(grid_options) - OPTION_KEYS)
    if unknown:
        raise grid_mod.GridError(f"slurm: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(OPTION_KEYS))}")
    options = {**DEFAULTS, **grid_options}
    for key in ("partition", "gpus_per_task", "cpus_per_task", "mem_gb", "time_min", "array_parallelism"):
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
    return options


class SlurmExecutor:
    """Submits the cells as one job array (``map_array``) and waits for them, polling ``sacct``."""

    def __init__(self, folder: Path, options: dict, poll_s: float = 15.0):
        if shutil.which("sbatch") is None or shutil.which("sacct") is None:
            raise SlurmUnavailable("--executor slurm needs Slurm's sbatch and sacct on PATH (and SLURM_CONF if the "
                                   "configuration is not in its default place)")
        self.folder = Path(folder)
        self.options = options
        self.poll_s = poll_s

    @classmethod
    def from_options(cls, grid: grid_mod.Grid, results: Path, args) -> "SlurmExecutor":
        return cls(Path(results) / grid.name / "slurm", _merge_options(grid.slurm, args), poll_s=getattr(args, "poll_s", 15.0) or 15.0)

    def _executor(self):
        import submitit

        ex = submitit.SlurmExecutor(folder=str(self.folder / "%j"), max_num_timeout=0)
        o = self.options
        params = {"cpus_per_task": int(o["cpus_per_task"]), "time": int(o["time_min"]), "mem": f"{int(float(o['mem_gb']) * 1024)}M",
                  "array_parallelism": int(o["array_parallelism"]), "job_name": "bnlib",
                  "additional_parameters": dict(o["sbatch"])}
        if o["partition"]:
            params["partition"] = o["partition"]
        if o["gpus_per_task"]:
            params["gpus_per_node"] = int(o["gpus_per_task"])
        ex.update_parameters(**params)
        return ex

    def run(self, cells: list[grid_mod.Cell], runs: Path, on_done, notebook: Path = grid_mod.NOTEBOOK) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        ex = self._executor()
        n = len(cells)
        threads = int(self.options["cpus_per_task"])
        # GPUs: the task sees only its own (Slurm sets CUDA_VISIBLE_DEVICES), so device stays "auto".
        jobs = ex.map_array(grid_mod.execute_cell, cells, [runs] * n, [threads] * n, [None] * n, [notebook] * n)
        record = {"submitted_at": time.time(), "cells": {c.id: j.job_id for c, j in zip(cells, jobs)}}
        write_json_atomic(self.folder / "jobs.json", record)
        print(f"submitted Slurm job array {jobs[0].job_id.split('_')[0]} with {n} tasks; logs in {self.folder}", flush=True)
        pending = dict(zip(jobs, cells))
        try:
            while pending:
                jobs[0].watcher.update()  # one sacct call for every job
                for job in list(pending):
                    if not job.done():
                        continue
                    cell = pending.pop(job)
                    on_done(self._outcome(job, cell, runs))
                if pending:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            print(f"\nthe Slurm tasks keep running; `bnlib status` shows them, `scancel {jobs[0].job_id.split('_')[0]}` stops them",
                  flush=True)
            raise

    @staticmethod
    def _outcome(job, cell: grid_mod.Cell, runs: Path) -> dict:
        try:
            outcome = job.result()
        except Exception as err:  # noqa: BLE001 - Slurm ended the task without a result: record why, keep going
            if (runs / f"{cell.id}.json").exists():  # it finished its work before Slurm ended it
                return {"cell": cell.id, "ok": True, "seconds": None, "error": None}
            outcome = {"cell": cell.id, "ok": False, "seconds": None,
                       "error": f"{type(err).__name__} without a result; log: {job.paths.stdout}"}
        if outcome["ok"]:
            return outcome
        # A task that Slurm cancels or kills often still returns a result (its kernel died first): say so.
        job.watcher.update()
        state = job.state
        if state.split()[0] not in ("COMPLETED", "RUNNING", "COMPLETING"):
            outcome["error"] = f"Slurm task {job.job_id} ended with state {state}: {outcome['error']}"
            grid_mod.write_error(runs, cell.id, outcome["error"])
        return outcome


def slurm_states(grid_folder: Path) -> dict[str, list[str]]:
    """Slurm's state of each submitted cell that is not done: {'PENDING': [...], 'RUNNING': [...], ...}."""
    record = Path(grid_folder) / "slurm" / "jobs.json"
    if not record.exists() or shutil.which("sacct") is None:
        return {}
    cells = json.loads(record.read_text())["cells"]
    runs = Path(grid_folder) / "runs"
    open_cells = {job: cell for cell, job in cells.items() if not (runs / f"{cell}.json").exists()}
    if not open_cells:
        return {}
    array_ids = sorted({job.split("_")[0] for job in open_cells})
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(array_ids)],
                         capture_output=True, text=True, timeout=60).stdout
    states: dict[str, list[str]] = {}
    seen = set()
    for line in out.splitlines():
        job, _, state = line.partition("|")
        if job in open_cells:
            states.setdefault(state.split()[0], []).append(open_cells[job])
            seen.add(job)
    for job in set(open_cells) - seen:  # a pending array often shows as one line "123_[0-9]"
        states.setdefault("PENDING" if any(line.startswith(job.split("_")[0] + "_[") for line in out.splitlines()) else "UNKNOWN",
                          []).append(open_cells[job])
    return states
