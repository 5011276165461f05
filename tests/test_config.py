import math
from pathlib import Path

import pytest

import msdm
from msdm.config import (
    PRESETS,
    Config,
    ConfigError,
    apply_overrides,
    config_keys,
    get_preset,
    load_config,
    load_sampler_yaml,
)

REQUIRED = ["data.sample_rate", "data.chunk_samples", "data.stems", "train.batch_size",
            "train.lr", "sampler.num_steps", "sampler.sigma_min", "sampler.sigma_max",
            "sampler.rho", "sampler.s_churn", "sampler.resamples", "sampler.solver",
            "separation.likelihood", "separation.constrained", "separation.gamma"]


def test_required_keys_exist():
    keys = config_keys()
    assert [k for k in REQUIRED if k not in keys] == []
    assert any(k.startswith("model.") for k in keys)


def test_paper_defaults():
    c = get_preset("paper")
    assert c.data.sample_rate == 22050 and c.data.chunk_samples == 262144
    assert c.data.stems == ("bass", "drums", "guitar", "piano")
    assert (c.diffusion.sigma_data, c.diffusion.p_mean, c.diffusion.p_std) == (0.2, -3.0, 1.0)
    s = c.sampler
    assert (s.num_steps, s.sigma_min, s.sigma_max, s.rho, s.s_churn, s.resamples, s.solver) == (
        150, 1e-4, 1.0, 7.0, 20.0, 2, "euler")
    assert c.separation.likelihood == "dirac" and c.separation.constrained == 0
    assert c.generation.sigma_max == 20.0 and c.imputation.num_steps == 256


def test_public_sampler_config_signature():
    s = msdm.SamplerConfig()
    assert s == msdm.SamplerConfig(num_steps=150, sigma_min=1e-4, sigma_max=1.0, rho=7.0,
                                   s_churn=20.0, resamples=2, solver="euler")


def test_dict_round_trip_every_preset():
    for name in PRESETS:
        c = get_preset(name)
        assert Config.from_dict(c.to_dict()) == c


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match="sampler.s_chrun"):
        Config.from_dict({"sampler": {"s_chrun": 3}})
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(Config(), ["sampler.nope=1"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="train.batch_size"):
        Config.from_dict({"train": {"batch_size": "eight"}})
    with pytest.raises(ConfigError, match="one of"):
        Config.from_dict({"sampler": {"solver": "rk4"}})
    with pytest.raises(ConfigError, match="true/false"):
        Config.from_dict({"model": {"use_skip_scale": "yes"}})


def test_dotted_overrides_keep_types():
    c = apply_overrides(Config(), ["sampler.s_churn=5", "train.lr=1", "data.stems=[a, b]",
                                   "sampler.solver=heun"])
    assert c.sampler.s_churn == 5.0 and isinstance(c.sampler.s_churn, float)
    assert isinstance(c.train.lr, float) and c.data.stems == ("a", "b")
    assert c.sampler.solver == "heun"
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Config(), ["sampler.s_churn"])


def test_yaml_file_with_base_preset(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: tiny\nsampler:\n  s_churn: 3\n")
    c = load_config(p, ["sampler.num_steps=4"])
    assert c.model.channels == get_preset("tiny").model.channels
    assert (c.sampler.s_churn, c.sampler.num_steps) == (3.0, 4)
    p.write_text("sampler: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(tmp_path / "missing.yaml")


def test_sampler_yaml_flat_and_nested(tmp_path: Path):
    p = tmp_path / "best.yaml"
    p.write_text("sampler.s_churn: 7\nseparation:\n  constrained: 2\n")
    flat = load_sampler_yaml(p)
    assert flat == {"sampler.s_churn": 7, "separation.constrained": 2}
    c = apply_overrides(Config(), flat)
    assert c.sampler.s_churn == 7.0 and c.separation.constrained == 2


def test_inf_survives_yaml():
    c = Config()
    assert load_config(Config.from_dict(__import__("yaml").safe_load(c.to_yaml())).to_dict()) == c
    assert math.isinf(c.sampler.s_tmax)


@pytest.mark.parametrize("override, match", [
    ("separation.constrained=9", r"separation.constrained \(9\) must index one of the 4"),
    ("data.chunk_samples=4000", r"data.chunk_samples \(4000\) must be a multiple of 64"),
    ("separation.margin=0.6", "2 \\* margin \\+ overlap < 1"),
    ("data.sample_rate=0", "data: sample_rate must be positive"),
    ("data.stems=[bass, ../../x]", r"stem names must match \[A-Za-z0-9_-\]\+"),
    ("train.stem=flute", "train.stem 'flute' is not one of data.stems"),
    ("sampler.num_steps=0", "sampler: sampler num_steps"),
])
def test_semantic_errors_are_config_errors_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", [override])


def test_sampler_yaml_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_sampler_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampler: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_sampler_yaml(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        load_sampler_yaml(bad)
    bad.write_text("sampler:\n  s_chrun: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key.*sampler.s_chrun"):
        load_sampler_yaml(bad)


def test_presets_are_the_yaml_files_next_to_the_code():
    from msdm.config import PRESET_DIR

    assert sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) == sorted(PRESETS)
    assert get_preset("paper") == Config()
    assert get_preset("tiny").model.channels == 16 and get_preset("small").data.sample_rate == 11025
    demo, small = get_preset("demo"), get_preset("small")  # the small network, another schedule
    assert demo.model == small.model and demo.data == small.data
    assert demo.train.lr_schedule == "cosine" and demo.train.ema_warmup


def test_a_preset_file_can_build_on_another_and_loops_are_errors(tmp_path, monkeypatch):
    import msdm.config as config

    (tmp_path / "small.yaml").write_text("preset: tiny\ntrain: {lr: 0.5}\n")
    (tmp_path / "tiny.yaml").write_text("model: {channels: 512}\n")
    (tmp_path / "paper.yaml").write_text("preset: demo\n")
    (tmp_path / "demo.yaml").write_text("preset: paper\n")
    monkeypatch.setattr(config, "PRESET_DIR", tmp_path)
    cfg = config.get_preset("small")
    assert cfg.model.channels == 512 and cfg.train.lr == 0.5
    with pytest.raises(ConfigError, match="paper -> demo -> paper form a loop"):
        config.get_preset("paper")
