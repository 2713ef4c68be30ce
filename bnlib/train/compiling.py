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
caches the result on disk, so the cells of a grid after the first pay less).

Where that cache lives (:func:`cache_folder`): a folder of its own per vector ISA inductor generates code for
(``avx2``, ``avx512 avx512_vnni``, ``... amx_tile``), torch version and thread count, under inductor's folder
(``TORCHINDUCTOR_CACHE_DIR``, by default under the system's temp folder). Inductor's own cache keys do not tell
a process with forced kernels (``ATEN_CPU_CAPABILITY``, as ``bnlib verify`` sets) from a native one: sharing one
folder, a native run loaded the forced run's artefacts and crashed, and a forced run evaluated to NaN (issue 48).

What it changes: inductor sums in another order than eager, so a compiled run's numbers are not eager's bits;
they differ as a run on another CPU generation does (judged by ``bnlib verify``'s tolerance; measured on the
Reproducibility page). A compiled run repeated on the same machine is bit-identical (tests/test_train.py), and the
run record says which path ran (``compiled``), so ``bnlib verify`` knows whether to expect identical bits.

Compiled, a one-seed run's evaluations pass through the compiled network too (one graph per batch shape);
recomputing population statistics, batch statistics at test time and stacked seeds' evaluations stay eager.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

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
# The name of every cache folder this module chooses (so a process that inherits one keys from its parent instead).
CACHE_PREFIX = "bnlib-"


class CompiledEvaluationError(RuntimeError):
    """A compiled evaluation was not finite where the same network evaluated eagerly is: a fault of the compiled
    code (e.g. a cache shared with another ISA), never a divergence of training, so the run stops unrecorded."""


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


def decide(
    mode: str, train_samples: int, eval_images: int, image_shape: tuple[int, ...], device: torch.device
) -> Decision:
    """Whether a run that trains on ``train_samples`` samples and evaluates ``eval_images`` test images of
    ``image_shape`` (C, H, W) compiles."""
    if mode == "off":
        return Decision(False, "compile: off")
    work = (train_samples + eval_images) * image_shape[-1] * image_shape[-2]
    if mode == "auto" and work < AUTO_MIN_SAMPLE_PIXELS:
        return Decision(
            False,
            f"compile: auto, and {work:,} sample-pixels per method is below "
            f"{AUTO_MIN_SAMPLE_PIXELS:,}: too short for compiling to pay",
        )
    why_not = unavailable(device)
    if why_not is not None:
        return Decision(False, f"compile: {mode}, but {why_not}: eager")
    return Decision(True, f"compile: {mode}" + (f" ({work:,} sample-pixels per method)" if mode == "auto" else ""))


def cache_key(device: torch.device | None = None) -> str:
    """What decides the code inductor generates in this process, as a folder name: the vector ISA it picks (read
    from the kernels this process was started with), the torch version, the thread count; on a GPU its capability."""
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()
    parts = [str(isa) if isa else "novec", f"torch{torch.__version__}", f"threads{torch.get_num_threads()}"]
    if device is not None and device.type == "cuda":
        parts.append("sm{}{}".format(*torch.cuda.get_device_capability(device)))
    return CACHE_PREFIX + re.sub(r"[^A-Za-z0-9.+_-]+", "_", "-".join(parts))


def cache_folder(device: torch.device | None = None) -> Path:
    """The folder this process's compiled artefacts go to: :func:`cache_key` under inductor's folder (the one a
    parent process chose is stepped out of, never nested)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()).absolute()
    if base.name.startswith(CACHE_PREFIX):
        base = base.parent
    return base / cache_key(device)


def use_keyed_cache(device: torch.device | None = None) -> Path:
    """Point inductor's on-disk cache (and Triton's beneath it) at :func:`cache_folder`; returns it. Called
    wherever this package compiles, before the first compilation of the process."""
    folder = cache_folder(device)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def compiled(model: torch.nn.Module):
    """``model``'s forward, compiled (static shapes: a training batch never changes shape), its artefacts cached
    in this process's own folder (:func:`use_keyed_cache`)."""
    import torch._dynamo

    param = next(model.parameters(), None)
    use_keyed_cache(param.device if param is not None else None)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(model, dynamic=False)
