"""The seeded lockstep training loop: every method on identical batches from
identical initial weights.

One model per method, one optimiser per model (the original study summed the losses under one Adam;
with disjoint parameters that is the same update, and separate optimisers let a diverged method drop
out). Each step draws one batch -- a function of the seed only -- and trains every live method on it.
Evaluation is :mod:`bnlib.train.evaluate`, checkpoints :mod:`bnlib.train.checkpoint`, the result a
:class:`bnlib.record.RunRecord`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import norms
from ..record import ABSENT, Final, MethodRecord, RunRecord
from . import checkpoint as checkpoint_mod
from . import compiling, interventions, models
from . import data as data_mod
from . import evaluate as evaluate_mod
from . import stacked as stacked_mod
from . import traces as traces_mod
from .config import (
    EVAL_SUBSET_SEED,
    LOCAL_KEYS,
    Config,
    ConfigError,
    learning_rate,
    resolve_device,
    total_steps,
    validate,
)
from .evaluate import autocast


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
        return cls(
            steps, config.log_every or max(1, steps // 100), set(range(eval_every, steps + 1, eval_every)) | {steps}
        )


class MethodRun:
    """One method in the lockstep run: its model (one seed's network, or every seed stacked), optimiser, clock,
    the open training-loss window, its norm layers' traces (``trace_every``) and one
    :class:`~bnlib.record.MethodRecord` per seed."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: Config,
        seeds: list[int],
        device: torch.device,
        compiled: bool = False,
        method: str = "bn",
    ):
        self.model, self.config, self.stacked, self.method = model, config, len(seeds) > 1, method
        # the training forward (compiled or the model itself); evaluation and checkpoints use the model
        # (a method whose forward pass calls autograd, Cross-Iteration BN, stays eager: Method.compiles)
        self.forward = compiling.compiled(model) if compiled and norms.spec(method).compiles else model
        self.tracer = traces_mod.Tracer(model, method, len(seeds)) if config.trace_every else None
        self.spec = norms.spec(method)
        self.follow: MethodRun | None = None  # the run whose filter norms this one's follow (spec.follows)
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
        with autocast(device, config.precision), self.tracer.capture() if tracing else contextlib.nullcontext():
            if self.stacked:
                loss = F.cross_entropy(forward(x).float().permute(0, 2, 1), y, reduction="none").mean(0)
                total = loss.sum() + config.aux_weight * stacked_mod.auxiliary_loss(self.model)
            else:
                loss = F.cross_entropy(forward(x).float(), y)
                total = loss + config.aux_weight * norms.auxiliary_loss(self.model)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if tracing:
            self.tracer.snapshot()
        self.opt.step()
        if tracing:
            self.tracer.measure_update()
        self._intervene()
        if tracing:
            self.tracer.record(trace_step, [not rec.diverged for rec in self.recs])
        self.loss_sum += loss.detach()
        self.clock.stop()
        self.steps += 1
        self.window += 1

    def _intervene(self) -> None:
        """The method's intervention on the filters before its norm layers, if it has one
        (:mod:`bnlib.train.interventions`): after the optimiser step, before anything reads the weights."""
        if self.follow is not None:
            interventions.match_filter_norms(self.model, self.follow.model)
        elif self.spec.filter_decay is not None:
            interventions.decay_filters(self.model, self.opt.param_groups[0]["lr"], self.spec.filter_decay)

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

    def evaluate(
        self,
        step: int,
        x: torch.Tensor,
        y: torch.Tensor,
        recompute_batches,
        last: bool,
        batch_xy: tuple[torch.Tensor, torch.Tensor] | None = None,
        split: str | None = None,
    ) -> None:
        """One evaluation of every seed, appended to its record (or its divergence recorded); ``last``: the run's
        final one; ``batch_xy``: the test set in the order whose consecutive batches the evaluation with batch
        statistics takes (default ``x, y``); ``split``: the split evaluated, recorded where the dataset has a
        validation split (None: the test set, nothing recorded, as before splits existed)."""
        config = self.config
        xb, yb = batch_xy if batch_xy is not None else (x, y)
        running = norms.keeps_running_statistics(self.model)
        recompute = config.recompute and running and (config.recompute_evals == "all" or last)
        batch_stats = config.eval_batch_stats and running
        if self.stacked:  # one pass for every seed; a diverged seed is evaluated along and its record left alone
            nothing = [(None, None)] * len(self.recs)
            plain = evaluate_mod.evaluate_stacked(self.model, x, y, config.precision)
            recomputed = (
                evaluate_mod.evaluate_stacked(self.model, x, y, config.precision, recompute_batches=recompute_batches)
                if recompute
                else nothing
            )
            batch = (
                evaluate_mod.evaluate_stacked(self.model, xb, yb, config.precision, batch_stats_size=config.batch_size)
                if batch_stats
                else nothing
            )
            for rec, p, r, b in zip(self.recs, plain, recomputed, batch):
                if rec.diverged:
                    continue
                if not math.isfinite(p[1]):
                    rec.mark_diverged(step)
                    continue
                rec.append_evaluation(step, len(y), p, r, b, split)
            return
        rec = self.recs[0]
        if rec.diverged:
            return
        # compiled, the inference passes run through the compiled forward too (statistics are recomputed eagerly)
        plain = self._checked(
            step, "evaluation", lambda forward: evaluate_mod.evaluate(forward, x, y, config.precision)
        )
        if not math.isfinite(plain[1]):
            rec.mark_diverged(step)
            return
        recomputed = (
            self._checked(
                step,
                "evaluation with recomputed statistics",
                lambda forward: evaluate_mod.evaluate_recomputed(
                    self.model, recompute_batches, x, y, config.precision, forward
                ),
            )
            if recompute
            else (None, None)
        )
        batch = (
            evaluate_mod.evaluate_batch_statistics(self.model, xb, yb, config.batch_size, config.precision)
            if batch_stats
            else (None, None)
        )
        rec.append_evaluation(step, len(y), plain, recomputed, batch, split)

    def _checked(self, step: int, what: str, score) -> tuple[float, float]:
        """``score(forward)`` through the training forward. A compiled one that is not finite is re-done eagerly: a
        divergence shows in both (returned: the caller records it), while a finite eager score means the compiled
        code is wrong, which must never be recorded as a result
        (:class:`bnlib.train.compiling.CompiledEvaluationError`)."""
        result = score(self.forward)
        if math.isfinite(result[1]) or self.forward is self.model:
            return result
        eager = score(self.model)
        if not math.isfinite(eager[1]):
            return eager
        weights = all(
            bool(torch.isfinite(t).all())
            for t in [*self.model.parameters(), *self.model.buffers()]
            if t.is_floating_point()
        )
        window = bool(torch.isfinite(self.loss_sum).all())
        raise compiling.CompiledEvaluationError(
            f"{self.method}: the compiled {what} at step {step} gave a test loss of {result[1]}, the same network "
            f"evaluated eagerly {eager[1]:.6g} (weights {'finite' if weights else 'NOT finite'}, open training-loss "
            f"window {'finite' if window else 'NOT finite'}): the compiled code is wrong, not the training. Nothing "
            f"was recorded. Delete the compile cache {compiling.cache_folder()} and run again, or run with compile: off"
        )

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "loss_sum": self.loss_sum,
            "seconds": self.clock.read(),
            "steps": self.steps,
            "window": self.window,
            "recs": [rec.to_dict() for rec in self.recs],
            **({"traces": self.tracer.traces} if self.tracer is not None else {}),
        }

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

            def last(values, rec=rec):
                return values[-1] if values and not rec.diverged else None

            rec.final = Final(
                test_acc=last(rec.test_acc),
                test_loss=last(rec.test_loss),
                test_acc_recomputed=last(rec.test_acc_recomputed),
                test_acc_batchstats=last(rec.test_acc_batchstats),
                train_loss=last(rec.train_loss),
            )
        return self.recs


