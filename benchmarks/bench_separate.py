"""Separation benchmark: seconds of audio separated per wall-clock second by the Ray Data job
(decode/segment -> actor pool -> overlap-add/write) vs a plain in-process loop over the same
files, model, sampler and thread count, same run. Target on CPU: >= 0.9 of the plain loop per
model actor.

    python benchmarks/bench_separate.py [--config small --files 12 --seconds 60 --steps 40]
    python benchmarks/bench_separate.py --gpu-paper   # on a GPU: RTF of the paper preset, 150x2

The Ray job pays a fixed start-up (actor pool, model load, executor; ~10-15 s on 2 CPUs), so the
workload is long enough (12 min of stereo 44.1 kHz audio) for the steady state to show. Both
paths do the same work: stereo, full-band stems at 44.1 kHz (soft-mask channel split).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from msdm.audio import (
    RatePlan,
    SegmentPlan,
    extract_segment,
    overlap_add,
    read_audio,
    resample,
    write_audio,
)
from msdm.checkpoint import build_denoiser, load_checkpoint, save
from msdm.config import load_config
from msdm.stereo import mask_split
from pipelines.models import Separator


def plain_loop(ckpt: Path, files: list[Path], out: Path, batch: int) -> float:
    """Audio seconds per wall second, the same work as the job in one process: decode ->
    segments -> separate the mid -> soft-mask split of each channel -> overlap-add -> write."""
    cfg, _ = load_checkpoint(ckpt)
    separator = Separator(str(ckpt), cfg)
    total, t0 = 0.0, time.perf_counter()
    for f in files:
        x, sr = read_audio(f)
        plan = RatePlan.build(x.shape[-1], sr, sr, cfg.data.sample_rate, cfg.data.chunk_samples,
                              cfg.separation.margin, cfg.separation.overlap)
        windows, mixes = zip(*(plan.split(extract_segment(x, _in_plan(plan), j), True)
                               for j in range(plan.num_segments)))  # [C, seg_out], [C, N]
        c = x.shape[0]
        outs = []
        for i in range(0, len(mixes), batch):
            part = np.concatenate(mixes[i : i + batch])  # every channel, the segment's seed
            keys = [(f.stem, j) for j in range(i, i + len(part) // c) for _ in range(c)]
            est = separator(part, keys).reshape(-1, c, len(cfg.data.stems), part.shape[-1])
            for k, stems in enumerate(est.transpose(0, 2, 1, 3)):  # [S, C, N]
                up = resample(stems, cfg.data.sample_rate, sr)[..., : plan.out.segment]
                outs.append(mask_split(windows[i + k], up, sr, cfg.data.sample_rate,
                                       method="channels"))
        stems = overlap_add(outs, plan.out)  # [S, C, T]
        for k, s in enumerate(cfg.data.stems):
            write_audio(out / f"{f.stem}_{s}.wav", stems[k], sr)
        total += x.shape[-1] / sr
    return total / (time.perf_counter() - t0)


def _in_plan(plan: RatePlan) -> SegmentPlan:
    """Windows of the input with the plan's resampling padding (input rate = output rate)."""
    lo, hi = plan.in_span(0)
    return SegmentPlan(plan.frames, hi - lo, plan.out.margin + plan.pad, plan.out.overlap)


def gpu_paper() -> None:
    cfg = load_config("paper")
    path = Path(tempfile.mkdtemp()) / "paper.ckpt"
    save(path, cfg, build_denoiser(cfg))
    separator = Separator(str(path), cfg, num_gpus=1)
    mix = np.random.default_rng(0).standard_normal((1, cfg.data.chunk_samples)) * 0.1
    separator.cfg = load_config("paper", ["sampler.num_steps=2"])
    separator(mix, [("warm", 0)])
    separator.cfg = cfg
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    separator(mix, [("x", 0)])
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    audio = cfg.data.chunk_samples / cfg.data.sample_rate
    print(f"| paper preset, 150 x 2 = 300 NFE, bf16 | {dt:.1f} s per {audio:.1f} s chunk | "
          f"RTF {dt / audio:.2f} | {torch.cuda.get_device_name()} |")


