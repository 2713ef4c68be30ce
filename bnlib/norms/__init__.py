"""Every normalisation method of the study, as drop-in replacements for ``torch.nn.BatchNorm*d``: one family a module
(``base``, ``batch``, ``streaming``, ``original``, ``batch_free``, ``weights``), the registry (``registry``) and what
a trained model's statistics can do (``statistics``).

All layers take input of shape (N, C) or (N, C, *), use PyTorch's argument names and defaults
(``eps=1e-5``, ``momentum=0.1`` weighting the *new* value, ``affine=True``) and keep their state
(running statistics, step counters, ring buffers) in registered buffers, so ``.to()``, ``state_dict``
and ``load_state_dict`` carry everything. Counters never advance in eval mode.

Notation (per channel c; the batch statistics reduce over the batch and every spatial position):

    mu_B      = mean(x)                      batch mean
    var_B     = mean((x - mu_B)^2)           biased batch variance (used to normalise)
    var_B'    = var_B * m / (m - 1)          unbiased variance, m values per channel (used to update)
    mu, var   = running_mean, running_var    exponential moving averages
    mu  <- (1 - momentum) * mu  + momentum * mu_B
    var <- (1 - momentum) * var + momentum * var_B'
    gamma, beta = weight, bias               the affine parameters

Numerical hygiene shared by every layer: half-precision input (for example under autocast) is
normalised in float32 and cast back, so statistics never overflow; a training batch with a single
value per channel raises an error naming the layer instead of writing NaN into the running statistics.

Use :func:`make` to build a layer by its method id, :func:`convert` to swap the norms of an existing
model, :func:`recompute_statistics` for precise population statistics after training, and
:func:`auxiliary_loss` to collect Batchless Normalization's likelihood term and
:func:`initialise_statistics` for its data-dependent start.
"""

from .batch import BatchNorm, BatchRenorm, DetachedBatchNorm, GhostBatchNorm, RunningStatsBatchNorm, UnsyncedBatchNorm
from .batch_free import BatchlessNorm, EvoNormS0, FilterResponseNorm
from .original import OriginalBatchRenorm, OriginalRunningStatsBatchNorm
from .registry import METHODS, MOMENTUM_SWEEP, REGISTRY, Method, convert, make, run_options, spec
from .statistics import (
    auxiliary_loss,
    batch_statistics,
    initialise_statistics,
    keeps_running_statistics,
    recompute_statistics,
)
from .streaming import CrossIterationBatchNorm, MovingAverageBatchNorm, OnlineNorm
from .weights import WeightCentredConv2d, WeightStandardisedConv2d

__all__ = [
    "METHODS",
    "Method",
    "REGISTRY",
    "BatchNorm",
    "RunningStatsBatchNorm",
    "BatchRenorm",
    "OriginalRunningStatsBatchNorm",
    "OriginalBatchRenorm",
    "UnsyncedBatchNorm",
    "DetachedBatchNorm",
    "OnlineNorm",
    "CrossIterationBatchNorm",
    "MovingAverageBatchNorm",
    "WeightCentredConv2d",
    "WeightStandardisedConv2d",
    "GhostBatchNorm",
    "FilterResponseNorm",
    "EvoNormS0",
    "BatchlessNorm",
    "make",
    "run_options",
    "spec",
    "MOMENTUM_SWEEP",
    "convert",
    "recompute_statistics",
    "batch_statistics",
    "auxiliary_loss",
    "initialise_statistics",
    "keeps_running_statistics",
]
