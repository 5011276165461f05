"""Separate a catalog of mixtures into stems with a trained checkpoint (Ray Data batch job).

    python -m pipelines.separate --ckpt runs/r1/model.ckpt --input music/ --output stems/
    python -m pipelines.separate --ckpt s3://bkt/runs/r1/model.ckpt --input 's3://bkt/in/*.flac' \
        --output s3://bkt/stems --format flac --actors 8 --gpus-per-actor 1 --batch-size 16
    ray job submit --working-dir . -- python -m pipelines.separate --ckpt s3://... --input ...

--input is a folder (recursive), a glob, a .txt/.jsonl manifest or one file; any format soundfile
decodes, any rate, mono or stereo (downmixed). Tracks are cut into segments with context margins,
separated on an actor pool, cross-faded back and written as OUTPUT/{track}/{stem}.{ext}, plus
OUTPUT/_manifest.jsonl (status ok / failed / skipped per input). A re-run skips finished tracks;
files are written then renamed, so a partial output never appears. Bad files are reported, not
fatal. Work runs in waves of --wave-size tracks, so a crash loses at most one wave.
"""

from __future__ import annotations

import json
import sys
import time

from . import storage
from .catalog import (
    ManifestWriter,
    check_template,
    existing_files,
    list_inputs,
    output_paths,
    read_manifest,
)
from .common import (
    add_init,
    ckpt_uris,
    dry_run,
    init_ray,
    log,
    parse_ckpt,
    parser,
    resolve_config,
)
from .models import load_model, separation_nfe
from .segments import SeparateSegments, assemble_track, decode_segments

SUBTYPES = ("PCM_16", "PCM_24", "FLOAT")


def build_parser():
    p = parser(__doc__)
    p.add_argument("--ckpt", action="append", required=True, help="model.ckpt, or STEM=URI")
    p.add_argument("--input", required=True, help="folder, glob, .txt/.jsonl manifest or file")
    p.add_argument("--output", required=True)
    p.add_argument("--sampler-config", default=None, help="YAML of sampler keys (best.yaml)")
    p.add_argument("--format", choices=("wav", "flac"), default="wav")
    p.add_argument("--subtype", choices=SUBTYPES, default=None,
                   help="sample format (default: FLOAT for wav, PCM_24 for flac)")
    p.add_argument("--filename", default="{track}/{stem}.{ext}",
                   help="output name template: {track} {key} {parent} {stem} {ext}")
    p.add_argument("--sample-rate", default="original",
                   help="'original' (the input's rate) or a rate in Hz for the stems")
    p.add_argument("--actors", type=int, default=1, help="model replicas")
    p.add_argument("--gpus-per-actor", type=float, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="segments per model call")
    p.add_argument("--wave-size", type=int, default=64, help="tracks per wave (resume unit)")
    add_init(p)
    return p


