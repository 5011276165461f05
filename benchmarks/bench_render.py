"""Render benchmark: rendered audio-seconds per CPU-second of the Ray Data render job against a
plain in-process loop over the same files, and the driver's memory against the number of files.

    python benchmarks/bench_render.py [--songs 48 --seconds 60 --cpus 2]
    python benchmarks/bench_render.py --midi ~/lmd_subset       # your MIDI files

1. Throughput: the loop reads each file, renders it (`rendering.render_track`) and writes the
   track folder, one process; the job (`pipelines.render`, local Ray with --cpus, started and
   warmed up before the clock) does the same work plus listing, hashing, sorting and numbering.
   The job's CPU-seconds are wall x CPUs. Target: job / loop >= 0.9. Two more rows tell the
   cost apart: the same loop in --cpus plain processes (what this machine's CPUs give in
   parallel, before any scheduler) and the CPU spent inside the job's render tasks.
2. Memory: the driver's peak of Python allocations while the job lists, hashes, sorts and numbers
   trees of --small and --large tiny files (16 folders, like Lakh's lmd_full; both above the
   driver's batch of 1024 sorted rows). Flat = the same peak for 10x the files: the listing
   streams through the cluster, never into a driver list.
By default the MIDI files are composed songs (`pipelines.compose`, 4-8 instruments); real files
usually have more instruments, each rendered alone, so their rate per audio-second is lower.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

LAKH_FILES = 176_581  # lmd_full
LAKH_MEAN_SECONDS = 220.0  # an assumption (not measured here): ~3.7 min per Lakh MIDI file


def composed(folder: Path, songs: int, seconds: float) -> Path:
    from pipelines.compose import compose

    for i in range(songs):
        sub = folder / f"{i % 16:x}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"song{i:04d}.mid").write_bytes(compose(9000 + i, seconds))
    return folder


def midi_files(midi: Path) -> list[str]:
    """The files the job would list (its extensions, any case), in sorted order."""
    from pipelines.render_stages import MIDI_EXTENSIONS

    return sorted(str(f) for f in midi.rglob("*") if f.name.lower().endswith(MIDI_EXTENSIONS))


def _render_files(files: list[str], out: str, sample_rate: int) -> float:
    """Read, render and write `files` into `out`/TrackNNNNN; the audio seconds."""
    from pipelines.render_stages import load_soundfonts
    from pipelines.rendering import render_track, write_track

    fonts, audio = load_soundfonts(["default"]), 0.0
    for i, f in enumerate(files):
        try:
            r = render_track(Path(f).read_bytes(), Path(f).name, fonts, sample_rate=sample_rate)
        except ValueError:  # a bad file costs its parse, as in the job
            continue
        write_track(r, str(Path(out) / f"Track{i:05d}"))
        audio += r.seconds
    return audio


def loop(files: list[str], out: Path, sample_rate: int) -> tuple[float, float]:
    """(audio seconds, CPU seconds) of read + render + write, one process."""
    t0 = time.process_time()
    audio = _render_files(files, str(out), sample_rate)
    return audio, time.process_time() - t0


def parallel_loop(files: list[str], out: Path, sample_rate: int,
                  procs: int) -> tuple[float, float]:
    """(audio seconds, wall x procs) of the same loop in `procs` plain processes (no Ray): what
    this machine's CPUs give in parallel, before any scheduler."""
    from concurrent.futures import ProcessPoolExecutor

    shares = [files[k::procs] for k in range(procs)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(procs) as pool:
        audio = sum(pool.map(_render_files, shares, [str(out / f"p{k}") for k in range(procs)],
                             [sample_rate] * procs))
    return audio, (time.perf_counter() - t0) * procs


def driver_peak_mb(ray, files: int, work: Path) -> float:
    """Peak traced Python memory of the driver while numbering a tree of `files` tiny files."""
    from pipelines import render

    root = work / f"tiny{files}"
    for i in range(files):
        sub = root / f"{i % 16:x}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:07d}.mid").write_bytes(b"MThd" + i.to_bytes(8, "little"))
    args = render.build_parser().parse_args(["--midi", str(root), "--output", str(work / "o")])
    tracemalloc.start()
    numbering = render.number_tracks(ray, args, str(work / f"index{files}"))
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert numbering.files == files
    shutil.rmtree(root, ignore_errors=True)
    return peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--songs", type=int, default=48)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--midi", default=None, help="render these files instead of composed songs")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--sample-rate", type=int, default=44100)
    ap.add_argument("--small", type=int, default=4000,
                    help="files in the small tree (above the driver's batch of 1024 rows)")
    ap.add_argument("--large", type=int, default=40000)
    ap.add_argument("--tracks-per-task", type=int, default=None,
                    help="the job's --tracks-per-task (default: the job's default)")
    ap.add_argument("--task-cpus", type=float, default=None,
                    help="the job's --task-cpus (default: the job's default)")
    ap.add_argument("--skip-memory", action="store_true", help="throughput only")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-render-"))
    try:
        midi = Path(args.midi) if args.midi else composed(work / "midi", args.songs,
                                                           args.seconds)
        files = midi_files(midi)
        audio_loop, cpu_loop = loop(files, work / "loop", args.sample_rate)
        base = audio_loop / cpu_loop
        audio_par, cpu_par = parallel_loop(files, work / "loop-par", args.sample_rate, args.cpus)

        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
        from pipelines import render

        warm = work / "warm"
        composed(warm, 2, 4.0)
        render.main(["--midi", str(warm), "--output", str(work / "warm-out")])
        t0 = time.perf_counter()
        job_options = [a for flag, value in (("--tracks-per-task", args.tracks_per_task),
                                             ("--task-cpus", args.task_cpus))
                       if value is not None for a in (flag, str(value))]
        report = render.main(["--midi", str(midi), "--output", str(work / "job"),
                              "--sample-rate", str(args.sample_rate), *job_options])
        wall = time.perf_counter() - t0
        audio_job = report["audio_hours"] * 3600
        ours = audio_job / (wall * args.cpus)
        worker = audio_job / report["render_cpu_seconds"]
        small, large = (0.0, 0.0) if args.skip_memory else (
            driver_peak_mb(ray, n, work) for n in (args.small, args.large))
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'composed songs' if not args.midi else args.midi}: {report['tracks']} tracks, "
          f"{audio_job / 60:.1f} min of audio at {args.sample_rate} Hz\n")
    print("| path | audio s | CPU s | audio s per CPU-s | ratio to loop |")
    print("|---|---|---|---|---|")
    print(f"| in-process loop (read, render, write; 1 process) | {audio_loop:.0f} | "
          f"{cpu_loop:.1f} | {base:.1f} | 1.00 |")
    print(f"| the same loop in {args.cpus} processes (no Ray; wall x {args.cpus}) | "
          f"{audio_par:.0f} | {cpu_par:.1f} | {audio_par / cpu_par:.1f} | "
          f"{audio_par / cpu_par / base:.2f} |")
    print(f"| pipelines.render ({args.cpus} CPUs, wall x CPUs) | {audio_job:.0f} | "
          f"{wall * args.cpus:.1f} | {ours:.1f} | {ours / base:.2f} |")
    print(f"| pipelines.render, CPU inside its render tasks | {audio_job:.0f} | "
          f"{report['render_cpu_seconds']:.1f} | {worker:.1f} | {worker / base:.2f} |")
    print(f"| pipelines.render, wall inside its render tasks (sum) | {audio_job:.0f} | "
          f"{report['render_task_seconds']:.1f} | "
          f"{audio_job / report['render_task_seconds']:.1f} | "
          f"{audio_job / report['render_task_seconds'] / base:.2f} |")
    print(f"\ntarget: job / loop >= 0.9 -> {'PASS' if ours / base >= 0.9 else 'MISS'} "
          f"({ours / base:.2f}); job / {args.cpus}-process loop (this machine's parallel "
          f"throughput): {ours / (audio_par / cpu_par):.2f}")
    hours = LAKH_FILES * LAKH_MEAN_SECONDS / ours / 3600
    print(f"\nLakh MIDI bill at this rate: {LAKH_FILES} files x {LAKH_MEAN_SECONDS:.0f} s "
          f"(assumed mean) / {ours:.1f} audio-s per CPU-s = {hours:.0f} CPU-hours "
          f"({hours / 64:.1f} h on 64 CPUs)")
    if args.skip_memory:
        return
    print("\n| files listed, hashed, sorted, numbered | driver peak (MB, traced) |\n|---|---|")
    print(f"| {args.small} | {small:.1f} |\n| {args.large} | {large:.1f} |")
    slope = (large - small) * 2**20 / max(args.large - args.small, 1)
    print(f"\nflat: {'PASS' if large < 1.5 * small + 1 else 'MISS'} ({large / max(small, 1e-9):.2f}"
          f"x the peak for {args.large / args.small:.0f}x the files; {slope:.0f} bytes per extra "
          f"file, where a list of the paths alone would hold ~150)")


if __name__ == "__main__":
    main()
