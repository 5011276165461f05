"""1-D U-Net backbone F(x, c_noise) of MSDM (audio-diffusion-pytorch v0.0.43 `UNet1d`; App. C).

Patching, strided down/up levels, ResNet blocks with FiLM on the noise embedding, attention on the
deepest levels and in the bottleneck, skips scaled by 2**-0.5. Knows nothing about sigma: the EDM
preconditioning lives in `msdm.diffusion.Denoiser`. Shapes: x [B, C, T] -> [B, C, T], c_noise [B].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """U-Net hyper-parameters; defaults are the released MSDM network (`exp/train_msdm.yaml`).
    `kind: hdemucs` selects the mixture -> stems regressor of `msdm.regressor` instead."""

    kind: Literal["unet", "hdemucs"] = "unet"  # unet = MSDM score model; hdemucs = regressor
    channels: int = 256
    patch_factor: int = 16
    multipliers: tuple[int, ...] = (1, 2, 4, 4, 4, 4, 4)
    factors: tuple[int, ...] = (4, 4, 4, 2, 2, 2)
    num_blocks: tuple[int, ...] = (2, 2, 2, 2, 2, 2)
    attentions: tuple[bool, ...] = (False, False, False, True, True, True)
    attention_heads: int = 8
    attention_features: int = 128  # per head
    attention_multiplier: int = 2  # feed-forward width factor
    resnet_groups: int = 8
    kernel_multiplier_downsample: int = 2  # down-sampling conv kernel = 2 * factor + 1
    use_skip_scale: bool = True  # skips scaled by 2**-0.5
    use_attention_bottleneck: bool = True
    bottleneck_residual: bool = False  # v0.0.43 quirk: bottleneck attention replaces x
    attention_bias: bool = False  # bias on attention-out and feed-forward-out Linears (release: no)
    # GroupNorm groups of the patch blocks: "patch_factor" = min(patch_factor, stems), as released
    # (ADP 0.0.43 PatchBlock); "resnet_groups" = like every other block (msdm format_version 1)
    patch_groups: Literal["patch_factor", "resnet_groups"] = "patch_factor"
    # kind hdemucs: torchaudio Hybrid Demucs (Defossez 2021); defaults are torchaudio's
    hdemucs_channels: int = 48  # channels of the first layer
    hdemucs_growth: int = 2  # channel multiplier per layer
    hdemucs_depth: int = 6  # encoder/decoder layers (time and spectral branches)
    hdemucs_nfft: int = 4096  # STFT size of the spectral branch (hop nfft / 4)

    def __post_init__(self):
        if self.kind == "hdemucs":
            _check_hdemucs(self)
        n = len(self.factors)
        if not (len(self.multipliers) == n + 1
                and len(self.num_blocks) == n == len(self.attentions)):
            raise ValueError(
                "need len(multipliers) == len(factors) + 1 == len(num_blocks) + 1 "
                f"== len(attentions) + 1, got {len(self.multipliers)}, {len(self.factors)}, "
                f"{len(self.num_blocks)}, {len(self.attentions)}")
        if min(self.channels, self.patch_factor, *self.factors, *self.multipliers) < 1:
            raise ValueError("channels, patch_factor, factors and multipliers must be >= 1")
        if self.channels % self.patch_factor:
            raise ValueError(f"channels ({self.channels}) must be divisible by patch_factor "
                             f"({self.patch_factor})")


# HDemucs merges its spectral branch into the time branch once the frequency axis (nfft / 2
# bins, / 4 per layer) is small enough; only these nfft reach that, at these depths or deeper
# (checked with torchaudio 2.11 on 4000-, 4096- and 16384-sample inputs).
HDEMUCS_MIN_DEPTH = {256: 3, 1024: 4, 2048: 5, 4096: 5}


def _check_hdemucs(cfg: ModelConfig) -> None:
    if min(cfg.hdemucs_channels, cfg.hdemucs_growth) < 1:
        raise ValueError("hdemucs_channels and hdemucs_growth must be >= 1")
    least = HDEMUCS_MIN_DEPTH.get(cfg.hdemucs_nfft)
    if least is None or cfg.hdemucs_depth < least:
        raise ValueError(
            f"hdemucs_nfft {cfg.hdemucs_nfft} with hdemucs_depth {cfg.hdemucs_depth} does not fit "
            f"HDemucs: use one of " + ", ".join(f"nfft {n} with depth >= {d}" for n, d in
                                                HDEMUCS_MIN_DEPTH.items()))


def multiple(cfg: ModelConfig) -> int:
    """Lengths the network accepts are multiples of this: patch_factor x prod(factors) for the
    U-Net; any length for HDemucs (it pads internally)."""
    return 1 if cfg.kind == "hdemucs" else cfg.patch_factor * math.prod(cfg.factors)


def _groups(channels: int, wanted: int) -> int:
    return math.gcd(channels, wanted)


class NoiseEmbedding(nn.Module):
    """Learned Fourier features of c_noise -> mapping vector (ADP `to_time` + `to_mapping`)."""

    def __init__(self, channels: int, features: int):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(channels // 2))
        self.mlp = nn.Sequential(
            nn.Linear(channels + 1, features), nn.GELU(),
            nn.Linear(features, features), nn.GELU(),
            nn.Linear(features, features), nn.GELU(),
        )

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        c = c_noise[:, None].float()  # [B, 1]
        freqs = c * self.weights[None] * 2 * math.pi  # [B, channels/2]
        return self.mlp(torch.cat([c, freqs.sin(), freqs.cos()], dim=-1))  # [B, features]


class ResnetBlock(nn.Module):
    """GN -> SiLU -> Conv3 -> GN -> FiLM -> SiLU -> Conv3, plus a (1x1) residual."""

    def __init__(self, c_in: int, c_out: int, groups: int, features: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in, groups), c_in)
        self.conv1 = nn.Conv1d(c_in, c_out, 3, padding=1)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(features, 2 * c_out))
        self.norm2 = nn.GroupNorm(_groups(c_out, groups), c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(mapping)[:, :, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class Attention(nn.Module):
    """Multi-head self-attention over time: LN -> q, kv -> softmax -> Linear -> LN. No positions."""

    def __init__(self, channels: int, heads: int, head_features: int, bias: bool = False):
        super().__init__()
        mid = heads * head_features
        self.heads = heads
        self.norm = nn.LayerNorm(channels, bias=False)
        self.to_q = nn.Linear(channels, mid, bias=False)
        self.to_kv = nn.Linear(channels, 2 * mid, bias=False)
        self.to_out = nn.Sequential(nn.Linear(mid, channels, bias=bias),
                                    nn.LayerNorm(channels, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, N, C]
        h = self.norm(x)
        q, k, v = (self.to_q(h), *self.to_kv(h).chunk(2, dim=-1))
        b, n, _ = q.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d]
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class TransformerBlock(nn.Module):
    """x + Attn(x); x + FF(x), FF = LN -> Linear(C, mC) -> GELU -> LN -> Linear(mC, C)."""

    def __init__(self, channels: int, heads: int, head_features: int, multiplier: int,
                 bias: bool = False):
        super().__init__()
        mid = channels * multiplier
        self.attention = Attention(channels, heads, head_features, bias)
        self.ff = nn.Sequential(
            nn.LayerNorm(channels, bias=False),
            nn.Linear(channels, mid, bias=False),
            nn.GELU(),
            nn.LayerNorm(mid, bias=False),
            nn.Linear(mid, channels, bias=bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, C, N]
        h = x.transpose(1, 2)  # [B, N, C]
        h = h + self.attention(h)
        h = h + self.ff(h)
        return h.transpose(1, 2)


class DownLevel(nn.Module):
    def __init__(self, c_in, c_out, factor, num_blocks, attention, cfg: ModelConfig, features):
        super().__init__()
        k = cfg.kernel_multiplier_downsample * factor
        self.down = nn.Conv1d(c_in, c_out, k + 1, stride=factor, padding=k // 2)
        self.blocks = nn.ModuleList(
            ResnetBlock(c_out, c_out, cfg.resnet_groups, features) for _ in range(num_blocks)
        )
        self.attn = (
            TransformerBlock(c_out, cfg.attention_heads, cfg.attention_features,
                             cfg.attention_multiplier, cfg.attention_bias) if attention else None
        )

    def forward(self, x, mapping, skips: list):
        x = self.down(x)
        for block in self.blocks:
            x = block(x, mapping)
            skips.append(x)
        if self.attn is not None:
            x = self.attn(x)
            skips.append(x)
        return x


class UpLevel(nn.Module):
    def __init__(self, c_in, c_out, factor, num_blocks, attention, cfg: ModelConfig, features):
        super().__init__()
        n = num_blocks + (1 if attention else 0)  # one block per skip pushed on the way down
        self.blocks = nn.ModuleList(
            ResnetBlock(2 * c_in, c_in, cfg.resnet_groups, features) for _ in range(n)
        )
        self.attn = (
            TransformerBlock(c_in, cfg.attention_heads, cfg.attention_features,
                             cfg.attention_multiplier, cfg.attention_bias) if attention else None
        )
        self.up = nn.ConvTranspose1d(c_in, c_out, 2 * factor, stride=factor,
                                     padding=factor // 2 + factor % 2, output_padding=factor % 2)
        self.skip_scale = 2**-0.5 if cfg.use_skip_scale else 1.0

    def forward(self, x, mapping, skips: list):
        for block in self.blocks:
            x = block(torch.cat([x, skips.pop() * self.skip_scale], dim=1), mapping)
        if self.attn is not None:
            x = self.attn(x)
        return self.up(x)


class Bottleneck(nn.Module):
    def __init__(self, channels, cfg: ModelConfig, features):
        super().__init__()
        self.pre = ResnetBlock(channels, channels, cfg.resnet_groups, features)
        self.attn = (
            Attention(channels, cfg.attention_heads, cfg.attention_features, cfg.attention_bias)
            if cfg.use_attention_bottleneck else None
        )
        self.residual = cfg.bottleneck_residual
        self.post = ResnetBlock(channels, channels, cfg.resnet_groups, features)

    def forward(self, x, mapping):
        x = self.pre(x, mapping)
        if self.attn is not None:
            h = self.attn(x.transpose(1, 2)).transpose(1, 2)
            x = x + h if self.residual else h
        return self.post(x, mapping)


class UNet1d(nn.Module):
    """MSDM score network F(x, c_noise): x [B, S, T] -> [B, S, T]."""

    def __init__(self, in_channels: int, cfg: ModelConfig):
        super().__init__()
        n = len(cfg.factors)
        c, p = cfg.channels, cfg.patch_factor
        features = 4 * c
        self.in_channels = in_channels
        self.patch_factor = p
        self.multiple = multiple(cfg)
        self.embed = NoiseEmbedding(c, features)
        # the released patch blocks norm with min(patch_factor, stems) groups (ADP PatchBlock)
        patch_groups = cfg.resnet_groups
        if cfg.patch_groups == "patch_factor":
            patch_groups = min(p, in_channels)
        self.patch_in = ResnetBlock(in_channels, c // p, patch_groups, features)
        chans = [c * m for m in cfg.multipliers]
        self.downs = nn.ModuleList(
            DownLevel(chans[i], chans[i + 1], cfg.factors[i], cfg.num_blocks[i],
                      cfg.attentions[i], cfg, features) for i in range(n)
        )
        self.bottleneck = Bottleneck(chans[-1], cfg, features)
        self.ups = nn.ModuleList(
            UpLevel(chans[i + 1], chans[i], cfg.factors[i], cfg.num_blocks[i],
                    cfg.attentions[i], cfg, features) for i in reversed(range(n))
        )
        self.patch_out = ResnetBlock(c // p, in_channels, patch_groups, features)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape [B, {self.in_channels}, T], "
                             f"got {tuple(x.shape)}")
        b, _, t = x.shape
        if t % self.multiple:
            raise ValueError(
                f"length {t} is not a multiple of {self.multiple} (patch_factor x prod(factors)); "
                f"pad or crop to a multiple of {self.multiple}"
            )
        mapping = self.embed(c_noise.reshape(-1).expand(b))  # [B, 4C]
        h = self.patch_in(x, mapping)  # [B, C/p, T]
        h = h.reshape(b, -1, t // self.patch_factor, self.patch_factor)
        h = h.permute(0, 1, 3, 2).reshape(b, -1, t // self.patch_factor)  # [B, C, T/p]
        outer = h
        skips: list[torch.Tensor] = []
        for level in self.downs:
            h = level(h, mapping, skips)
        h = self.bottleneck(h, mapping)
        for level in self.ups:
            h = level(h, mapping, skips)
        h = h + outer
        h = h.reshape(b, -1, self.patch_factor, t // self.patch_factor)
        h = h.permute(0, 1, 3, 2).reshape(b, -1, t)  # [B, C/p, T]
        return self.patch_out(h, mapping)


def build_network(cfg: ModelConfig, in_channels: int) -> nn.Module:
    """The score network F(x, c_noise) for `cfg` with `in_channels` stems."""
    return UNet1d(in_channels, cfg)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
