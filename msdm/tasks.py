"""Generation, source imputation and separation as derivative closures over one sampler.

MSDM paper Sec. 4.5 (generation, RePaint-style imputation) and Sec. 5 (Dirac and Gaussian
likelihood separation). A task is a `(derivative, finalize)` pair: the sampler integrates the
derivative, then `finalize` maps its output to the answer (the Dirac re-projection). Shapes: stems
[B, S, T], mixture [B, 1, T], sigma [B]. Closures are pure: they never write into sampler state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .regressor import project_residual
from .sampling import SamplerConfig, run_sampler, to_d

Generator = torch.Generator | Sequence[torch.Generator] | None


def make_randn_like(generator: Generator):
    """randn_like drawing from one generator, or from one generator per batch item.

    Per-item generators make every item's noise independent of the batch it was run in.
    """
    if generator is None:
        return torch.randn_like
    if isinstance(generator, torch.Generator):
        g = generator

        def randn_like(x):
            return torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype).to(x.device)

        return randn_like
    gens = list(generator)

    def randn_like_items(x):
        if x.shape[0] != len(gens):
            raise ValueError(f"got {len(gens)} generators for a batch of {x.shape[0]}")
        return torch.stack([
            torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device)
            for g in gens
        ])

    return randn_like_items


def item_generators(seeds: Sequence[int], device="cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _check(name: str, t, ndim: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have shape {what}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _sampler(config) -> SamplerConfig:
    if not isinstance(config, SamplerConfig):
        raise ValueError(f"config must be a msdm.SamplerConfig (e.g. cfg.sampler), "
                         f"got {type(config).__name__}")
    return config


def _device(denoiser, default="cpu"):
    for t in (*getattr(denoiser, "parameters", list)(), *getattr(denoiser, "buffers", list)()):
        return t.device
    return torch.device(default)


def unconditional(denoiser):
    """d = (x - D(x; sigma)) / sigma: the joint prior's ODE derivative."""
    return lambda x, sigma: to_d(x, sigma, denoiser(x, sigma))


@torch.no_grad()
def generate(denoiser, shape, config, generator: Generator = None, callback=None) -> torch.Tensor:
    """Total generation: sample all stems from the joint prior. Returns [B, S, T]."""
    cfg = _sampler(config)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (B, S, T) with positive sizes, got {tuple(shape)}")
    randn_like = make_randn_like(generator)
    x = randn_like(torch.empty(tuple(shape), device=_device(denoiser))) * cfg.sigma_max
    return run_sampler(unconditional(denoiser), x, cfg, randn_like, callback)


def _mask(known: Sequence[bool], num_stems: int, x: torch.Tensor) -> torch.Tensor:
    known = [bool(k) for k in known]
    if len(known) != num_stems:
        raise ValueError(f"known must have one flag per stem ({num_stems}), got {len(known)}")
    return torch.tensor(known, device=x.device, dtype=x.dtype)[None, :, None]  # [1, S, 1]


def replacement(denoiser, stems, mask, randn_like):
    """RePaint-style imputation: known stems replaced by stems + sigma * noise before each call."""

    def derivative(x, sigma):
        noisy = stems + sigma[:, None, None] * randn_like(stems)
        z = mask * noisy + (1 - mask) * x
        return to_d(z, sigma, denoiser(z, sigma))

    return derivative


def reconstruction_guidance(denoiser, stems, mask, randn_like, weight: float,
                            sigma_data: float = 0.2, max_scale: float = 100.0):
    """Replacement plus reconstruction guidance (Ho et al. 2022) with the EDM posterior width:
    the free stems also follow grad log N(stems; D_known(z), r^2), r^2 = s^2 sd^2 / (s^2 + sd^2),
    i.e. d += w (1 + s^2/sd^2) / (2 s) grad ||D_known(z) - stems||^2 (scale capped)."""

    def derivative(x, sigma):
        noisy = stems + sigma[:, None, None] * randn_like(stems)
        with torch.enable_grad():
            free = x.detach().requires_grad_(True)
            z = mask * noisy + (1 - mask) * free
            denoised = denoiser(z, sigma)
            err = ((denoised - stems) * mask).pow(2).sum()
            (grad,) = torch.autograd.grad(err, free)
        s = sigma[:, None, None]
        scale = torch.clamp(1 + s**2 / sigma_data**2, max=max_scale) * weight
        d = to_d(z.detach(), sigma, denoised.detach())
        return d + (1 - mask) * scale * grad / (2 * s)

    return derivative


