"""The layers against references: torch's BatchNorm, the papers' equations, float64, gradients included."""

import io
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from bnlib import norms
from bnlib.norms import streaming

TIGHT = dict(rtol=1e-10, atol=1e-10)
SHAPES = [(6, 5), (4, 5, 3, 3), (3, 5, 2, 2, 2)]


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2 + 0.5).requires_grad_(True)


def _randomise_affine(*layers, seed=1):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(w)
            layer.bias.copy_(b)


def _run(layer, x, upstream):
    """Output and the gradients of <y, upstream> with respect to input, weight and bias."""
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    params = [x] + [p for p in (layer.weight, layer.bias) if p is not None]
    grads = torch.autograd.grad((y * upstream).sum(), params)
    return y, grads


def _torch_bn(shape):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](shape[1])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_bn_equals_torch_batchnorm(shape, momentum):
    ours, ref = norms.make("bn", 5, momentum=momentum), _torch_bn(shape)
    ref.momentum = momentum
    _randomise_affine(ours, ref)
    for step in range(4):
        x, up = _inputs(shape, seed=step), _inputs(shape, seed=10 + step).detach()
        (y1, g1), (y2, g2) = _run(ours, x, up), _run(ref, x, up)
        assert_close(y1, y2, **TIGHT)
        for a, b in zip(g1, g2):
            assert_close(a, b, **TIGHT)
    assert_close(ours.running_mean, ref.running_mean, **TIGHT)
    assert_close(ours.running_var, ref.running_var, **TIGHT)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    ours.eval(), ref.eval()
    x, up = _inputs(shape, seed=99), _inputs(shape, seed=98).detach()
    (y1, g1), (y2, g2) = _run(ours, x, up), _run(ref, x, up)
    assert_close(y1, y2, **TIGHT)
    for a, b in zip(g1, g2):
        assert_close(a, b, **TIGHT)


def test_bn_without_affine_equals_torch():
    ours, ref = norms.make("bn", 5, affine=False), nn.BatchNorm2d(5, affine=False)
    x = _inputs((4, 5, 3, 3))
    assert_close(ours(x), ref(x), **TIGHT)


def _with_running_stats(*layers, seed=3):
    g = torch.Generator().manual_seed(seed)
    mean, var = torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.5
    for layer in layers:
        layer._set_running(mean, var)
    return mean, var


@pytest.mark.parametrize("shape", SHAPES)
def test_brn_with_unit_limits_equals_bn(shape):
    bn, brn = norms.make("bn", 5), norms.make("brnc", 5, rmax=1.0, dmax=0.0)
    _randomise_affine(bn, brn)
    _with_running_stats(bn, brn)
    for step in range(3):
        x, up = _inputs(shape, seed=step), _inputs(shape, seed=7 + step).detach()
        (y1, g1), (y2, g2) = _run(bn, x, up), _run(brn, x, up)
        assert_close(y1, y2, **TIGHT)
        for a, b in zip(g1, g2):
            assert_close(a, b, **TIGHT)
    assert_close(bn.running_var, brn.running_var, **TIGHT)


@pytest.mark.parametrize("shape", SHAPES)
def test_brn_forward_equals_bnrs_but_gradients_differ(shape):
    brn, bnrs = norms.make("brn", 5), norms.make("bnrs", 5)
    _randomise_affine(brn, bnrs)
    mean, var = _with_running_stats(brn, bnrs)
    x, up = _inputs(shape), _inputs(shape, seed=5).detach()
    (y1, g1), (y2, g2) = _run(brn, x, up), _run(bnrs, x, up)
    assert_close(y1, y2, **TIGHT)
    # the paper's equation written out: gamma (x - mu)/sigma + beta, with the pre-update statistics
    expected = brn.weight.detach().view(1, 5, *[1] * (len(shape) - 2)) * (
        x - mean.view(1, 5, *[1] * (len(shape) - 2))
    ) / torch.sqrt(var + 1e-5).view(1, 5, *[1] * (len(shape) - 2)) + brn.bias.detach().view(
        1, 5, *[1] * (len(shape) - 2)
    )
    assert_close(y1, expected, **TIGHT)
    assert not torch.allclose(g1[0], g2[0], rtol=1e-3, atol=1e-6)
    assert_close(g1[1], g2[1], **TIGHT)  # the weight and bias gradients agree (same forward)
    assert_close(brn.running_mean, bnrs.running_mean, **TIGHT)


def test_brn_gradient_matches_paper_equation_by_autograd():
    """BRN's gradient is that of gamma*((x-mu_B)/sigma_B * r + d) + beta with r, d constants."""
    layer = norms.make("brnc", 5, rmax=1.5, dmax=0.2)
    _randomise_affine(layer)
    _with_running_stats(layer)
    x, up = _inputs((8, 5, 2, 2)), _inputs((8, 5, 2, 2), seed=4).detach()
    mu, var = layer.running_mean.clone(), layer.running_var.clone()
    y, grads = _run(layer, x, up)

    xr = x.detach().clone().requires_grad_(True)
    dims = [0, 2, 3]
    mu_b = xr.mean(dims)
    sigma_b = torch.sqrt(((xr - mu_b.view(1, 5, 1, 1)) ** 2).mean(dims) + 1e-5)
    sigma = torch.sqrt(var + 1e-5)
    r = (sigma_b / sigma).detach().clamp(1 / 1.5, 1.5)
    d = ((mu_b - mu) / sigma).detach().clamp(-0.2, 0.2)

    def view(t):
        return t.view(1, 5, 1, 1)

    w, b = layer.weight.detach().clone().requires_grad_(True), layer.bias.detach().clone().requires_grad_(True)
    y_ref = view(w) * ((xr - view(mu_b)) / view(sigma_b) * view(r) + view(d)) + view(b)
    ref_grads = torch.autograd.grad((y_ref * up).sum(), [xr, w, b])
    assert_close(y, y_ref, **TIGHT)
    for a, b_ in zip(grads, ref_grads):
        assert_close(a, b_, **TIGHT)
    assert (r == 1.5).any() or (r == 1 / 1.5).any() or (d.abs() == 0.2).any(), "test should exercise clipping"


def test_eval_outputs_agree_given_equal_running_statistics():
    layers = [norms.make(m, 5) for m in ("bn", "bnrs", "brn", "brnc", "bnwos")]
    _randomise_affine(*layers)
    _with_running_stats(*layers)
    x = _inputs((4, 5, 3, 3))
    outputs = [layer.eval()(x) for layer in layers]
    for y in outputs[1:]:
        assert_close(y, outputs[0], **TIGHT)


