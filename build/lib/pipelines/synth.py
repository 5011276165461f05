"""Generate a Slakh2100-format multitrack data set of composed songs played by SoundFonts.

    python -m pipelines.synth --output data/synth --tracks 40 --seconds 24 --seed 0
    python -m pipelines.synth --output data/synth --tracks 40 --soundfont a.sf2 --soundfont b.sf2
    python -m pipelines.synth --output data/fast --tracks 8 --renderer additive   # unit tests

Each song is composed as General MIDI (pipelines/compose.py: eight styles, sections, every GM
program of bass, guitar and piano, eight drum kits, non-target instruments), then rendered by the
code of `pipelines.render`: exact Slakh layout OUTPUT/{train,validation,test}/TrackNNNNN/
{metadata.yaml, mix.flac, stems/SNN.flac, MIDI/SNN.mid, all_src.mid}, 44.1 kHz 16-bit FLAC.
`--renderer additive` writes the sine-partial songs of the first releases (no MIDI).
The embedded default data set of `make demo`. Runs on a local process pool (no Ray needed).
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor

from .common import cli, log
from .songs import RENDERERS, song_seed, track_folder, write_song


def _one(args):
    index, total, seconds, seed, root, renderer, fonts = args
    folder = track_folder(root, index, total)
    write_song(song_seed(seed, index), seconds, folder, renderer, fonts)
    return str(folder)


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", required=True, help="root folder of the generated tree")
    p.add_argument("--tracks", type=int, required=True, help="number of songs")
    p.add_argument("--seconds", type=float, default=12.0, help="length of each song")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--renderer", choices=RENDERERS, default="soundfont",
                   help="soundfont: composed MIDI played by SoundFonts (default); additive: "
                        "sine partials, no MIDI (fast unit tests)")
    p.add_argument("--soundfont", action="append", default=[], metavar="FILE",
                   help="SoundFont file, repeatable; each stem's is drawn with the song's seed "
                        "(default: the GM font in the pretty-midi wheel)")
    args = p.parse_args(argv)
    if args.tracks < 1 or args.seconds <= 0:
        p.error("--tracks must be >= 1 and --seconds > 0")
    fonts = tuple(args.soundfont) or ("default",)
    if args.renderer == "soundfont":
        from .render_stages import load_soundfonts
        from .soundfont import SoundFontError

        try:  # a missing synthesizer or a bad SoundFont: one clear line, before any work
            load_soundfonts(fonts)
        except SoundFontError as e:
            p.error(str(e))
    jobs = [(i, args.tracks, args.seconds, args.seed, args.output, args.renderer, fonts)
            for i in range(args.tracks)]
    log(f"synth: {args.tracks} songs x {args.seconds:g} s ({args.renderer}) -> {args.output}")
    done = []
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        for folder in pool.map(_one, jobs):
            done.append(folder)
            if len(done) % max(1, args.tracks // 10) == 0 or len(done) == args.tracks:
                log(f"  {len(done)}/{args.tracks} songs written")
    return done


if __name__ == "__main__":
    cli(main)
