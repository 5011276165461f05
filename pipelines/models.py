"""Checkpoints on a device, and the one separation path every job uses (evaluate, tune, separate).

`Separator` holds (config, model, device) and separates a batch of mono mixtures with one seed
per item, derived from item keys such as (track, chunk): results do not depend on batch size or
worker count. bf16 autocast runs on CUDA; the sampler state stays float32. A regressor
checkpoint (model.kind hdemucs) separates in one pass; `separation.init` (--init) names a
regressor whose estimate starts the diffusion sampler. No Ray import.
"""

from __future__ import annotations

import io
import math
import zlib

import numpy as np
import torch

from msdm.checkpoint import (
    CheckpointError,
    check_size,
    load_checkpoint,
    load_factorized,
    load_state,
)
from msdm.config import Config
from msdm.regressor import project_residual
from msdm.sampling import nfe
from msdm.stereo import mask_refine
from msdm.tasks import item_generators, separate
from msdm.training import autocast

from . import storage


def stable_seed(*parts) -> int:
    """A seed from names and indices, identical in every process (unlike hash())."""
    return zlib.crc32(":".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def pick_device(num_gpus: float) -> str:
    """"cuda" when GPUs were requested; a requested GPU that is not usable is an error."""
    if not num_gpus:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"{num_gpus} GPU(s) requested but CUDA is not usable here "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                           "check the NVIDIA driver (>= 580 for CUDA 13 wheels) or request 0 GPUs")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 parts
    return "cuda"


def load_model(ckpt, device: str = "cpu"):
    """(cfg, denoiser) from a joint checkpoint URI or {stem: URI} (ISDM), on `device`."""
    def fetch(uri):
        return io.BytesIO(storage.read_bytes(uri))

    if isinstance(ckpt, dict):
        cfg, den = load_factorized({s: fetch(u) for s, u in ckpt.items()}, None, device,
                                   names=dict(ckpt))
    else:
        cfg, den = load_checkpoint(fetch(ckpt), map_location=device, name=str(ckpt))
    return cfg, den.to(device)


def separation_nfe(cfg: Config) -> int:
    """Model evaluations per segment: 1 for a regressor, the sampler's NFE times
    `separation.samples` (+ 1 with --init)."""
    if cfg.model.kind == "hdemucs":
        return 1
    return nfe(cfg.sampler) * cfg.separation.samples + (1 if cfg.separation.init else 0)


def check_init(cfg: Config) -> None:
    """Validate `separation.init` (--init) in the driver, before Ray starts: a readable regressor
    checkpoint with the data.stems and data.sample_rate of the model it initialises."""
    uri = cfg.separation.init
    if not uri:
        return
    if cfg.model.kind == "hdemucs":
        raise CheckpointError(f"--init {uri}: --ckpt is itself a regressor; --init starts a "
                              "diffusion checkpoint's sampler from a regressor's estimate")
    try:
        state = load_state(io.BytesIO(storage.read_bytes(uri)), name=f"--init {uri}")
    except storage.StorageError as e:
        raise CheckpointError(f"--init {uri}: cannot read the regressor checkpoint ({e})") from e
    other: Config = state["config"]
    check_size(other, f"--init {uri}")
    if other.model.kind != "hdemucs":
        raise CheckpointError(f"--init {uri} is a model.kind {other.model.kind} checkpoint; "
                              "--init needs a regressor (pipelines.train --set model.kind=hdemucs)")
    for key in ("stems", "sample_rate"):
        mine, theirs = getattr(cfg.data, key), getattr(other.data, key)
        if mine != theirs:
            raise CheckpointError(f"--init {uri}: its data.{key} {_show(theirs)} differs from "
                                  f"the --ckpt model's {_show(mine)}")


def _show(value):
    return list(value) if isinstance(value, tuple) else value


class Separator:
    """Separate mono mixtures [B, T] with the checkpoint's network and the sampler, likelihood
    and constrained stem of `cfg` (the resolved config of the job). A regressor checkpoint runs
    once per batch; with `cfg.separation.init` the regressor's estimate (loaded once here)
    starts the sampler at init + sigma_max * noise. `threads` > 0: torch threads on CPU."""

    def __init__(self, ckpt, cfg: dict | Config, num_gpus: float = 0, seed: int = 0,
                 threads: int = 0):
        self.device = pick_device(num_gpus)
        if threads and self.device == "cpu":  # Ray pins an actor to OMP_NUM_THREADS = its CPUs
            torch.set_num_threads(threads)
        _, self.denoiser = load_model(ckpt, self.device)
        self.cfg = cfg if isinstance(cfg, Config) else Config.from_dict(cfg)
        self.seed = seed
        self.init = None
        if self.cfg.separation.init and self.cfg.model.kind != "hdemucs":
            _, self.init = load_model(self.cfg.separation.init, self.device)

    def regress(self, model, mixture: torch.Tensor) -> torch.Tensor:
        """A regressor's estimate [B, S, T] of mixture [B, 1, T], with the residual spread
        equally over the stems (`project_residual`), so the stems sum to the mixture."""
        return project_residual(model(mixture), mixture)

    def __call__(self, mixture, keys) -> np.ndarray:
        """mixture [B, T] (numpy or torch), keys: one tuple per item -> stems [B, S, T]."""
        mix = torch.from_numpy(np.array(mixture, np.float32))  # a writable copy
        if mix.ndim != 2 or mix.shape[0] != len(keys):
            raise ValueError(f"need mixtures [B, T] with one key per item, got "
                             f"{tuple(mix.shape)} and {len(keys)} keys")
        seeds = [stable_seed(self.seed, *k) for k in keys]
        cfg, mixture = self.cfg, mix[:, None].to(self.device)  # [B, 1, T]
        with torch.no_grad(), autocast(torch.device(self.device), cfg.train.bf16):
            if cfg.model.kind == "hdemucs":  # one forward pass (NFE 1)
                return self.regress(self.denoiser, mixture).float().cpu().numpy()
            init = self.regress(self.init, mixture) if self.init is not None else None
            est = separate(self.denoiser, mixture, len(cfg.data.stems),
                           cfg.sampler, likelihood=cfg.separation.likelihood,
                           constrained=cfg.separation.constrained, gamma=cfg.separation.gamma,
                           generator=item_generators(seeds, self.device), init=init,
                           samples=cfg.separation.samples,
                           init_noise=cfg.separation.init_noise)
            if cfg.separation.mask_power > 0:  # default: ~93 ms frames at the model's rate
                n_fft = cfg.separation.mask_nfft or 1 << round(
                    math.log2(4096 * cfg.data.sample_rate / 44100))
                est = mask_refine(est, mixture, cfg.separation.mask_power, n_fft)
        return est.float().cpu().numpy()
