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

from . import storage
from .common import cli, dry_run, parser, resolve_config
from .trainrun import add_run_arguments, check_run_args, check_run_inputs, fit


def build_parser():
    p = parser(__doc__)
    add_run_arguments(p)
    p.add_argument("--warm-start", default=None, help="model.ckpt to fine-tune from")
    p.add_argument("--stem", default=None, help="ISDM: train a single-stem prior of this stem")
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
    check_run_args(args, cfg)
    if dry_run(cfg, args, {"run": run_uri, "workers": args.num_workers, "gpu": args.gpu}):
        return {}
    track = check_run_inputs(args, cfg)
    if args.warm_start:
        args.warm_start = storage.absolute(args.warm_start)  # read in the workers
        _check_warm_start(args.warm_start, cfg)
    return fit(args, cfg, run_uri, track)


if __name__ == "__main__":
    cli(main)
