"""Configuration: nested frozen dataclasses, one strict loader, YAML presets, dotted overrides.

Defaults are the released MSDM values (Mariani et al., ICLR 2024, `exp/train_msdm.yaml`,
`exp/eval_msdm_dirac.yaml`); presets are YAML files in `msdm/presets/` applied over them. Every
dict goes through `Config.from_dict`, which checks keys and types once; each section's
`__post_init__` checks its values and `Config.__post_init__` the rules between sections. The
`to_dict` form crosses process boundaries (Ray configs, checkpoints, `config.json` in run folders).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .model import ModelConfig, multiple
from .sampling import SamplerConfig

STEMS = ("bass", "drums", "guitar", "piano")
STEM_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # stem names become file names
PRESET_DIR = Path(__file__).with_name("presets")
PRESETS = ("paper", "small", "tiny", "demo")
Model = ModelConfig  # the `model` section lives with the network it describes


class ConfigError(ValueError):
    """A config key or value that does not fit the schema."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


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
    train_samples: int = 0  # train on random crops of this length from each chunk; 0 = whole chunk

    def __post_init__(self):
        _require(self.sample_rate > 0, f"sample_rate must be positive, got {self.sample_rate}")
        _require(self.chunk_samples > 0,
                 f"chunk_samples must be positive, got {self.chunk_samples}")
        _require(len(self.stems) > 0 and len(set(self.stems)) == len(self.stems),
                 f"stems must be distinct names, got {list(self.stems)}")
        bad = [s for s in self.stems if not STEM_NAME.match(s)]
        _require(not bad, f"stem names must match [A-Za-z0-9_-]+, got {bad}")
        _require(self.hop_samples >= 0 and self.shard_mb > 0 and self.min_seconds >= 0,
                 "hop_samples and min_seconds must be >= 0 and shard_mb > 0")
        _require(0 <= self.train_samples <= self.chunk_samples,
                 f"train_samples ({self.train_samples}) must be 0 or <= chunk_samples")


@dataclass(frozen=True)
class Diffusion:
    sigma_data: float = 0.2  # MSDM overrides ADP's 0.1
    p_mean: float = -3.0  # ln sigma ~ N(p_mean, p_std**2) during training
    p_std: float = 1.0
    clamp: bool = True  # D(x, sigma) clamped to [-1, 1], also inside the loss

    def __post_init__(self):
        _require(self.sigma_data > 0 and self.p_std > 0, "sigma_data and p_std must be positive")


@dataclass(frozen=True)
class Train:
    batch_size: int = 8  # global batch, split across workers
    lr: float = 1e-4
    warmup_steps: int = 0  # linear warm-up from 0 to lr (paper: none)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decay to lr * lr_min_ratio
    lr_min_ratio: float = 0.1  # at max_steps (cosine schedule)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 = off (paper: no clipping)
    ema_decay: float = 0.999  # not in the paper; sampling uses the EMA weights by default
    ema_warmup: bool = False  # decay min(ema_decay, (1 + step) / (10 + step)): short runs
    max_steps: int = 1_600_000
    checkpoint_every: int = 4000  # paper: val_check_interval 4000
    val_every: int = 4000
    num_to_keep: int = 3  # best K checkpoints by validation loss
    val_chunks: int = 32  # fixed validation chunks (the first N of the validation split)
    val_sigmas: tuple[float, ...] = (0.005, 0.02, 0.05, 0.1, 0.3, 1.0)  # fixed sigma grid
    log_every: int = 50
    shuffle_buffer: int = 64  # rows per worker in the seeded shuffle buffer (new order per epoch)
    seed: int = 12345
    stem: str = ""  # ISDM: train a single-stem prior on this stem; "" = joint model
    bf16: bool = True  # autocast to bfloat16 on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the network in place (GPU runs; CPU needs a C++ compiler)

    def __post_init__(self):
        counts = ("batch_size", "max_steps", "checkpoint_every", "val_every", "num_to_keep",
                  "val_chunks", "log_every", "shuffle_buffer")
        bad = [k for k in counts if getattr(self, k) < 1]
        _require(not bad, f"{', '.join(bad)} must be >= 1")
        _require(self.lr > 0 and 0 <= self.ema_decay < 1,
                 f"need lr > 0 and 0 <= ema_decay < 1, got {self.lr}, {self.ema_decay}")
        _require(self.warmup_steps >= 0 and 0 <= self.lr_min_ratio <= 1,
                 "need warmup_steps >= 0 and 0 <= lr_min_ratio <= 1")


