"""The training code: everything a cell's numbers depend on besides the layers (``bnlib.norms``) -- the run's
configuration (``config``), the lockstep loop (``loop``), data, models, stacked seeds, evaluation, checkpoints,
the compiled path and per-layer traces. ``bnlib.provenance`` fingerprints this package and ``bnlib.norms``, every
file, so a change anywhere in them makes finished cells stale unless its evidence is registered.

``from bnlib import train`` gives the loop's entry points: ``train.Config``, ``train.train``, ``train.train_seeds``.
"""

from .config import (
    EVAL_BATCH_COMPOSITIONS,
    EVAL_SUBSET_SEED,
    LOCAL_KEYS,
    LR_DROP_FACTOR,
    LR_SCHEDULES,
    OPTIMIZERS,
    ORIGINAL_METHODS,
    PRECISIONS,
    RECOMPUTE_EVALS,
    Config,
    ConfigError,
    learning_rate,
    resolve_device,
    total_steps,
    validate,
)
from .loop import MethodRun, train, train_seeds

__all__ = [
    "EVAL_BATCH_COMPOSITIONS",
    "EVAL_SUBSET_SEED",
    "LOCAL_KEYS",
    "LR_DROP_FACTOR",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "ORIGINAL_METHODS",
    "PRECISIONS",
    "RECOMPUTE_EVALS",
    "Config",
    "ConfigError",
    "MethodRun",
    "learning_rate",
    "resolve_device",
    "total_steps",
    "validate",
    "train",
    "train_seeds",
]
