"""Sweep sampler settings for separation quality with Ray Tune + HyperOpt.

    python -m pipelines.tune --ckpt runs/r1/model.ckpt --data data/prepared \
        --space tune_spaces/dirac.yaml --num-samples 24 --storage sweeps --name dirac-1
    ray job submit --working-dir . -- python -m pipelines.tune --ckpt s3://... --data s3://... \
        --space tune_spaces/cost_aware.yaml --storage s3://bkt/sweeps --name cheap-1

Each trial separates the same validation chunks with the same seeds and reports windowed
SI-SDRi, NFE and a cost-aware score. Writes STORAGE/NAME/{best.yaml, trials.csv, trials.md,
si_sdri_vs_nfe.png}; best.yaml plugs into evaluate/separate --sampler-config. Re-running with
the same --name resumes the sweep.
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

import numpy as np
import yaml

from msdm.config import ConfigError, config_keys
from msdm.metrics import window_starts

from . import storage, tracking
from .common import (
    add_init,
    ckpt_uris,
    cli,
    dry_run,
    init_ray,
    log,
    parse_ckpt,
    parser,
    resolve_config,
    write_json,
)
from .models import load_model
from .report import plot_nfe
from .stages import no_windows, read_chunks
from .sweep import sweep_trial

KINDS = ("choice", "uniform", "loguniform", "randint", "quniform")


def space_dirs() -> list[Path]:
    """Where named spaces live: the checkout's tune_spaces/, or the copy an installed package
    carries (pipelines/tune_spaces/)."""
    here = Path(__file__).resolve().parent
    return [d for d in (here.parent / "tune_spaces", here / "tune_spaces") if d.is_dir()]


def resolve_space(spec: str) -> str:
    """--space as given: a YAML file (local or s3://), or the name of a packaged space."""
    if storage.is_remote(spec) or os.path.exists(spec):
        return spec
    name = spec.removesuffix(".yaml").split("/")[-1]
    for folder in space_dirs():
        if (folder / f"{name}.yaml").is_file():
            return str(folder / f"{name}.yaml")
    known = sorted({f.stem for d in space_dirs() for f in d.glob("*.yaml")})
    raise ConfigError(f"--space {spec}: no such file, and no packaged space of that name "
                      f"(known: {', '.join(known) or 'none'})")


def load_space(path: str) -> dict:
    """Read a tune_spaces YAML; every key must be a config field and every kind known."""
    path = resolve_space(path)
    try:
        spec = yaml.safe_load(storage.read_bytes(path).decode()) or {}
    except (storage.StorageError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the search space ({e})") from e
    if not isinstance(spec, dict) or not isinstance(spec.get("space"), dict) or not spec["space"]:
        raise ConfigError(f"{path}: needs a non-empty 'space' mapping")
    unknown = sorted(set(spec["space"]) - config_keys())
    if unknown:
        raise ConfigError(f"{path}: keys {unknown} are not config fields")
    for key, dist in spec["space"].items():
        if isinstance(dist, dict) and (len(dist) != 1 or next(iter(dist)) not in KINDS):
            raise ConfigError(f"{path}: {key}: expected one of {KINDS} or a plain value")
    points = spec.get("points_to_evaluate") or []
    swept = {k for k, d in spec["space"].items() if isinstance(d, dict)}
    for point in points:  # first trials (known-good settings): every swept key, nothing else
        if not isinstance(point, dict) or set(point) != swept:
            raise ConfigError(f"{path}: each of points_to_evaluate must set exactly the swept "
                              f"keys {sorted(swept)}")
    return spec


def to_tune(space: dict) -> dict:
    """{kind: args} -> tune.<kind>(...): choice takes the list, the others unpack it."""
    from ray import tune

    out = {}
    for key, v in space.items():
        if not isinstance(v, dict):
            out[key] = v
            continue
        kind, a = next(iter(v.items()))
        out[key] = tune.choice(list(a)) if kind == "choice" else getattr(tune, kind)(*a)
    return out


def build_parser():
    p = parser(__doc__)
    p.add_argument("--ckpt", action="append", required=True, help="model.ckpt, or STEM=URI")
    p.add_argument("--data", required=True, help="prepared dataset root")
    p.add_argument("--split", default="validation")
    p.add_argument("--space", required=True,
                   help="a search-space YAML file, or the name of a packaged one (cost_aware, "
                        "dirac, refine, demo, ...: tune_spaces/NAME.yaml)")
    p.add_argument("--num-samples", type=int, default=None, help="trials (default: the space's)")
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="trials at once (default: as many as the cluster fits, <= 8)")
    p.add_argument("--max-chunks", type=int, default=32,
                   help="validation chunks per trial: the first N of the split (0 = all; the "
                        "driver holds them in memory and hands every trial the whole set)")
    p.add_argument("--gpus-per-trial", type=float, default=0,
                   help="GPUs per trial; requested from the autoscaler when the cluster has none")
    p.add_argument("--cpus-per-trial", type=float, default=None,
                   help="CPUs per trial (default: 1, 0.5 with --smoke-test)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--storage", required=True)
    p.add_argument("--name", required=True, help="sweep name; an existing name resumes")
    add_init(p)
    tracking.add_argument(p)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    ckpt = parse_ckpt(args.ckpt)
    spec = load_space(args.space)
    base, _ = load_model(ckpt)  # a bad checkpoint fails here, before Ray starts
    cfg = resolve_config(args, base=base)
    num_samples = args.num_samples or int(spec.get("num_samples", 16))
    if dry_run(cfg, args, {"space": spec, "num_samples": num_samples}):
        return {}
    track = tracking.parse(args.tracking, args.experiment)  # a bad backend fails before Ray
    tracking.check(track)
    if not track.tensorboard:  # Tune adds its TensorBoard logger unless told not to
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    val = read_chunks(storage.join(args.data, args.split), cfg.data.stems, args.max_chunks)
    _check_windows(val, cfg)
    sweep_uri = storage.join(args.storage, args.name)
    ray = init_ray(args, [args.storage, *ckpt_uris(ckpt)])
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.hyperopt import HyperOptSearch

    cpus = args.cpus_per_trial or (0.5 if args.smoke_test else 1.0)
    concurrent = _concurrency(ray, args, cpus, num_samples)
    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, ckpt=ckpt, base=cfg.to_dict(), val=val,
                             seed=args.seed, cost_per_nfe=float(spec.get("cost_per_nfe", 0.0)),
                             num_gpus=args.gpus_per_trial, batch_size=args.batch_size),
        {"cpu": cpus, "gpu": args.gpus_per_trial})
    fs, path = storage.pyarrow_fs(args.storage)
    metric, mode = spec.get("metric", "si_sdri"), spec.get("mode", "max")
    if tune.Tuner.can_restore(f"{path}/{args.name}", storage_filesystem=fs):
        log(f"tune: resuming sweep {sweep_uri}")
        tuner = tune.Tuner.restore(f"{path}/{args.name}", trainable, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        searcher = HyperOptSearch(n_initial_points=max(2, min(10, num_samples // 3)),
                                  random_state_seed=args.seed,
                                  points_to_evaluate=spec.get("points_to_evaluate"))
        tuner = tune.Tuner(
            trainable, param_space=to_tune(spec["space"]),
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, num_samples=num_samples, reuse_actors=True,
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrent)),
            run_config=tune.RunConfig(name=args.name, storage_path=path, storage_filesystem=fs,
                                      verbose=0, callbacks=[_progress(tune, num_samples),
                                                            *tracking.tune_callbacks(track)]))
        log(f"tune: {num_samples} trials of {args.space} on {len(val['x'])} chunks, "
            f"{concurrent} at once -> {sweep_uri}")
    grid = tuner.fit()
    return _write_outputs(grid, spec, sweep_uri, metric, mode)


def _check_windows(val: dict, cfg) -> None:
    """Every trial would score nothing (and report no number) when no track of the chunks read
    is long enough for one window of the protocol: say so before Ray starts."""
    tracks, counts = np.unique(val["track_id"], return_counts=True)
    samples = [int(n) * cfg.data.chunk_samples for n in counts]
    sr = cfg.data.sample_rate
    if not any(window_starts(n, round(4.0 * sr), round(2.0 * sr)) for n in samples):
        raise ConfigError("tune: " + no_windows([n / sr for n in samples],
                                                cfg.data.chunk_samples / sr))


def _progress(tune, total: int):
    """A driver-side callback printing one line per finished trial, with an ETA."""

    class Progress(tune.Callback):
        def __init__(self):
            self.t0, self.done = time.time(), 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            m = trial.last_result or {}
            eta = (total - self.done) * (time.time() - self.t0) / self.done
            log(f"  trial {self.done}/{total}: SI-SDRi {m.get('si_sdri', float('nan')):.2f} dB "
                f"at NFE {m.get('nfe', '?')}, ETA {int(eta // 60)}:{int(eta % 60):02d}")

    return Progress()


def _concurrency(ray, args, cpus: float, num_samples: int) -> int:
    """Trials at once: --max-concurrent, else what the cluster fits. GPU trials on a cluster
    without GPUs are requested from the autoscaler instead of silently running on CPU."""
    if args.max_concurrent:
        want = args.max_concurrent
    else:
        have = ray.cluster_resources()
        fit = have.get("GPU", 0) / args.gpus_per_trial if args.gpus_per_trial else \
            have.get("CPU", 1) / cpus
        want = max(1, min(8, num_samples, int(fit) or 1))
    if args.gpus_per_trial:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"GPU": args.gpus_per_trial, "CPU": cpus}] * want)
    return want


