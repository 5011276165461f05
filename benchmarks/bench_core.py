"""Core benchmark: forward+backward time of the tiny and paper U-Nets on one chunk, and the
number of model evaluations (NFE) and wall time of each sampler setting.

    python benchmarks/bench_core.py            # CPU here; CUDA + bf16 when a GPU is present
    python benchmarks/bench_core.py --no-paper # skip the 405 M model
"""

from __future__ import annotations

import argparse
import time

import torch

import msdm
from msdm.checkpoint import build_denoiser
from msdm.config import get_preset
from msdm.model import count_parameters
from msdm.sampling import nfe
from msdm.training import autocast

SETTINGS = [  # (name, SamplerConfig kwargs)
    ("paper Dirac + correction", dict(num_steps=150, resamples=2)),
    ("paper Dirac, no correction", dict(num_steps=150, resamples=1)),
    ("Euler 75 x 1", dict(num_steps=75, resamples=1)),
    ("Heun 38 x 1", dict(num_steps=38, resamples=1, solver="heun")),
    ("Heun 20 x 1", dict(num_steps=20, resamples=1, solver="heun")),
]


def time_fwd_bwd(cfg, length, device, repeats):
    den = build_denoiser(cfg).to(device)
    x = torch.randn(1, 4, length, device=device)
    sigma = torch.full((1,), 0.1, device=device)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast(device):
            out = den(x, sigma)
        out.float().pow(2).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return count_parameters(den), min(times[1:])  # first call warms up


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--no-paper", action="store_true", help="skip the 405 M paper model")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    tiny = get_preset("tiny")
    rows = [("tiny", tiny, tiny.data.chunk_samples)]
    if not args.no_paper:
        paper = get_preset("paper")
        rows.append(("paper", paper, paper.data.chunk_samples))
    print("\n| model | params | chunk | fwd+bwd s | ratio to tiny |\n|---|---|---|---|---|")
    base = None
    for name, cfg, length in rows:
        n, t = time_fwd_bwd(cfg, length, device, 1 if name == "paper" else args.repeats)
        base = base or t
        print(f"| {name} | {n / 1e6:.2f} M | {length} | {t:.4f} | {t / base:.1f}x |", flush=True)

    den = build_denoiser(tiny).to(device).eval()
    mixture = torch.randn(1, 1, tiny.data.chunk_samples, device=device) * 0.1
    print("\n| sampler setting | NFE | NFE vs paper | wall s (tiny, 1 chunk) | ms per NFE |")
    print("|---|---|---|---|---|")
    ref = None
    for name, kw in SETTINGS:
        cfg = msdm.SamplerConfig(**kw)
        k = nfe(cfg)
        ref = ref or k
        t0 = time.perf_counter()
        msdm.separate(den, mixture, 4, cfg, generator=torch.Generator().manual_seed(0))
        wall = time.perf_counter() - t0
        print(f"| {name} | {k} | {k / ref:.2f} | {wall:.2f} | {1000 * wall / k:.2f} |", flush=True)


if __name__ == "__main__":
    main()
