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
    ap.add_argument("--double", action="store_true",
                    help="also a split of twice the full one (its shards copied twice), ~8x "
                         "the store, trained for the same steps")
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
    sets = [("quarter", quarter), ("full", full)]
    if args.double:
        double = work / "double"
        if not double.exists():
            shutil.copytree(full / "validation", double / "validation")
            (double / "train").mkdir(parents=True)
            for f in sorted((full / "train").glob("*.parquet")):
                for copy in ("a", "b"):
                    shutil.copy(f, double / "train" / f"{copy}-{f.name}")
        sets.append(("double", double))
    n_shards = sum(1 for _ in (full / "train").glob("*.parquet"))
    import pyarrow.parquet as pq

    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (full / "train").glob("*.parquet"))
    steps = int(1.2 * rows / 8)  # batch 8: a bit more than one epoch of the full split
    results = {}
    for name, data in sets:
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
    f = results["full"]
    print(f"\n{n_shards} train shards, {rows} chunks; {steps} steps of batch 8 on each; object "
          f"store {args.store_mb:g} MB; full split = {f['train_mb'] / args.store_mb:.1f}x the "
          "store\n")
    names = [n for n, _ in sets]
    print("| process (peak RSS MB) | " + " | ".join(
        f"{n} ({results[n]['train_mb']:.0f} MB, {results[n]['train_mb'] / args.store_mb:.1f}x "
        "store)" for n in names) + " | growth from quarter |\n|" + "---|" * (len(names) + 2))
    last = results[names[-1]]
    for proc in sorted(set().union(*(results[n]["processes"] for n in names)),
                       key=lambda p: -last["processes"].get(p, 0.0)):
        vals = [results[n]["processes"].get(proc, 0.0) for n in names]
        if max(vals) >= 50:  # skip short-lived helpers
            growth = ", ".join(f"{100 * (v / vals[0] - 1):+.0f} %" if vals[0] else "-"
                               for v in vals[1:])
            print(f"| {proc} | " + " | ".join(f"{v:.0f}" for v in vals) + f" | {growth} |")
    top = [max(results[n]["processes"].values()) for n in names]  # names vary, sizes do not
    print("| largest process | " + " | ".join(f"{v:.0f}" for v in top) + " | " +
          ", ".join(f"{100 * (v / top[0] - 1):+.0f} %" for v in top[1:]) + " |")
    tree = [results[n]["tree_mb"] for n in names]
    print("| whole tree (summed) | " + " | ".join(f"{v:.0f}" for v in tree) + " | " +
          ", ".join(f"{100 * (v / tree[0] - 1):+.0f} %" for v in tree[1:]) + " |")
    print("\nwall time: " + ", ".join(f"{n} {results[n]['seconds']:.0f} s" for n in names))
    return results


if __name__ == "__main__":
    main()
