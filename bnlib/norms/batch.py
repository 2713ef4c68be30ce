"""Methods that normalise with the current batch's statistics in training: BN, BN with running statistics (BNRS),
Batch Renormalization with and without clipping (BRN, BRNC), BN without cross-device sync (BNWoS), the
mechanism ablation's detached BN, and Ghost BN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import _batch_stats, _per_channel, _reduce_dims, _RunningStatsNorm


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
        clip = (
            f", rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}" if self.rmax or self.dmax else ""
        )
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

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True, devices: int = 2
    ):
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

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        detach_mean: bool = True,
        detach_var: bool = True,
    ):
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


class GhostBatchNorm(_RunningStatsNorm):
    """``gbn``: Ghost Batch Normalization (Hoffer et al. 2017): BN over virtual batches.

    Training: the batch is cut along N into virtual batches of ``virtual_batch`` samples (the last may be
    smaller); each is normalised with its own statistics, y_k = gamma (x_k - mu_Bk) / sqrt(var_Bk + eps) + beta,
    and the running statistics are updated from *every* virtual batch in turn (unlike ``bnwos``, which keeps
    only the first device's). Eval: as BN. With ``virtual_batch`` >= the batch size it is BN exactly.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        virtual_batch: int = 16,
    ):
        super().__init__(num_features, eps, momentum, affine)
        if virtual_batch < 2:
            raise ValueError(f"GhostBatchNorm: virtual_batch must be >= 2, got {virtual_batch}")
        self.virtual_batch = virtual_batch

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch={self.virtual_batch}"

    def _train_forward(self, x: Tensor) -> Tensor:
        parts = [
            F.batch_norm(
                chunk,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                True,
                self._next_momentum(),
                self.eps,
            )
            for chunk in torch.split(x, self.virtual_batch, dim=0)
        ]
        return torch.cat(parts) if len(parts) > 1 else parts[0]
