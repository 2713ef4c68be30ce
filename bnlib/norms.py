"""Every normalisation method of the study, as drop-in replacements for ``torch.nn.BatchNorm*d``.

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

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    "convert",
    "recompute_statistics",
    "batch_statistics",
    "auxiliary_loss",
    "initialise_statistics",
    "keeps_running_statistics",
]


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
        """Told the convolution whose output it normalises (by :class:`bnlib.models.Net`); most layers ignore it."""

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


class BatchNorm(_RunningStatsNorm):
    """``bn``: Batch Normalization (Ioffe & Szegedy 2015), exactly torch's semantics.

    Training:  y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta, gradients through mu_B and var_B;
               then mu, var are updated with mu_B and the *unbiased* var_B'.
    Eval:      y = gamma * (x - mu) / sqrt(var + eps) + beta.

    Deviation from the original study: eps = 1e-5 (it used eps = 0, which divides by zero for a
    constant channel, e.g. a dead ReLU/GELU unit at batch 2).
    """

    def _train_forward(self, x: Tensor) -> Tensor:
        factor = self._next_momentum()
        # The fused kernel normalises with (mu_B, var_B) and updates (mu, var) with (mu_B, var_B') in one pass.
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, factor, self.eps)


class RunningStatsBatchNorm(_RunningStatsNorm):
    """``bnrs``: BN that normalises with its running statistics in training too.

    Training:  y = gamma * (x - mu) / sqrt(var + eps) + beta   with mu, var as they were *before* this batch,
               treated as constants (no gradient through the statistics);
               then mu, var are updated with mu_B, var_B' as in BN.
    Eval:      the same formula.

    Deviation from the original study: it updated the running statistics before normalising, so the
    current batch leaked into its own normalisation (without gradient). Using the pre-update values makes
    ``bnrs`` the exact forward-pass twin of ``brn`` and keeps training and inference identical.
    """

    def _train_forward(self, x: Tensor) -> Tensor:
        y = self._eval_forward(x, copy=True)
        mean_b, var_b = _batch_stats(x, self.eps)
        self._update_running(mean_b, var_b, x.numel() // x.shape[1])
        return y


class BatchRenorm(_RunningStatsNorm):
    """``brn`` / ``brnc``: Batch Renormalization (Ioffe 2017), Algorithm 1.

    Training:
        sigma_B = sqrt(var_B + eps)             sigma = sqrt(var + eps)     (mu, var before this batch)
        r = stop_gradient(clip(sigma_B / sigma, 1/rmax, rmax))
        d = stop_gradient(clip((mu_B - mu) / sigma, -dmax, dmax))
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
        then mu, var are updated as in BN.
    Eval: y = gamma * (x - mu) / sigma + beta.

    Without clipping (``rmax=dmax=None``, method ``brn``) the training output equals (x - mu) / sigma,
    the output of ``bnrs``, but the gradient still flows through mu_B and sigma_B. With rmax = 1 and
    dmax = 0 it is exactly BN.

    Clipping schedule (``brnc``): for the first ``warmup_steps`` training steps rmax = 1 and dmax = 0;
    then rmax rises linearly to its limit over ``rmax_ramp_steps`` steps and dmax over ``dmax_ramp_steps``.
    The paper: warmup_steps = 5000, rmax 1 -> 3 by step 40k, dmax 0 -> 5 by step 25k. The defaults
    (no warm-up, rmax = 3, dmax = 5 from step 0) are the original study's.

    Deviations from the original study: r and d use the running statistics *before* this batch's update
    (as in the paper; the study updated first, so the current batch entered r and d), and the running
    variance tracks var (torch's convention) rather than the paper's sigma.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        rmax: float | None = None,
        dmax: float | None = None,
        warmup_steps: int = 0,
        rmax_ramp_steps: int = 0,
        dmax_ramp_steps: int = 0,
    ):
        super().__init__(num_features, eps, momentum, affine)
        if rmax is not None and rmax < 1:
            raise ValueError(f"BatchRenorm: rmax must be >= 1, got {rmax}")
        if dmax is not None and dmax < 0:
            raise ValueError(f"BatchRenorm: dmax must be >= 0, got {dmax}")
        if min(warmup_steps, rmax_ramp_steps, dmax_ramp_steps) < 0:
            raise ValueError("BatchRenorm: warmup_steps and ramp steps must be >= 0")
        self.rmax, self.dmax = rmax, dmax
        self.warmup_steps, self.rmax_ramp_steps, self.dmax_ramp_steps = warmup_steps, rmax_ramp_steps, dmax_ramp_steps

    def extra_repr(self) -> str:
        clip = f", rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}" if self.rmax or self.dmax else ""
        return super().extra_repr() + clip

    def _limits(self, step: Tensor) -> tuple[Tensor | float | None, Tensor | float | None]:
        """(rmax, dmax) in force at a training step (a tensor, so no host-device sync on GPUs)."""
        if self.warmup_steps == self.rmax_ramp_steps == self.dmax_ramp_steps == 0:
            return self.rmax, self.dmax  # constant limits: no per-step tensor arithmetic

        def ramp(ramp_steps: int) -> Tensor:
            progress = (step - self.warmup_steps).to(torch.float64)
            if ramp_steps == 0:
                return (progress >= 0).to(torch.float64)
            return (progress / ramp_steps).clamp(0.0, 1.0)

        rmax = None if self.rmax is None else 1.0 + (self.rmax - 1.0) * ramp(self.rmax_ramp_steps)
        dmax = None if self.dmax is None else self.dmax * ramp(self.dmax_ramp_steps)
        return rmax, dmax

    def current_limits(self) -> tuple[float | None, float | None]:
        """The clipping limits the next training step will use, as Python numbers (for inspection)."""
        rmax, dmax = self._limits(self.num_batches_tracked)
        return (None if rmax is None else float(rmax)), (None if dmax is None else float(dmax))

    def _train_forward(self, x: Tensor) -> Tensor:
        gamma, beta = self._affine(x)
        mean_b, var_b = _batch_stats(x, self.eps)
        with torch.no_grad():
            sigma = torch.sqrt(self.running_var.to(x.dtype) + self.eps)
            # r = sigma_B / sigma ; d = (mu_B - mu) / sigma, with the pre-update running statistics
            r = torch.sqrt(var_b + self.eps) / sigma
            d = (mean_b - self.running_mean.to(x.dtype)) / sigma
            rmax, dmax = self._limits(self.num_batches_tracked)
            if rmax is not None:
                rmax = rmax.to(x.dtype) if isinstance(rmax, Tensor) else rmax
                r = r.clamp(1.0 / rmax, rmax)
            if dmax is not None:
                dmax = dmax.to(x.dtype) if isinstance(dmax, Tensor) else dmax
                d = d.clamp(-dmax, dmax)
        # gamma * (x_hat * r + d) + beta  ==  x_hat * (gamma r) + (gamma d + beta), x_hat the BN output
        y = F.batch_norm(x, None, None, gamma * r, gamma * d + beta, True, 0.0, self.eps)
        self._update_running(mean_b, var_b, x.numel() // x.shape[1])
        return y


class UnsyncedBatchNorm(_RunningStatsNorm):
    """``bnwos``: BN without cross-device synchronisation, as ``nn.DataParallel`` ran it.

    Training: the batch is split along N into ``devices`` chunks (``torch.chunk``, like DataParallel's
    scatter); each chunk k is normalised with its own statistics,
        y_k = gamma * (x_k - mu_Bk) / sqrt(var_Bk + eps) + beta,
    and the running statistics are updated from chunk 0 only (the replica on the first device is the
    one that survives; pytorch issue 1051). Eval: as BN.

    Deviation from the original study: the number of devices is an option (it hard-coded two).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True, devices: int = 2):
        super().__init__(num_features, eps, momentum, affine)
        if devices < 1:
            raise ValueError(f"UnsyncedBatchNorm: devices must be >= 1, got {devices}")
        self.devices = devices

    def extra_repr(self) -> str:
        return super().extra_repr() + f", devices={self.devices}"

    def _train_forward(self, x: Tensor) -> Tensor:
        gamma, beta = self.weight, self.bias
        chunks = torch.chunk(x, self.devices, dim=0)
        for k, chunk in enumerate(chunks):
            if chunk.numel() // chunk.shape[1] < 2:
                raise ValueError(
                    f"UnsyncedBatchNorm: chunk {k} of a batch of shape {tuple(x.shape)} split over {self.devices} "
                    "devices has one value per channel; use a batch of at least 2 samples per device."
                )
        factor = self._next_momentum()
        first = F.batch_norm(chunks[0], self.running_mean, self.running_var, gamma, beta, True, factor, self.eps)
        rest = [F.batch_norm(c, None, None, gamma, beta, True, 0.0, self.eps) for c in chunks[1:]]
        return torch.cat([first, *rest]) if rest else first


class DetachedBatchNorm(_RunningStatsNorm):
    """``bn_detached`` / ``bn_detached_mean`` / ``bn_detached_var``: BN's forward pass with the gradient through
    one or both batch statistics cut -- the mechanism ablation of "running statistics in training".

    Training:  y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta, exactly BN's output; mu_B (``detach_mean``)
               and/or var_B (``detach_var``) are treated as constants in the backward pass; the running
               statistics are updated as in BN.
    Eval:      as BN.

    With x_hat = (x - mu_B) / sigma_B, sigma_B = sqrt(var_B + eps) and g = gamma * dL/dy, the input gradient is
        BN (nothing detached):      dL/dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sigma_B
        ``bn_detached_mean``:       dL/dx = (g - x_hat * mean(g * x_hat)) / sigma_B     (only var_B's term)
        ``bn_detached_var``:        dL/dx = (g - mean(g)) / sigma_B                     (only mu_B's term)
        ``bn_detached`` (both):     dL/dx = g / sigma_B
    ``bn_detached`` is "normalisation outside the gradient step" (Ioffe & Szegedy 2015, section 2): the same
    forward pass as BN, the gradient of ``bnrs``. With ``bn``, ``bnrs`` and ``brn`` it makes a 2x2 design,
    {batch, running} statistics in the forward pass x {with, without} gradient through the batch statistics.
    Not in the original study.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 detach_mean: bool = True, detach_var: bool = True):
        super().__init__(num_features, eps, momentum, affine)
        self.detach_mean, self.detach_var = detach_mean, detach_var

    def extra_repr(self) -> str:
        return super().extra_repr() + f", detach_mean={self.detach_mean}, detach_var={self.detach_var}"

    def _train_forward(self, x: Tensor) -> Tensor:
        values = x.numel() // x.shape[1]
        if self.detach_mean and self.detach_var:
            # both constant: eval-mode BN with this batch's statistics (one fused kernel)
            mean_b, var_b = _batch_stats(x, self.eps)
            y = F.batch_norm(x, mean_b, var_b, self.weight, self.bias, False, 0.0, self.eps)
        else:
            var_b, mean_b = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
            mean = mean_b.detach() if self.detach_mean else mean_b
            inv_std = torch.rsqrt((var_b.detach() if self.detach_var else var_b) + self.eps)
            gamma, beta = self._affine(x)
            # y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta, the detached statistic a constant
            y = (x - _per_channel(mean, x)) * _per_channel(inv_std * gamma, x) + _per_channel(beta, x)
        self._update_running(mean_b.detach(), var_b.detach(), values)
        return y


class _OnlineNormalise(torch.autograd.Function):
    """Online Normalization's normalisation with its control process in the backward pass (Chiley et al. 2019,
    the official ``Norm2d``: ``norm_fwd_cpu`` / ``norm_bwd_cpu``). Samples are taken in batch order, i = 1..N:

    Forward:   out_i = (x_i - mu_i) / s_i          mu_i, s_i = sqrt(var_i + eps) the streaming estimates before
                                                   sample i (given, no gradient)
    Backward:  k = 1 - alpha_bkw;  means over positions, per sample and channel:
               g~_i = dL/dout_i - k * v * out_i ;   v <- v + mean(g~_i * out_i)
               dL/dx_i = g~_i / s_i - k * u ;       u <- u + mean(dL/dx_i)
    The control variables u and v (per channel, buffers) carry over from batch to batch: they remove the
    gradient's components along 1 and along out that BN's batch statistics would have removed, with
    exponentially decaying memory instead of the batch.
    """

    @staticmethod
    def forward(ctx, x, mean_used, scale, u, v, alpha_bkw):
        n, c = x.shape[:2]
        out = (x.reshape(n, c, -1) - mean_used.unsqueeze(2)) / scale.unsqueeze(2)
        ctx.save_for_backward(out, scale)
        # kept outside save_for_backward: backward writes into them, which must not trip version checks
        ctx.u, ctx.v, ctx.alpha_bkw = u, v, alpha_bkw
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        out, scale = ctx.saved_tensors
        n, c = out.shape[:2]
        g = grad_out.reshape(n, c, -1)
        k = 1.0 - ctx.alpha_bkw
        # per-sample means over positions: the recursions need only these
        g_mean, out_mean = g.mean(2), out.mean(2)
        out_sq, g_out = (out * out).mean(2), (g * out).mean(2)
        u, v = ctx.u.to(g.dtype, copy=True), ctx.v.to(g.dtype, copy=True)  # sample 1's, kept past the write below
        us, vs = [], []
        for i in range(n):
            us.append(u)
            vs.append(v)
            # mean(g~_i) = mean(g_i) - k v mean(out_i);  mean(g~_i out_i) = mean(g_i out_i) - k v mean(out_i^2)
            u = u + (g_mean[i] - k * v * out_mean[i]) / scale[i] - k * u
            v = v + g_out[i] - k * v * out_sq[i]
        with torch.no_grad():
            ctx.u.copy_(u)
            ctx.v.copy_(v)
        grad_x = (g - k * torch.stack(vs).unsqueeze(2) * out) / scale.unsqueeze(2) - k * torch.stack(us).unsqueeze(2)
        return grad_x.view(grad_out.shape), None, None, None, None, None


class OnlineNorm(_RunningStatsNorm):
    """``online``: Online Normalization (Chiley et al., NeurIPS 2019), as the official ``OnlineNorm2d``.

    Running statistics in training, done so that the gradient stays unbiased. Per channel, samples taken in
    batch order (i = 1..N), with per-sample statistics over positions mu_xi, var_xi:

        y_i = gamma * (x_i - mu) / sqrt(var + eps) + beta      mu, var: the streaming estimates before sample i
        delta = mu_xi - mu
        var <- alpha_fwd * var + (1 - alpha_fwd) * var_xi + alpha_fwd * (1 - alpha_fwd) * delta^2
        mu  <- mu + (1 - alpha_fwd) * delta
        backward: the control process of :class:`_OnlineNormalise` (buffers u, v)
        then the error-compensation mechanism ``ecm``:
          ``ls`` layer scaling: y_i <- y_i / sqrt(mean(y_i^2) + ls_eps), the mean over the channels of each of
                 ``num_groups`` groups and every position (a per-sample operation, in training and inference)
          ``ac`` activation clamping: y <- clip(y, -clamp_val, clamp_val);  ``none``: nothing
    Eval:  y = ecm(gamma * (x - mu) / sqrt(var + eps) + beta).

    mu and var are kept in ``running_mean`` and ``running_var`` (the official ``m`` and ``var``), so the
    population statistics can be recomputed as for BN. ``momentum`` is accepted for drop-in use and not used:
    alpha_fwd plays its part, per sample (per batch of N it weighs the old estimate by about alpha_fwd^N).
    Defaults are the authors' as they run them (their ImageNet and Fashion-MNIST experiments):
    alpha_fwd = 0.999, alpha_bkw = 0.99, eps = 1e-5, ``ecm="ls"`` with ls_eps = 1e-5 over all channels.
    Not in the original study.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = None, affine: bool = True,
                 alpha_fwd: float = 0.999, alpha_bkw: float = 0.99, ecm: str = "ls", ls_eps: float = 1e-5,
                 clamp_val: float = 5.0, num_groups: int = 1):
        super().__init__(num_features, eps, momentum, affine)
        if not (0 < alpha_fwd < 1 and 0 < alpha_bkw < 1):
            raise ValueError(f"OnlineNorm: alpha_fwd and alpha_bkw must lie in (0, 1), got {alpha_fwd}, {alpha_bkw}")
        if ecm not in ("ls", "ac", "none"):
            raise ValueError(f"OnlineNorm: ecm must be 'ls', 'ac' or 'none', got {ecm!r}")
        if num_groups < 1 or num_features % num_groups:
            raise ValueError(f"OnlineNorm: num_groups={num_groups} must divide num_features={num_features}")
        self.alpha_fwd, self.alpha_bkw, self.ecm = alpha_fwd, alpha_bkw, ecm
        self.ls_eps, self.clamp_val, self.num_groups = ls_eps, clamp_val, num_groups
        # the control variables of the backward pass (the official u and v)
        self.register_buffer("u", torch.zeros(num_features))
        self.register_buffer("v", torch.zeros(num_features))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, ecm={self.ecm}"
                + (f", num_groups={self.num_groups}" if self.num_groups != 1 else ""))

    def _compensate(self, y: Tensor) -> Tensor:
        if self.ecm == "ls":
            n = y.shape[0]
            groups = y.reshape(n, self.num_groups, -1)
            # y / sqrt(mean(y^2) + ls_eps) over each group of channels and every position, per sample
            return (groups * torch.rsqrt((groups * groups).mean(2, keepdim=True) + self.ls_eps)).view(y.shape)
        if self.ecm == "ac":
            return y.clamp(-self.clamp_val, self.clamp_val)
        return y

    def _train_forward(self, x: Tensor) -> Tensor:
        gamma, beta = self._affine(x)
        self.num_batches_tracked.add_(1)
        a = self.alpha_fwd
        with torch.no_grad():
            var_x, mean_x = torch.var_mean(x.reshape(x.shape[0], x.shape[1], -1), dim=2, correction=0)
            # copies: the estimates before sample 1 are used after the buffers are overwritten below
            mean, var = self.running_mean.to(x.dtype, copy=True), self.running_var.to(x.dtype, copy=True)
            means, variances = [], []
            for i in range(x.shape[0]):  # the streaming estimates, sample by sample
                means.append(mean)
                variances.append(var)
                delta = mean_x[i] - mean
                var = a * var + (1 - a) * var_x[i] + a * (1 - a) * delta * delta
                mean = mean + (1 - a) * delta
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
            scale = torch.sqrt(torch.stack(variances) + self.eps)
        out = _OnlineNormalise.apply(x, torch.stack(means), scale, self.u, self.v, self.alpha_bkw)
        return self._compensate(out * _per_channel(gamma, x) + _per_channel(beta, x))

    def _eval_forward(self, x: Tensor, copy: bool = False) -> Tensor:
        return self._compensate(super()._eval_forward(x, copy))

    def _batch_normalise(self, x: Tensor) -> Tensor:
        return self._compensate(super()._batch_normalise(x))


def _producing_conv_weight(x: Tensor) -> Tensor | None:
    """The weight of the convolution whose output ``x`` is, found through the autograd graph (past elementwise
    steps such as an activation in between): what Cross-Iteration BN differentiates its statistics by. None when
    ``x`` does not come from a convolution with a trainable weight."""
    fn = x.grad_fn
    for _ in range(8):  # a conv, or a few elementwise steps after one
        if fn is None:
            return None
        if "Convolution" in type(fn).__name__:
            # the backward of convolution(input, weight, bias): its second input is the weight
            nxt = fn.next_functions[1][0] if len(fn.next_functions) > 1 else None
            return getattr(nxt, "variable", None)
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return None


class CrossIterationBatchNorm(_RunningStatsNorm):
    """``cbn``: Cross-Iteration Batch Normalization (Yao et al., CVPR 2021), as the official ``CBatchNorm2d``.

    The statistics pool the current batch with the last ``buffer_num`` iterations' batches, each compensated
    for the change of the preceding convolution's weight W since it was taken by a first-order Taylor step.
    Per channel c, with W_c the filter producing channel c and iteration t-tau's statistics recorded with
    their derivatives:

        mu_B = mean(x), nu_B = mean(x^2) (this batch, gradients flowing through both)
        mu_{t-tau}(W_t) = mu_{t-tau} + rho * <dmu_{t-tau}/dW_c, W_c,t - W_c,t-tau>     (likewise nu; no gradient)
        valid: nu - mu^2 >= 0;  mu = mean of the valid mu's;  sigma^2 = mean of the valid nu's - mu^2
        y = gamma * (x - mu) / (sqrt(sigma^2) + eps) + beta                 (eps outside the root, as the official)
    Before the buffer is in use (the first ``burnin`` steps with ``two_stage``) it is BN with the *unbiased* batch
    variance and eps outside the root, as the official code. The running statistics are updated with mu_B and the
    unbiased batch variance, and inference is y = gamma * (x - mu) / (sqrt(var) + eps) + beta.

    W is the weight of the convolution whose output the layer normalises, found through the autograd graph
    (the official passes it as a second argument). The derivatives dmu/dW and dnu/dW take two extra backward
    passes through that convolution per step while the buffer is in use, and autograd calls inside the forward
    pass keep this layer eager when a run is compiled. The authors' runs: ``buffer_num`` 3 and a burn-in of 8 of
    12 epochs, which the training loop scales to the run (the first 2/3 of its steps; :func:`run_options`).
    Not in the original study.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 buffer_num: int = 3, rho: float = 1.0, burnin: int = 0, two_stage: bool = True, weight_size: int = 0):
        super().__init__(num_features, eps, momentum, affine)
        if buffer_num < 0 or burnin < 0:
            raise ValueError(f"CrossIterationBatchNorm: buffer_num and burnin must be >= 0, got {buffer_num}, {burnin}")
        self.buffer_num, self.rho, self.burnin, self.two_stage = buffer_num, rho, burnin, two_stage
        # Ring buffers, most recent first: statistics, their derivatives by W (flattened per channel) and W itself.
        # Sized at the first buffered step from the convolution's filters (weight_size: values per filter).
        self.register_buffer("buffered", torch.tensor(0, dtype=torch.long))  # entries in use
        for name in ("pre_mu", "pre_meanx2"):
            self.register_buffer(name, torch.zeros(buffer_num, num_features))
        for name in ("pre_dmudw", "pre_dmeanx2dw", "pre_weight"):
            self.register_buffer(name, torch.zeros(buffer_num, num_features, weight_size))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", buffer_num={self.buffer_num}, rho={self.rho}, burnin={self.burnin}"

    def meet_conv(self, conv: nn.Module) -> None:
        """Size the derivative buffers to the filters of the convolution before it (bnlib.models calls this; a
        layer used alone sizes them at its first buffered step)."""
        c, size = self.num_features, conv.weight[0].numel()
        for name in ("pre_dmudw", "pre_dmeanx2dw", "pre_weight"):
            setattr(self, name, torch.zeros(self.buffer_num, c, size, dtype=self.pre_mu.dtype, device=self.pre_mu.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the filter size is known once the layer has met its convolution: take the saved buffers' shape
        for name in ("pre_dmudw", "pre_dmeanx2dw", "pre_weight"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(saved))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _buffer_in_use(self, t: int) -> int:
        """Previous iterations pooled at (1-based) step t: the official ``_update_buffer_num``."""
        if self.burnin == 0:
            return self.buffer_num
        if self.two_stage:
            return self.buffer_num if t > self.burnin else 0
        return int(self.buffer_num * min(t / self.burnin, 1.0))

    def _train_forward(self, x: Tensor) -> Tensor:
        gamma, beta = self._affine(x)
        self.num_batches_tracked.add_(1)
        k = self._buffer_in_use(int(self.num_batches_tracked))
        c = x.shape[1]
        rows = x.transpose(0, 1).reshape(c, -1)  # per channel: every value of the batch
        cur_mu, cur_meanx2 = rows.mean(1), (rows * rows).mean(1)
        cur_var = rows.var(1, correction=1)
        weight = _producing_conv_weight(x) if k > 0 else None
        if weight is not None:
            ones = torch.ones_like(cur_mu)
            dmudw = torch.autograd.grad(cur_mu, weight, ones, retain_graph=True)[0].reshape(c, -1)
            dmeanx2dw = torch.autograd.grad(cur_meanx2, weight, ones, retain_graph=True)[0].reshape(c, -1)
            w_now = weight.detach().reshape(c, -1).to(x.dtype)
            if self.pre_weight.shape[-1] != w_now.shape[-1]:  # first buffered step: size the buffers to the filters
                for name in ("pre_dmudw", "pre_dmeanx2dw", "pre_weight"):
                    setattr(self, name, torch.zeros(self.buffer_num, c, w_now.shape[-1], dtype=self.pre_mu.dtype, device=x.device))
            n = int(self.buffered)
            with torch.no_grad():
                # the earlier iterations' statistics, moved to today's weights by a Taylor step (no gradient)
                shift = w_now - self.pre_weight[:n].to(x.dtype)
                mu_prev = self.pre_mu[:n].to(x.dtype) + self.rho * (self.pre_dmudw[:n].to(x.dtype) * shift).sum(2)
                meanx2_prev = self.pre_meanx2[:n].to(x.dtype) + self.rho * (self.pre_dmeanx2dw[:n].to(x.dtype) * shift).sum(2)
            mu_all = torch.cat([cur_mu[None], mu_prev])
            meanx2_all = torch.cat([cur_meanx2[None], meanx2_prev])
            valid = (meanx2_all - mu_all * mu_all >= 0).to(x.dtype)  # an iteration whose compensated variance < 0 is left out
            count = valid.sum(0)
            mu = (mu_all * valid).sum(0) / count
            var = (meanx2_all * valid).sum(0) / count - mu * mu
            with torch.no_grad():
                kept = min(n, k - 1)  # the official keeps the current entry and the k - 1 most recent before it
                for name, new in (("pre_mu", cur_mu), ("pre_meanx2", cur_meanx2), ("pre_dmudw", dmudw),
                                  ("pre_dmeanx2dw", dmeanx2dw), ("pre_weight", w_now)):
                    buf = getattr(self, name)
                    buf[1: kept + 1] = buf[:kept].clone()
                    buf[0] = new.detach().to(buf.dtype)
                self.buffered.fill_(kept + 1)
        else:
            mu, var = cur_mu, cur_var
        with torch.no_grad():
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(cur_mu.detach().to(self.running_mean.dtype), factor)
            self.running_var.lerp_(cur_var.detach().to(self.running_var.dtype), factor)
        # y = gamma * (x - mu) / (sqrt(var) + eps) + beta
        scale = gamma / (torch.sqrt(var) + self.eps)
        return x * _per_channel(scale, x) + _per_channel(beta - mu * scale, x)

    def _eval_forward(self, x: Tensor, copy: bool = False) -> Tensor:
        gamma, beta = self._affine(x)
        scale = gamma / (torch.sqrt(self.running_var.to(x.dtype)) + self.eps)
        return x * _per_channel(scale, x) + _per_channel(beta - self.running_mean.to(x.dtype) * scale, x)

    def _batch_normalise(self, x: Tensor) -> Tensor:
        gamma, beta = self._affine(x)
        var, mean = torch.var_mean(x, dim=_reduce_dims(x), correction=1)
        scale = gamma / (torch.sqrt(var) + self.eps)
        return x * _per_channel(scale, x) + _per_channel(beta - mean * scale, x)


class _MovingAverageNormalise(torch.autograd.Function):
    """MABN's core: y = gamma * r * x / s + beta with a moving-average normaliser s, a renorm factor r
    and a moving-average backward (the official ``BatchNormFunction``, megvii-model/MABN).

    Forward:   z = x / s ;  y = gamma * r * z + beta               s, r (per channel) given, no gradient
    Backward:  g = r * gamma * dL/dy ;  psi_B = mean(g * z)          (the extra batch statistic of BN's backward)
               psi = SMA of psi_B over the ring buffer (this batch included; psi_B while use_batch)
               dL/dx = (g - z * psi) / s ;  dL/dgamma = sum(dL/dy * r z) ;  dL/dbeta = sum(dL/dy)
    With r = 1, s = sqrt(mean(x^2) + eps) of this batch and psi = psi_B this is the exact gradient of
    gamma * x / sqrt(mean(x^2) + eps) + beta; the moving averages replace both batch statistics.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, s, r, psi_buffer, slot, use_batch):
        ctx.save_for_backward(x, gamma, s, r)
        # kept outside save_for_backward: backward writes into the buffer, which must not trip version checks
        ctx.psi_buffer, ctx.slot, ctx.use_batch = psi_buffer, slot, use_batch
        # gamma * r * x / s + beta as one fused kernel: eval-mode BN with mean 0, variance (s / r)^2 and eps 0
        scale = s / r
        return F.batch_norm(x, torch.zeros_like(s), scale * scale, gamma, beta, False, 0.0, 0.0)

    @staticmethod
    def backward(ctx, grad_y):
        x, gamma, s, r = ctx.saved_tensors
        dims = _reduce_dims(x)
        m = x.numel() // x.shape[1]
        grad_gamma = (grad_y * x).sum(dims) * (r / s)  # sum(dL/dy * r z)
        grad_beta = grad_y.sum(dims)
        psi_b = gamma * grad_gamma / m  # mean(g * z) = gamma * mean(dL/dy * r z)
        with torch.no_grad():
            ctx.psi_buffer.index_copy_(0, ctx.slot.view(1), psi_b.detach().to(ctx.psi_buffer.dtype).view(1, -1))
            psi_sma = ctx.psi_buffer.mean(0).to(x.dtype)
        psi = torch.where(ctx.use_batch, psi_b, psi_sma)
        # (g - z psi) / s  =  dL/dy * gamma r / s  -  x * psi / s^2
        grad_x = torch.addcmul(grad_y * _per_channel(gamma * r / s, x), x, _per_channel(-psi / (s * s), x))
        return grad_x, grad_gamma, grad_beta, None, None, None, None, None


class MovingAverageBatchNorm(_RunningStatsNorm):
    """``mabn``: Moving Average Batch Normalization (Yan et al., ICLR 2020), as the official ``MABN2d``.

    BN's training depends on four batch statistics: mu_B and var_B forward, and g_B = mean(dL/dz) and
    psi_B = mean(z * dL/dz) backward. MABN removes the mean statistics by centring the weights of the
    preceding convolution (:class:`WeightCentredConv2d`, so mu is approximately 0) and normalises with
    the second moment chi only, replacing the remaining batch statistics by simple moving averages (SMA)
    over the last ``buffer_size`` batches. With t = 1, 2, ... the training step:

        chi_B = mean(x^2)                  chi = SMA of chi_B over the ring buffer (this batch included),
                                           or chi_B while t <= buffer_size or t < warmup_steps
        s = sqrt(chi + eps) ;  z = x / s
        r = clip(s / sqrt(running_var + eps), 1/renorm_rmax, renorm_rmax)   once t > max(renorm_after, warmup_steps),
                                           else 1 (the EMA renormalisation; running_var before this step)
        y = gamma * r * z + beta ;  running_var <- (1 - momentum) running_var + momentum chi
        backward: dL/dx = (g - z * psi) / s,  g = r gamma dL/dy,  psi = SMA of psi_B = mean(g * z)
    Inference: y = gamma * x / sqrt(running_var + eps) + beta, where running_var is the exponential moving
    average of chi -- the second moment, not the variance; running_mean stays zero.

    Defaults are the official code's: momentum 0.02 (its 0.98 on the old value), warmup_steps 100,
    EMA renormalisation after 1,000 steps clipped to [1/5, 5]. ``buffer_size`` covers the paper's
    normalisation batch of 32: max(1, 32 // batch size), which the training loop sets from its batch size
    (see :func:`run_options`); 16 (batch 2) when the layer is built alone. The simpler behaviour of
    earlier bnlib versions is ``momentum=0.1, buffer_size=16, renorm_after=None``. ``rmax`` optionally clips
    the SMA normaliser against the batch one, s = sqrt(chi_B + eps) / clip(sqrt(chi_B + eps) / s, 1/rmax, rmax)
    (not in the paper; off by default). The original study did not include MABN.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.02,
        affine: bool = True,
        buffer_size: int = 16,
        warmup_steps: int = 100,
        renorm_after: int | None = 1000,
        renorm_rmax: float = 5.0,
        rmax: float | None = None,
    ):
        super().__init__(num_features, eps, momentum, affine)
        if buffer_size < 1:
            raise ValueError(f"MovingAverageBatchNorm: buffer_size must be >= 1, got {buffer_size}")
        if rmax is not None and rmax < 1:
            raise ValueError(f"MovingAverageBatchNorm: rmax must be >= 1, got {rmax}")
        if renorm_rmax < 1:
            raise ValueError(f"MovingAverageBatchNorm: renorm_rmax must be >= 1, got {renorm_rmax}")
        if renorm_after is not None and renorm_after < 0:
            raise ValueError(f"MovingAverageBatchNorm: renorm_after must be >= 0 or None, got {renorm_after}")
        self.buffer_size, self.warmup_steps, self.rmax = buffer_size, warmup_steps, rmax
        self.renorm_after, self.renorm_rmax = renorm_after, renorm_rmax
        # Ring buffers of the last `buffer_size` batches' chi_B (forward) and psi_B (backward).
        self.register_buffer("chi_buffer", torch.zeros(buffer_size, num_features))
        self.register_buffer("psi_buffer", torch.zeros(buffer_size, num_features))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", buffer_size={self.buffer_size}, warmup_steps={self.warmup_steps}, "
                f"renorm_after={self.renorm_after}, renorm_rmax={self.renorm_rmax}, rmax={self.rmax}")

    def _train_forward(self, x: Tensor) -> Tensor:
        gamma, beta = self._affine(x)
        t = self.num_batches_tracked + 1  # the official code's 1-based iteration counter
        slot = t % self.buffer_size
        use_batch = (t <= self.buffer_size) | (t < self.warmup_steps)
        with torch.no_grad():
            chi_b = (x * x).mean(dim=_reduce_dims(x))
            self.chi_buffer.index_copy_(0, slot.view(1), chi_b.to(self.chi_buffer.dtype).view(1, -1))
            chi = torch.where(use_batch, chi_b, self.chi_buffer.mean(0).to(x.dtype))
            s = torch.sqrt(chi + self.eps)
            if self.rmax is not None:
                s_b = torch.sqrt(chi_b + self.eps)
                s = s_b / (s_b / s).clamp(1.0 / self.rmax, self.rmax)
            if self.renorm_after is None:
                r = torch.ones_like(s)
            else:
                r = (s / torch.sqrt(self.running_var.to(x.dtype) + self.eps)).clamp(1.0 / self.renorm_rmax, self.renorm_rmax)
                r = torch.where(t > max(self.renorm_after, self.warmup_steps), r, torch.ones_like(r))
        y = _MovingAverageNormalise.apply(x, gamma, beta, s, r, self.psi_buffer, slot, use_batch)
        self._update_second_moment(chi)
        return y

    @torch.no_grad()
    def _update_second_moment(self, chi: Tensor) -> None:
        # the EMA tracks the statistic this step normalised with (the official code's), not chi_B
        self.running_var.lerp_(chi.to(self.running_var.dtype), self._next_momentum())

    def _eval_forward(self, x: Tensor) -> Tensor:
        # gamma * x / sqrt(chi + eps) + beta, with chi the running second moment
        var = self.running_var.to(x.dtype)
        return F.batch_norm(x, torch.zeros_like(var), var, self.weight, self.bias, False, 0.0, self.eps)

    def _batch_normalise(self, x: Tensor) -> Tensor:
        gamma, beta = self._affine(x)
        chi_b = (x * x).mean(dim=_reduce_dims(x))
        return x * _per_channel(gamma * torch.rsqrt(chi_b + self.eps), x) + _per_channel(beta, x)

    @torch.no_grad()
    def _set_population_statistics(self, mean: Tensor, var: Tensor, count: int) -> None:
        # chi = E[x^2] = var + mean^2 (population, biased)
        self.running_var.copy_(var + mean * mean)

    @torch.no_grad()
    def _set_running(self, mean: Tensor, var: Tensor) -> None:
        self.running_var.copy_(var + mean * mean)


def _safe_rsqrt(var: Tensor) -> Tensor:
    """1 / sqrt(var), and 0 where var == 0 (the original study's eps = 0 on a constant channel, where
    x - mu is 0 too: the normalised value is taken as 0 instead of 0 / 0). The inner ``where`` keeps the
    gradient finite."""
    positive = var > 0
    return torch.where(positive, torch.rsqrt(torch.where(positive, var, torch.ones_like(var))), torch.zeros_like(var))


class _OriginalStudyNorm(_RunningStatsNorm):
    """Shared by the original study's own variants (enhuiz/batchnorms, ``bns.py``): eps = 0, and in training
    the running statistics are updated with this batch *before* they are used."""

    def __init__(self, num_features: int, eps: float = 0.0, momentum: float | None = 0.1, affine: bool = True):
        super().__init__(num_features, eps, momentum, affine)

    def _update_first(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean_b, var_b = _batch_stats(x, 1e-30)  # biased; a tiny eps so a constant channel gives var 0, not 0 * inf
        self._update_running(mean_b, var_b.clamp_min(0), x.numel() // x.shape[1])
        return mean_b, var_b

    def _running_normalise(self, x: Tensor) -> Tensor:
        # gamma (x - mu) / sqrt(var + eps) + beta with the (already updated) running statistics, no gradient through them
        gamma, beta = self._affine(x)
        with torch.no_grad():
            inv = _safe_rsqrt(self.running_var.to(x.dtype) + self.eps)
            shift = -self.running_mean.to(x.dtype) * inv
        return x * _per_channel(gamma * inv, x) + _per_channel(gamma * shift + beta, x)

    def _eval_forward(self, x: Tensor, copy: bool = False) -> Tensor:
        return self._running_normalise(x)

    def _standardise(self, x: Tensor) -> Tensor:
        """(x - mu_B) / sqrt(var_B + eps) with gradient through both, safe at var_B = 0 (torch's fused
        kernel refuses eps = 0 in training)."""
        dims = _reduce_dims(x)
        centred = x - x.mean(dim=dims, keepdim=True)
        return centred * _safe_rsqrt((centred * centred).mean(dim=dims, keepdim=True) + self.eps)

    def _batch_normalise(self, x: Tensor) -> Tensor:
        gamma, beta = self._affine(x)
        return self._standardise(x) * _per_channel(gamma, x) + _per_channel(beta, x)


class OriginalRunningStatsBatchNorm(_OriginalStudyNorm):
    """``bnrs_orig``: BNRS exactly as the original study ran it.

    Training:  mu, var <- updated with mu_B, var_B' first (as in BN);
               y = gamma * (x - mu) / sqrt(var + eps) + beta with the *updated* mu, var (no gradient through them),
               so the current batch enters its own normalisation. eps = 0.
    Eval:      the same formula. A channel whose running variance is exactly 0 outputs beta (see ``_safe_rsqrt``);
    a constant channel in one batch leaves the running variance positive ((1 - momentum) var), so no NaN.
    """

    def _train_forward(self, x: Tensor) -> Tensor:
        self._update_first(x)
        return self._running_normalise(x)


class OriginalBatchRenorm(_OriginalStudyNorm):
    """``brn_orig`` / ``brnc_orig``: Batch Renormalization exactly as the original study ran it.

    Training:  mu, var <- updated with mu_B, var_B' first;  sigma_B = sqrt(var_B + eps), sigma = sqrt(var + eps)
               x_hat = (x - mu_B) / sigma_B                        (gradient through mu_B and sigma_B)
               r = sg(sigma_B / sigma),  d = sg((mu_B - mu) / sigma)   with the *updated* mu, var;
               clipped to [1/rmax, rmax] and [-dmax, dmax] for ``brnc_orig`` (rmax 3, dmax 5)
               y = gamma * (r * x_hat + d) + beta.                  eps = 0.
    Eval:      y = gamma * (x - mu) / sigma + beta.
    A channel of one exact value in the whole batch (sigma_B = 0, typically a dead unit's zeros) gets
    x_hat = 0 and zero gradient through it instead of 0 / 0, so y = gamma * d + beta: the value the formula
    tends to (the original wrote NaN there). A channel constant up to rounding has a tiny variance of
    rounding noise, which eps = 0 normalises to unit scale, as the original did.
    """

    def __init__(self, num_features: int, eps: float = 0.0, momentum: float | None = 0.1, affine: bool = True,
                 rmax: float | None = None, dmax: float | None = None):
        super().__init__(num_features, eps, momentum, affine)
        self.rmax, self.dmax = rmax, dmax

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", rmax={self.rmax}, dmax={self.dmax}" if self.rmax or self.dmax else "")

    def _train_forward(self, x: Tensor) -> Tensor:
        gamma, beta = self._affine(x)
        mean_b, var_b = self._update_first(x)
        x_hat = self._standardise(x)
        with torch.no_grad():
            inv_sigma = _safe_rsqrt(self.running_var.to(x.dtype) + self.eps)
            r = torch.sqrt(var_b.clamp_min(0) + self.eps) * inv_sigma
            d = (mean_b - self.running_mean.to(x.dtype)) * inv_sigma
            if self.rmax is not None:
                r = r.clamp(1.0 / self.rmax, self.rmax)
            if self.dmax is not None:
                d = d.clamp(-self.dmax, self.dmax)
        return x_hat * _per_channel(gamma * r, x) + _per_channel(gamma * d + beta, x)


class WeightCentredConv2d(nn.Conv2d):
    """The convolution MABN pairs with: each output filter's weights are centred before use,

        W_hat[o] = W[o] - mean(W[o])     (mean over input channels and kernel positions),

    so that the layer's outputs have (approximately) zero mean and MABN can drop the mean statistics.
    The stored parameter is the uncentred W, so initial weights are identical to an ``nn.Conv2d``'s.
    """

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


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


class GhostBatchNorm(_RunningStatsNorm):
    """``gbn``: Ghost Batch Normalization (Hoffer et al. 2017): BN over virtual batches.

    Training: the batch is cut along N into virtual batches of ``virtual_batch`` samples (the last may be
    smaller); each is normalised with its own statistics, y_k = gamma (x_k - mu_Bk) / sqrt(var_Bk + eps) + beta,
    and the running statistics are updated from *every* virtual batch in turn (unlike ``bnwos``, which keeps
    only the first device's). Eval: as BN. With ``virtual_batch`` >= the batch size it is BN exactly.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 virtual_batch: int = 16):
        super().__init__(num_features, eps, momentum, affine)
        if virtual_batch < 2:
            raise ValueError(f"GhostBatchNorm: virtual_batch must be >= 2, got {virtual_batch}")
        self.virtual_batch = virtual_batch

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch={self.virtual_batch}"

    def _train_forward(self, x: Tensor) -> Tensor:
        parts = [F.batch_norm(chunk, self.running_mean, self.running_var, self.weight, self.bias, True,
                              self._next_momentum(), self.eps)
                 for chunk in torch.split(x, self.virtual_batch, dim=0)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]


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

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = None, affine: bool = True,
                 num_groups: int = 8):
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


class WeightStandardisedConv2d(nn.Conv2d):
    """The convolution GroupNorm + Weight Standardisation pairs with (Qiao et al. 2019): each output filter's
    weights are standardised before use,

        W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)     (over input channels and kernel positions),

    with eps 1e-5. The stored parameter is the raw W, so initial weights are identical to an ``nn.Conv2d``'s.
    """

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), unbiased=False, keepdim=True)
        return self._conv_forward(x, (self.weight - mean) / torch.sqrt(var + 1e-5), self.bias)


class _GroupNorm(nn.GroupNorm):
    """``gn``: GroupNorm with PyTorch's BN-style constructor (num_features first; eps, affine)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = None, affine: bool = True, num_groups: int = 8):
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


def _copy_affine(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        for name in ("weight", "bias"):
            d, s = getattr(dst, name, None), getattr(src, name, None)
            if d is not None and s is not None:
                d.copy_(s)


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
    return {"warmup_steps": warmup, "dmax_ramp_steps": max(round(steps * 5 / 8) - warmup, 0),
            "rmax_ramp_steps": max(steps - warmup, 0)}


REGISTRY: dict[str, Method] = {
    m.id: m
    for m in [
        Method("bn", BatchNorm, {}, True),
        Method("bnrs", RunningStatsBatchNorm, {}, True),
        Method("brn", BatchRenorm, {}, True),
        Method("brnc", BatchRenorm, {"rmax": 3.0, "dmax": 5.0}, True),
        Method("brnc_warmup", BatchRenorm, {"rmax": 3.0, "dmax": 5.0}, True,
               _brn_schedule),
        Method("bnrs_orig", OriginalRunningStatsBatchNorm, {}, True),
        Method("brn_orig", OriginalBatchRenorm, {}, True),
        Method("brnc_orig", OriginalBatchRenorm, {"rmax": 3.0, "dmax": 5.0}, True),
        Method("bnwos", UnsyncedBatchNorm, {}, True, split_option="devices"),
        # the mechanism ablation: BN's forward pass, no gradient through one or both batch statistics
        Method("bn_detached", DetachedBatchNorm, {}, True),
        Method("bn_detached_mean", DetachedBatchNorm, {"detach_var": False}, True),
        Method("bn_detached_var", DetachedBatchNorm, {"detach_mean": False}, True),
        # the running statistics' momentum swept (bnrs and bnrs_orig are 0.1): the digits are hundredths
        *(Method(f"{base}_m{round(100 * momentum):03d}", factory, {"momentum": momentum}, True, pinned=True)
          for base, factory in (("bnrs", RunningStatsBatchNorm), ("bnrs_orig", OriginalRunningStatsBatchNorm))
          for momentum in MOMENTUM_SWEEP),
        Method("online", OnlineNorm, {}, True),
        Method("cbn", CrossIterationBatchNorm, {}, True, _cbn_run_options, compiles=False),
        Method("gbn", GhostBatchNorm, {}, True),
        Method("mabn", MovingAverageBatchNorm, {}, True, _mabn_run_options,
               conv=WeightCentredConv2d),
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
        raise ValueError(f"method {method!r} is defined by {', '.join(f'{k}={spec.defaults[k]}' for k in changed)}; "
                         f"to train another value, give the option to the base method")
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