@dataclass(frozen=True)
class Separation:
    # dirac: the paper's (stem `constrained` = mixture - the others); dirac_sym: the same
    # constraint with the residual shared equally (orthogonal projection, no constrained stem)
    likelihood: Literal["dirac", "dirac_sym", "gaussian"] = "dirac"
    constrained: int = 0  # Dirac: index of the stem set to mixture - others (paper: 0 = bass)
    gamma: float = 0.75  # Gaussian: likelihood width gamma = gamma * sigma
    margin: float = 0.0625  # long tracks: context margin per segment side, fraction of a chunk
    overlap: float = 0.125  # long tracks: cross-fade length between segment cores, fraction
    init: str = ""  # regressor (hdemucs) checkpoint URI; its estimate starts the sampler (--init)
    # noise added to the --init estimate, in units of sampler.sigma_max: 1 = SDEdit (the estimate
    # re-noised to sigma_max); 0 = the estimate's own error stands in for the noise at sigma_max
    init_noise: float = 1.0
    # > 0: refine the sampled stems with soft masks |S_n|^p / sum_m |S_m|^p applied to the
    # mixture's STFT (Wiener-style; the stems still sum to the mixture); 0 = the paper (off)
    mask_power: float = 0.0
    mask_nfft: int = 0  # FFT size of the refinement; 0 = ~93 ms at the model's rate
    # > 1: the posterior-mean estimate, the average of this many posterior samples per segment
    # (NFE and memory x samples; Dirac: the mean still sums to the mixture); 1 = one sample
    samples: int = 1

    def __post_init__(self):
        _require(self.gamma > 0, f"gamma must be positive, got {self.gamma}")
        _require(0 <= self.init_noise <= 1, f"init_noise must be in [0, 1], got {self.init_noise}")
        _require(type(self.samples) is int and self.samples >= 1,
                 f"samples must be an integer >= 1, got {self.samples!r}")
        _require(self.mask_power >= 0, f"mask_power must be >= 0, got {self.mask_power}")
        _require(self.mask_nfft == 0 or (self.mask_nfft >= 16 and
                                         self.mask_nfft & (self.mask_nfft - 1) == 0),
                 f"mask_nfft must be 0 or a power of two >= 16, got {self.mask_nfft}")
        _require(self.margin >= 0 and self.overlap >= 0 and 2 * self.margin + self.overlap < 1,
                 f"need margin, overlap >= 0 and 2 * margin + overlap < 1 (fractions of a chunk),"
                 f" got margin {self.margin}, overlap {self.overlap}")


@dataclass(frozen=True)
class Imputation:
    method: Literal["replace", "guidance"] = "replace"  # replace = paper (RePaint-style)
    guidance: float = 1.0  # reconstruction-guidance weight (method "guidance")


@dataclass(frozen=True)
class Distill:
    """Consistency distillation of a separating teacher (msdm.distill, pipelines.distill)."""

    teacher: str = ""  # the teacher checkpoint a student came from; set by pipelines.distill
    num_scales: int = 18  # N: Karras levels on [sigma_min, sigma_max] for the teacher's ODE step
    sigma_min: float = 1e-4
    sigma_max: float = 1.0
    rho: float = 7.0
    solver: Literal["euler", "heun"] = "heun"  # the teacher's step between adjacent levels
    # theta^-: the target network is an EMA of the student with this decay (Song et al.: 0.95);
    # 0 = the student itself under stop-gradient (improved consistency training)
    target_decay: float = 0.0
    # weight of the denoising term |f(x_sigma) - x|^2 / sigma_data^2 beside the consistency
    # term (consistency trajectory models mix the two); 0 = pure consistency distillation.
    # 1: +0.2-0.6 dB over 0 on bench-quality's validation songs (README, few-step separation)
    data_weight: float = 1.0
    steps: int = 2  # the student's sampler written into its checkpoint: consistency steps

    def __post_init__(self):
        _require(self.num_scales >= 2 and self.steps >= 1,
                 f"need num_scales >= 2 and steps >= 1, got {self.num_scales}, {self.steps}")
        _require(0 < self.sigma_min < self.sigma_max and self.rho > 0,
                 f"need 0 < sigma_min < sigma_max and rho > 0, got {self.sigma_min}, "
                 f"{self.sigma_max}, {self.rho}")
        _require(0 <= self.target_decay < 1 and self.data_weight >= 0,
                 f"need 0 <= target_decay < 1 and data_weight >= 0, got {self.target_decay}, "
                 f"{self.data_weight}")


