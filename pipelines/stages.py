"""Ray Data UDFs on dict-of-numpy batches, importable and callable without Ray (tests call them
directly). Model stages load a checkpoint once per actor; seeds come from (track, chunk)."""

from __future__ import annotations

import io
import re
import zlib

import numpy as np
import torch

from msdm.checkpoint import load_checkpoint, load_factorized
from msdm.config import load_config
from msdm.data import batch_to_tensor
from msdm.metrics import windowed_si_sdri
from msdm.tasks import separate_with_config

from . import storage


def stable_seed(*parts) -> int:
    """A seed from names and indices, identical in every process (unlike hash())."""
    return zlib.crc32(":".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def parse_ckpt(values) -> str | dict[str, str]:
    """--ckpt URI (joint model) or --ckpt bass=URI --ckpt drums=URI ... (ISDM, one per stem)."""
    values = [values] if isinstance(values, str) else list(values or [])
    if not values:
        raise ValueError("--ckpt is required")
    pairs = [re.match(r"^([A-Za-z][\w-]*)=(.+)$", v) for v in values]
    if len(values) == 1 and pairs[0] is None:
        return values[0]
    out = {}
    for v, m in zip(values, pairs):
        if m is None:
            raise ValueError(f"--ckpt {v!r}: give one URI for a joint model, or STEM=URI for "
                             "every stem of an ISDM model")
        stem, uri = m.groups()
        if stem in out:
            raise ValueError(f"--ckpt given twice for stem {stem!r}")
        out[stem] = uri
    return out


def load_model(ckpt, overrides: dict | None = None, device: str = "cpu"):
    """(cfg, denoiser) from a joint checkpoint URI or {stem: URI}; overrides are dotted keys."""
    def fetch(uri):
        return io.BytesIO(storage.read_bytes(uri))

    if isinstance(ckpt, dict):
        cfg, den = load_factorized({s: fetch(u) for s, u in ckpt.items()}, None, device)
    else:
        cfg, den = load_checkpoint(fetch(ckpt), map_location=device)
    if overrides:
        cfg = load_config(cfg.to_dict(), overrides)
    return cfg, den.to(device)


def pick_device(num_gpus: float) -> str:
    return "cuda" if num_gpus and torch.cuda.is_available() else "cpu"


class SeparateChunks:
    """Evaluate stage: separate prepared chunks (mixture = sum of the reference stems).

    In: track_id, chunk_index, one column per stem. Out: track_id, chunk_index, est, ref [B,S,T].
    """

    def __init__(self, ckpt, overrides: dict | None = None, num_gpus: float = 0, seed: int = 0):
        self.device = pick_device(num_gpus)
        self.cfg, self.denoiser = load_model(ckpt, overrides, self.device)
        self.seed = seed

    def __call__(self, batch) -> dict:
        ref = batch_to_tensor(batch, self.cfg.data.stems)  # [B, S, T]
        tracks = _column(batch, "track_id")
        chunks = _column(batch, "chunk_index")
        seeds = [stable_seed(self.seed, t, c) for t, c in zip(tracks, chunks)]
        mixture = ref.sum(1, keepdim=True).to(self.device)
        est = separate_with_config(self.denoiser, mixture, self.cfg, seeds)
        return {"track_id": np.asarray(tracks, dtype=object), "chunk_index": np.asarray(chunks),
                "est": est.cpu().numpy(), "ref": ref.numpy()}


def _column(batch, name):
    col = batch[name]
    return col.to_pylist() if hasattr(col, "to_pylist") else list(col)


def score_track(group: dict, sample_rate: int) -> dict:
    """Evaluate stage (map_groups): one track's chunks in order -> its windows' SI-SDRi [W, S]."""
    order = np.argsort(group["chunk_index"])
    est = np.concatenate(list(group["est"][order]), axis=-1)  # [S, T]
    ref = np.concatenate(list(group["ref"][order]), axis=-1)
    w = windowed_si_sdri(torch.from_numpy(est), torch.from_numpy(ref), sample_rate).numpy()
    n = w.shape[0]
    return {"track_id": np.array([group["track_id"][0]] * n, dtype=object),
            "window": np.arange(n), "si_sdri": w.reshape(n, -1)}


_MODELS: dict = {}  # per-process cache: Tune reuses worker processes across trials


def sweep_trial(config: dict, ckpt, base: dict, val: dict, seed: int, cost_per_nfe: float,
                num_gpus: float, batch_size: int) -> None:
    """Tune function trainable: separate the fixed validation chunks `val` ({"x": [N, S, T],
    "track_id", "chunk_index"}) with `config` (dotted keys) and report mean windowed SI-SDRi,
    NFE and a cost-aware score."""
    from ray import tune

    device = pick_device(num_gpus)
    key = (str(ckpt), device)
    if key not in _MODELS:
        _MODELS[key] = load_model(ckpt, None, device)
    cfg0, den = _MODELS[key]
    cfg = load_config(cfg0.to_dict(), {**base, **config})
    x = torch.from_numpy(np.array(val["x"]))  # a writable copy of the object-store array
    est = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        seeds = [stable_seed(seed, t, c) for t, c in zip(val["track_id"][i : i + batch_size],
                                                           val["chunk_index"][i : i + batch_size])]
        mix = xb.sum(1, keepdim=True).to(device)
        est.append(separate_with_config(den, mix, cfg, seeds).cpu())
    tune.report(trial_metrics(torch.cat(est), val, cfg, cost_per_nfe))


DIVERGED_DB = -60.0  # what a trial whose sampler blew up scores, so the search steers away


def trial_metrics(est: torch.Tensor, val: dict, cfg, cost_per_nfe: float) -> dict:
    """Mean windowed SI-SDRi of `est` [N, S, T] against the chunks in `val`, the NFE and the
    cost-aware score. A sampler that diverged (non-finite estimates, e.g. Euler + Dirac with too
    few steps) is a result, not an error: it scores DIVERGED_DB with `diverged` = 1."""
    from msdm.metrics import summarize
    from msdm.sampling import nfe

    k = nfe(cfg.sampler.num_steps, cfg.sampler.resamples, cfg.sampler.solver)
    if not torch.isfinite(est).all():
        scores = {s: DIVERGED_DB for s in (*cfg.data.stems, "all")}
        windows, diverged = 0, 1
    else:
        group = {"track_id": val["track_id"], "chunk_index": val["chunk_index"],
                 "est": est.numpy(), "ref": val["x"]}
        per_track = []
        for t in sorted(set(val["track_id"])):
            sel = val["track_id"] == t
            per_track.append(score_track({k_: v[sel] for k_, v in group.items()},
                                         cfg.data.sample_rate)["si_sdri"])
        w = torch.from_numpy(np.concatenate(per_track)).reshape(-1, len(cfg.data.stems))
        scores, windows, diverged = summarize(w, cfg.data.stems), int(w.shape[0]), 0
    return {"si_sdri": scores["all"], "nfe": k, "windows": windows, "diverged": diverged,
            "score": scores["all"] - cost_per_nfe * k,
            **{f"si_sdri_{s}": scores[s] for s in cfg.data.stems}}


def model_multiple(cfg) -> int:
    """Lengths the network accepts are multiples of this (1 for analytic models)."""
    if cfg.model.kind != "unet":
        return 1
    return cfg.model.patch_factor * int(np.prod(cfg.model.factors))


class GenerateBatch:
    """Generation stage (actor pool): total generation, or imputation around given stems."""

    def __init__(self, ckpt, overrides: dict | None, num_gpus: float, seconds: float,
                 given: dict[str, str]):
        from msdm.audio import read_audio, resample, to_mono

        self.device = pick_device(num_gpus)
        self.cfg, self.denoiser = load_model(ckpt, overrides, self.device)
        sr, m = self.cfg.data.sample_rate, model_multiple(self.cfg)
        self.length = int(np.ceil(seconds * sr / m) * m)
        stems = self.cfg.data.stems
        unknown = sorted(set(given) - set(stems))
        if unknown:
            raise ValueError(f"--given stems {unknown} are not model stems {list(stems)}")
        self.known = [s in given for s in stems]
        self.given = torch.zeros(len(stems), self.length)
        for s, uri in given.items():
            x, rate = read_audio(storage.read_bytes(uri), uri)
            y = torch.from_numpy(resample(to_mono(x), rate, sr))[: self.length]
            self.given[stems.index(s), : y.shape[-1]] = y

    def __call__(self, batch: dict) -> dict:
        from msdm.tasks import generate, impute, item_generators

        seeds = [int(s) for s in batch["seed"]]
        gens = item_generators(seeds, self.device)
        b, s = len(seeds), len(self.cfg.data.stems)
        if any(self.known):
            stems = self.given[None].expand(b, s, self.length).to(self.device)
            out = impute(self.denoiser, stems, self.known, self.cfg.imputation, generator=gens,
                         method=self.cfg.impute.method, guidance=self.cfg.impute.guidance,
                         sigma_data=self.cfg.diffusion.sigma_data)
        else:
            out = generate(self.denoiser, (b, s, self.length), self.cfg.generation,
                           generator=gens)
        return {"index": np.asarray(batch["index"]), "seed": np.asarray(seeds),
                "stems": out.cpu().numpy()}


def write_sample(row: dict, output: str, stems, sample_rate: int, seconds: float) -> dict:
    """Write one generated sample: OUTPUT/sample_NNNN/{stem}.wav and mix.wav."""
    from msdm.audio import write_audio

    n = int(round(seconds * sample_rate))
    folder = storage.join(output, f"sample_{int(row['index']):04d}")
    x = np.asarray(row["stems"])[:, :n]
    for name, sig in [*zip(stems, x), ("mix", x.sum(0))]:
        buf = io.BytesIO()
        write_audio(buf, sig, sample_rate, "wav", "FLOAT")
        storage.write_bytes(storage.join(folder, f"{name}.wav"), buf.getvalue())
    return {"index": int(row["index"]), "seed": int(row["seed"]), "folder": folder,
            "peak": float(np.abs(x).max()), "rms": [float(v) for v in np.sqrt((x**2).mean(-1))]}
