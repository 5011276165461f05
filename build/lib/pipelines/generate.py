"""Total and partial generation with a trained checkpoint (Ray Data over seeds).

    python -m pipelines.generate --ckpt runs/r1/model.ckpt --output gen/ --num 8 --seconds 12
    python -m pipelines.generate --ckpt runs/r1/model.ckpt --output gen/ --num 4 \
        --given drums=song/drums.wav --given bass=song/bass.wav     # imputation of the rest

Without --given, all stems are sampled from the joint prior (sampler: the `generation` config
section, paper: sigma_max 20, 150 steps, churn 20). With --given, those stems are kept exactly and
the others are generated to fit them (`imputation` section and `impute.method`). Writes
OUTPUT/sample_NNNN/{stem}.wav + mix.wav and OUTPUT/_manifest.jsonl.
"""

from __future__ import annotations

import json

from . import storage
from .common import ckpt_uris, cli, dry_run, init_ray, log, parse_ckpt, parser, resolve_config
from .generation import GenerateBatch, write_sample
from .models import load_model, stable_seed


def build_parser():
    p = parser(__doc__)
    p.add_argument("--ckpt", action="append", required=True, help="model.ckpt, or STEM=URI")
    p.add_argument("--output", required=True)
    p.add_argument("--num", type=int, default=4, help="number of samples")
    p.add_argument("--seconds", type=float, default=None,
                   help="length (default: one training chunk)")
    p.add_argument("--given", action="append", default=[], metavar="STEM=URI",
                   help="a stem to keep fixed (imputation); repeatable")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--gpus-per-actor", type=float, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    return p


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    ckpt = parse_ckpt(args.ckpt)
    base, _ = load_model(ckpt)  # a bad checkpoint fails here, before Ray starts
    if base.model.kind == "hdemucs":
        raise SystemExit(f"--ckpt {ckpt} is a regressor (model.kind hdemucs): it only "
                         "separates; generate needs a diffusion checkpoint")
    cfg = resolve_config(args, base=base)
    given = {}
    for g in args.given:
        stem, sep, uri = g.partition("=")
        if not sep or stem not in cfg.data.stems:
            raise SystemExit(f"--given {g!r}: expected STEM=URI with STEM in {cfg.data.stems}")
        given[stem] = uri
    seconds = args.seconds or cfg.data.chunk_samples / cfg.data.sample_rate
    if dry_run(cfg, args, {"num": args.num, "seconds": seconds, "given": given}):
        return []
    storage.check_writable(args.output)
    mode = f"imputation given {sorted(given)}" if given else "total generation"
    log(f"generate: {args.num} x {seconds:.1f} s, {mode} -> {args.output}")
    ray = init_ray(args, [args.output, *given.values(), *ckpt_uris(ckpt)])
    items = [{"index": i, "seed": stable_seed(args.seed, "generate", i)} for i in range(args.num)]
    ds = ray.data.from_items(items).map_batches(
        GenerateBatch, batch_size=args.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"ckpt": ckpt, "cfg": cfg.to_dict(),
                               "num_gpus": args.gpus_per_actor, "seconds": seconds,
                               "given": given},
        compute=ray.data.ActorPoolStrategy(size=args.actors), num_gpus=args.gpus_per_actor)
    ds = ds.map(write_sample, fn_kwargs={"output": args.output, "stems": cfg.data.stems,
                                         "sample_rate": cfg.data.sample_rate,
                                         "seconds": seconds})
    rows = sorted(ds.take_all(), key=lambda r: r["index"])
    text = "".join(json.dumps({**r, "given": given, "mode": mode}) + "\n" for r in rows)
    storage.write_bytes(storage.join(args.output, "_manifest.jsonl"), text.encode())
    log(f"wrote {len(rows)} samples to {args.output}")
    return rows


if __name__ == "__main__":
    cli(main)
