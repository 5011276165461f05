"""Batch separation of audio catalogs: input listing, output naming, the manifest, and the three
Ray Data stages (decode + segment on CPU, separate on model actors, assemble + write on CPU).

No Ray import: tests call the stages on dicts of numpy arrays. Model actors only ever hold
segment batches, so their memory does not grow with track length.
"""

from __future__ import annotations

import io
import json
import posixpath
import resource
import time

import numpy as np
import torch

from msdm.audio import (
    AUDIO_FORMATS,
    AudioError,
    SegmentPlan,
    extract_segment,
    overlap_add,
    read_audio,
    resample,
    to_mono,
    write_audio,
)
from msdm.sampling import nfe
from msdm.tasks import separate_with_config

from . import storage
from .stages import load_model, pick_device, stable_seed

AUDIO_EXT = tuple(f".{e}" for e in AUDIO_FORMATS)
MANIFEST = "_manifest.jsonl"


def list_inputs(spec: str) -> list[dict]:
    """Audio inputs from a folder (recursive), a glob, a manifest (.txt / .jsonl) or one file.
    Each item: {input, key (relative path without extension), track, parent}."""
    fs, path = storage.get_fs(spec)
    if any(c in spec for c in "*?["):
        root = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        files = [f for f in fs.glob(path) if f.lower().endswith(AUDIO_EXT)]
    elif spec.endswith((".txt", ".jsonl")):
        text = storage.read_bytes(spec).decode()
        uris = [json.loads(ln)["input"] if spec.endswith(".jsonl") else ln.strip()
                for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        return [_item(u, posixpath.dirname(storage.get_fs(u)[1])) for u in uris]
    elif fs.isdir(path):
        root, files = path, [f for f in fs.find(path) if f.lower().endswith(AUDIO_EXT)]
    elif fs.exists(path):
        root, files = posixpath.dirname(path), [path]
    else:
        raise storage.StorageError(f"input {spec} does not exist")
    return [_item(storage.full_uri(fs, f), root) for f in sorted(files)]


def _item(uri: str, root: str) -> dict:
    path = storage.get_fs(uri)[1]
    rel = posixpath.relpath(path, root) if root else posixpath.basename(path)
    key = posixpath.splitext(rel)[0]
    return {"input": uri, "key": key, "track": posixpath.basename(key),
            "parent": posixpath.basename(posixpath.dirname(path))}


def output_paths(item: dict, stems, output: str, template: str, ext: str) -> dict[str, str]:
    """{stem: URI} from a --filename template with {track}, {key}, {parent}, {stem}, {ext}."""
    return {s: storage.join(output, template.format(track=item["track"], key=item["key"],
                                                    parent=item["parent"], stem=s, ext=ext))
            for s in stems}


def read_manifest(output: str) -> dict[str, dict]:
    uri = storage.join(output, MANIFEST)
    if not storage.exists(uri):
        return {}
    rows = [json.loads(ln) for ln in storage.read_bytes(uri).decode().splitlines() if ln.strip()]
    return {r["input"]: r for r in rows}


def write_manifest(output: str, rows: dict[str, dict]) -> None:
    text = "".join(json.dumps(r, default=float) + "\n" for r in rows.values())
    storage.write_bytes(storage.join(output, MANIFEST), text.encode())


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _private_mb() -> float:
    """Private (anonymous) resident memory now. Unlike RSS it leaves out pages of Ray's shared
    object store, which a worker maps for every block it reads."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _peak_rss_mb()


def decode_segments(item: dict, sample_rate: int, segment: int, margin: int,
                    overlap: int) -> list[dict]:
    """CPU stage (flat_map): decode, downmix, resample, cut into segments with margins.
    A file that cannot be decoded yields one row with `error` set."""
    t0 = time.time()
    base = {"key": item["key"], "item": json.dumps(item), "t0": t0, "error": ""}
    try:
        x, sr = read_audio(storage.read_bytes(item["input"]), item["input"])
        mono = resample(to_mono(x), sr, sample_rate)
        plan = SegmentPlan(mono.shape[-1], segment, margin, overlap)
    except (AudioError, storage.StorageError, ValueError) as e:
        return [{**base, "seg": -1, "num_segments": 0, "num_samples": 0, "orig_sr": 0,
                 "error": str(e), "mixture": np.zeros(segment, np.float32),
                 "decode_rss_mb": _peak_rss_mb()}]
    return [{**base, "seg": j, "num_segments": plan.num_segments, "num_samples": plan.num_samples,
             "orig_sr": sr, "mixture": extract_segment(mono, plan, j),
             "decode_rss_mb": _peak_rss_mb()} for j in range(plan.num_segments)]


class SeparateSegments:
    """Model stage (actor pool): separate a batch of segments from any tracks."""

    def __init__(self, ckpt, overrides: dict | None = None, num_gpus: float = 0, seed: int = 0):
        self.device = pick_device(num_gpus)
        self.cfg, self.denoiser = load_model(ckpt, overrides, self.device)
        self.seed = seed

    def __call__(self, batch: dict) -> dict:
        t0 = time.time()
        ok = np.array([e == "" for e in batch["error"]])
        n, length = len(ok), batch["mixture"].shape[-1]
        stems = np.zeros((n, len(self.cfg.data.stems), length), np.float32)
        if ok.any():
            mix = torch.from_numpy(np.asarray(batch["mixture"][ok], np.float32))[:, None]
            seeds = [stable_seed(self.seed, k, s) for k, s in zip(batch["key"][ok],
                                                                   batch["seg"][ok])]
            with torch.no_grad():
                est = separate_with_config(self.denoiser, mix.to(self.device), self.cfg, seeds)
            stems[ok] = est.cpu().numpy()
        out = {k: v for k, v in batch.items() if k != "mixture"}
        out["stems"] = stems
        out["model_s"] = np.full(n, (time.time() - t0) / n)
        self.peak_private = max(getattr(self, "peak_private", 0.0), _private_mb())
        out["actor_private_mb"] = np.full(n, self.peak_private)
        return out


def assemble_track(group: dict, **options) -> dict:
    """CPU stage (map_groups by key): see AssembleTrack."""
    return AssembleTrack(**options)(group)


class AssembleTrack:
    """Overlap-add the segments of one track, resample back, write one file per stem (write
    then rename) and return the track's manifest row."""

    def __init__(self, cfg_dict: dict, output: str, template: str, fmt: str, subtype: str,
                 out_rate: str, ckpt_name: str):
        from msdm.config import Config

        self.cfg = Config.from_dict(cfg_dict)
        self.output, self.template, self.fmt, self.subtype = output, template, fmt, subtype
        self.out_rate, self.ckpt_name = out_rate, ckpt_name

    def __call__(self, group: dict) -> dict:
        item = json.loads(group["item"][0])
        row = {"input": item["input"], "key": item["key"], "outputs": {}, "error": "",
               "sampler": self.cfg.to_dict()["sampler"], "likelihood":
               self.cfg.separation.likelihood, "checkpoint": self.ckpt_name}
        try:
            if group["error"][0]:
                raise AudioError(group["error"][0])
            row.update(self._write(item, group))
            row["status"] = "ok"
        except (AudioError, storage.StorageError, ValueError, OSError) as e:
            row.update(status="failed", error=str(e))
        row["wall_s"] = time.time() - float(np.min(group["t0"]))
        return {"manifest": np.array([json.dumps(row, default=float)], dtype=object)}

    def _write(self, item: dict, group: dict) -> dict:
        cfg = self.cfg
        order = np.argsort(group["seg"])
        plan = SegmentPlan(int(group["num_samples"][0]), cfg.data.chunk_samples,
                           *_plan_sizes(cfg))
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
        k = nfe(cfg.sampler.num_steps, cfg.sampler.resamples, cfg.sampler.solver)
        power = float(np.sum(mixture.astype(np.float64) ** 2)) + 1e-20
        return {"outputs": paths, "duration_s": t / rate, "sample_rate": rate,
                "segments": plan.num_segments, "nfe_per_segment": k, "nfe": k * plan.num_segments,
                "model_s": float(np.sum(group["model_s"])),
                "residual_db": 10 * np.log10(float(np.sum(residual.astype(np.float64) ** 2))
                                             / power + 1e-20),
                "actor_private_mb": float(np.max(group["actor_private_mb"])),
                "decode_rss_mb": float(np.max(group["decode_rss_mb"])),
                "assemble_rss_mb": _peak_rss_mb()}


def _plan_sizes(cfg) -> tuple[int, int]:
    """(margin, overlap) in samples for segments of data.chunk_samples."""
    n = cfg.data.chunk_samples
    return int(cfg.separation.margin * n), int(cfg.separation.overlap * n)


def complete(item: dict, stems, output: str, template: str, ext: str, existing: set) -> bool:
    paths = output_paths(item, stems, output, template, ext)
    return all(storage.get_fs(p)[1] in existing for p in paths.values())


def existing_files(output: str) -> set[str]:
    fs, path = storage.get_fs(output)
    return set(fs.find(path)) if fs.exists(path) else set()
