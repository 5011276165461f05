"""Multichannel, full-band stems from a mono model-rate separation: soft time-frequency masks.

The model separates the mid signal at its own rate. Each input channel c is then split by
Wiener-style masks M_n = |S_n|^p / sum_m |S_m|^p built from the separated stems S_n (STFT at the
output rate): Y_{n,c} = iSTFT(M_n * X_c). The masks sum to one in every bin, so the stems sum
to each channel exactly; zeros stay zeros and identical channels give identical stems. Bins above
the model's band reuse the mask of its top band (stems extend the model's band edge).
"""

from __future__ import annotations

import numpy as np
import torch

from .audio import as_tensor, resample

CANCEL = 1e-3  # channels: stems that cancel to below this fraction of their sum follow the masks
TOP_BAND = (0.7, 0.9)  # fractions of the model's Nyquist frequency that define its top band


def stft_size(length: int, n_fft: int = 2048) -> int:
    """The FFT size for a window: n_fft, or a smaller power of two for short windows."""
    while n_fft > 16 and n_fft > length // 2:
        n_fft //= 2
    return n_fft


def soft_masks(stems: torch.Tensor, power: float, cutoff_bin: int | None = None,
               top_band: tuple[int, int] | None = None) -> torch.Tensor:
    """Masks [S, F, N] from stem spectra [S, F, N]: |S_n|^p normalised over stems (uniform
    where every stem is zero); bins >= cutoff_bin take the mask of bins top_band[0]:[1]."""
    a = stems.abs() ** power  # [S, F, N]
    if cutoff_bin is not None and cutoff_bin < a.shape[1]:
        lo, hi = top_band
        a[:, cutoff_bin:] = a[:, lo:hi].mean(dim=1, keepdim=True)
    total = a.sum(0, keepdim=True)
    masks = torch.where(total > 0, a / total.clamp_min(1e-30),
                        torch.full_like(a, 1.0 / a.shape[0]))
    return masks


def mask_split(window: np.ndarray, stems: np.ndarray, rate: int, model_rate: int,
               power: float = 1.0, n_fft: int = 2048, method: str = "transfer") -> np.ndarray:
    """Split each channel of window [C, T] (at `rate`) into stems [S, C, T] from the model's
    stems [S, T] (already at `rate`, band-limited to model_rate / 2).

    method "mask": Y_nc = M_n X_c. method "transfer": Y_nc = r_c S_n + M_n (X_c - r_c D) with
    D = sum_n S_n (the model's mid) and r_c = X_c D* / (|D|^2 + eps) the per-bin gain from the
    mid to channel c: a source panned alone in a bin keeps the model's estimate (times its
    gain), what the mid does not explain is split by the masks. Both sum to X_c exactly."""
    assert window.ndim == 2 and stems.ndim in (2, 3) and stems.shape[-1] == window.shape[-1], \
        (window.shape, stems.shape)
    length = window.shape[-1]
    n_fft = stft_size(length, n_fft)
    hop, win = n_fft // 4, torch.hann_window(n_fft)

    def stft(x):
        return torch.stft(as_tensor(x, np.float32), n_fft, hop, window=win, center=True,
                          return_complex=True)

    spec_x, spec_s = stft(window), stft(stems.reshape(-1, length))  # [C, F, N], [S(C), F, N]
    bins = spec_x.shape[1]
    nyq = model_rate / 2
    cutoff = top = None
    if nyq < rate / 2:  # the output band reaches above the model's
        hz = rate / n_fft
        cutoff = min(bins, int(TOP_BAND[1] * nyq / hz))
        top = (int(TOP_BAND[0] * nyq / hz), max(cutoff, int(TOP_BAND[0] * nyq / hz) + 1))
    if stems.ndim == 3:  # one separation per channel: [S, C, T]
        spec_s = spec_s.reshape(*stems.shape[:2], *spec_s.shape[-2:])  # [S, C, F, N]
        spec = torch.stack([_blend(spec_s[:, c], spec_x[c], power, cutoff, top)
                            for c in range(window.shape[0])], 1)
        out = torch.istft(spec.reshape(-1, *spec.shape[-2:]), n_fft, hop, window=win,
                          center=True, length=length)
        return out.reshape(stems.shape[0], window.shape[0], length).numpy()
    masks = soft_masks(spec_s, power, cutoff, top)  # [S, F, N]
    if method == "mask":
        spec = masks[:, None] * spec_x[None]  # [S, C, F, N]
    elif method == "transfer":
        mid = spec_s.sum(0)  # [F, N]
        power_mid = mid.abs() ** 2
        eps = 1e-4 * power_mid.mean(0, keepdim=True) + 1e-20  # per frame: quiet bins -> masks
        gain = spec_x * mid.conj() / (power_mid + eps)  # [C, F, N]
        rest = spec_x - gain * mid  # [C, F, N]
        spec = gain[None] * spec_s[:, None] + masks[:, None] * rest[None]
    else:
        raise ValueError(f"unknown channel split method {method!r}")
    out = torch.istft(spec.reshape(-1, *spec.shape[-2:]), n_fft, hop, window=win, center=True,
                      length=length)
    return out.reshape(stems.shape[0], window.shape[0], length).numpy()


