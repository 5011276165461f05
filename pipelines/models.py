"""Checkpoints on a device, and the one separation path every job uses (evaluate, tune, separate).

`Separator` holds (config, denoiser, device) and separates a batch of mono mixtures with one seed
per item, derived from item keys such as (track, chunk): results do not depend on batch size or
worker count. bf16 autocast runs on CUDA; the sampler state stays float32. No Ray import.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
import torch

from msdm.checkpoint import load_checkpoint, load_factorized
from msdm.config import Config
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


class Separator:
    """Separate mono mixtures [B, T] with the checkpoint's network and the sampler, likelihood
    and constrained stem of `cfg` (the resolved config of the job)."""

    def __init__(self, ckpt, cfg: dict | Config, num_gpus: float = 0, seed: int = 0):
        self.device = pick_device(num_gpus)
        _, self.denoiser = load_model(ckpt, self.device)
        self.cfg = cfg if isinstance(cfg, Config) else Config.from_dict(cfg)
        self.seed = seed

    def __call__(self, mixture, keys) -> np.ndarray:
        """mixture [B, T] (numpy or torch), keys: one tuple per item -> stems [B, S, T]."""
        mix = torch.from_numpy(np.array(mixture, np.float32))  # a writable copy
        if mix.ndim != 2 or mix.shape[0] != len(keys):
            raise ValueError(f"need mixtures [B, T] with one key per item, got "
                             f"{tuple(mix.shape)} and {len(keys)} keys")
        seeds = [stable_seed(self.seed, *k) for k in keys]
        cfg = self.cfg
        with autocast(torch.device(self.device), cfg.train.bf16):
            est = separate(self.denoiser, mix[:, None].to(self.device), len(cfg.data.stems),
                           cfg.sampler, likelihood=cfg.separation.likelihood,
                           constrained=cfg.separation.constrained, gamma=cfg.separation.gamma,
                           generator=item_generators(seeds, self.device))
        return est.float().cpu().numpy()