def train(
    config: Config,
    dataset: data_mod.Dataset | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    stop_after: int | None = None,
) -> RunRecord:
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
    init_samples (in evaluation batches), precise statistics its first recompute_samples (at the training batch
    size)."""
    eval_batch = evaluate_mod.eval_batch(device)
    order = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(seed))
    init_idx = order[: config.init_samples].to(device)
    init = [ds.x_train[init_idx[i : i + eval_batch]] for i in range(0, len(init_idx), eval_batch)]
    recompute_idx = order[: max(config.batch_size, min(config.recompute_samples, len(order)))]
    recompute = [
        ds.x_train[recompute_idx[i : i + config.batch_size].to(device)]
        for i in range(0, len(recompute_idx) - config.batch_size + 1, config.batch_size)
    ]
    return init, recompute


def _build(
    method: str,
    config: Config,
    seeds: list[int],
    ds: data_mod.Dataset,
    steps: int,
    device: torch.device,
    init_batches: list[list],
    compiled: bool,
) -> MethodRun:
    """Every seed's network of one method (its data-dependent start done), stacked when there are several seeds."""
    nets = []
    for seed, init in zip(seeds, init_batches):
        net = models.build(
            method,
            seed,
            ds.input_shape[0],
            ds.num_classes,
            width=config.width,
            depth=config.depth,
            norm_placement=config.norm_placement,
            norm_position=config.norm_position,
            norm_options={**norms.run_options(method, steps, config.batch_size), **config.norm_options.get(method, {})},
        ).to(device)
        if init:
            with autocast(device, config.precision):
                norms.initialise_statistics(net, init)
        nets.append(net)
    return MethodRun(
        stacked_mod.StackedNet(nets) if len(seeds) > 1 else nets[0], config, seeds, device, compiled, method
    )


