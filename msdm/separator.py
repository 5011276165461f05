"""Separate audio files and waveforms with a checkpoint: the segment path of `pipelines.separate`
in one process, no Ray (the demucs `api.Separator` shape).

    sep = msdm.Separator.from_checkpoint("runs/r1/model.ckpt")
    stems = sep.separate_file("song.flac")          # {stem: (array [C, T], sample_rate)}
    stems = sep.separate(waveform, 44100)           # {stem: array shaped like the waveform}

A track is read in blocks and cut into model-rate segments with context margins (RatePlan);
every channel is separated with the segment's seed (shared noise), the stems are split over the
full band at the output rate with soft masks (`stereo.split_segment`), and the segments
cross-fade back (weights that sum to one). Seeds come from (seed, track key, segment), so the
stems equal the Ray job's for the same file, whatever the batch size. Memory holds a batch of
segments and the output, never the decoded input.
"""

from __future__ import annotations

import io
import math
import os
import zlib

import numpy as np
import torch

from .audio import BlockReader, RatePlan, open_audio
from .checkpoint import load_checkpoint
from .config import Config
from .regressor import project_residual
from .sampling import nfe
from .stereo import mask_refine, split_segment
from .tasks import item_generators, separate
from .training import autocast

STEREO = ("channels", "transfer", "mask")


def stable_seed(*parts) -> int:
    """A seed from names and indices, identical in every process (unlike hash())."""
    return zlib.crc32(":".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def pick_device(num_gpus: float) -> str:
    """"cuda" when GPUs were requested; a requested GPU that is not usable is an error."""
    if not num_gpus:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"{num_gpus} GPU(s) requested but CUDA is not usable here "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                           "check the NVIDIA driver (>= 580 for CUDA 13 wheels) or request 0 GPUs")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 parts
    return "cuda"


def separation_nfe(cfg: Config) -> int:
    """Model evaluations per segment: 1 for a regressor, the sampler's NFE times
    `separation.samples` (+ 1 with an init regressor)."""
    if cfg.model.kind == "hdemucs":
        return 1
    return nfe(cfg.sampler) * cfg.separation.samples + (1 if cfg.separation.init else 0)


def open_uri(uri):
    """A readable binary file for a local path or a URI (s3://... through fsspec)."""
    if hasattr(uri, "read"):
        return uri
    uri = str(uri)
    if "://" in uri and not uri.startswith("file://"):
        try:
            import fsspec
        except ImportError as e:
            raise ImportError(f"{uri}: remote URIs need fsspec (pip install 'msdm[ray]')") from e
        with fsspec.open(uri, "rb") as f:
            return io.BytesIO(f.read())
    return open(uri.removeprefix("file://"), "rb")  # noqa: SIM115 - the caller reads it


