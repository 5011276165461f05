"""Train the MSDM score model with Ray Train (DDP) on Parquet stem chunks from pipelines.prepare.

    python -m pipelines.train --data data/prepared --storage runs --name tiny-1 --config tiny
    python -m pipelines.train --data s3://bkt/prepared --storage s3://bkt/runs --name msdm-1 \
        --config paper --num-workers 8 --gpu
    python -m pipelines.train ... --stem bass          # ISDM: a single-stem prior
    ray job submit --working-dir . -- python -m pipelines.train --data s3://... --storage s3://...

Re-running with the same --storage/--name RESUMES from that run's latest checkpoint; a new name
starts fresh. Checkpoints (weights, EMA, optimizer, step, config) go to STORAGE/NAME/; the best K
by validation loss are kept, and the best EMA weights are exported as STORAGE/NAME/model.ckpt.
"""

from __future__ import annotations

import io

from msdm.checkpoint import CheckpointError, check_size, load_state
from msdm.config import apply_overrides

from . import storage, tracking
from .common import cli, dry_run, parser, resolve_config
from .trainrun import check_data, fit


def build_parser():
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared dataset root (has train/, validation/)")
    p.add_argument("--storage", required=True,
                   help="runs root (local or s3://); must be shared storage on multi-node runs")
    p.add_argument("--name", required=True, help="run name; an existing name resumes")
    p.add_argument("--num-workers", type=int, default=1,
                   help="DDP workers (one GPU each with --gpu)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, nccl, bf16 autocast")
    p.add_argument("--cpus-per-worker", type=float, default=0,
                   help="CPUs per worker (default: leave the rest of the cluster to Ray Data)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per CPU worker (default: its CPUs; more pays off when the "
                        "train split is materialised and Ray Data idles, e.g. on one small node)")
    p.add_argument("--max-steps", type=int, default=None, help="overrides train.max_steps")
    p.add_argument("--warm-start", default=None, help="model.ckpt to fine-tune from")
    p.add_argument("--stem", default=None, help="ISDM: train a single-stem prior of this stem")
    p.add_argument("--max-failures", type=int, default=3, help="worker failures to recover from")
    p.add_argument("--object-store-mb", type=float, default=0,
                   help="object store of the local cluster this job starts (ignored with "
                        "--address; default: Ray's, 30 %% of RAM)")
    tracking.add_argument(p)
    return p


def _check_warm_start(uri: str, cfg) -> None:
    """Validate --warm-start in the driver: readable, small enough and the same network."""
    state = load_state(io.BytesIO(storage.read_bytes(uri)), name=uri)
    other = state["config"]
    check_size(other, uri)
    if (other.model, other.num_stems) != (cfg.model, cfg.num_stems):
        raise CheckpointError(f"--warm-start {uri}: its network (model.*, {other.num_stems} "
                              f"stems) differs from this run's ({cfg.num_stems} stems)")


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    if args.max_steps is not None:
        cfg = apply_overrides(cfg, {"train.max_steps": args.max_steps})
    if args.stem is not None:
        cfg = apply_overrides(cfg, {"train.stem": args.stem})
    if cfg.train.stem and cfg.train.stem not in cfg.data.stems:
        raise SystemExit(f"--stem {cfg.train.stem!r} is not one of data.stems {cfg.data.stems}")
    run_uri = storage.join(args.storage, args.name)
    if args.num_workers < 1 or cfg.train.batch_size % args.num_workers:
        raise SystemExit(f"train.batch_size ({cfg.train.batch_size}) is the global batch: it "
                         f"must divide by --num-workers ({args.num_workers})")
    if args.threads < 0:
        raise SystemExit(f"--threads must be >= 0 (0 = the worker's CPUs), got {args.threads}")
    if dry_run(cfg, args, {"run": run_uri, "workers": args.num_workers, "gpu": args.gpu}):
        return {}
    track = tracking.parse(args.tracking, args.experiment)  # a bad backend fails before Ray
    tracking.check(track)
    storage.check_readable(storage.join(args.data, "train"))
    storage.check_writable(args.storage)
    check_data(args.data, cfg)
    if args.warm_start:
        args.warm_start = storage.absolute(args.warm_start)  # read in the workers
        _check_warm_start(args.warm_start, cfg)
    return fit(args, cfg, run_uri, track)


if __name__ == "__main__":
    cli(main)
