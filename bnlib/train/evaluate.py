"""Test evaluations of a trained model: with its inference statistics, after recomputing population statistics
(precise BN), and with batch statistics at test time; for one network or every seed of a stacked model.

Every path goes through one loop over test batches (:func:`_scores`), which returns the number of correct
predictions and the summed cross-entropy (in float64) on the device, so an evaluation syncs with the host once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import norms
from . import stacked as stacked_mod

# Test samples per forward pass. On a CPU a batch whose activations fit the caches wins (28x28, one thread:
# 1.1 ms per sample at 128, 2.2 ms at 512 or more; `bnlib bench step` measures it); a GPU wants large batches.
EVAL_BATCH = {"cpu": 128, "cuda": 2048}
# Largest batch whose stacked pass beats the seeds' own networks on a CPU: grouped convolutions pay at small
# batches, where every kernel is overhead, and lose at large ones (three BN seeds, 360 8x8 digits, one thread:
# stacked 2.0x at batch 2, 1.25x at 16, 1.1x at 32, 1.0x at 64, 0.75x at 128). On a GPU always stacked.
STACKED_EVAL_MAX_BATCH = {"cpu": 32}


def autocast(device: torch.device, precision: str):
    """The precision context of every forward pass: bf16 autocast, or nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def eval_batch(device: torch.device) -> int:
    return EVAL_BATCH.get(device.type, 1024)


def _scores(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, size: int, precision: str, seeds: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct predictions, summed cross-entropy) on (x, y) in batches of ``size``, in the model's current mode.
    With ``seeds`` (a stacked model) per seed: the test images enter every seed's input channels, logits come
    out as [n, seeds, classes]."""
    shape = () if seeds is None else (seeds,)
    correct = torch.zeros(shape, dtype=torch.long, device=x.device)
    loss = torch.zeros(shape, dtype=torch.float64, device=x.device)
    with torch.inference_mode(), autocast(x.device, precision):
        for i in range(0, len(x), size):
            xb, yb = x[i : i + size], y[i : i + size]
            if seeds is None:
                logits = model(xb).float()
                loss += F.cross_entropy(logits, yb, reduction="sum").double()
                correct += (logits.argmax(1) == yb).sum()
            else:
                logits = model(xb.repeat(1, seeds, 1, 1)).float()  # [n, S, classes]
                labels = yb.unsqueeze(1).expand(-1, seeds)
                loss += F.cross_entropy(logits.permute(0, 2, 1), labels, reduction="none").sum(0).double()
                correct += (logits.argmax(2) == labels).sum(0)
    return correct, loss


def _in_eval_mode(model: torch.nn.Module, score):
    """``score()`` with the model in eval mode; its mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return score()
    finally:
        model.train(was_training)


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the whole set, in eval mode, without autograd bookkeeping."""
    correct, loss = _in_eval_mode(model, lambda: _scores(model, x, y, eval_batch(x.device), precision))
    return int(correct) / len(x), float(loss) / len(x)  # one host sync per evaluation


def evaluate_batch_statistics(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, precision: str = "fp32"
) -> tuple[float, float]:
    """:func:`evaluate` with batch statistics at test time: the test set in batches of the training batch size
    (a smaller last one), each normalised with its own statistics; no state changes."""

    def score():
        with norms.batch_statistics(model):
            return _scores(model, x, y, batch_size, precision)

    correct, loss = _in_eval_mode(model, score)
    return int(correct) / len(x), float(loss) / len(x)


class _SavedBuffers:
    """Within the block the model's buffers may change (recomputed statistics); afterwards they are restored,
    so training goes on from exactly where it was."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.saved = {name: buf.clone() for name, buf in self.model.named_buffers()}

    def __exit__(self, *exc):
        with torch.no_grad():
            for name, buf in self.model.named_buffers():
                buf.copy_(self.saved[name])


def evaluate_recomputed(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    precision: str = "fp32",
    forward: torch.nn.Module | None = None,
) -> tuple[float, float]:
    """:func:`evaluate` after recomputing population statistics from ``batches`` (precise BN); the model's own
    buffers are restored afterwards. ``forward``: what evaluates (the model compiled; default the model)."""
    with _SavedBuffers(model):
        with autocast(x.device, precision):
            norms.recompute_statistics(model, batches)
        return evaluate(model if forward is None else forward, x, y, precision)


def _per_seed(correct: torch.Tensor, loss: torch.Tensor, n: int) -> list[tuple[float, float]]:
    return [(c / n, v / n) for c, v in zip(correct.tolist(), loss.tolist())]  # one host sync


def evaluate_stacked(
    model: stacked_mod.StackedNet,
    x: torch.Tensor,
    y: torch.Tensor,
    precision: str = "fp32",
    recompute_batches: list[torch.Tensor] | None = None,
    batch_stats_size: int | None = None,
) -> list[tuple[float, float]]:
    """Per seed, what :func:`evaluate` gives for its own network; with ``recompute_batches`` (every seed's
    batches side by side along the channels, as in training) :func:`evaluate_recomputed`'s, with
    ``batch_stats_size`` :func:`evaluate_batch_statistics`'s. Passes of at most ``STACKED_EVAL_MAX_BATCH``
    samples run stacked (one pass for every seed), larger ones through each seed's own network. The model's
    state is left as it was."""
    stacked_max = STACKED_EVAL_MAX_BATCH.get(x.device.type, 1 << 30)

    def score():
        if recompute_batches is not None:
            with autocast(x.device, precision):
                norms.recompute_statistics(model, recompute_batches)
        if batch_stats_size is not None:
            if batch_stats_size > stacked_max:
                return [
                    evaluate_batch_statistics(net, x, y, batch_stats_size, precision) for net in model.seed_networks()
                ]
            with norms.batch_statistics(model):
                return _per_seed(*_scores(model, x, y, batch_stats_size, precision, model.seeds), len(x))
        size = eval_batch(x.device)
        if min(size, len(x)) > stacked_max:
            return [evaluate(net, x, y, precision) for net in model.seed_networks()]
        return _per_seed(*_scores(model, x, y, size, precision, model.seeds), len(x))

    if recompute_batches is None:
        return _in_eval_mode(model, score)
    with _SavedBuffers(model):
        return _in_eval_mode(model, score)
