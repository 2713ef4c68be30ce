"""The configuration of a run (``Config``, one commented field per knob, which also writes the cell notebook's
parameters cell), its validation before any training starts, and the schedule it implies."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import torch

from .. import norms
from . import compiling, models
from . import data as data_mod

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
    samples: int | None = None  # ... or in training samples (the same number on every dataset); exactly one
    optimizer: str = "adam"  # adam | adamw | sgd (momentum 0.9)
    lr: float = 1e-3  # learning rate
    lr_schedule: str = "constant"  # constant | step (the learning rate x0.1 once lr_drop_at of the steps are done)
    lr_drop_at: float = 2 / 3  # lr_schedule step: the fraction of the steps after which the learning rate drops
    eval_every: int | None = None  # steps between test evaluations (default: `evals` over the run)
    evals: int = 10  # evaluations over the run when eval_every is not given (the last at the last step)
    eval_samples: int | None = 2000  # test samples of evaluations before the last (a fixed subset; None: all)
    log_every: int | None = None  # steps per training-loss record, the mean over the window (default: 100 over the run)
    recompute: bool = False  # also evaluate after recomputing population statistics (precise BN)
    recompute_samples: int = 2048  # training samples used for that, in batches of batch_size
    recompute_evals: str = "all"  # all | last: evaluations that also recompute (last: the final one, saves time)
    eval_batch_stats: bool = False  # also evaluate with batch statistics at test time (test batches of batch_size)
    # training: one pass of the training's sampler over the test labels (a diagnostic: the labels form the batches)
    eval_batch_composition: str = "iid"  # those test batches: iid (the test set in order) | training (as trained)
    aux_weight: float = 1.0  # weight of Batchless Norm's auxiliary likelihood loss
    init_samples: int = 1000  # training images for Batchless Norm's data-dependent start; 0: mean 0, std 1
    norm_options: dict = field(default_factory=dict)  # per method, e.g. {"brnc": {"warmup_steps": 500}}
    seed: int = 0  # data order and initial weights
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    checkpoint_minutes: float = 10  # minutes between checkpoints of a cell that has a checkpoint file (0: every step)
    precision: str = "fp32"  # fp32 | bf16 (autocast for convs and linear layers; norm statistics stay in fp32)
    compile: str = "off"  # off | auto | on: the training step through torch.compile (train.compiling; auto: long runs)
    trace_every: int | None = None  # steps between traces of every norm layer (train.traces); None: off
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
    base = (
        next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) is not list else hint
    )
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
    for k, m in enumerate(config.methods):
        followed = norms.spec(m).follows
        if followed and followed not in config.methods[:k]:
            fail("methods", f"{m} sets its filter norms to {followed}'s of the same step: list {followed} before it")
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