def test_brnc_clipping_bounds_hold():
    layer = norms.make("brnc", 5, rmax=1.2, dmax=0.1)
    _with_running_stats(layer)
    mu = layer.running_mean.clone()
    x = _inputs((16, 5, 2, 2)) * 10 + 30  # far from the running statistics: r and d must clip
    y = layer(x)
    dims = [0, 2, 3]
    x_hat = (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + 1e-5)
    # recover r and d per channel from the output: y = x_hat * r + d (gamma = 1, beta = 0)
    flat_y, flat_x = y.detach().transpose(0, 1).reshape(5, -1), x_hat.detach().transpose(0, 1).reshape(5, -1)
    r = (flat_y[:, 0] - flat_y[:, 1]) / (flat_x[:, 0] - flat_x[:, 1])
    d = flat_y[:, 0] - flat_x[:, 0] * r
    assert torch.all(r <= 1.2 + 1e-9) and torch.all(r >= 1 / 1.2 - 1e-9)
    assert torch.all(d.abs() <= 0.1 + 1e-9)
    assert_close(d.abs(), torch.full((5,), 0.1), **TIGHT)  # d clipped to its limit
    assert not torch.equal(mu, layer.running_mean)


def test_brnc_warmup_schedule():
    layer = norms.make("brnc", 5, rmax=3.0, dmax=5.0, warmup_steps=100, rmax_ramp_steps=400, dmax_ramp_steps=200)
    expected = {
        0: (1.0, 0.0),
        99: (1.0, 0.0),
        100: (1.0, 0.0),
        200: (1.5, 2.5),
        300: (2.0, 5.0),
        500: (3.0, 5.0),
        10_000: (3.0, 5.0),
    }
    for step, (rmax, dmax) in expected.items():
        layer.num_batches_tracked.fill_(step)
        assert layer.current_limits() == pytest.approx((rmax, dmax))
    default = norms.make("brnc", 5)
    assert default.current_limits() == (3.0, 5.0)  # the original study: full limits from step 0
    # during warm-up the layer is exactly BN
    warm, bn = norms.make("brnc", 5, warmup_steps=10), norms.make("bn", 5)
    _with_running_stats(warm, bn)
    x = _inputs((4, 5, 3, 3))
    assert_close(warm(x), bn(x), **TIGHT)
    assert int(warm.num_batches_tracked) == 1
    warm.eval()(x)
    assert int(warm.num_batches_tracked) == 1, "eval must not advance the step counter"


@pytest.mark.parametrize("devices,n", [(2, 8), (2, 5), (3, 9), (4, 4)])
def test_bnwos_equals_bn_per_chunk(devices, n):
    shape = (n, 5, 3, 3)
    layer = norms.make("bnwos", 5, devices=devices)
    _randomise_affine(layer)
    x, up = _inputs(shape), _inputs(shape, seed=2).detach()
    y, grads = _run(layer, x, up)
    bn0 = norms.make("bn", 5)
    _randomise_affine(bn0)
    outs, ups = [], torch.chunk(up, devices)
    for k, chunk in enumerate(torch.chunk(x.detach(), devices)):
        bn = bn0 if k == 0 else norms.make("bn", 5)
        _randomise_affine(bn)
        outs.append(bn(chunk))
    assert_close(y, torch.cat(outs), **TIGHT)
    assert_close(layer.running_mean, bn0.running_mean, **TIGHT)
    assert_close(layer.running_var, bn0.running_var, **TIGHT)
    # gradients: per-chunk BN gradients concatenated
    xs = [c.clone().requires_grad_(True) for c in torch.chunk(x.detach(), devices)]
    ref = torch.nn.functional
    total = sum(
        (ref.batch_norm(c, None, None, layer.weight, layer.bias, True, 0.0, 1e-5) * u).sum() for c, u in zip(xs, ups)
    )
    gx = torch.autograd.grad(total, xs)
    assert_close(grads[0], torch.cat(gx), **TIGHT)


def test_bnwos_with_one_device_is_bn():
    a, b = norms.make("bnwos", 5, devices=1), norms.make("bn", 5)
    x = _inputs((6, 5, 2, 2))
    assert_close(a(x), b(x), **TIGHT)


def test_mabn_function_gradcheck():
    """With this batch's statistics (buffer of 1) the modelled backward is the exact gradient."""
    x = _inputs((4, 3, 2, 2))
    gamma = (torch.rand(3) + 0.5).requires_grad_(True)
    beta = torch.randn(3).requires_grad_(True)
    psi = torch.zeros(1, 3)
    r = torch.tensor([0.5, 1.0, 2.0])  # the EMA renorm factor: a constant, so the gradient stays exact

    def f(x, gamma, beta):
        # s follows x as in the layer: computed without gradient; the Function supplies its gradient
        s = torch.sqrt((x.detach() ** 2).mean([0, 2, 3]) + 1e-5)
        return streaming._MovingAverageNormalise.apply(x, gamma, beta, s, r, psi, torch.tensor(0), torch.tensor(True))

    assert torch.autograd.gradcheck(f, (x, gamma, beta), eps=1e-6, atol=1e-7)
    # and, as an independent reference, it equals autograd through gamma x / sqrt(mean(x^2) + eps) + beta
    up = _inputs((4, 3, 2, 2), seed=3).detach()
    g1 = torch.autograd.grad((f(x, gamma, beta) * up).sum(), (x, gamma, beta))

    def v(t):
        return t.view(1, 3, 1, 1)

    ref = v(gamma * r) * x / torch.sqrt((x**2).mean([0, 2, 3], keepdim=True) + 1e-5) + v(beta)
    g2 = torch.autograd.grad((ref * up).sum(), (x, gamma, beta))
    for a, b in zip(g1, g2):
        assert_close(a, b, **TIGHT)


def test_mabn_buffer_of_one_forward_by_hand():
    layer = norms.make("mabn", 5, buffer_size=1, warmup_steps=0)
    _randomise_affine(layer)
    for seed in range(3):
        x = _inputs((4, 5, 3, 3), seed=seed)
        y = layer(x)
        chi = (x.detach() ** 2).mean(dim=(0, 2, 3))
        expected = layer.weight.view(1, 5, 1, 1) * x / torch.sqrt(chi + 1e-5).view(1, 5, 1, 1) + layer.bias.view(
            1, 5, 1, 1
        )
        assert_close(y, expected, **TIGHT)


class _OfficialMABN:
    """A float64 transcription of the official MABN2d / BatchNormFunction (megvii-model/MABN), with its
    hard-coded 1000 of the renorm start as a parameter; returns output and gradients per step."""

    def __init__(self, channels, buffer_size, warmup, renorm_after=1000, momentum=0.98, eps=1e-5):
        self.buffer_x2, self.buffer_gz = torch.zeros(buffer_size, channels), torch.zeros(buffer_size, channels)
        self.running_var = torch.ones(1, channels, 1, 1)
        self.iters, self.buffer_size, self.warmup, self.renorm_after = 0, buffer_size, warmup, renorm_after
        self.momentum, self.eps = momentum, eps

    def step(self, x, weight, bias, grad_output):
        self.iters += 1
        it, c = self.iters, x.shape[1]
        x2 = (x * x).mean(dim=3).mean(dim=2).mean(dim=0)
        self.buffer_x2[it % self.buffer_size] = x2
        early = it <= self.buffer_size or it < self.warmup
        var = (x2 if early else self.buffer_x2.mean(dim=0)).view(1, c, 1, 1)
        z = x / (var + self.eps).sqrt()
        r = (var + self.eps).sqrt() / (self.running_var + self.eps).sqrt()
        r = r.clamp(1, 1) if it <= max(self.renorm_after, self.warmup) else r.clamp(1 / 5, 5)
        self.running_var = self.momentum * self.running_var + (1 - self.momentum) * var
        y = weight.view(1, c, 1, 1) * r * z + bias.view(1, c, 1, 1)
        g = grad_output * weight.view(1, c, 1, 1) * r
        gz = (g * z).mean(dim=3).mean(dim=2).mean(dim=0)
        self.buffer_gz[it % self.buffer_size] = gz
        mean_gz = (gz if early else self.buffer_gz.mean(dim=0)).view(1, c, 1, 1)
        gx = (g - z * mean_gz) / torch.sqrt(var + self.eps)
        return y, (gx, (grad_output * r * z).sum(dim=(0, 2, 3)), grad_output.sum(dim=(0, 2, 3)))


