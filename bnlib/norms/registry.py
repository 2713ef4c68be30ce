"""The registry: one id, layer, defaults and needs per method (``make``, ``spec``, ``run_options``), and ``convert``,
which swaps the norm layers of an existing model."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .base import _Norm, _RunningStatsNorm
from .batch import BatchNorm, BatchRenorm, DetachedBatchNorm, GhostBatchNorm, RunningStatsBatchNorm, UnsyncedBatchNorm
from .batch_free import BatchlessNorm, EvoNormS0, FilterResponseNorm, _GroupNorm, _Identity
from .original import OriginalBatchRenorm, OriginalRunningStatsBatchNorm
from .streaming import CrossIterationBatchNorm, MovingAverageBatchNorm, OnlineNorm
from .weights import WeightCentredConv2d, WeightStandardisedConv2d

# --- the registry: one id, constructor and needs per method, in display order (names, colours: bnlib.plots) ---


@dataclass(frozen=True)
class Method:
    id: str
    factory: Callable[..., nn.Module]
    defaults: dict
    batch_dependent: bool  # whether training output depends on other samples of the batch
    # options that follow the run, from (steps, batch_size): the authors' settings expressed per run
    run_options: Callable[[int, int], dict] | None = None
    conv: type | None = None  # the convolution the method pairs with (MABN: centred, GN+WS: standardised weights)
    includes_activation: bool = False  # a norm-activation layer (FRN, EvoNorm): the model adds no activation
    split_option: str | None = None  # the layer option that splits every batch into that many parts (BNWoS's devices)
    pinned: bool = False  # its defaults define the id (a swept value): no option may change them
    compiles: bool = True  # False: autograd calls inside its forward pass; it trains eagerly in a compiled run
    # an intervention on the filters of the convolutions before its norm layers, after every optimiser step
    # (bnlib.train.interventions): their norms set to those of this method's network of the same seed in the cell ...
    follows: str | None = None
    filter_decay: float | None = None  # ... or decayed, w <- w (1 - lr * filter_decay) (decoupled weight decay)

    @property
    def keeps_running_stats(self) -> bool:
        """Whether its layers keep running (population) statistics, which evaluation can recompute or bypass."""
        return isinstance(self.factory, type) and issubclass(self.factory, _RunningStatsNorm)

    def min_batch(self, options: dict | None = None) -> tuple[int, str]:
        """The smallest training batch the method works with under ``options``, and why."""
        if self.split_option is not None:
            default = inspect.signature(self.factory).parameters[self.split_option].default
            parts = {**self.defaults, **(options or {})}.get(self.split_option, default)
            return parts, f"splits every batch over {parts} {self.split_option}"
        if self.batch_dependent:
            return 2, "needs batch statistics"
        return 1, "trains on any batch"


MOMENTUM_SWEEP = (0.01, 0.03, 0.3, 1.0)  # besides torch's 0.1: from slow to instantaneous
# The weight-decay arm's decay (book/analysis-plan.md, the causal test of weight growth): the decoupled decay whose
# equilibrium filter norm under Adam's update size (about lr per weight: |w|^2 = lr * fan_in / (2 * decay)) is the
# initial norm of an inner filter (fan_in 32 * 3 * 3 = 288, PyTorch's default init: |w|^2 = 1/3) at lr 0.001:
# 0.001 * 288 / (2 / 3) = 0.432, fixed at 0.4 before any cell with it ran
FILTER_DECAY = 0.4


def _mabn_run_options(steps: int, batch_size: int) -> dict:
    # the paper's normalisation batch of 32: buffer = max(1, 32 // batch)
    return {"buffer_size": max(1, 32 // batch_size)}


def _cbn_run_options(steps: int, batch_size: int) -> dict:
    # the authors' burn-in of 8 of 12 epochs, scaled to the run: the buffer is used in its last third
    return {"burnin": round(steps * 8 / 12)}


def _brn_schedule(steps: int, batch_size: int) -> dict:
    # the paper's 5k / 25k / 40k of a 40k run, scaled to this run: rmax = 1 and dmax = 0 for the first
    # 1/8 of the steps, dmax reaches 5 at 5/8 and rmax reaches 3 at the end
    warmup = round(steps / 8)
    return {
        "warmup_steps": warmup,
        "dmax_ramp_steps": max(round(steps * 5 / 8) - warmup, 0),
        "rmax_ramp_steps": max(steps - warmup, 0),
    }


REGISTRY: dict[str, Method] = {
    m.id: m
    for m in [
        Method("bn", BatchNorm, {}, True),
        Method("bnrs", RunningStatsBatchNorm, {}, True),
        Method("brn", BatchRenorm, {}, True),
        Method("brnc", BatchRenorm, {"rmax": 3.0, "dmax": 5.0}, True),
        Method("brnc_warmup", BatchRenorm, {"rmax": 3.0, "dmax": 5.0}, True, _brn_schedule),
        Method("bnrs_orig", OriginalRunningStatsBatchNorm, {}, True),
        Method("brn_orig", OriginalBatchRenorm, {}, True),
        Method("brnc_orig", OriginalBatchRenorm, {"rmax": 3.0, "dmax": 5.0}, True),
        Method("bnwos", UnsyncedBatchNorm, {}, True, split_option="devices"),
        # the mechanism ablation: BN's forward pass, no gradient through one or both batch statistics
        Method("bn_detached", DetachedBatchNorm, {}, True),
        Method("bn_detached_mean", DetachedBatchNorm, {"detach_var": False}, True),
        Method("bn_detached_var", DetachedBatchNorm, {"detach_mean": False}, True),
        # the causal test of weight growth: the filter norms set, every step, to BN's of the same seed (necessity) ...
        Method("bn_detached_to_bn", DetachedBatchNorm, {}, True, follows="bn"),
        Method("bnrs_to_bn", RunningStatsBatchNorm, {}, True, follows="bn"),
        # ... BN's set to the no-gradient arm's (sufficiency), or the filters decayed
        Method("bn_to_bn_detached", BatchNorm, {}, True, follows="bn_detached"),
        Method("bn_detached_wd", DetachedBatchNorm, {}, True, filter_decay=FILTER_DECAY),
        Method("bnrs_wd", RunningStatsBatchNorm, {}, True, filter_decay=FILTER_DECAY),
        # the running statistics' momentum swept (bnrs and bnrs_orig are 0.1): the digits are hundredths
        *(
            Method(f"{base}_m{round(100 * momentum):03d}", factory, {"momentum": momentum}, True, pinned=True)
            for base, factory in (("bnrs", RunningStatsBatchNorm), ("bnrs_orig", OriginalRunningStatsBatchNorm))
            for momentum in MOMENTUM_SWEEP
        ),
        Method("online", OnlineNorm, {}, True),
        Method("cbn", CrossIterationBatchNorm, {}, True, _cbn_run_options, compiles=False),
        Method("gbn", GhostBatchNorm, {}, True),
        Method("mabn", MovingAverageBatchNorm, {}, True, _mabn_run_options, conv=WeightCentredConv2d),
        Method("bln", BatchlessNorm, {}, False),
        Method("gn", _GroupNorm, {}, False),
        Method("gn_ws", _GroupNorm, {}, False, conv=WeightStandardisedConv2d),
        Method("frn", FilterResponseNorm, {}, False, includes_activation=True),
        Method("evonorm", EvoNormS0, {}, False, includes_activation=True),
        Method("none", _Identity, {}, False),
    ]
}
METHODS: tuple[str, ...] = tuple(REGISTRY)


def _method(method: str) -> Method:
    try:
        return REGISTRY[method]
    except KeyError:
        raise ValueError(f"unknown normalisation method {method!r}; choose one of {', '.join(METHODS)}") from None


def spec(method: str) -> Method:
    """The registry entry of a method (its layer, conv pairing, whether it includes its activation)."""
    return _method(method)


def run_options(method: str, steps: int, batch_size: int) -> dict:
    """The options a method takes from the run it is trained in (MABN's buffer, BRNC's scaled warm-up);
    the training loop passes them to :func:`make`, under any options the user gives."""
    spec = _method(method)
    return spec.run_options(steps, batch_size) if spec.run_options else {}


def make(method: str, num_features: int, **options) -> nn.Module:
    """A normalisation layer by method id, e.g. ``make("brnc", 32, warmup_steps=5000)``."""
    spec = _method(method)
    changed = sorted(k for k in spec.defaults if spec.pinned and k in options and options[k] != spec.defaults[k])
    if changed:
        raise ValueError(
            f"method {method!r} is defined by {', '.join(f'{k}={spec.defaults[k]}' for k in changed)}; "
            f"to train another value, give the option to the base method"
        )
    try:
        return spec.factory(num_features, **{**spec.defaults, **options})
    except TypeError as err:
        raise TypeError(f"bad option for method {method!r}: {err}") from None


_TORCH_NORMS = (nn.modules.batchnorm._BatchNorm,)
_OURS = (_Norm, _GroupNorm, _Identity)  # each has num_features


def convert(model: nn.Module, method: str, **options) -> nn.Module:
    """Replace every torch BatchNorm and every bnlib norm in ``model`` by ``method``'s layer.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: returns the converted module (the same object
    unless ``model`` itself is a norm), carrying eps, momentum, affine parameters and running statistics,
    on the original device and dtype.
    """
    spec = _method(method)
    if isinstance(model, _TORCH_NORMS + _OURS):
        kwargs = {"eps": getattr(model, "eps", 1e-5), "affine": getattr(model, "affine", True)}
        if getattr(model, "momentum", None) is not None or isinstance(model, (_TORCH_NORMS, _Norm)):
            kwargs["momentum"] = model.momentum
        if spec.pinned:  # a swept value is the method: the old layer's setting does not carry over
            kwargs = {k: v for k, v in kwargs.items() if k not in spec.defaults}
        new = make(method, model.num_features, **{**kwargs, **options})
        ref = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        new._load_from(model)
        new.train(model.training)
        return new
    for name, child in model.named_children():
        setattr(model, name, convert(child, method, **options))
    return model