def train_seeds(
    config: Config,
    seeds: list[int],
    dataset: data_mod.Dataset | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    stop_after: int | None = None,
) -> list[RunRecord]:
    """:func:`train` for each of ``seeds`` (``config.seed`` aside), the seeds of a method trained as one stacked
    model (:mod:`bnlib.train.stacked`): one kernel per layer serves every seed. Each seed keeps its own batches,
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

    # In-training evaluations on a fixed subset (the same for every seed and method) of the validation split where the
    # dataset has one, else of the test set; the last on the whole of it, and with a validation split then once on
    # the test set (the test set scored once, at the end)
    has_val = ds.x_val is not None
    x_curve, y_curve = (ds.x_val, ds.y_val) if has_val else (ds.x_test, ds.y_test)
    subset = torch.randperm(len(y_curve), generator=torch.Generator().manual_seed(EVAL_SUBSET_SEED))
    subset = subset[: config.eval_samples or len(subset)].sort().values.to(device)
    x_sub, y_sub = x_curve[subset], y_curve[subset]
    split = "validation" if has_val else None  # None: the test set, as in files before validation splits
    eval_sets = {"subset": (x_sub, y_sub, split), "whole": (x_curve, y_curve, split)}
    if has_val:
        eval_sets["test"] = (ds.x_test, ds.y_test, "test")
    composed = {}  # each evaluation set in the order the evaluation with batch statistics takes it
    if config.eval_batch_stats and config.eval_batch_composition == "training":
        for name, (xs, ys, _) in eval_sets.items():
            order = data_mod.one_pass(
                ys.cpu(), config.batch_size, config.sampler, EVAL_SUBSET_SEED, config.classes_per_batch
            ).to(device)
            composed[name] = (xs[order], ys[order])
    init_batches, recompute_batches = zip(*(_fixed_batches(ds, config, seed, device) for seed in seeds))
    # Stacked: seed k's recompute batches in input channels k*C ... (k+1)*C, as its training batches.
    recompute = [torch.cat(group, 1) for group in zip(*recompute_batches)] if stacked else recompute_batches[0]
    eval_images = (len(plan.eval_steps) - 1) * len(y_sub) + sum(len(y) for _, y, _ in list(eval_sets.values())[1:])
    path = compiling.decide(config.compile, plan.steps * config.batch_size, eval_images, ds.input_shape, device)
    runs = {m: _build(m, config, seeds, ds, plan.steps, device, init_batches, path.compiled) for m in config.methods}
    for run in runs.values():  # a followed method is listed first (validate), so it steps first
        run.follow = runs[run.spec.follows] if run.spec.follows else None

    streams = [
        data_mod.batches(ds.y_train.cpu(), config.batch_size, config.sampler, seed, config.classes_per_batch)
        for seed in seeds
    ]
    eval_seconds, elapsed, done, resumed = 0.0, 0.0, 0, []
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    key = checkpoint_mod.key(config, seeds, LOCAL_KEYS)
    state = checkpoint_mod.load(checkpoint, key) if checkpoint is not None else None
    if state is not None:
        done, eval_seconds, elapsed, resumed = (
            state["step"],
            state["eval_seconds"],
            state["elapsed"],
            state["resumed"] + [state["step"]],
        )
        for m, run in runs.items():
            run.load_state_dict(state["runs"][m])
        torch.set_rng_state(state["rng"])
        for stream in streams:  # the stream is a function of the seed: replay it to where the run stopped
            for _ in range(done):
                next(stream)
        print(f"resumed from {checkpoint} at step {done} of {plan.steps}")

    started = time.perf_counter() - elapsed
    saved_at = time.perf_counter()
    bar = tqdm(
        total=last, initial=done, desc=f"{config.dataset} b={config.batch_size}", disable=not progress, leave=False
    )
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
            for name in ("whole", "test") if step == plan.steps else ("subset",):
                if name not in eval_sets:
                    continue
                x_eval, y_eval, split_name = eval_sets[name]
                for run in runs.values():
                    if run.live:
                        run.evaluate(
                            step, x_eval, y_eval, recompute, step == plan.steps, composed.get(name), split_name
                        )
            bar.set_postfix(
                {
                    m: f"{r.recs[0].test_acc[-1]:.3f}"
                    for m, r in runs.items()
                    if r.recs[0].test_acc and not r.recs[0].diverged
                },
                refresh=False,
            )
            eval_seconds += time.perf_counter() - t_eval
        bar.update(1)
        if (
            checkpoint is not None
            and step < plan.steps
            and time.perf_counter() - saved_at >= 60 * config.checkpoint_minutes
        ):
            checkpoint_mod.save(
                checkpoint,
                {
                    "key": key,
                    "step": step,
                    "eval_seconds": eval_seconds,
                    "resumed": resumed,
                    "elapsed": time.perf_counter() - started,
                    "rng": torch.get_rng_state(),
                    "runs": {m: r.state_dict() for m, r in runs.items()},
                },
            )
            saved_at = time.perf_counter()
    bar.close()

    wall_seconds = time.perf_counter() - started
    records = {m: run.finish(len(seeds), config.batch_size) for m, run in runs.items()}
    return [
        RunRecord(
            config={**dataclasses.asdict(config), "seed": seed},
            device=str(device),
            steps=plan.steps,
            samples_per_step=config.batch_size,
            train_size=len(ds.y_train),
            test_size=len(ds.y_test),
            num_classes=ds.num_classes,
            wall_seconds=wall_seconds,
            eval_seconds=eval_seconds,
            methods={m: recs[k] for m, recs in records.items()},
            stacked_seeds=list(seeds) if stacked else ABSENT,
            resumed_at_steps=resumed or ABSENT,
            stopped_at_step=last if last < plan.steps else ABSENT,
            compiled=ABSENT if config.compile == "off" else path.compiled,
            compile_reason=ABSENT if config.compile == "off" else path.reason,
        )
        for k, seed in enumerate(seeds)
    ]
