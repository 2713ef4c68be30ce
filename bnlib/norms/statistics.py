"""What a trained model's statistics can be made to do: batch statistics at test time, precise population
statistics (recompute), Batchless Norm's data-dependent start, its auxiliary loss."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import Tensor, nn

from .base import _RunningStatsNorm, _StatisticsCollector
from .batch_free import BatchlessNorm


class _Discard:
    """A collector that keeps nothing: the layer only normalises with the batch's statistics."""

    def add(self, x: Tensor) -> None:
        pass


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """Within the block, every layer that keeps running statistics normalises each input with that input's
    own statistics (its training-mode normalisation) in eval mode too, and updates nothing: evaluation with
    batch statistics at test time (Wu & Johnson 2021)."""
    layers = [m for m in model.modules() if isinstance(m, _RunningStatsNorm)]
    for layer in layers:
        layer._collector = _Discard()
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer._collector = None


@torch.no_grad()
def recompute_statistics(model: nn.Module, batches: Iterable) -> int:
    """Precise BN: recompute the population statistics of every bnlib layer that keeps running statistics.

    With frozen weights, runs ``batches`` (input tensors, or tuples whose first item is the input)
    through the model; every such layer normalises with the current batch's statistics (BN's training
    behaviour, as fvcore's precise BN does) and pools the statistics of all its inputs; then mean and
    unbiased variance over every value seen replace the running statistics (MABN: its second moment).
    Step counters, ring buffers and other modules' modes are left unchanged. Returns the samples seen.
    """
    layers = [m for m in model.modules() if isinstance(m, _RunningStatsNorm)]
    was_training = model.training
    model.eval()
    for layer in layers:
        layer._collector = _StatisticsCollector()
    seen = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
            seen += x.shape[0]
        if seen == 0:
            raise ValueError("recompute_statistics: no batches given")
        for layer in layers:
            mean, var = layer._collector.population()
            layer._set_population_statistics(mean, var, layer._collector.count)
    finally:
        for layer in layers:
            layer._collector = None
        model.train(was_training)
    return seen


@torch.no_grad()
def initialise_statistics(model: nn.Module, batches: Iterable) -> int:
    """Batchless Normalization's data-dependent start, the authors' ``init_bln_singlePass``: layer by layer in
    the order the forward pass meets them, each BLN layer's mean and standard deviation become the mean and
    (biased) standard deviation of its inputs over ``batches``, given the already-initialised layers below.
    The model runs in eval mode, so nothing else changes. A channel with zero variance gets std sqrt(eps)
    instead of the authors' log(0). Returns the number of layers initialised."""
    layers = [m for m in model.modules() if isinstance(m, BatchlessNorm)]
    if not layers:
        return 0
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not batches:
        raise ValueError("initialise_statistics: no batches given")
    was_training = model.training
    model.eval()
    order: list[BatchlessNorm] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: order.append(m) if m not in order else None) for m in layers]
    try:
        model(batches[0])  # the order the forward pass meets the layers in
        for h in hooks:
            h.remove()
        for layer in order:
            collector = _StatisticsCollector()
            hooks = [layer.register_forward_pre_hook(lambda m, args: collector.add(args[0]))]
            for x in batches:
                model(x)
            hooks.pop().remove()
            mean, var = collector.population()
            layer.mean.copy_(mean)
            layer.log_std.copy_(0.5 * torch.log(var.clamp_min(layer.eps)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return len(order)


def keeps_running_statistics(model: nn.Module) -> bool:
    """Whether any layer of ``model`` keeps running statistics (see :attr:`Method.keeps_running_stats`)."""
    return any(isinstance(m, _RunningStatsNorm) for m in model.modules())


def auxiliary_loss(model: nn.Module) -> Tensor | float:
    """The sum of the auxiliary losses of the model's layers from their last training forward (BLN)."""
    terms = [m.aux_loss for m in model.modules() if isinstance(m, BatchlessNorm) and m.aux_loss is not None]
    return torch.stack(terms).sum() if terms else 0.0
