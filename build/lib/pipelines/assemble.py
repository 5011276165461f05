"""Streaming assembly for `pipelines.separate`: per track, overlap-add segment outputs in order
(a small reorder buffer) and flush finished regions to temporary files, renamed (local) or
uploaded (S3) when the track is complete. Holds one segment window per open track."""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid

import numpy as np
import soundfile as sf

from msdm.audio import SegmentPlan

from . import storage
from .catalog import output_paths
from .common import peak_rss_mb
from .models import separation_nfe


def output_names(stems, subset: str | None = None, two_stems: str | None = None) -> list[str]:
    """Stem files to write: all stems, a comma-separated subset, or STEM and no_STEM."""
    if subset and two_stems:
        raise ValueError("--stems and --two-stems exclude each other")
    chosen = [s.strip() for s in (subset or "").split(",") if s.strip()]
    for s in chosen + ([two_stems] if two_stems else []):
        if s not in stems:
            raise ValueError(f"unknown stem {s!r}: the checkpoint has {', '.join(stems)}")
    if two_stems:
        return [two_stems, f"no_{two_stems}"]
    return chosen or list(stems)


class TrackWriter:
    """Overlap-add the segments [S, C, seg] of one track (in order) into one file per name."""

    def __init__(self, paths: dict[str, str], stems, plan: SegmentPlan, rate: int, channels: int,
                 fmt: str, subtype: str):
        self.paths, self.stems, self.plan = paths, list(stems), plan
        self.acc = np.zeros((len(stems) + 1, channels, plan.segment), np.float32)  # + mixture
        self.pos, self.next = plan.start(0), 0
        self.energy = np.zeros((2, channels))  # mixture, residual per channel
        self.peak = 0.0  # PCM subtypes clip written stems above 1
        self.tmps, self.files = {}, {}
        for name, uri in paths.items():
            if storage.is_remote(uri):
                fd, tmp = tempfile.mkstemp(suffix=f".{fmt}.tmp")
                os.close(fd)
            else:
                tmp = f"{storage.get_fs(uri)[1]}.{uuid.uuid4().hex[:8]}.tmp"
                os.makedirs(os.path.dirname(tmp), exist_ok=True)
            self.tmps[name] = tmp
            self.files[name] = sf.SoundFile(tmp, "w", rate, channels, subtype, format=fmt.upper())

    def add(self, j: int, stems: np.ndarray, window: np.ndarray) -> None:
        assert j == self.next and stems.shape[1:] == self.acc.shape[1:], (j, stems.shape)
        w = self.plan.weights(j)
        self.acc[:-1] += stems * w
        self.acc[-1] += window * w
        last = j == self.plan.num_segments - 1
        end = self.plan.num_samples if last else self.plan.start(j + 1)
        self._flush(end - self.pos)
        self.next += 1

    def _flush(self, n: int) -> None:
        lo = max(0, -self.pos)  # samples before the track's start are padding
        hi = min(n, self.plan.num_samples - self.pos)
        if hi > lo:
            block = self.acc[:, :, lo:hi].astype(np.float64)
            mix, total = block[-1], block[:-1].sum(0)
            self.energy += [np.sum(mix**2, -1), np.sum((mix - total) ** 2, -1)]
            for name, f in self.files.items():
                out = self._select(name, block).T.astype(np.float32)
                self.peak = max(self.peak, float(np.abs(out).max()))
                f.write(out)
        self.acc = np.roll(self.acc, -n, axis=-1)
        self.acc[:, :, -n:] = 0
        self.pos += n

    def _select(self, name: str, block: np.ndarray) -> np.ndarray:
        if name in self.stems:
            return block[self.stems.index(name)]
        return block[-1] - block[self.stems.index(name[len("no_"):])]  # mixture - STEM

    def commit(self) -> None:
        for f in self.files.values():
            f.close()
        for name, uri in self.paths.items():
            if storage.is_remote(uri):
                fs, path = storage.get_fs(uri)
                fs.put_file(self.tmps[name], path)
                os.remove(self.tmps[name])
            else:
                os.replace(self.tmps[name], storage.get_fs(uri)[1])

    def abort(self) -> None:
        for name, f in self.files.items():
            f.close()
            if os.path.exists(self.tmps[name]):
                os.remove(self.tmps[name])

    def residual_db(self) -> list[float]:
        mix, res = self.energy
        return [float(10 * np.log10(r / (m + 1e-30) + 1e-30)) for m, r in zip(mix, res)]


