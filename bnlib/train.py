"""The seeded lockstep training loop: every method on identical batches from identical initial weights.

One model per method, one optimiser per model (the original study summed the losses under one Adam;
with disjoint parameters that is the same update, and separate optimisers let a diverged method drop
out). Each step draws one batch -- a function of the seed only -- and trains every live method on it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as data_mod
from . import models, norms
from . import stacked as stacked_mod

ORIGINAL_METHODS = ("bn", "bnrs", "brn", "brnc", "bnwos")
OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("fp32", "bf16")
# Test samples per forward pass. On a CPU a batch whose activations fit the caches wins (28x28, one thread:
# 1.1 ms per sample at 128, 2.2 ms at 512 or more; `bnlib bench step` measures it); a GPU wants large batches.
EVAL_BATCH = {"cpu": 128, "cuda": 2048}
# Config keys that say where a cell runs, finds its data or saves its checkpoints, not what it computes:
# left out of cell ids and checkpoint keys.
LOCAL_KEYS = ("device", "data_dir", "download", "checkpoint_minutes")
EVAL_SUBSET_SEED = 1234  # the fixed test subset of in-training evaluations; never changes with the run's seed


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any training starts."""


@dataclass
class Config:
    dataset: str = "digits"  # digits | mnist5k (embedded) | mnist | fashionmnist | cifar10 | cifar100
    methods: list[str] = field(default_factory=lambda: list(ORIGINAL_METHODS))  # trained in lockstep
    batch_size: int = 16
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
    lr: float = 1e-3
    eval_every: int | None = None  # steps between test evaluations (default: `evals` over the run)
    evals: int = 10  # evaluations over the run when eval_every is not given (the last at the last step)
    eval_samples: int | None = 2000  # test samples of every evaluation before the last (a fixed subset; None: all); the last uses all
    log_every: int | None = None  # steps per training-loss record, the mean over the window (default: 100 over the run)
    recompute: bool = False  # also evaluate after recomputing population statistics (precise BN)
    recompute_samples: int = 2048  # training samples used for that, in batches of batch_size
    eval_batch_stats: bool = False  # also evaluate with batch statistics at test time (test batches of batch_size)
    aux_weight: float = 1.0  # weight of Batchless Norm's auxiliary likelihood loss
    init_samples: int = 1000  # training images for Batchless Norm's data-dependent start (its authors'); 0: mean 0, std 1
    norm_options: dict = field(default_factory=dict)  # per method, e.g. {"brnc": {"warmup_steps": 500}}
    seed: int = 0  # data order and initial weights
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    checkpoint_minutes: float = 10  # minutes between checkpoints of a cell that has a checkpoint file (0: every step)
    precision: str = "fp32"  # fp32 | bf16 (autocast for convs and linear layers; norm statistics stay in fp32)
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
    for key in ("eval_every", "log_every", "eval_samples", "evals"):
        value = getattr(config, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            fail(key, "must be a positive integer")
    if not config.checkpoint_minutes >= 0:
        fail("checkpoint_minutes", "must be 0 (every step) or more")
    if config.width < 1 or config.depth < 1:
        fail("width" if config.width < 1 else "depth", "must be positive")
    uses_batch = [m for m in config.methods if norms.REGISTRY[m].batch_dependent] if config.norm_placement != "none" else []
    if uses_batch and config.batch_size < 2:
        fail("batch_size", f"{', '.join(uses_batch)} need batch statistics: use a batch of at least 2")
    if config.batch_size < 1:
        fail("batch_size", "must be positive")
    if "bnwos" in config.methods and config.norm_placement != "none":
        devices = config.norm_options.get("bnwos", {}).get("devices", 2)
        if config.batch_size < devices:
            fail("batch_size", f"bnwos splits every batch over {devices} devices: use a batch of at least {devices}")
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


def _optimizer(config: Config, params) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters; at batch 2 the optimiser step is a third of the step time
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, fused=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, fused=True)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9)


