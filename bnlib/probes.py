"""Measurements of what a layer computes, for the book's Methods page; nothing here trains.

:func:`backward_projection` measures the second factor of the mechanism's 2x2. BN's input gradient, per channel,
is :math:`(g - \\bar g - \\hat x\\,\\overline{g \\hat x})/\\sigma_B`: the incoming gradient projected off the span of
1 and :math:`\\hat x`, so its sum and its correlation with :math:`\\hat x` are 0; BRN's is :math:`r` times BN's. A
layer whose statistics carry no gradient (``bn_detached``), or do not depend on the batch at all (``bnrs``, where
the gradient is exact), passes :math:`g/\\sigma` on unprojected.
"""

from __future__ import annotations

import torch

from . import norms


def backward_projection(
    method: str, channels: int = 4, batch: int = 16, size: int = 5, warmup: int = 20, seed: int = 0
) -> dict[str, float]:
    """In float64, on a random input (mean 1, scale 3) and an upstream gradient with a mean of its own: the largest,
    over channels, of the input gradient's sum relative to its size (``|sum dx| / (||dx|| sqrt(m))``, m values per
    channel) and of its correlation with the batch's normalised input. ``warmup`` training batches first move the
    running statistics (and BRN's r and d) away from their initial values, as in training."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    layer = norms.make(method, channels).double().train()
    for _ in range(warmup):
        layer(3 * draw(batch, channels, size, size) + 1)
    x = (3 * draw(batch, channels, size, size) + 1).requires_grad_()
    upstream = draw(batch, channels, size, size) + 0.5
    layer(x).backward(upstream)
    dx = x.grad.transpose(0, 1).reshape(channels, -1)
    centred = x.detach().transpose(0, 1).reshape(channels, -1)
    x_hat = (centred - centred.mean(1, keepdim=True)) / centred.std(1, unbiased=False, keepdim=True)
    m = dx.shape[1]
    norm = dx.norm(dim=1)
    relative_sum = (dx.sum(1).abs() / (norm * m**0.5)).max().item()
    correlation = ((dx * x_hat).sum(1).abs() / (norm * x_hat.norm(dim=1))).max().item()
    return {"method": method, "gradient sum": relative_sum, "correlation with x_hat": correlation}