class Assembler:
    """Driver side of the job: takes segment rows in any order, returns manifest rows of
    finished tracks. Per open track it holds one writer and the segments that arrived early."""

    def __init__(self, cfg, output: str, template: str, fmt: str, subtype: str,
                 ckpt_name: str, names: list[str]):
        self.cfg, self.output, self.template = cfg, output, template
        self.fmt, self.subtype, self.ckpt_name, self.names = fmt, subtype, ckpt_name, names
        self.open: dict[str, dict] = {}
        self.closed: set[str] = set()
        settings = cfg.to_dict()  # the job's config is fixed: every manifest row carries it
        self.sampler, self.separation = settings["sampler"], settings["separation"]

    def add(self, row: dict) -> dict | None:
        key = str(row["key"])
        if key in self.closed:
            return None  # segments of a track that already failed
        st = self.open.get(key)
        if st is None:
            st = self.open[key] = {"item": json.loads(row["item"]), "pending": {}, "writer": None,
                                   "t0": float(row["t0"]), "model_s": 0.0, "stats": {}}
        if str(row["error"]):
            return self._finish(key, str(row["error"]))
        try:
            return self._add(key, st, row)
        except Exception as e:  # noqa: BLE001 - a write failure is this track's row
            return self._finish(key, f"{type(e).__name__}: {e}")

    def _add(self, key: str, st: dict, row: dict) -> dict | None:
        plan = json.loads(row["plan"])
        if st["writer"] is None:
            seg = SegmentPlan(plan["num_samples"], plan["segment"], plan["margin"],
                              plan["overlap"])
            paths = output_paths(st["item"], self.names, self.output, self.template, self.fmt)
            st["plan"] = plan
            st["writer"] = TrackWriter(paths, self.cfg.data.stems, seg, plan["rate"],
                                       row["window"].shape[0], self.fmt, self.subtype)
        st["model_s"] += float(row["model_s"])
        for k in ("decode_rss_mb", "actor_private_mb", "split_rss_mb"):
            st["stats"][k] = max(st["stats"].get(k, 0.0), float(row[k]))
        st["pending"][int(row["seg"])] = (row["stems"], row["window"])
        st["stats"]["max_pending"] = max(st["stats"].get("max_pending", 0), len(st["pending"]))
        writer = st["writer"]
        while writer.next in st["pending"]:
            writer.add(writer.next, *st["pending"].pop(writer.next))
        if writer.next == int(row["num_segments"]):
            writer.commit()
            return self._finish(key, "")
        return None

    def _finish(self, key: str, error: str) -> dict:
        st = self.open.pop(key)
        self.closed.add(key)
        item, cfg = st["item"], self.cfg
        row = {"input": item["input"], "key": item["key"], "outputs": {}, "error": error,
               "status": "failed" if error else "ok", "sampler": self.sampler,
               "likelihood": cfg.separation.likelihood,
               "separation": self.separation, "checkpoint": self.ckpt_name,
               "time": time.time(), "wall_s": time.time() - st["t0"]}
        writer = st["writer"]
        if error:
            if writer is not None:
                writer.abort()
            return row
        plan, k = st["plan"], separation_nfe(cfg)  # 1 for a regressor
        n = writer.plan.num_segments
        row.update(outputs=writer.paths, duration_s=plan["num_samples"] / plan["rate"],
                   sample_rate=plan["rate"], channels=writer.acc.shape[1], segments=n,
                   nfe_per_segment=k, nfe=k * n, model_s=st["model_s"],
                   residual_db=max(writer.residual_db()), peak=writer.peak,
                   residual_db_per_channel=writer.residual_db(), assemble_rss_mb=peak_rss_mb(),
                   **st["stats"])
        return row

    def finish(self) -> list[dict]:
        """Rows for tracks whose segments never all arrived."""
        return [self._finish(k, "incomplete: not every segment came back")
                for k in list(self.open)]