def autocast(device: torch.device, precision: str):
    """The precision context of every forward pass: bf16 autocast, or nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the whole set, in eval mode, without autograd bookkeeping."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    size = EVAL_BATCH.get(x.device.type, 1024)
    with torch.inference_mode(), autocast(x.device, precision):
        for i in range(0, len(x), size):
            logits = model(x[i: i + size]).float()
            loss += F.cross_entropy(logits, y[i: i + size], reduction="sum").double()
            correct += (logits.argmax(1) == y[i: i + size]).sum()
    model.train(was_training)
    return int(correct) / len(x), float(loss) / len(x)  # one host sync per evaluation


def evaluate_recomputed(model: torch.nn.Module, batches: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                        precision: str = "fp32") -> tuple[float, float]:
    """:func:`evaluate` after recomputing population statistics from ``batches`` (precise BN); the
    model's own buffers are restored afterwards, so training goes on from exactly where it was."""
    saved = {name: buf.clone() for name, buf in model.named_buffers()}
    try:
        with autocast(x.device, precision):
            norms.recompute_statistics(model, batches)
        return evaluate(model, x, y, precision)
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])


def evaluate_batch_statistics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                              precision: str = "fp32") -> tuple[float, float]:
    """:func:`evaluate` with batch statistics at test time: the test set in batches of the training batch size
    (a smaller last one), each normalised with its own statistics; no state changes."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    with torch.inference_mode(), autocast(x.device, precision), norms.batch_statistics(model):
        for i in range(0, len(x), batch_size):
            logits = model(x[i: i + batch_size]).float()
            loss += float(F.cross_entropy(logits, y[i: i + batch_size], reduction="sum"))
            correct += int((logits.argmax(1) == y[i: i + batch_size]).sum())
    model.train(was_training)
    return correct / len(x), loss / len(x)


# --- the seeds of a stacked model evaluated together: one forward pass serves every seed ----------------


def _stacked_scores(model: stacked_mod.StackedNet, x: torch.Tensor, y: torch.Tensor, size: int,
                    precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every seed's (correct predictions, summed cross-entropy) on (x, y) in batches of ``size``: the test
    images enter every seed's input channels, logits come out per seed. The model's mode is the caller's."""
    correct = torch.zeros(model.seeds, dtype=torch.long, device=x.device)
    loss = torch.zeros(model.seeds, dtype=torch.float64, device=x.device)
    with torch.inference_mode(), autocast(x.device, precision):
        for i in range(0, len(x), size):
            logits = model(x[i: i + size].repeat(1, model.seeds, 1, 1)).float()  # [n, S, classes]
            labels = y[i: i + size].unsqueeze(1).expand(-1, model.seeds)
            loss += F.cross_entropy(logits.permute(0, 2, 1), labels, reduction="none").sum(0).double()
            correct += (logits.argmax(2) == labels).sum(0)
    return correct, loss


def _per_seed(correct: torch.Tensor, loss: torch.Tensor, n: int) -> list[tuple[float, float]]:
    return [(c / n, v / n) for c, v in zip(correct.tolist(), loss.tolist())]  # one host sync


# Largest batch whose stacked pass beats the seeds' own networks on a CPU: grouped convolutions pay at small
# batches, where every kernel is overhead, and lose at large ones (three BN seeds, 360 8x8 digits, one thread:
# stacked 2.0x at batch 2, 1.25x at 16, 1.1x at 32, 1.0x at 64, 0.75x at 128). On a GPU always stacked.
STACKED_EVAL_MAX_BATCH = {"cpu": 32}


