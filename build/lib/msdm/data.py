"""Multitrack data: Slakh stem classes, track mixing, fixed-length chunks, Parquet rows <-> tensors.

Parquet row schema (one row per chunk): track_id (string), split (string), chunk_index (int32),
start (int64, sample offset) and one float32 column per stem (fixed-size list of chunk length).
Stem tensors are [S, T] per track and [B, S, T] per batch, in `cfg.data.stems` order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from .config import STEMS

COL_TRACK = "track_id"
COL_SPLIT = "split"
COL_CHUNK = "chunk_index"
COL_START = "start"
META_COLUMNS = (COL_TRACK, COL_SPLIT, COL_CHUNK, COL_START)
SPLITS = ("train", "validation", "test", "omitted")
CLASS_MAP_PATH = Path(__file__).with_name("slakh_classes.yaml")


class TrackError(ValueError):
    """A track that cannot be used (bad metadata, missing or misaligned stems)."""


@dataclass(frozen=True)
class ClassMap:
    """How Slakh stems map to target classes: drums by is_drum, else inst_class, else program."""

    inst_class: dict[str, str]
    program_ranges: dict[str, tuple[int, int]]
    drums: str | None

    @classmethod
    def load(cls, path: str | Path | None = None) -> ClassMap:
        path = Path(path) if path else CLASS_MAP_PATH
        try:
            d = yaml.safe_load(path.read_text())
            return cls(
                inst_class={str(k): str(v) for k, v in (d.get("inst_class") or {}).items()},
                program_ranges={str(k): (int(v[0]), int(v[1]))
                                for k, v in (d.get("program_ranges") or {}).items()},
                drums=d.get("drums"),
            )
        except (OSError, yaml.YAMLError, AttributeError, TypeError, IndexError, ValueError) as e:
            raise ValueError(f"{path}: not a valid class map ({e})") from e

    def classify(self, stem: dict) -> str | None:
        if stem.get("is_drum") is True:
            return self.drums
        inst = stem.get("inst_class")
        if inst is not None and str(inst) in self.inst_class:
            return self.inst_class[str(inst)]
        program = stem.get("program_num")
        if inst is None and isinstance(program, int):
            for target, (lo, hi) in self.program_ranges.items():
                if lo <= program <= hi:
                    return target
        return None


def parse_metadata(text: str, name: str = "metadata.yaml") -> dict:
    """Parse a Slakh metadata.yaml; malformed content raises TrackError."""
    try:
        meta = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise TrackError(f"{name}: malformed YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("stems"), dict):
        raise TrackError(f"{name}: no 'stems' mapping")
    for sid, st in meta["stems"].items():
        if not isinstance(st, dict):
            raise TrackError(f"{name}: stem {sid} is not a mapping")
    return meta


def assign_stems(meta: dict, class_map: ClassMap, targets=STEMS) -> dict[str, list[str]]:
    """target class -> rendered Slakh stem ids (e.g. {'guitar': ['S01', 'S04'], ...})."""
    out: dict[str, list[str]] = {t: [] for t in targets}
    for sid, st in sorted(meta["stems"].items()):
        if st.get("audio_rendered") is False:
            continue
        target = class_map.classify(st)
        if target in out:
            out[target].append(str(sid))
    return out


def stack_stems(parts: dict[str, np.ndarray | None], stems=STEMS, name: str = "track"):
    """{stem: mono [T] or None (silent)} -> [S, T]; every present stem must have the same length."""
    lengths = {k: v.shape[-1] for k, v in parts.items() if v is not None}
    if not lengths:
        raise TrackError(f"{name}: none of the stems {list(stems)} is present")
    if len(set(lengths.values())) > 1:
        raise TrackError(f"{name}: stems of different lengths {lengths}")
    t = next(iter(lengths.values()))
    if t == 0:
        raise TrackError(f"{name}: zero-length audio")
    out = np.zeros((len(stems), t), dtype=np.float32)
    for i, s in enumerate(stems):
        if parts.get(s) is not None:
            out[i] = parts[s]
    return out


def chunk_starts(num_samples: int, chunk: int, hop: int = 0, pad_tail: bool = False):
    """Chunk offsets: hop = chunk by default; a trailing partial chunk is dropped unless padded."""
    hop = hop or chunk
    starts = list(range(0, max(num_samples - chunk, -1) + 1, hop))
    if pad_tail:
        nxt = starts[-1] + hop if starts else 0
        if nxt < num_samples:
            starts.append(nxt)
    return starts


def chunk_track(stems: np.ndarray, chunk: int, hop: int = 0, pad_tail: bool = False,
                drop_silent: bool = False, silence_rms: float = 1e-4):
    """Yield (chunk_index, start, [S, chunk] float32) for a track [S, T]."""
    for idx, start in enumerate(chunk_starts(stems.shape[-1], chunk, hop, pad_tail)):
        piece = stems[:, start : start + chunk]
        if piece.shape[-1] < chunk:
            piece = np.pad(piece, ((0, 0), (0, chunk - piece.shape[-1])))
        if drop_silent and np.sqrt((piece.astype(np.float64) ** 2).mean(-1)).max() < silence_rms:
            continue
        yield idx, start, piece.astype(np.float32, copy=False)


def column_array(col) -> np.ndarray:
    """A stem column as float32 [B, T]: numpy 2-D, object array of rows, or an Arrow
    fixed-size list (zero-copy)."""
    if not isinstance(col, np.ndarray) and (hasattr(col, "combine_chunks")
                                            or hasattr(col, "flatten")):  # pyarrow arrays
        col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
        n = len(col)
        return col.flatten().to_numpy(zero_copy_only=False).reshape(n, -1).astype(np.float32,
                                                                                  copy=False)
    arr = np.asarray(col)
    if arr.dtype == object:
        arr = np.stack([np.asarray(a, dtype=np.float32) for a in arr]) if len(arr) else arr
    return arr.astype(np.float32, copy=False)


def batch_to_tensor(batch, stems=STEMS) -> torch.Tensor:
    """Parquet batch (dict of arrays or pyarrow Table) with one column per stem -> [B, S, T]."""
    names = batch.column_names if hasattr(batch, "column_names") else list(batch)
    missing = [s for s in stems if s not in names]
    if missing:
        raise ValueError(f"batch lacks stem columns {missing}; has {sorted(names)}")
    x = torch.from_numpy(np.stack([column_array(batch[s]) for s in stems], axis=1))
    if x.ndim != 3:
        raise ValueError(f"stem columns must be [B, T] arrays, got {tuple(x.shape)}")
    return x


def random_shift(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Paper's shift augmentation at batch level: roll each example by U[-T/2, T/2) samples.

    Rows arrive as fixed chunks, so a circular roll stands in for the loader's jittered crop;
    the stems of one example stay aligned.
    """
    b, _, t = x.shape
    shifts = torch.randint(-t // 2, t // 2, (b,), generator=generator)
    idx = (torch.arange(t)[None, :] - shifts[:, None]) % t  # [B, T]
    return torch.gather(x, 2, idx[:, None, :].expand_as(x).to(x.device))


def random_crop(x: torch.Tensor, length: int, generator=None) -> torch.Tensor:
    """A random window of `length` samples per example, the same for every stem of it: with
    chunks stored longer than the training length (and overlapping, `data.hop_samples`), crops
    reach every position of a track, across the stored chunk boundaries (the paper's aug_shift).
    x [B, S, T] -> [B, S, length]."""
    b, _, t = x.shape
    if not 0 < length <= t:
        raise ValueError(f"crop length {length} must be in 1..{t}")
    starts = torch.randint(0, t - length + 1, (b,), generator=generator)
    idx = starts[:, None] + torch.arange(length)[None, :]  # [B, length]
    return torch.gather(x, 2, idx[:, None, :].expand(b, x.shape[1], length).to(x.device))