@dataclass(frozen=True)
class Config:
    data: Data = field(default_factory=Data)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: Diffusion = field(default_factory=Diffusion)
    train: Train = field(default_factory=Train)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # separation sampler
    separation: Separation = field(default_factory=Separation)
    generation: SamplerConfig = field(  # paper: sigma_max 20, 150 steps, churn 20
        default_factory=lambda: SamplerConfig(num_steps=150, sigma_max=20.0, resamples=1))
    imputation: SamplerConfig = field(  # paper: sigma_max 20, 256 steps, churn 10
        default_factory=lambda: SamplerConfig(num_steps=256, sigma_max=20.0, s_churn=10.0,
                                              resamples=1))
    impute: Imputation = field(default_factory=Imputation)
    distill: Distill = field(default_factory=Distill)

    def __post_init__(self):
        s, m = len(self.data.stems), multiple(self.model)
        if not -s <= self.separation.constrained < s:
            raise ConfigError(f"separation.constrained ({self.separation.constrained}) must index "
                              f"one of the {s} stems {list(self.data.stems)}")
        if self.data.train_samples % m:
            raise ConfigError(f"data.train_samples ({self.data.train_samples}) must be a multiple "
                              f"of {m} (model.patch_factor x prod(model.factors))")
        if self.data.chunk_samples % m:
            raise ConfigError(f"data.chunk_samples ({self.data.chunk_samples}) must be a multiple "
                              f"of {m} (model.patch_factor x prod(model.factors))")
        if self.train.stem and self.model.kind == "hdemucs":
            raise ConfigError("train.stem (a single-stem prior) does not apply to "
                              "model.kind hdemucs (a mixture -> stems regressor)")
        if self.train.stem and self.train.stem not in self.data.stems:
            raise ConfigError(f"train.stem {self.train.stem!r} is not one of data.stems "
                              f"{list(self.data.stems)}")

    @property
    def num_stems(self) -> int:
        return 1 if self.train.stem else len(self.data.stems)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return _build(cls, d, "")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(value, tp, where: str):
    """Check `value` against the annotation `tp`: lists become tuples, ints become floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(value) != len(types):
            raise ConfigError(f"{where}: expected {len(types)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, types)))
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and numeric and isinstance(value, int):
        return value
    if tp is float and numeric:
        return float(value)
    if tp is str and isinstance(value, (str, int, float)):
        return str(value)  # `--set train.stem=1` parses as an int
    expected = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    raise ConfigError(f"{where}: expected {expected.get(tp, tp)}, got {value!r}")


def _build(cls, d, where: str):
    """The one strict constructor: unknown keys and wrong types are errors naming the key."""
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(_join(where, str(k)) for k in unknown)}; "
                          f"valid keys under {where or 'the top level'}: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], _join(where, k)) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def _merge(base: dict, update: dict) -> dict:
    """Deep-merge `update` over `base` (new dict; unknown keys are left for `_build` to name)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """{"sampler": {"s_churn": 20}} -> {"sampler.s_churn": 20}."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        key = _join(prefix, str(k))
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def merge(cfg: Config, update: dict) -> Config:
    """Deep-merge a partial nested dict over `cfg`, strictly."""
    if not isinstance(update, dict):
        raise ConfigError(f"config: expected a mapping, got {update!r}")
    return Config.from_dict(_merge(cfg.to_dict(), update))


def parse_override(item: str) -> tuple[str, Any]:
    """`sampler.s_churn=20` -> ("sampler.s_churn", 20); values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. sampler.s_churn=20)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value: {e}") from e
    if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def apply_overrides(cfg: Config, overrides: dict[str, Any] | list[str] | tuple) -> Config:
    """Apply dotted overrides (`{"sampler.s_churn": 20}` or `["sampler.s_churn=20"]`)."""
    if isinstance(overrides, (list, tuple)):
        overrides = dict(parse_override(o) for o in overrides)
    nested: dict = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return merge(cfg, nested)


def config_keys(cfg: Config | None = None) -> set[str]:
    """Every dotted leaf key of the config (used to validate tune spaces)."""
    return set(flatten((cfg or Config()).to_dict()))


def get_preset(name: str, _seen: tuple = ()) -> Config:
    """A preset file over the defaults, or over the preset its `preset:` key names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    if name in _seen:
        raise ConfigError(f"presets {' -> '.join((*_seen, name))} form a loop")
    data = _read_yaml(PRESET_DIR / f"{name}.yaml")
    base = get_preset(str(data.pop("preset")), (*_seen, name)) if "preset" in data else Config()
    return merge(base, data)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got "
                          f"{type(data).__name__}")
    return data


def read_partial(source: str | Path) -> dict:
    """A YAML config file as a partial nested dict (a `preset:` key names its base preset)."""
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config {str(source)!r} is neither a preset "
                          f"({', '.join(PRESETS)}) nor a file")
    return _read_yaml(path)


def load_config(source: str | Path | dict | None = None, overrides=()) -> Config:
    """Preset name, YAML file or dict (over the defaults, or over `preset:`), then overrides."""
    if source is None or source == "":
        data: dict = {}
    elif isinstance(source, dict):
        data = dict(source)
    elif str(source) in PRESETS:
        data = {"preset": str(source)}
    else:
        data = read_partial(source)
    base = get_preset(str(data.pop("preset"))) if "preset" in data else Config()
    cfg = merge(base, data)
    return apply_overrides(cfg, overrides) if overrides else cfg


def load_sampler_yaml(path: str | Path) -> dict[str, Any]:
    """Read a sampler-config file (e.g. a sweep's best.yaml) as dotted overrides; nested
    (`sampler: {s_churn: 20}`) and flat (`sampler.s_churn: 20`) keys both work. Keys are
    checked against the config, so a typo names the file."""
    flat = flatten(_read_yaml(Path(path)))
    unknown = sorted(set(flat) - config_keys())
    if unknown:
        raise ConfigError(f"{path}: unknown config key(s) {unknown}")
    return flat
