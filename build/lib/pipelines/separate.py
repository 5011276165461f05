"""Separate a catalog of mixtures into stems with a trained checkpoint (Ray Data batch job).

    msdm separate song.mp3 other.flac some_folder/ --ckpt model.ckpt   # -> separated/model/...
    python -m pipelines.separate --ckpt runs/r1/model.ckpt --input music/ --output stems/
    python -m pipelines.separate --ckpt s3://bkt/runs/r1/model.ckpt --input 's3://bkt/in/*.flac' \
        --output s3://bkt/stems --format flac --actors 8 --gpus-per-actor 1 --batch-size 16
    ray job submit --working-dir . -- python -m pipelines.separate --ckpt s3://... --input ...

Inputs (positional, mixed, and/or --input) are folders (recursive), globs, .txt/.jsonl manifests
or files; an input that does not exist or holds no audio is named and skipped. Without --output
stems go to separated/<checkpoint name>/<track>/<stem>.<ext>. Any format soundfile
decodes (MP3 where libsndfile does), any rate and channel count. Tracks are decoded in blocks and
cut into segments; the model separates every channel (shared noise) on an actor pool, and the
same actors complete the stems over the full band at the output rate (soft masks above the
model's band, see msdm/stereo.py; --split-tasks moves this to CPU tasks of its own); the
driver cross-fades segments into OUTPUT/{track}/{stem}.{ext} as they arrive, plus
OUTPUT/_manifest.jsonl (status ok / failed / skipped per input). One streaming
pipeline; the models load once. A re-run skips finished tracks; files are written then renamed,
so a partial output never appears. Bad files are reported, not fatal. Manifest rows are saved
every --wave-size finished tracks.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import PurePosixPath

from . import storage
from .assemble import Assembler, output_names
from .catalog import (
    ManifestWriter,
    check_template,
    list_inputs,
    output_paths,
    read_manifest,
    settle,
)
from .common import (
    add_init,
    add_threads,
    check_actor_cpus,
    ckpt_uris,
    cli,
    data_context,
    dry_run,
    init_ray,
    log,
    parse_ckpt,
    parser,
    resolve_config,
)
from .models import load_model, separation_nfe
from .segments import SeparateSegments, decode_segments, split_segments

SUBTYPES = ("PCM_16", "PCM_24", "FLOAT")


def build_parser():
    p = parser(__doc__)
    p.add_argument("--ckpt", action="append", required=True, help="model.ckpt, or STEM=URI")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="audio files and folders, mixed (with or instead of --input)")
    p.add_argument("--input", default=None, help="folder, glob, .txt/.jsonl manifest or file")
    p.add_argument("--output", default=None,
                   help="stems root (local or s3://; default: separated/<checkpoint name>)")
    p.add_argument("--sampler-config", default=None, help="YAML of sampler keys (best.yaml)")
    p.add_argument("--format", choices=("wav", "flac"), default="wav")
    p.add_argument("--subtype", choices=SUBTYPES, default=None,
                   help="sample format (default: FLOAT for wav, PCM_24 for flac)")
    p.add_argument("--filename", default="{track}/{stem}.{ext}",
                   help="output name template: {track} {key} {parent} {stem} {ext}")
    p.add_argument("--sample-rate", default="original",
                   help="'original' (the input's rate) or a rate in Hz for the stems")
    p.add_argument("--channels", choices=("original", "mono"), default="original",
                   help="original: stems with the input's channels (soft masks, full band); "
                        "mono: the model's mid stems only")
    p.add_argument("--stems", default=None, help="comma-separated subset of stems to write")
    p.add_argument("--two-stems", default=None, metavar="STEM",
                   help="write STEM and no_STEM (= mixture - STEM)")
    p.add_argument("--stereo", choices=("channels", "transfer", "mask"), default="channels",
                   help="channels: the model separates every channel (shared noise), masks "
                        "above its band; transfer / mask: the model separates the mid only")
    p.add_argument("--mask-power", type=float, default=1.0,
                   help="soft-mask exponent p in |S_n|^p / sum |S_m|^p")
    p.add_argument("--actors", type=int, default=1, help="model replicas")
    p.add_argument("--gpus-per-actor", type=float, default=0)
    add_threads(p)
    p.add_argument("--batch-size", type=int, default=8, help="segments per model call")
    p.add_argument("--object-store-mb", type=float, default=0,
                   help="object store of the local cluster this job starts (ignored with "
                        "--address; default: twice the pipeline's streaming budget, >= 384 MB)")
    p.add_argument("--budget-mb", type=float, default=0,
                   help="object-store memory the stream may hold (default: 3 blocks per stage "
                        "and model actor, >= 128 MB); more buys throughput with memory")
    p.add_argument("--wave-size", type=int, default=16,
                   help="finished tracks per manifest part (resume unit)")
    p.add_argument("--split-tasks", type=int, default=None,
                   help="run the channel split as a CPU stage of its own with at most N "
                        "concurrent tasks (default: inside the model actors)")
    add_init(p)
    return p


def _options(args):
    subtype = args.subtype or ("FLOAT" if args.format == "wav" else "PCM_24")
    if args.format == "flac" and subtype == "FLOAT":
        sys.exit("--format flac cannot store FLOAT samples; use --subtype PCM_16 or PCM_24")
    if args.sample_rate != "original" and not (args.sample_rate.isdigit()
                                               and int(args.sample_rate) > 0):
        sys.exit("--sample-rate must be 'original' or a positive integer rate in Hz")
    if args.split_tasks is not None and args.split_tasks < 1:
        sys.exit("--split-tasks must be >= 1 (leave it out to split in the model actors)")
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
    try:
        names = output_names(cfg.data.stems, args.stems, args.two_stems)
    except ValueError as e:
        sys.exit(str(e))
    items = _list_all(args)
    args.output = args.output or default_output(ckpt)
    if dry_run(cfg, args, {"inputs": len(items), "subtype": subtype, "outputs": names,
                           "output": args.output}):
        return {}
    _check_names(items, names, args)
    storage.check_writable(args.output)
    manifest, problems = read_manifest(args.output)
    for p in problems:
        log(f"manifest: {p}")
    writer = ManifestWriter(args.output)
    todo, done_rows = settle(items, names, args.output, args.filename, args.format, manifest)
    writer.append(done_rows)
    log(f"separate: {len(items)} inputs, {len(items) - len(todo)} settled, {len(todo)} to do "
        f"-> {args.output} (NFE per segment {separation_nfe(cfg)}, {args.actors} actor(s))")
    # a local cluster's store sized for the stream: every process's RSS counts the store pages
    # it touched, and allocations wander over a larger store as a long track streams through
    args.object_store_mb = args.object_store_mb or max(384, STORE_PER_BUDGET * _budget(args, cfg)
                                                       / (1 << 20))
    ray = init_ray(args, [*args.inputs, args.input, args.output, *ckpt_uris(ckpt)]) \
        if todo else None
    if ray:
        check_actor_cpus(ray, "separate", args.actors, args.gpus_per_actor)
    t0, rows, part = time.time(), list(done_rows), []
    bar = _bar(len(todo))
    for row in _run(ray, args, ckpt, cfg, subtype, names, todo) if todo else []:
        rows.append(row)
        part.append(row)
        bar.update(1)
        (bar.write if bar.enabled else log)(
            f"  {row['status']:<6} {row['key']} "
            + (f"{row['duration_s']:.1f} s" if row["status"] == "ok" else row["error"]))
        if len(part) >= args.wave_size:
            writer.append(part)  # a crash loses at most --wave-size finished rows
            part = []
            n = len(rows) - len(done_rows)
            log(f"  {n}/{len(todo)} tracks, {time.time() - t0:.0f} s, "
                f"ETA {(len(todo) - n) * (time.time() - t0) / n:.0f} s")
    bar.close()
    writer.append(part)
    manifest = writer.compact()
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    log(f"done in {time.time() - t0:.1f} s: {counts}")
    log(f"stems in {storage.absolute(args.output)}")
    if rows and counts["failed"] == len(rows):
        raise SystemExit(f"separate: every input failed ({len(rows)}); see "
                         f"{storage.join(args.output, '_manifest.jsonl')}")
    return {"counts": counts, "manifest": manifest}


def _list_all(args) -> list[dict]:
    """Every input of every spec; a spec that does not exist or holds no audio is named on one
    line and skipped (the others are still separated)."""
    specs = [*args.inputs, *([args.input] if args.input else [])]
    if not specs:
        sys.exit("separate: give audio files or folders (or --input)")
    items, missing = [], []
    for spec in specs:
        try:
            found = list_inputs(spec)
        except storage.StorageError as e:
            found, reason = [], str(e).removeprefix("input ")
        else:
            reason = f"{spec}: no audio files"
        if not found:
            log(f"separate: skipped {reason}")
            missing.append(spec)
        items += found
    if not items:
        sys.exit(f"separate: nothing to separate: {', '.join(missing)}")
    return items


def default_output(ckpt) -> str:
    """separated/<checkpoint name>, as demucs writes separated/<model>: the file's name, or its
    folder's for a run's model.ckpt (runs/demo/model.ckpt -> separated/demo)."""
    if isinstance(ckpt, dict):
        return os.path.join("separated", "isdm")
    path = PurePosixPath(str(ckpt).rstrip("/"))
    name = path.parent.name if path.stem in ("model", "best", "last") and path.parent.name \
        else path.stem
    return os.path.join("separated", name or "model")


def _bar(total: int):
    """A progress bar over tracks on a terminal (stderr); lines in logs."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="track", desc="separate", disable=None, leave=False)
    bar.enabled = not bar.disable
    return bar


