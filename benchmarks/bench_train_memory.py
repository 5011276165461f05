"""Training data memory with a dataset larger than the object store (#17).

    python benchmarks/bench_train_memory.py [--songs 80 --seconds 16 --object-store-mb 100]

Generates songs, prepares them with the `tiny` preset, and runs the real training job
(`python -m pipelines.train`, its own 2-CPU local Ray cluster) twice for one epoch or more: on a
quarter of the train split and on all of it, with the object store capped at --object-store-mb
(RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION). The full split is >= 4x the object store, so it
streams from Parquet every epoch instead of being materialised. A sampler thread reads
/proc/PID/status of the job's whole process tree (driver, raylet, GCS, Train controller and
worker, Ray Data's SplitCoordinator and read tasks) every 50 ms. Prints the peak RSS of every
process kind and of the largest process for both runs: bounded means the 4x-larger dataset does
not raise them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import run_job  # noqa: E402

MB = 1 << 20


def job(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True, stdout=subprocess.DEVNULL)


def total_ram() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def subset(src: Path, dst: Path, fraction: float) -> None:
    """A prepared dataset whose train split keeps the first `fraction` of the Parquet files."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train"))
    files = sorted((src / "train").glob("*.parquet"))
    (dst / "train").mkdir()
    for f in files[: max(1, round(len(files) * fraction))]:
        shutil.copy(f, dst / "train" / f.name)


def split_bytes(root: Path) -> tuple[int, int]:
    files = list((root / "train").glob("*.parquet"))
    return sum(f.stat().st_size for f in files), sum(pq.ParquetFile(f).metadata.num_rows
                                                     for f in files)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--songs", type=int, default=80)
    ap.add_argument("--seconds", type=float, default=16)
    ap.add_argument("--object-store-mb", type=float, default=100)
    ap.add_argument("--epochs", type=float, default=1.2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-train-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    full = work / "prepared"
    if not (full / "_report.json").exists():
        print(f"generating {args.songs} songs x {args.seconds:g} s and preparing them (tiny)",
              flush=True)
        job("pipelines.synth", "--output", str(work / "slakh"), "--tracks", str(args.songs),
            "--seconds", str(args.seconds), "--workers", "2")
        job("pipelines.prepare", "--input", str(work / "slakh"), "--output", str(full),
            "--config", "tiny", "--num-cpus", "2")
    quarter = work / "prepared_quarter"
    if not quarter.exists():
        subset(full, quarter, 0.25)
    env = {**os.environ, "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION":
           f"{args.object_store_mb * MB / total_ram():.6f}"}
    from msdm.config import load_config

    batch = load_config("tiny").train.batch_size
    rows = []
    for name, data in (("quarter", quarter), ("full", full)):
        size, chunks = split_bytes(data)
        steps = max(10, int(args.epochs * chunks / batch))
        cmd = [sys.executable, "-m", "pipelines.train", "--data", str(data), "--storage",
               str(work / "runs"), "--name", f"{name}-{os.getpid()}", "--config", "tiny",
               "--num-cpus", "2", "--max-steps", str(steps), "--set",
               f"train.val_every={steps}", "--set", f"train.checkpoint_every={steps}",
               "--set", f"train.log_every={max(1, steps // 5)}"]
        print(f"{name}: train split {size / MB:.0f} MB ({size / MB / args.object_store_mb:.1f}x "
              f"the {args.object_store_mb:g} MB object store), {chunks} chunks, {steps} steps",
              flush=True)
        secs, peaks, total = run_job(cmd, env=env)
        kinds: dict[str, float] = {}
        for rss, _private, kind in peaks.values():
            kinds[kind] = max(kinds.get(kind, 0.0), rss)
        rows.append({"name": name, "mb": size / MB, "chunks": chunks, "steps": steps,
                     "seconds": secs, "tree_mb": total, "kinds": kinds})
        print(f"  {secs:.0f} s; largest process {max(kinds.values()):.0f} MB; tree {total:.0f} MB",
              flush=True)
    q, f = rows
    print(f"\nobject store {args.object_store_mb:g} MB; peak RSS in MB per process kind\n")
    print(f"| process | {q['mb']:.0f} MB split ({q['mb'] / args.object_store_mb:.1f}x store) | "
          f"{f['mb']:.0f} MB split ({f['mb'] / args.object_store_mb:.1f}x store) | growth |\n"
          "|---|---|---|---|")
    for kind in sorted(set(q["kinds"]) | set(f["kinds"]), key=lambda k: -f["kinds"].get(k, 0)):
        a, b = q["kinds"].get(kind, 0), f["kinds"].get(kind, 0)
        if max(a, b) >= 50:
            print(f"| {kind} | {a:.0f} | {b:.0f} | {100 * (b / a - 1) if a else 0:+.0f} % |")
    a, b = max(q["kinds"].values()), max(f["kinds"].values())
    print(f"| **largest process** | {a:.0f} | {b:.0f} | {100 * (b / a - 1):+.0f} % |")
    print(f"| whole tree | {q['tree_mb']:.0f} | {f['tree_mb']:.0f} | "
          f"{100 * (f['tree_mb'] / q['tree_mb'] - 1):+.0f} % |")
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    return {"rows": rows}


if __name__ == "__main__":
    main()
