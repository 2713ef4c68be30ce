"""Interventions on the filters of the convolutions that feed a norm layer, after every optimiser step: the causal
test of weight growth (book/analysis-plan.md, issue 45).

A method whose registry entry ``follows`` another (:class:`bnlib.norms.Method`) has, after each step, every such
filter rescaled to the norm of the same filter of the followed method's network of the same seed, trained in the
same lockstep cell on the same batches:

    W[o] <- W[o] * c[o],   c[o] = |W_target[o]| / |W[o]|              (o: an output channel; stacked: a seed's)

Under batch statistics the layer's output does not depend on c (up to eps); a layer that normalises with running
statistics would, so its running mean and variance are rescaled with the filter, mu <- c mu and var <- c^2 var, and
the network's function is unchanged by the rescaling itself (for every layer that keeps them, so that evaluation
with running statistics stays consistent too). What changes is what the next steps do: under a scale-invariant
layer the effective step of a filter is its update's size relative to its norm.

A method with a ``filter_decay`` instead decays those filters, W <- W (1 - lr * filter_decay) after the step
(decoupled weight decay, as AdamW's, on these filters only).
"""

from __future__ import annotations

import torch
from torch import nn

from .traces import norm_layers


def _filter_norms(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().flatten(1).norm(dim=1)


@torch.no_grad()
def match_filter_norms(model: nn.Module, target: nn.Module) -> None:
    """Rescale every filter of ``model``'s convolutions before a norm layer to the norm of the same filter of
    ``target`` (a network of the same architecture and stacking), carrying the running statistics along."""
    pairs, target_pairs = norm_layers(model), norm_layers(target)
    if len(pairs) != len(target_pairs):
        raise ValueError(f"cannot match filter norms: {len(pairs)} norm layers, the target has {len(target_pairs)}")
    for (conv, norm), (target_conv, _) in zip(pairs, target_pairs):
        if conv is None or target_conv is None:
            continue
        c = _filter_norms(target_conv) / _filter_norms(conv).clamp_min(torch.finfo(conv.weight.dtype).tiny)
        conv.weight.mul_(c.to(conv.weight.dtype).view(-1, *[1] * (conv.weight.dim() - 1)))
        if getattr(norm, "running_mean", None) is not None and getattr(norm, "running_var", None) is not None:
            norm.running_mean.mul_(c.to(norm.running_mean.dtype))
            norm.running_var.mul_(c.square().to(norm.running_var.dtype))


@torch.no_grad()
def decay_filters(model: nn.Module, lr: float, decay: float) -> None:
    """Decoupled weight decay on the filters of the convolutions before a norm layer: W <- W (1 - lr * decay)."""
    for conv, _ in norm_layers(model):
        if conv is not None:
            conv.weight.mul_(1 - lr * decay)
