"""The run record: what training returns and what every metrics file (``results/<grid>/runs/<cell>.json``) holds.

One schema, used by every writer (the training loop, the cell notebook, the runner's twins) and every reader
(tables, plots, verify, the book, the runner's states). The JSON keys are the field names below, in this order,
so files written before this module existed read unchanged. Fields added after the first files were written
are :data:`ABSENT` when a file lacks them and are left out again when such a record is written back, so a
record read and rewritten is the same file: :func:`read_run` is the one place that reads older files.

A metrics file is written last, by :func:`atomic_write`: its existence means the cell is done.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class _Absent:
    """A field an older metrics file does not have (falsy, so ``rec.x or default`` reads it)."""

    _instance = None

    def __new__(cls):
        cls._instance = cls._instance or super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "ABSENT"

    def __reduce__(self):  # pickled into checkpoints: comes back as the same singleton
        return (_Absent, ())


ABSENT: Any = _Absent()


def atomic_write(path: str | Path, write: Callable[[Path], None] | str | bytes, durable: bool = True) -> Path:
    """Write ``path`` through a temporary file beside it, then rename: a reader (or a runner deciding
    whether a cell is done) never sees half a file, and a kill mid-write leaves the old file. ``write`` is
    the text, the bytes, or a function that writes a given path (``torch.save``, ``nbformat.write``).
    ``durable``: flush to the disk before the rename, so a power cut cannot leave an empty file under the
    final name (a checkpoint, rewritten every few minutes and checked when read, skips it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        if isinstance(write, str):
            tmp.write_text(write)
        elif isinstance(write, bytes):
            tmp.write_bytes(write)
        else:
            write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, payload: dict) -> Path:
    """JSON (NaN allowed: a diverged loss is a result) written with :func:`atomic_write`: one key per line, a
    list of plain values on one line (a curve or a trace costs its numbers, not a line and an indent each)."""
    return atomic_write(path, _dumps(payload, ""))


def _dumps(obj, indent: str) -> str:
    nested = isinstance(obj, (dict, list, tuple)) and any(
        isinstance(v, (dict, list, tuple)) for v in (obj.values() if isinstance(obj, dict) else obj)
    )
    if isinstance(obj, dict) and obj and (nested or len(obj) > 1):
        inner = indent + " "
        items = (f"{inner}{json.dumps(str(k))}: {_dumps(v, inner)}" for k, v in obj.items())
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if nested:
        inner = indent + " "
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj, allow_nan=True)


def _present(obj) -> dict:
    """A record dataclass as a dict in field order, without the fields an older file did not have."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if getattr(obj, f.name) is not ABSENT}


def _from(cls, values: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CorruptRun(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**values)


@dataclass
class Final:
    """A method's final numbers: the last evaluation (None when the run diverged)."""

    test_acc: float | None = None  # accuracy on the full test set with the model's inference statistics
    test_loss: float | None = None  # mean cross-entropy there
    test_acc_recomputed: float | None = None  # after recomputing population statistics (config.recompute)
    # with batch statistics at test time (config.eval_batch_stats; batches composed by config.eval_batch_composition)
    test_acc_batchstats: float | None = ABSENT
    train_loss: float | None = None  # the last training-loss window's mean


@dataclass
class MethodRecord:
    """One method's curves in one run (one seed). Evaluation lists are aligned with ``eval_step``; a
    metric that was not computed is None at that position."""

    train_step: list[int] = field(default_factory=list)  # the last step of each training-loss window
    train_loss: list[float] = field(default_factory=list)  # the mean training loss over that window
    eval_step: list[int] = field(default_factory=list)  # steps with a test evaluation (the last: the last step)
    # per evaluation, the split it scored where the dataset has a validation split ("validation": the curve and the
    # whole split at the last step; "test": once, last); ABSENT: every evaluation on the test set
    eval_split: list[str] = ABSENT
    eval_size: list[int] = field(
        default_factory=list
    )  # test images of that evaluation (a fixed subset before the last)
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc_recomputed: list[float | None] = field(default_factory=list)
    test_loss_recomputed: list[float | None] = field(default_factory=list)
    test_acc_batchstats: list[float | None] = field(default_factory=list)  # ABSENT in files before batch statistics
    test_loss_batchstats: list[float | None] = field(default_factory=list)
    diverged: bool = False  # a non-finite loss stopped this method; what it recorded before stays
    diverged_step: int | None = None
    train_seconds: float | None = None  # training time of this method (a stacked model's shared out per seed)
    samples_per_second: float | None = None
    final: Final = field(default_factory=Final)
    # config.trace_every: {"step": [...], "layers": [{metric: [...]}, ...]}, per norm layer in network order, one
    # value per traced step; the metrics and their meaning: bnlib.train.traces (ABSENT when not traced)
    traces: dict = ABSENT

    def append_evaluation(
        self, step: int, size: int, plain: tuple, recomputed: tuple, batch_stats: tuple, split: str | None = None
    ) -> None:
        """One evaluation's (accuracy, loss) pairs: plain, after recomputing statistics, with batch statistics;
        ``split``: the split it scored (None: the test set of a dataset without a validation split)."""
        if split is not None:
            self.eval_split = [*(self.eval_split or []), split]
        self.eval_step.append(step)
        self.eval_size.append(size)
        self.test_acc.append(plain[0])
        self.test_loss.append(plain[1])
        self.test_acc_recomputed.append(recomputed[0])
        self.test_loss_recomputed.append(recomputed[1])
        self.test_acc_batchstats.append(batch_stats[0])
        self.test_loss_batchstats.append(batch_stats[1])

    def mark_diverged(self, step: int) -> None:
        self.diverged, self.diverged_step = True, step

    def to_dict(self) -> dict:
        return {**_present(self), "final": _present(self.final)}

    @classmethod
    def from_dict(cls, values: dict, where: str = "method record") -> "MethodRecord":
        values = dict(values)
        for key in ("test_acc_batchstats", "test_loss_batchstats"):  # files before batch statistics at test time
            values.setdefault(key, ABSENT)
        values.setdefault(
            "eval_size", ABSENT
        )  # files before test subsets in training: every evaluation on the full set
        values.setdefault("traces", ABSENT)
        values.setdefault("eval_split", ABSENT)  # files before validation splits: every evaluation on the test set
        values["final"] = _from(Final, values.get("final") or {}, f"{where}: final")
        return _from(cls, values, where)


