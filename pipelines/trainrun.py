"""The Ray part shared by `pipelines.train` and `pipelines.distill` (not an entrypoint): start
Ray, run the Ray Train TorchTrainer over the prepared Parquet chunks with resume, checkpoints and
failure recovery, export the best EMA weights as RUN/model.ckpt and plot the loss."""

from __future__ import annotations

import io
import json
import os
import signal
import threading

import numpy as np

from msdm.checkpoint import CheckpointError, load_state, save
from msdm.config import ConfigError

from . import storage, tracking
from .common import autoscaling, init_ray, log, write_json
from .report import plot_loss
from .stages import read_chunks, train_dataset
from .trainloop import train_loop_per_worker


def add_run_arguments(p) -> None:
    """The arguments of a Ray Train run: data, storage, name, workers, resources, tracking."""
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
    p.add_argument("--max-failures", type=int, default=3, help="worker failures to recover from")
    p.add_argument("--object-store-mb", type=float, default=0,
                   help="object store of the local cluster this job starts (ignored with "
                        "--address; default: Ray's, 30 %% of RAM)")
    tracking.add_argument(p)


def check_run_args(args, cfg) -> None:
    """Worker arguments the config must fit: a global batch the workers split evenly."""
    if args.num_workers < 1 or cfg.train.batch_size % args.num_workers:
        raise SystemExit(f"train.batch_size ({cfg.train.batch_size}) is the global batch: it "
                         f"must divide by --num-workers ({args.num_workers})")
    if args.threads < 0:
        raise SystemExit(f"--threads must be >= 0 (0 = the worker's CPUs), got {args.threads}")


def check_run_inputs(args, cfg):
    """Before Ray: the tracking backend, the data (readable, prepared with the config's rate,
    chunk length and stems) and the storage (writable). Returns the parsed tracking."""
    track = tracking.parse(args.tracking, args.experiment)  # a bad backend fails before Ray
    tracking.check(track)
    storage.check_readable(storage.join(args.data, "train"))
    storage.check_writable(args.storage)
    check_data(args.data, cfg)
    return track


def _validation_chunks(data_uri: str, cfg) -> np.ndarray:
    """The first train.val_chunks chunks of DATA/validation (file order), [N, S, T]: fixed."""
    split = storage.join(data_uri, "validation")
    if not storage.listdir(split):
        log(f"no {split}: validating on the first chunks of the train split")
        split = storage.join(data_uri, "train")
    return read_chunks(split, cfg.data.stems, cfg.train.val_chunks, cfg.train.stem)["x"]


def check_data(data_uri: str, cfg) -> None:
    """The prepared data must have been made with this config's rate, chunk length and stems."""
    uri = storage.join(data_uri, "_report.json")
    if not storage.exists(uri):
        log(f"warning: {uri} not found; cannot check the data's sample rate and chunk length")
        return
    try:
        report = json.loads(storage.read_bytes(uri))
    except ValueError as e:
        raise ConfigError(f"{uri}: not valid JSON ({e})") from e
    want = {"sample_rate": cfg.data.sample_rate, "chunk_samples": cfg.data.chunk_samples,
            "stems": list(cfg.data.stems)}
    bad = {k: (report.get(k), v) for k, v in want.items() if report.get(k) != v}
    if bad:
        raise ConfigError(f"{data_uri} was prepared with " + ", ".join(
            f"data.{k}={got}" for k, (got, _) in bad.items()) + " but the config says "
            + ", ".join(f"data.{k}={v}" for k, (_, v) in bad.items())
            + ": prepare it again with this config, or train with the data's settings")


def _export_best(result, run_uri: str) -> dict:
    """Copy the best checkpoint's EMA weights to RUN/model.ckpt (one self-contained file)."""
    best = min(result.best_checkpoints, key=lambda cm: cm[1].get("val_loss", np.inf))
    with best[0].as_directory() as d:
        try:
            state = load_state(f"{d}/state.ckpt")
        except CheckpointError as e:  # the run's own checkpoint: a fault, not the user's input
            raise RuntimeError(f"cannot export the best checkpoint {d}: {e}") from e
    from msdm.checkpoint import build_model

    cfg = state["config"]
    ema = build_model(cfg)
    ema.load_state_dict(state["ema"])
    buf = io.BytesIO()
    save(buf, cfg, ema, None, state["step"], extra={"val_loss": best[1].get("val_loss")})
    storage.write_bytes(storage.join(run_uri, "model.ckpt"), buf.getvalue())
    return {"step": state["step"], "val_loss": best[1].get("val_loss")}


