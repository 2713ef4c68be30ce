"""The configuration of a run and the seeded lockstep training loop: every method on identical batches from
identical initial weights.

One model per method, one optimiser per model (the original study summed the losses under one Adam;
with disjoint parameters that is the same update, and separate optimisers let a diverged method drop
out). Each step draws one batch -- a function of the seed only -- and trains every live method on it.
Evaluation is :mod:`bnlib.evaluate`, checkpoints :mod:`bnlib.checkpoint`, the result a
:class:`bnlib.record.RunRecord`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint as checkpoint_mod
from . import compiling
from . import data as data_mod
from . import evaluate as evaluate_mod
from . import models, norms
from . import stacked as stacked_mod
from . import traces as traces_mod
from .evaluate import autocast
from .record import ABSENT, Final, MethodRecord, RunRecord

ORIGINAL_METHODS = ("bn", "bnrs", "brn", "brnc", "bnwos")
OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "step")
LR_DROP_FACTOR = 0.1  # lr_schedule step: the learning rate's factor after the drop
RECOMPUTE_EVALS = ("all", "last")
EVAL_BATCH_COMPOSITIONS = ("iid", "training")
# Config keys that say where a cell runs, finds its data or saves its checkpoints, not what it computes:
# left out of cell ids and checkpoint keys.
LOCAL_KEYS = ("device", "data_dir", "download", "checkpoint_minutes")
EVAL_SUBSET_SEED = 1234  # the fixed test subset of in-training evaluations; never changes with the run's seed


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any training starts."""


