"""Ray Data stages of `pipelines.generate`: total generation or imputation on an actor pool, and
writing one sample folder per seed. Callable without Ray."""

from __future__ import annotations

import io

import numpy as np
import torch

from msdm.audio import read_audio, resample, to_mono, write_audio
from msdm.config import Config
from msdm.model import multiple
from msdm.tasks import generate, impute, item_generators
from msdm.training import autocast

from . import storage
from .models import load_model, pick_device


class GenerateBatch:
    """Generation stage (actor pool): total generation, or imputation around given stems."""

    def __init__(self, ckpt, cfg: dict, num_gpus: float, seconds: float, given: dict[str, str]):
        self.device = pick_device(num_gpus)
        _, self.denoiser = load_model(ckpt, self.device)
        self.cfg = Config.from_dict(cfg)
        sr, m = self.cfg.data.sample_rate, multiple(self.cfg.model)
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
        seeds = [int(s) for s in batch["seed"]]
        gens = item_generators(seeds, self.device)
        cfg, b, s = self.cfg, len(seeds), len(self.cfg.data.stems)
        with autocast(torch.device(self.device), cfg.train.bf16):
            if any(self.known):
                stems = self.given[None].expand(b, s, self.length).to(self.device)
                out = impute(self.denoiser, stems, self.known, cfg.imputation, generator=gens,
                             method=cfg.impute.method, guidance=cfg.impute.guidance,
                             sigma_data=cfg.diffusion.sigma_data)
            else:
                out = generate(self.denoiser, (b, s, self.length), cfg.generation,
                               generator=gens)
        return {"index": np.asarray(batch["index"]), "seed": np.asarray(seeds),
                "stems": out.float().cpu().numpy()}


def write_sample(row: dict, output: str, stems, sample_rate: int, seconds: float) -> dict:
    """Write one generated sample: OUTPUT/sample_NNNN/{stem}.wav and mix.wav."""
    n = int(round(seconds * sample_rate))
    folder = storage.join(output, f"sample_{int(row['index']):04d}")
    x = np.asarray(row["stems"])[:, :n]
    for name, sig in [*zip(stems, x), ("mix", x.sum(0))]:
        buf = io.BytesIO()
        write_audio(buf, sig, sample_rate, "wav", "FLOAT")
        storage.write_bytes(storage.join(folder, f"{name}.wav"), buf.getvalue())
    return {"index": int(row["index"]), "seed": int(row["seed"]), "folder": folder,
            "peak": float(np.abs(x).max()), "rms": [float(v) for v in np.sqrt((x**2).mean(-1))]}
