"""Configuration: nested frozen dataclasses, strict loading, presets and dotted overrides.

The only place defaults live. Defaults are the released MSDM values (Mariani et al., ICLR 2024,
`exp/train_msdm.yaml`, `exp/eval_msdm_dirac.yaml`); the `asdict` form is what crosses process
boundaries (Ray configs, checkpoints, `config.json` in run folders).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

STEMS = ("bass", "drums", "guitar", "piano")


class ConfigError(ValueError):
    """A config key or value that does not fit the schema."""


@dataclass(frozen=True)
class Data:
    sample_rate: int = 22050  # paper: 22.05 kHz mono
    chunk_samples: int = 262144  # 2**18 samples, ~11.9 s at 22.05 kHz
    stems: tuple[str, ...] = STEMS  # channel order of every [B, S, T] tensor
    hop_samples: int = 0  # prepare: chunk hop; 0 = chunk_samples (non-overlapping, as the paper)
    pad_tail: bool = False  # prepare: zero-pad the trailing partial chunk instead of dropping it
    drop_silent: bool = False  # prepare: drop chunks where every stem is silent
    silence_rms: float = 1e-4  # RMS under which a chunk stem counts as silent (drop_silent)
    shard_mb: float = 128.0  # prepare: target size of one Parquet file
    min_seconds: float = 0.0  # prepare: skip tracks shorter than this (paper loader: 12 s)
    random_shift: bool = False  # train: circular roll by U[-L/2, L/2) (paper: jittered crops)


@dataclass(frozen=True)
class Model:
    kind: Literal["unet", "gaussian"] = "unet"  # "gaussian": analytic prior (tests, oracles)
    channels: int = 256
    patch_factor: int = 16
    multipliers: tuple[int, ...] = (1, 2, 4, 4, 4, 4, 4)
    factors: tuple[int, ...] = (4, 4, 4, 2, 2, 2)
    num_blocks: tuple[int, ...] = (2, 2, 2, 2, 2, 2)
    attentions: tuple[bool, ...] = (False, False, False, True, True, True)
    attention_heads: int = 8
    attention_features: int = 128  # per head
    attention_multiplier: int = 2  # feed-forward width factor
    resnet_groups: int = 8
    kernel_multiplier_downsample: int = 2  # down-sampling conv kernel = 2 * factor + 1
    use_skip_scale: bool = True  # skips scaled by 2**-0.5
    use_attention_bottleneck: bool = True
    bottleneck_residual: bool = False  # v0.0.43 quirk: bottleneck attention replaces x
    attention_bias: bool = False  # bias on attention-out and feed-forward-out Linears (release: no)
    # GroupNorm groups of the patch blocks: "patch_factor" = min(patch_factor, stems), as released
    # (ADP 0.0.43 PatchBlock); "resnet_groups" = like every other block (msdm format_version 1)
    patch_groups: Literal["patch_factor", "resnet_groups"] = "patch_factor"


@dataclass(frozen=True)
class Diffusion:
    sigma_data: float = 0.2  # MSDM overrides ADP's 0.1
    p_mean: float = -3.0  # ln sigma ~ N(p_mean, p_std**2) during training
    p_std: float = 1.0
    clamp: bool = True  # D(x, sigma) clamped to [-1, 1], also inside the loss


@dataclass(frozen=True)
class Train:
    batch_size: int = 8  # global batch, split across workers
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 = off (paper: no clipping)
    ema_decay: float = 0.999  # not in the paper; sampling uses the EMA weights by default
    max_steps: int = 1_600_000
    checkpoint_every: int = 4000  # paper: val_check_interval 4000
    val_every: int = 4000
    num_to_keep: int = 3  # best K checkpoints by validation loss
    val_chunks: int = 32  # fixed validation chunks (first N of the validation split)
    val_sigmas: tuple[float, ...] = (0.005, 0.02, 0.05, 0.1, 0.3, 1.0)  # fixed sigma grid
    log_every: int = 50
    seed: int = 12345
    stem: str = ""  # ISDM: train a single-stem prior on this stem; "" = joint model
    bf16: bool = True  # autocast to bfloat16 on CUDA (ignored on CPU)
    fault_step: int = -1  # testing hook: rank 1 (or 0) dies at this step on a fresh start


@dataclass(frozen=True)
class SamplerConfig:
    """Euler/Heun + churn sampler settings (paper Sec. 4.2 and Table of settings)."""

    num_steps: int = 150
    sigma_min: float = 1e-4
    sigma_max: float = 1.0
    rho: float = 7.0
    s_churn: float = 20.0
    resamples: int = 2  # "correction": re-noise back to sigma_i and repeat the step
    solver: Literal["euler", "heun"] = "euler"
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self):
        if self.solver not in ("euler", "heun"):
            raise ConfigError(f"sampler solver {self.solver!r}: expected 'euler' or 'heun'")
        if self.num_steps < 1 or self.resamples < 1:
            raise ConfigError(f"sampler num_steps ({self.num_steps}) and resamples "
                              f"({self.resamples}) must be >= 1")
        if not 0 < self.sigma_min <= self.sigma_max or self.rho <= 0 or self.s_churn < 0:
            raise ConfigError(f"sampler needs 0 < sigma_min <= sigma_max, rho > 0, s_churn >= 0; "
                              f"got {self.sigma_min}, {self.sigma_max}, {self.rho}, {self.s_churn}")


@dataclass(frozen=True)
class Separation:
    likelihood: Literal["dirac", "gaussian"] = "dirac"
    constrained: int = 0  # Dirac: index of the stem set to mixture - others (paper: 0 = bass)
    gamma: float = 0.75  # Gaussian: likelihood width gamma = gamma * sigma
    margin: float = 0.0625  # long tracks: context margin per segment side, fraction of a chunk
    overlap: float = 0.125  # long tracks: cross-fade length between segment cores, fraction


@dataclass(frozen=True)
class Imputation:
    method: Literal["replace", "guidance"] = "replace"  # replace = paper (RePaint-style)
    guidance: float = 1.0  # reconstruction-guidance weight (method "guidance")


def _generation_sampler() -> SamplerConfig:
    return SamplerConfig(num_steps=150, sigma_max=20.0, s_churn=20.0, resamples=1)


def _imputation_sampler() -> SamplerConfig:
    return SamplerConfig(num_steps=256, sigma_max=20.0, s_churn=10.0, resamples=1)


@dataclass(frozen=True)
class Config:
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    diffusion: Diffusion = field(default_factory=Diffusion)
    train: Train = field(default_factory=Train)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # separation sampler
    separation: Separation = field(default_factory=Separation)
    generation: SamplerConfig = field(default_factory=_generation_sampler)
    imputation: SamplerConfig = field(default_factory=_imputation_sampler)
    impute: Imputation = field(default_factory=Imputation)

    @property
    def num_stems(self) -> int:
        return 1 if self.train.stem else len(self.data.stems)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return _build(cls, d, "")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _to_plain(obj):
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _coerce(value, tp, where: str):
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls, d, where: str):
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(_join(where, k) for k in unknown)}; "
            f"valid keys under {where or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], _join(where, k)) for k, v in d.items()}
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# Presets: dicts applied over the defaults. `paper` is the released MSDM configuration.
PRESETS: dict[str, dict] = {
    "paper": {},
    "tiny": {  # CPU tests and smoke runs: ~150k parameters, 4096-sample chunks
        "data": {"chunk_samples": 4096, "shard_mb": 4.0},
        "model": {
            "channels": 16,
            "patch_factor": 4,
            "multipliers": [1, 2, 2],
            "factors": [4, 4],
            "num_blocks": [1, 1],
            "attentions": [False, True],
            "attention_heads": 2,
            "attention_features": 8,
            "resnet_groups": 4,
            "attention_bias": True,  # format-1 layout, as before the release parity fix
            "patch_groups": "resnet_groups",
        },
        "train": {
            "batch_size": 4,
            "lr": 1e-3,
            "max_steps": 20,
            "checkpoint_every": 10,
            "val_every": 10,
            "val_chunks": 4,
            "log_every": 5,
            "ema_decay": 0.99,
        },
        # Euler + Dirac is unstable when sigma_next / sigma_hat < 1 - 2 / S at high noise:
        # 20 steps with little churn keep every step ratio above 0.6
        "sampler": {"num_steps": 20, "s_churn": 5.0, "resamples": 1},
        "generation": {"num_steps": 20},
        "imputation": {"num_steps": 20},
    },
    "small": {  # CPU demo and quality benchmark: ~1.9 M parameters, 11.025 kHz, 1.5 s chunks
        "data": {"sample_rate": 11025, "chunk_samples": 16384, "shard_mb": 32.0},
        "model": {
            "channels": 32,
            "patch_factor": 4,  # 4 stems x 4 samples -> 32 channels; 8 starved the top level
            "multipliers": [1, 2, 4, 4],
            "factors": [4, 4, 2],
            "num_blocks": [1, 1, 1],
            "attentions": [False, False, True],
            "attention_heads": 4,
            "attention_features": 16,
            "resnet_groups": 8,
            "attention_bias": True,  # format-1 layout: docs/quality was measured with it
            "patch_groups": "resnet_groups",
        },
        "train": {
            "batch_size": 8,
            "lr": 4e-4,
            "max_steps": 6000,
            "checkpoint_every": 500,
            "val_every": 500,
            "val_chunks": 32,
            "log_every": 50,
            "ema_decay": 0.995,
        },
    },
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return merge(Config(), PRESETS[name])


def merge(cfg: Config, update: dict) -> Config:
    """Deep-merge a (possibly partial) nested dict over `cfg`, strictly."""
    base = cfg.to_dict()
    _deep_update(base, update, "")
    return Config.from_dict(base)


def _deep_update(base: dict, update: dict, where: str) -> None:
    if not isinstance(update, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {update!r}")
    for k, v in update.items():
        if k not in base:
            valid = ", ".join(sorted(base))
            raise ConfigError(f"unknown key {_join(where, k)!r}; valid keys here: {valid}")
        if isinstance(base[k], dict):
            _deep_update(base[k], v, _join(where, k))
        else:
            base[k] = v


def parse_override(item: str) -> tuple[str, Any]:
    """`sampler.s_churn=20` -> ("sampler.s_churn", 20); values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. sampler.s_churn=20)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value: {e}") from e
    return key.strip(), value


