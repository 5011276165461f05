import io

import pytest
import torch

import msdm
from msdm.checkpoint import CheckpointError, build_denoiser, load_checkpoint, load_factorized, save
from msdm.config import apply_overrides
from msdm.training import make_ema, make_optimizer


def test_round_trip_gives_identical_output(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    den = build_denoiser(tiny_cfg)
    ema = make_ema(den)
    for p in ema.parameters():
        p.data.add_(0.01)
    opt = make_optimizer(den, tiny_cfg)
    path = tmp_path / "model.ckpt"
    save(path, tiny_cfg, den, ema, step=7, optimizer=opt, extra={"history": [{"step": 1}]})
    state = torch.load(path, weights_only=True)  # loadable without pickled classes
    assert state["step"] == 7 and state["extra"]["history"] == [{"step": 1}]
    x, sigma = torch.randn(2, 4, 4096), torch.tensor([0.1, 1.0])
    cfg, loaded = load_checkpoint(path)
    assert cfg == tiny_cfg
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma), ema(x, sigma))
        _, raw = load_checkpoint(path, use_ema=False)
        assert torch.equal(raw(x, sigma), den(x, sigma))


def test_file_objects_and_gaussian_kind(tiny_cfg, cov):
    cfg = apply_overrides(tiny_cfg, {"model.kind": "gaussian"})
    den = msdm.GaussianDenoiser(cov)
    buf = io.BytesIO()
    save(buf, cfg, den)
    buf.seek(0)
    _, loaded = load_checkpoint(buf)
    assert torch.equal(loaded.cov, cov)


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path, tiny_cfg):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable msdm checkpoint"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an msdm checkpoint"):
        load_checkpoint(foreign)
    good = tmp_path / "good.ckpt"
    save(good, tiny_cfg, build_denoiser(tiny_cfg))
    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_isdm_checkpoints_build_a_factorized_denoiser(tmp_path, tiny_cfg):
    paths = {}
    for stem in tiny_cfg.data.stems:
        cfg = apply_overrides(tiny_cfg, {"train.stem": stem})
        paths[stem] = tmp_path / f"{stem}.ckpt"
        save(paths[stem], cfg, build_denoiser(cfg))
    cfg, fact = load_factorized(paths, tiny_cfg.data.stems)
    assert cfg.train.stem == "" and cfg.sampler.s_churn == 40.0
    assert fact(torch.randn(1, 4, 4096), torch.tensor([0.5])).shape == (1, 4, 4096)
    with pytest.raises(CheckpointError, match="missing"):
        load_factorized({k: v for k, v in paths.items() if k != "piano"}, tiny_cfg.data.stems)
    swapped = dict(paths, bass=paths["drums"])
    with pytest.raises(CheckpointError, match="prior of drums"):
        load_factorized(swapped, tiny_cfg.data.stems)
    other = apply_overrides(tiny_cfg, {"train.stem": "piano", "data.sample_rate": 16000})
    save(paths["piano"], other, build_denoiser(other))
    with pytest.raises(CheckpointError, match="sample_rate"):
        load_factorized(paths, tiny_cfg.data.stems)