class Separator:
    """A separating model: (config, denoiser, device), optionally the regressor whose estimate
    starts the sampler (`separation.init`). Call it on mono model-rate mixtures [B, T] with one
    key per item; `separate` / `separate_file` handle whole tracks of any rate and channels."""

    def __init__(self, cfg: Config, denoiser, device: str = "cpu", seed: int = 0, init=None):
        self.cfg, self.denoiser, self.device, self.seed, self.init = cfg, denoiser, device, \
            seed, init

    @classmethod
    def from_checkpoint(cls, uri, device: str | None = None, config: Config | None = None,
                        seed: int = 0) -> Separator:
        """Load a checkpoint (msdm model.ckpt or a released MSDM .ckpt; path, s3:// URI or file
        object). device None: CUDA when available, else CPU. `config`: the resolved config to
        separate with (default: the checkpoint's own sampler and separation settings)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        with open_uri(uri) as f:
            base, denoiser = load_checkpoint(f, map_location=device, name=str(uri))
        cfg = config or base
        init = None
        if cfg.separation.init and cfg.model.kind != "hdemucs":
            with open_uri(cfg.separation.init) as f:
                init = load_checkpoint(f, map_location=device, name=cfg.separation.init)[1]
            init = init.to(device)
        return cls(cfg, denoiser.to(device), device, seed, init)

    @property
    def stems(self) -> tuple[str, ...]:
        return tuple(self.cfg.data.stems)

    @property
    def sample_rate(self) -> int:
        return self.cfg.data.sample_rate

    def regress(self, model, mixture: torch.Tensor) -> torch.Tensor:
        """A regressor's estimate [B, S, T] of mixture [B, 1, T], with the residual spread
        equally over the stems (`project_residual`), so the stems sum to the mixture."""
        return project_residual(model(mixture), mixture)

    def __call__(self, mixture, keys) -> np.ndarray:
        """mixture [B, T] (numpy or torch) at the model's rate, keys: one tuple per item ->
        stems [B, S, T]; each item's noise comes from stable_seed(seed, *key)."""
        mix = torch.from_numpy(np.array(mixture, np.float32))  # a writable copy
        if mix.ndim != 2 or mix.shape[0] != len(keys):
            raise ValueError(f"need mixtures [B, T] with one key per item, got "
                             f"{tuple(mix.shape)} and {len(keys)} keys")
        seeds = [stable_seed(self.seed, *k) for k in keys]
        cfg, mixture = self.cfg, mix[:, None].to(self.device)  # [B, 1, T]
        with torch.no_grad(), autocast(torch.device(self.device), cfg.train.bf16):
            if cfg.model.kind == "hdemucs":  # one forward pass (NFE 1)
                return self.regress(self.denoiser, mixture).float().cpu().numpy()
            init = self.regress(self.init, mixture) if self.init is not None else None
            est = separate(self.denoiser, mixture, len(cfg.data.stems),
                           cfg.sampler, likelihood=cfg.separation.likelihood,
                           constrained=cfg.separation.constrained, gamma=cfg.separation.gamma,
                           generator=item_generators(seeds, self.device), init=init,
                           samples=cfg.separation.samples,
                           init_noise=cfg.separation.init_noise)
            if cfg.separation.mask_power > 0:  # default: ~93 ms frames at the model's rate
                n_fft = cfg.separation.mask_nfft or 1 << round(
                    math.log2(4096 * cfg.data.sample_rate / 44100))
                est = mask_refine(est, mixture, cfg.separation.mask_power, n_fft)
        return est.float().cpu().numpy()

    def separate_channels(self, mixes: list[np.ndarray], keys: list[tuple]) -> list[np.ndarray]:
        """Segments of one or more channels (each [T] or [C, T]) -> stems [S, T] or [S, C, T].
        Every channel of a segment gets the segment's key (shared noise); a channel equal to an
        earlier one of its segment is separated once."""
        items, same = [], {}
        for i, mix in enumerate(mixes):
            m = np.atleast_2d(mix)
            for c in range(len(m)):
                twin = next((d for d in range(c) if np.array_equal(m[d], m[c])), None)
                if twin is None:
                    items.append((i, c))
                else:
                    same[(i, c)] = (i, twin)
        est = self(np.stack([np.atleast_2d(mixes[i])[c] for i, c in items]),
                   [keys[i] for i, _ in items])  # [B', S, T]
        stems = [np.zeros((len(self.stems),) + np.shape(m), np.float32) for m in mixes]
        for (i, c), e in zip(items, est):
            if np.ndim(mixes[i]) == 1:
                stems[i] = e
            else:
                stems[i][:, c] = e
        for (i, c), (_, d) in same.items():
            stems[i][:, c] = stems[i][:, d]
        return stems

    def separate(self, waveform, sample_rate: int, *, key: str = "track",
                 stereo: str = "channels", mask_power: float = 1.0, batch_size: int = 8,
                 output_rate: int | None = None) -> dict[str, np.ndarray]:
        """A whole track, waveform [T] or [C, T] at any rate -> {stem: array} shaped like the
        waveform (at `output_rate`, default the input's). The stems sum to the waveform."""
        x = np.asarray(waveform, np.float32)
        if x.ndim not in (1, 2) or x.shape[-1] == 0:
            raise ValueError(f"need a waveform [T] or [C, T], got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("the waveform contains NaN or infinite samples")
        out = self._track(_ArrayReader(np.atleast_2d(x)), x.shape[-1], sample_rate, key,
                          stereo, mask_power, batch_size, output_rate)
        return {s: (y[0] if x.ndim == 1 else y) for s, y in zip(self.stems, out)}

    def separate_file(self, path, *, key: str | None = None, **kwargs
                      ) -> dict[str, tuple[np.ndarray, int]]:
        """A file any soundfile format decodes -> {stem: (array [C, T], sample_rate)}, read in
        blocks. `key` (the seed's track name) defaults to the file name without extension, as
        the Ray job names a single input."""
        name = str(path)
        key = key or os.path.splitext(os.path.basename(name))[0]
        with open_audio(path, name) as f:
            rate = kwargs.pop("output_rate", None) or f.samplerate
            out = self._track(BlockReader(f, name), f.frames, f.samplerate, key,
                              output_rate=rate, **kwargs)
        return {s: (y, rate) for s, y in zip(self.stems, out)}

    def _track(self, reader, frames: int, rate: int, key: str, stereo: str = "channels",
               mask_power: float = 1.0, batch_size: int = 8, output_rate: int | None = None
               ) -> np.ndarray:
        """Stems [S, C, T_out] of one track: segments in batches, split, cross-faded."""
        if stereo not in STEREO:
            raise ValueError(f"stereo must be one of {STEREO}, got {stereo!r}")
        cfg, out_rate = self.cfg, output_rate or rate
        plan = RatePlan.build(frames, rate, out_rate, cfg.data.sample_rate,
                              cfg.data.chunk_samples, cfg.separation.margin,
                              cfg.separation.overlap)
        seg = plan.out
        out = np.zeros((len(self.stems), reader.channels, seg.num_samples), np.float32)
        for lo in range(0, plan.num_segments, batch_size):
            js = range(lo, min(lo + batch_size, plan.num_segments))
            windows, mixes = zip(*(plan.split(reader.window(*plan.in_span(j)),
                                              stereo == "channels") for j in js))
            stems = self.separate_channels(list(mixes), [(key, j) for j in js])
            for j, st, window in zip(js, stems, windows):
                part = split_segment(st, window, out_rate, cfg.data.sample_rate,
                                     mask_power, stereo)  # [S, C, seg_out]
                start, w = seg.start(j), seg.weights(j)
                a, b = max(start, 0), min(start + seg.segment, seg.num_samples)
                if b > a:
                    out[..., a:b] += part[..., a - start : b - start] * w[a - start : b - start]
        return out


class _ArrayReader:
    """BlockReader's window() over an array in memory [C, T] (zeros outside)."""

    def __init__(self, x: np.ndarray):
        self.x, self.channels = x, x.shape[0]

    def window(self, lo: int, hi: int) -> np.ndarray:
        out = np.zeros((self.channels, hi - lo), np.float32)
        a, b = max(lo, 0), min(hi, self.x.shape[-1])
        if b > a:
            out[:, a - lo : b - lo] = self.x[:, a:b]
        return out
