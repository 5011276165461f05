"""Training benchmark: step time of the Ray Train loop vs a plain single-process PyTorch loop
(same model, batch, data and thread count, same run), and the share of step time the Ray
worker spends waiting for data. Targets: overhead <= 10 %, data wait <= 5 %.

    python benchmarks/bench_train.py [--config small --steps 60 --tracks 12]
    python benchmarks/bench_train.py --gpu-paper   # on a GPU: paper preset samples/s in bf16
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from msdm.checkpoint import build_denoiser
from msdm.config import load_config
from msdm.data import batch_to_tensor
from msdm.training import make_ema, make_optimizer, train_step


def plain_loop(cfg, data: Path, steps: int, warmup: int) -> float:
    """Seconds per step of msdm.training.train_step over the same chunks, one process."""
    x_all = batch_to_tensor(pq.read_table(str(data / "train")), cfg.data.stems)
    torch.manual_seed(cfg.train.seed)
    den = build_denoiser(cfg)
    ema, opt = make_ema(den), make_optimizer(den, cfg)
    gen = torch.Generator().manual_seed(0)
    b = cfg.train.batch_size
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        j = (i * b) % max(1, x_all.shape[0] - b)
        train_step(den, x_all[j : j + b], opt, cfg, gen, ema)
    return (time.perf_counter() - t0) / steps


def gpu_paper(steps: int = 10) -> None:
    cfg = load_config("paper")
    dev = torch.device("cuda")
    den = build_denoiser(cfg).to(dev)
    opt = make_optimizer(den, cfg)
    x = torch.randn(cfg.train.batch_size, 4, cfg.data.chunk_samples, device=dev) * 0.2
    for i in range(steps + 2):
        if i == 2:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        train_step(den, x, opt, cfg)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    print(f"| paper preset, bf16, batch {cfg.train.batch_size} x 4 x {cfg.data.chunk_samples} | "
          f"{dt:.3f} s/step | {cfg.train.batch_size / dt:.2f} samples/s | "
          f"{torch.cuda.get_device_name()} | "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="small")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--tracks", type=int, default=12)
    ap.add_argument("--gpu-paper", action="store_true")
    args = ap.parse_args(argv)
    if args.gpu_paper:
        gpu_paper()
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        _bench(args, work)
    finally:  # the generated songs, Parquet chunks and checkpoints, once Ray stopped writing
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def _bench(args, work: Path) -> None:
    from pipelines.songs import generate_dataset

    generate_dataset(work / "slakh", args.tracks, 12.0, seed=2)
    import ray

    ray.init(address="local", num_cpus=2)
    from pipelines import prepare, train

    prepare.main(["--input", str(work / "slakh"), "--output", str(work / "prepared"),
                  "--config", args.config])
    cfg = load_config(args.config)
    warm = 10
    total = warm + args.steps
    over = ["--set", f"train.log_every={args.steps}", "--set", f"train.checkpoint_every={total}",
            "--set", f"train.val_every={total}", "--set", "train.val_chunks=4"]
    train.main(["--data", str(work / "prepared"), "--storage", str(work / "runs"), "--name", "b",
                "--config", args.config, "--max-steps", str(total), "--cpus-per-worker", "1",
                "--set", f"train.log_every={warm}"] + over[2:])
    rows = list(csv.DictReader(open(work / "runs" / "b" / "metrics.csv")))
    steady = [r for r in rows if int(r["step"]) > warm]
    ray_step = sum(cfg.train.batch_size / float(r["samples_per_s"]) * 1 for r in steady[-1:])
    wait = float(steady[-1]["data_wait"])
    ray.shutdown()
    torch.set_num_threads(1)  # the Ray worker holds 1 CPU -> 1 intra-op thread
    plain = plain_loop(cfg, work / "prepared", args.steps, warm)
    print(f"\nconfig {args.config}, batch {cfg.train.batch_size} x {len(cfg.data.stems)} x "
          f"{cfg.data.chunk_samples}, {args.steps} timed steps after {warm} warm-up, 1 thread")
    print("\n| loop | s/step | ratio | data wait |\n|---|---|---|---|")
    print(f"| plain PyTorch (in memory) | {plain:.4f} | 1.00 | - |")
    print(f"| Ray Train (1 worker, Ray Data ingest) | {ray_step:.4f} | {ray_step / plain:.2f} | "
          f"{100 * wait:.1f} % |")
    print(f"\ntargets: overhead <= 10 % -> {'PASS' if ray_step / plain <= 1.10 else 'MISS'}; "
          f"data wait <= 5 % -> {'PASS' if wait <= 0.05 else 'MISS'}")


if __name__ == "__main__":
    main()
