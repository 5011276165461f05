"""Training loop pieces: optimizer, one training step, deterministic validation loss.

No DDP and no Ray here: `pipelines/train.py` wraps these in Ray Train. Paper Sec. 3.1: Adam
1e-4, betas (0.9, 0.99), per-example sigma with ln sigma ~ N(-3, 1), bf16 autocast on GPU.
`model.kind` hdemucs trains the regressor with a waveform L1 loss instead (`msdm.regressor`);
optimizer, schedule and EMA are shared.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from .config import Config
from .diffusion import edm_loss, ema_update, sample_training_sigmas
from .regressor import regression_loss


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.Adam(model.parameters(), lr=t.lr, betas=t.betas, eps=t.eps,
                            weight_decay=t.weight_decay)


def lr_at(step: int, t) -> float:
    """Learning rate at `step` for the `train` config `t`: linear warm-up over warmup_steps,
    then constant or a cosine decay to lr * lr_min_ratio at max_steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    floor = t.lr * t.lr_min_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay_at(step: int, t) -> float:
    """EMA decay at `step`: ema_decay, or with ema_warmup min(ema_decay, (1 + step)/(10 + step))
    so a short run's average is not dominated by its random initial weights."""
    return min(t.ema_decay, (1 + step) / (10 + step)) if t.ema_warmup else t.ema_decay


def make_ema(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(getattr(model, "module", model))
    return ema.eval().requires_grad_(False)


def compile_model(model: nn.Module) -> nn.Module:
    """torch.compile `model` in place (nn.Module.compile): its state_dict keys, and so its
    checkpoints, stay those of the eager module. Shapes are static during training."""
    model.compile(dynamic=False)
    return model


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (paper: Lightning "bf16"); a no-op on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(denoiser: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer,
               cfg: Config, generator: torch.Generator | None = None,
               ema: nn.Module | None = None, step: int = 0) -> torch.Tensor:
    """One optimisation step (number `step`, which sets the learning rate and EMA decay) on a
    batch x [B, S, T]; returns the (detached) mean loss."""
    if x.ndim != 3:
        raise ValueError(f"training batch must be [B, S, T], got {tuple(x.shape)}")
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg.train)
    with autocast(x.device, cfg.train.bf16):
        if cfg.model.kind == "hdemucs":  # the model is a mixture -> stems regressor
            loss = regression_loss(denoiser, x).mean()
        else:
            d = cfg.diffusion
            sigma = sample_training_sigmas(x.shape[0], d.p_mean, d.p_std, generator)
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            loss = edm_loss(denoiser, x, sigma.to(x.device), noise, d.sigma_data).mean()
    return apply_gradients(denoiser, loss, optimizer, cfg, ema, step)


def apply_gradients(model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                    cfg: Config, ema: nn.Module | None = None, step: int = 0) -> torch.Tensor:
    """Backward of the scalar `loss`, `train.grad_clip`, the optimizer step and the EMA update
    at `step` (the end of every training step: train_step, msdm.distill.distill_step). `model`
    may be DDP-wrapped. Returns the detached loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    if ema is not None:
        ema_update(ema, getattr(model, "module", model), ema_decay_at(step, cfg.train))
    return loss.detach()


@torch.no_grad()
def validation_loss(denoiser: nn.Module, x: torch.Tensor, cfg: Config,
                    batch_size: int = 8) -> dict[str, float]:
    """Loss on fixed chunks x [N, S, T] at each sigma of `train.val_sigmas`, with fixed noise.

    Deterministic for given weights and chunks, so checkpoint selection means something.
    Returns {"val_loss": mean over the grid, "val_loss@<sigma>": ...}; for a regressor
    (model.kind hdemucs) {"val_loss": mean waveform L1}.
    """
    if cfg.model.kind == "hdemucs":
        total = sum(float(regression_loss(denoiser, x[i : i + batch_size]).sum())
                    for i in range(0, x.shape[0], batch_size))
        return {"val_loss": total / max(x.shape[0], 1)}
    d = cfg.diffusion
    out: dict[str, float] = {}
    gen = torch.Generator().manual_seed(cfg.train.seed)
    for s in cfg.train.val_sigmas:
        total, n = 0.0, 0
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size]
            noise = torch.randn(xb.shape, generator=gen).to(xb.device)
            sigma = torch.full((xb.shape[0],), s, device=xb.device)
            with autocast(xb.device, cfg.train.bf16):
                total += float(edm_loss(denoiser, xb, sigma, noise, d.sigma_data).sum())
            n += xb.shape[0]
        out[f"val_loss@{s:g}"] = total / max(n, 1)
    out["val_loss"] = sum(out.values()) / len(cfg.train.val_sigmas)
    return out