def _write_outputs(grid, spec, sweep_uri, metric, mode) -> dict:
    keys = list(spec["space"])
    trials = []
    for r in grid:
        if r.error or not r.metrics or metric not in r.metrics:
            continue
        trials.append({**{k: r.config.get(k) for k in keys},
                       **{m: r.metrics.get(m) for m in ("si_sdri", "nfe", "score", "windows",
                                                         "diverged")}})
    if not trials:
        raise SystemExit(f"no trial finished; errors: {[str(e)[-400:] for e in grid.errors]}")
    trials.sort(key=lambda t: t[metric], reverse=(mode == "max"))
    best = trials[0]
    nested: dict = {}
    for k in keys:
        sec, field = k.split(".", 1)
        nested.setdefault(sec, {})[field] = best[k]
    head = (f"# best of {len(trials)} trials: {metric} {best[metric]:.3f}, "
            f"si_sdri {best['si_sdri']:.2f} dB at NFE {best['nfe']}\n")
    storage.write_bytes(storage.join(sweep_uri, "best.yaml"),
                        (head + yaml.safe_dump(nested, sort_keys=True)).encode())
    buf = io.StringIO()
    w = csv.DictWriter(buf, list(trials[0]))
    w.writeheader()
    w.writerows(trials)
    storage.write_bytes(storage.join(sweep_uri, "trials.csv"), buf.getvalue().encode())
    cols = list(trials[0])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(_fmt(t[c]) for c in cols) + " |" for t in trials]
    storage.write_bytes(storage.join(sweep_uri, "trials.md"), ("\n".join(md) + "\n").encode())
    plot_nfe([(t["nfe"], t["si_sdri"], "") for t in trials],
             storage.join(sweep_uri, "si_sdri_vs_nfe.png"))
    write_json(storage.join(sweep_uri, "best.json"), best)
    log(f"best: {best}")
    return {"best": best, "trials": trials, "failed": len(grid.errors)}


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    cli(main)