@pytest.mark.parametrize("buffer_size,warmup", [(3, 2), (3, 5), (1, 0)])
def test_mabn_equals_official_transcription(buffer_size, warmup):
    """Forward, backward, running buffers and eval mode against the official code's maths, through the
    warm-up, the moving averages and the EMA renormalisation (clipped at 5 on a batch scaled by 100)."""
    layer = norms.make("mabn", 5, buffer_size=buffer_size, warmup_steps=warmup, renorm_after=6)
    _randomise_affine(layer)
    ref = _OfficialMABN(5, buffer_size, warmup, renorm_after=6)
    for t in range(12):
        x, up = _inputs((4, 5, 2, 2), seed=t), _inputs((4, 5, 2, 2), seed=20 + t).detach()
        if t == 9:
            x = (x * 100).detach().requires_grad_(True)
        y, grads = _run(layer, x, up)
        y_ref, grads_ref = ref.step(x.detach(), layer.weight.detach(), layer.bias.detach(), up)
        assert_close(y, y_ref, **TIGHT)
        for a, b in zip(grads, grads_ref):
            assert_close(a, b, **TIGHT)
        assert_close(layer.running_var, ref.running_var.flatten(), **TIGHT)
    layer.eval()
    x = _inputs((4, 5, 2, 2), seed=99)
    expected = layer.weight.view(1, 5, 1, 1) * x / torch.sqrt(ref.running_var + 1e-5) + layer.bias.view(1, 5, 1, 1)
    assert_close(layer(x), expected, **TIGHT)
    assert int(layer.num_batches_tracked) == 12


def test_mabn_run_options_follow_the_paper():
    """Buffer max(1, 32 // batch); the official defaults otherwise."""
    assert norms.run_options("mabn", steps=100, batch_size=2) == {"buffer_size": 16}
    assert norms.run_options("mabn", steps=100, batch_size=16) == {"buffer_size": 2}
    assert norms.run_options("mabn", steps=100, batch_size=128) == {"buffer_size": 1}
    layer = norms.make("mabn", 5)
    assert (layer.momentum, layer.warmup_steps, layer.renorm_after, layer.renorm_rmax) == (0.02, 100, 1000, 5.0)


def test_mabn_clipping_bounds_normaliser():
    layer = norms.make("mabn", 5, buffer_size=4, warmup_steps=0, rmax=1.5, affine=False)
    for s in range(4):  # the official code normalises with the batch until the buffer is full
        layer(_inputs((4, 5, 2, 2), seed=s))
    x = _inputs((4, 5, 2, 2), seed=9) * 100
    y = layer(x)
    ratio = (y / (x / torch.sqrt((x**2).mean(dim=(0, 2, 3), keepdim=True) + 1e-5))).detach()
    assert torch.all(ratio <= 1.5 + 1e-9) and torch.all(ratio >= 1 / 1.5 - 1e-9)
    assert_close(ratio.amax(), torch.tensor(1.5), **TIGHT)


class _OriginalStudyBN:
    """A float64 transcription of the original study's BN / BNRS / BRN / BRNC (enhuiz/batchnorms, bns.py):
    eps = 0, running statistics updated with the batch before they are used."""

    def __init__(self, kind, channels, momentum=0.1):
        self.kind, self.momentum = kind, momentum
        self.running_mean, self.running_var = torch.zeros(channels), torch.ones(channels)

    def __call__(self, x, weight, bias, training=True):
        xt = x.transpose(0, 1)  # (c, b, ...)
        dims = list(range(1, xt.dim()))

        def view(v):
            return v.view(-1, *([1] * (xt.dim() - 1)))

        if training:
            with torch.no_grad():

                def ema(a, b):
                    return (1 - self.momentum) * a + self.momentum * b

                self.running_mean = ema(self.running_mean, xt.mean(dim=dims))
                self.running_var = ema(self.running_var, xt.var(dim=dims, unbiased=True))
        mu, var = view(self.running_mean), view(self.running_var)
        if not training or self.kind == "bnrs":
            out = (xt - mu) / var.sqrt()
        else:
            mu_b, var_b = xt.mean(dim=dims, keepdim=True), xt.var(dim=dims, keepdim=True, unbiased=False)
            x_hat = (xt - mu_b) / var_b.sqrt()
            with torch.no_grad():
                r, d = var_b.sqrt() / var.sqrt(), (mu_b - mu) / var.sqrt()
            if self.kind == "brnc":
                r, d = r.clamp(1 / 3, 3), d.clamp(-5, 5)
            out = r * x_hat + d
        return (view(weight) * out + view(bias)).transpose(0, 1)


@pytest.mark.parametrize("method", ["bnrs_orig", "brn_orig", "brnc_orig"])
@pytest.mark.parametrize("shape", SHAPES)
def test_original_variants_equal_the_original_code(method, shape):
    """Forward, gradients, running statistics and eval mode against the original study's maths; the
    batch scaled by 30 at step 2 makes BRNC's clipping bite."""
    layer = norms.make(method, 5)
    _randomise_affine(layer)
    ref = _OriginalStudyBN(method.split("_")[0], 5)
    for step in range(4):
        x, up = _inputs(shape, seed=step), _inputs(shape, seed=10 + step).detach()
        if step == 2:
            x = (x * 30).detach().requires_grad_(True)
        y, grads = _run(layer, x, up)
        xr = x.detach().clone().requires_grad_(True)
        w, b = layer.weight.detach().clone().requires_grad_(True), layer.bias.detach().clone().requires_grad_(True)
        y_ref = ref(xr, w, b)
        grads_ref = torch.autograd.grad((y_ref * up).sum(), (xr, w, b))
        assert_close(y, y_ref, **TIGHT)
        for a, g in zip(grads, grads_ref):
            assert_close(a, g, **TIGHT)
        assert_close(layer.running_mean, ref.running_mean, **TIGHT)
        assert_close(layer.running_var, ref.running_var, **TIGHT)
    layer.eval()
    x = _inputs(shape, seed=99)
    assert_close(layer(x), ref(x, layer.weight, layer.bias, training=False), **TIGHT)
    if method == "brnc_orig":
        assert (layer.rmax, layer.dmax) == (3.0, 5.0)


