"""Checkpoints on a device for the jobs, and the one separation path every job uses (evaluate,
tune, separate): `msdm.separator.Separator`, built here from job arguments.

The Separator holds (config, model, device) and separates a batch of mono mixtures with one
seed per item, derived from item keys such as (track, chunk): results do not depend on batch
size or worker count. bf16 autocast runs on CUDA; the sampler state stays float32. A regressor
checkpoint (model.kind hdemucs) separates in one pass; `separation.init` (--init) names a
regressor whose estimate starts the diffusion sampler. No Ray import.
"""

from __future__ import annotations

import io

import torch

from msdm import separator
from msdm.checkpoint import (
    CheckpointError,
    check_size,
    load_checkpoint,
    load_factorized,
    load_state,
)
from msdm.config import Config
from msdm.separator import pick_device, separation_nfe, stable_seed  # noqa: F401 - re-exported

from . import storage


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


class Separator(separator.Separator):
    """`msdm.separator.Separator` built from job arguments: checkpoint URIs through the job's
    storage (S3 timeouts and retries), a {stem: URI} mapping for ISDM, the --init regressor,
    `num_gpus` and torch `threads` of a Ray actor."""

    def __init__(self, ckpt, cfg: dict | Config, num_gpus: float = 0, seed: int = 0,
                 threads: int = 0):
        device = pick_device(num_gpus)
        if threads and device == "cpu":  # Ray pins an actor to OMP_NUM_THREADS = its CPUs
            torch.set_num_threads(threads)
        _, denoiser = load_model(ckpt, device)
        cfg = cfg if isinstance(cfg, Config) else Config.from_dict(cfg)
        init = None
        if cfg.separation.init and cfg.model.kind != "hdemucs":
            _, init = load_model(cfg.separation.init, device)
        super().__init__(cfg, denoiser, device, seed, init)