@dataclass
class Config:
    """Everything a run computes from, one field per knob with its comment (the cell notebook's parameters cell
    is generated from these lines: :func:`bnlib.runner.parameters_cell`)."""

    dataset: str = "digits"  # digits | mnist5k (embedded) | mnist | fashionmnist | cifar10 | cifar100
    methods: list[str] = field(default_factory=lambda: list(ORIGINAL_METHODS))  # trained in lockstep
    batch_size: int = 16  # samples per training batch
    sampler: str = "iid"  # iid | noniid
    classes_per_batch: int | None = None  # noniid: classes in every batch (must divide batch_size)
    norm_placement: str = "all"  # all | first | none
    norm_position: str = "pre"  # pre (norm before the activation, the original) | post (after it, as BLN's authors)
    width: int = 32  # channels of every conv
    depth: int = 4  # conv layers, dilation 1, 2, 4, ...
    steps: int | None = None  # budget in optimiser steps (equal steps: small batches see fewer samples) ...
    epochs: float | None = None  # ... or in epochs (equal samples seen at every batch size) ...
    samples: int | None = None  # ... or in training samples (equal samples, the same number on every dataset); exactly one
    optimizer: str = "adam"  # adam | adamw | sgd (momentum 0.9)
    lr: float = 1e-3  # learning rate
    lr_schedule: str = "constant"  # constant | step (the learning rate x0.1 once lr_drop_at of the steps are done)
    lr_drop_at: float = 2 / 3  # lr_schedule step: the fraction of the steps after which the learning rate drops
    eval_every: int | None = None  # steps between test evaluations (default: `evals` over the run)
    evals: int = 10  # evaluations over the run when eval_every is not given (the last at the last step)
    eval_samples: int | None = 2000  # test samples of every evaluation before the last (a fixed subset; None: all); the last uses all
    log_every: int | None = None  # steps per training-loss record, the mean over the window (default: 100 over the run)
    recompute: bool = False  # also evaluate after recomputing population statistics (precise BN)
    recompute_samples: int = 2048  # training samples used for that, in batches of batch_size
    recompute_evals: str = "all"  # all | last: which evaluations also recompute (last: the final one only, a long run's saving)
    eval_batch_stats: bool = False  # also evaluate with batch statistics at test time (test batches of batch_size)
    # training: one pass of the training's sampler over the test labels (a diagnostic: the labels form the batches)
    eval_batch_composition: str = "iid"  # those test batches: iid (the test set in order) | training (as the training's)
    aux_weight: float = 1.0  # weight of Batchless Norm's auxiliary likelihood loss
    init_samples: int = 1000  # training images for Batchless Norm's data-dependent start (its authors'); 0: mean 0, std 1
    norm_options: dict = field(default_factory=dict)  # per method, e.g. {"brnc": {"warmup_steps": 500}}
    seed: int = 0  # data order and initial weights
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    checkpoint_minutes: float = 10  # minutes between checkpoints of a cell that has a checkpoint file (0: every step)
    precision: str = "fp32"  # fp32 | bf16 (autocast for convs and linear layers; norm statistics stay in fp32)
    compile: str = "off"  # off | auto | on: the training step through torch.compile (bnlib.compiling; auto: long runs only)
    trace_every: int | None = None  # steps between traces of every norm layer (bnlib.traces, in the run record); None: off
    data_dir: str | None = None  # torchvision datasets (default $BNLIB_DATA or data/)
    download: bool = True  # fetch missing torchvision datasets

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "Config":
        """A Config from plain values (a grid file), each checked against its field's type: a number
        YAML read as a string ("1e-3") becomes the float it means, anything else of the wrong type is an
        error naming the key, the value and the expected type."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _typed(k, v, hints[k], source) for k, v in values.items()})


def _typed(key: str, value, hint, source: str):
    """``value`` as the type ``hint`` asks for (see :meth:`Config.from_dict`)."""
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    base = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) is not list else hint
    origin = typing.get_origin(base) or base

    def bad(expected: str):
        return ConfigError(f"{source}: {key}={value!r} must be {expected}" + (" or null" if type(None) in args else ""))

    if origin is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return value  # an int stays an int: cell ids of existing grids do not change
    check = _TYPE_CHECKS.get(origin)
    if check is not None and not check[1](value):
        raise bad(check[0])
    return value


# Per field type: the words for the error, and the test a grid value must pass (floats are handled above).
_TYPE_CHECKS = {
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    list: ("a list of names", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    dict: ("a mapping", lambda v: isinstance(v, dict)),
}


def validate(config: Config, num_train: int | None = None, num_classes: int | None = None) -> None:
    """Reject a configuration that cannot work, naming the key, before anything is trained."""

    def fail(key: str, message: str):
        raise ConfigError(f"{key}={getattr(config, key)!r}: {message}")

    if config.dataset not in data_mod.DATASETS:
        fail("dataset", f"unknown dataset; choose one of {', '.join(data_mod.DATASETS)}")
    if not config.methods:
        fail("methods", "give at least one method")
    for m in config.methods:
        if m not in norms.METHODS:
            fail("methods", f"unknown method {m!r}; choose from {', '.join(norms.METHODS)}")
    if len(set(config.methods)) != len(config.methods):
        fail("methods", "a method is listed twice")
    for m, opts in config.norm_options.items():
        if m not in norms.METHODS:
            fail("norm_options", f"unknown method {m!r}")
        try:
            norms.make(m, 4, **opts)
        except (TypeError, ValueError) as err:
            fail("norm_options", str(err))
    if config.sampler not in data_mod.SAMPLERS:
        fail("sampler", f"unknown sampler; choose one of {', '.join(data_mod.SAMPLERS)}")
    if config.norm_placement not in models.PLACEMENTS:
        fail("norm_placement", f"choose one of {', '.join(models.PLACEMENTS)}")
    if config.norm_position not in models.POSITIONS:
        fail("norm_position", f"choose one of {', '.join(models.POSITIONS)}")
    if not isinstance(config.init_samples, int) or config.init_samples < 0:
        fail("init_samples", "must be a non-negative integer")
    if config.optimizer not in OPTIMIZERS:
        fail("optimizer", f"choose one of {', '.join(OPTIMIZERS)}")
    if not config.lr > 0:
        fail("lr", "the learning rate must be positive")
    if config.lr_schedule not in LR_SCHEDULES:
        fail("lr_schedule", f"choose one of {', '.join(LR_SCHEDULES)}")
    if not 0 < config.lr_drop_at < 1:
        fail("lr_drop_at", "must be a fraction of the steps between 0 and 1")
    budgets = {k: getattr(config, k) for k in ("steps", "epochs", "samples")}
    if sum(v is not None for v in budgets.values()) != 1:
        raise ConfigError(", ".join(f"{k}={v!r}" for k, v in budgets.items()) + ": give exactly one budget")
    if config.steps is not None and (not isinstance(config.steps, int) or config.steps < 1):
        fail("steps", "must be a positive integer")
    if config.epochs is not None and not config.epochs > 0:
        fail("epochs", "must be positive")
    if config.samples is not None and (not isinstance(config.samples, int) or config.samples < config.batch_size):
        fail("samples", f"must be an integer of at least batch_size={config.batch_size}")
    if config.precision not in PRECISIONS:
        fail("precision", f"choose one of {', '.join(PRECISIONS)}")
    if config.compile not in compiling.MODES:
        fail("compile", f"choose one of {', '.join(compiling.MODES)}")
    if config.recompute_evals not in RECOMPUTE_EVALS:
        fail("recompute_evals", f"choose one of {', '.join(RECOMPUTE_EVALS)}")
    if config.eval_batch_composition not in EVAL_BATCH_COMPOSITIONS:
        fail("eval_batch_composition", f"choose one of {', '.join(EVAL_BATCH_COMPOSITIONS)}")
    if config.eval_batch_composition != "iid" and not config.eval_batch_stats:
        fail("eval_batch_composition", "composes the test batches of eval_batch_stats: set eval_batch_stats: true")
    for key in ("eval_every", "log_every", "eval_samples", "evals", "trace_every"):
        value = getattr(config, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            fail(key, "must be a positive integer")
    if not config.checkpoint_minutes >= 0:
        fail("checkpoint_minutes", "must be 0 (every step) or more")
    if config.width < 1 or config.depth < 1:
        fail("width" if config.width < 1 else "depth", "must be positive")
    if config.batch_size < 1:
        fail("batch_size", "must be positive")
    if config.norm_placement != "none":  # without norm layers every method trains at any batch size
        for m in config.methods:
            need, why = norms.REGISTRY[m].min_batch(config.norm_options.get(m, {}))
            if config.batch_size < need:
                fail("batch_size", f"{m} {why}: use a batch of at least {need}")
    if config.sampler == "noniid":
        if config.classes_per_batch is None or config.classes_per_batch < 1:
            fail("classes_per_batch", "sampler 'noniid' needs a positive classes_per_batch")
        if config.batch_size % config.classes_per_batch:
            fail("classes_per_batch", f"must divide batch_size={config.batch_size}")
        if num_classes is not None and config.classes_per_batch > num_classes:
            fail("classes_per_batch", f"{config.dataset} has only {num_classes} classes")
    if num_train is not None and config.batch_size > num_train:
        fail("batch_size", f"{config.dataset} has only {num_train} training samples")
    if config.device != "auto" and config.device.startswith("cuda") and not torch.cuda.is_available():
        fail("device", "CUDA is not available on this machine; use device: auto or cpu")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def total_steps(config: Config, num_train: int) -> int:
    if config.steps is not None:
        return config.steps
    if config.samples is not None:
        return config.samples // config.batch_size
    return max(1, round(config.epochs * num_train / config.batch_size))


def learning_rate(config: Config, step: int, steps: int) -> float:
    """The learning rate of (1-based) ``step`` of a run of ``steps``: constant, or with ``lr_schedule: step``
    multiplied by LR_DROP_FACTOR once ``lr_drop_at`` of the steps are done (every method alike)."""
    if config.lr_schedule == "step" and step > round(config.lr_drop_at * steps):
        return config.lr * LR_DROP_FACTOR
    return config.lr


def _optimizer(config: Config, params) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters; at batch 2 the optimiser step is a third of the step time
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, fused=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, fused=True)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9)


class _StepClock:
    """Training time of one method. On a CPU the wall clock around each step; on a GPU a pair of CUDA events
    per step, read once per log window (where the loss is read anyway), so no step waits for the device."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds, self._pending, self._t0 = 0.0, [], None

    def start(self) -> None:
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._t0, end))
        else:
            self.seconds += time.perf_counter() - self._t0

    def read(self) -> float:
        """Seconds so far (on a GPU this waits for the window's last step)."""
        if self._pending:
            self._pending[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self._pending) / 1000
            self._pending.clear()
        return self.seconds


