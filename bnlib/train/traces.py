"""Traces of every norm layer during training (``Config.trace_every``): what a layer normalises with, against
what its batch holds, and the sizes that drive it.

Every ``trace_every`` steps, each method's training step runs with forward hooks on its norm layers (eagerly,
when the run is compiled: hooks would recompile the graph), and after the optimiser step the trace records, per
norm layer in network order and per seed:

``log_r_median``, ``log_r_p90``, ``d_median``, ``d_p90``
    the gap between the batch statistics and the statistics the layer normalised with, summarised over the
    layer's channels (median and 90th percentile of |log r| and of |d|). With y the layer's training output and
    y_hat = (y - beta) / gamma its normalised value (the affine step undone), per channel
    r = std(y_hat) and d = mean(y_hat) over the batch and positions. A layer that normalises a channel of the
    whole batch with one (mu_used, sigma_used) has y_hat = (x - mu_used) / sigma_used, so these are exactly
    r = sigma_B / sigma_used and d = (mu_B - mu_used) / sigma_used: for BN r = sigma_B / sqrt(sigma_B^2 + eps)
    (1 up to eps) and d = 0; for BNRS the distance of the batch from the running statistics; for BRNC the
    clipped r and d it applied. For layers that normalise per sample (GroupNorm, Online Norm's stream, Batchless
    Norm's learned statistics) they say how the batch sits in what the layer did. Left out (None) for the
    norm-activation layers (FRN, EvoNorm), whose output is not affine in their input.
``conv_weight_norm``, ``conv_grad_norm``
    the Frobenius norm of the weight of the convolution before the layer, and of its gradient in this step
    (``weight_norm`` after the optimiser step).
``gamma_norm``
    the norm of the layer's gamma (None without affine parameters).
``input_rms``
    the root mean square of the layer's input over the batch, its channels and positions.
``input_mean_p90``
    the 90th percentile over the layer's channels of |mean| / std of its input (per channel, over the batch and
    positions): how far the pre-normalisation activations drift off zero relative to their spread (Ioffe and
    Szegedy's bias drift), apart from their scale, which ``input_rms`` mixes in.
``effective_step``
    the size of this step's optimiser update of the convolution's weight relative to the weight before it,
    |W_after - W_before| / |W_before| (before any intervention on the filters, :mod:`bnlib.train.interventions`).
    Traced cells recorded before these two metrics existed lack them.

The record (:class:`bnlib.record.MethodRecord`, key ``traces``) holds ``{"step": [...], "layers": [{metric:
[...]}, ...]}``, one value per traced step, each rounded to 5 significant digits (a trace is a picture of the
run, not a number to reproduce bit for bit).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .. import norms
from ..norms.base import _Norm

GAP_METRICS = ("log_r_median", "log_r_p90", "d_median", "d_p90")
METRICS = (
    *GAP_METRICS,
    "conv_weight_norm",
    "gamma_norm",
    "input_rms",
    "conv_grad_norm",
    "input_mean_p90",
    "effective_step",
)
_DIGITS = 5
_TINY = 1e-12  # floor of |gamma| and of r: a dead channel (r = 0) or gamma = 0 stays finite


def _rounded(values: Tensor) -> list:
    return [float(f"{v:.{_DIGITS}g}") for v in values.tolist()]


def norm_layers(model: nn.Module) -> list[tuple[nn.Module | None, nn.Module]]:
    """(the convolution before it, the norm layer) for every norm layer of a :class:`bnlib.train.models.Net` or
    :class:`bnlib.train.stacked.StackedNet`, in the order the forward pass meets them."""
    pairs, conv = [], None
    for layer in model.features:
        if isinstance(layer, nn.Conv2d):
            conv = layer
        elif isinstance(layer, (_Norm, nn.GroupNorm)):
            pairs.append((conv, layer))
    return pairs


class Tracer:
    """The traces of one method's model (``seeds`` networks side by side when stacked), kept per seed."""

    def __init__(self, model: nn.Module, method: str, seeds: int):
        self.pairs, self.seeds = norm_layers(model), seeds
        self.affine_output = not norms.spec(method).includes_activation
        self.traces = [{"step": [], "layers": [{k: [] for k in METRICS} for _ in self.pairs]} for _ in range(seeds)]
        self._pending: dict[int, dict] = {}
        self._before: list[Tensor | None] = []
        self._updates: list[Tensor | None] = []

    @torch.no_grad()
    def snapshot(self) -> None:
        """Keep the convolutions' weights before the optimiser step (for ``effective_step``)."""
        self._before = [conv.weight.detach().clone() if conv is not None else None for conv, _ in self.pairs]

    @torch.no_grad()
    def measure_update(self) -> None:
        """Per norm layer and seed, the optimiser step's update of the convolution relative to its weight before."""
        self._updates = [
            None
            if before is None
            else self._per_seed((conv.weight.detach() - before).double()).norm(dim=1)
            / self._per_seed(before.double()).norm(dim=1).clamp_min(_TINY)
            for (conv, _), before in zip(self.pairs, self._before)
        ]

    @contextlib.contextmanager
    def capture(self):
        """Within the block, every norm layer's training forward is summarised (one step's worth)."""
        hooks = [norm.register_forward_hook(self._hook(i)) for i, (_, norm) in enumerate(self.pairs)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def _per_seed(self, values: Tensor) -> Tensor:
        """(S*C, ...) -> (S, C * ...): seed s's channels are the s-th block (bnlib.train.stacked)."""
        return values.reshape(self.seeds, -1)

    def _hook(self, index: int):
        @torch.no_grad()
        def hook(module, args, output):
            x, y = args[0].detach().double(), output.detach().double()
            c = x.shape[1]
            x_rows = x.transpose(0, 1).reshape(c, -1)  # per channel: every value of the batch
            summary = {"input_rms": self._per_seed(x_rows.square().mean(1)).mean(1).sqrt()}
            std_x, mean_x = torch.std_mean(x_rows, dim=1, correction=0)
            drift = self._per_seed(mean_x.abs() / std_x.clamp_min(_TINY))
            summary["input_mean_p90"] = torch.quantile(drift, 0.9, dim=1)
            if self.affine_output:
                gamma = (
                    module.weight.detach().double()
                    if getattr(module, "weight", None) is not None
                    else torch.ones(c, dtype=torch.float64)
                )
                beta = (
                    module.bias.detach().double()
                    if getattr(module, "bias", None) is not None
                    else torch.zeros(c, dtype=torch.float64)
                )
                gamma = torch.where(gamma.abs() < _TINY, torch.full_like(gamma, _TINY), gamma)
                y_hat = (y.transpose(0, 1).reshape(c, -1) - beta[:, None]) / gamma[:, None]
                std, mean = torch.std_mean(y_hat, dim=1, correction=0)
                log_r = self._per_seed(std.clamp_min(_TINY).log().abs())
                d = self._per_seed(mean.abs())
                summary.update(
                    log_r_median=log_r.median(1).values,
                    log_r_p90=torch.quantile(log_r, 0.9, dim=1),
                    d_median=d.median(1).values,
                    d_p90=torch.quantile(d, 0.9, dim=1),
                )
            self._pending[index] = summary

        return hook

    @torch.no_grad()
    def record(self, step: int, live: list[bool]) -> None:
        """Append this step's traces (after the optimiser step: weights updated, gradients of this step) to the
        seeds in ``live``."""
        if len(self._pending) != len(self.pairs):
            raise RuntimeError(
                f"traced step {step}: {len(self._pending)} of {len(self.pairs)} norm layers ran; "
                "record() must follow a training step inside capture()"
            )
        for i, (conv, norm) in enumerate(self.pairs):
            values = dict(self._pending[i])
            if conv is not None:
                values["conv_weight_norm"] = self._per_seed(conv.weight.detach().double()).norm(dim=1)
                grad = conv.weight.grad
                values["conv_grad_norm"] = (
                    self._per_seed(grad.detach().double()).norm(dim=1) if grad is not None else None
                )
            if self._updates and self._updates[i] is not None:
                values["effective_step"] = self._updates[i]
            if getattr(norm, "weight", None) is not None:
                values["gamma_norm"] = self._per_seed(norm.weight.detach().double()).norm(dim=1)
            for s in range(self.seeds):
                if live[s]:
                    layer = self.traces[s]["layers"][i]
                    for k in METRICS:
                        v = values.get(k)
                        layer[k].append(None if v is None else _rounded(v[s : s + 1])[0])
        for s in range(self.seeds):
            if live[s]:
                self.traces[s]["step"].append(step)
        self._pending.clear()
        self._before, self._updates = [], []