def evaluate_stacked(model: stacked_mod.StackedNet, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32",
                     recompute_batches: list[torch.Tensor] | None = None,
                     batch_stats_size: int | None = None) -> list[tuple[float, float]]:
    """Per seed, what :func:`evaluate` gives for its own network; with ``recompute_batches`` (every seed's
    batches side by side along the channels, as in training) :func:`evaluate_recomputed`'s, with
    ``batch_stats_size`` :func:`evaluate_batch_statistics`'s. Passes of at most ``STACKED_EVAL_MAX_BATCH``
    samples run stacked (one pass for every seed), larger ones through each seed's own network. The model's
    state is left as it was."""
    was_training = model.training
    saved = {name: buf.clone() for name, buf in model.named_buffers()} if recompute_batches is not None else None
    stacked_max = STACKED_EVAL_MAX_BATCH.get(x.device.type, 1 << 30)
    try:
        if recompute_batches is not None:
            with autocast(x.device, precision):
                norms.recompute_statistics(model, recompute_batches)
        model.eval()
        if batch_stats_size is not None:
            if batch_stats_size > stacked_max:
                return [evaluate_batch_statistics(net, x, y, batch_stats_size, precision) for net in model.seed_networks()]
            with norms.batch_statistics(model):
                return _per_seed(*_stacked_scores(model, x, y, batch_stats_size, precision), len(x))
        size = EVAL_BATCH.get(x.device.type, 1024)
        if min(size, len(x)) > stacked_max:
            return [evaluate(net, x, y, precision) for net in model.seed_networks()]
        return _per_seed(*_stacked_scores(model, x, y, size, precision), len(x))
    finally:
        model.train(was_training)
        if saved is not None:
            with torch.no_grad():
                for name, buf in model.named_buffers():
                    buf.copy_(saved[name])


def _keeps_running_statistics(model: torch.nn.Module) -> bool:
    return any(isinstance(m, norms._RunningStatsNorm) for m in model.modules())


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


# --- checkpoints: a cell killed mid-run resumes where its last checkpoint left it, to the same numbers -----