@dataclass
class Provenance:
    """Where and with what a run was made (:func:`bnlib.provenance.provenance` fills it in)."""

    versions: dict = field(default_factory=dict)  # package -> version
    python: str | None = None
    git_commit: str | None = None  # HEAD of the repository, "-dirty" with uncommitted changes
    code_sha256: str | None = None  # every bnlib module and the cell notebook
    training_code_sha256: str | None = ABSENT  # the code that decides the numbers (ABSENT: files before it existed)
    host: str | None = None
    platform: str | None = None
    device: str | None = None
    device_name: str | None = None
    cpu_count: int | None = None
    torch_threads: int | None = None
    slurm_job_id: str | None = None
    slurm_array_job_id: str | None = None
    slurm_array_task_id: str | None = None
    finished_at: str | None = None
    numerics: dict = (
        ABSENT  # what decides the bits: kernels, threads, versions (bnlib.machine.numerics; ABSENT: older files)
    )

    def to_dict(self) -> dict:
        return _present(self)


@dataclass
class RunRecord:
    """One cell's run (one seed): the metrics file. ``cell``, ``parameters`` and ``provenance`` are set when it
    is written (:func:`write_run`); :func:`bnlib.train.train` returns the rest."""

    config: dict  # every training setting of the run (bnlib.train.Config as a dict), defaults included
    device: str  # the torch device it trained on
    steps: int  # optimiser steps of the run
    samples_per_step: int
    train_size: int
    test_size: int
    num_classes: int
    wall_seconds: float  # the whole training call, evaluations included
    eval_seconds: float  # of which evaluations
    methods: dict[str, MethodRecord]  # method id -> its record, in the order trained
    cell: str | None = None  # the grid cell's id (the metrics file's name)
    parameters: dict | None = None  # the cell's grid parameters as given
    provenance: Provenance | None = None
    stacked_seeds: list[int] = ABSENT  # trained as one stacked model with these seeds (grid stack_seeds)
    resumed_at_steps: list[int] = ABSENT  # steps at which the run resumed from its checkpoint
    stacked_in: str = ABSENT  # the cell whose notebook trained it (stacked seeds)
    same_training_as: str = ABSENT  # a twin: the cell that trained exactly this, whose results these are
    stopped_at_step: int = (
        ABSENT  # a prefix re-execution (`bnlib verify --steps`) that stopped here: never a finished cell
    )
    compiled: bool = ABSENT  # config.compile not off: whether the training step ran compiled (bnlib.train.compiling)
    compile_reason: str = ABSENT  # ... and why (e.g. "compile: on, but no C++ compiler for inductor ...: eager")

    # the keys every metrics file has, in the order of the files: cell, parameters, provenance, then the run
    _LEADING = ("cell", "parameters", "provenance")

    def to_dict(self) -> dict:
        body = _present(self)
        body["methods"] = {m: rec.to_dict() for m, rec in self.methods.items()}
        if self.provenance is not None:
            body["provenance"] = self.provenance.to_dict()
        lead = {k: body.pop(k) for k in self._LEADING}
        return {**{k: v for k, v in lead.items() if v is not None}, **body}

    @classmethod
    def from_dict(cls, values: dict, where: str = "run record") -> "RunRecord":
        values = dict(values)
        values["methods"] = {
            m: MethodRecord.from_dict(r, f"{where}: methods.{m}") for m, r in (values.get("methods") or {}).items()
        }
        if values.get("provenance") is not None:
            values["provenance"] = _from(Provenance, values["provenance"], f"{where}: provenance")
        return _from(cls, values, where)


class CorruptRun(ValueError):
    """A metrics file that does not parse, lacks keys or names another cell; the message names the file."""


REQUIRED = ("cell", "config", "steps", "methods", "provenance")  # what every metrics file holds


def write_run(path: str | Path, run: RunRecord, cell_id: str, parameters: dict, provenance: Provenance) -> RunRecord:
    """The cell's metrics file: ``run`` with its cell id, grid parameters and provenance. Written last, atomically."""
    run = dataclasses.replace(run, cell=cell_id, parameters=parameters, provenance=provenance)
    write_json(path, run.to_dict())
    return run


def read_run(path: str | Path) -> RunRecord:
    """One cell's metrics file, checked: it parses, has the :data:`REQUIRED` keys, fits the schema and names
    its own cell."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CorruptRun(f"{path}: not a readable metrics file ({err})") from None
    missing = [k for k in REQUIRED if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise CorruptRun(f"{path}: metrics file without {', '.join(missing)}")
    if payload["cell"] != path.stem:
        raise CorruptRun(f"{path}: holds the metrics of cell {payload['cell']}, not {path.stem}")
    try:
        return RunRecord.from_dict(payload, str(path))
    except TypeError as err:  # a required field missing
        raise CorruptRun(f"{path}: not a run record ({err})") from None


def load_runs(runs_dir: str | Path) -> list[RunRecord]:
    """Every metrics file of a runs folder; a corrupt one raises :class:`CorruptRun` naming it (none is skipped)."""
    return [read_run(p) for p in sorted(Path(runs_dir).glob("*.json"))]