def apply_overrides(cfg: Config, overrides: dict[str, Any] | list[str]) -> Config:
    """Apply dotted overrides (`{"sampler.s_churn": 20}` or `["sampler.s_churn=20"]`)."""
    if isinstance(overrides, (list, tuple)):
        overrides = dict(parse_override(o) for o in overrides)
    update: dict = {}
    for key, value in overrides.items():
        parts = key.split(".")
        node = update
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _fix_type(cfg, parts, value)
    return merge(cfg, update)


def _fix_type(cfg: Config, parts: list[str], value):
    """Keep the default's type: `train.lr=1` stays a float, a YAML string '0.5' stays as given."""
    node: Any = cfg
    for p in parts:
        names = {f.name for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else ()
        if p not in names:
            raise ConfigError(f"unknown key {'.'.join(parts)!r}")
        node = getattr(node, p)
    if isinstance(node, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(node, str) and not isinstance(value, str) and value is not None:
        return str(value)
    return value


def config_keys(cfg: Config | None = None) -> set[str]:
    """Every dotted leaf key of the config (used to validate tune spaces)."""
    cfg = cfg or Config()
    out: set[str] = set()

    def walk(node, prefix):
        for f in dataclasses.fields(node):
            v = getattr(node, f.name)
            key = _join(prefix, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, key)
            else:
                out.add(key)

    walk(cfg, "")
    return out


def get_key(cfg: Config, key: str):
    node: Any = cfg
    for p in key.split("."):
        node = getattr(node, p)
    return node


def load_config(source: str | Path | dict | None = None, overrides=()) -> Config:
    """Preset name, YAML file path or dict (applied over the defaults), then dotted overrides.

    A YAML file may name a base preset with a top-level `preset: tiny` key.
    """
    if source is None or source == "":
        cfg = Config()
    elif isinstance(source, dict):
        cfg = _from_mapping(dict(source))
    elif str(source) in PRESETS:
        cfg = get_preset(str(source))
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(
                f"config {str(source)!r} is neither a preset ({', '.join(PRESETS)}) nor a file"
            )
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        cfg = _from_mapping(data, str(path))
    return apply_overrides(cfg, overrides) if overrides else cfg


def _from_mapping(data: dict, where: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    base = get_preset(data.pop("preset")) if "preset" in data else Config()
    return merge(base, data)


def load_sampler_yaml(path: str | Path) -> dict[str, Any]:
    """Read a sampler-config file (e.g. a sweep's best.yaml) as dotted overrides.

    Accepts nested mappings (`sampler: {s_churn: 20}`) or flat dotted keys (`sampler.s_churn: 20`).
    """
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    flat: dict[str, Any] = {}

    def walk(node, prefix):
        for k, v in node.items():
            key = _join(prefix, k)
            if isinstance(v, dict):
                walk(v, key)
            else:
                flat[key] = v

    walk(data, "")
    return flat
