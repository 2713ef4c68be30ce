"""Several seeds of one method trained as one model: their networks side by side along the channels.

Every layer of :class:`bnlib.train.models.Net` works per channel (convolution filters, the BN family, MABN, BLN,
FRN) or per group of channels (GroupNorm, EvoNorm). S networks of one method stacked along the channel
dimension -- convolutions with ``groups=S`` (group s sees only seed s's channels), norms over S*C channels
with S*G groups, the classifier as a batched matrix product -- therefore compute what the S networks
compute alone, each on its own batch (seed s's batch enters as input channels s*C_in ... (s+1)*C_in), with
one kernel per layer instead of S. Adam is elementwise, so one optimiser over the stacked parameters makes
each seed's update. Scalar state (a BN layer's step counter) is the same for all seeds, who step together.

The stacked model is built from the S seeds' own networks (their initial weights and, for BLN, their
data-dependent start). Its small-batch passes are evaluated stacked too (:func:`bnlib.train.evaluate.evaluate_stacked`:
the test images enter every seed's input channels), its large-batch passes by each seed's own network
(:meth:`StackedNet.seed_networks`), whichever is faster. Grouped and plain convolutions round differently in the
last bits: a stacked seed equals its solo run to float tolerance, not bit for bit (``tests/test_train.py`` checks
every method). Over long runs an ill-conditioned layer amplifies those bits as it would another CPU's (FRN at
batch 2 drifts apart after a few hundred steps), so a stacked cell is re-executed stacked to be reproduced exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .. import norms
from . import models

# Attributes that count a norm layer's channels or groups of channels: multiplied by S when stacking.
_CHANNEL_COUNTS = ("num_features", "num_channels")
_GROUP_COUNTS = ("num_groups", "groups")


class StackedLinear(nn.Module):
    """S linear layers as one: input [N, S*F], output [N, S, out]; weight [S, out, F], bias [S, out]."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]).clone())
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers]).clone())

    def forward(self, x: Tensor) -> Tensor:
        s, _, f = self.weight.shape
        return torch.einsum("nsf,sof->nso", x.reshape(len(x), s, f), self.weight) + self.bias


class StackedNet(nn.Module):
    """S networks of one method (same architecture, any initial weights) as one; see the module docstring.
    Input [N, S*C_in, H, W] (seed s's images in channels s*C_in ... (s+1)*C_in), output logits [N, S, classes]."""

    def __init__(self, nets: list[models.Net]):
        super().__init__()
        self.seeds = len(nets)
        self._nets = nets  # the seeds' own networks, not submodules: see seed_networks
        self.features = nn.Sequential(
            *[_stack_layer([n.features[i] for n in nets]) for i in range(len(nets[0].features))]
        )
        self.classifier = StackedLinear([n.classifier for n in nets])

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))

    def seed_networks(self) -> list[models.Net]:
        """Every seed's own network, its parameters and buffers set to that seed's slice of the stacked ones.
        For large-batch passes: there S plain convolutions beat one grouped convolution on a CPU (evaluating
        360 8x8 digits: three networks 1.5x faster than the stacked one, every method alike)."""
        with torch.no_grad():
            for i, layer in enumerate(self.features):
                stacked = layer.state_dict(keep_vars=True)
                for s, net in enumerate(self._nets):
                    for name, value in net.features[i].state_dict(keep_vars=True).items():
                        value.copy_(_seed_slice(stacked[name], value, s))
            for s, net in enumerate(self._nets):
                net.classifier.weight.copy_(self.classifier.weight[s])
                net.classifier.bias.copy_(self.classifier.bias[s])
        return self._nets


def _channel_dim(solo: Tensor, width: int) -> int | None:
    """The dimension of a layer's tensor that runs over its channels: the last one of size ``width``
    (``[C]``, MABN's ``[buffer, C]``, a conv's ``[C_out, ...]``); None for scalar state."""
    dims = [d for d in range(solo.dim()) if solo.shape[d] == width]
    return dims[-1] if dims else None


def _seed_slice(stacked: Tensor, solo: Tensor, s: int) -> Tensor:
    """Seed s's part of a stacked tensor: along the one dimension that stacking widened (none: shared state)."""
    dims = [d for d in range(solo.dim()) if stacked.shape[d] != solo.shape[d]]
    return stacked.narrow(dims[0], s * solo.shape[dims[0]], solo.shape[dims[0]]) if dims else stacked


def _stack_layer(layers: list[nn.Module]) -> nn.Module:
    """One layer standing for the same layer of S networks."""
    first, count = layers[0], len(layers)
    out = copy.deepcopy(first)
    if isinstance(first, nn.Conv2d):
        out.in_channels, out.out_channels, out.groups = (
            first.in_channels * count,
            first.out_channels * count,
            first.groups * count,
        )
        out.weight = nn.Parameter(torch.cat([m.weight.detach() for m in layers]))
        if first.bias is not None:
            out.bias = nn.Parameter(torch.cat([m.bias.detach() for m in layers]))
        return out
    width = getattr(first, "num_features", None)
    if width is None:  # an activation: no state
        if any(True for _ in first.parameters()) or any(True for _ in first.buffers()):
            raise TypeError(f"cannot stack {type(first).__name__}: it has state but no num_features")
        return out
    for attr in _CHANNEL_COUNTS + _GROUP_COUNTS:
        if isinstance(getattr(first, attr, None), int):
            setattr(out, attr, getattr(first, attr) * count)
    for name, value in first.named_parameters(recurse=False):
        dim = _channel_dim(value, width)
        setattr(out, name, nn.Parameter(torch.cat([getattr(m, name).detach() for m in layers], dim)))
    for name, value in first.named_buffers(recurse=False):
        dim = _channel_dim(value, width)
        if dim is None:
            if not all(torch.equal(getattr(m, name), value) for m in layers):
                raise ValueError(f"{type(first).__name__}.{name}: scalar state differs between the seeds")
            out.register_buffer(name, value.clone())
        else:
            out.register_buffer(name, torch.cat([getattr(m, name) for m in layers], dim))
    if isinstance(first, norms.BatchlessNorm):
        out.aux_loss = None
    return out


def auxiliary_loss(model: StackedNet) -> Tensor | float:
    """The sum over seeds of each seed's :func:`bnlib.norms.auxiliary_loss`: a stacked BLN layer averages its
    likelihood over S*C channels, a seed's over C, so the stacked term times S."""
    return model.seeds * norms.auxiliary_loss(model)