@pytest.mark.parametrize("method", ["bnrs_orig", "brn_orig", "brnc_orig"])
def test_original_variants_survive_a_constant_channel(method):
    """eps = 0 and a channel of zeros in the whole batch (a dead unit): finite output and gradients (the
    original divided 0 by 0 in BRN); BRN's output there is gamma * d + beta, the value its formula tends to.
    A channel constant at another value is finite too (its variance is rounding noise, normalised up as the
    original did)."""
    layer = norms.make(method, 5)
    _randomise_affine(layer)
    x = _inputs((4, 5, 3, 3)).detach().clone()
    x[:, 2], x[:, 3] = 0.0, 0.7
    x.requires_grad_(True)
    y = layer(x)
    (y * _inputs((4, 5, 3, 3), seed=5).detach()).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
    if method != "bnrs_orig":
        with torch.no_grad():
            mu, sigma = layer.running_mean[2], layer.running_var[2].sqrt()
            d = ((0.0 - mu) / sigma).clamp(-5, 5) if method == "brnc_orig" else (0.0 - mu) / sigma
            assert_close(y[:, 2], (layer.weight[2] * d + layer.bias[2]).expand_as(y[:, 2]), **TIGHT)


def test_brnc_warmup_schedule_scales_to_the_run():
    """The paper's 5k / 25k / 40k of 40k steps, scaled: rmax = 1 and dmax = 0 for 1/8 of the run, dmax 5 at
    5/8, rmax 3 at the end."""
    options = norms.run_options("brnc_warmup", steps=80, batch_size=16)
    assert options == {"warmup_steps": 10, "dmax_ramp_steps": 40, "rmax_ramp_steps": 70}
    layer = norms.make("brnc_warmup", 5, **options)
    limits = {}
    for step in range(81):
        limits[step] = layer.current_limits()
        layer.num_batches_tracked.add_(1)
    assert limits[0] == limits[10] == (1.0, 0.0)
    assert limits[50] == (pytest.approx(1 + 2 * 40 / 70), 5.0) and limits[80] == (3.0, 5.0)
    assert norms.run_options("brnc", steps=80, batch_size=16) == {}


