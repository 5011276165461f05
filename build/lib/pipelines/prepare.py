"""Shard a Slakh2100-format (or MSDM-layout) multitrack tree into Parquet stem-chunk datasets.

    python -m pipelines.prepare --input data/slakh --output data/prepared
    python -m pipelines.prepare --input s3://bkt/slakh2100 --output s3://bkt/prepared \
        --set data.hop_samples=131072 --set data.drop_silent=true
    ray job submit --working-dir . -- python -m pipelines.prepare --input s3://... --output s3://...

Writes OUTPUT/{split}/*.parquet (track_id, split, chunk_index, start, one float32 fixed-size list
column per stem) and OUTPUT/_report.json. Bad tracks are skipped and listed in the report; the
exit status is non-zero only if nothing usable was produced (or with --strict and any failure).
A re-run replaces the shards; files appear in OUTPUT/{split}/ only after every unit succeeded.
"""

from __future__ import annotations

import json
import sys
import uuid

from msdm.data import SPLITS

from . import storage, tracks
from .common import cli, dry_run, init_ray, log, parser, resolve_config, write_json


def build_parser():
    p = parser(__doc__)
    p.add_argument("--input", required=True, help="dataset root (local path or s3:// URI)")
    p.add_argument("--output", required=True, help="output root for Parquet shards and report")
    p.add_argument("--class-map", default="", help="YAML stem->class map (default: built in)")
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits to read")
    p.add_argument("--tracks-per-task", type=int, default=8, help="tracks per Ray task")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any track failed")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    if dry_run(cfg, args, {"input": args.input, "output": args.output}):
        return {}
    storage.check_readable(args.input)  # clear errors before any work
    storage.check_writable(args.output)
    found = tracks.find_tracks(args.input, tuple(args.splits.split(",")))
    if args.smoke_test:
        found = found[:6]
    if not found:
        sys.exit(f"no tracks found under {args.input}/{{{args.splits}}}/Track*")
    log(f"prepare: {len(found)} tracks from {args.input} -> {args.output} "
        f"({cfg.data.sample_rate} Hz, {cfg.data.chunk_samples}-sample chunks)")
    ray = init_ray(args, [args.input, args.output])
    _recover(args.output)  # leftovers of a crashed run
    staging = storage.join(args.output, f"_staging-{uuid.uuid4().hex[:8]}")
    units = tracks.make_units(found, max(1, args.tracks_per_task))
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map(tracks.prepare_unit, fn_kwargs={"cfg": cfg.to_dict(),
                                               "class_map": args.class_map, "staging": staging})
    summaries = [json.loads(r["summary"]) for r in ds.take_all()]
    report = tracks.build_report(summaries, args.input, args.output, cfg.data)
    _publish(args.output, staging, report)
    _print_summary(report)
    ok = any(s["chunks"] for s in report["splits"].values())
    if not ok or (args.strict and report["failed"]):
        sys.exit(1 if ok else "prepare produced no chunks")
    return report


def _publish(output: str, staging: str, report: dict) -> None:
    """Swap the staged shards in: an existing split is moved aside, not deleted, until every new
    split is in place (old split folders are replaced, never merged)."""
    staged = set(storage.listdir(staging))
    aside = storage.join(output, f"_previous-{uuid.uuid4().hex[:8]}")
    for split in SPLITS:
        target = storage.join(output, split)
        if storage.exists(target):
            storage.move(target, storage.join(aside, split))
        if split in staged:
            storage.move(storage.join(staging, split), target)
    write_json(storage.join(output, "_report.json"), report)
    storage.remove(aside)
    storage.remove(staging)


def _recover(output: str) -> None:
    """Undo what a crash during publishing left: put aside splits back, drop staged shards."""
    for old in storage.listdir(output):
        path = storage.join(output, old)
        if old.startswith("_previous-"):
            for split in storage.listdir(path):
                if not storage.exists(storage.join(output, split)):
                    storage.move(storage.join(path, split), storage.join(output, split))
            storage.remove(path)
        elif old.startswith("_staging-"):
            storage.remove(path)


def _print_summary(report: dict) -> None:
    for split, s in sorted(report["splits"].items()):
        log(f"  {split:<10} {s['tracks']:5d} tracks {s['chunks']:7d} chunks "
            f"{s['seconds'] / 3600:8.2f} h")
    for f in report["failed"]:
        log(f"  skipped {f['split']}/{f['track_id']}: {f['error']}")
    log(f"wrote {report['files']} Parquet files and _report.json to {report['output']}")


if __name__ == "__main__":
    cli(main)