def _block_bytes(args, cfg) -> int:
    """Ray Data's target block size: ~2 model batches of segments (input window, model-rate
    mixture and stems, output-rate stems)."""
    segment = 4 * cfg.data.chunk_samples * (1 + len(cfg.data.stems)) * 5
    return max(1 << 20, 2 * args.batch_size * segment)


# a local cluster's store per byte of stream budget (measured, bench_separate --budget-mb 450:
# 0.88 of the in-process loop in a 562 MB store, 1.00 in a 900 MB one)
STORE_PER_BUDGET = 2


def _budget(args, cfg) -> int:
    """Object-store bytes the pipeline may hold: --budget-mb, or a few blocks per stage and
    model actor."""
    if args.budget_mb:
        return int(args.budget_mb * (1 << 20))
    return max(128 << 20, 3 * (args.actors + 2) * _block_bytes(args, cfg))


def _run(ray, args, ckpt, cfg, subtype, names, todo):
    """One streaming pipeline over every track: decode -> model actors (+ channel split); the
    driver assembles and writes. Yields manifest rows as tracks finish."""
    settings = {
        # Small blocks: a long track becomes many blocks of segments, so every stage only ever
        # holds a few segments (flat memory); the reorder buffer per track stays small.
        "target_max_block_size": _block_bytes(args, cfg),
        # in order: the driver's reorder buffer then holds ~one block per track (measured: 100
        # segments of a 5-minute track waited there without it)
        "execution_options.preserve_order": True,
        # Ray Data lets queued blocks take a share of the whole object store (30 % of RAM by
        # default): a long track filled it, and every process that maps the store grew by the
        # pages it touched (largest process 1.2 GB at 4 min, 2.6 GB at 32 min,
        # benchmarks/bench_memory.py). The budget costs throughput where a stage waits on
        # another's share (see the split in _stream).
        "execution_options.resource_limits": ray.data.ExecutionResources.for_limits(
            object_store_memory=_budget(args, cfg)),
        # Ray Data caps any limit at half the cluster's store by default: the budget is what it
        # uses (the store is sized STORE_PER_BUDGET x the budget for a local cluster)
        "override_object_store_memory_limit_fraction": 1.0,
    }
    with data_context(ray, settings):
        yield from _stream(ray, args, ckpt, cfg, subtype, names, todo)


