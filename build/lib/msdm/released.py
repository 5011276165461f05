"""Import the released MSDM checkpoints (Mariani et al., ICLR 2024): PyTorch Lightning `.ckpt`
files of an audio-diffusion-pytorch (ADP) 0.0.43 `AudioDiffusionModel`.

Read without Lightning or ADP and without running code from the file: torch's weights-only
unpickler rebuilds tensors and plain containers, Lightning's `AttributeDict` and ADP's
`LogNormalDistribution` as inert stand-ins, and any other object as an inert `Foreign` record.
Calling anything but numpy's array rebuilders is refused, and so is a `Foreign` inside
`state_dict` or `hyper_parameters`; elsewhere (e.g. Lightning's datamodule hparams) it is dropped.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import threading
from pathlib import Path

import torch

from .config import STEMS, Config, ConfigError, merge

FORMAT_VERSION = 2  # msdm.checkpoint format_version whose layout `convert` writes
log = logging.getLogger(__name__)


class AttributeDict:
    """Stand-in for Lightning's AttributeDict (a dict subclass): unpickled as a plain dict,
    since torch's weights-only unpickler fills plain dicts only."""

    def __new__(cls, *args):
        return {}


class LogNormalDistribution:
    """Stand-in for ADP's LogNormalDistribution: ln sigma ~ N(mean, std^2), data only."""

    mean = std = None


class Foreign:
    """An object of a class msdm does not know, kept as inert data: never imported or called."""

    name = "?"

    def __new__(cls, *args):
        obj = object.__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args):  # only pickle's REDUCE (a call) gets here, NEWOBJ does not
        if not self.name.startswith("numpy."):  # numpy arrays and scalars are rebuilt by calls
            raise pickle.UnpicklingError(f"refusing to call {self.name} from a checkpoint")

    def __setstate__(self, state):
        self.state = state


_STAND_INS = {
    "pytorch_lightning.utilities.parsing.AttributeDict": AttributeDict,
    "lightning_fabric.utilities.data.AttributeDict": AttributeDict,
    "lightning.fabric.utilities.data.AttributeDict": AttributeDict,
    "audio_diffusion_pytorch.diffusion.LogNormalDistribution": LogNormalDistribution,
}


# torch's allowlist of globals for weights_only loads is process-wide: a load that widens it
# (below) holds this lock, so two threads never see each other's stand-ins or lose their own
_ALLOWLIST = threading.Lock()


def safe_load(source, map_location="cpu"):
    """`torch.load(weights_only=True)` that also reads Lightning checkpoints (see module doc).
    Safe from several threads: the allowlist is widened under a lock."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with _ALLOWLIST:  # what counts as unsafe depends on the allowlist: read both under the lock
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(source)
        except Exception:  # not a zip checkpoint: torch.load below gives the error
            names = []
        if not isinstance(source, (str, Path)):
            source.seek(0)
        allowed = [(_STAND_INS.get(n) or type(n, (Foreign,), {"name": n}), n) for n in names]
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(source, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:  # keep the reason, drop torch's advice
                boilerplate = ("Weights only", "Please file", "Check the documentation")
                reason = [ln for ln in str(e).splitlines() if ln.strip()
                          and not ln.startswith(boilerplate)] or [str(e)]
                raise pickle.UnpicklingError(f"refused: {reason[0].strip()}") from None


def is_lightning(state) -> bool:
    return isinstance(state, dict) and "state_dict" in state and "hyper_parameters" in state


# ADP 0.0.43 `get_default_model_kwargs()`: the values of arguments a checkpoint does not store
_ADP_DEFAULTS = {
    "channels": 128, "patch_blocks": 4, "patch_factor": 2, "multipliers": [1, 2, 4, 4, 4, 4, 4],
    "factors": [4, 4, 4, 2, 2, 2], "num_blocks": [2, 2, 2, 2, 2, 2],
    "attentions": [False, False, False, True, True, True], "attention_heads": 8,
    "attention_features": 64, "attention_multiplier": 2, "use_attention_bottleneck": True,
    "resnet_groups": 8, "kernel_multiplier_downsample": 2, "use_skip_scale": True,
    "diffusion_sigma_data": 0.1,
}
_MODEL_KEYS = ("channels", "patch_factor", "multipliers", "factors", "num_blocks", "attentions",
               "attention_heads", "attention_features", "attention_multiplier", "resnet_groups",
               "kernel_multiplier_downsample", "use_skip_scale", "use_attention_bottleneck")
# ADP options this network implements with one value only (their ADP defaults)
_FIXED = {"patch_blocks": 1, "use_nearest_upsample": False, "use_context_time": True,
          "diffusion_dynamic_threshold": 0.0, "use_classifier_free_guidance": False,
          "out_channels": None, "context_features": None, "context_channels": None,
          "context_embedding_features": None}
_IGNORED = {"kernel_sizes_init", "learning_rate", "beta1", "beta2", "in_channels",
            "diffusion_sigma_distribution"}  # kernel_sizes_init: accepted, unused by ADP 0.0.43


def to_config(hparams: dict, stem: str = "") -> Config:
    """AudioDiffusionModel arguments -> Config with the paper's data and sampler settings."""
    hp = {**_ADP_DEFAULTS, **hparams}
    unknown = sorted(set(hp) - set(_MODEL_KEYS) - set(_FIXED) - _IGNORED - {"diffusion_sigma_data"})
    if unknown:
        raise ValueError(f"unknown hyper_parameters {unknown}: not an MSDM release")
    for key, only in _FIXED.items():
        value = hp.get(key, only)
        if only is None and (not value or key == "out_channels" and value == hp.get("in_channels")):
            continue
        if value != only:
            raise ValueError(f"hyper_parameters {key}={hp[key]!r}: msdm implements {only!r} only")
    dist = hp.get("diffusion_sigma_distribution", LogNormalDistribution())
    if not isinstance(dist, LogNormalDistribution):
        raise ValueError(f"diffusion_sigma_distribution {dist!r}: expected LogNormalDistribution")
    in_channels = hp.get("in_channels")
    if in_channels not in (1, len(STEMS)):
        raise ValueError(f"in_channels {in_channels!r}: expected {len(STEMS)} stems or 1")
    if in_channels == 1 and stem not in STEMS:
        raise ValueError(f"a single-stem (weakly MSDM) checkpoint needs its stem, one of {STEMS} "
                         f"(--ckpt STEM=FILE, or --stem STEM), got {stem!r}")
    update = {
        "model": {**{k: hp[k] for k in _MODEL_KEYS}, "attention_bias": False,
                  "patch_groups": "patch_factor", "bottleneck_residual": False},
        "diffusion": {"sigma_data": hp["diffusion_sigma_data"], "clamp": True},
        "train": {"stem": stem if in_channels == 1 else ""},
    }
    if dist.mean is not None:
        update["diffusion"].update(p_mean=dist.mean, p_std=dist.std)
    if "learning_rate" in hp:
        update["train"]["lr"] = hp["learning_rate"]
    if "beta1" in hp and "beta2" in hp:
        update["train"]["betas"] = [hp["beta1"], hp["beta2"]]
    try:
        return merge(Config(), update)
    except ConfigError as e:
        raise ValueError(f"hyper_parameters do not fit msdm's config: {e}") from e


