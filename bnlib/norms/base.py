"""What every normalisation layer of the study shares: the batch statistics, the ``_Norm`` base class (shape checks,
float32 under half precision, the training/eval dispatch) and ``_RunningStatsNorm`` (BN's running statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channel dimension 1."""
    return [0, *range(2, x.dim())]


@torch.no_grad()
def _batch_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(mu_B, var_B) per channel, from the fused BN kernel (Welford; several times faster than
    ``torch.var_mean`` over the strided dims of (N, C, *) on CPU)."""
    _, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
    return mean, invstd.pow(-2) - eps


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a (C,) tensor so that it broadcasts against x of shape (N, C, *)."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


class _Norm(nn.Module):
    """Shared plumbing: argument checks, half-precision upcast, affine parameters, step counter."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be positive, got {num_features}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # Counts training batches; it is the step counter of every schedule (warm-ups, ring buffers).
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"

    def meet_conv(self, conv: nn.Module) -> None:
        """Told the convolution whose output it normalises (by :class:`bnlib.train.models.Net`); most layers ignore
        it."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects input (N, {self.num_features}) or "
                f"(N, {self.num_features}, *), got shape {tuple(x.shape)}"
            )
        if x.dtype in (torch.float16, torch.bfloat16):
            # Statistics in float32: squares of half-precision activations overflow easily.
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._dispatch(x.float()).to(x.dtype)
        return self._dispatch(x)

    def _dispatch(self, x: Tensor) -> Tensor:
        if self.training:
            if x.numel() // x.shape[1] < 2:
                raise ValueError(
                    f"{type(self).__name__}({self.num_features}) got a training batch of shape {tuple(x.shape)}: "
                    "one value per channel has no batch statistics. Use a batch of at least 2 samples "
                    "(or call .eval())."
                )
            return self._train_forward(x)
        return self._eval_forward(x)

    def _affine(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """gamma and beta, as ones and zeros when the layer has no affine parameters."""
        if self.affine:
            return self.weight, self.bias
        ones = torch.ones(self.num_features, dtype=x.dtype, device=x.device)
        return ones, torch.zeros_like(ones)

    def _train_forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _eval_forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class _RunningStatsNorm(_Norm):
    """A norm that keeps BN's running mean and variance and normalises with them in eval mode."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True):
        super().__init__(num_features, eps, momentum, affine)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self._collector: _StatisticsCollector | None = None

    def _dispatch(self, x: Tensor) -> Tensor:
        if self._collector is not None:
            return self._collect_forward(x)
        return super()._dispatch(x)

    def _next_momentum(self) -> float:
        """Count this batch; the weight of the new value (torch's cumulative average when momentum is None)."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    @torch.no_grad()
    def _update_running(self, mean_b: Tensor, var_b: Tensor, values_per_channel: int) -> None:
        # mu <- (1 - momentum) mu + momentum mu_B ;  var <- (1 - momentum) var + momentum var_B * m / (m - 1)
        factor = self._next_momentum()
        unbiased = var_b * (values_per_channel / (values_per_channel - 1))
        self.running_mean.lerp_(mean_b.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)

    def _eval_forward(self, x: Tensor, copy: bool = False) -> Tensor:
        # y = gamma (x - mu) / sqrt(var + eps) + beta   (copy the statistics when training will update
        # them in place afterwards: autograd saved them for the backward pass)
        gamma, beta = self.weight, self.bias
        mean, var = self.running_mean.to(x.dtype, copy=copy), self.running_var.to(x.dtype, copy=copy)
        return F.batch_norm(x, mean, var, gamma, beta, False, 0.0, self.eps)

    # --- precise statistics (recompute_statistics) ---

    def _collect_forward(self, x: Tensor) -> Tensor:
        self._collector.add(x)
        return self._batch_normalise(x)

    def _batch_normalise(self, x: Tensor) -> Tensor:
        """BN's training-mode output, without touching any state (used while collecting statistics)."""
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    @torch.no_grad()
    def _set_population_statistics(self, mean: Tensor, var: Tensor, count: int) -> None:
        self.running_mean.copy_(mean)
        self.running_var.copy_(var * (count / max(count - 1, 1)))

    def _load_from(self, other: nn.Module) -> None:
        """Carry affine parameters and running statistics over from another BN-like layer."""
        _copy_affine(self, other)
        if getattr(other, "running_mean", None) is not None and getattr(other, "running_var", None) is not None:
            self._set_running(other.running_mean, other.running_var)

    @torch.no_grad()
    def _set_running(self, mean: Tensor, var: Tensor) -> None:
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)


class _StatisticsCollector:
    """Per-channel count, sum and sum of squares of a layer's inputs, in float64."""

    def __init__(self):
        self.count, self.sum, self.sum_sq = 0, 0.0, 0.0

    def add(self, x: Tensor) -> None:
        x64 = x.detach().to(torch.float64)
        dims = _reduce_dims(x64)
        self.count += x64.numel() // x64.shape[1]
        self.sum = self.sum + x64.sum(dims)
        self.sum_sq = self.sum_sq + (x64 * x64).sum(dims)

    def population(self) -> tuple[Tensor, Tensor]:
        mean = self.sum / self.count
        return mean, (self.sum_sq / self.count - mean * mean).clamp_min(0.0)


def _copy_affine(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        for name in ("weight", "bias"):
            d, s = getattr(dst, name, None), getattr(src, name, None)
            if d is not None and s is not None:
                d.copy_(s)
