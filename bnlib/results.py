"""Run records on disk, the tidy table of a grid, and its summary (t intervals, paired differences; see :mod:`bnlib.stats`).

A cell's metrics file (``results/<grid>/runs/<cell>.json``) is written last, by atomic rename: its
existence means the cell is done. :func:`evaluations` gathers every run of a grid into one tidy table
(a row per cell x method x evaluation); :func:`summarise` reduces it to the final accuracy per method and
condition with a Student-t 95% interval over seeds, the paired difference against BN with its interval, a
paired t-test, the seeds in which the method beat BN, and a verdict after Holm's correction.

A diverged run counts as chance accuracy (1 / number of classes) in the statistics: a network whose
weights are NaN predicts nothing. The ``diverged`` column says how many runs that was.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import pandas as pd

from . import stats

REFERENCE = "bn"
# Condition columns that identify a comparison (everything a grid may vary except the seed).
CONDITION_KEYS = ("dataset", "batch_size", "sampler", "classes_per_batch", "norm_placement", "budget", "width", "depth", "optimizer", "lr")


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """Write JSON to a temporary file beside ``path``, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) or None


# The modules a cell's numbers depend on (with the cell notebook): a change to them makes finished cells stale.
TRAINING_CODE = ("data.py", "models.py", "norms.py", "stacked.py", "train.py")


def code_fingerprint(modules: tuple[str, ...] | None = None) -> str:
    """sha256 of the code a cell runs: ``modules`` of bnlib (default: every ``bnlib/*.py``) and the cell
    notebook (what git's dirty flag cannot tell apart). Recorded in every metrics file, so results of other
    code can be found later."""
    import hashlib

    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    files = sorted(root.glob("*.py")) if modules is None else [root / m for m in sorted(modules)]
    for path in files + [root.parent / "book" / "notebooks" / "run.ipynb"]:
        if path.exists():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# Taken when the module is imported (a cell's kernel imports it before training), not when the metrics
# file is written: an edit to bnlib during a long cell must not be credited to that cell.
CODE_SHA256 = code_fingerprint()
TRAINING_SHA256 = code_fingerprint(TRAINING_CODE)

# Earlier training code whose cells the current code reproduces exactly: cells run with it are not stale.
# An entry is added only after `bnlib verify` re-executed committed cells with the new code and found every
# recorded number identical on the machine type that ran them (the entry says which command, where);
# tests/test_published.py re-executes the cheapest committed study cell on every CI run. A change that moves
# any number (a method, the data, evaluation) adds nothing here: its committed cells are stale.
REPRODUCED_TRAINING_CODE = {
    "b33473e34524069885f78338e44a7a5067ef0fd55942bbfb23841aa3916c57b3":
        "the study's code (c94e3a1). Added after it, changing no number of a one-seed run: checkpoints inside a "
        "cell, CUDA-event timing, stacked seeds (`train_seeds`; one seed is the old loop). Checked 2026-11-23 with "
        "`bnlib verify study --cell mnist5k-b2-iid-s0-0fc833a067 --cell mnist5k-b16-noniid-s0-31a959e14e`: "
        "bit-identical, every recorded curve, on the 2-core AMD EPYC that ran the study; the grid runner's stacked "
        "seeds (notebook calls `train_seeds`) are held to it by tests/test_published.py's re-execution in CI",
    "bbbe5a9fb78c2a3acd64963d5b3f15809b956b55062effeb9ddab8a7ba617d93":
        "the code of 2d0fb17 (checkpoints, stacked seeds in `train`), which ran the later Fashion-MNIST cells. "
        "Changed after it, no number of a one-seed run: the cell notebook calls `train_seeds` (one seed is `train`) "
        "and can write stacked members' files. Checked 2026-11-23 with `bnlib verify study --cell "
        "fashionmnist-b16-iid-s3-6a68aaede8`: bit-identical, every recorded curve, on the 2-core AMD EPYC that ran it",
    "9a0791587ffeaf7cf04cfc063b365924c3b308e24692edfba811df03eacb6920":
        "the code of 4ca398a, which ran the Fashion-MNIST cells of 2026-11-23's fifth sitting. Changed after it, no "
        "number of a one-seed run: stacked seeds are evaluated stacked (`evaluate_stacked`). Checked 2026-11-23 with "
        "`bnlib verify study --cell fashionmnist-b2-noniid-s2-8965eaad3b`: bit-identical, every recorded curve, on "
        "the 2-core AMD EPYC that ran it",
    "940f41d95dd2923cd019343f000f7242a8b317ae411dc265eec5f423e68db8e9":
        "the code of 67e6c06, which ran the last Fashion-MNIST cells (at aebd85a). Changed after it, no number of a "
        "one-seed run: a stacked model's large-batch evaluation passes go through each seed's own network "
        "(`StackedNet.seed_networks`). Checked 2026-11-23 with `bnlib verify study --cell "
        "fashionmnist-b16-noniid-s1-25f9a7fcfe`: bit-identical, every recorded curve, on the 2-core AMD EPYC that ran it",
}


