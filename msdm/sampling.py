"""Karras schedule and the Euler/Heun + churn samplers with resampling (MSDM paper Sec. 4.2).

Samplers depend only on a `derivative(x, sigma) -> dx/dsigma` callable, so generation, imputation
and separation differ only in the closure that `msdm.tasks` passes in. Shapes: x [B, S, T].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Derivative = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      device="cpu") -> torch.Tensor:
    """sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then a final 0."""
    if n < 1:
        raise ValueError(f"num_steps must be >= 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1).double()
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float().to(device)


def to_d(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """EDM ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return (x - denoised) / sigma.reshape(-1, *([1] * (x.ndim - 1)))


def nfe(num_steps: int, resamples: int = 1, solver: str = "euler") -> int:
    """Number of derivative (model) evaluations of one `sample` call."""
    per_pass = num_steps if solver == "euler" else 2 * num_steps - 1
    return per_pass * resamples


def sample(derivative: Derivative, x: torch.Tensor, sigmas: torch.Tensor, *,
           solver: str = "euler", resamples: int = 1, s_churn: float = 0.0, s_tmin: float = 0.0,
           s_tmax: float = math.inf, s_noise: float = 1.0,
           randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
           callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Euler or Heun steps with EDM churn and `resamples` passes per noise level.

    Per level i and pass r: churn sigma -> sigma_hat = sigma (1 + gamma), step to sigma_next,
    and, if r < resamples, re-noise back to sigma (the paper's "correction").
    """
    if solver not in ("euler", "heun"):
        raise ValueError(f"unknown solver {solver!r}; expected 'euler' or 'heun'")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    n = len(sigmas) - 1
    gamma_max = min(s_churn / n, math.sqrt(2) - 1)
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = gamma_max if s_tmin <= sigma <= s_tmax else 0.0
        for r in range(resamples):
            sigma_hat = sigma * (1 + gamma)
            if gamma > 0:
                x = x + randn_like(x) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
            d = derivative(x, _full(x, sigma_hat))
            x_next = x + (sigma_next - sigma_hat) * d
            if solver == "heun" and sigma_next > 0:
                d_next = derivative(x_next, _full(x, sigma_next))
                x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
            x = x_next
            if r < resamples - 1:
                x = x + randn_like(x) * math.sqrt(sigma**2 - sigma_next**2)
        if callback is not None:
            callback({"i": i, "sigma": sigma, "sigma_next": sigma_next, "x": x})
    return x


def _full(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((x.shape[0],), value, dtype=torch.float32, device=x.device)


def sample_euler(derivative: Derivative, x: torch.Tensor, sigmas: torch.Tensor, **kwargs):
    """First-order Euler sampler with churn (the paper's sampler)."""
    return sample(derivative, x, sigmas, solver="euler", **kwargs)


def sample_heun(derivative: Derivative, x: torch.Tensor, sigmas: torch.Tensor, **kwargs):
    """EDM second-order Heun sampler with churn (Karras et al. 2022, Alg. 2)."""
    return sample(derivative, x, sigmas, solver="heun", **kwargs)
