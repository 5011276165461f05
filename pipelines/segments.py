"""The three Ray Data stages of `pipelines.separate`: decode + segment (CPU), separate (model
actors), assemble + write (CPU). Callable without Ray. Model actors only hold segment batches,
so their memory does not depend on track length; one bad file or item never stops a batch."""

from __future__ import annotations

import io
import json
import time

import numpy as np

from msdm.audio import (
    SegmentPlan,
    extract_segment,
    overlap_add,
    read_audio,
    resample,
    to_mono,
    write_audio,
)
from msdm.config import Config

from . import storage
from .catalog import output_paths
from .common import peak_rss_mb, private_mb
from .models import Separator, separation_nfe


def decode_segments(item: dict, sample_rate: int, segment: int, margin: float,
                    overlap: float) -> list[dict]:
    """CPU stage (flat_map): decode, downmix, resample, cut into segments with margins. Any
    failure (undecodable, empty, a folder, a symlink loop, ...) yields one row with `error`."""
    t0 = time.time()
    base = {"key": item["key"], "item": json.dumps(item), "t0": t0, "error": ""}
    try:
        x, sr = read_audio(storage.read_bytes(item["input"]), item["input"])
        mono = resample(to_mono(x), sr, sample_rate)
        plan = SegmentPlan.from_fractions(mono.shape[-1], segment, margin, overlap)
    except Exception as e:  # noqa: BLE001 - one input's failure is that input's row
        return [{**base, "seg": -1, "num_segments": 0, "num_samples": 0, "orig_sr": 0,
                 "error": _reason(item["input"], e), "mixture": np.zeros(segment, np.float32),
                 "decode_rss_mb": peak_rss_mb()}]
    return [{**base, "seg": j, "num_segments": plan.num_segments, "num_samples": plan.num_samples,
             "orig_sr": sr, "mixture": extract_segment(mono, plan, j),
             "decode_rss_mb": peak_rss_mb()} for j in range(plan.num_segments)]


def _reason(name: str, e: Exception) -> str:
    text = str(e)
    return text if name in text else f"{name}: {type(e).__name__}: {text}"


class SeparateSegments:
    """Model stage (actor pool): separate a batch of segments from any tracks. If the batch
    fails (an out-of-memory error, a model error on one item), its items are retried one by
    one and only the failing ones get an `error`."""

    def __init__(self, ckpt, cfg: dict, num_gpus: float = 0, seed: int = 0):
        self.separator = Separator(ckpt, cfg, num_gpus, seed)
        self.peak_private = 0.0

    def __call__(self, batch: dict) -> dict:
        t0 = time.time()
        errors = [str(e) for e in batch["error"]]
        n, length = len(errors), batch["mixture"].shape[-1]
        stems = np.zeros((n, len(self.separator.cfg.data.stems), length), np.float32)
        todo = [i for i in range(n) if not errors[i]]
        keys = [(batch["key"][i], int(batch["seg"][i])) for i in range(n)]
        try:
            if todo:
                stems[todo] = self.separator(batch["mixture"][todo], [keys[i] for i in todo])
        except Exception:  # noqa: BLE001 - retry item by item to find the bad one
            for i in todo:
                try:
                    stems[i] = self.separator(batch["mixture"][i : i + 1], [keys[i]])[0]
                except Exception as e:  # noqa: BLE001
                    errors[i] = f"model failed on segment {keys[i][1]}: {type(e).__name__}: {e}"
        out = {k: v for k, v in batch.items() if k not in ("mixture", "error")}
        out.update(stems=stems, error=np.array(errors, dtype=object),
                   model_s=np.full(n, (time.time() - t0) / max(n, 1)))
        self.peak_private = max(self.peak_private, private_mb())
        out["actor_private_mb"] = np.full(n, self.peak_private)
        return out


class AssembleTrack:
    """CPU stage (map_groups by key): overlap-add the segments of one track, resample back,
    write one file per stem (write then rename) and return the track's manifest row."""

    def __init__(self, cfg_dict: dict, output: str, template: str, fmt: str, subtype: str,
                 out_rate: str, ckpt_name: str):
        self.cfg = Config.from_dict(cfg_dict)
        self.output, self.template, self.fmt, self.subtype = output, template, fmt, subtype
        self.out_rate, self.ckpt_name = out_rate, ckpt_name

    def __call__(self, group: dict) -> dict:
        item = json.loads(group["item"][0])
        row = {"input": item["input"], "key": item["key"], "outputs": {}, "error": "",
               "sampler": self.cfg.to_dict()["sampler"], "likelihood":
               self.cfg.separation.likelihood, "checkpoint": self.ckpt_name, "time": time.time()}
        try:
            failed = [str(e) for e in group["error"] if str(e)]
            if failed:
                raise RuntimeError(failed[0])
            row.update(self._write(item, group))
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - the track's failure is its row
            row.update(status="failed", error=str(e) or type(e).__name__)
        row["wall_s"] = time.time() - float(np.min(group["t0"]))
        return {"manifest": np.array([json.dumps(row, default=float)], dtype=object)}

    def _write(self, item: dict, group: dict) -> dict:
        cfg = self.cfg
        order = np.argsort(group["seg"])
        plan = SegmentPlan.from_fractions(int(group["num_samples"][0]), cfg.data.chunk_samples,
                                          cfg.separation.margin, cfg.separation.overlap)
        stems = overlap_add((group["stems"][i] for i in order), plan)  # [S, T], model rate
        sr_in = int(group["orig_sr"][0])
        rate = sr_in if self.out_rate == "original" else int(self.out_rate)
        original, _ = read_audio(storage.read_bytes(item["input"]), item["input"])
        mixture = resample(to_mono(original), sr_in, rate)  # the reference at the output rate
        stems = resample(stems, cfg.data.sample_rate, rate)
        t = mixture.shape[-1]
        stems = np.pad(stems, ((0, 0), (0, max(0, t - stems.shape[-1]))))[:, :t]
        residual = mixture - stems.sum(0)
        paths = output_paths(item, cfg.data.stems, self.output, self.template, self.fmt)
        for i, stem in enumerate(cfg.data.stems):
            buf = io.BytesIO()
            write_audio(buf, stems[i], rate, self.fmt, self.subtype)
            storage.write_bytes(paths[stem], buf.getvalue())
        k = separation_nfe(cfg)  # 1 for a regressor, + 1 with --init
        power = float(np.sum(mixture.astype(np.float64) ** 2)) + 1e-20
        return {"outputs": paths, "duration_s": t / rate, "sample_rate": rate,
                "segments": plan.num_segments, "nfe_per_segment": k, "nfe": k * plan.num_segments,
                "model_s": float(np.sum(group["model_s"])),
                "residual_db": 10 * np.log10(float(np.sum(residual.astype(np.float64) ** 2))
                                             / power + 1e-20),
                "actor_private_mb": float(np.max(group["actor_private_mb"])),
                "decode_rss_mb": float(np.max(group["decode_rss_mb"])),
                "assemble_rss_mb": peak_rss_mb()}


def assemble_track(group: dict, **options) -> dict:
    """map_groups entry point for `AssembleTrack`."""
    return AssembleTrack(**options)(group)
