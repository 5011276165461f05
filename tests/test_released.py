"""Released MSDM checkpoints: architecture parity with audio-diffusion-pytorch 0.0.43 (a test-only
dependency, installed --no-deps with einops and einops-exts) and the restricted Lightning reader.

Checkpoints are written here the way Lightning 1.7 writes them: torch.save of a dict whose
hyper_parameters is an AttributeDict (a stand-in class under Lightning's module name, present
only while writing) holding the AudioDiffusionModel arguments and a LogNormalDistribution.
"""

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from msdm.checkpoint import CheckpointError, build_denoiser, load_checkpoint, save
from msdm.config import STEMS, Config, apply_overrides, get_preset
from msdm.model import build_network, count_parameters

ROOT = Path(__file__).resolve().parents[1]

# exp/train_msdm.yaml (model section); ISDM (train_weakly_msdm.yaml) differs in in_channels only
PAPER = dict(
    learning_rate=1e-4, beta1=0.9, beta2=0.99, in_channels=4, channels=256, patch_factor=16,
    patch_blocks=1, resnet_groups=8, kernel_multiplier_downsample=2, kernel_sizes_init=[1, 3, 7],
    multipliers=[1, 2, 4, 4, 4, 4, 4], factors=[4, 4, 4, 2, 2, 2], num_blocks=[2, 2, 2, 2, 2, 2],
    attentions=[False, False, False, True, True, True], attention_heads=8, attention_features=128,
    attention_multiplier=2, use_nearest_upsample=False, use_skip_scale=True,
    use_attention_bottleneck=True, diffusion_sigma_data=0.2, diffusion_dynamic_threshold=0.0,
)
# the paper's levels, factors, blocks and attention at 1/8 width; patch_factor 4 keeps
# channels / patch_factor (8) above min(patch_factor, stems) (4), as in the paper (16 vs 4)
REDUCED = {**PAPER, "channels": 32, "patch_factor": 4, "attention_features": 16}
SIGMAS = [1e-3, 0.05, 0.5, 5.0, 20.0]


def _adp():
    return pytest.importorskip("audio_diffusion_pytorch", reason="test-only: pip install "
                               "--no-deps audio-diffusion-pytorch==0.0.43 einops einops-exts")


