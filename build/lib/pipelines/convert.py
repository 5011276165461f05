"""Convert a released MSDM checkpoint (PyTorch Lightning .ckpt) to an msdm model.ckpt.

Once: jobs and actors then load a plain weights-only file instead of re-parsing the Lightning
one.

    python -m pipelines.convert --input ckpts/avid-darkness-164/epoch=419-valid_loss=0.014.ckpt \
        --output models/msdm.ckpt
    python -m pipelines.convert --input s3://bkt/released/bass.ckpt --stem bass \
        --output s3://bkt/models/isdm-bass.ckpt                # weakly MSDM: one file per stem
    python -m pipelines.convert --input msdm.ckpt --output m.ckpt --set data.chunk_samples=131072

The architecture comes from the file's hyper_parameters; data and sampler settings default to the
paper's (22 050 Hz, 262 144 samples) and can be changed with --set (model.* cannot). No Ray.
"""

from __future__ import annotations

import argparse
import os

from msdm.checkpoint import build_denoiser, check_size, load_state, save
from msdm.config import load_config

from . import storage
from .common import cli, fetch_local, log


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True, help="released .ckpt (local or s3://)")
    p.add_argument("--output", required=True, help="msdm model.ckpt to write (local or s3://)")
    p.add_argument("--stem", default="", help="the stem of a single-stem (weakly MSDM) checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (e.g. --set data.sample_rate=22050)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    model_keys = [o for o in args.overrides if o.startswith("model.")]
    if model_keys:
        raise SystemExit(f"--set {model_keys[0]}: the architecture comes from the checkpoint")
    local = fetch_local(args.input)  # a temporary copy of an s3:// input, removed after reading
    try:
        state = load_state(local, stem=args.stem)  # CheckpointError: cli() reports it
    finally:
        if local != args.input:
            os.remove(local)
    cfg = load_config(state["config"].to_dict(), args.overrides)
    if args.dry_run:
        print(cfg.to_yaml())
        return {}
    check_size(cfg, args.input)
    denoiser = build_denoiser(cfg)
    denoiser.load_state_dict(state["model"])  # checks that the weights fit before writing
    with storage.open_write(args.output) as f:
        save(f, cfg, denoiser, step=state["step"], extra=state["extra"])
    log(f"convert: {args.input} -> {args.output} (step {state['step']}, "
        f"{'stem ' + cfg.train.stem if cfg.train.stem else 'joint model'})")
    return {"output": args.output, "step": state["step"], "stem": cfg.train.stem}


if __name__ == "__main__":
    cli(main)
