"""Consistency distillation against closed forms (msdm.distill, the consistency sampler).

For stems with an exchangeable Gaussian prior, cov = a I + b 11^T, the teacher's Dirac
separation ODE (paper Alg. 1 with the exact denoiser) is linear and solves in closed form. With
v = z - y/S the projected state minus the mixture's share, s = sqrt(a / (a + sigma^2)), q = s^S:

    v_k(0) = q v_k(sigma),   v_n(0) = s (v_n + v_k / (S-1)) - q v_k / (S-1)   (n != k)

(d v_k/d sigma = S r v_k and d v_n/d sigma = r (v_n - v_k), r = sigma / (a + sigma^2)). That map
is the ideal student: the consistency function of the teacher's trajectories.
"""

from __future__ import annotations

import math

import pytest
import torch

from msdm.config import Config, ConfigError, apply_overrides
from msdm.diffusion import GaussianDenoiser
from msdm.distill import (
    check_teacher,
    consistency_loss,
    distill_step,
    likelihood,
    make_target,
    scales,
    student_config,
    teacher_step,
)
from msdm.sampling import SamplerConfig, consistency_sigmas, get_sigmas_karras, nfe, sample
from msdm.tasks import dirac_likelihood, item_generators, project, separate

S, K, A, B = 4, 1, 0.04, 0.01  # four stems, the paper's constrained stem index here 1


def exchangeable(s=S, a=A, b=B):
    return a * torch.eye(s, dtype=torch.float64) + b * torch.ones(s, s, dtype=torch.float64)


def ideal(z: torch.Tensor, sigma: float, a=A, k=K) -> torch.Tensor:
    """The closed-form end of the Dirac ODE from the projected state z at sigma."""
    s_n = z.shape[1]
    y = z.sum(dim=1, keepdim=True)
    v = z - y / s_n
    s = math.sqrt(a / (a + sigma**2))
    q = s**s_n
    vk = v[:, k : k + 1]
    out = s * (v + vk / (s_n - 1)) - q * vk / (s_n - 1)
    out[:, k : k + 1] = q * vk
    return out + y / s_n


class IdealStudent(torch.nn.Module):
    """A 'network' that is the ideal student: D(z, sigma) = the closed-form ODE end."""

    def forward(self, x, sigma):
        sigma = torch.as_tensor(sigma).reshape(-1)
        return torch.cat([ideal(x[i : i + 1], float(sigma[i if sigma.numel() > 1 else 0]))
                          for i in range(x.shape[0])])


def _cfg(**over) -> Config:
    cfg = Config()
    over = {"separation.constrained": K, "distill.num_scales": 18, "distill.data_weight": 0.0,
            **over}  # pure consistency distillation: the closed form is its ideal
    return apply_overrides(cfg, over)


def _state(batch=3, t=256, sigma=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    cov = exchangeable()
    x0 = (torch.linalg.cholesky(cov) @ torch.randn(batch, S, t, generator=g,
                                                   dtype=torch.float64))
    y = x0.sum(dim=1, keepdim=True)
    x = project(x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64), y, K)
    return x0, y, x


def test_closed_form_is_the_end_of_the_teachers_sampler():
    """The Heun sampler of the teacher (paper Alg. 1, exact Gaussian denoiser, no churn) run
    from sigma to 0 lands where the closed form says."""
    _, y, x = _state(sigma=0.7)
    derivative, finalize = dirac_likelihood(GaussianDenoiser(exchangeable()), y, K)
    sigmas = get_sigmas_karras(400, 1e-6, 0.7).double()
    end = finalize(sample(derivative, x, sigmas, solver="heun"))
    want = ideal(x, 0.7)
    assert torch.allclose(end.sum(1, keepdim=True), y, atol=1e-9)
    err = (end - want).abs().max() / want.abs().max()
    assert err < 1e-4, err
    # and the closed form is not trivially the input or the denoiser's estimate
    assert (want - x).abs().max() > 0.1 and (want - finalize(
        GaussianDenoiser(exchangeable())(x, torch.full((x.shape[0],), 0.7)))).abs().max() > 0.01


