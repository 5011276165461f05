"""Checkpoints: {format_version, config, model, ema, step, optimizer, extra} as plain tensors.

Files load with `torch.load(weights_only=True)`: no pickled classes, so renaming code never breaks
them. `format_version` is bumped when the layout changes. Paths or binary file objects are accepted
(pipelines open `s3://` URIs and hand the file object over). Released MSDM checkpoints (PyTorch
Lightning files) are read and converted by `msdm.released`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
from pathlib import Path

import torch
from torch import nn

from . import released
from .config import Config, ConfigError, get_preset
from .diffusion import Denoiser, FactorizedDenoiser
from .model import build_network, count_parameters
from .regressor import Regressor

FORMAT_VERSION = 2  # 2: model.attention_bias and model.patch_groups (release parity)
# format 1 networks had biased attention/feed-forward outputs and resnet_groups patch norms
_V1_MODEL = {"attention_bias": True, "patch_groups": "resnet_groups"}
ISDM_S_CHURN = 40.0  # paper: ISDM Dirac separation uses S_churn 40 (MSDM: 20)
MAX_PARAMETERS_FACTOR = 4  # refuse networks larger than 4x the paper preset before allocating
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A file that is not a readable msdm checkpoint."""


def build_denoiser(cfg: Config, num_stems: int | None = None) -> nn.Module:
    """An untrained denoiser D(x; sigma) for `cfg`: the U-Net inside EDM preconditioning."""
    net = build_network(cfg.model, num_stems or cfg.num_stems)
    return Denoiser(net, cfg.diffusion.sigma_data, cfg.diffusion.clamp)


def build_model(cfg: Config) -> nn.Module:
    """An untrained model of `cfg.model.kind`: the EDM denoiser D(x; sigma) (unet) or the
    mixture -> stems `Regressor` (hdemucs). Checkpoints of either kind save and load alike."""
    if cfg.model.kind == "hdemucs":
        return Regressor(cfg.model, cfg.num_stems)
    return build_denoiser(cfg)


