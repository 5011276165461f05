"""Generate a Slakh2100-format multitrack data set of musically coherent synthetic songs.

    python -m pipelines.synth --output data/synth --tracks 40 --seconds 24 --seed 0

Exact Slakh layout: OUTPUT/{train,validation,test}/TrackNNNNN/{metadata.yaml, mix.flac,
stems/SNN.flac}, 44.1 kHz FLAC. The embedded default data set of `make demo` and the tests.
Runs on a local process pool (no Ray needed); --workers 1 for a single process.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor

from .common import cli, log
from .songs import make_song, song_seed, track_folder, write_track


def _one(args):
    index, total, seconds, seed, root = args
    folder = track_folder(root, index, total)
    write_track(make_song(song_seed(seed, index), seconds), folder)
    return str(folder)


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", required=True, help="root folder of the generated tree")
    p.add_argument("--tracks", type=int, required=True, help="number of songs")
    p.add_argument("--seconds", type=float, default=12.0, help="length of each song")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = p.parse_args(argv)
    if args.tracks < 1 or args.seconds <= 0:
        p.error("--tracks must be >= 1 and --seconds > 0")
    jobs = [(i, args.tracks, args.seconds, args.seed, args.output) for i in range(args.tracks)]
    log(f"synth: {args.tracks} songs x {args.seconds:g} s -> {args.output}")
    done = []
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        for folder in pool.map(_one, jobs):
            done.append(folder)
            if len(done) % max(1, args.tracks // 10) == 0 or len(done) == args.tracks:
                log(f"  {len(done)}/{args.tracks} songs written")
    return done


if __name__ == "__main__":
    cli(main)
