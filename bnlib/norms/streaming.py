"""Methods that carry statistics across steps: Online Normalization, Cross-Iteration BN and Moving Average BN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import _per_channel, _reduce_dims, _RunningStatsNorm


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

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = None,
        affine: bool = True,
        alpha_fwd: float = 0.999,
        alpha_bkw: float = 0.99,
        ecm: str = "ls",
        ls_eps: float = 1e-5,
        clamp_val: float = 5.0,
        num_groups: int = 1,
    ):
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
        return (
            super().extra_repr()
            + f", alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, ecm={self.ecm}"
            + (f", num_groups={self.num_groups}" if self.num_groups != 1 else "")
        )

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

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        buffer_num: int = 3,
        rho: float = 1.0,
        burnin: int = 0,
        two_stage: bool = True,
        weight_size: int = 0,
    ):
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
        """Size the derivative buffers to the filters of the convolution before it (bnlib.train.models calls this; a
        layer used alone sizes them at its first buffered step)."""
        c, size = self.num_features, conv.weight[0].numel()
        for name in ("pre_dmudw", "pre_dmeanx2dw", "pre_weight"):
            setattr(
                self, name, torch.zeros(self.buffer_num, c, size, dtype=self.pre_mu.dtype, device=self.pre_mu.device)
            )

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
                    setattr(
                        self,
                        name,
                        torch.zeros(self.buffer_num, c, w_now.shape[-1], dtype=self.pre_mu.dtype, device=x.device),
                    )
            n = int(self.buffered)
            with torch.no_grad():
                # the earlier iterations' statistics, moved to today's weights by a Taylor step (no gradient)
                shift = w_now - self.pre_weight[:n].to(x.dtype)
                mu_prev = self.pre_mu[:n].to(x.dtype) + self.rho * (self.pre_dmudw[:n].to(x.dtype) * shift).sum(2)
                meanx2_prev = self.pre_meanx2[:n].to(x.dtype) + self.rho * (
                    self.pre_dmeanx2dw[:n].to(x.dtype) * shift
                ).sum(2)
            mu_all = torch.cat([cur_mu[None], mu_prev])
            meanx2_all = torch.cat([cur_meanx2[None], meanx2_prev])
            valid = (meanx2_all - mu_all * mu_all >= 0).to(
                x.dtype
            )  # an iteration whose compensated variance < 0 is left out
            count = valid.sum(0)
            mu = (mu_all * valid).sum(0) / count
            var = (meanx2_all * valid).sum(0) / count - mu * mu
            with torch.no_grad():
                kept = min(n, k - 1)  # the official keeps the current entry and the k - 1 most recent before it
                for name, new in (
                    ("pre_mu", cur_mu),
                    ("pre_meanx2", cur_meanx2),
                    ("pre_dmudw", dmudw),
                    ("pre_dmeanx2dw", dmeanx2dw),
                    ("pre_weight", w_now),
                ):
                    buf = getattr(self, name)
                    buf[1 : kept + 1] = buf[:kept].clone()
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
        return (
            super().extra_repr() + f", buffer_size={self.buffer_size}, warmup_steps={self.warmup_steps}, "
            f"renorm_after={self.renorm_after}, renorm_rmax={self.renorm_rmax}, rmax={self.rmax}"
        )

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
                r = (s / torch.sqrt(self.running_var.to(x.dtype) + self.eps)).clamp(
                    1.0 / self.renorm_rmax, self.renorm_rmax
                )
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
