"""Generation, imputation and separation against the exact Gaussian oracle."""

import pytest
import torch
from conftest import COV, gaussian_samples

import msdm
from msdm.diffusion import FactorizedDenoiser, GaussianDenoiser, gaussian_conditional
from msdm.tasks import item_generators, project

B, T = 8, 4096


def _stem_cov(x):
    s = x.shape[1]
    return torch.cov(x.permute(1, 0, 2).reshape(s, -1).double())


def test_generation_reproduces_prior_covariance(gaussian_denoiser):
    cfg = msdm.SamplerConfig(num_steps=150, sigma_max=20.0, s_churn=20.0, resamples=1,
                             solver="heun")
    x = msdm.generate(gaussian_denoiser, (B, 4, T), cfg, generator=torch.Generator().manual_seed(0))
    emp = _stem_cov(x)
    var_ratio = emp.diagonal() / COV.diagonal()
    corr = emp / emp.diagonal().sqrt()[:, None] / emp.diagonal().sqrt()[None]
    ref_corr = COV / COV.diagonal().sqrt()[:, None] / COV.diagonal().sqrt()[None]
    print("generated/prior variance per stem:", [f"{v:.3f}" for v in var_ratio])
    print("max correlation error:", f"{(corr - ref_corr).abs().max():.4f}")
    assert ((var_ratio - 1).abs() < 0.05).all()
    assert (corr - ref_corr).abs().max() < 0.03


@pytest.mark.parametrize("likelihood", ["dirac", "dirac_sym", "gaussian"])
def test_separation_regression_matches_posterior_mean(gaussian_denoiser, likelihood):
    """E[x | y] = Sig 1 / (1' Sig 1) y for y = sum(x), x ~ N(0, Sig)."""
    x = gaussian_samples(COV, B, T, seed=1)
    mixture = x.sum(1, keepdim=True)
    est = msdm.separate(gaussian_denoiser, mixture, 4, msdm.SamplerConfig(),
                        likelihood=likelihood, generator=torch.Generator().manual_seed(2))
    y = mixture.reshape(-1).double()
    coef = est.permute(1, 0, 2).reshape(4, -1).double() @ y / (y @ y)
    one = torch.ones(4, dtype=torch.float64)
    ref = COV @ one / (one @ COV @ one)
    print(f"{likelihood}: regression {coef.numpy().round(4)} "
          f"vs Sig1/(1'Sig1) {ref.numpy().round(4)}")
    assert (coef - ref).abs().max() < 0.03
    if likelihood != "gaussian":
        assert (est.sum(1, keepdim=True) - mixture).abs().max() < 1e-5


def test_dirac_sym_samples_the_exact_posterior_covariance(gaussian_denoiser):
    """x ~ N(0, Sig), y = sum x: x | y ~ N(Sig 1 y / (1'Sig 1), Sig - Sig 1 1'Sig / (1'Sig 1)).
    The deterministic sampler (Heun 40, no churn) with dirac_sym draws that covariance, every
    stem within 5 %; the paper's parametrisation (stem k = y - the others) collapses the
    constrained stem's variance under the same sampler (its noise is 3x the others')."""
    x = gaussian_samples(COV, B, T, seed=1)
    mixture = x.sum(1, keepdim=True)
    one = torch.ones(4, dtype=torch.float64)
    c1 = COV @ one
    post = COV - torch.outer(c1, c1) / (one @ c1)
    mean = (c1 / (one @ c1))[None, :, None] * mixture.double()
    cfg = msdm.SamplerConfig(num_steps=40, resamples=1, s_churn=0.0, solver="heun", sigma_max=2.0)
    ratios = {}
    for likelihood in ("dirac_sym", "dirac"):
        est = msdm.separate(gaussian_denoiser, mixture, 4, cfg, likelihood=likelihood,
                            generator=torch.Generator().manual_seed(2))
        assert (est.sum(1, keepdim=True) - mixture).abs().max() < 1e-5
        r = (est.double() - mean).permute(1, 0, 2).reshape(4, -1)
        emp = r @ r.T / r.shape[1]
        ratios[likelihood] = emp.diagonal() / post.diagonal()
        print(likelihood, "posterior variance ratio per stem:", ratios[likelihood].numpy().round(3))
        if likelihood == "dirac_sym":
            assert ((ratios[likelihood] - 1).abs() < 0.05).all()
            assert (emp - post).abs().max() < 0.05 * post.diagonal().max()
    assert ratios["dirac"][0] < 0.5  # constrained = 0 (bass), as the paper


def test_dirac_separation_sums_to_mixture_for_every_constrained_stem(gaussian_denoiser):
    mixture = gaussian_samples(COV, 2, 512, seed=3).sum(1, keepdim=True)
    cfg = msdm.SamplerConfig(num_steps=10, resamples=2)
    for k in range(4):
        est = msdm.separate(gaussian_denoiser, mixture, 4, cfg, constrained=k)
        assert (est.sum(1, keepdim=True) - mixture).abs().max() < 1e-5


