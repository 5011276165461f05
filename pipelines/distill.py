"""Distil a separating MSDM model into a few-step consistency student, with Ray Train (DDP).

    python -m pipelines.distill --teacher runs/msdm/model.ckpt --data data/prepared \\
        --storage runs --name student --max-steps 2000
    python -m pipelines.distill ... --sampler-config sweeps/s/best.yaml   # the swept Dirac
        # settings (constrained stem, soft mask) are distilled and kept by the student
    python -m pipelines.distill ... --set distill.steps=4 --set distill.data_weight=0.1
    python -m pipelines.evaluate --ckpt runs/student/model.ckpt --data data/prepared --output e

The student starts from the teacher's weights and learns, by consistency distillation in the EDM
parametrisation (msdm.distill), to jump from a noisy state on the teacher's Dirac separation
trajectories straight to their clean end; its stems always sum exactly to the mixture. The
result is an ordinary checkpoint (STORAGE/NAME/model.ckpt) whose own sampler is the few-step
consistency sampler (`sampler.solver: consistency`, `distill.steps` network evaluations), so
evaluate, tune, separate and --init take it as they take any model. Everything else is
`train`'s: checkpoints, resume on re-run with the same --storage/--name, S3, EMA, the progress
line, --config/--set (over the teacher's config: its network cannot change).

The run's train.* keys start from the teacher's (batch size, EMA) with distillation defaults
(constant lr 2e-4, no warm-up, 2,000 steps, a checkpoint every 500): see --dry-run. The
validation loss is the student's own separation error on the fixed validation chunks.
"""

from __future__ import annotations

import io

from msdm.checkpoint import CheckpointError, check_size, load_state
from msdm.config import ConfigError, apply_overrides
from msdm.distill import check_teacher, student_config

from . import storage
from .common import cli, dry_run, log, parser, resolve_config
from .trainrun import add_run_arguments, check_run_args, check_run_inputs, fit

# where distillation departs from the teacher's own training settings (then --config/--set)
DISTILL_TRAIN = {"train.lr": 2e-4, "train.warmup_steps": 0, "train.lr_schedule": "constant",
                 "train.max_steps": 2000, "train.checkpoint_every": 500, "train.val_every": 500}


def build_parser():
    p = parser(__doc__)
    p.add_argument("--teacher", required=True, help="the diffusion model.ckpt to distil")
    p.add_argument("--sampler-config", action="append", default=[],
                   help="YAML of separation keys to distil (e.g. a sweep's best.yaml: the "
                        "constrained stem, the soft mask); its sampler.* keys are replaced by "
                        "the student's consistency sampler. Repeatable")
    add_run_arguments(p)
    return p


def teacher_config(uri: str):
    """The teacher's config, read and checked in the driver: a readable msdm checkpoint of a
    joint diffusion model that is not itself a student."""
    try:
        state = load_state(io.BytesIO(storage.read_bytes(uri)), name=f"--teacher {uri}")
    except storage.StorageError as e:
        raise CheckpointError(f"--teacher {uri}: cannot read it ({e})") from e
    cfg = state["config"]
    check_size(cfg, f"--teacher {uri}")
    check_teacher(cfg, f"--teacher {uri}")
    return cfg


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    args.teacher = storage.absolute(args.teacher)  # read in the workers
    base = apply_overrides(teacher_config(args.teacher), DISTILL_TRAIN)
    cfg = resolve_config(args, base=base, sampler_files=args.sampler_config)
    if args.max_steps is not None:
        cfg = apply_overrides(cfg, {"train.max_steps": args.max_steps})
    if cfg.separation.init:
        raise ConfigError("separation.init (--init) applies when separating with the student, "
                          "not while distilling it")
    check_teacher(cfg, "the distilled settings")  # e.g. a gaussian likelihood from --set
    cfg = student_config(cfg, args.teacher)
    run_uri = storage.join(args.storage, args.name)
    check_run_args(args, cfg)
    if dry_run(cfg, args, {"run": run_uri, "teacher": args.teacher,
                           "workers": args.num_workers, "gpu": args.gpu}):
        return {}
    track = check_run_inputs(args, cfg)  # the teacher's rate, chunk length, stems: the data's
    args.warm_start = None  # `fit` starts the student from the teacher's weights
    log(f"distill: teacher {args.teacher}, {cfg.distill.num_scales} scales, "
        f"{cfg.distill.solver} steps, student sampler {cfg.sampler.num_steps} step(s) from "
        f"sigma {cfg.sampler.sigma_max:g}")
    return fit(args, cfg, run_uri, track, teacher=args.teacher, job="distill")


if __name__ == "__main__":
    cli(main)