def fit(args, cfg, run_uri: str, track, teacher: str | None = None, job: str = "train") -> dict:
    """The Ray part of `train` and `distill`: write config.json, start Ray, run the TorchTrainer
    (resuming from RUN's latest checkpoint), export the best EMA weights as RUN/model.ckpt and
    plot the loss. `teacher`: distil from that checkpoint (pipelines.distill) instead."""
    resuming = any(n.startswith("checkpoint_") for n in storage.listdir(run_uri))
    log(f"{job}: run {run_uri} ({'resuming' if resuming else 'new run'}), "
        f"{args.num_workers} worker(s), {'GPU' if args.gpu else 'CPU'}")
    write_json(storage.join(run_uri, "config.json"), cfg.to_dict())

    ray = init_ray(args, [args.data, args.storage, args.warm_start, teacher])
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _check_resources(ray, args)
    val_ref = ray.put(_validation_chunks(args.data, cfg))
    small = _dataset_bytes(storage.join(args.data, "train")) < 0.25 * _object_store_bytes(ray)
    train_ds = train_dataset(ray, storage.join(args.data, "train"), cfg,
                             cfg.train.seed + _latest_step(run_uri), materialize=small)
    if small:  # read once, not once per epoch
        log(f"train split materialised in the object store ({train_ds.count()} chunks)")
    cpus = args.cpus_per_worker or _default_cpus(ray, args.num_workers)
    resources = {"CPU": cpus, **({"GPU": 1} if args.gpu else {})}
    fs, path = storage.pyarrow_fs(args.storage)
    # Ray Train's print patch sends every worker line to the driver twice (stdout + its logger)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "opts": {
            "val_ref": val_ref, "warm_start": args.warm_start, "threads": args.threads,
            "teacher": teacher, "job": job,
            "verbose": args.verbose, "tracking": track.to_dict(), "run_uri": run_uri,
            "name": args.name, "metrics_uri": storage.join(run_uri, "metrics.csv")}},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=args.name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep,
                                               checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=args.max_failures)),
        datasets={"train": train_ds},
    )
    result = _fit(trainer)
    best = _export_best(result, run_uri)
    plot_loss(storage.join(run_uri, "metrics.csv"), storage.join(run_uri, "loss.png"))
    log(f"done: best val_loss {best['val_loss']:.4f} at step {best['step']}; "
        f"exported {storage.join(run_uri, 'model.ckpt')}")
    return {"run": run_uri, **best, "metrics": dict(result.metrics or {})}


def _fit(trainer):
    """trainer.fit(), with this process's Ctrl-C handler put back afterwards. Ray Train installs
    its own, which holds the run's controller actor: while it is installed, the controller and
    the Ray Data actors it owns (~3 processes, a few hundred MB) outlive the run in a driver
    that goes on (make demo, bench-quality, notebooks), and a later Ctrl-C only "aborts" the
    finished run instead of interrupting the driver."""
    # None: a handler not installed from Python, which cannot be put back from Python either
    previous = (signal.getsignal(signal.SIGINT)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        return trainer.fit()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _latest_step(run_uri: str) -> int:
    """Step of the run's newest checkpoint (0 for a new run): seeds a new data order on resume."""
    steps = [int(n.split("_")[1]) for n in storage.listdir(run_uri)
             if n.startswith("checkpoint_") and n.split("_")[1].isdigit()]
    return max(steps, default=0)


def _dataset_bytes(uri: str) -> int:
    fs, path = storage.get_fs(uri)
    return sum(fs.du(path, total=False).values()) if fs.exists(path) else 0


def _object_store_bytes(ray) -> float:
    return ray.cluster_resources().get("object_store_memory", 0)


def _check_resources(ray, args) -> None:
    """Fail with a message, not an endless retry, when the cluster cannot host the workers."""
    have = ray.cluster_resources()
    need = {"GPU": args.num_workers if args.gpu else 0,
            "CPU": args.num_workers * (args.cpus_per_worker or 0.25)}
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if v > have.get(k, 0)}
    if short and not autoscaling():
        raise SystemExit("train: --num-workers " + str(args.num_workers) + " needs " + ", ".join(
            f"{v:g} {k} but the cluster has {h:g}" for k, (v, h) in short.items())
            + "; lower --num-workers/--cpus-per-worker or add nodes")


def _default_cpus(ray, num_workers: int) -> float:
    """Leave at least one CPU of the cluster to Ray Data, or the run waits forever for a read."""
    total = ray.cluster_resources().get("CPU", 1)
    return max(0.25, min(8.0, int(4 * (total - 1) / num_workers) / 4))
