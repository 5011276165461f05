"""The Ray Data stages of `pipelines.separate`: decode + segment (CPU, in blocks), separate (model
actors), split channels (soft masks at the output rate: in the model actors by default, or CPU
tasks of their own). Callable without Ray. Every stage
holds a few segments at a time, so no process's memory depends on track length; one bad file or
item becomes that item's error, never the job's."""

from __future__ import annotations

import json
import time

import numpy as np

from msdm.audio import BlockReader, RatePlan, open_audio
from msdm.stereo import split_segment

from . import storage
from .common import peak_rss_mb, private_mb
from .models import Separator


def decode_segments(item: dict, sample_rate: int, segment: int, margin: float, overlap: float,
                    out_rate: str = "original", channels: str = "original",
                    method: str = "channels"):
    """CPU stage (flat_map generator): read the track block by block and yield one row per
    segment: the model-rate `mixture` (every channel [C, segment] for method "channels", else
    the mid [segment]) and the output-rate `window` [C, seg_out] of the same span (C = 1 for
    --channels mono). A failure yields a row with `error` (after any segments yielded)."""
    t0 = time.time()
    base = {"key": item["key"], "item": json.dumps(item), "t0": t0, "error": ""}
    seg = -1
    try:
        fs, path = storage.get_fs(item["input"])
        if storage.is_remote(item["input"]):
            handle = fs.open(path, "rb", block_size=8 << 20)
        else:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
        with handle, open_audio(handle, item["input"]) as f:
            rate = f.samplerate if out_rate == "original" else int(out_rate)
            plan = RatePlan.build(f.frames, f.samplerate, rate, sample_rate, segment, margin,
                                  overlap)
            reader = BlockReader(f, item["input"])
            info = json.dumps({"rate": rate, "model_rate": sample_rate, "channels": f.channels,
                               "num_samples": plan.out.num_samples, "segment": plan.out.segment,
                               "margin": plan.out.margin, "overlap": plan.out.overlap,
                               "in_rate": f.samplerate, "mono": channels == "mono"})
            for seg in range(plan.num_segments):
                window = reader.window(*plan.in_span(seg))
                if channels == "mono":
                    window = window.mean(axis=0, keepdims=True, dtype=np.float32)
                window, mid = plan.split(window, method == "channels" and channels != "mono")
                yield {**base, "seg": seg, "num_segments": plan.num_segments, "plan": info,
                       "mixture": mid, "window": window, "decode_rss_mb": peak_rss_mb()}
    except Exception as e:  # noqa: BLE001 - one input's failure is that input's row
        yield {**base, "seg": -1, "num_segments": 0, "plan": "{}", "error": _reason(
            item["input"], e, seg), "mixture": np.zeros(segment, np.float32),
            "window": np.zeros((1, 1), np.float32), "decode_rss_mb": peak_rss_mb()}


def _reason(name: str, e: Exception, seg: int = -1) -> str:
    text = str(e)
    text = text if name in text else f"{name}: {type(e).__name__}: {text}"
    return text if seg < 1 else f"{text} (at segment {seg})"


class SeparateSegments:
    """Model stage (actor pool): separate a batch of segments from any tracks. If the batch
    fails (an out-of-memory error, a model error on one item), its items are retried one by
    one and only the failing ones get an `error`. With `split` (split_segments' keyword
    arguments) the actor also does the channel split, so its rows leave with the output-rate
    stems."""

    def __init__(self, ckpt, cfg: dict, num_gpus: float = 0, seed: int = 0,
                 split: dict | None = None, threads: int = 0):
        self.separator = Separator(ckpt, cfg, num_gpus, seed, threads)
        self.peak_private = 0.0
        self.split = split

    def __call__(self, batch: dict) -> dict:
        t0 = time.time()
        errors = [str(e) for e in batch["error"]]
        n, num_stems = len(errors), len(self.separator.cfg.data.stems)
        # every channel of a segment is one model item, all with the segment's seed (shared
        # noise): identical channels give identical stems
        mixes = [np.asarray(batch["mixture"][i], np.float32) for i in range(n)]
        stems = [np.zeros((num_stems,) + m.shape, np.float32) for m in mixes]  # [S, (C,) T]
        todo = [i for i in range(n) if not errors[i]]
        keys = [(batch["key"][i], int(batch["seg"][i])) for i in range(n)]
        try:
            if todo:
                self._separate(todo, mixes, keys, stems)
        except Exception:  # noqa: BLE001 - retry item by item to find the bad one
            for i in todo:
                try:
                    self._separate([i], mixes, keys, stems)
                except Exception as e:  # noqa: BLE001
                    errors[i] = f"model failed on segment {keys[i][1]}: {type(e).__name__}: {e}"
        out = {k: v for k, v in batch.items() if k not in ("mixture", "error")}
        out.update(stems=_column(stems), error=np.array(errors, dtype=object),
                   model_s=np.full(n, (time.time() - t0) / max(n, 1)))
        if self.split is not None:
            out = split_segments(out, **self.split)
        self.peak_private = max(self.peak_private, private_mb())  # the split's memory included
        out["actor_private_mb"] = np.full(n, self.peak_private)
        return out


    def _separate(self, rows, mixes, keys, stems) -> None:
        done = self.separator.separate_channels([mixes[i] for i in rows], [keys[i] for i in rows])
        for i, st in zip(rows, done):
            stems[i] = st


def split_segments(batch: dict, power: float = 1.0, method: str = "transfer") -> dict:
    """Channel split (in the model actor, or a CPU stage of its own): model-rate stems
    [S, segment] -> output-rate stems [S, C, seg_out] of each
    segment: upsampled (mono), or soft masks from them applied to every channel of `window`."""
    n = len(batch["key"])
    stems, errors = [], [str(e) for e in batch["error"]]
    for i in range(n):
        out = np.zeros((batch["stems"][i].shape[0], 1, 1), np.float32)
        if not errors[i]:
            try:
                out = _split_one(batch["stems"][i], batch["window"][i],
                                 json.loads(batch["plan"][i]), power, method)  # [S, C, T]
            except Exception as e:  # noqa: BLE001 - this segment's failure
                errors[i] = f"channel split failed on segment {batch['seg'][i]}: {e}"
        stems.append(out)
    result = {k: v for k, v in batch.items() if k not in ("stems", "error")}
    result["stems"] = _column(stems)
    result["error"] = np.array(errors, dtype=object)
    result["split_rss_mb"] = np.full(n, peak_rss_mb())
    return result


def _split_one(stems: np.ndarray, window: np.ndarray, plan: dict, power: float,
               method: str) -> np.ndarray:
    return split_segment(stems, window, plan["rate"], plan["model_rate"], power, method,
                         mono=plan["mono"])


def _column(arrays: list[np.ndarray]):
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    col = np.empty(len(arrays), dtype=object)
    col[:] = arrays
    return col
