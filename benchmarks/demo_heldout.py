"""Score `make demo`'s model and swept sampler on songs it never saw: another generator seed,
or real MIDI songs rendered by `pipelines.render`.

    python benchmarks/demo_heldout.py --demo demo_out --seed 4242 --output bench_out/heldout
    python benchmarks/demo_heldout.py --demo demo_out --midi MIDI_DIR --excerpt 12 --output OUT

The demo's own report scores its test songs (held out from training and from the sweep, but
drawn with the demo's seed). This check draws fresh songs with a seed of your choice, prepares
them with the checkpoint's settings and scores every one of them (all three splits: none was seen)
with the paper's protocol, using demo_out/runs/demo/model.ckpt and demo_out/sweeps/demo/best.yaml.
Prints the per-stem SI-SDRi table and writes OUTPUT/heldout.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STEMS = ("bass", "drums", "guitar", "piano", "all")


def job(name: str, *args: str) -> None:
    print(f"$ python -m pipelines.{name} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", f"pipelines.{name}", *args], check=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--demo", default="demo_out")
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--tracks", type=int, default=12)
    p.add_argument("--seconds", type=float, default=16)
    p.add_argument("--output", default="bench_out/heldout")
    p.add_argument("--renderer", default="soundfont", choices=("soundfont", "additive"))
    p.add_argument("--midi", default=None, help="score these MIDI files (rendered with the "
                   "default SoundFont) instead of generated songs")
    p.add_argument("--slakh", default=None, help="score this Slakh-format tree as it is")
    p.add_argument("--excerpt", type=float, default=0, metavar="SECONDS",
                   help="score one excerpt of each track, from 30 %% of its length on (whole "
                        "real songs take hours to score on 2 CPUs)")
    p.add_argument("--max-tracks", type=int, default=0, help="score the first N tracks only")
    p.add_argument("--sampler-config", default=None,
                   help="score with this sampler file instead of the demo's best.yaml (A/Bs of "
                        "models without the sweep's noise)")
    args = p.parse_args(argv)
    demo, out = Path(args.demo), Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, best = demo / "runs" / "demo" / "model.ckpt", demo / "sweeps" / "demo" / "best.yaml"
    best = Path(args.sampler_config) if args.sampler_config else best
    for f in (ckpt, best):
        if not f.exists():
            raise SystemExit(f"{f} is missing: run `make demo` first")
    slakh = Path(args.slakh) if args.slakh else out / "slakh"
    if args.midi:
        job("render", "--midi", args.midi, "--output", str(slakh), "--num-cpus", "2")
    elif not args.slakh:
        job("synth", "--output", str(slakh), "--tracks", str(args.tracks), "--seconds",
            str(args.seconds), "--seed", str(args.seed), "--workers", "2", "--renderer",
            args.renderer)
    if args.excerpt or args.max_tracks:
        from pipelines.tracks import excerpt_tree

        excerpt_tree(str(slakh), str(out / "excerpts"), args.excerpt, args.max_tracks)
        slakh = out / "excerpts"
    from msdm.checkpoint import load_checkpoint

    cfg, _ = load_checkpoint(ckpt)
    (out / "data.yaml").write_text(f"preset: demo\ndata:\n  sample_rate: {cfg.data.sample_rate}\n"
                                   f"  chunk_samples: {cfg.data.chunk_samples}\n")
    job("prepare", "--input", str(slakh), "--output", str(out / "prepared"), "--config",
        str(out / "data.yaml"), "--num-cpus", "2")
    results, windows = {}, {}
    for split in ("train", "validation", "test"):
        job("evaluate", "--ckpt", str(ckpt), "--data", str(out / "prepared"), "--split", split,
            "--output", str(out / split), "--sampler-config", str(best),
            "--skip-checkpoint-sampler", "--batch-size", "16", "--num-cpus", "2", "--threads", "2")
        res = json.loads((out / split / "results.json").read_text())
        results[split], windows[split] = res["si_sdri"], res["windows"]
    total = sum(windows.values())  # window-weighted mean over the splits = mean over all windows
    mean = {s: sum(results[k][s] * windows[k] for k in results) / total for s in STEMS}
    what = args.midi or args.slakh or f"seed {args.seed}, {args.tracks} x {args.seconds:g} s"
    print(f"\nheld-out songs ({what}, {total} windows), SI-SDRi in dB\n")
    print("| " + " | ".join(STEMS) + " |\n|" + "---|" * len(STEMS))
    print("| " + " | ".join(f"{mean[s]:.2f}" for s in STEMS) + " |")
    summary = {"songs": what, "windows": total, "si_sdri": mean,
               "per_split": results}
    (out / "heldout.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
