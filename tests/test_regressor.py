"""#16: the HDemucs regressor (config, checkpoint, L1 training, one-pass separation) and --init
refinement (the Dirac sampler started from the regressor's estimate), without Ray."""

import numpy as np
import pytest
import torch

import msdm
from msdm.checkpoint import CheckpointError, build_model, check_size, load_checkpoint, save
from msdm.config import ConfigError, apply_overrides, load_config
from msdm.regressor import Regressor, project_residual
from msdm.sampling import nfe
from msdm.tasks import item_generators, project
from msdm.training import make_optimizer, train_step, validation_loss
from pipelines import evaluate
from pipelines.models import Separator, separation_nfe, stable_seed

TINY_HDEMUCS = ["model.kind=hdemucs"]


def _reg_cfg(*more):
    return load_config("tiny", TINY_HDEMUCS + list(more))


@pytest.fixture(scope="module")
def reg_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = _reg_cfg()
    path = tmp_path_factory.mktemp("reg") / "reg.ckpt"
    save(path, cfg, build_model(cfg))
    return path


def _mixtures(cfg, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    stems = 0.2 * torch.randn(n, len(cfg.data.stems), cfg.data.chunk_samples, generator=g)
    return stems, stems.sum(1)  # [N, S, T], [N, T]


def test_presets_fit_hdemucs_and_bad_shapes_name_the_keys():
    for preset, size in (("tiny", 0.1e6), ("small", 3e6), ("paper", 100e6)):
        cfg = load_config(preset, TINY_HDEMUCS)
        assert check_size(cfg) < size  # each preset's regressor is sized for its machine
    with pytest.raises(ConfigError, match="hdemucs_nfft 512 with hdemucs_depth 3"):
        _reg_cfg("model.hdemucs_nfft=512")
    with pytest.raises(ConfigError, match="hdemucs_depth 2"):
        _reg_cfg("model.hdemucs_depth=2")
    with pytest.raises(ConfigError, match="train.stem"):
        _reg_cfg("train.stem=bass")
    # the U-Net's length multiple does not apply: any chunk length
    assert _reg_cfg("data.chunk_samples=4000").data.chunk_samples == 4000


def test_regressor_checkpoint_round_trips(reg_ckpt):
    cfg, model = load_checkpoint(reg_ckpt)
    assert isinstance(model, Regressor) and cfg.model.kind == "hdemucs"
    mixture = torch.randn(2, 1, cfg.data.chunk_samples) * 0.3
    again = build_model(cfg)
    again.load_state_dict(torch.load(reg_ckpt, weights_only=True)["model"])
    assert model(mixture).shape == (2, 4, cfg.data.chunk_samples)
    assert torch.equal(model(mixture), again.eval()(mixture))


def test_l1_training_lowers_the_loss_and_validation_is_deterministic():
    cfg = _reg_cfg("train.lr=3e-3")
    torch.manual_seed(0)
    model = build_model(cfg)
    stems, _ = _mixtures(cfg, 4)
    opt = make_optimizer(model, cfg)
    before = validation_loss(model, stems, cfg)
    assert set(before) == {"val_loss"} and before == validation_loss(model, stems, cfg)
    for step in range(8):
        train_step(model, stems, opt, cfg, step=step)
    assert validation_loss(model, stems, cfg)["val_loss"] < before["val_loss"]


def test_regressor_separates_in_one_pass_and_sums_to_the_mixture(reg_ckpt):
    cfg, model = load_checkpoint(reg_ckpt)
    stems, mix = _mixtures(cfg)
    sep = Separator(str(reg_ckpt), cfg)
    est = sep(mix.numpy(), [("a", 0), ("a", 1)])
    want = project_residual(model(mix[:, None]), mix[:, None])
    np.testing.assert_allclose(est, want.numpy(), atol=1e-6)
    np.testing.assert_allclose(est.sum(1), mix.numpy(), atol=1e-5)
    assert separation_nfe(cfg) == 1


def test_separate_stage_and_generate_take_the_regressor(reg_ckpt, tmp_path):
    from pipelines import generate
    from pipelines.segments import SeparateSegments

    cfg = _reg_cfg()
    _, mix = _mixtures(cfg)
    batch = {"key": np.array(["a", "a"], dtype=object), "seg": np.array([0, 1]),
             "error": np.array(["", ""], dtype=object), "mixture": mix.numpy()}
    out = SeparateSegments(str(reg_ckpt), cfg.to_dict())(batch)
    assert out["stems"].shape == (2, 4, cfg.data.chunk_samples) and not any(out["error"])
    np.testing.assert_allclose(out["stems"].sum(1), mix.numpy(), atol=1e-5)
    with pytest.raises(SystemExit, match="regressor"):
        generate.main(["--ckpt", str(reg_ckpt), "--output", str(tmp_path / "gen")])


def test_project_residual_never_moves_away_from_stems_that_sum_to_the_mixture():
    g = torch.Generator().manual_seed(1)
    truth = torch.randn(3, 4, 256, generator=g)
    est = truth + torch.randn(3, 4, 256, generator=g)
    out = project_residual(est, truth.sum(1, keepdim=True))
    torch.testing.assert_close(out.sum(1), truth.sum(1), atol=1e-5, rtol=0)
    assert (out - truth).norm() <= (est - truth).norm()


def test_tiny_sigma_max_returns_the_init_projected_onto_the_mixture(tiny_unet_ckpt):
    cfg, den = load_checkpoint(tiny_unet_ckpt)
    stems, mix = _mixtures(cfg)
    init = stems + 0.05 * torch.randn(stems.shape, generator=torch.Generator().manual_seed(2))
    tiny = msdm.SamplerConfig(num_steps=3, sigma_min=1e-6, sigma_max=1e-6, s_churn=0.0,
                              resamples=1)
    out = msdm.separate(den, mix[:, None], 4, tiny, constrained=1, init=init,
                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, project(init, mix[:, None], 1), atol=1e-4, rtol=0)


def test_init_noise_zero_starts_from_the_estimate_itself(gaussian_denoiser, cov):
    """init_noise 0: no noise is added, so one Euler step from sigma_max to 0 under the exact
    Gaussian denoiser gives, in closed form, D_n(z) + (z_k - D_k(z)) for every free stem n (z =
    the estimate, already summing to the mixture) and mixture - the others for stem k; the
    generator plays no part. init_noise 1 re-noises the estimate to sigma_max (SDEdit)."""
    g = torch.Generator().manual_seed(3)
    stems = torch.linalg.cholesky(cov).float() @ torch.randn(2, 4, 512, generator=g)
    mix = stems.sum(1, keepdim=True)
    z = project(stems + 0.1 * torch.randn(stems.shape, generator=g), mix, 1)
    one = msdm.SamplerConfig(num_steps=1, sigma_max=0.2, s_churn=0.0, resamples=1)
    a = cov @ torch.linalg.inv(cov + 0.2**2 * torch.eye(4, dtype=torch.float64))
    d = (a.float() @ z)
    free = d + (z[:, 1:2] - d[:, 1:2])
    want = torch.cat([free[:, :1], mix - free[:, [0, 2, 3]].sum(1, keepdim=True), free[:, 2:]], 1)
    outs = [msdm.separate(gaussian_denoiser, mix, 4, one, constrained=1, init=z, init_noise=0.0,
                          generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    torch.testing.assert_close(outs[0], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    noisy = msdm.separate(gaussian_denoiser, mix, 4, one, constrained=1, init=z, init_noise=1.0,
                          generator=torch.Generator().manual_seed(0))
    assert (noisy - want).abs().max() > 1e-2
    torch.testing.assert_close(noisy.sum(1, keepdim=True), mix, atol=1e-5, rtol=0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="init_noise"):
            msdm.separate(gaussian_denoiser, mix, 4, one, init=z, init_noise=bad)
        with pytest.raises(ConfigError, match="init_noise"):
            apply_overrides(load_config("tiny"), {"separation.init_noise": bad})

def test_init_refinement_in_the_separator(tiny_unet_ckpt, reg_ckpt):
    """--init: sigma_max -> 0 gives the regressor row exactly; a real sigma_max refines it, and
    the refined stems still sum to the mixture."""
    base, _ = load_checkpoint(tiny_unet_ckpt)
    stems, mix = _mixtures(base)
    keys = [("t", 0), ("t", 1)]
    regressed = Separator(str(reg_ckpt), _reg_cfg())(mix.numpy(), keys)
    near = apply_overrides(base, {"separation.init": str(reg_ckpt), "sampler.sigma_max": 1e-6,
                                  "sampler.sigma_min": 1e-6, "sampler.s_churn": 0.0})
    out = Separator(str(tiny_unet_ckpt), near)(mix.numpy(), keys)
    np.testing.assert_allclose(out, regressed, atol=1e-4)
    refine = apply_overrides(base, {"separation.init": str(reg_ckpt), "sampler.sigma_max": 0.3})
    sep = Separator(str(tiny_unet_ckpt), refine)
    out = sep(mix.numpy(), keys)
    assert np.abs(out - regressed).max() > 1e-2  # the sampler moved it
    np.testing.assert_allclose(out.sum(1), mix.numpy(), atol=1e-5)
    # separation.init_noise reaches the sampler: with no noise and no churn the refinement no
    # longer depends on the item seeds
    still = apply_overrides(refine, {"separation.init_noise": 0.0, "sampler.s_churn": 0.0})
    a = Separator(str(tiny_unet_ckpt), still)(mix.numpy(), keys)
    b = Separator(str(tiny_unet_ckpt), still, seed=7)(mix.numpy(), keys)
    np.testing.assert_allclose(a, b, atol=1e-6)
    noisy = apply_overrides(still, {"separation.init_noise": 1.0})
    assert np.abs(Separator(str(tiny_unet_ckpt), noisy)(mix.numpy(), keys) - a).max() > 1e-3
    plain = Separator(str(tiny_unet_ckpt), apply_overrides(refine, {"separation.init": ""}))
    assert sep.init is not None and plain.init is None
    assert separation_nfe(refine) == separation_nfe(plain.cfg) + 1


def test_separator_averages_posterior_samples(tiny_unet_ckpt, reg_ckpt):
    """separation.samples: the Separator returns the mean of that many draws per segment
    (the same as msdm.separate with samples=K and the item's seed), which still sums to the
    mixture, and counts K x the sampler's NFE (+ 1 for --init)."""
    base, _ = load_checkpoint(tiny_unet_ckpt)
    _, mix = _mixtures(base)
    keys = [("t", 0), ("t", 1)]
    cfg = apply_overrides(base, {"sampler.num_steps": 3, "separation.samples": 3})
    one = Separator(str(tiny_unet_ckpt), apply_overrides(cfg, {"separation.samples": 1}))
    avg = Separator(str(tiny_unet_ckpt), cfg)
    out1, out3 = one(mix.numpy(), keys), avg(mix.numpy(), keys)
    assert np.abs(out3 - out1).max() > 1e-3
    _, den = load_checkpoint(tiny_unet_ckpt)
    direct = msdm.separate(den, mix[:, None], 4, cfg.sampler, samples=3,
                           generator=item_generators([stable_seed(0, *k) for k in keys]))
    np.testing.assert_allclose(out3, direct.numpy(), atol=1e-5)
    np.testing.assert_allclose(out3.sum(1), mix.numpy(), atol=5e-5)  # float32 mean of 3
    assert separation_nfe(cfg) == 3 * separation_nfe(one.cfg) == 3 * nfe(cfg.sampler)
    refine = apply_overrides(cfg, {"separation.init": str(reg_ckpt)})
    assert separation_nfe(refine) == 3 * nfe(cfg.sampler) + 1
    for bad in (0, 2.0, True):
        with pytest.raises(ConfigError, match="samples"):
            apply_overrides(cfg, {"separation.samples": bad})


def test_separator_threads_and_the_flag(tiny_unet_ckpt):
    """--threads: a CPU model actor runs that many torch threads (Ray pins it to one)."""
    from pipelines import separate

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        base, _ = load_checkpoint(tiny_unet_ckpt)
        Separator(str(tiny_unet_ckpt), base, threads=2)
        assert torch.get_num_threads() == 2
        Separator(str(tiny_unet_ckpt), base)  # 0: leave the process's setting alone
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for job, source in ((evaluate, "--data"), (separate, "--input")):
        args = ["--ckpt", "c", "--output", "o", source, "x", "--threads"]
        assert job.build_parser().parse_args([*args, "3"]).threads == 3
        for bad in ("-1", "2.5", "x"):
            with pytest.raises(SystemExit):
                job.build_parser().parse_args([*args, bad])


def test_missing_or_mismatched_init_fails_in_the_driver(tiny_unet_ckpt, reg_ckpt, tmp_path):
    def run(init):  # fails in resolve_config, before the data is read or Ray starts
        evaluate.main(["--ckpt", str(tiny_unet_ckpt), "--data", str(tmp_path / "none"),
                       "--output", str(tmp_path / "out"), "--init", str(init)])

    with pytest.raises(CheckpointError, match="--init .*missing.ckpt.*not found"):
        run(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="needs a regressor"):
        run(tiny_unet_ckpt)
    for override, match in (("data.stems=[bass,drums,vocals,piano]", "data.stems"),
                            ("data.sample_rate=16000", "data.sample_rate 16000 differs")):
        cfg = _reg_cfg(override)
        path = tmp_path / f"{override.split('=')[0]}.ckpt"
        save(path, cfg, build_model(cfg))
        with pytest.raises(CheckpointError, match=match):
            run(path)
    with pytest.raises(CheckpointError, match="itself a regressor"):
        evaluate.main(["--ckpt", str(reg_ckpt), "--data", str(tmp_path), "--output",
                       str(tmp_path / "o"), "--init", str(reg_ckpt)])
    assert not (tmp_path / "out").exists()


def test_separate_and_tune_check_init_in_the_driver(tiny_unet_ckpt, tmp_path):
    from pathlib import Path

    from pipelines import separate, tune

    space = Path(__file__).resolve().parents[1] / "tune_spaces" / "refine.yaml"
    missing = str(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="--init .*missing.ckpt"):
        separate.main(["--ckpt", str(tiny_unet_ckpt), "--input", str(tmp_path), "--output",
                       str(tmp_path / "stems"), "--init", missing])
    with pytest.raises(CheckpointError, match="--init .*missing.ckpt"):
        tune.main(["--ckpt", str(tiny_unet_ckpt), "--data", str(tmp_path), "--space",
                   str(space), "--storage", str(tmp_path / "sw"), "--name", "n", "--init",
                   missing])


@pytest.mark.slow(seconds=65)
def test_hdemucs_trains_with_ray_and_evaluate_scores_it(synth_prepared, tmp_path,
                                                         tiny_unet_ckpt):
    """The regressor row: pipelines.train with --set model.kind=hdemucs (a 2-step Ray Train
    fit), its exported checkpoint round-trips, evaluate scores it at NFE 1, separate writes
    its stems (summing to the file), and evaluate --init refines its estimate with the U-Net."""
    import soundfile as sf

    from pipelines import separate, train

    data = str(synth_prepared / "prepared")
    out = train.main(["--data", data, "--storage", str(tmp_path / "runs"), "--name", "reg",
                      "--config", "tiny", "--set", "model.kind=hdemucs", "--max-steps", "2"])
    assert out["step"] == 2 and np.isfinite(out["val_loss"])
    ckpt = tmp_path / "runs" / "reg" / "model.ckpt"
    cfg, model = load_checkpoint(ckpt)  # the exported EMA weights load as a regressor
    assert isinstance(model, Regressor) and cfg.train.max_steps == 2
    mixture = torch.randn(1, 1, cfg.data.chunk_samples) * 0.1
    assert torch.isfinite(model(mixture)).all()
    reg = evaluate.main(["--ckpt", str(ckpt), "--output", str(tmp_path / "ev"), "--data", data,
                         "--max-chunks", "12", "--batch-size", "6"])
    assert reg["nfe"] == 1 and reg["windows"] > 0 and np.isfinite(reg["si_sdri"]["all"])
    (tmp_path / "in").mkdir()
    t = np.arange(int(1.5 * 44100)) / 44100
    song = np.stack([0.3 * np.sin(2 * np.pi * 110 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], 1)
    sf.write(tmp_path / "in" / "a.wav", song.astype(np.float32), 44100)
    res = separate.main(["--ckpt", str(ckpt), "--input", str(tmp_path / "in"), "--output",
                         str(tmp_path / "stems")])
    row = res["manifest"][str(tmp_path / "in" / "a.wav")]
    assert row["status"] == "ok" and max(row["residual_db_per_channel"]) < -60, row
    assert sf.info(row["outputs"]["bass"]).channels == 2
    refined = evaluate.main(["--ckpt", str(tiny_unet_ckpt), "--init", str(ckpt), "--data", data,
                             "--output", str(tmp_path / "ev2"), "--max-chunks", "12",
                             "--batch-size", "6", "--set", "sampler.num_steps=4"])
    unet_cfg, _ = load_checkpoint(tiny_unet_ckpt)
    unet_cfg = apply_overrides(unet_cfg, {"sampler.num_steps": 4})
    assert refined["nfe"] == separation_nfe(unet_cfg) + 1 == 5  # + the regressor's pass
    assert refined["windows"] == reg["windows"] and np.isfinite(refined["si_sdri"]["all"])


def test_every_regressor_parameter_gets_a_gradient():
    """DDP (pipelines.train with several workers) needs every parameter in the loss."""
    cfg = _reg_cfg()
    model = build_model(cfg)
    stems, _ = _mixtures(cfg)
    from msdm.regressor import regression_loss

    regression_loss(model, stems).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
