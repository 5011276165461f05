"""EDM preconditioning, training loss and denoisers (Karras et al. 2022; MSDM paper Sec. 3).

Every denoiser follows one protocol: `denoise(x [B, S, T], sigma [B]) -> denoised [B, S, T]`.
`Denoiser` wraps a network F(x, c_noise); `GaussianDenoiser` is the exact denoiser of a Gaussian
prior over stems (tests, oracles); `FactorizedDenoiser` builds ISDM's p(x) = prod_n p_n(x_n).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """Scalar or [B] sigma -> float tensor [B] on x's device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or [{x.shape[0]}], got {tuple(sigma.shape)}")
    return sigma


class Denoiser(nn.Module):
    """D(x; sigma) = clamp(c_skip x + c_out F(c_in x, c_noise), -1, 1) (EDM preconditioning)."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.2, clamp: bool = True):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data
        self.clamp = clamp

    def get_scalings(self, sigma: torch.Tensor):
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.get_scalings(sigma)
        bc = (slice(None), None, None)
        out = self.net(x * c_in[bc], c_noise)
        denoised = c_skip[bc] * x + c_out[bc] * out.float()
        return denoised.clamp(-1, 1) if self.clamp else denoised


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_training_sigmas(batch: int, p_mean: float, p_std: float, generator=None,
                           device=None) -> torch.Tensor:
    """ln sigma ~ N(p_mean, p_std^2), one sigma per example (shared by its stems)."""
    z = torch.randn(batch, generator=generator, device=device or "cpu")
    return (p_mean + p_std * z).exp().to(device or "cpu")


def edm_loss(denoiser, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
             sigma_data: float) -> torch.Tensor:
    """Per-example loss lambda(sigma) * mean_{s,t} (D(x + sigma n; sigma) - x)^2, shape [B]."""
    if x.ndim != 3:
        raise ValueError(f"expected x of shape [B, S, T], got {tuple(x.shape)}")
    x_noisy = x + sigma[:, None, None] * noise
    denoised = denoiser(x_noisy, sigma)
    err = (denoised.float() - x.float()) ** 2
    return loss_weight(sigma, sigma_data) * err.mean(dim=(1, 2))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model (one fused kernel per dtype); buffers copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()],
                         1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class GaussianDenoiser(nn.Module):
    """Exact denoiser of x ~ N(0, cov) per time step: D(x; sigma) = cov (cov + sigma^2 I)^-1 x.

    `cov` is [S, S]; samples are i.i.d. over time. Usable wherever a trained denoiser is.
    """

    def __init__(self, cov: torch.Tensor):
        super().__init__()
        cov = torch.as_tensor(cov, dtype=torch.float64)
        if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
            raise ValueError(f"cov must be a square [S, S] matrix, got {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.T) or torch.linalg.eigvalsh(cov).min() <= 0:
            raise ValueError("cov must be symmetric positive definite")
        self.register_buffer("cov", cov)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = as_sigma(sigma, x).double()
        s = self.cov.shape[0]
        if x.ndim != 3 or x.shape[1] != s:
            raise ValueError(f"expected x of shape [B, {s}, T], got {tuple(x.shape)}")
        eye = torch.eye(s, dtype=torch.float64, device=x.device)
        a = self.cov @ torch.linalg.inv(self.cov + sigma[:, None, None] ** 2 * eye)  # [B, S, S]
        return (a @ x.double()).to(x.dtype)


class FactorizedDenoiser(nn.Module):
    """ISDM: D(x) = [D^1(x_1), ..., D^S(x_S)], one single-stem denoiser per channel."""

    def __init__(self, denoisers: Sequence[nn.Module]):
        super().__init__()
        if not denoisers:
            raise ValueError("FactorizedDenoiser needs at least one single-stem denoiser")
        self.parts = nn.ModuleList(denoisers)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != len(self.parts):
            raise ValueError(f"expected x of shape [B, {len(self.parts)}, T], got {tuple(x.shape)}")
        sigma = as_sigma(sigma, x)
        return torch.cat([d(x[:, i : i + 1], sigma) for i, d in enumerate(self.parts)], dim=1)


def gaussian_conditional(cov: torch.Tensor, known: Sequence[bool]):
    """For x ~ N(0, cov): E[x_u | x_k] = A x_k; returns (A [U, K], conditional covariance)."""
    cov = torch.as_tensor(cov, dtype=torch.float64)
    k = torch.tensor(list(known))
    u = ~k
    a = cov[u][:, k] @ torch.linalg.inv(cov[k][:, k])
    cond = cov[u][:, u] - a @ cov[k][:, u]
    return a, cond