def test_bln_initialise_statistics_matches_each_layers_inputs():
    """After the pass, every BLN layer's mean and std are those of its own inputs (given the initialised
    layers below it), as the authors' init_bln_singlePass; the model's mode and other layers are untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3),
        norms.make("bln", 5),
        nn.GELU(),
        nn.Conv2d(5, 5, 3),
        nn.GELU(),
        norms.make("bln", 5),
        nn.Flatten(),
        nn.LazyLinear(2),
    ).train()
    batches = [torch.randn(8, 3, 7, 7) * 3 + 1 for _ in range(3)]
    conv_before = model[0].weight.detach().clone()
    assert norms.initialise_statistics(model, batches) == 2
    assert model.training and torch.equal(model[0].weight, conv_before)
    seen = {1: [], 5: []}
    hooks = [model[i].register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0])) for i in seen]
    with torch.no_grad():
        model.eval()
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    for i, inputs in seen.items():
        values = torch.cat(inputs).transpose(0, 1).flatten(1)
        assert_close(model[i].mean.detach(), values.mean(1), **TIGHT)
        assert_close(model[i].log_std.detach().exp(), values.std(1, unbiased=False), **TIGHT)
    assert norms.initialise_statistics(nn.Sequential(nn.Linear(2, 2), norms.make("bn", 2)), batches) == 0


@pytest.mark.parametrize("n,virtual", [(8, 4), (10, 4), (6, 16)])
def test_ghost_bn_equals_torch_bn_per_virtual_batch(n, virtual):
    """Each virtual batch normalised by torch's BN with its own statistics, the running statistics updated
    by every virtual batch in turn; gradients included. A virtual batch >= the batch is plain BN."""
    ours, ref = norms.make("gbn", 5, virtual_batch=virtual), nn.BatchNorm2d(5)
    _randomise_affine(ours, ref)
    for step in range(3):
        x, up = _inputs((n, 5, 2, 2), seed=step), _inputs((n, 5, 2, 2), seed=10 + step).detach()
        y, grads = _run(ours, x, up)
        xr = x.detach().clone().requires_grad_(True)
        y_ref = torch.cat([ref(c) for c in torch.split(xr, virtual)])
        grads_ref = torch.autograd.grad((y_ref * up).sum(), (xr, ref.weight, ref.bias))
        assert_close(y, y_ref, **TIGHT)
        for a, b in zip(grads, grads_ref):
            assert_close(a, b, **TIGHT)
        assert_close(ours.running_mean, ref.running_mean, **TIGHT)
        assert_close(ours.running_var, ref.running_var, **TIGHT)
    ours.eval(), ref.eval()
    x = _inputs((n, 5, 2, 2), seed=50)
    assert_close(ours(x), ref(x), **TIGHT)


def test_frn_is_the_papers_equation_per_sample():
    layer = norms.make("frn", 5)
    _randomise_affine(layer)
    with torch.no_grad():
        layer.tau.copy_(torch.linspace(-0.5, 0.5, 5))
    x, up = _inputs((4, 5, 3, 3)), _inputs((4, 5, 3, 3), seed=7).detach()
    y, grads = _run(layer, x, up)
    xr = x.detach().clone().requires_grad_(True)
    w, b = layer.weight.detach().clone().requires_grad_(True), layer.bias.detach().clone().requires_grad_(True)
    nu2 = xr.pow(2).flatten(2).mean(-1)[:, :, None, None]  # mean over H, W of each sample and channel
    y_ref = torch.max(
        w[None, :, None, None] * xr / torch.sqrt(nu2 + 1e-6) + b[None, :, None, None], layer.tau[None, :, None, None]
    )
    assert_close(y, y_ref, **TIGHT)
    for a, g in zip(grads, torch.autograd.grad((y_ref * up).sum(), (xr, w, b))):
        assert_close(a, g, **TIGHT)
    assert_close(layer(x[:1]), y[:1], **TIGHT)  # batch independent


def test_evonorm_s0_is_the_papers_equation():
    layer = norms.make("evonorm", 8, num_groups=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(8, generator=g) + 0.5), layer.bias.copy_(torch.randn(8, generator=g))
        layer.v.copy_(torch.randn(8, generator=g))
    x = (torch.randn(3, 8, 2, 2, generator=g) * 2).requires_grad_(True)
    up = torch.randn(3, 8, 2, 2, generator=g)
    y = layer(x)
    gx = torch.autograd.grad((y * up).sum(), x)[0]
    xr = x.detach().clone().requires_grad_(True)
    out = torch.empty_like(xr)
    parts = []
    for n in range(3):
        for grp in range(4):
            ch = slice(2 * grp, 2 * grp + 2)  # 8 channels in 4 groups of 2
            std = torch.sqrt(xr[n, ch].var(unbiased=False) + 1e-5)
            v, w, b = layer.v[ch, None, None], layer.weight[ch, None, None], layer.bias[ch, None, None]
            parts.append((n, ch, xr[n, ch] * torch.sigmoid(v * xr[n, ch]) / std * w + b))
    out = torch.stack([torch.cat([p for (m, _, p) in parts if m == n]) for n in range(3)])
    assert_close(y, out, **TIGHT)
    assert_close(gx, torch.autograd.grad((out * up).sum(), xr)[0], **TIGHT)


def test_weight_standardised_conv_standardises_each_filter():
    torch.manual_seed(0)
    conv = norms.WeightStandardisedConv2d(3, 4, 3, padding=1, bias=False)
    w = conv.weight.detach()
    flat = w.flatten(1)
    standardised = (
        (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-5)
    ).view_as(w)
    x = torch.randn(2, 3, 5, 5)
    assert_close(conv(x), torch.nn.functional.conv2d(x, standardised, padding=1), **TIGHT)


def test_weight_centred_conv_centres_each_filter():
    torch.manual_seed(0)
    conv = norms.WeightCentredConv2d(3, 4, 3, padding=1, bias=False)
    plain = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    plain.weight.data.copy_(conv.weight - conv.weight.mean(dim=(1, 2, 3), keepdim=True))
    x = torch.randn(2, 3, 5, 5)
    assert_close(conv(x), plain(x), **TIGHT)
    assert_close(conv(torch.ones(1, 3, 5, 5))[..., 1:-1, 1:-1], torch.zeros(1, 4, 3, 3), **TIGHT)


def test_bln_auxiliary_loss_is_gaussian_nll():
    layer = norms.make("bln", 5)
    with torch.no_grad():
        layer.mean.copy_(torch.randn(5))
        layer.log_std.copy_(torch.randn(5) * 0.3)
    x = _inputs((4, 5, 3, 3))
    layer(x)
    mu, sigma = layer.mean.view(1, 5, 1, 1), torch.exp(layer.log_std).view(1, 5, 1, 1)
    nll = torch.log(sigma) + (x - mu) ** 2 / (2 * sigma**2) + 0.5 * math.log(2 * math.pi)
    assert_close(layer.aux_loss, nll.mean(), **TIGHT)
    ref = nn.functional.gaussian_nll_loss(mu.expand_as(x), x, (sigma**2).expand_as(x), full=True, eps=0)
    assert_close(layer.aux_loss, ref, **TIGHT)
    assert_close(norms.auxiliary_loss(nn.Sequential(layer)), layer.aux_loss, **TIGHT)


def test_bln_statistics_learn_only_through_the_auxiliary_loss():
    layer = norms.make("bln", 5)
    x = _inputs((4, 5, 3, 3))
    y = layer(x)
    task_grads = torch.autograd.grad(
        y.square().sum(), [layer.mean, layer.log_std, x], allow_unused=True, retain_graph=True
    )
    assert task_grads[0] is None and task_grads[1] is None
    aux_grads = torch.autograd.grad(layer.aux_loss, [layer.mean, layer.log_std, x], allow_unused=True)
    assert aux_grads[0].abs().sum() > 0 and aux_grads[1].abs().sum() > 0
    assert aux_grads[2] is None, "the auxiliary loss must not pull on the activations"
    # normalisation uses the learned statistics
    expected = (x - layer.mean.view(1, 5, 1, 1)) / torch.exp(layer.log_std).view(1, 5, 1, 1)
    assert_close(y, expected, **TIGHT)
    # works at batch size 1
    layer(_inputs((1, 5)))


@pytest.mark.parametrize("method", norms.METHODS)
def test_one_value_per_channel_raises_and_leaves_state_clean(method):
    layer = norms.make(method, 5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _inputs((1, 5))
    if method in ("gn", "gn_ws"):  # GroupNorm needs values per group, not a batch: one image works
        y = layer(_inputs((1, 5, 2, 2)))
        assert y.shape == (1, 5, 2, 2) and torch.isfinite(y).all()
        return
    if not norms.spec(method).batch_dependent:
        y = layer(x)  # batch independent: one sample is fine
        assert y.shape == x.shape and torch.isfinite(y).all()
        return
    with pytest.raises(ValueError, match=r"\(1, 5\)"):
        layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bnwos_batch_smaller_than_devices_raises():
    with pytest.raises(ValueError, match="chunk"):
        norms.make("bnwos", 5, devices=4)(_inputs((3, 5)))


@pytest.mark.parametrize(
    "method", ["bn", "bnrs", "brn", "brnc", "brnc_warmup", "bnrs_orig", "brn_orig", "brnc_orig", "bnwos", "mabn", "bln"]
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_statistics_finite(method, dtype):
    layer = norms.make(method, 5).float()
    x = (torch.randn(8, 5, 4, 4, dtype=torch.float32) * 400 + 300).to(dtype)  # squares overflow float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
    for name, buf in layer.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == torch.float32 and torch.isfinite(buf).all(), name


@pytest.mark.parametrize("method", norms.METHODS)
def test_state_dict_round_trip_mid_training(method):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3),
        norms.make(method, 5, **({"warmup_steps": 1, "buffer_size": 3} if method == "mabn" else {})),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(2),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(3):
        loss = model(torch.randn(4, 3, 6, 6)).square().mean() + norms.auxiliary_loss(model)
        opt.zero_grad(), loss.backward(), opt.step()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    clone = nn.Sequential(
        nn.Conv2d(3, 5, 3),
        norms.make(method, 5, **({"warmup_steps": 1, "buffer_size": 3} if method == "mabn" else {})),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(80, 2),
    )
    buffer.seek(0)
    clone.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 3, 6, 6)
    assert_close(clone(x), model(x), **TIGHT)  # a training step on both: counters, buffers, statistics
    assert_close(clone(x), model(x), **TIGHT)
    clone.eval(), model.eval()
    assert_close(clone(x), model(x), **TIGHT)


def test_buffers_move_with_to():
    layer = norms.make("mabn", 5).to(torch.float32)
    assert layer.chi_buffer.dtype == torch.float32 and layer.num_batches_tracked.dtype == torch.long
    assert {"chi_buffer", "psi_buffer", "num_batches_tracked", "running_var"} <= set(layer.state_dict())


def test_convert_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.set_default_dtype(torch.float32)
    for method in norms.METHODS:
        model = torchvision.models.resnet18(num_classes=10)
        with torch.no_grad():
            model.bn1.running_mean.fill_(0.25)
            model.bn1.weight.fill_(0.5)
        converted = norms.convert(model, method)
        assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in converted.modules())
        assert isinstance(converted.bn1, type(norms.make(method, 64)))
        if method != "none":  # every layer with affine parameters carries them over
            assert torch.all(converted.bn1.weight == 0.5)
        if method in ("bn", "bnrs", "brn", "brnc", "bnwos"):
            assert torch.all(converted.bn1.running_mean == 0.25)
        out = converted(
            torch.randn(4, 3, 32, 32)
        )  # 1x1 after the last stage: the smallest input that exercises every layer
        out.sum().backward()
        assert out.shape == (4, 10)
        assert converted.conv1.weight.grad is not None
    # a bnlib model converts again, carrying its statistics
    model = norms.convert(torchvision.models.resnet18(num_classes=10), "bn")
    with torch.no_grad():
        model.bn1.running_mean.fill_(0.25)
    again = norms.convert(model, "brnc", warmup_steps=5)
    assert isinstance(again.bn1, norms.BatchRenorm) and again.bn1.warmup_steps == 5
    assert torch.all(again.bn1.running_mean == 0.25)


def test_unknown_method_and_bad_option():
    with pytest.raises(ValueError, match="unknown normalisation method 'bogus'"):
        norms.make("bogus", 3)
    with pytest.raises(TypeError, match="'bn'"):
        norms.make("bn", 3, rmax=2)
    with pytest.raises(ValueError, match=r"expects input \(N, 3\)"):
        norms.make("bn", 3)(torch.randn(4, 5))


def test_recompute_statistics_gives_population_statistics():
    torch.manual_seed(0)
    data = torch.randn(64, 2, 4, 4) * 3 + 1
    for method in ("bn", "bnrs", "brn", "brnc", "bnwos"):
        model = nn.Sequential(nn.Identity(), norms.make(method, 2))
        model.train()
        counter_before = int(model[1].num_batches_tracked)
        seen = norms.recompute_statistics(model, [(data[i : i + 16], None) for i in range(0, 64, 16)])
        assert seen == 64 and model.training and int(model[1].num_batches_tracked) == counter_before
        assert_close(model[1].running_mean, data.mean(dim=(0, 2, 3)), **TIGHT)
        assert_close(model[1].running_var, data.var(dim=(0, 2, 3), unbiased=True), **TIGHT)
    mabn = nn.Sequential(norms.make("mabn", 2))
    norms.recompute_statistics(mabn, [data[:32], data[32:]])
    assert_close(mabn[0].running_var, (data**2).mean(dim=(0, 2, 3)), **TIGHT)


def test_recompute_statistics_downstream_layers_see_batch_normalised_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(norms.make("bn", 2), norms.make("bn", 2))
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[0].bias.fill_(3.0)
    data = torch.randn(32, 2, 3, 3) * 5
    norms.recompute_statistics(model, [data])
    assert_close(model[1].running_mean, torch.full((2,), 3.0), **TIGHT)


# --- the mechanism ablation: BN with the gradient through its batch statistics cut ---

_DETACHED = {"bn_detached": (True, True), "bn_detached_mean": (True, False), "bn_detached_var": (False, True)}


@pytest.mark.parametrize("method", list(_DETACHED))
@pytest.mark.parametrize("shape", SHAPES)
def test_detached_bn_is_bn_forward_with_the_closed_form_gradient(method, shape):
    """Output, running statistics and eval mode equal torch's BN; the input gradient is BN's with the detached
    statistic's term removed (the closed forms in the layer's docstring), gamma's and beta's are BN's."""
    detach_mean, detach_var = _DETACHED[method]
    ours, ref = norms.make(method, 5), _torch_bn(shape)
    _randomise_affine(ours, ref)
    for step in range(3):
        x, up = _inputs(shape, seed=step), _inputs(shape, seed=10 + step).detach()
        (y, grads), (y_ref, grads_ref) = _run(ours, x, up), _run(ref, x, up)
        assert_close(y, y_ref, **TIGHT)
        assert_close(grads[1:], grads_ref[1:], **TIGHT)  # gamma, beta
        dims = [0, *range(2, len(shape))]

        def view(v):
            return v.view(1, -1, *([1] * (len(shape) - 2)))

        sigma = torch.sqrt(x.detach().var(dim=dims, correction=0, keepdim=True) + 1e-5)
        x_hat = (x.detach() - x.detach().mean(dim=dims, keepdim=True)) / sigma
        g = view(ours.weight.detach()) * up
        expected = g
        if not detach_mean:
            expected = expected - g.mean(dim=dims, keepdim=True)
        if not detach_var:
            expected = expected - x_hat * (g * x_hat).mean(dim=dims, keepdim=True)
        assert_close(grads[0], expected / sigma, **TIGHT)
        assert_close(ours.running_mean, ref.running_mean, **TIGHT)
        assert_close(ours.running_var, ref.running_var, **TIGHT)
    ours.eval(), ref.eval()
    x = _inputs(shape, seed=99)
    assert_close(ours(x), ref(x), **TIGHT)


