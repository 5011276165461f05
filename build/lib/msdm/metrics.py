"""Separation metrics: SI-SDR, SI-SDRi and the MSDM windowed protocol (paper Sec. 6.1).

SI-SNR with eps = 1e-8 inside both the projection and the ratio, over the last dim; the windowed
protocol follows the MSDM evaluation code: 4 s windows, 2 s hop, windows with at most one active
reference stem skipped (active: ||s||_2 / num_samples >= 1.5e-5).
"""

from __future__ import annotations

import math

import torch

EPS = 1e-8


def _check_pair(estimate: torch.Tensor, reference: torch.Tensor) -> None:
    if estimate.shape != reference.shape:
        raise ValueError(f"estimate {tuple(estimate.shape)} and reference "
                         f"{tuple(reference.shape)} must have the same shape")


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """SI-SDR = 10 log10((||a s||^2 + eps) / (||a s - s_hat||^2 + eps)) over the last dim,
    with a = (<s_hat, s> + eps) / (||s||^2 + eps)."""
    _check_pair(estimate, reference)
    est, ref = estimate.double(), reference.double()
    alpha = ((est * ref).sum(-1, keepdim=True) + eps) / (ref.pow(2).sum(-1, keepdim=True) + eps)
    target = alpha * ref
    num = target.pow(2).sum(-1) + eps
    den = (target - est).pow(2).sum(-1) + eps
    return 10 * torch.log10(num / den)


def si_sdri(estimate: torch.Tensor, reference: torch.Tensor, mixture: torch.Tensor,
            eps: float = EPS) -> torch.Tensor:
    """SI-SDR improvement over using the mixture as the estimate; mixture broadcasts over stems."""
    _check_pair(estimate, reference)
    return si_sdr(estimate, reference, eps) - si_sdr(mixture.expand_as(reference), reference, eps)


def sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Plain SDR 10 log10(||s||^2 / ||s - s_hat||^2) (no scale invariance)."""
    _check_pair(estimate, reference)
    est, ref = estimate.double(), reference.double()
    return 10 * torch.log10((ref.pow(2).sum(-1) + eps) / ((ref - est).pow(2).sum(-1) + eps))


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
    """Start offsets as the MSDM evaluation code: count = ceil((T - (window - hop)) / hop).

    The last window may be shorter; a track no longer than window - hop gets no window.
    """
    count = max(0, math.ceil((num_samples - (window - hop)) / hop))
    return [i * hop for i in range(count)]


def windowed_si_sdri(estimates: torch.Tensor, references: torch.Tensor, sample_rate: int,
                     window_s: float = 4.0, hop_s: float = 2.0,
                     silence: float = 1.5e-5) -> torch.Tensor:
    """Per-window SI-SDRi of each stem, [W, S], over kept windows only (inputs [S, T]).

    The mixture is the sum of the references. A window is kept when at least two reference
    stems are active; a silent stem in a kept window is still scored, as in the paper.
    """
    if estimates.ndim != 2 or references.ndim != 2:
        raise ValueError(f"estimates and references must be [S, T], got "
                         f"{tuple(estimates.shape)} and {tuple(references.shape)}")
    _check_pair(estimates, references)
    if not (torch.isfinite(estimates).all() and torch.isfinite(references).all()):
        raise ValueError("estimates or references contain NaN or infinite values")
    window, hop = round(window_s * sample_rate), round(hop_s * sample_rate)
    mixture = references.sum(0, keepdim=True)
    rows = []
    for start in window_starts(references.shape[-1], window, hop):
        ref = references[:, start : start + window]
        active = ref.double().norm(dim=-1) / ref.shape[-1] >= silence
        if int(active.sum()) <= 1:
            continue
        est, mix = estimates[:, start : start + window], mixture[:, start : start + window]
        rows.append(si_sdri(est, ref, mix))
    if not rows:
        return torch.zeros(0, references.shape[0], dtype=torch.float64)
    return torch.stack(rows)


def summarize(windows: torch.Tensor, stems) -> dict[str, float]:
    """Mean SI-SDRi over windows per stem, and "all" = mean of the stem means (paper Sec. 6.1)."""
    if windows.ndim != 2 or windows.shape[1] != len(stems):
        raise ValueError(f"windows must be [W, {len(stems)}], got {tuple(windows.shape)}")
    if windows.shape[0] == 0:
        return {**{s: float("nan") for s in stems}, "all": float("nan")}
    means = windows.double().mean(0)
    out = {s: float(m) for s, m in zip(stems, means)}
    out["all"] = float(means.mean())
    return out


def oracle_irm(references: torch.Tensor, n_fft: int = 1024, hop: int = 256) -> torch.Tensor:
    """Ideal ratio mask separation [S, T] -> [S, T]: mask_n = |S_n|^2 / sum_m |S_m|^2 applied to
    the mixture STFT. An upper reference for mask-based separators (it sees the true stems)."""
    if references.ndim != 2:
        raise ValueError(f"references must be [S, T], got {tuple(references.shape)}")
    window = torch.hann_window(n_fft, dtype=torch.float64)
    spec = torch.stft(references.double(), n_fft, hop, window=window, return_complex=True)
    power = spec.abs() ** 2
    mask = power / power.sum(0, keepdim=True).clamp_min(1e-20)
    est = torch.istft(mask * spec.sum(0, keepdim=True), n_fft, hop, window=window,
                      length=references.shape[-1])
    return est.to(references.dtype)
