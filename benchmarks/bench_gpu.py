"""GPU benchmark of the `paper` preset: training samples/s and MFU, and separation real-time
factor at 300 NFE (the paper's sampler) and with a swept cheap sampler. Needs a CUDA device;
prints a markdown table with the card's name. Baselines in the same run: fp32 vs bf16 training.

    python benchmarks/bench_gpu.py                  # paper preset, batch 8, bf16 autocast
    python benchmarks/bench_gpu.py --batch 4 --steps 20 --swept-steps 40

MFU uses the U-Net's forward FLOPs counted by torch's FlopCounterMode (x3 for forward +
backward) against the card's dense bf16 peak (--peak-tflops, default 989 for an H100 SXM).
Target: RTF <= 0.05 on an H100 at 300 NFE (the paper reports 0.38 on an RTX A6000).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from msdm.checkpoint import build_denoiser
from msdm.config import load_config
from msdm.sampling import nfe
from msdm.tasks import separate
from msdm.training import autocast, make_ema, make_optimizer, train_step


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up (cuDNN autotuning, allocator)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def training(cfg, batch: int, steps: int, bf16: bool) -> tuple[float, float]:
    """(samples per second, forward FLOPs per sample) of msdm.training.train_step."""
    cfg = load_config(cfg.to_dict(), {"train.bf16": bf16, "train.batch_size": batch})
    den = build_denoiser(cfg).cuda()
    opt, ema = make_optimizer(den, cfg), make_ema(den)
    x = torch.randn(batch, 4, cfg.data.chunk_samples, device="cuda") * 0.1
    with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast(x.device, bf16):
        den(x[:1], torch.full((1,), 0.1, device="cuda"))
    step = {"n": 0}

    def one():
        train_step(den, x, opt, cfg, ema=ema, step=step["n"])
        step["n"] += 1

    seconds = _timed(one, steps)
    return batch / seconds, float(counter.get_total_flops())


def separation_rtf(cfg, steps: int, resamples: int) -> tuple[float, int]:
    """(seconds of compute per second of audio for one chunk in bf16 autocast, NFE)."""
    den = build_denoiser(cfg).cuda().eval()
    sampler = load_config(cfg.to_dict(), [f"sampler.num_steps={steps}",
                                          f"sampler.resamples={resamples}"]).sampler
    mix = torch.randn(1, 1, cfg.data.chunk_samples, device="cuda") * 0.1

    def one():
        with autocast(mix.device):
            separate(den, mix, 4, sampler, generator=torch.Generator(device="cuda").manual_seed(0))

    return _timed(one, 1) / (cfg.data.chunk_samples / cfg.data.sample_rate), nfe(sampler)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--swept-steps", type=int, default=40, help="Euler steps x 1 (swept sampler)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = load_config("paper")
    name = torch.cuda.get_device_name()
    rows = []
    for bf16 in (False, True):
        sps, flops = training(cfg, args.batch, args.steps, bf16)
        mfu = 3 * flops * sps / (args.peak_tflops * 1e12)
        rows.append((f"train, batch {args.batch}, {'bf16' if bf16 else 'fp32/TF32'}",
                     f"{sps:.2f} samples/s", f"MFU {100 * mfu:.1f} %"))
    for label, steps, r in (("paper sampler 150 x 2", 150, 2),
                            (f"swept Euler {args.swept_steps} x 1", args.swept_steps, 1)):
        rtf, k = separation_rtf(cfg, steps, r)
        rows.append((f"separate, {label}", f"NFE {k}", f"RTF {rtf:.3f}"))
    print(f"\n{name}, paper preset (405.5 M parameters), chunk {cfg.data.chunk_samples} samples\n")
    print("| measurement | value | |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