def test_detached_bn_with_nothing_detached_is_bn():
    ours, ref = norms.make("bn_detached", 5, detach_mean=False, detach_var=False), nn.BatchNorm2d(5)
    _randomise_affine(ours, ref)
    x, up = _inputs((4, 5, 3, 3)), _inputs((4, 5, 3, 3), seed=7).detach()
    (y, grads), (y_ref, grads_ref) = _run(ours, x, up), _run(ref, x, up)
    assert_close(y, y_ref, **TIGHT)
    assert_close(grads, grads_ref, **TIGHT)


# --- the momentum sweep of the running statistics ---


@pytest.mark.parametrize("momentum", norms.MOMENTUM_SWEEP)
@pytest.mark.parametrize("base", ["bnrs", "bnrs_orig"])
def test_momentum_sweep_ids_are_their_base_method_at_that_momentum(base, momentum):
    method = f"{base}_m{round(100 * momentum):03d}"
    layer = norms.make(method, 5)
    assert layer.momentum == momentum and type(layer) is type(norms.make(base, 5))
    if base == "bnrs_orig":  # against the original study's maths at this momentum
        _randomise_affine(layer)
        ref = _OriginalStudyBN("bnrs", 5, momentum=momentum)
        for step in range(3):
            x = _inputs((4, 5, 3, 3), seed=step)
            assert_close(layer(x), ref(x, layer.weight, layer.bias), **TIGHT)
        assert_close(layer.running_var, ref.running_var, **TIGHT)
    with pytest.raises(ValueError, match="defined by momentum"):
        norms.make(method, 5, momentum=0.5)
    converted = norms.convert(nn.Sequential(nn.BatchNorm2d(5)), method)  # torch's 0.1 does not carry over
    assert converted[0].momentum == momentum


def test_bnrs_at_momentum_one_normalises_with_the_previous_batch():
    layer = norms.make("bnrs_m100", 5)
    x1, x2 = _inputs((4, 5, 3, 3), seed=1), _inputs((4, 5, 3, 3), seed=2)
    layer(x1)
    dims, m = [0, 2, 3], 4 * 9
    mu1, var1 = x1.detach().mean(dims, keepdim=True), x1.detach().var(dims, correction=1, keepdim=True)
    assert_close(layer(x2), (x2 - mu1) / torch.sqrt(var1 + 1e-5), **TIGHT)
    assert_close(layer.running_var, x2.detach().var(dims, correction=1), **TIGHT)
    assert m > 1