@dataclass
class _Plan:
    """The schedule of a run: its length, when it logs the training loss and when it evaluates."""

    steps: int
    log_every: int
    eval_steps: set[int]

    @classmethod
    def of(cls, config: Config, num_train: int) -> "_Plan":
        steps = total_steps(config, num_train)
        eval_every = config.eval_every or math.ceil(steps / config.evals)  # exactly `evals`, the last at the last step
        return cls(steps, config.log_every or max(1, steps // 100),
                   set(range(eval_every, steps + 1, eval_every)) | {steps})


class MethodRun:
    """One method in the lockstep run: its model (one seed's network, or every seed stacked), optimiser, clock,
    the open training-loss window, its norm layers' traces (``trace_every``) and one
    :class:`~bnlib.record.MethodRecord` per seed."""

    def __init__(self, model: torch.nn.Module, config: Config, seeds: list[int], device: torch.device,
                 compiled: bool = False, method: str = "bn"):
        self.model, self.config, self.stacked, self.method = model, config, len(seeds) > 1, method
        # the training forward (compiled or the model itself); evaluation and checkpoints use the model
        # (a method whose forward pass calls autograd, Cross-Iteration BN, stays eager: Method.compiles)
        self.forward = compiling.compiled(model) if compiled and norms.spec(method).compiles else model
        self.tracer = traces_mod.Tracer(model, method, len(seeds)) if config.trace_every else None
        self.opt = _optimizer(config, model.parameters())
        self.clock = _StepClock(device)
        self.steps, self.window = 0, 0  # steps trained; steps in the open loss window
        self.loss_sum = torch.zeros(len(seeds) if self.stacked else (), device=device)
        self.recs = [MethodRecord() for _ in seeds]

    @property
    def live(self) -> bool:
        """Not every seed diverged (a diverged seed of a stacked model trains on: NaN stays in its own channels)."""
        return not all(rec.diverged for rec in self.recs)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, device: torch.device, trace_step: int | None = None) -> None:
        """One optimiser step on the batch (per seed, the mean loss over its batch; the seeds' losses summed keep
        their gradients apart). ``trace_step``: trace the norm layers in this step (eagerly: hooks would make a
        compiled graph recompile), recorded as that step."""
        config = self.config
        self.clock.start()
        tracing = trace_step is not None and self.tracer is not None
        forward = self.model if tracing else self.forward
        with autocast(device, config.precision), (self.tracer.capture() if tracing else contextlib.nullcontext()):
            if self.stacked:
                loss = F.cross_entropy(forward(x).float().permute(0, 2, 1), y, reduction="none").mean(0)
                total = loss.sum() + config.aux_weight * stacked_mod.auxiliary_loss(self.model)
            else:
                loss = F.cross_entropy(forward(x).float(), y)
                total = loss + config.aux_weight * norms.auxiliary_loss(self.model)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        if tracing:
            self.tracer.record(trace_step, [not rec.diverged for rec in self.recs])
        self.loss_sum += loss.detach()
        self.clock.stop()
        self.steps += 1
        self.window += 1

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            if group["lr"] != lr:
                group["lr"] = lr

    def close_window(self, step: int) -> None:
        """Record the window's mean training loss per seed; a non-finite one marks the seed diverged."""
        if self.window == 0:
            return
        self.clock.read()
        for rec, loss_sum in zip(self.recs, self.loss_sum.reshape(-1).tolist()):
            mean_loss = loss_sum / self.window
            if rec.diverged:
                continue
            if not math.isfinite(mean_loss):  # diverged: stop this method, keep what it recorded
                rec.mark_diverged(step)
                continue
            rec.train_step.append(step)
            rec.train_loss.append(mean_loss)
        self.loss_sum.zero_()
        self.window = 0

    def evaluate(self, step: int, x: torch.Tensor, y: torch.Tensor, recompute_batches, last: bool,
                 batch_xy: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """One evaluation of every seed, appended to its record (or its divergence recorded); ``last``: the run's
        final one; ``batch_xy``: the test set in the order whose consecutive batches the evaluation with batch
        statistics takes (default ``x, y``)."""
        config = self.config
        xb, yb = batch_xy if batch_xy is not None else (x, y)
        running = norms.keeps_running_statistics(self.model)
        recompute = config.recompute and running and (config.recompute_evals == "all" or last)
        batch_stats = config.eval_batch_stats and running
        if self.stacked:  # one pass for every seed; a diverged seed is evaluated along and its record left alone
            nothing = [(None, None)] * len(self.recs)
            plain = evaluate_mod.evaluate_stacked(self.model, x, y, config.precision)
            recomputed = (evaluate_mod.evaluate_stacked(self.model, x, y, config.precision, recompute_batches=recompute_batches)
                          if recompute else nothing)
            batch = (evaluate_mod.evaluate_stacked(self.model, xb, yb, config.precision, batch_stats_size=config.batch_size)
                     if batch_stats else nothing)
            for rec, p, r, b in zip(self.recs, plain, recomputed, batch):
                if rec.diverged:
                    continue
                if not math.isfinite(p[1]):
                    rec.mark_diverged(step)
                    continue
                rec.append_evaluation(step, len(y), p, r, b)
            return
        rec = self.recs[0]
        if rec.diverged:
            return
        # compiled, the inference passes run through the compiled forward too (statistics are recomputed eagerly)
        plain = self._checked(step, "evaluation", lambda forward: evaluate_mod.evaluate(forward, x, y, config.precision))
        if not math.isfinite(plain[1]):
            rec.mark_diverged(step)
            return
        recomputed = (self._checked(step, "evaluation with recomputed statistics", lambda forward: evaluate_mod.evaluate_recomputed(
                          self.model, recompute_batches, x, y, config.precision, forward)) if recompute else (None, None))
        batch = (evaluate_mod.evaluate_batch_statistics(self.model, xb, yb, config.batch_size, config.precision)
                 if batch_stats else (None, None))
        rec.append_evaluation(step, len(y), plain, recomputed, batch)

    def _checked(self, step: int, what: str, score) -> tuple[float, float]:
        """``score(forward)`` through the training forward. A compiled one that is not finite is re-done eagerly: a
        divergence shows in both (returned: the caller records it), while a finite eager score means the compiled
        code is wrong, which must never be recorded as a result (:class:`bnlib.compiling.CompiledEvaluationError`)."""
        result = score(self.forward)
        if math.isfinite(result[1]) or self.forward is self.model:
            return result
        eager = score(self.model)
        if not math.isfinite(eager[1]):
            return eager
        weights = all(bool(torch.isfinite(t).all()) for t in [*self.model.parameters(), *self.model.buffers()]
                      if t.is_floating_point())
        window = bool(torch.isfinite(self.loss_sum).all())
        raise compiling.CompiledEvaluationError(
            f"{self.method}: the compiled {what} at step {step} gave a test loss of {result[1]}, the same network "
            f"evaluated eagerly {eager[1]:.6g} (weights {'finite' if weights else 'NOT finite'}, open training-loss "
            f"window {'finite' if window else 'NOT finite'}): the compiled code is wrong, not the training. Nothing was "
            f"recorded. Delete the compile cache {compiling.cache_folder()} and run again, or run with compile: off")

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "loss_sum": self.loss_sum,
                "seconds": self.clock.read(), "steps": self.steps, "window": self.window,
                "recs": [rec.to_dict() for rec in self.recs],
                **({"traces": self.tracer.traces} if self.tracer is not None else {})}

    def load_state_dict(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["opt"])
        self.loss_sum.copy_(saved["loss_sum"])
        self.clock.seconds, self.steps, self.window = saved["seconds"], saved["steps"], saved["window"]
        self.recs = [MethodRecord.from_dict(r) for r in saved["recs"]]
        if self.tracer is not None:
            self.tracer.traces = saved["traces"]

    def finish(self, seeds: int, batch_size: int) -> list[MethodRecord]:
        """Every seed's record with its timings and final numbers (the last evaluation; None when it diverged)."""
        for k, rec in enumerate(self.recs):
            if self.tracer is not None:
                rec.traces = self.tracer.traces[k]
            rec.train_seconds = seconds = self.clock.read() / seeds
            rec.samples_per_second = self.steps * batch_size / seconds if seconds else None
            last = lambda values: values[-1] if values and not rec.diverged else None  # noqa: E731
            rec.final = Final(test_acc=last(rec.test_acc), test_loss=last(rec.test_loss),
                              test_acc_recomputed=last(rec.test_acc_recomputed),
                              test_acc_batchstats=last(rec.test_acc_batchstats), train_loss=last(rec.train_loss))
        return self.recs