def _compare(args, work: Path):
    """The plain loop and the Ray Data job on the same generated files in `work`."""
    (work / "in").mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.files):
        t = np.arange(int(args.seconds * 44100)) / 44100
        x = 0.2 * np.sin(2 * np.pi * (100 + 20 * i) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(work / "in" / f"s{i}.wav", np.stack([x, 0.7 * x]).T.astype(np.float32), 44100)
    cfg = load_config(args.config, [f"sampler.num_steps={args.steps}", "sampler.resamples=1"])
    torch.manual_seed(0)
    save(work / "m.ckpt", cfg, build_denoiser(cfg))
    files = sorted((work / "in").glob("*.wav"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one model actor = one CPU
    (work / "plain").mkdir()
    plain_loop(work / "m.ckpt", files[:1], work / "plain", args.batch_size)  # warm-up
    plain = plain_loop(work / "m.ckpt", files, work / "plain", args.batch_size)
    # the job's driver (reorder buffer, overlap-add, writers) runs as `python -m
    # pipelines.separate` runs it, with torch's default threads; the model actor gets one CPU
    # (Ray sets its OMP_NUM_THREADS=1). Until 2026-11-27 it inherited the 1 thread set above
    # (same code, 2-core box: 0.78-0.80 with it, 0.83 in two runs without; runs vary by ~0.05).
    torch.set_num_threads(threads)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    store = {"object_store_memory": int(args.object_store_mb * (1 << 20))} \
        if args.object_store_mb else {}
    ray.init(address="local", num_cpus=2, **store)
    from pipelines import separate

    common = ["--ckpt", str(work / "m.ckpt"), "--actors", "1", "--batch-size",
              str(args.batch_size), "--budget-mb", str(args.budget_mb)]
    separate.main(common + ["--input", str(files[0]), "--output", str(work / "warm")])
    t0 = time.perf_counter()
    separate.main(common + ["--input", str(work / "in"), "--output", str(work / "ray")])
    ours = args.files * args.seconds / (time.perf_counter() - t0)
    ray.shutdown()
    print(f"\nconfig {args.config}, {args.files} files x {args.seconds:g} s, "
          f"{args.steps} steps, batch {args.batch_size}, 1 model thread, driver threads "
          f"{threads}, stream budget {args.budget_mb or 'default'} MB, object store "
          f"{args.object_store_mb or 'default'} MB")
    print("\n| path | audio s per wall s | ratio |\n|---|---|---|")
    print(f"| plain in-process loop | {plain:.2f} | 1.00 |")
    print(f"| Ray Data job, 1 model actor (+ CPU stages) | {ours:.2f} | {ours / plain:.2f} |")
    print(f"\ntarget >= 0.9 per actor -> {'PASS' if ours / plain >= 0.9 else 'MISS'}")
    if not torch.cuda.is_available():
        print("no GPU here: run with --gpu-paper on a GPU machine for the paper preset RTF")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="small")
    ap.add_argument("--files", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--steps", type=int, default=40, help="sampler steps (x1 resample)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--budget-mb", type=float, default=0,
                    help="separate --budget-mb (default: the job's own)")
    ap.add_argument("--object-store-mb", type=float, default=0,
                    help="object store of the local cluster (default: Ray's, 30 %% of RAM)")
    ap.add_argument("--gpu-paper", action="store_true")
    args = ap.parse_args(argv)
    if args.gpu_paper:
        gpu_paper()
        return
    work = Path(tempfile.mkdtemp(prefix="bench-sep-"))
    try:
        return _compare(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # ~2 GB of audio and stems per run


if __name__ == "__main__":
    main()
