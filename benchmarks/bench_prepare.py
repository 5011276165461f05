"""Prepare benchmark: seconds of audio processed per CPU-second by the Ray Data prepare job vs
the bare limit (a plain loop doing only the soundfile decode + torchaudio resample of the same
stem files, one thread). Same files, same run. Target: ratio >= 0.7 on 2 cores.

    python benchmarks/bench_prepare.py [--tracks 64 --seconds 30 --cpus 2]

Ray Data has a fixed cost per execution (~1 s here), so the data set is large enough (32 min of
audio) for the steady-state rate to dominate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from msdm.audio import read_audio, resample, to_mono


def bare_loop(root: Path, sample_rate: int) -> tuple[float, float]:
    """(audio seconds, CPU seconds) of decode + mono + resample of every stem file."""
    torch.set_num_threads(1)
    seconds, t0 = 0.0, time.process_time()
    for track in sorted(root.glob("*/Track*")):
        length = 0
        for f in sorted((track / "stems").glob("*.flac")):
            x, sr = read_audio(f)
            resample(to_mono(x), sr, sample_rate)
            length = max(length, x.shape[-1] / sr)
        seconds += length
    return seconds, time.process_time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tracks", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prepare-"))
    root, out = work / "slakh", work / "prepared"
    if not root.exists():
        print(f"generating {args.tracks} songs x {args.seconds:g} s ...", flush=True)
        from pipelines import synth

        synth.main(["--output", str(root), "--tracks", str(args.tracks), "--seconds",
                    str(args.seconds), "--seed", "1", "--workers", str(args.cpus)])

    audio_s, cpu_s = bare_loop(root, 22050)
    bare = audio_s / cpu_s

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
    from pipelines import prepare

    prepare.main(["--input", str(root), "--output", str(out), "--config", "paper",
                  "--tracks-per-task", "4"])  # warm-up: worker start-up and imports
    t0 = time.perf_counter()
    report = prepare.main(["--input", str(root), "--output", str(out), "--config", "paper",
                           "--tracks-per-task", "4"])
    wall = time.perf_counter() - t0
    ray.shutdown()
    done = sum(s["seconds"] for s in report["splits"].values())
    ours = done / (wall * args.cpus)
    print("\n| path | audio s | CPU s | audio s per CPU-s | ratio to bare |")
    print("|---|---|---|---|---|")
    print(f"| bare decode+resample loop (1 thread) | {audio_s:.0f} | {cpu_s:.1f} | "
          f"{bare:.1f} | 1.00 |")
    print(f"| Ray Data prepare ({args.cpus} CPUs, wall x CPUs) | {done:.0f} | "
          f"{wall * args.cpus:.1f} | {ours:.1f} | {ours / bare:.2f} |")
    print(f"\ntarget: ratio >= 0.7 -> {'PASS' if ours / bare >= 0.7 else 'MISS'}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