def _stream(ray, args, ckpt, cfg, subtype, names, todo):
    ds = ray.data.from_items(todo, override_num_blocks=len(todo))
    ds = ds.flat_map(decode_segments, fn_kwargs={
        "sample_rate": cfg.data.sample_rate, "segment": cfg.data.chunk_samples,
        "margin": cfg.separation.margin, "overlap": cfg.separation.overlap,
        "out_rate": args.sample_rate, "channels": args.channels, "method": args.stereo})
    # The channel split runs in the model actors by default. As a stage of its own, its blocks
    # (output-rate stems, the largest of the job) took a share of the budget and the model
    # actor waited on it: bench_separate 0.83 of the in-process loop, ~1.0 in the actor (#14).
    split = {"power": args.mask_power, "method": args.stereo}
    staged = args.split_tasks is not None
    ds = ds.map_batches(
        SeparateSegments, batch_size=args.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"ckpt": ckpt, "cfg": cfg.to_dict(),
                               "num_gpus": args.gpus_per_actor, "seed": args.seed,
                               "split": None if staged else split, "threads": args.threads},
        compute=ray.data.ActorPoolStrategy(size=args.actors), num_gpus=args.gpus_per_actor)
    if staged:
        ds = ds.map_batches(split_segments, batch_size=2, batch_format="numpy", fn_kwargs=split,
                            compute=ray.data.TaskPoolStrategy(size=args.split_tasks))
    assembler = Assembler(cfg, args.output, args.filename, args.format, subtype, str(ckpt),
                          names)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["key"])):
            done = assembler.add({k: v[i] for k, v in batch.items()})
            if done is not None:
                yield done
    yield from assembler.finish()


def _check_names(items, names, args) -> None:
    seen: dict[str, str] = {}
    for it in items:
        try:
            paths = output_paths(it, names, args.output, args.filename, args.format)
        except ValueError:
            continue  # reported as this item's failed row
        for path in paths.values():
            if path in seen and seen[path] != it["input"]:
                sys.exit(f"{seen[path]} and {it['input']} would both write {path}: use "
                         "--filename '{key}/{stem}.{ext}' to keep input sub-folders")
            seen[path] = it["input"]


if __name__ == "__main__":
    cli(main)