def test_ideal_student_satisfies_the_consistency_target():
    """f*(x_n, sigma_n) = f*(teacher step to sigma_{n+1}, sigma_{n+1}): the target of every
    scale pair is the ideal student's own answer, up to Heun's local error."""
    cfg = _cfg()
    teacher = GaussianDenoiser(exchangeable())
    levels = scales(cfg.distill).double()
    assert len(levels) == 18 and levels[0] == 1.0 and abs(levels[-1] - 1e-4) < 1e-9
    for n in (0, 5, 12, 16):
        _, y, x = _state(sigma=float(levels[n]), seed=n)
        task = likelihood(teacher, y, cfg)
        hi, lo = float(levels[n]), float(levels[n + 1])
        one, four = _gap_after(task, x, y, hi, lo, 1), _gap_after(task, x, y, hi, lo, 4)
        assert one < 0.05 and four < 2e-3, (n, one, four)
        assert four < one / 8 or one < 1e-6  # second order: the gap closes with the sub-step
        assert _gap_after(task, x, y, hi, lo, 1, "euler") > one  # Euler is the cruder step


def _gap_after(task, x, y, hi: float, lo: float, m: int, solver: str = "heun") -> float:
    """|f*(after m equal teacher sub-steps from hi to lo, lo) - f*(x, hi)|, relative."""
    derivative, finalize = task
    z = x
    grid = torch.linspace(hi, lo, m + 1, dtype=torch.float64)
    for a, b in zip(grid[:-1], grid[1:]):
        z = teacher_step(derivative, finalize, z, torch.full((3,), float(a)).double(),
                         torch.full((3,), float(b)).double(), solver)
    assert torch.allclose(z.sum(1, keepdim=True), y, atol=1e-9)
    want = ideal(x, hi)
    return float((ideal(z, lo) - want).abs().max() / want.abs().max())


def test_consistency_loss_is_minimal_at_the_ideal_student():
    """With fine scales (N = 72) the teacher's Heun step is near exact, and the ideal student's
    loss vanishes (1.6e-8) while a wrong student that meets the boundary condition keeps one."""
    cfg = _cfg(**{"distill.solver": "heun", "distill.num_scales": 72})
    teacher = GaussianDenoiser(exchangeable())
    x0, _, _ = _state(batch=16, t=512, seed=3)
    ideal_net = IdealStudent()

    def loss_of(student):
        g = torch.Generator().manual_seed(7)
        loss, _ = consistency_loss(student, student, teacher, x0, cfg, g)
        return float(loss.mean())

    class Misfit(torch.nn.Module):  # the closed form for a prior 50 % louder: a wrong student
        def forward(self, x, sigma):  # that still meets the boundary condition f(x, 0) = x
            sigma = torch.as_tensor(sigma).reshape(-1)
            return torch.cat([ideal(x[i : i + 1], float(sigma[i]), a=1.5 * A)
                              for i in range(x.shape[0])])

    best = loss_of(ideal_net)
    assert best < 1e-3 * loss_of(Misfit())
    assert best < 1e-3 * loss_of(teacher)  # the teacher's one-step denoiser is not the student


def test_distill_step_moves_a_student_towards_the_ideal():
    """A student one parameter away from the ideal, D = f* + w c_out(sigma) (v with the mean
    removed): it meets the boundary condition for every w, and distillation steps against the
    exact teacher drive w from 0.5 towards 0, the closed form."""
    cfg = _cfg(**{"train.lr": 0.02, "train.bf16": False, "distill.num_scales": 36})

    class OffIdeal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

        def forward(self, x, sigma):
            s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1)
            c_out = s * 0.2 / (s**2 + 0.04).sqrt()
            v = x - x.mean(dim=1, keepdim=True)
            return IdealStudent()(x.detach(), sigma) + self.w * c_out * v

    student = OffIdeal()
    teacher = GaussianDenoiser(exchangeable())
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    x0, _, _ = _state(batch=8, t=256, seed=5)
    g = torch.Generator().manual_seed(1)
    for step in range(120):
        loss, parts = distill_step(student, make_target(student, cfg), teacher, x0, opt, cfg, g,
                                   step=step)
        assert math.isfinite(float(loss))
    assert abs(float(student.w.detach())) < 0.1, float(student.w.detach())
    assert set(parts) == {"consistency", "data"}