def _fake_module(monkeypatch, dotted: str, **attrs):
    """Register `dotted` (and its parents) in sys.modules so pickle can save by reference."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules or i == len(parts):
            mod = types.ModuleType(name)
            monkeypatch.setitem(sys.modules, name, mod)
    for k, v in attrs.items():
        v.__module__, v.__qualname__ = dotted, k
        setattr(sys.modules[dotted], k, v)


def _attribute_dict(monkeypatch):
    cls = type("AttributeDict", (dict,), {})
    _fake_module(monkeypatch, "pytorch_lightning.utilities.parsing", AttributeDict=cls)
    return cls


def _log_normal(monkeypatch):
    """LogNormalDistribution: the real ADP class if installed, else a stand-in under its name."""
    try:
        from audio_diffusion_pytorch import LogNormalDistribution
    except ImportError:
        LogNormalDistribution = type("LogNormalDistribution", (), {
            "__init__": lambda self, mean, std: self.__dict__.update(mean=mean, std=std)})
        _fake_module(monkeypatch, "audio_diffusion_pytorch.diffusion",
                     LogNormalDistribution=LogNormalDistribution)
    return LogNormalDistribution(mean=-3.0, std=1.0)


def write_released(path, monkeypatch, unet_state: dict, hparams: dict, **extra) -> None:
    """A checkpoint shaped like the release: model.unet.* and model.diffusion.net.* weights."""
    state = {f"model.{p}{k}": v for k, v in unet_state.items()
             for p in ("unet.", "diffusion.net.")}
    hp = _attribute_dict(monkeypatch)({**hparams, "diffusion_sigma_distribution":
                                       _log_normal(monkeypatch)})
    torch.save({"epoch": 419, "global_step": 1_634_000, "pytorch-lightning_version": "1.7.7",
                "state_dict": state, "loops": {"fit_loop": {"epoch_progress": {"total": 420}}},
                "hparams_name": "kwargs", "hyper_parameters": hp, **extra}, path)


def official_model(hparams: dict, seed: int = 0):
    """ADP's AudioDiffusionModel with random weights (norm gains perturbed too)."""
    adp = _adp()
    kw = {k: v for k, v in hparams.items() if k not in ("learning_rate", "beta1", "beta2")}
    torch.manual_seed(seed)
    model = adp.AudioDiffusionModel(
        **kw, diffusion_sigma_distribution=adp.LogNormalDistribution(mean=-3.0, std=1.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def released(tmp_path, monkeypatch):
    model = official_model(REDUCED)
    path = tmp_path / "msdm.ckpt"
    write_released(path, monkeypatch, model.unet.state_dict(), REDUCED)
    return path, model


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_paper_preset_has_the_official_parameter_count():
    adp = _adp()
    kw = {k: v for k, v in PAPER.items() if k not in ("learning_rate", "beta1", "beta2")}
    for stems in (4, 1):
        with torch.device("meta"):
            official = adp.AudioDiffusionModel(**{**kw, "in_channels": stems},
                                               diffusion_sigma_distribution=None)
            ours = build_network(get_preset("paper").model, stems)
        assert count_parameters(ours) == count_parameters(official.unet)
    assert count_parameters(ours) == 405_491_100  # ISDM, one stem
    with torch.device("meta"):
        assert count_parameters(build_network(Config().model, 4)) == 405_497_700


@torch.no_grad()
def test_released_checkpoint_gives_the_official_denoiser(released, capsys):
    path, model = released
    cfg, den = load_checkpoint(path)
    assert (cfg.model.channels, cfg.model.patch_factor, cfg.model.attention_features) == (32, 4, 16)
    assert not cfg.model.attention_bias and cfg.model.patch_groups == "patch_factor"
    assert (cfg.diffusion.sigma_data, cfg.diffusion.p_mean, cfg.diffusion.p_std) == (0.2, -3, 1)
    assert (cfg.data.sample_rate, cfg.data.chunk_samples, cfg.data.stems) == (22050, 262144, STEMS)
    assert cfg.train.lr == 1e-4 and cfg.train.stem == ""
    g = torch.Generator().manual_seed(1)
    clean = 0.3 * torch.randn(2, 4, 8192, generator=g)
    errors = {}
    for sigma in SIGMAS:
        x = clean + sigma * torch.randn(clean.shape, generator=g)
        want = model.diffusion.denoise_fn(x, sigma=sigma)
        errors[sigma] = _max_rel(den(x, sigma), want)
        c_in, c_noise = 1 / (sigma**2 + 0.04) ** 0.5, torch.full((2,), sigma).log() / 4
        net_err = _max_rel(den.net(x * c_in, c_noise), model.unet(x * c_in, c_noise))
        assert errors[sigma] < 1e-5 and net_err < 1e-4, (sigma, errors[sigma], net_err)
    with capsys.disabled():
        print("\nmax relative error of D(x; sigma) vs ADP denoise_fn:",
              {s: f"{e:.1e}" for s, e in errors.items()})
    # the format-1 patch-block grouping would not match the release
    legacy = build_denoiser(apply_overrides(cfg, {"model.patch_groups": "resnet_groups"}))
    legacy.load_state_dict(den.state_dict())
    x = clean + 0.5 * torch.randn(clean.shape, generator=g)
    assert _max_rel(legacy(x, 0.5), model.diffusion.denoise_fn(x, sigma=0.5)) > 1e-3


@torch.no_grad()
def test_weakly_msdm_release_loads_one_checkpoint_per_stem(tmp_path, monkeypatch):
    from msdm.config import apply_overrides as override
    from pipelines import convert
    from pipelines.common import parse_ckpt
    from pipelines.models import load_model

    hp = {**REDUCED, "in_channels": 1, "learning_rate": 1e-5}
    models, paths = {}, {}
    for i, stem in enumerate(STEMS):
        models[stem] = official_model(hp, seed=i)
        paths[stem] = tmp_path / f"{stem}.ckpt"
        write_released(paths[stem], monkeypatch, models[stem].unet.state_dict(), hp)
    cfg, den = load_model(parse_ckpt([f"{s}={p}" for s, p in paths.items()]))
    cfg = override(cfg, {"data.chunk_samples": 131072})
    assert cfg.data.chunk_samples == 131072 and cfg.sampler.s_churn == 40.0
    x = 0.3 * torch.randn(1, 4, 4096)
    want = torch.cat([models[s].diffusion.denoise_fn(x[:, i : i + 1], sigma=0.3)
                      for i, s in enumerate(STEMS)], dim=1)
    assert _max_rel(den(x, 0.3), want) < 1e-5
    with pytest.raises(CheckpointError, match="needs its stem"):
        load_checkpoint(paths["bass"])
    out = tmp_path / "drums-converted.ckpt"
    convert.main(["--input", str(paths["drums"]), "--output", str(out), "--stem", "drums"])
    cfg, drums = load_checkpoint(out)
    assert cfg.train.stem == "drums" and cfg.train.lr == 1e-5 and drums.net.in_channels == 1
    assert _max_rel(drums(x[:, 1:2], 0.3), want[:, 1:2]) < 1e-5


@torch.no_grad()
def test_convert_writes_a_weights_only_checkpoint_with_the_same_output(released, tmp_path):
    from pipelines import convert

    path, model = released
    out = tmp_path / "out" / "model.ckpt"
    convert.main(["--input", str(path), "--output", str(out), "--set", "data.sample_rate=44100"])
    state = torch.load(out, weights_only=True)  # plain msdm format: no foreign classes
    assert state["format_version"] == 2 and state["step"] == 1_634_000 and state["ema"] is None
    cfg, den = load_checkpoint(out)
    assert cfg.data.sample_rate == 44100
    x = 0.3 * torch.randn(1, 4, 4096)
    assert _max_rel(den(x, 0.2), model.diffusion.denoise_fn(x, sigma=0.2)) < 1e-5
    with pytest.raises(SystemExit, match="architecture"):
        convert.main(["--input", str(path), "--output", str(out), "--set", "model.channels=64"])


class _Exec:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


@pytest.mark.parametrize("where", ["bare_exec", "bare_system", "hyper_parameters", "loops"])
def test_code_executing_pickle_is_refused_and_never_runs(tmp_path, monkeypatch, where):
    from pipelines import separate

    marker = tmp_path / "pwned"
    run = _Exec(f"open({str(marker)!r}, 'w').close()")
    path = tmp_path / "evil.ckpt"
    if where == "bare_exec":
        torch.save(run, path)
    elif where == "bare_system":
        torch.save(_System(f"touch {marker}"), path)
    else:  # a release-shaped file with the payload inside
        hp = {**REDUCED, "learning_rate": run} if where == "hyper_parameters" else REDUCED
        write_released(path, monkeypatch, {}, hp, **({"loops": run} if where == "loops" else {}))
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    for ckpt in (str(path), f"bass={path}"):  # a joint model, or one stem of an ISDM
        with pytest.raises(CheckpointError, match="refused"):
            separate.main(["--ckpt", ckpt, "--input", str(tmp_path), "--output",
                           str(tmp_path / "out")])
    assert not marker.exists()


def test_lightning_file_loads_without_lightning_or_adp_and_drops_foreign_objects(
        released, tmp_path, monkeypatch):
    """Unknown objects outside the model (Lightning 1.7 also saves the datamodule's
    hyper-parameters: dataset objects holding numpy arrays) are kept inert and dropped."""
    _, model = released
    dataset_cls = type("MultiSourceDataset", (), {})
    _fake_module(monkeypatch, "main.data", MultiSourceDataset=dataset_cls)
    dataset = dataset_cls()
    dataset.cumsum, dataset.stems = np.cumsum(np.arange(5.0)), list(STEMS)
    path = tmp_path / "with-datamodule.ckpt"
    write_released(path, monkeypatch, model.unet.state_dict(), REDUCED,
                   datamodule_hyper_parameters={"train_dataset": dataset, "batch_size": 8})
    code = ("import sys\n"
            "for m in ('pytorch_lightning', 'audio_diffusion_pytorch', 'main', 'einops'):\n"
            "    sys.modules[m] = None  # importing any of them now fails\n"
            "import torch, msdm\n"
            f"cfg, den = msdm.load_checkpoint({str(path)!r})\n"
            "x = torch.linspace(-1, 1, 4 * 4096).reshape(1, 4, 4096) * 0.3\n"
            f"torch.save(den(x, 0.3), {str(tmp_path / 'out.pt')!r})\n"
            "print(cfg.model.channels)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "32"
    x = torch.linspace(-1, 1, 4 * 4096).reshape(1, 4, 4096) * 0.3
    with torch.no_grad():
        want = model.diffusion.denoise_fn(x, sigma=0.3)
    assert _max_rel(torch.load(tmp_path / "out.pt"), want) < 1e-5
    inside = tmp_path / "foreign-in-hparams.ckpt"  # where the architecture is read: refused
    write_released(inside, monkeypatch, model.unet.state_dict(), {**REDUCED, "stems": dataset})
    with pytest.raises(CheckpointError, match="main.data.MultiSourceDataset"):
        load_checkpoint(inside)


def test_format_1_checkpoint_keeps_its_network(tmp_path):
    """v1 files predate attention_bias/patch_groups: they load as the biased, resnet-grouped net."""
    legacy = apply_overrides(get_preset("tiny"), {"model.channels": 32,  # 8 patch channels
                                                  "model.attention_bias": True,
                                                  "model.patch_groups": "resnet_groups"})
    torch.manual_seed(0)
    den = build_denoiser(legacy).eval()
    path = tmp_path / "v1.ckpt"
    save(path, legacy, den, step=3)
    state = torch.load(path, weights_only=True)
    state["format_version"] = 1
    for key in ("attention_bias", "patch_groups"):
        del state["config"]["model"][key]
    torch.save(state, path)
    cfg, loaded = load_checkpoint(path)
    assert cfg.model.attention_bias and cfg.model.patch_groups == "resnet_groups"
    x = 0.3 * torch.randn(2, 4, 4096)
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([0.1, 1.0])), den(x, torch.tensor([0.1, 1.0])))
    assert Config().model.attention_bias is False  # new trainings get the released layout


def test_loads_from_several_threads_keep_their_own_allowlist(tmp_path, monkeypatch):
    """torch's weights_only allowlist is process-wide; msdm widens it only under a lock, so
    threads loading files with different foreign objects each get their own stand-ins and the
    allowlist is left as it was."""
    from concurrent.futures import ThreadPoolExecutor

    from msdm.released import safe_load

    before = list(torch.serialization.get_safe_globals())
    paths = {}
    for i in range(4):
        name = f"foreign{i}.things"
        cls = type(f"Thing{i}", (), {})
        _fake_module(monkeypatch, name, **{f"Thing{i}": cls})
        paths[f"{name}.Thing{i}"] = tmp_path / f"t{i}.ckpt"
        torch.save({"x": cls(), "w": torch.full((3,), float(i))}, paths[f"{name}.Thing{i}"])

    def load(item):
        name, path = item
        state = safe_load(path)
        return type(state["x"]).name == name and float(state["w"][0]) == float(name[7])

    with ThreadPoolExecutor(8) as pool:
        ok = list(pool.map(load, list(paths.items()) * 25))
    assert all(ok) and len(ok) == 100
    assert list(torch.serialization.get_safe_globals()) == before


def test_convert_from_s3_leaves_no_local_copy(released, s3_bucket, tmp_path, monkeypatch):
    import tempfile

    import s3fs

    from pipelines import convert

    path, _ = released
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    fs.put_file(str(path), f"{s3_bucket}/released/msdm.ckpt")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = convert.main(["--input", f"s3://{s3_bucket}/released/msdm.ckpt", "--output",
                        str(tmp_path / "m.ckpt")])
    assert out["step"] == 1_634_000 and (tmp_path / "m.ckpt").exists()
    assert list(scratch.iterdir()) == []  # the downloaded copy is gone