def _checkpoint_key(config: Config, seeds: list[int]) -> dict:
    """What a checkpoint must match to be resumed: the training settings (not where the cell runs), the
    seeds and the training code."""
    from .results import TRAINING_SHA256  # results imports this module

    return {"config": {k: v for k, v in dataclasses.asdict(config).items() if k not in LOCAL_KEYS}, "seeds": list(seeds),
            "training_code_sha256": TRAINING_SHA256}


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a kill during the write leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, key: dict) -> dict | None:
    """The checkpoint at ``path`` if it belongs to this configuration, seeds and code (``key``), else None
    (with the reason printed, and the file left for the next run to overwrite)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - an unreadable checkpoint costs the time since the start, not the cell
        print(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); starting from step 0")
        return None
    if state.get("key") != key:
        print(f"checkpoint {path} was written for other settings or training code; starting from step 0")
        return None
    return state


def train(config: Config, dataset: data_mod.Dataset | None = None, progress: bool = True,
          checkpoint: str | Path | None = None) -> dict:
    """Train ``config.methods`` in lockstep; returns JSON-ready records (see the keys below).

    With ``checkpoint`` (a file path), the state of the run -- models, optimisers, norm buffers, the
    random state, the step reached and the records so far -- is saved there every
    ``config.checkpoint_minutes``, and a run that finds a checkpoint of its own configuration resumes from it:
    the batch stream is a function of the seed, replayed to the step, so the result is the same as without
    the interruption (`tests/test_train.py` checks it bit for bit).
    """
    return train_seeds(config, [config.seed], dataset, progress, checkpoint)[0]


def train_seeds(config: Config, seeds: list[int], dataset: data_mod.Dataset | None = None, progress: bool = True,
                checkpoint: str | Path | None = None) -> list[dict]:
    """:func:`train` for each of ``seeds`` (``config.seed`` aside), the seeds of a method trained as one stacked
    model (:mod:`bnlib.stacked`): one kernel per layer serves every seed. Each seed keeps its own batches,
    initial weights and evaluation, and its result equals ``train`` with that seed to float tolerance; its
    ``train_seconds`` is the stacked model's time shared out equally. One seed is exactly :func:`train`."""
    validate(config)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(x, int) for x in seeds):
        raise ConfigError(f"seeds={seeds!r}: give distinct integer seeds")
    if dataset is None:
        dataset = data_mod.load(config.dataset, config.data_dir, config.download)
    validate(config, num_train=len(dataset.y_train), num_classes=dataset.num_classes)
    device = resolve_device(config.device)
    ds = dataset.to(device)
    stacked = len(seeds) > 1
    steps = total_steps(config, len(ds.y_train))
    eval_every = config.eval_every or math.ceil(steps / config.evals)  # exactly `evals`, the last at the last step
    log_every = config.log_every or max(1, steps // 100)
    eval_steps = sorted({s for s in range(eval_every, steps + 1, eval_every)} | {steps})
    # In-training evaluations on a fixed test subset (the same for every seed and method); the last on all.
    subset = torch.randperm(len(ds.y_test), generator=torch.Generator().manual_seed(EVAL_SUBSET_SEED))
    subset = subset[: config.eval_samples or len(subset)].sort().values.to(device)
    x_sub, y_sub = ds.x_test[subset], ds.y_test[subset]

    # A fixed slice of training data, a function of the seed: BLN's initialisation uses its first
    # init_samples, precise statistics its first recompute_samples (at the training batch size).
    eval_batch = EVAL_BATCH.get(device.type, 1024)
    init_batches, recompute_batches = [], []
    for seed in seeds:
        order = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(seed))
        init_idx = order[: config.init_samples].to(device)
        init_batches.append([ds.x_train[init_idx[i: i + eval_batch]] for i in range(0, len(init_idx), eval_batch)])
        recompute_idx = order[: max(config.batch_size, min(config.recompute_samples, len(order)))]
        recompute_batches.append([ds.x_train[recompute_idx[i: i + config.batch_size].to(device)]
                                  for i in range(0, len(recompute_idx) - config.batch_size + 1, config.batch_size)])

    # Stacked: seed k's recompute batches in input channels k*C ... (k+1)*C, as its training batches.
    recompute_stacked = [torch.cat(group, 1) for group in zip(*recompute_batches)] if stacked else None

    runs = {}
    for m in config.methods:
        nets = []  # every seed's own network: trained directly (one seed) or stacked
        for k, seed in enumerate(seeds):
            net = models.build(
                m, seed, ds.input_shape[0], ds.num_classes, width=config.width, depth=config.depth,
                norm_placement=config.norm_placement, norm_position=config.norm_position,
                norm_options={**norms.run_options(m, steps, config.batch_size), **config.norm_options.get(m, {})},
            ).to(device)
            if init_batches[k]:
                with autocast(device, config.precision):
                    norms.initialise_statistics(net, init_batches[k])
            nets.append(net)
        model = stacked_mod.StackedNet(nets) if stacked else nets[0]
        runs[m] = {
            "model": model, "opt": _optimizer(config, model.parameters()), "clock": _StepClock(device),
            "steps": 0, "loss_sum": torch.zeros(len(seeds) if stacked else (), device=device), "window": 0,
            "recs": [{"train_step": [], "train_loss": [], "eval_step": [], "eval_size": [], "test_acc": [], "test_loss": [],
                      "test_acc_recomputed": [], "test_loss_recomputed": [], "test_acc_batchstats": [],
                      "test_loss_batchstats": [], "diverged": False, "diverged_step": None} for _ in seeds],
        }
    live = lambda run: not all(rec["diverged"] for rec in run["recs"])  # noqa: E731

    eval_seconds, elapsed, done, resumed = 0.0, 0.0, 0, []
    streams = [data_mod.batches(ds.y_train.cpu(), config.batch_size, config.sampler, seed, config.classes_per_batch)
               for seed in seeds]
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    key = _checkpoint_key(config, seeds)
    state = load_checkpoint(checkpoint, key) if checkpoint is not None else None
    if state is not None:
        done, eval_seconds, elapsed, resumed = state["step"], state["eval_seconds"], state["elapsed"], state["resumed"] + [state["step"]]
        for m, run in runs.items():
            saved = state["runs"][m]
            run["model"].load_state_dict(saved["model"])
            run["opt"].load_state_dict(saved["opt"])
            run["loss_sum"].copy_(saved["loss_sum"])
            run["clock"].seconds, run["steps"], run["window"], run["recs"] = saved["seconds"], saved["steps"], saved["window"], saved["recs"]
        torch.set_rng_state(state["rng"])
        for stream in streams:  # the stream is a function of the seed: replay it to where the run stopped
            for _ in range(done):
                next(stream)
        print(f"resumed from {checkpoint} at step {done} of {steps}")
    started = time.perf_counter() - elapsed
    saved_at = time.perf_counter()
    bar = tqdm(total=steps, initial=done, desc=f"{config.dataset} b={config.batch_size}", disable=not progress, leave=False)
    for step in range(done + 1, steps + 1):
        idx = [next(stream).to(device, non_blocking=True) for stream in streams]
        if stacked:  # seed k's images in input channels k*C ... (k+1)*C, its labels in column k
            x, y = torch.cat([ds.x_train[i] for i in idx], 1), torch.stack([ds.y_train[i] for i in idx], 1)
        else:
            x, y = ds.x_train[idx[0]], ds.y_train[idx[0]]
        for run in runs.values():
            if not live(run):  # a diverged seed of a stacked model trains on (NaN stays in its own channels)
                continue
            model, opt = run["model"], run["opt"]
            run["clock"].start()
            with autocast(device, config.precision):
                if stacked:  # per seed, the mean over its batch; the seeds' losses summed keep their gradients apart
                    loss = F.cross_entropy(model(x).float().permute(0, 2, 1), y, reduction="none").mean(0)
                    total = loss.sum() + config.aux_weight * stacked_mod.auxiliary_loss(model)
                else:
                    loss = F.cross_entropy(model(x).float(), y)
                    total = loss + config.aux_weight * norms.auxiliary_loss(model)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            run["loss_sum"] += loss.detach()
            run["clock"].stop()
            run["steps"] += 1
            run["window"] += 1
        if step % log_every == 0 or step == steps:
            for run in runs.values():
                if not live(run) or run["window"] == 0:
                    continue
                run["clock"].read()
                sums = run["loss_sum"].reshape(-1).tolist()
                for rec, loss_sum in zip(run["recs"], sums):
                    mean_loss = loss_sum / run["window"]
                    if rec["diverged"]:
                        continue
                    if not math.isfinite(mean_loss):  # diverged: stop this method, keep what it recorded
                        rec["diverged"], rec["diverged_step"] = True, step
                        continue
                    rec["train_step"].append(step)
                    rec["train_loss"].append(mean_loss)
                run["loss_sum"].zero_()
                run["window"] = 0
        if step in eval_steps:
            t_eval = time.perf_counter()
            x_eval, y_eval = (ds.x_test, ds.y_test) if step == steps else (x_sub, y_sub)
            for run in runs.values():
                if not live(run):
                    continue
                if stacked:
                    _evaluate_stacked_into(run["recs"], run["model"], step, x_eval, y_eval, recompute_stacked, config)
                    continue
                if not run["recs"][0]["diverged"]:
                    _evaluate_into(run["recs"][0], run["model"], step, x_eval, y_eval, recompute_batches[0], config)
            accs = {m: r["recs"][0]["test_acc"][-1] for m, r in runs.items() if r["recs"][0]["test_acc"] and not r["recs"][0]["diverged"]}
            bar.set_postfix({m: f"{a:.3f}" for m, a in accs.items()}, refresh=False)
            eval_seconds += time.perf_counter() - t_eval
        bar.update(1)
        if checkpoint is not None and step < steps and time.perf_counter() - saved_at >= 60 * config.checkpoint_minutes:
            save_checkpoint(checkpoint, {
                "key": key, "step": step, "eval_seconds": eval_seconds, "resumed": resumed,
                "elapsed": time.perf_counter() - started, "rng": torch.get_rng_state(),
                "runs": {m: {"model": r["model"].state_dict(), "opt": r["opt"].state_dict(), "loss_sum": r["loss_sum"],
                             "seconds": r["clock"].read(), "steps": r["steps"], "window": r["window"], "recs": r["recs"]}
                         for m, r in runs.items()}})
            saved_at = time.perf_counter()
    bar.close()

    outs = []
    for k, seed in enumerate(seeds):
        out = {"config": {**dataclasses.asdict(config), "seed": seed}, "device": str(device), "steps": steps,
               "samples_per_step": config.batch_size, "train_size": len(ds.y_train), "test_size": len(ds.y_test),
               "num_classes": ds.num_classes, "wall_seconds": time.perf_counter() - started,
               "eval_seconds": eval_seconds, "methods": {}}
        if stacked:
            out["stacked_seeds"] = list(seeds)
        if resumed:
            out["resumed_at_steps"] = resumed
        for m, run in runs.items():
            rec = run["recs"][k]
            rec["train_seconds"] = seconds = run["clock"].read() / len(seeds)
            rec["samples_per_second"] = run["steps"] * config.batch_size / seconds if seconds else None
            last = lambda key: rec[key][-1] if rec[key] and not rec["diverged"] else None  # noqa: E731
            rec["final"] = {"test_acc": last("test_acc"), "test_loss": last("test_loss"),
                            "test_acc_recomputed": last("test_acc_recomputed"),
                            "test_acc_batchstats": last("test_acc_batchstats"), "train_loss": last("train_loss")}
            out["methods"][m] = rec
        outs.append(out)
    return outs