@torch.no_grad()
def impute(denoiser, stems, known: Sequence[bool], config, generator: Generator = None,
           method: str = "replace", guidance: float = 1.0, sigma_data: float = 0.2,
           callback=None) -> torch.Tensor:
    """Partial generation: stems where `known[n]` is true are kept exactly, the rest are sampled
    conditionally. `method`: "replace" (paper, RePaint-style) or "guidance" (replacement plus
    reconstruction guidance of weight `guidance`; one extra backward pass per step).
    Returns [B, S, T]."""
    _check("stems", stems, 3, "[B, S, T]")
    cfg = _sampler(config)
    mask = _mask(known, stems.shape[1], stems)
    randn_like = make_randn_like(generator)
    if method == "replace":
        derivative = replacement(denoiser, stems, mask, randn_like)
    elif method == "guidance":
        derivative = reconstruction_guidance(denoiser, stems, mask, randn_like, guidance,
                                             sigma_data)
    else:
        raise ValueError(f"unknown imputation method {method!r}; expected 'replace' or 'guidance'")
    x = run_sampler(derivative, randn_like(stems) * cfg.sigma_max, cfg, randn_like, callback)
    return mask * stems + (1 - mask) * x


def project(x: torch.Tensor, mixture: torch.Tensor, k: int) -> torch.Tensor:
    """Set stem k to mixture - sum of the other stems, so the stems sum exactly to the mixture."""
    others = x.sum(dim=1, keepdim=True) - x[:, k : k + 1]
    return torch.cat([x[:, :k], mixture - others, x[:, k + 1 :]], dim=1)


def dirac_likelihood(denoiser, mixture, k: int):
    """Posterior derivative under p(y|x) = delta(y - sum x) (paper Alg. 1): d_n = e_n - e_k,
    with e = (z - D(z; sigma)) / sigma evaluated at the projected state z. The answer is the
    sampler output projected once more, so the stems sum exactly to the mixture."""

    def derivative(x, sigma):
        z = project(x, mixture, k)
        e = to_d(z, sigma, denoiser(z, sigma))
        return e - e[:, k : k + 1]

    return derivative, lambda x: project(x, mixture, k)


def dirac_sym_likelihood(denoiser, mixture):
    """The Dirac constraint with no constrained stem: the state is projected orthogonally onto
    the stems that sum to the mixture (the residual shared equally), and the derivative is
    e minus its mean over stems, e = (z - D(z; sigma)) / sigma (noise isotropic within that
    subspace). Under an exact Gaussian prior its samples match the posterior covariance within
    5 % (tested; measured, not derived). The paper's e_n - e_k is the same constraint in
    coordinates where stem k carries the other stems' noise (3x their variance for 4 stems)."""

    def finalize(x):
        return project_residual(x, mixture)

    def derivative(x, sigma):
        z = finalize(x)
        e = to_d(z, sigma, denoiser(z, sigma))
        return e - e.mean(dim=1, keepdim=True)

    return derivative, finalize


def consistency_function(denoiser, finalize):
    """A consistency model's map of a noisy state at sigma to clean stems (msdm.distill):
    f(x, sigma) = finalize(D(finalize(x), sigma)). With the Dirac `finalize` the state the model
    sees and the stems it returns both sum exactly to the mixture, so the model learns the
    mixture from its input and can never break the constraint. As sigma -> 0, D's EDM
    preconditioning (c_skip -> 1, c_out -> 0) makes f the identity: the boundary condition."""

    def f(x, sigma):
        return finalize(denoiser(finalize(x), sigma))

    return f


def jump_derivative(f):
    """The derivative whose Euler step to sigma 0 lands on f(x, sigma): what the consistency
    sampler integrates, so it shares the derivative interface of the other solvers."""
    return lambda x, sigma: to_d(x, sigma, f(x, sigma))


def gaussian_likelihood(denoiser, mixture, gamma: float):
    """d = (x - D(x))/sigma - sigma/(2 g^2) (y - sum x) for every stem, g = gamma * sigma."""

    def derivative(x, sigma):
        s = sigma[:, None, None]
        residual = mixture - x.sum(dim=1, keepdim=True)
        return to_d(x, sigma, denoiser(x, sigma)) - residual / (2 * gamma**2 * s)

    return derivative, lambda x: x


def likelihood_task(denoiser, mixture, num_stems: int, likelihood: str = "dirac",
                    constrained: int = 0, gamma: float = 0.75):
    """(derivative, finalize) of separation under `likelihood` (dirac, dirac_sym, gaussian):
    the one dispatch that `separate` and distillation (msdm.distill) share."""
    if likelihood == "dirac":
        return dirac_likelihood(denoiser, mixture, constrained % num_stems)
    if likelihood == "dirac_sym":
        return dirac_sym_likelihood(denoiser, mixture)
    return gaussian_likelihood(denoiser, mixture, gamma)