def split_segment(stems: np.ndarray, window: np.ndarray, rate: int, model_rate: int,
                  power: float = 1.0, method: str = "channels", mono: bool = False) -> np.ndarray:
    """One segment's model-rate stems ([S, T], or [S, C, T] separated per channel) -> stems
    [S, C, T_out] at `rate` for the output-rate window [C, T_out] of the same span: upsampled,
    then split over every channel and the full band by `mask_split` (mono: upsampled only)."""
    up = resample(stems, model_rate, rate)[..., : window.shape[-1]]
    up = np.pad(up, [(0, 0)] * (up.ndim - 1) + [(0, window.shape[-1] - up.shape[-1])])
    if mono:
        return up[:, None]
    return mask_split(window, up, rate, model_rate, power, method=method)


def _blend(est: torch.Tensor, x: torch.Tensor, power: float, cutoff, top) -> torch.Tensor:
    """One channel: its own separated stems est [S, F, N], plus soft masks for what they miss:
    Y_n = w S_n + M_n (X - w sum S), w = min(1, |X| / (CANCEL sum |S_n|)) per bin, so only bins
    where the stems cancel (silence: X = 0) follow the masks, and stay zero where X is zero.
    Above the model's band S = 0 and the masks take over."""
    w = (x.abs() / (CANCEL * est.abs().sum(0) + 1e-20)).clamp(max=1.0)  # [F, N]
    masks = soft_masks(est, power, cutoff, top)
    return w * est + masks * (x - w * est.sum(0))


def mask_refine(stems: torch.Tensor, mixture: torch.Tensor, power: float,
                n_fft: int = 512) -> torch.Tensor:
    """Soft-mask refinement of separated stems [B, S, T] of mixtures [B, 1, T]: each stem
    becomes iSTFT(M_n X) with M_n = |S_n|^p / sum_m |S_m|^p (`soft_masks`). A stem keeps the
    mixture's content only where it is loud; the noise that Dirac-separated stems carry and
    cancel in their sum is removed where another stem dominates. The masks sum to one, so the
    stems still sum to the mixture (to STFT round-trip rounding)."""
    b, s, t = stems.shape
    n_fft = stft_size(t, n_fft)
    hop, win = n_fft // 4, torch.hann_window(n_fft, device=stems.device)

    def stft(x):
        return torch.stft(x.float(), n_fft, hop, window=win, center=True, return_complex=True)

    spec_x = stft(mixture[:, 0])  # [B, F, N]
    spec_s = stft(stems.reshape(b * s, t)).reshape(b, s, *spec_x.shape[-2:])
    masks = torch.stack([soft_masks(spec_s[i], power) for i in range(b)])  # [B, S, F, N]
    out = torch.istft((masks * spec_x[:, None]).reshape(b * s, *spec_x.shape[-2:]), n_fft, hop,
                      window=win, center=True, length=t)
    return out.reshape(b, s, t)
