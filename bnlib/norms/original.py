"""The original study's own code of BNRS, BRN and BRNC, transcribed (its eps = 0 and its update order)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import _batch_stats, _per_channel, _reduce_dims, _RunningStatsNorm


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
        # gamma (x - mu) / sqrt(var + eps) + beta with the (already updated) running statistics, no gradient through
        # them
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

    def __init__(
        self,
        num_features: int,
        eps: float = 0.0,
        momentum: float | None = 0.1,
        affine: bool = True,
        rmax: float | None = None,
        dmax: float | None = None,
    ):
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
