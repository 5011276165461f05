"""Training-data memory against dataset size, for every process of the train job (#17).

    python benchmarks/bench_train_memory.py [--store-mb 96 --songs 180]

Generates --songs Slakh-format songs of 20 s and prepares them with the `small` preset (the
train split is then >= 4x the object store), plus a copy of the same data with a quarter of
the train shards. Then runs the real job (`python -m pipelines.train`, its own 2-CPU local Ray
cluster with a --store-mb object store, so the train split streams from Parquet every epoch
instead of being materialised) for the same number of steps on each: a bit more than one
epoch of the full split, four of the quarter. A sampler thread reads /proc/PID/status of the
job's whole process tree every 50 ms (benchmarks/bench_memory.py). Prints, per dataset: its
size against the store, every process's peak RSS and the growth from quarter to full. Bounded
means no process grows with the dataset.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import run_job  # noqa: E402


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.parquet")) / (1 << 20)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--songs", type=int, default=180)
    ap.add_argument("--store-mb", type=float, default=96)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-train-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    full = work / "full"
    if not full.exists():
        py = [sys.executable, "-m"]
        subprocess.run([*py, "pipelines.synth", "--output", str(work / "slakh"), "--tracks",
                        str(args.songs), "--seconds", "20", "--seed", "77"], check=True)
        subprocess.run([*py, "pipelines.prepare", "--input", str(work / "slakh"), "--output",
                        str(full), "--config", "small"], check=True)
    quarter = work / "quarter"
    if not quarter.exists():
        shutil.copytree(full / "validation", quarter / "validation")
        shards = sorted((full / "train").glob("*.parquet"))
        (quarter / "train").mkdir(parents=True)
        for f in shards[: max(1, len(shards) // 4)]:
            shutil.copy(f, quarter / "train" / f.name)
    n_shards = sum(1 for _ in (full / "train").glob("*.parquet"))
    import pyarrow.parquet as pq

    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (full / "train").glob("*.parquet"))
    steps = int(1.2 * rows / 8)  # batch 8: a bit more than one epoch of the full split
    results = {}
    for name, data in (("quarter", quarter), ("full", full)):
        cmd = [sys.executable, "-m", "pipelines.train", "--data", str(data), "--storage",
               str(work / "runs"), "--name", name, "--config", "small", "--max-steps",
               str(steps), "--object-store-mb", str(args.store_mb), "--num-cpus", "2",
               "--set", f"train.checkpoint_every={steps}", "--set", f"train.val_every={steps}"]
        shutil.rmtree(work / "runs" / name, ignore_errors=True)
        print(f"{name}: {size_mb(data / 'train'):.0f} MB train split; {' '.join(cmd[1:])}",
              flush=True)
        secs, peaks, total = run_job(cmd)
        byname: dict[str, float] = {}
        for rss, _, proc in peaks.values():
            byname[proc] = max(byname.get(proc, 0.0), rss)
        results[name] = {"seconds": secs, "train_mb": size_mb(data / "train"),
                         "tree_mb": total, "processes": byname}
    q, f = results["quarter"], results["full"]
    print(f"\n{n_shards} train shards, {rows} chunks; {steps} steps of batch 8 on each; object "
          f"store {args.store_mb:g} MB; full split = {f['train_mb'] / args.store_mb:.1f}x the "
          "store\n")
    print(f"| process (peak RSS MB) | quarter ({q['train_mb']:.0f} MB) | full "
          f"({f['train_mb']:.0f} MB) | growth |\n|---|---|---|---|")
    for proc in sorted(set(q["processes"]) | set(f["processes"]),
                       key=lambda p: -f["processes"].get(p, 0.0)):
        a, b = q["processes"].get(proc, 0.0), f["processes"].get(proc, 0.0)
        if max(a, b) >= 50:  # skip short-lived helpers
            print(f"| {proc} | {a:.0f} | {b:.0f} | {100 * (b / a - 1) if a else 0:+.0f} % |")
    print(f"| whole tree (summed) | {q['tree_mb']:.0f} | {f['tree_mb']:.0f} | "
          f"{100 * (f['tree_mb'] / q['tree_mb'] - 1):+.0f} % |")
    print(f"\nwall time: quarter {q['seconds']:.0f} s, full {f['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