def parameter_count(cfg: Config) -> int:
    """Parameters of the network `cfg` describes, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return count_parameters(build_model(cfg))


@functools.lru_cache(maxsize=1)
def max_parameters() -> int:
    return MAX_PARAMETERS_FACTOR * parameter_count(get_preset("paper"))


def save(target, cfg: Config, model: nn.Module, ema: nn.Module | None = None, step: int = 0,
         optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None) -> None:
    """Write a checkpoint to a path or binary file object. Paths are written then renamed."""
    state = {
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "model": _unwrap(model).state_dict(),
        "ema": _unwrap(ema).state_dict() if ema is not None else None,
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra or {},
    }
    if isinstance(target, (str, Path)):
        path = Path(target)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
    else:
        torch.save(state, target)


def _unwrap(m: nn.Module) -> nn.Module:
    return getattr(m, "module", m)  # DDP


def load_state(source, map_location="cpu", name: str | None = None, stem: str = "") -> dict:
    """Read and validate a checkpoint dict; a corrupt, foreign or malformed file raises
    CheckpointError naming it. Nothing in the file is executed (a restricted unpickler).

    A released MSDM checkpoint (PyTorch Lightning) is converted on the fly (`msdm.released`);
    `stem` names the stem of a single-stem (weakly MSDM) one.
    """
    name = name or (str(source) if isinstance(source, (str, Path)) else "checkpoint stream")
    if isinstance(source, (str, Path)):
        if Path(source).is_dir():
            raise CheckpointError(f"{name} is a folder, not a checkpoint file")
        if not Path(source).exists():
            raise CheckpointError(f"{name}: no such checkpoint file")
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        state = released.safe_load(source, map_location)
    except Exception as e:  # zip/pickle errors differ by torch version; all mean "not ours"
        raise CheckpointError(f"{name} is not a readable msdm checkpoint "
                              f"({type(e).__name__}: {str(e)[:200]})") from e
    if released.is_lightning(state):
        try:
            state = released.convert(state, stem)
        except ValueError as e:
            raise CheckpointError(f"{name}: {e}") from e
    if not isinstance(state, dict) or "format_version" not in state or "config" not in state:
        raise CheckpointError(f"{name} is not an msdm checkpoint (missing format_version/config)")
    version = state["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{name}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{name} has format_version {version}; this msdm "
                              f"reads up to {FORMAT_VERSION}: upgrade msdm")
    for key in ("model", "ema"):
        if not isinstance(state.get(key), dict) and not (key == "ema" and state.get(key) is None):
            raise CheckpointError(f"{name}: '{key}' must be a dict of tensors, "
                                  f"got {type(state.get(key)).__name__}")
    cfg_dict = state["config"]
    if version < 2 and isinstance(cfg_dict, dict):  # format 1: the layout before release parity
        if isinstance(cfg_dict.get("model"), dict):
            cfg_dict["model"] = {**_V1_MODEL, **cfg_dict["model"]}
        if isinstance(cfg_dict.get("train"), dict):
            cfg_dict["train"].pop("fault_step", None)  # a removed test hook
    try:
        state["config"] = Config.from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"{name}: stored config does not match this msdm: {e}") from e
    state["step"] = state.get("step") if isinstance(state.get("step"), int) else 0
    state["extra"] = state.get("extra") if isinstance(state.get("extra"), dict) else {}
    return state


def check_size(cfg: Config, name: str = "checkpoint") -> int:
    """Refuse a config whose network is larger than the cap, before any memory is allocated."""
    count, cap = parameter_count(cfg), max_parameters()
    if count > cap:
        raise CheckpointError(f"{name}: its config describes a {count / 1e6:.0f} M-parameter "
                              f"network, above the cap of {cap / 1e6:.0f} M "
                              f"({MAX_PARAMETERS_FACTOR}x the paper preset); refusing to build it")
    return count


def load_checkpoint(source, use_ema: bool = True, map_location="cpu", name: str | None = None,
                    stem: str = ""):
    """Load a checkpoint as (cfg, model) in eval mode, EMA weights by default: a denoiser, or a
    `Regressor` when `cfg.model.kind` is hdemucs.

    `stem`: the stem of a released single-stem (weakly MSDM) checkpoint; ignored otherwise.
    """
    name = name or (str(source) if isinstance(source, (str, Path)) else "checkpoint stream")
    state = load_state(source, map_location, name, stem)
    cfg: Config = state["config"]
    check_size(cfg, name)
    denoiser = build_model(cfg)
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    try:
        denoiser.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{name}: weights do not fit its config: {str(e)[:300]}") from e
    return cfg, denoiser.to(map_location).eval().requires_grad_(False)


def load_factorized(sources: dict[str, object], stems=None, map_location="cpu",
                    names: dict[str, str] | None = None):
    """ISDM: one single-stem checkpoint per stem -> (joint cfg, FactorizedDenoiser).

    `sources` maps stem name -> path/file. Every stem of the checkpoints' `data.stems` (or of
    `stems`, if given) must have exactly one checkpoint, each checkpoint must be the single-stem
    prior of the stem it is given for, and all must share one sample rate and chunk length.
    """
    loaded = {}
    for stem, src in sources.items():
        cfg, den = load_checkpoint(src, map_location=map_location,
                                   name=(names or {}).get(stem), stem=stem)
        if cfg.train.stem != stem:
            got = cfg.train.stem or "a joint model of " + ",".join(cfg.data.stems)
            raise CheckpointError(f"checkpoint given for stem {stem!r} is a prior of {got}")
        loaded[stem] = (cfg, den)
    if not loaded:
        raise CheckpointError("ISDM needs one single-stem checkpoint per stem; none given")
    stems = tuple(stems or next(iter(loaded.values()))[0].data.stems)
    missing = [s for s in stems if s not in loaded]
    extra = [s for s in loaded if s not in stems]
    if missing or extra:
        raise CheckpointError(f"ISDM needs one checkpoint per stem {list(stems)}; "
                              f"missing {missing}, unexpected {extra}")
    cfgs = [loaded[s][0] for s in stems]
    for key in ("sample_rate", "chunk_samples"):
        values = {getattr(c.data, key) for c in cfgs}
        if len(values) > 1:
            raise CheckpointError(f"ISDM checkpoints disagree on data.{key}: {sorted(values)}")
    base = cfgs[0]
    cfg = dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, stems=stems),
        train=dataclasses.replace(base.train, stem=""),
        sampler=dataclasses.replace(base.sampler, s_churn=ISDM_S_CHURN),
    )
    return cfg, FactorizedDenoiser([loaded[s][1] for s in stems]).eval()
