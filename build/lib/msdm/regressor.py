"""A mixture -> stems regressor: torchaudio's Hybrid Demucs (Defossez 2021), trained with a
waveform L1 loss. The baseline row next to MSDM, and the initial estimate that the Dirac sampler
refines (SDEdit-style, `msdm.tasks.separate(init=...)`). Shapes: mixture [B, 1, T] -> [B, S, T].
"""

from __future__ import annotations

import torch
from torch import nn

from .model import ModelConfig


class Regressor(nn.Module):
    """HDemucs with one audio channel: mixture [B, 1, T] -> stems [B, S, T] in one pass (NFE 1).

    Runs in float32 even under autocast: the STFT/iSTFT branch has no bf16 kernels.
    """

    def __init__(self, cfg: ModelConfig, num_stems: int):
        super().__init__()
        from torchaudio.models import HDemucs  # only needed for this model kind

        self.num_stems = num_stems
        self.net = HDemucs([f"stem{i}" for i in range(num_stems)], audio_channels=1,
                           channels=cfg.hdemucs_channels, growth=cfg.hdemucs_growth,
                           nfft=cfg.hdemucs_nfft, depth=cfg.hdemucs_depth)

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        if mixture.ndim != 3 or mixture.shape[1] != 1:
            raise ValueError(f"expected a mono mixture [B, 1, T], got {tuple(mixture.shape)}")
        with torch.autocast(mixture.device.type, enabled=False):
            out = self.net(mixture.float())  # [B, S, 1, T]
        return out[:, :, 0]  # [B, S, T]


def regression_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Waveform L1 between the estimate from the mixture sum(x) and the stems x [B, S, T];
    one value per item [B]."""
    est = model(x.sum(dim=1, keepdim=True))  # [B, S, T]
    return (est - x).abs().mean(dim=(1, 2))


def project_residual(est: torch.Tensor, mixture: torch.Tensor) -> torch.Tensor:
    """Spread the residual mixture - sum(est) equally over the S stems: the orthogonal (least
    change) projection onto {stems summing to the mixture}. The true stems lie in that set, so
    the projection never increases the total L2 error. est [B, S, T], mixture [B, 1, T]."""
    return est + (mixture - est.sum(dim=1, keepdim=True)) / est.shape[1]