def test_imputation_keeps_known_stems_and_pulls_toward_conditional_mean(gaussian_denoiser):
    x = gaussian_samples(COV, B, T, seed=4)
    known = [True, False, True, False]
    k = torch.tensor(known)
    a, _ = gaussian_conditional(COV, known)
    cond_mean = torch.einsum("uk,bkt->but", a, x[:, k].double())
    cfg = msdm.SamplerConfig(num_steps=256, sigma_max=20.0, s_churn=10.0, resamples=1)
    betas = {}
    for method in ("replace", "guidance"):
        out = msdm.impute(gaussian_denoiser, x, known, cfg, method=method,
                          generator=torch.Generator().manual_seed(5))
        assert torch.equal(out[:, k], x[:, k])
        xu = out[:, ~k].double()
        betas[method] = ((xu * cond_mean).sum() / (cond_mean * cond_mean).sum()).item()
    print("regression of imputed stems on E[x_u | x_k] (1 = exact posterior, 0 = unconditional):",
          {m: round(b, 3) for m, b in betas.items()})
    assert 0.1 < betas["replace"] < 0.7  # the paper's method carries part of the context
    assert 0.85 < betas["guidance"] < 1.15  # guidance gets close to the exact posterior


def test_posterior_mean_of_samples_matches_closed_form_error(gaussian_denoiser):
    """Dirac posterior of x ~ N(0, Sig) given y = 1'x: mean m y with m = Sig 1 / (1'Sig 1),
    covariance P = Sig - Sig 1 1' Sig / (1'Sig 1). One sample misses the posterior mean by P per
    stem; the average of K samples by P / K, and misses the true stems by (1 + 1/K) P. (The
    constrained stem is set to y - the others, whose summed noise the denoiser does not expect:
    the Dirac sampler draws it narrower than P, so it is checked against its own spread.)"""
    x = gaussian_samples(COV, 4, T, seed=7).double()
    mixture = x.sum(1, keepdim=True)
    one = torch.ones(4, dtype=torch.float64)
    m = COV @ one / (one @ COV @ one)
    post = COV - torch.outer(COV @ one, COV @ one) / (one @ COV @ one)
    mean = m[None, :, None] * mixture
    cfg = msdm.SamplerConfig(num_steps=40, sigma_max=3.0, s_churn=0.0, solver="heun")
    to_mean, to_truth = {}, {}
    for k in (1, 4):
        est = msdm.separate(gaussian_denoiser, mixture.float(), 4, cfg, samples=k,
                            generator=item_generators(range(4))).double()
        assert (est.sum(1, keepdim=True) - mixture).abs().max() < 1e-5
        to_mean[k] = (est - mean).pow(2).mean((0, 2)) / post.diagonal()
        to_truth[k] = (est - x).pow(2).mean((0, 2)) / post.diagonal()
        print(f"samples {k}: error to the posterior mean / P {to_mean[k].numpy().round(3)} "
              f"(exact {1 / k:.3f}), to the stems {to_truth[k].numpy().round(3)} "
              f"(exact {1 + 1 / k:.3f})")
        assert ((to_mean[k][1:] - 1 / k).abs() < 0.08 / k).all()  # the free stems: exact
        assert ((to_truth[k][1:] - (1 + 1 / k)).abs() < 0.08).all()
        # x - E[x|y] is independent of the sampler's noise: the errors add
        assert ((to_truth[k] - (1 + to_mean[k])).abs() < 0.06).all()
    assert ((to_mean[4] / to_mean[1] - 0.25).abs() < 0.04).all()


@pytest.mark.parametrize("likelihood", ["dirac", "gaussian"])
def test_posterior_mean_batch_equals_items_one_by_one(gaussian_denoiser, likelihood):
    mixture = gaussian_samples(COV, 3, 256, seed=8).sum(1, keepdim=True)
    cfg = msdm.SamplerConfig(num_steps=6)
    seeds = [4, 5, 6]
    batch = msdm.separate(gaussian_denoiser, mixture, 4, cfg, samples=3, likelihood=likelihood,
                          generator=item_generators(seeds))
    single = msdm.separate(gaussian_denoiser, mixture, 4, cfg, likelihood=likelihood,
                           generator=item_generators(seeds))
    assert not torch.allclose(batch, single, atol=1e-3)  # an average, not the first draw
    for i, s in enumerate(seeds):
        one = msdm.separate(gaussian_denoiser, mixture[i : i + 1], 4, cfg, samples=3,
                            likelihood=likelihood, generator=item_generators([s]))
        assert torch.allclose(batch[i : i + 1], one, atol=1e-6)


def test_seeded_batch_equals_items_one_by_one(gaussian_denoiser):
    mixture = gaussian_samples(COV, 3, 256, seed=6).sum(1, keepdim=True)
    cfg = msdm.SamplerConfig(num_steps=6, resamples=2)
    seeds = [11, 22, 33]
    batch = msdm.separate(gaussian_denoiser, mixture, 4, cfg, generator=item_generators(seeds))
    for i, s in enumerate(seeds):
        one = msdm.separate(gaussian_denoiser, mixture[i : i + 1], 4, cfg,
                            generator=item_generators([s]))
        assert torch.allclose(batch[i : i + 1], one, atol=1e-6)


