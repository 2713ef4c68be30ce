"""Convolutions that transform their weights before use: centred (MABN) and standardised (GN + WS)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class WeightCentredConv2d(nn.Conv2d):
    """The convolution MABN pairs with: each output filter's weights are centred before use,

        W_hat[o] = W[o] - mean(W[o])     (mean over input channels and kernel positions),

    so that the layer's outputs have (approximately) zero mean and MABN can drop the mean statistics.
    The stored parameter is the uncentred W, so initial weights are identical to an ``nn.Conv2d``'s.
    """

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


class WeightStandardisedConv2d(nn.Conv2d):
    """The convolution GroupNorm + Weight Standardisation pairs with (Qiao et al. 2019): each output filter's
    weights are standardised before use,

        W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)     (over input channels and kernel positions),

    with eps 1e-5. The stored parameter is the raw W, so initial weights are identical to an ``nn.Conv2d``'s.
    """

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), unbiased=False, keepdim=True)
        return self._conv_forward(x, (self.weight - mean) / torch.sqrt(var + 1e-5), self.bias)