def _options(args):
    subtype = args.subtype or ("FLOAT" if args.format == "wav" else "PCM_24")
    if args.format == "flac" and subtype == "FLOAT":
        sys.exit("--format flac cannot store FLOAT samples; use --subtype PCM_16 or PCM_24")
    if args.sample_rate != "original" and not (args.sample_rate.isdigit()
                                               and int(args.sample_rate) > 0):
        sys.exit("--sample-rate must be 'original' or a positive integer rate in Hz")
    try:
        check_template(args.filename)
    except ValueError as e:
        sys.exit(str(e))
    return subtype


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    subtype = _options(args)
    ckpt = parse_ckpt(args.ckpt)
    base, _ = load_model(ckpt)  # a bad checkpoint fails here, before Ray starts
    cfg = resolve_config(args, base, [args.sampler_config] if args.sampler_config else [])
    items = list_inputs(args.input)
    if dry_run(cfg, args, {"inputs": len(items), "subtype": subtype}):
        return {}
    if not items:
        sys.exit(f"no audio files found at {args.input}")
    _check_names(items, cfg.data.stems, args)
    storage.check_writable(args.output)
    manifest, problems = read_manifest(args.output)
    for p in problems:
        log(f"manifest: {p}")
    writer, have = ManifestWriter(args.output), existing_files(args.output)
    todo, done_rows = [], []
    for it in items:
        try:
            paths = output_paths(it, cfg.data.stems, args.output, args.filename, args.format)
        except ValueError as e:
            done_rows.append({"input": it["input"], "key": it["key"], "status": "failed",
                              "error": str(e), "outputs": {}, "time": time.time()})
            continue
        if all(storage.get_fs(p)[1] in have for p in paths.values()):
            old = manifest.get(it["input"], {})
            done_rows.append({**old, "input": it["input"], "key": it["key"], "outputs": paths,
                              "status": "skipped", "error": "", "time": time.time()})
        else:
            todo.append(it)
    writer.append(done_rows)
    log(f"separate: {len(items)} inputs, {len(items) - len(todo)} settled, {len(todo)} to do "
        f"-> {args.output} (NFE per segment {separation_nfe(cfg)}, {args.actors} actor(s))")
    ray = init_ray(args, [args.input, args.output, *ckpt_uris(ckpt)]) if todo else None
    t0, rows = time.time(), list(done_rows)
    for w in range(0, len(todo), args.wave_size):
        wave = _run_wave(ray, args, ckpt, cfg, subtype, todo[w : w + args.wave_size])
        writer.append(wave)  # one new part per wave: a crash loses at most one wave
        rows += wave
        for row in wave:
            log(f"  {row['status']:<6} {row['key']} "
                + (f"{row['duration_s']:.1f} s" if row["status"] == "ok" else row["error"]))
        n = min(w + args.wave_size, len(todo))
        log(f"  {n}/{len(todo)} tracks, {time.time() - t0:.0f} s, "
            f"ETA {(len(todo) - n) * (time.time() - t0) / n:.0f} s")
    manifest = writer.compact()
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    log(f"done in {time.time() - t0:.1f} s: {counts}")
    if rows and counts["failed"] == len(rows):
        raise SystemExit(f"separate: every input failed ({len(rows)}); see "
                         f"{storage.join(args.output, '_manifest.jsonl')}")
    return {"counts": counts, "manifest": manifest}


def _run_wave(ray, args, ckpt, cfg, subtype, wave) -> list[dict]:
    # Small blocks: a long track becomes many blocks of segments instead of one huge block,
    # so a model actor only ever maps a few batches' worth of audio (flat memory).
    seg_bytes = 4 * cfg.data.chunk_samples * (1 + len(cfg.data.stems))
    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = max(1 << 20, 2 * args.batch_size * seg_bytes)
    ds = ray.data.from_items(wave, override_num_blocks=len(wave))
    ds = ds.flat_map(decode_segments, fn_kwargs={
        "sample_rate": cfg.data.sample_rate, "segment": cfg.data.chunk_samples,
        "margin": cfg.separation.margin, "overlap": cfg.separation.overlap})
    ds = ds.map_batches(
        SeparateSegments, batch_size=args.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"ckpt": ckpt, "cfg": cfg.to_dict(),
                               "num_gpus": args.gpus_per_actor, "seed": args.seed},
        compute=ray.data.ActorPoolStrategy(size=args.actors), num_gpus=args.gpus_per_actor)
    ds = ds.groupby("key", num_partitions=max(1, min(len(wave), 16))).map_groups(
        assemble_track, batch_format="numpy",
        fn_kwargs={"cfg_dict": cfg.to_dict(), "output": args.output, "template": args.filename,
                   "fmt": args.format, "subtype": subtype, "out_rate": args.sample_rate,
                   "ckpt_name": ckpt})
    return [json.loads(r["manifest"]) for r in ds.take_all()]


def _check_names(items, stems, args) -> None:
    seen: dict[str, str] = {}
    for it in items:
        try:
            paths = output_paths(it, stems, args.output, args.filename, args.format)
        except ValueError:
            continue  # reported as this item's failed row
        for path in paths.values():
            if path in seen and seen[path] != it["input"]:
                sys.exit(f"{seen[path]} and {it['input']} would both write {path}: use "
                         "--filename '{key}/{stem}.{ext}' to keep input sub-folders")
            seen[path] = it["input"]


if __name__ == "__main__":
    main()
