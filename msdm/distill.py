"""Consistency distillation of a separating score model into a few-step separator.

Consistency distillation (Song et al. 2023) in the EDM parametrisation, applied to the teacher's
Dirac separation ODE (MSDM paper Alg. 1; Karchkhadze et al. 2024 distil diffusion separation on
Slakh's four stems). The student is an ordinary EDM denoiser D_theta (same network, started from
the teacher's weights); its consistency function is

    f_theta(x, sigma) = P(D_theta(P(x), sigma)),   P = the Dirac projection onto sum = mixture,

so every state it sees and every answer it gives sum exactly to the mixture (`msdm.tasks.
consistency_function`). One training example: clean stems x0 from the data, y = sum x0, a pair of
adjacent Karras levels sigma_n > sigma_{n+1} and noise e:

    x_n      = P(x0 + sigma_n e)                            (a state on the Dirac sampler's path)
    x_{n+1}  = one teacher ODE step (Heun or Euler) from sigma_n to sigma_{n+1}
    loss     = w_n |f_theta(x_n, sigma_n) - f_target(x_{n+1}, sigma_{n+1})|^2 / sigma_data^2
               + data_weight |f_theta(x_n, sigma_n) - x0|^2 / sigma_data^2

with w_n = mean gap / (sigma_n - sigma_{n+1}) (improved consistency training's 1 / gap) and the
target network an EMA of the student (`distill.target_decay`; 0 = the student under
stop-gradient). The trained student separates with `SamplerConfig(solver="consistency")`: jump
to sigma 0, re-noise to the next level, 1-4 network evaluations in all. No Ray here:
`pipelines/distill.py` runs these steps under Ray Train.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from .config import Config, ConfigError
from .diffusion import ema_update
from .metrics import si_sdri
from .sampling import SamplerConfig, get_sigmas_karras
from .tasks import consistency_function, item_generators, likelihood_task, separate
from .training import apply_gradients, autocast, lr_at

SUMMING = ("dirac", "dirac_sym")  # likelihoods whose stems sum exactly to the mixture
ACTIVE_RMS = 1e-3  # validation: a chunk's stem counts when its RMS is above this


def is_student(cfg: Config) -> bool:
    """A checkpoint written by `pipelines.distill` (its config names the teacher)."""
    return bool(cfg.distill.teacher)


def check_teacher(cfg: Config, name: str = "teacher") -> None:
    """Refuse teachers whose separation ODE cannot be distilled, naming the reason."""
    if cfg.model.kind == "hdemucs":
        raise ConfigError(f"{name} is a regressor (model.kind hdemucs): it has no score and no "
                          "separation ODE to distil; give a diffusion (unet) checkpoint")
    if cfg.train.stem:
        raise ConfigError(f"{name} is a single-stem (ISDM) prior of {cfg.train.stem!r}; "
                          "distillation needs the joint model of all stems")
    if is_student(cfg):
        raise ConfigError(f"{name} is itself a distilled student (of {cfg.distill.teacher}): its "
                          "network returns the end of a separation trajectory, not the "
                          "denoiser E[x0 | x_sigma] that the teacher's ODE step needs; distil "
                          "from the original teacher")
    if cfg.separation.likelihood not in SUMMING:
        raise ConfigError(f"separation.likelihood {cfg.separation.likelihood!r}: distillation "
                          f"keeps the stems summing to the mixture, so it needs one of {SUMMING}")


def scales(d, device="cpu") -> torch.Tensor:
    """The N Karras levels sigma_max = s_0 > ... > s_{N-1} = sigma_min (no trailing 0)."""
    return get_sigmas_karras(d.num_scales, d.sigma_min, d.sigma_max, d.rho, device)[:-1]


def likelihood(denoiser, mixture: torch.Tensor, cfg: Config):
    """(derivative, finalize) of the Dirac separation task of `cfg.separation`."""
    sep = cfg.separation
    if sep.likelihood not in SUMMING:
        raise ConfigError(f"separation.likelihood {sep.likelihood!r}: distillation needs one of "
                          f"{SUMMING}")
    return likelihood_task(denoiser, mixture, len(cfg.data.stems), sep.likelihood,
                           sep.constrained)


@torch.no_grad()
def teacher_step(derivative, finalize, x: torch.Tensor, sigma: torch.Tensor,
                 sigma_next: torch.Tensor, solver: str = "heun") -> torch.Tensor:
    """One ODE step of the teacher's separation sampler from sigma to sigma_next (both [B],
    sigma_next > 0), projected onto the mixture: Euler, or Heun's second-order correction."""
    h = (sigma_next - sigma)[:, None, None]
    d = derivative(x, sigma)
    x_next = x + h * d
    if solver == "heun":
        x_next = x + h * (d + derivative(x_next, sigma_next)) / 2
    elif solver != "euler":
        raise ValueError(f"teacher solver {solver!r}: expected 'heun' or 'euler'")
    return finalize(x_next)


