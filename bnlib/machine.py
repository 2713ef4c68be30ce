"""What decides a run's floating-point numbers on this machine, and how to make a newer machine compute like an
older one.

On a CPU, PyTorch picks its vector kernels by the CPU's instruction set (ATen's *CPU capability*: DEFAULT,
AVX2, AVX512 on x86), and so do oneDNN (convolutions) and MKL (matrix products). Kernels of another width add
in another order and round differently in the last bits; over thousands of steps that moves the curves. Two
runs are bit-identical when the software, the thread count and these kernels agree -- whatever CPU model runs
them -- so every metrics file records :func:`numerics` and a re-execution forces the kernels the cell recorded
(:func:`force_env`) wherever this machine has them (a newer CPU runs an older CPU's kernels; not the reverse).

The three libraries are steered by their own environment variables, read when they load, so forcing happens
when a kernel process starts: ``ATEN_CPU_CAPABILITY`` alone leaves oneDNN's convolutions on their own ISA.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
import sys

# ATen's CPU capabilities on x86, narrowest first, with the settings that make ATen, oneDNN and MKL all use
# kernels of that width (the names each library's variable takes).
X86_LEVELS = ("DEFAULT", "AVX2", "AVX512")
ISA_ENV = {
    "DEFAULT": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "AVX512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
    },
}
ENV_KEYS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")
# CPU flags that select kernels (the rest of /proc/cpuinfo's list does not change a number).
SIMD_FLAGS = (
    "sse4_1",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "asimd",
    "sve",
    "sve2",
)
# What must agree for two runs to be bit-identical (besides the training code and the cell's configuration).
# The CPU model is not among them: the same kernels give the same bits on any model (checked by forcing AVX2 on
# an AVX-512 CPU, issue 25), and the kernels actually used are.
SAME_BITS_KEYS = (
    "arch",
    "torch",
    "torch_cpu_capability",
    "onednn_isa",
    "onednn_version",
    "mkl_version",
    "threads",
    "device_type",
    "cuda_device",
    "cuda_capability",
    "cudnn_version",
    "deterministic_algorithms",
    "cudnn_deterministic",
    "cudnn_benchmark",
)

_PROBE = """
import os, sys, torch
x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)  # small enough, and a shape torch sends to oneDNN
sys.stdout.flush()
os.dup2(2, 1)  # oneDNN prints its verbose lines to the C stdout: send them where the parent reads
with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
    torch.nn.functional.conv2d(x, w)
"""


@functools.lru_cache(maxsize=None)
def onednn_isa() -> str | None:
    """The instruction set oneDNN dispatches to in a process with this environment (``"Intel AVX2"``), from its
    own verbose report in a child process (a second or two, once per process); None where it cannot say."""
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"onednn_verbose,(?:v\d+,)?info,cpu,isa:([^\n]+)", proc.stderr)
    return found.group(1).strip() if found else None


def cpu_info() -> dict:
    """The CPU's vendor, family, model, stepping, model name and its kernel-selecting flags (Linux; elsewhere what
    :mod:`platform` knows)."""
    fields = {}
    try:
        text = open("/proc/cpuinfo").read().split("\n\n", 1)[0]
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
    except OSError:
        pass
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {
        "cpu_vendor": fields.get("vendor_id") or fields.get("CPU implementer"),
        "cpu_family": fields.get("cpu family"),
        "cpu_model": fields.get("model"),
        "cpu_stepping": fields.get("stepping"),
        "cpu_model_name": fields.get("model name") or platform.processor() or None,
        "cpu_flags": [f for f in SIMD_FLAGS if f in flags],
    }


def numerics(device: str = "cpu") -> dict:
    """Everything about this process that decides a run's numbers: software versions, kernels, threads,
    determinism settings, the CPU, and on CUDA the GPU and cuDNN."""
    import torch

    config = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\w.\-]+)", config)
    dnnl = re.search(r"MKL-DNN v([\w.]+)", config)
    out = {
        "arch": platform.machine(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_isa": onednn_isa(),
        "onednn_version": dnnl.group(1) if dnnl else None,
        "mkl_version": mkl.group(1) if mkl else None,
        "threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "device_type": device.split(":")[0],
        **cpu_info(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        out.update(
            cuda_device=torch.cuda.get_device_name(index),
            cuda_capability=".".join(map(str, torch.cuda.get_device_capability(index))),
            cuda_runtime=torch.version.cuda,
            cudnn_version=torch.backends.cudnn.version(),
            cudnn_deterministic=torch.backends.cudnn.deterministic,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )
    return out


def same_bits(a: dict | None, b: dict | None) -> bool:
    """Whether two runs with these :func:`numerics` must give identical bits (False when either is unknown)."""
    return bool(a) and bool(b) and all(a.get(k) == b.get(k) for k in SAME_BITS_KEYS)


def differences(a: dict, b: dict) -> list[str]:
    """``key: a -> b`` for each :data:`SAME_BITS_KEYS` entry on which two numerics records disagree."""
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in SAME_BITS_KEYS if a.get(k) != b.get(k)]


def native_capability() -> str:
    """The widest CPU capability this process's kernels may use: the hardware's, or a narrower one where the
    environment forces it (``ATEN_CPU_CAPABILITY``, as when a newer machine stands in for an older one; what
    torch read when it loaded, so a later change of the environment reaches only new processes)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def can_run(capability: str, native: str) -> bool:
    """Whether a machine whose widest capability is ``native`` can run ``capability``'s kernels (x86 only)."""
    return (
        capability in X86_LEVELS and native in X86_LEVELS and X86_LEVELS.index(capability) <= X86_LEVELS.index(native)
    )


def force_env(capability: str) -> dict[str, str]:
    """Environment variables that make a new process compute with ``capability``'s kernels (ATen, oneDNN, MKL)."""
    key = capability.upper()
    if key not in ISA_ENV:
        raise ValueError(f"unknown CPU capability {capability!r}; one of {', '.join(X86_LEVELS)}")
    return dict(ISA_ENV[key])