@pytest.mark.parametrize("shape", SHAPES)
def test_bnrs_orig_at_momentum_one_is_bn_detached_with_the_unbiased_variance(shape):
    """The original's BNRS at momentum 1 updates its statistics to this batch's before using them: the forward pass of
    ``bn_detached`` (eps = 0) with the unbiased variance var_B * m / (m - 1), so its normalised output is bn_detached's
    times sqrt((m - 1) / m), and so is its input gradient (neither has a gradient through the statistics)."""
    orig, detached = norms.make("bnrs_orig_m100", 5), norms.make("bn_detached", 5, eps=0.0)
    _randomise_affine(orig, detached)
    m = math.prod(shape) // shape[1]
    shrink = math.sqrt((m - 1) / m)
    beta = detached.bias.detach().view(1, -1, *([1] * (len(shape) - 2)))
    for step in range(2):
        x, up = _inputs(shape, seed=step), _inputs(shape, seed=10 + step).detach()
        (y_o, g_o), (y_d, g_d) = _run(orig, x, up), _run(detached, x, up)
        assert_close(y_o - beta, (y_d - beta) * shrink, **TIGHT)
        assert_close(g_o[0], g_d[0] * shrink, **TIGHT)


# --- Online Normalization ---


class _OfficialOnlineNorm:
    """A float64 transcription of the official Online Normalization (Cerebras/online-normalization,
    ``online_norm_2d.py``: ``OnlineNorm2d`` = ``Norm2d`` (``norm_fwd_cpu`` / ``norm_bwd_cpu`` in ``norm_cpu.cpp``),
    affine, then ``LayerScaling`` or ``ActivationClamp``), sample by sample as the C++ loops run."""

    def __init__(self, channels, alpha_fwd=0.999, alpha_bkw=0.99, eps=1e-5, ecm="ls", ls_eps=1e-5, clamp=5.0):
        self.afwd, self.abkw, self.eps, self.ecm, self.ls_eps, self.clamp = (
            alpha_fwd,
            alpha_bkw,
            eps,
            ecm,
            ls_eps,
            clamp,
        )
        self.m, self.var = torch.zeros(channels), torch.ones(channels)
        self.u, self.v = torch.zeros(channels), torch.zeros(channels)

    def _ecm(self, out):
        if self.ecm == "ls":
            return out / torch.sqrt(out.pow(2).mean(dim=list(range(1, out.dim())), keepdim=True) + self.ls_eps)
        return out.clamp(-self.clamp, self.clamp) if self.ecm == "ac" else out

    def step(self, x, weight, bias, grad_output):
        """Forward and backward of one training batch: output, (dL/dx, dL/dweight, dL/dbias)."""
        n, c = x.shape[:2]
        xs = x.detach().reshape(n, c, -1)
        mu, var = xs.mean(2), xs.var(2, correction=0)
        mu_b, var_b = torch.empty(n, c), torch.empty(n, c)
        for i in range(n):  # norm_fwd_cpu
            mu_b[i], var_b[i] = self.m, self.var
            delta = mu[i] - self.m
            self.var = self.afwd * self.var + (1 - self.afwd) * var[i] + self.afwd * (1 - self.afwd) * delta.pow(2)
            self.m = self.m + (1 - self.afwd) * delta
        scale = torch.sqrt(var_b + self.eps)
        out = ((xs - mu_b.unsqueeze(2)) / scale.unsqueeze(2)).requires_grad_(True)
        w, b = weight.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
        y = self._ecm(out.view(x.shape) * w.view(1, -1, *([1] * (x.dim() - 2))) + b.view(1, -1, *([1] * (x.dim() - 2))))
        grad_out, grad_w, grad_b = torch.autograd.grad((y * grad_output).sum(), (out, w, b))
        grad_in = torch.empty_like(grad_out)
        for i in range(n):  # norm_bwd_cpu
            tmp = grad_out[i] - (1 - self.abkw) * self.v.unsqueeze(1) * out[i].detach()
            self.v = self.v + (tmp * out[i].detach()).mean(1)
            tmp = tmp / scale[i].unsqueeze(1)
            grad_in[i] = tmp - (1 - self.abkw) * self.u.unsqueeze(1)
            self.u = self.u + grad_in[i].mean(1)
        return y.detach(), (grad_in.view(x.shape), grad_w, grad_b)

    def eval(self, x, weight, bias):
        def view(v):
            return v.view(1, -1, *([1] * (x.dim() - 2)))

        return self._ecm((x - view(self.m)) / torch.sqrt(view(self.var) + self.eps) * view(weight) + view(bias))


@pytest.mark.parametrize("ecm", ["ls", "ac", "none"])
@pytest.mark.parametrize("shape", SHAPES)
def test_online_norm_equals_official_transcription(ecm, shape):
    """Forward, gradients (the control process), the streaming statistics and control variables over several
    batches, and eval mode; faster decays than the defaults (and a scaled batch for the clamp) make every term bite."""
    options = dict(alpha_fwd=0.9, alpha_bkw=0.8, ecm=ecm, clamp_val=2.0)
    layer = norms.make("online", 5, **options)
    _randomise_affine(layer)
    ref = _OfficialOnlineNorm(5, 0.9, 0.8, ecm=ecm, clamp=2.0)
    for step in range(4):
        x, up = _inputs(shape, seed=step) * (3 if step == 2 else 1), _inputs(shape, seed=10 + step).detach()
        y, grads = _run(layer, x, up)
        y_ref, grads_ref = ref.step(x, layer.weight, layer.bias, up)
        assert_close(y, y_ref, **TIGHT)
        for a, g in zip(grads, grads_ref):
            assert_close(a, g, **TIGHT)
        for ours, theirs in (
            (layer.running_mean, ref.m),
            (layer.running_var, ref.var),
            (layer.u, ref.u),
            (layer.v, ref.v),
        ):
            assert_close(ours, theirs, **TIGHT)
    layer.eval()
    x = _inputs(shape, seed=99)
    assert_close(layer(x), ref.eval(x, layer.weight, layer.bias), **TIGHT)


def test_online_norm_defaults_are_the_authors_and_groups_scale_separately():
    layer = norms.make("online", 6)
    assert (layer.alpha_fwd, layer.alpha_bkw, layer.eps, layer.ecm, layer.ls_eps) == (0.999, 0.99, 1e-5, "ls", 1e-5)
    grouped = norms.make("online", 6, num_groups=2).eval()
    x = _inputs((3, 6, 2, 2))
    halves = [norms.make("online", 3).eval()(x[:, :3]), norms.make("online", 3).eval()(x[:, 3:])]
    assert_close(grouped(x), torch.cat(halves, 1), **TIGHT)
    with pytest.raises(ValueError, match="num_groups"):
        norms.make("online", 6, num_groups=4)


# --- Cross-Iteration Batch Normalization ---