def train(config: Config, dataset: data_mod.Dataset | None = None, progress: bool = True,
          checkpoint: str | Path | None = None, stop_after: int | None = None) -> RunRecord:
    """Train ``config.methods`` in lockstep; returns the run's record (:class:`bnlib.record.RunRecord`).

    With ``checkpoint`` (a file path), the state of the run -- models, optimisers, norm buffers, the
    random state, the step reached and the records so far -- is saved there every
    ``config.checkpoint_minutes``, and a run that finds a checkpoint of its own configuration resumes from it:
    the batch stream is a function of the seed, replayed to the step, so the result is the same as without
    the interruption (`tests/test_train.py` checks it bit for bit).

    ``stop_after``: train only the first K steps of the run as planned (same schedule, evaluations and loss
    windows; nothing after step K), for a cheap re-execution of a long cell (``bnlib verify --steps``); the
    record says ``stopped_at_step``.
    """
    return train_seeds(config, [config.seed], dataset, progress, checkpoint, stop_after)[0]


def _fixed_batches(ds: data_mod.Dataset, config: Config, seed: int, device: torch.device) -> tuple[list, list]:
    """A fixed slice of training data, a function of the seed: BLN's initialisation uses its first
    init_samples (in evaluation batches), precise statistics its first recompute_samples (at the training batch size)."""
    eval_batch = evaluate_mod.eval_batch(device)
    order = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(seed))
    init_idx = order[: config.init_samples].to(device)
    init = [ds.x_train[init_idx[i: i + eval_batch]] for i in range(0, len(init_idx), eval_batch)]
    recompute_idx = order[: max(config.batch_size, min(config.recompute_samples, len(order)))]
    recompute = [ds.x_train[recompute_idx[i: i + config.batch_size].to(device)]
                 for i in range(0, len(recompute_idx) - config.batch_size + 1, config.batch_size)]
    return init, recompute


