"""Audio I/O (soundfile), mono downmix, resampling (torchaudio), segmenting and overlap-add.

Arrays are float32 numpy, channels first: [C, T]. Long signals are cut into fixed-length segments
with context margins; each segment's core (margins dropped) is cross-faded with its neighbours by
linear ramps whose weights sum to exactly one, so an identity model reconstructs its input and
Dirac-separated stems still sum to the mixture (the demucs overlap-add, plus Apollo-style margins).
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.transforms as AT

AUDIO_FORMATS = ("wav", "flac", "ogg", "mp3", "aiff", "aif", "au", "w64")  # soundfile decodes
AUDIO_EXTENSIONS = tuple(f".{f}" for f in AUDIO_FORMATS)


class AudioError(ValueError):
    """Unreadable, empty or otherwise unusable audio."""


def read_audio(source, name: str | None = None) -> tuple[np.ndarray, int]:
    """Decode any soundfile format (wav, flac, ogg, mp3, ...) to float32 [C, T] and its rate."""
    name = name or (str(source) if isinstance(source, (str, Path)) else "audio stream")
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        data, sr = sf.read(source, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/TypeError
        msg = re.sub(r"Error opening <[^>]*>: ", "", str(e))
        raise AudioError(f"{name}: cannot decode audio ({msg})") from e
    if data.shape[0] == 0:
        raise AudioError(f"{name}: zero-length audio")
    if not np.isfinite(data).all():
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    return np.ascontiguousarray(data.T), int(sr)


def to_mono(x: np.ndarray) -> np.ndarray:
    """[C, T] -> [T] by averaging channels (no gain change for mono files)."""
    if x.ndim == 1:
        return x
    return x.mean(axis=0, dtype=np.float32) if x.shape[0] > 1 else x[0]


def as_tensor(x: np.ndarray, dtype=None) -> torch.Tensor:
    """A tensor of a NumPy array, sharing its memory where it can. Arrays from Ray's object
    store are read-only: those are copied (torch would warn and share them anyway)."""
    x = np.ascontiguousarray(x, dtype)
    return torch.from_numpy(x if x.flags.writeable else x.copy())


def resample(x, orig_sr: int, new_sr: int):
    """Band-limited sinc resampling (torchaudio, Kaiser window) along the last axis."""
    if orig_sr == new_sr:
        return x
    is_np = isinstance(x, np.ndarray)
    t = as_tensor(x) if is_np else x
    rows = t.float().reshape(-1, t.shape[-1])
    # one row at a time: measured faster than one batched conv on CPU, and less peak memory
    kernel = _kernel(int(orig_sr), int(new_sr))
    with torch.no_grad():
        out = torch.stack([kernel(r) for r in rows])
    out = out.reshape(*t.shape[:-1], out.shape[-1])
    return out.numpy() if is_np else out


@functools.lru_cache(maxsize=16)
def _kernel(orig_sr: int, new_sr: int) -> AT.Resample:
    """The sinc kernel for a rate pair, computed once (segments resample many short windows)."""
    return AT.Resample(orig_sr, new_sr, lowpass_filter_width=16, rolloff=0.95,
                       resampling_method="sinc_interp_kaiser", beta=14.77)


def write_audio(target, x: np.ndarray, sample_rate: int, fmt: str = "wav",
                subtype: str | None = None) -> None:
    """Write [C, T] or [T] audio; paths are written to a temp name, then renamed."""
    data = np.asarray(x, dtype=np.float32)
    data = data[None] if data.ndim == 1 else data
    subtype = subtype or ("PCM_24" if fmt == "flac" else "FLOAT")
    if fmt == "flac" and subtype == "FLOAT":
        raise AudioError("FLAC cannot store float samples; use PCM_16 or PCM_24")
    if isinstance(target, (str, Path)):
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        sf.write(tmp, data.T, sample_rate, format=fmt.upper(), subtype=subtype)
        tmp.replace(path)
    else:
        sf.write(target, data.T, sample_rate, format=fmt.upper(), subtype=subtype)


@dataclass(frozen=True)
class SegmentPlan:
    """Segments of `segment` samples whose cores (margins dropped) overlap by `overlap`."""

    num_samples: int
    segment: int
    margin: int
    overlap: int

    def __post_init__(self):
        core = self.segment - 2 * self.margin
        if self.num_samples < 1:
            raise ValueError("cannot segment an empty signal")
        if core <= self.overlap or self.margin < 0 or self.overlap < 0:
            raise ValueError(f"segment {self.segment} too short for margin {self.margin} and "
                             f"overlap {self.overlap}: need segment > 2 * margin + overlap")

    @property
    def core(self) -> int:
        return self.segment - 2 * self.margin

    @property
    def hop(self) -> int:
        return self.core - self.overlap

    @property
    def num_segments(self) -> int:
        return max(1, math.ceil((self.num_samples - self.core) / self.hop) + 1)

    def start(self, j: int) -> int:
        """Start of segment j in signal samples (negative: zero padding on the left)."""
        return j * self.hop - self.margin

    def weights(self, j: int) -> np.ndarray:
        """[segment] cross-fade weights of segment j; over all segments they sum to 1."""
        w = np.zeros(self.segment, dtype=np.float32)
        core = np.ones(self.core, dtype=np.float32)
        if self.overlap:
            ramp = (np.arange(self.overlap, dtype=np.float32) + 0.5) / self.overlap
            if j > 0:
                core[: self.overlap] = ramp
            if j < self.num_segments - 1:
                core[-self.overlap :] = ramp[::-1]
        w[self.margin : self.margin + self.core] = core
        return w


def extract_segment(x: np.ndarray, plan: SegmentPlan, j: int) -> np.ndarray:
    """Segment j of x [..., T] as [..., segment], zero-padded outside the signal."""
    start = plan.start(j)
    out = np.zeros(x.shape[:-1] + (plan.segment,), dtype=np.float32)
    lo, hi = max(start, 0), min(start + plan.segment, x.shape[-1])
    if hi > lo:
        out[..., lo - start : hi - start] = x[..., lo:hi]
    return out


def overlap_add(segments, plan: SegmentPlan) -> np.ndarray:
    """Cross-fade segment outputs [..., segment] (in order) back into [..., T]."""
    out = None
    for j, seg in enumerate(segments):
        seg = np.asarray(seg, dtype=np.float32)
        if out is None:
            out = np.zeros(seg.shape[:-1] + (plan.num_samples,), dtype=np.float32)
        start = plan.start(j)
        lo, hi = max(start, 0), min(start + plan.segment, plan.num_samples)
        if hi > lo:
            w = plan.weights(j)[lo - start : hi - start]
            out[..., lo:hi] += seg[..., lo - start : hi - start] * w
    if out is None:
        raise ValueError("overlap_add got no segments")
    return out


def open_audio(source, name: str | None = None) -> sf.SoundFile:
    """Open a file path or a seekable file object for block reads (no samples decoded yet)."""
    name = name or str(source)
    try:
        f = sf.SoundFile(source)
    except Exception as e:  # noqa: BLE001 - soundfile raises several types
        msg = re.sub(r"Error opening <[^>]*>: ", "", str(e))
        if name.lower().endswith(".mp3") and "MP3" not in sf.available_formats():
            msg = f"this libsndfile ({sf.__libsndfile_version__}) cannot decode MP3; convert it"
        raise AudioError(f"{name}: cannot decode audio ({msg})") from e
    if f.frames <= 0:
        f.close()
        raise AudioError(f"{name}: zero-length audio")
    return f


class BlockReader:
    """Sequential windows [lo, hi) of an open SoundFile as float32 [C, hi - lo], zero outside
    the file. Windows must move forward; only the current window is held in memory."""

    def __init__(self, f: sf.SoundFile, name: str):
        self.f, self.name = f, name
        self.frames, self.channels = f.frames, f.channels
        self.buf = np.zeros((f.channels, 0), np.float32)
        self.start = 0  # file position of buf[:, 0]

    def window(self, lo: int, hi: int) -> np.ndarray:
        lo_f, hi_f = max(lo, 0), min(hi, self.frames)
        if lo_f > self.start:  # drop what no later window needs
            self.buf = self.buf[:, min(lo_f - self.start, self.buf.shape[1]):]
            self.start = lo_f
        need = hi_f - (self.start + self.buf.shape[1])
        if need > 0:
            if self.f.tell() != self.start + self.buf.shape[1]:
                self.f.seek(self.start + self.buf.shape[1])
            try:
                block = self.f.read(need, dtype="float32", always_2d=True).T
            except Exception as e:  # noqa: BLE001
                raise AudioError(f"{self.name}: cannot decode audio ({e})") from e
            if not np.isfinite(block).all():
                raise AudioError(f"{self.name}: audio contains NaN or infinite samples")
            self.buf = np.concatenate([self.buf, block], axis=1)
        out = np.zeros((self.channels, hi - lo), np.float32)
        if hi_f > lo_f:
            part = self.buf[:, lo_f - self.start : hi_f - self.start]
            out[:, lo_f - lo : lo_f - lo + part.shape[1]] = part
        return out


@dataclass(frozen=True)
class RatePlan:
    """One track's segments at three rates: input (decode), output (stems) and model. Segment
    starts fall on a common tick (1 / gcd of the rates), so a padded window resampled on its
    own equals the same span of the whole resampled file; `out` is the cross-fade plan at the
    output rate, and segment j of the model is the model-rate span starting at model_start(j)."""

    frames: int
    in_rate: int
    out_rate: int
    model_rate: int
    segment: int  # model samples per segment
    out: SegmentPlan
    pad: int  # input samples of resampling context on each side of a window

    @classmethod
    def build(cls, frames: int, in_rate: int, out_rate: int, model_rate: int, segment: int,
              margin: float, overlap: float) -> RatePlan:
        g = math.gcd(math.gcd(in_rate, out_rate), model_rate)
        tm, to, ti = model_rate // g, out_rate // g, in_rate // g  # one tick in each rate
        m = int(margin * segment)
        m = tm * math.ceil(m / tm) if 2 * tm * math.ceil(m / tm) < segment else tm * (m // tm)
        hop = tm * ((segment - 2 * m - int(overlap * segment)) // tm)
        if hop <= 0:
            raise ValueError(f"segment {segment} too short for rates {in_rate}/{model_rate}")
        m_out, hop_out = m // tm * to, hop // tm * to
        seg_out = segment * out_rate // model_rate
        overlap_out = seg_out - 2 * m_out - hop_out
        num_out = math.ceil(frames * out_rate / in_rate)
        pad = ti * math.ceil(max(1024, 64 * in_rate // min(out_rate, model_rate)) / ti)
        return cls(frames, in_rate, out_rate, model_rate, segment,
                   SegmentPlan(num_out, seg_out, m_out, overlap_out), pad)

    @property
    def num_segments(self) -> int:
        return self.out.num_segments

    def in_span(self, j: int) -> tuple[int, int]:
        """Input frames [lo, hi) that segment j needs, resampling context included."""
        start = self.out.start(j) * self.in_rate // self.out_rate
        length = math.ceil(max(self.out.segment * self.in_rate / self.out_rate,
                               self.segment * self.in_rate / self.model_rate))
        return start - self.pad, start + length + self.pad

    def split(self, window: np.ndarray, per_channel: bool = False):
        """Input window [C, hi - lo] -> (output-rate window [C, seg_out], model-rate mid
        [segment], or every channel [C, segment] with per_channel), both cut from the
        resampled padded window at the segment's start."""
        def cut(x, rate, n):
            y = resample(x, self.in_rate, rate)
            off = self.pad * rate // self.in_rate
            y = y[..., off : off + n]
            return np.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, n - y.shape[-1])])

        mid = cut(window if per_channel else to_mono(window), self.model_rate, self.segment)
        return cut(window, self.out_rate, self.out.segment), mid