def _evaluate_stacked_into(recs: list[dict], model: stacked_mod.StackedNet, step: int, x_eval: torch.Tensor,
                           y_eval: torch.Tensor, recompute_batches: list[torch.Tensor], config: Config) -> None:
    """:func:`_evaluate_into` for every seed of a stacked model, each evaluation one pass for all seeds. A
    diverged seed is evaluated along (its NaNs stay in its own channels) and its records left alone."""
    plain = evaluate_stacked(model, x_eval, y_eval, config.precision)
    running = _keeps_running_statistics(model)
    recomputed = (evaluate_stacked(model, x_eval, y_eval, config.precision, recompute_batches=recompute_batches)
                  if config.recompute and running else [(None, None)] * len(recs))
    batch_stats = (evaluate_stacked(model, x_eval, y_eval, config.precision, batch_stats_size=config.batch_size)
                   if config.eval_batch_stats and running else [(None, None)] * len(recs))
    for rec, (acc, loss_value), (acc_r, loss_r), (acc_b, loss_b) in zip(recs, plain, recomputed, batch_stats):
        if rec["diverged"]:
            continue
        if not math.isfinite(loss_value):
            rec["diverged"], rec["diverged_step"] = True, step
            continue
        _append_evaluation(rec, step, len(y_eval), (acc, loss_value), (acc_r, loss_r), (acc_b, loss_b))