class _OfficialCBN:
    """A float64 transcription of the official ``CBatchNorm2d`` (Howal/Cross-iterationBatchNorm,
    ``mmdet/models/utils/CBN.py``): Python lists of the last iterations' statistics, their derivatives by the
    conv weight and the weight, the Taylor compensation, the count of valid iterations, eps outside the root."""

    def __init__(self, channels, buffer_num, burnin, rho=1.0, momentum=0.1, eps=1e-5):
        self.max_buffer_num, self.burnin, self.rho, self.momentum, self.eps = buffer_num, burnin, rho, momentum, eps
        self.buffer_num = buffer_num
        self.iter_count = 0
        self.pre_mu, self.pre_meanx2, self.pre_dmudw, self.pre_dmeanx2dw, self.pre_weight = [], [], [], [], []
        self.running_mean, self.running_var = torch.zeros(channels), torch.ones(channels)
        self.ones = torch.ones(channels)

    def __call__(self, input, weight, gamma, beta, training=True):
        y = input.transpose(0, 1)
        return_shape = y.shape
        y = y.contiguous().view(input.size(1), -1)
        if training and self.burnin > 0:
            self.iter_count += 1
            self.buffer_num = self.max_buffer_num if self.iter_count > self.burnin else 0
        if self.buffer_num > 0 and training and input.requires_grad:
            cur_mu = y.mean(dim=1)
            cur_meanx2 = torch.pow(y, 2).mean(dim=1)
            cur_sigma2 = y.var(dim=1)
            dmudw = torch.autograd.grad(cur_mu, weight, self.ones, retain_graph=True)[0]
            dmeanx2dw = torch.autograd.grad(cur_meanx2, weight, self.ones, retain_graph=True)[0]
            mu_all = torch.stack(
                [cur_mu]
                + [
                    m + (self.rho * d * (weight.data - w)).sum(1).sum(1).sum(1)
                    for m, d, w in zip(self.pre_mu, self.pre_dmudw, self.pre_weight)
                ]
            )
            meanx2_all = torch.stack(
                [cur_meanx2]
                + [
                    m + (self.rho * d * (weight.data - w)).sum(1).sum(1).sum(1)
                    for m, d, w in zip(self.pre_meanx2, self.pre_dmeanx2dw, self.pre_weight)
                ]
            )
            sigma2_all = meanx2_all - torch.pow(mu_all, 2)
            re_mu_all, re_meanx2_all = mu_all.clone(), meanx2_all.clone()
            re_mu_all[sigma2_all < 0] = 0
            re_meanx2_all[sigma2_all < 0] = 0
            count = (sigma2_all >= 0).sum(dim=0).double()
            mu = re_mu_all.sum(dim=0) / count
            sigma2 = re_meanx2_all.sum(dim=0) / count - torch.pow(mu, 2)
            keep = self.buffer_num - 1
            self.pre_mu = [cur_mu.detach()] + self.pre_mu[:keep]
            self.pre_meanx2 = [cur_meanx2.detach()] + self.pre_meanx2[:keep]
            self.pre_dmudw = [dmudw.detach()] + self.pre_dmudw[:keep]
            self.pre_dmeanx2dw = [dmeanx2dw.detach()] + self.pre_dmeanx2dw[:keep]
            self.pre_weight = [weight.data.clone()] + self.pre_weight[:keep]
        else:
            mu = cur_mu = y.mean(dim=1)
            sigma2 = cur_sigma2 = y.var(dim=1)
        if not training:
            y = (y - self.running_mean.view(-1, 1)) / (self.running_var.view(-1, 1) ** 0.5 + self.eps)
        else:
            with torch.no_grad():
                self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * cur_mu
                self.running_var = (1 - self.momentum) * self.running_var + self.momentum * cur_sigma2
            y = (y - mu.view(-1, 1)) / (sigma2.view(-1, 1) ** 0.5 + self.eps)
        y = gamma.view(-1, 1) * y + beta.view(-1, 1)
        return y.view(return_shape).transpose(0, 1)


@pytest.mark.parametrize("burnin", [0, 2])
def test_cbn_equals_official_transcription(burnin):
    """conv -> CBN, trained by SGD for 7 steps so the weight moves and the Taylor compensation matters (rho = 1):
    outputs, the gradients of the conv's input and weight, gamma and beta, running statistics and inference."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, bias=False)
    layer = norms.make("cbn", 5, buffer_num=3, burnin=burnin)
    layer.meet_conv(conv)
    _randomise_affine(layer)
    w_ref = conv.weight.detach().clone().requires_grad_(True)
    g_ref, b_ref = layer.weight.detach().clone().requires_grad_(True), layer.bias.detach().clone().requires_grad_(True)
    ref = _OfficialCBN(5, buffer_num=3, burnin=burnin)
    for step in range(7):
        x, up = _inputs((4, 3, 5, 5), seed=step), _inputs((4, 5, 3, 3), seed=20 + step).detach()
        x_ref = x.detach().clone().requires_grad_(True)
        y = layer(conv(x))
        grads = torch.autograd.grad((y * up).sum(), (x, conv.weight, layer.weight, layer.bias))
        y_ref = ref(F_conv(x_ref, w_ref), w_ref, g_ref, b_ref)
        grads_ref = torch.autograd.grad((y_ref * up).sum(), (x_ref, w_ref, g_ref, b_ref))
        assert_close(y, y_ref, **TIGHT)
        for a, b in zip(grads, grads_ref):
            assert_close(a, b, **TIGHT)
        assert_close(layer.running_mean, ref.running_mean, **TIGHT)
        assert_close(layer.running_var, ref.running_var, **TIGHT)
        with torch.no_grad():  # the same SGD step on both
            for p, q, g in zip((conv.weight, layer.weight, layer.bias), (w_ref, g_ref, b_ref), grads[1:]):
                p -= 0.3 * g
                q -= 0.3 * g
    assert int(layer.buffered) == 3
    layer.eval()
    x = conv(_inputs((4, 3, 5, 5), seed=99))
    assert_close(layer(x), ref(x, w_ref, g_ref, b_ref, training=False), **TIGHT)


def F_conv(x, w):
    return torch.nn.functional.conv2d(x, w)


def test_cbn_finds_the_convolution_through_an_activation_and_burns_in_on_the_run():
    conv = nn.Conv2d(3, 5, 3, bias=False)
    x = conv(_inputs((2, 3, 4, 4)))
    assert streaming._producing_conv_weight(x) is conv.weight
    assert streaming._producing_conv_weight(torch.nn.functional.gelu(x)) is conv.weight
    assert streaming._producing_conv_weight(_inputs((2, 5))) is None
    assert norms.run_options("cbn", 1200, 16) == {"burnin": 800}  # the authors' 8 of 12 epochs


def test_the_normalising_backward_pass_is_what_bn_and_brn_share_and_bn_detached_and_bnrs_lack():
    """The 2x2's second factor, measured in float64 (bnlib.probes): BN's and BRN's input gradients are projected off
    1 and x_hat per channel (sum 0; correlation with x_hat 0 up to the eps in sigma_B), bn_detached's and BNRS's are
    not (the same unprojected g / sigma); each half-detached arm keeps one of the two projections."""
    from bnlib import probes

    measured = {m: probes.backward_projection(m) for m in ("bn", "brn", "bn_detached", "bnrs", "bn_detached_mean")}
    for method in ("bn", "brn"):
        assert measured[method]["gradient sum"] < 1e-12 and measured[method]["correlation with x_hat"] < 1e-5
    for method in ("bn_detached", "bnrs"):
        assert measured[method]["gradient sum"] > 0.1 and measured[method]["correlation with x_hat"] > 0.05
    # no gradient through the mean: the sum is kept; through the variance alone: x_hat's projection stays
    assert measured["bn_detached_mean"]["gradient sum"] > 0.1
    assert measured["bn_detached_mean"]["correlation with x_hat"] < 1e-5
