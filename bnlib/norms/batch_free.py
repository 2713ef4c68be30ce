"""Methods that never look at other samples of the batch: Batchless Norm, Filter Response Norm, EvoNorm-S0,
GroupNorm and no normalisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import _batch_stats, _copy_affine, _Norm, _per_channel


class BatchlessNorm(_Norm):
    """``bln``: Batchless Normalization (Berger): per-channel statistics learned as parameters.

    The layer holds a learned mean mu and log-standard-deviation log_sigma per channel and normalises
    with them, in training and inference alike, without gradient through them:
        y = gamma * (x - sg(mu)) / sg(sigma) + beta,   sigma = exp(log_sigma),  sg = stop_gradient.
    The statistics are fitted by an auxiliary loss, the Gaussian negative log-likelihood of the
    activations (the activations themselves detached, so it trains only mu and sigma):
        aux = mean over channels and values of  log sigma + (x - mu)^2 / (2 sigma^2) + log(2 pi) / 2,
    computed exactly from the per-channel moments, (x - mu)^2 averaging to var_B + (mu_B - mu)^2.
    After each training forward the term is in ``self.aux_loss``; the training loop adds
    :func:`auxiliary_loss` (the sum over layers) to the task loss. No batch statistic enters the
    output, so any batch size works, including 1.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True):
        super().__init__(num_features, eps, momentum, affine)
        self.mean = nn.Parameter(torch.zeros(num_features))
        self.log_std = nn.Parameter(torch.zeros(num_features))
        self.aux_loss: Tensor | None = None

    def _dispatch(self, x: Tensor) -> Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
            mean_b, var_b = _batch_stats(x, self.eps)
            # NLL = log sigma + (var_B + (mu_B - mu)^2) / (2 sigma^2) + log(2 pi)/2, averaged over channels
            nll = self.log_std + (var_b + (mean_b - self.mean) ** 2) / (2 * torch.exp(2 * self.log_std))
            self.aux_loss = nll.mean() + 0.5 * math.log(2 * math.pi)
        # gamma (x - sg(mu)) / sg(sigma) + beta: eval-mode BN with the learned statistics and eps 0
        mean, var = self.mean.detach().clone(), torch.exp(2 * self.log_std.detach())
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, 0.0)

    def _load_from(self, other: nn.Module) -> None:
        _copy_affine(self, other)
        mean, var = getattr(other, "running_mean", None), getattr(other, "running_var", None)
        if mean is not None and var is not None:  # start the learned statistics at the population ones
            with torch.no_grad():
                self.mean.copy_(mean)
                self.log_std.copy_(0.5 * torch.log(var + self.eps))


class FilterResponseNorm(_Norm):
    """``frn``: Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan, CVPR 2020).

    Per sample and channel, over the spatial positions (no batch statistic, no mean subtraction):
        nu2 = mean(x^2),  y = max(gamma * x / sqrt(nu2 + eps) + beta, tau)
    with a learned threshold tau per channel (initialised at 0). It includes its activation: the model adds
    no GELU after it. The paper's eps is 1e-6 (learned only for 1x1 inputs, which this study does not have).
    """

    def __init__(self, num_features: int, eps: float = 1e-6, momentum: float | None = None, affine: bool = True):
        super().__init__(num_features, eps, momentum, affine)
        self.tau = nn.Parameter(torch.zeros(num_features))

    def _dispatch(self, x: Tensor) -> Tensor:
        gamma, beta = self._affine(x)
        nu2 = (x * x).mean(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x * x
        y = x * torch.rsqrt(nu2 + self.eps) * _per_channel(gamma, x) + _per_channel(beta, x)
        return torch.maximum(y, _per_channel(self.tau, x))

    def _load_from(self, other: nn.Module) -> None:
        _copy_affine(self, other)


class EvoNormS0(_Norm):
    """``evonorm``: EvoNorm-S0 (Liu et al., NeurIPS 2020), a batch-independent norm-activation layer:
        y = x * sigmoid(v * x) / group_std(x) * gamma + beta,
        group_std = sqrt(var + eps) over each sample's group of channels and all positions,
    with ``num_groups`` groups (8, as this study's GroupNorm; the largest count <= 8 dividing the channels)
    and v learned per channel (initialised at 1). It includes its activation: the model adds no GELU after it.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = None,
        affine: bool = True,
        num_groups: int = 8,
    ):
        super().__init__(num_features, eps, momentum, affine)
        self.groups = max(g for g in range(1, min(num_groups, num_features) + 1) if num_features % g == 0)
        self.v = nn.Parameter(torch.ones(num_features))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", groups={self.groups}"

    def _dispatch(self, x: Tensor) -> Tensor:
        gamma, beta = self._affine(x)
        n, c = x.shape[:2]
        grouped = x.reshape(n, self.groups, -1)
        std = torch.sqrt(grouped.var(dim=-1, unbiased=False, keepdim=True) + self.eps)
        std = std.expand(n, self.groups, c // self.groups).reshape(n, c, *([1] * (x.dim() - 2)))
        return x * torch.sigmoid(_per_channel(self.v, x) * x) / std * _per_channel(gamma, x) + _per_channel(beta, x)

    def _load_from(self, other: nn.Module) -> None:
        _copy_affine(self, other)


class _GroupNorm(nn.GroupNorm):
    """``gn``: GroupNorm with PyTorch's BN-style constructor (num_features first; eps, affine)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = None,
        affine: bool = True,
        num_groups: int = 8,
    ):
        # the largest group count <= num_groups that divides the channels
        groups = max(g for g in range(1, min(num_groups, num_features) + 1) if num_features % g == 0)
        super().__init__(groups, num_features, eps=eps, affine=affine)
        self.num_features = num_features

    def _load_from(self, other: nn.Module) -> None:
        _copy_affine(self, other)


class _Identity(nn.Identity):
    """``none``: no normalisation."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = None, affine: bool = True):
        super().__init__()
        self.num_features = num_features

    def _load_from(self, other: nn.Module) -> None:
        pass
