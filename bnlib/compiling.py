"""The long-run path of the training step: ``torch.compile`` (inductor), chosen per grid by the Config key
``compile``.

- ``off``: eager, as every committed cell ran (the default, left out of cell ids).
- ``on``: the training forward and backward of every method compiled, wherever a compiler is available; eager
  otherwise (the record says why).
- ``auto``: ``on`` when the run is long enough for compiling to pay (:func:`decide`), else ``off``.

Why it pays: the convolutions stay oneDNN's, and inductor fuses the memory-bound work between them -- each norm
layer's statistics, normalisation and affine, the GELU, their backward -- into a few C++ loops. Measured side by
side (`bnlib bench long`, `bnlib bench fusion`): see the Reproducibility page.

What it costs: compiling each method's network once per shape and process (see :data:`AUTO_MIN_SAMPLE_PIXELS`; inductor
caches the result on disk -- by default under the system's temp folder, ``TORCHINDUCTOR_CACHE_DIR`` to move it --
keyed by the graph, the shapes and the thread count, so the cells of a grid after the first pay less).

What it changes: inductor sums in another order than eager, so a compiled run's numbers are not eager's bits;
they differ as a run on another CPU generation does (judged by ``bnlib verify``'s tolerance; measured on the
Reproducibility page). A compiled run repeated on the same machine is bit-identical (tests/test_train.py), and the
run record says which path ran (``compiled``), so ``bnlib verify`` knows whether to expect identical bits.

Compiled, a one-seed run's evaluations pass through the compiled network too (one graph per batch shape);
recomputing population statistics, batch statistics at test time and stacked seeds' evaluations stay eager.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("off", "auto", "on")
# ``auto`` compiles a run whose work -- training samples plus evaluated test images, times the pixels of an
# image -- is at least this. Measured on a 2-core AMD EPYC, one thread, 28x28 (`bnlib bench long` has the whole
# cells): compiling a network costs 3-40 s cold, about 1 s from inductor's cache, per shape (training, the eval
# batch, the last eval batch of each set); it saves 20-38% of a training step at batch 128, 5-37% at batch 2
# (about 1 ms per training sample either way) and 42-47% of an evaluation (about 0.5 ms per test image). The
# break-even is about 45 million sample-pixels per method with a cold cache and 6 million with a warm one; a
# grid's cells share the cache, so the threshold sits between.
AUTO_MIN_SAMPLE_PIXELS = 20_000_000
# Every method of a cell is compiled in one process, through one ``Net.forward``: dynamo's default of 8
# compiled versions per function would send the ninth method back to eager without an error.
RECOMPILE_LIMIT = 256


@dataclass(frozen=True)
class Decision:
    compiled: bool
    reason: str


def unavailable(device: torch.device) -> str | None:
    """Why inductor cannot compile for ``device`` here (no C++ compiler on a CPU, no Triton on a GPU); None
    when it can."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (inductor needs it on a GPU)"
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
    except Exception as err:  # noqa: BLE001 - any failure to find a compiler means: run eager
        return f"no C++ compiler for inductor ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return None


def decide(mode: str, train_samples: int, eval_images: int, image_shape: tuple[int, ...],
           device: torch.device) -> Decision:
    """Whether a run that trains on ``train_samples`` samples and evaluates ``eval_images`` test images of
    ``image_shape`` (C, H, W) compiles."""
    if mode == "off":
        return Decision(False, "compile: off")
    work = (train_samples + eval_images) * image_shape[-1] * image_shape[-2]
    if mode == "auto" and work < AUTO_MIN_SAMPLE_PIXELS:
        return Decision(False, f"compile: auto, and {work:,} sample-pixels per method is below "
                               f"{AUTO_MIN_SAMPLE_PIXELS:,}: too short for compiling to pay")
    why_not = unavailable(device)
    if why_not is not None:
        return Decision(False, f"compile: {mode}, but {why_not}: eager")
    return Decision(True, f"compile: {mode}" + (f" ({work:,} sample-pixels per method)" if mode == "auto" else ""))


def compiled(model: torch.nn.Module):
    """``model``'s forward, compiled (static shapes: a training batch never changes shape)."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(model, dynamic=False)
