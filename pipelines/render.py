"""Render MIDI files into a Slakh2100-format multitrack data set with SoundFonts (Ray Data).

    python -m pipelines.render --midi data/lmd_full --output data/lakh-slakh
    python -m pipelines.render --midi s3://bkt/lmd_full --output s3://bkt/lakh-slakh \
        --soundfont fonts/a.sf2 --soundfont fonts/b.sf2 --seed 7
    ray job submit --working-dir . -- python -m pipelines.render --midi s3://... --output s3://...

Each MIDI file becomes OUTPUT/{split}/TrackNNNNN/{metadata.yaml, mix.flac, stems/SNN.flac,
MIDI/SNN.mid, all_src.mid}: every instrument rendered alone (mono 16-bit FLAC), Slakh's levels
and metadata fields. The split is a hash of the MIDI content, identical contents are rendered
once, tracks are numbered in content order. Bad files are rows in OUTPUT/_report.json; a re-run
skips finished tracks. OUTPUT/_index/ maps tracks to sources.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from . import render_stages as rs
from . import storage
from .common import cli, init_ray, log, write_json
from .midi import Limits
from .soundfont import SoundFontError

# sorted rows the driver numbers at a time: its memory is this batch, whatever the file count
NUMBER_BATCH = 1024
TOTALS = ("seconds", "cpu", "wall")  # summed over the render tasks' result rows
# bench_render, 192 songs on 2 CPUs: 16 tracks per task rendered 15 % more audio per CPU-second
# than 4 (Ray Data's cost per task: scheduling, the block's round trip, the worker's turn)
MAX_TRACKS_PER_TASK = 16
MAX_BLOCKS = 4096  # range blocks of the render stage (Ray Data's read tasks live on the driver)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--midi", required=True, help="folder or s3:// prefix, searched recursively "
                   "for .mid / .midi")
    p.add_argument("--output", required=True, help="root of the Slakh-format tree (local or s3://)")
    p.add_argument("--soundfont", action="append", default=[], metavar="FILE",
                   help="SoundFont (.sf2/.sf3, local or s3://), repeatable: each stem's font is "
                        "drawn with --seed (default: the GM font in the pretty-midi wheel)")
    p.add_argument("--sample-rate", type=int, default=44100)
    p.add_argument("--seed", type=int, default=0, help="draws each stem's SoundFont")
    d = Limits()
    p.add_argument("--max-seconds", type=float, default=d.max_seconds,
                   help="longer files are reported, not rendered")
    p.add_argument("--max-instruments", type=int, default=d.max_instruments)
    p.add_argument("--limit", type=int, default=0, help="render the first N tracks only (0: all)")
    p.add_argument("--tracks-per-task", type=int, default=0,
                   help="tracks per Ray task; 0 (default): as many as keeps 4 tasks per "
                        f"cluster CPU, at most {MAX_TRACKS_PER_TASK} (fewer, larger tasks: less "
                        "of Ray's time per track; bench_render)")
    p.add_argument("--task-cpus", type=float, default=1.0,
                   help="CPUs Ray reserves per render task (below 1: more tasks than CPUs, "
                        "which fills the CPUs while tasks start, wait or write)")
    g = p.add_argument_group("cluster")
    g.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a new local cluster)")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local cluster")
    g.add_argument("--shared-fs", action="store_true",
                   help="local paths are on a mount every node shares (NFS)")
    g.add_argument("--verbose", action="store_true", help="also show Ray Data's INFO lines")
    g.add_argument("--dry-run", action="store_true", help="print the settings and exit")
    p.set_defaults(smoke_test=False)
    return p


def settings(args) -> dict:
    """What a track's audio depends on: a re-run into the same output must not change it."""
    limits = dataclasses.replace(Limits(), max_seconds=args.max_seconds,
                                 max_instruments=args.max_instruments)
    return {"soundfonts": args.soundfont or [rs.DEFAULT_FONT], "seed": args.seed,
            "sample_rate": args.sample_rate, "limits": dataclasses.asdict(limits)}


def number_tracks(ray, args, index_uri: str) -> rs.Numbering:
    """List, hash and sort on the cluster; number on the driver one batch at a time, writing the
    index as it goes (the driver never holds the listing)."""
    units = rs.listing_units(args.midi)
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(rs.walk_units, batch_size=1).map_batches(rs.hash_batch, batch_size=32)
    numbering = rs.Numbering()
    for part, batch in enumerate(ds.sort(["md5", "uri"]).iter_batches(
            batch_size=NUMBER_BATCH, batch_format="numpy")):
        rows = numbering.add(batch)
        if rows["md5"]:
            buf = pa.BufferOutputStream()
            pq.write_table(pa.table(rows), buf)
            name = f"part-{part:05d}.parquet"
            storage.write_bytes(storage.join(index_uri, name), buf.getvalue().to_pybytes())
            numbering.parts.append((name, len(rows["md5"])))
    return numbering


def check_output(args, run: dict) -> None:
    """Refuse to mix two renderings: the output's _render.json must match this run's."""
    uri = storage.join(args.output, "_render.json")
    if not storage.exists(uri):
        return
    import json

    old = json.loads(storage.read_bytes(uri))
    diff = [k for k in run if k != "midi" and old.get(k) != run[k]]
    if diff:
        raise SystemExit(f"render: {args.output} holds a rendering with other "
                         f"{', '.join(diff)} ({uri}); render into a new --output")