def draw_generators(generator: Generator, samples: int, batch: int) -> Generator:
    """Generators for `samples` draws of a batch laid out draw-major ([draw 0 items, draw 1
    items, ...]). Per-item generators each seed one child per draw, so an item's draws still do
    not depend on the batch it was run in; one generator (or None) serves the whole batch."""
    if generator is None or isinstance(generator, torch.Generator) or samples == 1:
        return generator
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch}")
    seeds = [[int(torch.randint(2**62, (1,), generator=g, device=g.device)) for _ in range(samples)]
             for g in gens]
    return [torch.Generator(device=g.device).manual_seed(seeds[i][d])
            for d in range(samples) for i, g in enumerate(gens)]


@torch.no_grad()
def separate(denoiser, mixture, num_stems: int, config, likelihood: str = "dirac",
             constrained: int = 0, generator: Generator = None, gamma: float = 0.75,
             callback=None, init: torch.Tensor | None = None, samples: int = 1,
             init_noise: float = 1.0) -> torch.Tensor:
    """Posterior sampling of the stems of `mixture` [B, 1, T]. Returns [B, S, T].

    Dirac: the output is re-projected after the last step, so the stems sum exactly to the mixture.
    `init` [B, S, T] (e.g. a regressor's estimate) starts the sampler from init + sigma_max * noise
    instead of pure noise (SDEdit-style refinement); `init_noise` scales that noise (0: the
    estimate itself is taken as the noisy state at sigma_max).
    `samples` > 1 returns the posterior-mean estimate instead of one sample: the average of that
    many independent posterior samples per mixture, drawn as one batch of samples x B (NFE and
    memory x samples). Its error to the true posterior mean shrinks as 1 / samples; under a
    Gaussian prior the squared error to the true stems falls from 2 to (1 + 1/samples) times the
    posterior variance. Dirac samples each sum to the mixture, so their mean does too.
    With samples > 1, `callback` sees the whole batch [samples x B, S, T] (draw d of item i at
    row d * B + i), and per-item generators seed one child generator per draw, so draw 0 is not
    the samples = 1 result.
    """
    _check("mixture", mixture, 3, "[B, 1, T]")
    if mixture.shape[1] != 1:
        raise ValueError(f"mixture must be mono [B, 1, T], got {tuple(mixture.shape)}; "
                         "downmix multichannel audio first")
    if not isinstance(num_stems, int) or num_stems < 1:
        raise ValueError(f"num_stems must be a positive integer, got {num_stems!r}")
    cfg = _sampler(config)
    b, _, t = mixture.shape
    if likelihood not in ("dirac", "dirac_sym", "gaussian"):
        raise ValueError(f"unknown likelihood {likelihood!r}; expected 'dirac', 'dirac_sym' "
                         "or 'gaussian'")
    if likelihood == "dirac" and not -num_stems <= constrained < num_stems:
        raise ValueError(f"constrained must index one of {num_stems} stems, got {constrained}")
    if likelihood == "gaussian" and gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    if init is not None:
        _check("init", init, 3, f"[{b}, {num_stems}, {t}]")
        if init.shape != (b, num_stems, t):
            raise ValueError(f"init must have shape [{b}, {num_stems}, {t}], "
                             f"got {tuple(init.shape)}")
    if not 0 <= init_noise <= 1:
        raise ValueError(f"init_noise must be in [0, 1], got {init_noise}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if samples > 1:  # one batch of samples x B: draw d of item i at row d * B + i
        generator = draw_generators(generator, samples, b)
        mixture = mixture.repeat(samples, 1, 1)
        init = init.repeat(samples, 1, 1) if init is not None else None
    derivative, finalize = likelihood_task(denoiser, mixture, num_stems, likelihood, constrained,
                                           gamma)
    if cfg.solver == "consistency":  # a distilled student: jumps to the clean stems
        derivative = jump_derivative(consistency_function(denoiser, finalize))
    randn_like = make_randn_like(generator)
    x = randn_like(mixture.expand(mixture.shape[0], num_stems, t)) * cfg.sigma_max
    if init is not None:
        x = init.to(x) + x * init_noise
    out = finalize(run_sampler(derivative, x, cfg, randn_like, callback))
    return out.reshape(samples, b, num_stems, t).mean(0) if samples > 1 else out
