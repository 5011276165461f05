"""Peak memory of `pipelines.separate` against track length, for every process of the job.

    python benchmarks/bench_memory.py [--minutes 4,32 --config small --steps 1]

For each length, writes a stereo 44.1 kHz PCM_16 file (block by block), then runs the real job
(`python -m pipelines.separate`, its own 2-CPU local Ray cluster, default flags: stereo,
full-band stems at the input's rate) with an untrained checkpoint of --config and --steps sampler
steps (memory does not depend on the weights or the step count). A sampler thread reads
/proc/PID/status of the job's whole process tree (driver, raylet, GCS, every Ray worker) every
50 ms. Prints, per length: wall time, the largest process's peak RSS and peak RSS minus shared
pages (the object store is one shared mapping, bounded by its size), the sum over the tree, and
the growth from the first length to each other. Goal (#14): the largest process grows <= 25 %
from 4 to 32 minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from msdm.checkpoint import build_denoiser, save
from msdm.config import load_config
from pipelines.common import rss_mb

SR = 44100


def write_song(path: Path, seconds: float) -> None:
    """Stereo test music (two tones with vibrato, noise bursts) written 10 s at a time."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", SR, 2, "PCM_16") as f:
        for i in range(int(np.ceil(seconds / 10))):
            t = 10 * i + np.arange(int(min(10, seconds - 10 * i) * SR)) / SR
            x = 0.2 * np.sin(2 * np.pi * (110 + 2 * np.sin(t)) * t)
            y = 0.1 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t)) * (
                np.sin(2 * np.pi * 2 * t) > 0.8)
            f.write(np.stack([x + y, 0.7 * x + 0.3 * y], 1).astype(np.float32))


def tree(root: int) -> list[int]:
    """root and all of its descendants (by /proc/PID/stat parent ids)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return out


def name(pid: int) -> str:
    """`ray::Actor`, `-m module` or the script's file name of a process."""
    try:
        args = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        return str(pid)
    if args[0].startswith("ray::"):
        return args[0].split()[0]
    if "-m" in args[:-1]:
        return "-m " + args[args.index("-m") + 1]
    script = next((a for a in args[1:] if a.endswith(".py")), args[0])
    return os.path.basename(script)


def run_job(cmd: list[str], env: dict | None = None) -> tuple[float, dict, float]:
    """(seconds, {pid: [peak RSS, peak RSS - shared, name]}, peak of the tree's summed RSS)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    peaks: dict[int, list] = {}
    total = [0.0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            now = 0.0
            for pid in tree(proc.pid):
                r, p = rss_mb(pid)
                now += r
                old = peaks.setdefault(pid, [0.0, 0.0, ""])
                old[0], old[1] = max(old[0], r), max(old[1], p)
                if old[2] == "ray::IDLE" or not old[2].startswith("ray::"):
                    old[2] = name(pid)  # a worker renames itself when it takes a task
            total[0] = max(total[0], now)
            stop.wait(0.05)

    t0 = time.time()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    stop.set()
    thread.join()
    if proc.returncode:
        sys.exit(f"separate failed ({proc.returncode}):\n{err[-3000:]}")
    return time.time() - t0, peaks, total[0]


def _measure(args, work: Path):
    """One separate job per track length, files in `work`; prints the table."""
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    ckpt = work / "model.ckpt"
    save(ckpt, cfg, build_denoiser(cfg))
    rows = []
    for minutes in [float(m) for m in args.minutes.split(",")]:
        path = work / "in" / f"{minutes:g}min.wav"
        path.parent.mkdir(exist_ok=True)
        write_song(path, 60 * minutes)
        cmd = [sys.executable, "-m", "pipelines.separate", "--ckpt", str(ckpt), "--input",
               str(path), "--output", str(work / "out" / f"{minutes:g}"), "--num-cpus", "2",
               "--set", f"sampler.num_steps={args.steps}", "--budget-mb", str(args.budget_mb),
               "--object-store-mb", str(args.object_store_mb)]
        print(f"{minutes:g} min: {' '.join(cmd[1:])}", flush=True)
        secs, peaks, total = run_job(cmd)
        top = max(peaks.values(), key=lambda v: v[0])
        top_private = max(peaks.values(), key=lambda v: v[1])
        rows.append({"minutes": minutes, "seconds": secs, "largest_rss_mb": top[0],
                     "largest_rss_name": top[2], "largest_private_mb": top_private[1],
                     "largest_private_name": top_private[2], "tree_rss_mb": total,
                     "processes": len(peaks)})
        print(f"  {secs:.0f} s, {len(peaks)} processes; largest RSS {top[0]:.0f} MB "
              f"({top[2]}); largest RSS - shared {top_private[1]:.0f} MB ({top_private[2]}); "
              f"tree {total:.0f} MB", flush=True)
    base = rows[0]
    print(f"\n`{args.config}` model, {args.steps} sampler step(s), stereo 44.1 kHz input, "
          f"stream budget {args.budget_mb or 'default'} MB, object store "
          f"{args.object_store_mb or 'default'} MB\n")
    print("| track | wall s | largest process RSS MB | growth | largest RSS - shared MB | "
          "growth | process tree RSS MB | growth |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = [r[k] / base[k] - 1
             for k in ("largest_rss_mb", "largest_private_mb", "tree_rss_mb")]
        print(f"| {r['minutes']:g} min | {r['seconds']:.0f} | {r['largest_rss_mb']:.0f} | "
              f"{100 * g[0]:+.0f} % | {r['largest_private_mb']:.0f} | {100 * g[1]:+.0f} % | "
              f"{r['tree_rss_mb']:.0f} | {100 * g[2]:+.0f} % |")
    return {"rows": rows}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", default="4,32", help="comma-separated track lengths")
    ap.add_argument("--config", default="small")
    ap.add_argument("--steps", type=int, default=1, help="sampler steps")
    ap.add_argument("--budget-mb", type=float, default=0,
                    help="separate --budget-mb (default: the job's own)")
    ap.add_argument("--object-store-mb", type=float, default=0,
                    help="separate --object-store-mb (default: the job's own, 2x the budget)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        return _measure(args, work)
    finally:
        if not args.out:  # 3 GB of audio and stems per run
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