def _append_evaluation(rec: dict, step: int, size: int, plain: tuple, recomputed: tuple, batch_stats: tuple) -> None:
    rec["eval_step"].append(step)
    rec["eval_size"].append(size)
    rec["test_acc"].append(plain[0])
    rec["test_loss"].append(plain[1])
    rec["test_acc_recomputed"].append(recomputed[0])
    rec["test_loss_recomputed"].append(recomputed[1])
    rec["test_acc_batchstats"].append(batch_stats[0])
    rec["test_loss_batchstats"].append(batch_stats[1])


def _evaluate_into(rec: dict, model: torch.nn.Module, step: int, x_eval: torch.Tensor, y_eval: torch.Tensor,
                   recompute_batches: list[torch.Tensor], config: Config) -> None:
    """One evaluation of one seed's network, appended to its records (or its divergence recorded)."""
    plain = evaluate(model, x_eval, y_eval, config.precision)
    if not math.isfinite(plain[1]):
        rec["diverged"], rec["diverged_step"] = True, step
        return
    running = _keeps_running_statistics(model)
    recomputed = (evaluate_recomputed(model, recompute_batches, x_eval, y_eval, config.precision)
                  if config.recompute and running else (None, None))
    batch_stats = (evaluate_batch_statistics(model, x_eval, y_eval, config.batch_size, config.precision)
                   if config.eval_batch_stats and running else (None, None))
    _append_evaluation(rec, step, len(y_eval), plain, recomputed, batch_stats)