def tracks_per_task(ray, asked: int, total: int) -> int:
    """`asked`, or (0) enough tracks per task to keep ~4 tasks per cluster CPU for load balance,
    at most MAX_TRACKS_PER_TASK, so a large job pays Ray's cost per task on few tasks."""
    if asked > 0:
        return asked
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(MAX_TRACKS_PER_TASK, total // (4 * cpus)))


def render(ray, args, index_uri: str, parts: list, total: int, opts: dict) -> tuple:
    """Render every index row; print progress. Returns (report rows, counts by status, totals:
    audio seconds and the CPU and wall seconds spent rendering tracks in the tasks)."""
    if args.limit > 0:
        total = min(total, args.limit)
    per_task = tracks_per_task(ray, args.tracks_per_task, total)
    slices = -(-total // per_task)
    log(f"  rendering {total} tracks, {per_task} per task")
    # a range of slice numbers, one block each (at most MAX_BLOCKS: then a task renders several
    # slices): each task reads its own rows of the index, so the render starts with no read or
    # repartition stage, and the driver holds the part list only
    ds = ray.data.range(slices, override_num_blocks=min(slices, MAX_BLOCKS))
    kwargs = {"index_uri": index_uri, "parts": parts, "per_task": per_task, "total": total,
              "output": args.output, "midi_root": args.midi, **opts}
    ds = ds.map_batches(rs.render_slices, batch_size=1, fn_kwargs=kwargs, batch_format="numpy",
                        num_cpus=args.task_cpus)
    rows, counts, t0, shown = [], {}, time.time(), 0.0
    totals = dict.fromkeys(TOTALS, 0.0)
    for row in ds.iter_rows():
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        for key in totals:
            totals[key] += row[key]
        if row["status"] == "failed":
            rows.append({"source": row["source"], "track": row["track"], "status": "failed",
                         "reason": row["reason"]})
        for note in filter(None, row["notes"].split("\n")):
            rows.append({"source": row["source"], "track": row["track"], "status": "fallback",
                         "reason": note})
        done = sum(counts.values())
        if time.time() - shown > 10 or done == total:
            shown, rate = time.time(), done / max(time.time() - t0, 1e-6)
            log(f"  {done}/{total} tracks ({counts.get('failed', 0)} failed, "
                f"{counts.get('finished', 0)} finished before), "
                f"{totals['seconds'] / 3600:.2f} h of audio, "
                f"ETA {(total - done) / max(rate, 1e-9) / 60:.1f} min")
    return rows, counts, totals


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    opts = settings(args)
    if args.dry_run:
        print({"midi": args.midi, "output": args.output, **opts})
        return {}
    try:  # every SoundFont loads here, before Ray starts
        fonts = rs.load_soundfonts(opts["soundfonts"])
    except SoundFontError as e:
        raise SystemExit(f"render: error: {e}") from None
    storage.check_readable(args.midi)
    storage.check_writable(args.output)
    local_fonts = [f for f in args.soundfont if not storage.is_remote(f)]
    ray = init_ray(args, [args.midi, args.output, *local_fonts])
    log(f"render: {args.midi} -> {args.output} with {', '.join(f.name for f in fonts)} "
        f"({args.sample_rate} Hz, seed {args.seed})")
    for uri in rs.clean_leftovers(args.output):
        log(f"  removed {uri}: left half-written by an earlier run")
    staging = storage.join(args.output, f"_index.tmp-{uuid.uuid4().hex[:8]}")
    try:
        numbering = number_tracks(ray, args, staging)
        run = {**opts, "midi": args.midi, "tracks": numbering.count,
               "fingerprint": numbering.fingerprint.hexdigest()}
        log(f"  {numbering.files} MIDI files, {numbering.count} distinct contents")
        if numbering.count:
            check_output(args, run)
            storage.remove(storage.join(args.output, "_index"))
            storage.move(staging, storage.join(args.output, "_index"))
    finally:
        storage.remove(staging)
    rows, counts, totals = [], {}, dict.fromkeys(TOTALS, 0.0)
    if numbering.count:
        write_json(storage.join(args.output, "_render.json"), run)
        rows, counts, totals = render(ray, args, storage.join(args.output, "_index"),
                                      numbering.parts, numbering.count, opts)
    audio = totals["seconds"]
    report = {"midi": args.midi, "output": args.output, "files": numbering.files,
              "tracks": numbering.count, "counts": counts, "audio_hours": audio / 3600,
              "render_cpu_seconds": totals["cpu"], "render_task_seconds": totals["wall"],
              **opts, "rows": numbering.rows + rows}
    write_json(storage.join(args.output, "_report.json"), report)
    log(f"wrote {counts.get('rendered', 0)} tracks ({audio / 3600:.2f} h), "
        f"{counts.get('finished', 0)} were finished, {counts.get('failed', 0)} failed, "
        f"{sum(r['status'] == 'duplicate' for r in numbering.rows)} duplicates: "
        f"{storage.join(args.output, '_report.json')}")
    if not numbering.count:
        raise SystemExit(f"render: no readable .mid/.midi files under {args.midi}")
    return report


if __name__ == "__main__":
    cli(main)