# ADP module paths -> ours (applied in order to every key under `model.unet.`)
_RENAMES = [
    (r"^to_time\.0\.0\.weights$", "embed.weights"),
    (r"^to_time\.0\.1\.", "embed.mlp.0."),
    (r"^to_mapping\.0\.", "embed.mlp.2."),
    (r"^to_mapping\.2\.", "embed.mlp.4."),
    (r"^to_in\.module_list\.0\.block\.", "patch_in."),
    (r"^to_out\.module_list\.0\.block\.", "patch_out."),
    (r"^downsamples\.(\d+)\.downsample\.", r"downs.\1.down."),
    (r"^upsamples\.(\d+)\.upsample\.", r"ups.\1.up."),
    (r"^downsamples\.", "downs."),
    (r"^upsamples\.", "ups."),
    (r"\.transformer\.", ".attn."),
    (r"\.feed_forward\.", ".ff."),
    (r"\.attention\.fn\.attention\.to_out\.", ".attention.to_out."),
    (r"\.attention\.fn\.", ".attention."),
    (r"^bottleneck\.attention\.", "bottleneck.attn."),
    (r"^bottleneck\.pre_block\.", "bottleneck.pre."),
    (r"^bottleneck\.post_block\.", "bottleneck.post."),
    (r"\.block1\.groupnorm\.", ".norm1."),
    (r"\.block1\.project\.", ".conv1."),
    (r"\.block2\.groupnorm\.", ".norm2."),
    (r"\.block2\.project\.", ".conv2."),
    (r"\.to_scale_shift\.to_scale_shift\.", ".film."),
    (r"\.to_out\.(weight|bias)$", r".skip.\1"),  # ResnetBlock residual 1x1 conv
    (r"\.g$", ".weight"),  # ADP LayerNorm gain
]


def to_state_dict(lightning_state: dict) -> dict[str, torch.Tensor]:
    """Lightning `state_dict` (`model.unet.*`) -> our Denoiser's state dict (`net.*`)."""
    prefix = "model.unet."
    if not any(k.startswith(prefix) for k in lightning_state):
        prefix = "model.diffusion.net."  # the same tensors, registered twice by ADP
    out = {}
    for key, value in lightning_state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if ".feed_forward." in name:  # ADP uses 1x1 convs and [1, C, 1] gains; ours Linear/LN
            value = value.reshape(-1) if name.endswith(".g") else value.squeeze(-1)
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        out["net." + name] = value
    if not out:
        raise ValueError("state_dict has no model.unet.* weights")
    return out


def convert(lightning: dict, stem: str = "") -> dict:
    """A Lightning checkpoint dict -> an msdm checkpoint dict (`msdm.checkpoint` layout)."""
    _refuse_foreign(lightning["hyper_parameters"], "hyper_parameters")
    _refuse_foreign(lightning["state_dict"], "state_dict")
    dropped = sorted({f.name for f in _foreign(lightning)})
    if dropped:
        log.info("released checkpoint: ignoring objects of %s", ", ".join(dropped))
    cfg = to_config(dict(lightning["hyper_parameters"]), stem)
    info = {k: lightning[k] for k in ("epoch", "global_step", "pytorch-lightning_version")
            if isinstance(lightning.get(k), (int, str))}
    return {
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "model": to_state_dict(lightning["state_dict"]),
        "ema": None,  # the release has no EMA weights
        "step": int(lightning.get("global_step") or 0),
        "optimizer": None,
        "extra": {"released": info},
    }


def _foreign(obj, depth: int = 0):
    if isinstance(obj, Foreign):
        yield obj
    elif isinstance(obj, dict) and depth < 50:
        for v in obj.values():
            yield from _foreign(v, depth + 1)
    elif isinstance(obj, (list, tuple)) and depth < 50:
        for v in obj:
            yield from _foreign(v, depth + 1)


def _refuse_foreign(obj, where: str) -> None:
    names = sorted({f.name for f in _foreign(obj)})
    if names:
        raise ValueError(f"{where} holds objects msdm does not read: {', '.join(names)}")