def test_consistency_sampler_schedule_nfe_and_sum():
    cfg = SamplerConfig(num_steps=2, solver="consistency", sigma_max=1.0, sigma_min=1e-4,
                        resamples=1)
    assert nfe(cfg) == 2
    levels = consistency_sigmas(2, 1e-4, 1.0)
    assert levels[0] == 1.0 and levels[-1] == 0 and len(levels) == 3 and 1e-4 < levels[1] < 1
    assert consistency_sigmas(1, 1e-4, 0.3).tolist() == pytest.approx([0.3, 0.0])
    x0, y, _ = _state(batch=2, t=128)
    calls = []
    teacher = GaussianDenoiser(exchangeable())

    def counting(x, sigma):
        calls.append(float(sigma[0]))
        return teacher(x, sigma)

    out = separate(counting, y.float(), S, cfg, constrained=K,
                   generator=item_generators([0, 1]))
    assert calls == pytest.approx(levels[:-1].tolist())
    assert torch.allclose(out.sum(1, keepdim=True), y.float(), atol=1e-5)


def test_one_step_with_the_ideal_student_is_the_teachers_ode_end():
    """The consistency sampler's single jump from sigma_max equals the teacher's ODE run from the
    same start: what distillation buys (1 NFE instead of hundreds)."""
    _, y, _ = _state(batch=2, t=128, seed=9)
    cfg1 = SamplerConfig(num_steps=1, solver="consistency", sigma_max=0.5, resamples=1)
    one = separate(IdealStudent(), y, S, cfg1, constrained=K, generator=item_generators([4, 5]))
    ode = SamplerConfig(num_steps=300, solver="heun", sigma_max=0.5, sigma_min=1e-6, s_churn=0,
                        resamples=1)
    many = separate(GaussianDenoiser(exchangeable()), y, S, ode, constrained=K,
                    generator=item_generators([4, 5]))
    assert (one - many).abs().max() < 1e-3 * many.abs().max()  # float32 sigma levels


def test_teachers_that_cannot_be_distilled_are_refused():
    check_teacher(Config())
    with pytest.raises(ConfigError, match="regressor"):
        check_teacher(apply_overrides(Config(), {"model.kind": "hdemucs"}))
    with pytest.raises(ConfigError, match="distilled student"):
        check_teacher(student_config(Config(), "runs/t/model.ckpt"))
    with pytest.raises(ConfigError, match="likelihood"):
        check_teacher(apply_overrides(Config(), {"separation.likelihood": "gaussian"}))
    with pytest.raises(ConfigError, match="single-stem"):
        check_teacher(apply_overrides(Config(), {"train.stem": "bass"}))
    student = student_config(_cfg(**{"distill.steps": 3, "distill.sigma_max": 0.8}), "t.ckpt")
    assert student.sampler.solver == "consistency" and student.sampler.num_steps == 3
    assert student.sampler.sigma_max == 0.8 and student.distill.teacher == "t.ckpt"
    assert Config.from_dict(student.to_dict()) == student  # round-trips through checkpoints


def test_validation_scores_the_students_own_sampler_in_si_sdri():
    """Under the exchangeable prior the posterior mean of every stem is the mixture's equal
    share: a student answering it scores the mixture's SI-SDR exactly, an improvement of 0 dB.
    The ideal student draws posterior samples instead, whose error is larger: it scores below
    0 dB, and the same whatever the batch size (per-chunk seeds)."""
    from msdm.distill import validation_error

    class Share(torch.nn.Module):
        def forward(self, x, sigma):
            return x.mean(dim=1, keepdim=True).expand_as(x)

    cfg = student_config(_cfg(**{"train.bf16": False, "distill.steps": 2}), "t.ckpt")
    x0, _, _ = _state(batch=6, t=2048, seed=11)
    x0 = x0.float()
    share = validation_error(Share(), x0, cfg, batch_size=4)
    assert share["val_loss"] == pytest.approx(0.0, abs=1e-6)
    cfg = apply_overrides(cfg, {"sampler.num_steps": 1})
    sample = validation_error(IdealStudent(), x0, cfg, batch_size=4)
    assert -20 < sample["val_si_sdri"] < -1 and sample["val_loss"] == -sample["val_si_sdri"]
    again = validation_error(IdealStudent(), x0, cfg, batch_size=3)
    assert again["val_loss"] == pytest.approx(sample["val_loss"], abs=1e-9)