def test_isdm_factorized_equals_joint_independent_prior():
    var = torch.tensor([0.04, 0.02, 0.03, 0.05], dtype=torch.float64)
    fact = FactorizedDenoiser([GaussianDenoiser(v.reshape(1, 1)) for v in var])
    joint = GaussianDenoiser(torch.diag(var))
    x = torch.randn(3, 4, 100)
    sigma = torch.tensor([0.01, 0.3, 5.0])
    assert torch.allclose(fact(x, sigma), joint(x, sigma), atol=1e-6)
    cfg = msdm.SamplerConfig(num_steps=8)
    mix = x.sum(1, keepdim=True) * 0.1
    a = msdm.separate(fact, mix, 4, cfg, generator=torch.Generator().manual_seed(0))
    b = msdm.separate(joint, mix, 4, cfg, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, b, atol=1e-5)


def test_project_is_pure_and_exact():
    x = torch.randn(2, 4, 10)
    mix = torch.randn(2, 1, 10)
    before = x.clone()
    z = project(x, mix, 2)
    assert torch.equal(x, before)
    assert torch.allclose(z.sum(1, keepdim=True), mix, atol=1e-6)
    assert torch.equal(z[:, [0, 1, 3]], x[:, [0, 1, 3]])


@pytest.mark.parametrize("bad, match", [
    (dict(mixture=torch.randn(2, 2, 8)), "mono"),
    (dict(mixture=torch.randn(2, 8)), r"\[B, 1, T\]"),
    (dict(mixture=torch.full((1, 1, 8), float("nan"))), "NaN"),
    (dict(mixture=torch.zeros(1, 1, 8, dtype=torch.int64)), "floating"),
    (dict(likelihood="laplace"), "likelihood"),
    (dict(constrained=4), "constrained"),
    (dict(num_stems=0), "num_stems"),
    (dict(samples=0), "samples"),
    (dict(samples=2.0), "samples"),
    (dict(samples=True), "samples"),
])
def test_separate_rejects_bad_input(gaussian_denoiser, bad, match):
    kwargs = dict(mixture=torch.randn(1, 1, 8), num_stems=4, likelihood="dirac", constrained=0)
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        msdm.separate(gaussian_denoiser, kwargs.pop("mixture"), kwargs.pop("num_stems"),
                      msdm.SamplerConfig(num_steps=2), **kwargs)


def test_bad_solver_and_stem_count_are_value_errors(gaussian_denoiser):
    with pytest.raises(ValueError, match="solver"):
        msdm.generate(gaussian_denoiser, (1, 4, 8), msdm.SamplerConfig(solver="rk4"))
    with pytest.raises(ValueError, match=r"\[B, 4, T\]"):
        msdm.separate(gaussian_denoiser, torch.randn(1, 1, 8), 3, msdm.SamplerConfig(num_steps=2))
    with pytest.raises(ValueError, match="one flag per stem"):
        msdm.impute(gaussian_denoiser, torch.randn(1, 4, 8), [True], msdm.SamplerConfig())
    with pytest.raises(ValueError, match="method"):
        msdm.impute(gaussian_denoiser, torch.randn(1, 4, 8), [True] * 4, msdm.SamplerConfig(),
                    method="magic")


def test_mask_refinement_keeps_the_sum_and_removes_cancelling_noise():
    """separation.mask_power: stems in disjoint bands, estimated with noise that cancels in
    their sum (what Dirac separation leaves): the soft masks give back the true stems far
    better than the estimates, and the refined stems still sum to the mixture."""
    from msdm.stereo import mask_refine

    rate, t = 11025, 8192
    n = torch.arange(t) / rate
    bins = (8, 30, 90, 200)  # n_fft 512: bin k at k * rate / 512 Hz, far apart
    true = torch.stack([0.2 * torch.sin(2 * torch.pi * (k * rate / 512) * n) for k in bins])[None]
    mix = true.sum(1, keepdim=True)
    g = torch.Generator().manual_seed(0)
    noise = 0.05 * torch.randn(true.shape, generator=g)
    est = true + noise - noise.mean(1, keepdim=True)  # sums exactly to the mixture
    out = mask_refine(est, mix, 1.0, n_fft=512)

    def err_db(x):  # error energy re. the true stems, away from the STFT's edge frames
        core = slice(512, t - 512)
        return 10 * torch.log10(((x - true)[..., core] ** 2).sum() / (true[..., core] ** 2).sum())

    assert torch.allclose(out.sum(1, keepdim=True), mix, atol=1e-5)
    assert err_db(out) < err_db(est) - 8, (err_db(est), err_db(out))  # -10.2 -> -21.0 dB
    assert torch.equal(mask_refine(torch.zeros_like(est), torch.zeros_like(mix), 2.0),
                       torch.zeros_like(est))  # silence stays silence
    with pytest.raises(msdm.config.ConfigError, match="mask_power"):
        msdm.config.load_config("tiny", ["separation.mask_power=-1"])
