"""Karras schedule and the Euler/Heun + churn samplers with resampling (MSDM paper Sec. 4.2).

Samplers depend only on a `derivative(x, sigma) -> dx/dsigma` callable, so generation, imputation
and separation differ only in the closure that `msdm.tasks` passes in (the k-diffusion layout:
one small function per sampler, sharing the churn and re-noise helpers). Shapes: x [B, S, T].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Derivative = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplerConfig:
    """Euler/Heun + churn sampler settings (paper Sec. 4.2: Euler 150 x 2, churn 20, s_max 1)."""

    num_steps: int = 150
    sigma_min: float = 1e-4
    sigma_max: float = 1.0
    rho: float = 7.0
    s_churn: float = 20.0
    resamples: int = 2  # "correction": re-noise back to sigma_i and repeat the step
    # consistency: a distilled student's few-step sampler (jump to sigma 0, re-noise to the next
    # level; churn unused), msdm.distill
    solver: Literal["euler", "heun", "consistency"] = "euler"
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self):
        if self.solver not in SAMPLERS:
            raise ValueError(f"sampler solver {self.solver!r}: expected one of {list(SAMPLERS)}")
        if self.num_steps < 1 or self.resamples < 1:
            raise ValueError(f"sampler num_steps ({self.num_steps}) and resamples "
                             f"({self.resamples}) must be >= 1")
        if not 0 < self.sigma_min <= self.sigma_max or self.rho <= 0 or self.s_churn < 0:
            raise ValueError(f"sampler needs 0 < sigma_min <= sigma_max, rho > 0, s_churn >= 0; "
                             f"got {self.sigma_min}, {self.sigma_max}, {self.rho}, {self.s_churn}")


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


def consistency_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                       device="cpu") -> torch.Tensor:
    """The n levels of a consistency sampler, then 0: the first n of the Karras schedule of
    n + 1 levels, so one step is [sigma_max, 0] and sigma_min itself (where a jump changes
    nothing) is never a level."""
    return torch.cat([get_sigmas_karras(n + 1, sigma_min, sigma_max, rho, device)[:n],
                      torch.zeros(1, device=device)])


def to_d(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """EDM ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return (x - denoised) / sigma.reshape(-1, *([1] * (x.ndim - 1)))


def nfe(config: SamplerConfig) -> int:
    """Number of derivative (model) evaluations of one `sample` call with `config`."""
    per_pass = 2 * config.num_steps - 1 if config.solver == "heun" else config.num_steps
    return per_pass * config.resamples


def _churn(x, sigma: float, gamma: float, s_noise: float, randn_like):
    """EDM churn: raise the noise level to sigma_hat = sigma (1 + gamma) by adding fresh noise."""
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        x = x + randn_like(x) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


def _renoise(x, sigma: float, sigma_next: float, randn_like):
    """The paper's correction: go back from sigma_next to sigma before repeating the step."""
    return x + randn_like(x) * math.sqrt(sigma**2 - sigma_next**2)


def _levels(sigmas: torch.Tensor, s_churn: float, s_tmin: float, s_tmax: float):
    """(sigma, sigma_next, gamma) per step as Python floats: one host copy, no per-step sync."""
    values = sigmas.detach().cpu().tolist()
    n = len(values) - 1
    gamma_max = min(s_churn / n, math.sqrt(2) - 1)
    return [(s, s_next, gamma_max if s_tmin <= s <= s_tmax else 0.0)
            for s, s_next in zip(values[:-1], values[1:])]


def _full(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((x.shape[0],), value, dtype=torch.float32, device=x.device)


def sample_euler(derivative: Derivative, x: torch.Tensor, sigmas: torch.Tensor, *,
                 resamples: int = 1, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0, randn_like=torch.randn_like,
                 callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Euler steps with EDM churn and `resamples` passes per noise level (the paper's sampler)."""
    for i, (sigma, sigma_next, gamma) in enumerate(_levels(sigmas, s_churn, s_tmin, s_tmax)):
        for r in range(resamples):
            x, sigma_hat = _churn(x, sigma, gamma, s_noise, randn_like)
            x = x + (sigma_next - sigma_hat) * derivative(x, _full(x, sigma_hat))
            if r < resamples - 1:
                x = _renoise(x, sigma, sigma_next, randn_like)
        if callback is not None:
            callback({"i": i, "sigma": sigma, "sigma_next": sigma_next, "x": x})
    return x


def sample_heun(derivative: Derivative, x: torch.Tensor, sigmas: torch.Tensor, *,
                resamples: int = 1, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0, randn_like=torch.randn_like,
                callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """EDM second-order Heun sampler with churn (Karras et al. 2022, Alg. 2); Euler on the last
    step to sigma = 0."""
    for i, (sigma, sigma_next, gamma) in enumerate(_levels(sigmas, s_churn, s_tmin, s_tmax)):
        for r in range(resamples):
            x, sigma_hat = _churn(x, sigma, gamma, s_noise, randn_like)
            d = derivative(x, _full(x, sigma_hat))
            x_next = x + (sigma_next - sigma_hat) * d
            if sigma_next > 0:
                d_next = derivative(x_next, _full(x, sigma_next))
                x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
            x = x_next
            if r < resamples - 1:
                x = _renoise(x, sigma, sigma_next, randn_like)
        if callback is not None:
            callback({"i": i, "sigma": sigma, "sigma_next": sigma_next, "x": x})
    return x


def sample_consistency(derivative: Derivative, x: torch.Tensor, sigmas: torch.Tensor, *,
                       resamples: int = 1, randn_like=torch.randn_like,
                       callback: Callable[[dict], None] | None = None, **_unused) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): at each level, one Euler step
    all the way to sigma 0 (x - sigma d = the model's clean estimate), then fresh noise up to
    the next level. `resamples` > 1 repeats a level (re-noised to it). Churn does not apply."""
    values = sigmas.detach().cpu().tolist()
    for i, (sigma, sigma_next) in enumerate(zip(values[:-1], values[1:])):
        for r in range(resamples):
            x = x - sigma * derivative(x, _full(x, sigma))
            level = sigma if r < resamples - 1 else sigma_next
            if level > 0:
                x = x + level * randn_like(x)
        if callback is not None:
            callback({"i": i, "sigma": sigma, "sigma_next": sigma_next, "x": x})
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "consistency": sample_consistency}


def sample(derivative: Derivative, x: torch.Tensor, sigmas: torch.Tensor, *,
           solver: str = "euler", **kwargs) -> torch.Tensor:
    """Run the sampler named `solver` ("euler" or "heun"); keyword options as `sample_euler`."""
    if solver not in SAMPLERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {list(SAMPLERS)}")
    if kwargs.get("resamples", 1) < 1:
        raise ValueError(f"resamples must be >= 1, got {kwargs['resamples']}")
    return SAMPLERS[solver](derivative, x, sigmas, **kwargs)


def run_sampler(derivative: Derivative, x: torch.Tensor, config: SamplerConfig,
                randn_like=torch.randn_like, callback=None) -> torch.Tensor:
    """`sample` on the Karras schedule of `config`, with every setting taken from it."""
    levels = consistency_sigmas if config.solver == "consistency" else get_sigmas_karras
    sigmas = levels(config.num_steps, config.sigma_min, config.sigma_max, config.rho)
    return sample(derivative, x, sigmas, solver=config.solver, resamples=config.resamples,
                  s_churn=config.s_churn, s_tmin=config.s_tmin, s_tmax=config.s_tmax,
                  s_noise=config.s_noise, randn_like=randn_like, callback=callback)