def is_current(training_code_sha256: str | None) -> bool:
    """Whether a cell recorded with this training-code fingerprint counts as run by the current code
    (files written before the fingerprint existed do)."""
    return not training_code_sha256 or training_code_sha256 == TRAINING_SHA256 or training_code_sha256 in REPRODUCED_TRAINING_CODE


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: str = "cpu") -> dict:
    """Where and with what a run was made: versions, commit, host, hardware."""
    import torch

    versions = {}
    for pkg in ("bnlib", "torch", "torchvision", "numpy", "scipy", "pandas", "papermill", "scikit-learn", "mlxtend"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "git_commit": _git_commit(),
        "code_sha256": CODE_SHA256,
        "training_code_sha256": TRAINING_SHA256,  # the cell is stale when this differs from the current code's
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": device,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_run(path: str | Path, result: dict, cell_id: str, parameters: dict) -> dict:
    """The cell's metrics file: its parameters, provenance and the training records. Written last."""
    payload = {"cell": cell_id, "parameters": parameters, "provenance": provenance(result["device"]), **result}
    write_json_atomic(path, payload)
    return payload


RUN_KEYS = ("cell", "config", "steps", "methods", "provenance")  # what every metrics file holds


class CorruptRun(ValueError):
    """A metrics file that does not parse, lacks keys or names another cell; the message names the file."""


def read_run(path: str | Path) -> dict:
    """One cell's metrics file, checked: it parses, has :data:`RUN_KEYS` and names its own cell."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CorruptRun(f"{path}: not a readable metrics file ({err})") from None
    missing = [k for k in RUN_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise CorruptRun(f"{path}: metrics file without {', '.join(missing)}")
    if payload["cell"] != path.stem:
        raise CorruptRun(f"{path}: holds the metrics of cell {payload['cell']}, not {path.stem}")
    return payload


def load_runs(runs_dir: str | Path) -> list[dict]:
    """Every metrics file of a runs folder; a corrupt one raises :class:`CorruptRun` naming it (none is skipped)."""
    return [read_run(p) for p in sorted(Path(runs_dir).glob("*.json"))]


def budget_label(config: dict) -> str:
    if config.get("steps") is not None:
        return f"{config['steps']} steps"
    if config.get("samples") is not None:
        return f"{config['samples']} samples"
    return f"{config['epochs']:g} epochs"


def evaluations(runs: list[dict]) -> pd.DataFrame:
    """The tidy table: one row per cell x method x evaluation."""
    rows = []
    for run in runs:
        cfg = run["config"]
        base = {"cell": run["cell"], "seed": cfg["seed"], "budget": budget_label(cfg), "steps_total": run["steps"],
                "num_classes": run["num_classes"], "device": run["device"], "device_name": run["provenance"]["device_name"],
                **{k: cfg[k] for k in CONDITION_KEYS if k in cfg}}
        for method, rec in run["methods"].items():
            common = {**base, "method": method, "diverged": rec["diverged"], "diverged_step": rec["diverged_step"],
                      "train_seconds": rec["train_seconds"], "samples_per_second": rec["samples_per_second"]}
            n = len(rec["eval_step"])
            sizes = rec.get("eval_size") or [run.get("test_size")] * n  # test images per evaluation (a subset in training)
            for i, step in enumerate(rec["eval_step"]):
                rows.append({**common, "step": step, "samples_seen": step * cfg["batch_size"], "eval_size": sizes[i],
                             "test_acc": rec["test_acc"][i], "test_loss": rec["test_loss"][i],
                             "test_acc_recomputed": rec["test_acc_recomputed"][i],
                             "test_loss_recomputed": rec["test_loss_recomputed"][i],
                             # batch statistics at test time (absent from metrics files written before it existed)
                             "test_acc_batchstats": (rec.get("test_acc_batchstats") or [None] * n)[i],
                             "final": i == n - 1 and not rec["diverged"]})
            if rec["diverged"] or n == 0:  # a row that says the run ended without a final evaluation
                rows.append({**common, "step": rec["diverged_step"], "samples_seen": None, "eval_size": None, "test_acc": None, "test_loss": None,
                             "test_acc_recomputed": None, "test_loss_recomputed": None, "test_acc_batchstats": None,
                             "final": True})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["classes_per_batch"] = frame["classes_per_batch"].astype("Int64")
    return frame


def training_losses(runs: list[dict]) -> pd.DataFrame:
    """One row per cell x method x logged training-loss window."""
    rows = []
    for run in runs:
        cfg = run["config"]
        base = {"cell": run["cell"], "seed": cfg["seed"], "budget": budget_label(cfg), **{k: cfg[k] for k in CONDITION_KEYS if k in cfg}}
        for method, rec in run["methods"].items():
            for step, loss in zip(rec["train_step"], rec["train_loss"]):
                rows.append({**base, "method": method, "step": step, "samples_seen": step * cfg["batch_size"], "train_loss": loss})
    return pd.DataFrame(rows)


def final_scores(table: pd.DataFrame, column: str = "test_acc") -> pd.DataFrame:
    """One row per cell x method with its final score; a diverged run scores chance (1 / classes)."""
    final = table[table["final"]].copy()
    chance = 1.0 / final["num_classes"]
    final["score"] = final[column].where(~final["diverged"], chance).astype(float)
    return final


def summarise(table: pd.DataFrame, column: str = "test_acc") -> pd.DataFrame:
    """Per condition x method: mean final score over seeds with a t interval, and the paired difference
    against BN (same condition, same seed: identical batches and initial weights) with its t interval, a
    paired t-test and a verdict after Holm's correction across every comparison of the table."""
    final = final_scores(table, column)
    final = final[final["score"].notna()]
    keys = [k for k in CONDITION_KEYS if k in final]
    rows = []
    for cond, group in final.groupby(keys, dropna=False, sort=True):
        cond = dict(zip(keys, cond if isinstance(cond, tuple) else (cond,)))
        ref = group[group["method"] == REFERENCE].set_index("seed")["score"]
        for method, g in group.groupby("method", sort=False):
            scores = g.set_index("seed")["score"]
            low, high = stats.t_interval(scores.values)
            row = {**cond, "method": method, "n_seeds": len(scores), "diverged": int(g["diverged"].sum()),
                   "mean": scores.mean(), "std": scores.std(ddof=1) if len(scores) > 1 else float("nan"),
                   "ci_low": low, "ci_high": high}
            common = scores.index.intersection(ref.index)
            if method != REFERENCE and len(common):
                diff = scores[common] - ref[common]
                d_low, d_high = stats.t_interval(diff.values)
                row.update({"diff_vs_bn": diff.mean(), "diff_ci_low": d_low, "diff_ci_high": d_high, "n_pairs": len(common),
                            "wins": int((diff > 0).sum()), "p_value": stats.paired_test(diff.values)})
            rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out = stats.add_verdicts(out)
    from .norms import METHODS

    out["method"] = pd.Categorical(out["method"], categories=[m for m in METHODS if m in set(out["method"])], ordered=True)
    return out.sort_values(keys + ["method"]).reset_index(drop=True)


def aggregate(grid_dir: str | Path, cells: set[str] | None = None) -> dict[str, Path]:
    """Read every finished cell of ``results/<grid>/`` and write the tables the book reads. With ``cells``
    (the grid file's cell ids), metrics files of other cells - left from an earlier version of the grid file -
    are left out and named, so changed settings never mix into one condition."""
    grid_dir = Path(grid_dir)
    runs = load_runs(grid_dir / "runs")
    if cells is not None:
        others = sorted(r["cell"] for r in runs if r["cell"] not in cells)
        if others:
            print(f"aggregate: left out {len(others)} finished cells that {grid_dir.name}'s grid file no longer has "
                  f"(settings changed since they ran): {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}")
        runs = [r for r in runs if r["cell"] in cells]
    if not runs:
        raise FileNotFoundError(f"no finished cells in {grid_dir / 'runs'}: run the grid first (bnlib run ...)")
    written = {}
    table = evaluations(runs)
    tables = {"evaluations": table, "training_loss": training_losses(runs), "summary": summarise(table)}
    if table["test_acc_recomputed"].notna().any():
        tables["summary_recomputed"] = summarise(table[table["test_acc_recomputed"].notna() | table["diverged"]], "test_acc_recomputed")
    if table["test_acc_batchstats"].notna().any():
        tables["summary_batchstats"] = summarise(table[table["test_acc_batchstats"].notna() | table["diverged"]], "test_acc_batchstats")
    for name, frame in tables.items():
        path = grid_dir / f"{name}.csv"
        tmp = path.with_suffix(".csv.tmp")
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
        written[name] = path
    return written