def _build(method: str, config: Config, seeds: list[int], ds: data_mod.Dataset, steps: int, device: torch.device,
           init_batches: list[list], compiled: bool) -> MethodRun:
    """Every seed's network of one method (its data-dependent start done), stacked when there are several seeds."""
    nets = []
    for seed, init in zip(seeds, init_batches):
        net = models.build(
            method, seed, ds.input_shape[0], ds.num_classes, width=config.width, depth=config.depth,
            norm_placement=config.norm_placement, norm_position=config.norm_position,
            norm_options={**norms.run_options(method, steps, config.batch_size), **config.norm_options.get(method, {})},
        ).to(device)
        if init:
            with autocast(device, config.precision):
                norms.initialise_statistics(net, init)
        nets.append(net)
    return MethodRun(stacked_mod.StackedNet(nets) if len(seeds) > 1 else nets[0], config, seeds, device, compiled, method)


def train_seeds(config: Config, seeds: list[int], dataset: data_mod.Dataset | None = None, progress: bool = True,
                checkpoint: str | Path | None = None, stop_after: int | None = None) -> list[RunRecord]:
    """:func:`train` for each of ``seeds`` (``config.seed`` aside), the seeds of a method trained as one stacked
    model (:mod:`bnlib.stacked`): one kernel per layer serves every seed. Each seed keeps its own batches,
    initial weights and evaluation, and its result equals ``train`` with that seed to float tolerance; its
    ``train_seconds`` is the stacked model's time shared out equally. One seed is exactly :func:`train`."""
    validate(config)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(x, int) for x in seeds):
        raise ConfigError(f"seeds={seeds!r}: give distinct integer seeds")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ConfigError(f"stop_after={stop_after!r}: give a positive number of steps")
    if dataset is None:
        dataset = data_mod.load(config.dataset, config.data_dir, config.download)
    validate(config, num_train=len(dataset.y_train), num_classes=dataset.num_classes)
    device = resolve_device(config.device)
    ds = dataset.to(device)
    stacked = len(seeds) > 1
    plan = _Plan.of(config, len(ds.y_train))
    last = min(plan.steps, stop_after or plan.steps)  # the last step this call trains

    # In-training evaluations on a fixed test subset (the same for every seed and method); the last on all.
    subset = torch.randperm(len(ds.y_test), generator=torch.Generator().manual_seed(EVAL_SUBSET_SEED))
    subset = subset[: config.eval_samples or len(subset)].sort().values.to(device)
    x_sub, y_sub = ds.x_test[subset], ds.y_test[subset]
    composed = {}  # the test sets in the order the evaluation with batch statistics takes them, by size
    if config.eval_batch_stats and config.eval_batch_composition == "training":
        for xs, ys in ((x_sub, y_sub), (ds.x_test, ds.y_test)):
            order = data_mod.one_pass(ys.cpu(), config.batch_size, config.sampler, EVAL_SUBSET_SEED,
                                      config.classes_per_batch).to(device)
            composed[len(ys)] = (xs[order], ys[order])
    init_batches, recompute_batches = zip(*(_fixed_batches(ds, config, seed, device) for seed in seeds))
    # Stacked: seed k's recompute batches in input channels k*C ... (k+1)*C, as its training batches.
    recompute = [torch.cat(group, 1) for group in zip(*recompute_batches)] if stacked else recompute_batches[0]
    eval_images = (len(plan.eval_steps) - 1) * len(y_sub) + len(ds.y_test)
    path = compiling.decide(config.compile, plan.steps * config.batch_size, eval_images, ds.input_shape, device)
    runs = {m: _build(m, config, seeds, ds, plan.steps, device, init_batches, path.compiled) for m in config.methods}

    streams = [data_mod.batches(ds.y_train.cpu(), config.batch_size, config.sampler, seed, config.classes_per_batch)
               for seed in seeds]
    eval_seconds, elapsed, done, resumed = 0.0, 0.0, 0, []
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    key = checkpoint_mod.key(config, seeds, LOCAL_KEYS)
    state = checkpoint_mod.load(checkpoint, key) if checkpoint is not None else None
    if state is not None:
        done, eval_seconds, elapsed, resumed = state["step"], state["eval_seconds"], state["elapsed"], state["resumed"] + [state["step"]]
        for m, run in runs.items():
            run.load_state_dict(state["runs"][m])
        torch.set_rng_state(state["rng"])
        for stream in streams:  # the stream is a function of the seed: replay it to where the run stopped
            for _ in range(done):
                next(stream)
        print(f"resumed from {checkpoint} at step {done} of {plan.steps}")

    started = time.perf_counter() - elapsed
    saved_at = time.perf_counter()
    bar = tqdm(total=last, initial=done, desc=f"{config.dataset} b={config.batch_size}", disable=not progress, leave=False)
    for step in range(done + 1, last + 1):
        idx = [next(stream).to(device, non_blocking=True) for stream in streams]
        if stacked:  # seed k's images in input channels k*C ... (k+1)*C, its labels in column k
            x, y = torch.cat([ds.x_train[i] for i in idx], 1), torch.stack([ds.y_train[i] for i in idx], 1)
        else:
            x, y = ds.x_train[idx[0]], ds.y_train[idx[0]]
        trace_step = step if config.trace_every and step % config.trace_every == 0 else None
        lr = learning_rate(config, step, plan.steps)
        for run in runs.values():
            if run.live:
                run.set_lr(lr)
                run.train_step(x, y, device, trace_step)
        if step % plan.log_every == 0 or step == plan.steps:
            for run in runs.values():
                if run.live:
                    run.close_window(step)
        if step in plan.eval_steps:
            t_eval = time.perf_counter()
            x_eval, y_eval = (ds.x_test, ds.y_test) if step == plan.steps else (x_sub, y_sub)
            for run in runs.values():
                if run.live:
                    run.evaluate(step, x_eval, y_eval, recompute, last=step == plan.steps, batch_xy=composed.get(len(y_eval)))
            bar.set_postfix({m: f"{r.recs[0].test_acc[-1]:.3f}" for m, r in runs.items()
                             if r.recs[0].test_acc and not r.recs[0].diverged}, refresh=False)
            eval_seconds += time.perf_counter() - t_eval
        bar.update(1)
        if checkpoint is not None and step < plan.steps and time.perf_counter() - saved_at >= 60 * config.checkpoint_minutes:
            checkpoint_mod.save(checkpoint, {
                "key": key, "step": step, "eval_seconds": eval_seconds, "resumed": resumed,
                "elapsed": time.perf_counter() - started, "rng": torch.get_rng_state(),
                "runs": {m: r.state_dict() for m, r in runs.items()}})
            saved_at = time.perf_counter()
    bar.close()

    wall_seconds = time.perf_counter() - started
    records = {m: run.finish(len(seeds), config.batch_size) for m, run in runs.items()}
    return [RunRecord(config={**dataclasses.asdict(config), "seed": seed}, device=str(device), steps=plan.steps,
                      samples_per_step=config.batch_size, train_size=len(ds.y_train), test_size=len(ds.y_test),
                      num_classes=ds.num_classes, wall_seconds=wall_seconds, eval_seconds=eval_seconds,
                      methods={m: recs[k] for m, recs in records.items()},
                      stacked_seeds=list(seeds) if stacked else ABSENT, resumed_at_steps=resumed or ABSENT,
                      stopped_at_step=last if last < plan.steps else ABSENT,
                      compiled=ABSENT if config.compile == "off" else path.compiled,
                      compile_reason=ABSENT if config.compile == "off" else path.reason)
            for k, seed in enumerate(seeds)]
