import pytest
import torch

from msdm.checkpoint import build_denoiser
from msdm.config import Config, ConfigError, apply_overrides
from msdm.diffusion import edm_loss
from msdm.model import UNet1d, build_network, count_parameters
from msdm.training import make_optimizer


def test_paper_model_has_405m_parameters():
    with torch.device("meta"):
        net = build_network(Config().model, 4)
    n = count_parameters(net)
    print(f"paper U-Net: {n / 1e6:.2f} M parameters (paper: 405 M)")
    assert abs(n - 405e6) / 405e6 < 0.03


@pytest.mark.parametrize("stems", [1, 4])
def test_shapes_hold_for_isdm_and_msdm(tiny_cfg, stems):
    net = UNet1d(stems, tiny_cfg.model)
    x = torch.randn(3, stems, 4096)
    assert net(x, torch.zeros(3)).shape == (3, stems, 4096)
    assert net(x, torch.tensor(0.5)).shape == (3, stems, 4096)  # scalar c_noise broadcasts


def test_length_not_multiple_names_the_multiple(tiny_cfg):
    net = UNet1d(4, tiny_cfg.model)
    with pytest.raises(ValueError, match="multiple of 64"):
        net(torch.randn(1, 4, 4000), torch.zeros(1))
    with pytest.raises(ValueError, match=r"\[B, 4, T\]"):
        net(torch.randn(1, 3, 4096), torch.zeros(1))


def test_paper_total_downsampling_is_8192():
    with torch.device("meta"):
        assert build_network(Config().model, 4).multiple == 16 * 4 * 4 * 4 * 2 * 2 * 2


def test_inconsistent_level_config_is_rejected(tiny_cfg):
    with pytest.raises(ConfigError, match=r"model: need len\(multipliers\)"):
        apply_overrides(tiny_cfg, {"model.factors": [4, 4, 4]})


@pytest.mark.slow(seconds=11)
def test_tiny_unet_overfits_one_batch(tiny_cfg, synthetic_stems):
    """Fixed batch, sigma and noise: the loss must fall more than 10x in well under a minute."""
    torch.manual_seed(0)
    den = build_denoiser(apply_overrides(tiny_cfg, {"train.lr": 1e-2}))
    opt = make_optimizer(den, apply_overrides(tiny_cfg, {"train.lr": 1e-2}))
    g = torch.Generator().manual_seed(0)
    x = synthetic_stems
    sigma, noise = torch.full((x.shape[0],), 0.2), torch.randn(x.shape, generator=g)
    losses = []
    for _ in range(150):  # ~55x at this learning rate
        loss = edm_loss(den, x, sigma, noise, 0.2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = losses[0], min(losses[-20:])
    print(f"overfit: loss {first:.3f} -> {last:.4f} ({first / last:.1f}x)")
    assert first / last > 10


@pytest.mark.slow(seconds=14)
def test_compiled_network_matches_eager_on_cpu(tiny_cfg, synthetic_stems):
    """train.compile (#17): the in-place torch.compile'd denoiser gives the eager loss and
    gradients to float rounding on CPU, and keeps the eager state_dict keys (checkpoints)."""
    from msdm.training import compile_model

    cfg = apply_overrides(tiny_cfg, {"train.compile": True})
    torch.manual_seed(0)
    eager = build_denoiser(cfg)
    compiled = build_denoiser(cfg)
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = synthetic_stems[:2, :, : cfg.data.chunk_samples]
    sigma = torch.tensor([0.05, 0.8])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (eager, compiled):
        loss = edm_loss(model, x, sigma, noise, cfg.diffusion.sigma_data).mean()
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-4), losses
    # relative to the largest gradient: a bias that a GroupNorm cancels has a true gradient of
    # 0 and only rounding noise (~1e-8) in either version
    scale = max(float(a.grad.abs().max()) for a in eager.parameters())
    worst = max(float((a.grad - b.grad).abs().max())
                for a, b in zip(eager.parameters(), compiled.parameters()))
    assert worst < 1e-4 * scale, (worst, scale)
