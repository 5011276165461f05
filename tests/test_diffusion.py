"""EDM preconditioning limits, the lambda(sigma) loss weight, the EMA update and the random-shift
augmentation, each against its closed form."""

import math

import pytest
import torch
from torch import nn

from msdm.data import random_shift
from msdm.diffusion import Denoiser, edm_loss, ema_update, loss_weight

SD = 0.2


class Probe(nn.Module):
    """F(x, c_noise) = 3 x + c_noise: a network whose output we can predict."""

    def forward(self, x, c_noise):
        return 3 * x + c_noise[:, None, None]


def test_preconditioning_is_the_identity_as_sigma_goes_to_zero():
    den = Denoiser(Probe(), SD, clamp=False)
    x = torch.randn(2, 4, 64) * 0.3
    c_skip, c_out, c_in, c_noise = den.get_scalings(torch.tensor([1e-6, 1e-6]))
    assert torch.allclose(c_skip, torch.ones(2), atol=1e-9) and (c_out < 1e-5).all()
    assert torch.allclose(c_noise, torch.tensor(math.log(1e-6) / 4).expand(2))
    assert torch.allclose(den(x, torch.tensor([1e-6, 1e-6])), x, atol=1e-4)


def test_preconditioning_is_c_out_times_f_as_sigma_grows():
    den = Denoiser(Probe(), SD, clamp=False)
    x = torch.randn(2, 4, 64)
    sigma = torch.tensor([1e4, 1e4])
    c_skip, c_out, c_in, c_noise = den.get_scalings(sigma)
    assert (c_skip < 1e-9).all() and torch.allclose(c_out, torch.full((2,), SD), rtol=1e-6)
    want = c_out[:, None, None] * Probe()(x * c_in[:, None, None], c_noise)
    assert torch.allclose(den(x, sigma), want, rtol=1e-5, atol=1e-6)


def test_loss_weight_makes_the_effective_target_weight_one():
    """lambda(sigma) c_out(sigma)^2 = 1: the loss on F's target has unit weight (EDM eq. 8)."""
    sigma = torch.logspace(-4, 2, 25, dtype=torch.float64)
    c_out = sigma * SD / (sigma**2 + SD**2).sqrt()
    assert torch.allclose(loss_weight(sigma, SD) * c_out**2, torch.ones_like(sigma))
    assert torch.allclose(loss_weight(sigma, SD), (sigma**2 + SD**2) / (sigma * SD) ** 2)


def test_edm_loss_of_a_perfect_denoiser_is_zero_and_weights_by_lambda():
    x = torch.randn(3, 2, 32) * 0.1
    sigma, noise = torch.tensor([0.01, 0.1, 1.0]), torch.randn(3, 2, 32)
    assert torch.allclose(edm_loss(lambda z, s: x, x, sigma, noise, SD), torch.zeros(3))
    zero = edm_loss(lambda z, s: torch.zeros_like(z), x, sigma, noise, SD)
    assert torch.allclose(zero, loss_weight(sigma, SD) * x.pow(2).mean(dim=(1, 2)))


def test_ema_update_is_the_closed_form_average_and_copies_buffers():
    model, ema = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        ema.weight.fill_(1.0)
        model.running_mean.fill_(5.0)
    ema_update(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    assert torch.equal(ema.running_mean, model.running_mean)
    for _ in range(200):
        ema_update(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, model.weight, atol=1e-8)


def test_random_shift_keeps_the_stems_of_an_example_aligned():
    base = torch.randn(5, 1, 256)
    x = torch.cat([base, 2 * base, -base, 0.5 * base], dim=1)  # stems are multiples of one signal
    y = random_shift(x, torch.Generator().manual_seed(0))
    assert torch.allclose(y[:, 1], 2 * y[:, 0]) and torch.allclose(y[:, 2], -y[:, 0])
    assert torch.allclose(y[:, 3], 0.5 * y[:, 0])
    shifts = [int(torch.argmax(torch.stack([torch.roll(base[b, 0], k) @ y[b, 0]
                                             for k in range(256)]))) for b in range(5)]
    assert len(set(shifts)) > 1  # examples get different shifts
    for b, k in enumerate(shifts):
        assert torch.allclose(y[b], torch.roll(x[b], k, dims=-1))  # a circular roll per example


def test_learning_rate_schedule_and_ema_warmup():
    from msdm.config import load_config
    from msdm.training import ema_decay_at, lr_at

    t = load_config("tiny", ["train.lr=1e-3", "train.warmup_steps=10", "train.max_steps=110",
                             "train.lr_schedule=cosine", "train.lr_min_ratio=0.1"]).train
    assert lr_at(0, t) == pytest.approx(1e-4) and lr_at(9, t) == pytest.approx(1e-3)
    assert lr_at(60, t) == pytest.approx(0.55e-3)  # half way down the cosine
    assert lr_at(110, t) == pytest.approx(1e-4) and lr_at(500, t) == pytest.approx(1e-4)
    const = load_config("tiny", ["train.lr=1e-3"]).train
    assert {lr_at(s, const) for s in (0, 10, 10_000)} == {1e-3}
    warm = load_config("tiny", ["train.ema_warmup=true", "train.ema_decay=0.999"]).train
    assert ema_decay_at(0, warm) == pytest.approx(0.1) and ema_decay_at(10**6, warm) == 0.999
    assert ema_decay_at(0, const) == const.ema_decay


def test_random_crop_takes_one_aligned_window_per_example():
    from msdm.data import random_crop

    t = torch.arange(1000, dtype=torch.float32)
    x = torch.stack([t, 2 * t, -t]).expand(6, 3, 1000).clone()  # [B, S, T]
    y = random_crop(x, 256, torch.Generator().manual_seed(0))
    assert y.shape == (6, 3, 256)
    starts = y[:, 0, 0].long()
    assert len(set(starts.tolist())) > 1 and int(starts.max()) <= 1000 - 256
    for b, s0 in enumerate(starts.tolist()):  # contiguous and the same window for every stem
        assert torch.equal(y[b, 0], t[s0 : s0 + 256])
        assert torch.equal(y[b, 1], 2 * y[b, 0]) and torch.equal(y[b, 2], -y[b, 0])
    with pytest.raises(ValueError, match="crop length"):
        random_crop(x, 2000)
