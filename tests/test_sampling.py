import math

import pytest
import torch

from msdm.diffusion import GaussianDenoiser
from msdm.sampling import (
    SamplerConfig,
    get_sigmas_karras,
    nfe,
    sample,
    sample_euler,
    sample_heun,
    to_d,
)
from msdm.tasks import unconditional

SD2 = 0.04  # sigma_data^2 of the 1-stem analytic prior


def test_karras_schedule_endpoints_and_order():
    s = get_sigmas_karras(10, 1e-4, 1.0, 7.0)
    assert s.shape == (11,)
    assert s[0].item() == pytest.approx(1.0) and s[-2].item() == pytest.approx(1e-4, rel=1e-4)
    assert s[-1].item() == 0.0
    assert bool((s[:-1] > s[1:]).all())
    # closed form of an interior point
    i, n, rho = 4, 10, 7.0
    ref = (1.0 ** (1 / rho) + i / (n - 1) * (1e-4 ** (1 / rho) - 1.0)) ** rho
    assert s[i].item() == pytest.approx(ref, rel=1e-5)


def test_karras_schedule_rejects_bad_input():
    with pytest.raises(ValueError):
        get_sigmas_karras(0, 1e-4, 1.0)
    with pytest.raises(ValueError):
        get_sigmas_karras(10, 1.0, 1e-4)


def test_nfe_counts_match_sampler_calls():
    den = GaussianDenoiser(torch.eye(1, dtype=torch.float64) * SD2)
    for solver, steps, r in [("euler", 7, 1), ("euler", 5, 3), ("heun", 6, 2)]:
        calls = []

        def deriv(x, sigma, calls=calls):
            calls.append(1)
            return unconditional(den)(x, sigma)

        sample(deriv, torch.randn(2, 1, 16), get_sigmas_karras(steps, 1e-3, 1.0), solver=solver,
               resamples=r, s_churn=1.0)
        assert len(calls) == nfe(SamplerConfig(num_steps=steps, resamples=r, solver=solver))


def _final_variance(solver, steps, churn, sigma_max=20.0, seed=0):
    den = GaussianDenoiser(torch.eye(1, dtype=torch.float64) * SD2)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 1, 8192, generator=g) * sigma_max

    def randn_like(t):
        return torch.randn(t.shape, generator=g)

    out = sample(unconditional(den), x, get_sigmas_karras(steps, 1e-4, sigma_max), solver=solver,
                 s_churn=churn, randn_like=randn_like)
    return out.double().var().item()


def test_heun_ends_at_closed_form_variance():
    """x_T ~ N(0, s_max^2) through the exact ODE ends at var s_d^2 s_max^2 / (s_max^2 + s_d^2)."""
    target = SD2 * 20.0**2 / (20.0**2 + SD2)
    for churn in (0.0, 20.0):
        v = _final_variance("heun", 150, churn)
        print(f"heun churn={churn}: var {v:.5f} vs closed form {target:.5f}")
        assert v == pytest.approx(target, rel=0.02)


def test_euler_converges_to_closed_form_variance():
    target = SD2 * 20.0**2 / (20.0**2 + SD2)
    errs = [abs(_final_variance("euler", n, 0.0) / target - 1) for n in (25, 100, 400)]
    print("euler relative errors at 25/100/400 steps:", [f"{e:.3f}" for e in errs])
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.02


def test_to_d_and_wrappers():
    x, den = torch.ones(2, 1, 3), torch.zeros(2, 1, 3)
    d = to_d(x, torch.tensor([2.0, 4.0]), den)
    assert torch.allclose(d[:, 0, 0], torch.tensor([0.5, 0.25]))
    sig = get_sigmas_karras(3, 0.01, 1.0)
    zero = sample_euler(lambda x, s: torch.zeros_like(x), torch.ones(1, 1, 2), sig)
    assert torch.equal(zero, torch.ones(1, 1, 2))
    heun = sample_heun(lambda x, s: torch.zeros_like(x), torch.ones(1, 1, 2), sig)
    assert torch.equal(heun, zero)
    with pytest.raises(ValueError, match="solver"):
        sample(lambda x, s: x, torch.ones(1, 1, 2), sig, solver="rk4")


def test_sampler_never_writes_into_its_input():
    x = torch.randn(2, 2, 8)
    before = x.clone()
    sample(lambda x, s: x * 0.1, x, get_sigmas_karras(4, 0.01, 1.0), s_churn=5.0, resamples=2)
    assert torch.equal(x, before)


def test_churn_gamma_is_capped():
    # s_churn / n > sqrt(2) - 1 must be capped: sigma_hat <= sigma * sqrt(2)
    seen = []
    sample(lambda x, s: seen.append(float(s[0])) or torch.zeros_like(x), torch.zeros(1, 1, 2),
           torch.tensor([1.0, 0.0]), s_churn=100.0)
    assert seen[0] == pytest.approx(math.sqrt(2), rel=1e-6)