def consistency_loss(student: nn.Module, target: nn.Module, teacher: nn.Module,
                     x0: torch.Tensor, cfg: Config, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-example distillation loss [B] on clean stems x0 [B, S, T], and its mean parts
    ({"consistency": ..., "data": ...}) for the progress line."""
    if x0.ndim != 3 or x0.shape[1] != len(cfg.data.stems):
        raise ValueError(f"expected stems [B, {len(cfg.data.stems)}, T], got {tuple(x0.shape)}")
    d, sd2 = cfg.distill, cfg.diffusion.sigma_data ** 2
    levels = scales(d, x0.device)
    b = x0.shape[0]
    n = torch.randint(d.num_scales - 1, (b,), generator=generator).to(x0.device)
    sigma, sigma_next = levels[n], levels[n + 1]
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    mixture = x0.sum(dim=1, keepdim=True)
    t_derivative, finalize = likelihood(teacher, mixture, cfg)
    x = finalize(x0 + sigma[:, None, None] * noise)
    with torch.no_grad():
        x_next = teacher_step(t_derivative, finalize, x, sigma, sigma_next, d.solver)
        goal = consistency_function(target, finalize)(x_next, sigma_next).float()
    pred = consistency_function(student, finalize)(x, sigma).float()
    gap = sigma - sigma_next
    weight = (levels[0] - levels[-1]) / (d.num_scales - 1) / gap
    cons = weight * (pred - goal).pow(2).mean(dim=(1, 2)) / sd2
    data = (pred - x0.float()).pow(2).mean(dim=(1, 2)) / sd2
    loss = cons + d.data_weight * data if d.data_weight else cons
    return loss, {"consistency": float(cons.detach().mean()), "data": float(data.detach().mean())}


def make_target(student: nn.Module, cfg: Config) -> nn.Module | None:
    """theta^-: a frozen copy of the student to keep as its EMA, or None with target_decay 0
    (the target is then the student itself under stop-gradient)."""
    if not cfg.distill.target_decay:
        return None
    return copy.deepcopy(getattr(student, "module", student)).requires_grad_(False)


def distill_step(student: nn.Module, target: nn.Module | None, teacher: nn.Module,
                 x0: torch.Tensor, optimizer: torch.optim.Optimizer, cfg: Config,
                 generator: torch.Generator | None = None, ema: nn.Module | None = None,
                 step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimisation step of the student; updates the EMA target (`make_target`; None: the
    student itself) and the export EMA. Returns the detached mean loss and its parts.
    `student` may be DDP-wrapped."""
    module = getattr(student, "module", student)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg.train)
    with autocast(x0.device, cfg.train.bf16):
        loss, parts = consistency_loss(student, module if target is None else target, teacher,
                                       x0, cfg, generator)
    loss = apply_gradients(student, loss.mean(), optimizer, cfg, ema, step)
    if target is not None:
        ema_update(target, module, cfg.distill.target_decay)
    return loss, parts


def student_sampler(cfg: Config) -> SamplerConfig:
    """The few-step sampler a student checkpoint carries: `distill.steps` consistency steps
    from distill.sigma_max."""
    d = cfg.distill
    return SamplerConfig(num_steps=d.steps, sigma_min=d.sigma_min, sigma_max=d.sigma_max,
                         rho=d.rho, s_churn=0.0, resamples=1, solver="consistency")


def student_config(cfg: Config, teacher: str) -> Config:
    """The config of a student of `teacher`: the teacher's network, data and separation
    settings, the distillation settings, and the consistency sampler as its own sampler."""
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher=teacher))
    return dataclasses.replace(cfg, sampler=student_sampler(cfg))


@torch.no_grad()
def validation_error(student: nn.Module, x: torch.Tensor, cfg: Config,
                     batch_size: int = 8) -> dict[str, float]:
    """The student's separation of fixed chunks x [N, S, T] (mixture = their sum) with its own
    few-step sampler and fixed per-chunk seeds: deterministic for given weights. Returns
    {"val_loss": minus the mean SI-SDRi in dB over the (chunk, stem) pairs whose stem is
    active, so lower is better as for training; "val_si_sdri": that mean}. The normalised
    squared error would rank students by their loudest stems only."""
    total, count = 0.0, 0
    sep = cfg.separation
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size].float()
        mixture = xb.sum(dim=1, keepdim=True)
        with autocast(xb.device, cfg.train.bf16):
            est = separate(student, mixture, xb.shape[1], cfg.sampler,
                           likelihood=sep.likelihood, constrained=sep.constrained,
                           generator=item_generators(range(i, i + xb.shape[0]), xb.device))
        active = xb.pow(2).mean(dim=-1).sqrt() > ACTIVE_RMS  # [B, S]
        gains = si_sdri(est.float(), xb, mixture)
        total += float(gains[active].sum())
        count += int(active.sum())
    mean = total / max(count, 1)
    return {"val_loss": -mean, "val_si_sdri": mean}
