"""Whole-cell benchmarks, each cell trained in its own process (its own kernels, its own threads): ``isa``, a
cell's training with each CPU instruction set inductor and oneDNN may use, and ``long``, the compiled path against
eager over a long cell (:func:`bench_isa`, :func:`bench_long`). Ratios against a reference measured in the same run.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

from . import norms, paths
from .bench import count_flops, matmul_peak

_ISA_PROBE = """
import json, sys, torch
from bnlib import train
from bnlib.train import data
torch.set_num_threads(1)
config = train.Config(dataset="mnist5k", methods=list(train.ORIGINAL_METHODS), batch_size=int(sys.argv[1]), \
steps=int(sys.argv[2]),
                      evals=1, eval_samples=None)
out = train.train(config, data.load("mnist5k"), progress=False)
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "train_s": out.wall_seconds - out.eval_seconds,
                  "loss": {m: r.train_loss for m, r in out.methods.items()}}))
"""


def bench_isa(sizes=(2, 16, 128), steps: int = 40, repeats: int = 3) -> list[dict]:
    """Training time of a cell (the original five methods, mnist5k, one thread) with each instruction set's kernels
    this x86 machine can run (:mod:`bnlib.machine`), against its own widest: what pinning a grid's kernels
    (``bnlib run --isa``) costs. Each run is a fresh process (the kernels are chosen when the libraries load),
    the capabilities in a fresh random order per repeat; whether their numbers are identical is reported too."""

    from . import machine

    native = machine.native_capability()
    levels = [c for c in machine.X86_LEVELS if machine.can_run(c, native)]
    rng = random.Random(0)
    rows = []
    for n in sizes:
        times, losses = {c: [] for c in levels}, {}
        for _ in range(repeats):
            rng.shuffle(levels)
            for capability in levels:
                env = {**os.environ, **machine.force_env(capability)}
                proc = subprocess.run(
                    [sys.executable, "-c", _ISA_PROBE, str(n), str(steps)],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=paths.ROOT,
                    timeout=3600,
                )
                if proc.returncode:
                    raise RuntimeError(f"bench isa ({capability}, batch {n}) failed: {proc.stderr[-2000:]}")
                out = json.loads(proc.stdout.strip().splitlines()[-1])
                times[capability].append(out["train_s"])
                losses[capability] = out["loss"]
        ref = statistics.median(times[native])
        for capability in machine.X86_LEVELS:
            if capability in times:
                rows.append(
                    {
                        "kernels": capability,
                        "N": n,
                        "steps": steps,
                        "train_s": statistics.median(times[capability]),
                        "time_vs_native": statistics.median(times[capability]) / ref,
                        "same_numbers_as_native": losses[capability] == losses[native],
                    }
                )
    return rows


_LONG_PROBE = """
import json, sys, torch
from bnlib import train
from bnlib.train import data
torch.set_num_threads(1)
config = train.Config.from_dict(json.loads(sys.argv[1]))
out = train.train(config, data.load(config.dataset), progress=False)
print(json.dumps(out.to_dict()))
"""
# A ``bench long`` cell per batch size. Batch 2: the whole cell (3,000 steps, 15 evaluations). Batch 128:
# a tenth of its 1,000 steps with a third of its evaluations (about 12 minutes per path on a 2-core EPYC instead
# of two hours); the compilation is then spread over fewer steps than in a whole cell, which favours the old path.
LONG_CELLS = {128: {"steps": 100, "evals": 5}, 2: {"steps": 3000, "evals": 15}}
LONG_PATHS = {
    "old path (eager)": {"compile": "off"},
    "new path (compiled)": {"compile": "on"},
    "no norm layers (compiled)": {"compile": "on", "norm_placement": "none"},
}


def bench_long(
    device: str = "cpu",
    dataset: str = "fashionmnist",
    sizes=(128, 2),
    steps: dict | None = None,
    evals: dict | None = None,
    eval_samples: int = 2000,
    repeats: int = 1,
    methods=None,
) -> list[dict]:
    """A whole long cell (:data:`LONG_CELLS`, or ``steps`` and ``evals`` per batch size) -- the study's methods,
    its evaluations on ``eval_samples`` test images (the last on the whole test set), one thread -- on the old path
    (``compile: off``: the training code of 16e46be, registered as reproducing it) and the new (``compile: on``), and
    the same cell without norm layers on the new path (the ceiling fusing the norm can reach), each a fresh process
    as a grid cell is, in a fresh random order per repeat. Training and evaluation seconds apart (the first compiled
    run pays the compilation unless inductor's cache already holds it), training GFLOP/s against this machine's fp32
    matrix-product peak, and whether the new path's numbers are within ``bnlib verify``'s tolerance of the old path's
    (:func:`bnlib.verify.compare`)."""

    from . import grid, verify
    from .record import RunRecord
    from .train import data, models

    loaded = data.load(dataset)
    shape = loaded.input_shape
    dev = torch.device(device)
    methods = list(methods or grid.load("study").cells[0].config().methods)
    steps = {n: cell["steps"] for n, cell in LONG_CELLS.items()} | (steps or {})
    # a size without a cell of its own evaluates 5 times, as the shortened batch-128 cell does
    evals = {n: LONG_CELLS.get(n, {"evals": 5})["evals"] for n in sizes} | (evals or {})
    unknown = [n for n in sizes if n not in steps]
    if unknown:
        raise ValueError(
            f"bench long: no cell for batch size(s) {unknown}: give their steps (--long-steps) or use "
            f"{' or '.join(map(str, LONG_CELLS))}"
        )
    peak = matmul_peak(dev, torch.float32)
    rng = random.Random(0)
    rows = []
    for n in sizes:
        base = dict(
            dataset=dataset,
            methods=methods,
            batch_size=n,
            steps=steps[n],
            evals=evals[n],
            eval_samples=eval_samples,
            device=device,
        )
        flops = {}
        for name, change in LONG_PATHS.items():
            placement = change.get("norm_placement", "all")
            flops[name] = 0
            for m in methods:
                net = models.build(m, 0, shape[0], loaded.num_classes, norm_placement=placement).to(dev)
                x, y = torch.randn(n, *shape, device=dev), torch.randint(0, loaded.num_classes, (n,), device=dev)
                flops[name] += count_flops(lambda: (F.cross_entropy(net(x), y) + norms.auxiliary_loss(net)).backward())
        runs = {name: [] for name in LONG_PATHS}
        order = list(LONG_PATHS)
        for _ in range(repeats):
            rng.shuffle(order)
            for name in order:
                config = json.dumps({**base, **LONG_PATHS[name]})
                proc = subprocess.run(
                    [sys.executable, "-c", _LONG_PROBE, config],
                    capture_output=True,
                    text=True,
                    cwd=paths.ROOT,
                    timeout=6 * 3600,
                )
                if proc.returncode:
                    raise RuntimeError(f"bench long ({name}, batch {n}) failed: {proc.stderr[-2000:]}")
                runs[name].append(RunRecord.from_dict(json.loads(proc.stdout.strip().splitlines()[-1])))
        parts = {
            "train": lambda r: r.wall_seconds - r.eval_seconds,
            "eval": lambda r: r.eval_seconds,
            "total": lambda r: r.wall_seconds,
        }
        median = {
            name: {k: statistics.median(map(part, recs)) for k, part in parts.items()} for name, recs in runs.items()
        }
        old = median["old path (eager)"]
        for name, recs in runs.items():
            t = median[name]
            row = {
                "N": n,
                "path": name,
                "steps": steps[n],
                "evals": evals[n],
                "train_s": t["train"],
                "eval_s": t["eval"],
                "total_s": t["total"],
                "train_GFLOP/s": flops[name] * steps[n] / t["train"] / 1e9,
                "train_of_peak": flops[name] * steps[n] / t["train"] / peak,
                "train_vs_old": old["train"] / t["train"],
                "eval_vs_old": old["eval"] / t["eval"],
                "total_vs_old": old["total"] / t["total"],
                "compiled": bool(recs[0].compiled),
                "vs_old_numbers": "",
            }
            if name == "new path (compiled)":
                a, b = runs["old path (eager)"][0], recs[0]
                a.cell = b.cell = f"bench-long-b{n}"
                row["vs_old_numbers"] = verify.compare(a, b, None, verify.TOLERANCE).explain()
            rows.append(row)
        new, ceiling = rows[-2], rows[-1]
        new["vs_no_norm"] = (
            new["train_GFLOP/s"] / ceiling["train_GFLOP/s"] if ceiling["train_GFLOP/s"] else float("nan")
        )
    return rows
