"""Evaluate separation with the MSDM protocol (windowed SI-SDRi) on a prepared split.

    python -m pipelines.evaluate --ckpt runs/r1/model.ckpt --data data/prepared --output eval/r1
    python -m pipelines.evaluate --ckpt s3://bkt/runs/r1/model.ckpt --data s3://bkt/prepared \
        --sampler-config sweeps/s1/best.yaml --gpus-per-actor 1 --actors 4 --output s3://bkt/eval
    python -m pipelines.evaluate --ckpt bass=B.ckpt --ckpt drums=D.ckpt ... (ISDM, one per stem)

Each chunk is separated (mixture = sum of its stems) on an actor pool with seeds from (track,
chunk); chunks are concatenated per track and scored on 4 s windows with a 2 s hop, skipping
windows with at most one active stem. Every --sampler-config adds one row next to the
checkpoint's own sampler. Writes OUTPUT/results.json, results.md and si_sdri.png.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from msdm.config import ConfigError
from msdm.data import COL_TRACK
from msdm.metrics import summarize

from . import storage
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
    write_json,
)
from .models import load_model, separation_nfe
from .report import markdown_table, plot_stem_bars
from .stages import SeparateChunks, no_windows, read_chunks, score_track


def build_parser():
    p = parser(__doc__)
    p.add_argument("--ckpt", action="append", required=True,
                   help="model.ckpt URI, or STEM=URI once per stem (ISDM)")
    p.add_argument("--data", required=True, help="prepared dataset root")
    p.add_argument("--split", default="test")
    p.add_argument("--sampler-config", action="append", default=[],
                   help="YAML of sampler/separation keys (e.g. a sweep's best.yaml); repeatable")
    p.add_argument("--skip-checkpoint-sampler", action="store_true",
                   help="score only the --sampler-config files, not the checkpoint's own sampler")
    p.add_argument("--max-chunks", type=int, default=0, help="first N chunks only (0 = all)")
    p.add_argument("--output", required=True, help="folder for results.json, .md and .png")
    p.add_argument("--actors", type=int, default=1, help="model replicas (actor pool size)")
    p.add_argument("--gpus-per-actor", type=float, default=0)
    add_threads(p)
    p.add_argument("--batch-size", type=int, default=4, help="chunks per model call")
    add_init(p)
    return p


def evaluate_one(ray, args, ckpt, cfg, name: str) -> dict:
    """Separate and score the split with one resolved configuration."""
    t0 = time.time()
    split = storage.join(args.data, args.split)
    # Ray Data's default hash shuffle starts aggregator actors for every evaluation (~2.5 s per
    # call on 2 CPUs for a few tracks); the sort-based shuffle runs as plain tasks. A Dataset
    # keeps a copy of the DataContext it was created under, so the pipeline is built inside.
    sort = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    with data_context(ray, {"shuffle_strategy": sort}):
        if args.max_chunks:  # a fixed subset, read without a global sort
            chunks = read_chunks(split, cfg.data.stems, args.max_chunks)
            rows = [{COL_TRACK: t, "chunk_index": int(c), **{s: x[i] for i, s in
                     enumerate(cfg.data.stems)}} for t, c, x in
                    zip(chunks[COL_TRACK], chunks["chunk_index"], chunks["x"])]
            ds, fmt = ray.data.from_items(rows), "numpy"
        else:
            ds, fmt = ray.data.read_parquet(split), "pyarrow"
        ds = ds.map_batches(
            SeparateChunks, batch_size=args.batch_size, batch_format=fmt,
            fn_constructor_kwargs={"ckpt": ckpt, "cfg": cfg.to_dict(),
                                   "num_gpus": args.gpus_per_actor, "seed": args.seed,
                                   "threads": args.threads},
            compute=ray.data.ActorPoolStrategy(size=args.actors), num_gpus=args.gpus_per_actor)
        ds = ds.groupby(COL_TRACK).map_groups(
            score_track, batch_format="numpy", fn_kwargs={"sample_rate": cfg.data.sample_rate})
        rows = ds.take_all()
    scored = [r for r in rows if r["window"] >= 0]
    if not scored:
        lengths = {r[COL_TRACK]: r["seconds"] for r in rows}.values()
        raise ConfigError(f"evaluate [{name}]: " + no_windows(
            lengths, cfg.data.chunk_samples / cfg.data.sample_rate))
    windows = torch.tensor(np.array([r["si_sdri"] for r in scored])).reshape(
        -1, len(cfg.data.stems))
    return {"name": name, "si_sdri": summarize(windows, cfg.data.stems),
            "windows": int(windows.shape[0]), "tracks": len({r[COL_TRACK] for r in rows}),
            "nfe": separation_nfe(cfg), "seconds": time.time() - t0,
            **{k: v for k, v in cfg.to_dict().items() if k in ("sampler", "separation")}}


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    ckpt = parse_ckpt(args.ckpt)
    base, _ = load_model(ckpt)  # a bad checkpoint fails here, before Ray starts
    names = [] if args.skip_checkpoint_sampler else [("checkpoint sampler", None)]
    names += [(os.path.splitext(os.path.basename(f))[0], f) for f in args.sampler_config]
    if not names:
        raise SystemExit("evaluate: --skip-checkpoint-sampler needs at least one --sampler-config")
    configs = [(name, resolve_config(args, base, [f] if f else [])) for name, f in names]
    if dry_run(configs[0][1], args, {"configs": [n for n, _ in names]}):
        return {}
    storage.check_readable(storage.join(args.data, args.split))
    storage.check_writable(args.output)
    ray = init_ray(args, [args.data, args.output, *ckpt_uris(ckpt)])
    check_actor_cpus(ray, "evaluate", args.actors, args.gpus_per_actor)
    results, done, t0 = [], {}, time.time()
    for i, (name, cfg) in enumerate(configs):
        key = json.dumps({k: cfg.to_dict()[k] for k in ("sampler", "separation")}, sort_keys=True)
        if key in done:  # same sampler as an earlier row (e.g. the paper's = the checkpoint's)
            row = {**done[key], "name": name, "same_as": done[key]["name"]}
            log(f"evaluate [{name}]: same sampler as [{row['same_as']}], result reused")
            results.append(row)
            continue
        eta = "" if not done else f", ETA {(len(configs) - i) * (time.time() - t0) / i:.0f} s"
        log(f"evaluate [{name}] ({i + 1}/{len(configs)}) on {args.data}/{args.split}{eta} ...")
        row = evaluate_one(ray, args, ckpt, cfg, name)
        done[key] = row
        results.append(row)
        si = row["si_sdri"]
        log(f"  [{name}] SI-SDRi all {si['all']:.2f} dB over {row['windows']} windows "
            f"({row['tracks']} tracks), NFE {row['nfe']}, {row['seconds']:.1f} s")
    out = {**{k: results[0][k] for k in ("si_sdri", "windows", "nfe", "seconds")},
           "split": args.split, "configs": results}
    write_json(storage.join(args.output, "results.json"), out)
    stems = configs[0][1].data.stems
    table = markdown_table(results, stems)
    storage.write_bytes(storage.join(args.output, "results.md"), table.encode())
    plot_stem_bars(results, stems, storage.join(args.output, "si_sdri.png"))
    print(table)
    return out


if __name__ == "__main__":
    cli(main)
