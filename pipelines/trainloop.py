"""The Ray Train worker loop for `pipelines.train` (kept out of __main__ so Ray pickles it by
reference). Every tensor operation is a call into `msdm.training`; Ray lines are marked [ray]."""

from __future__ import annotations

import csv
import io
import os
import tempfile
import time

import numpy as np
import torch

from msdm.checkpoint import build_model, load_state, save
from msdm.config import Config, flatten
from msdm.data import random_crop, random_shift
from msdm.distill import distill_step, make_target, validation_error
from msdm.training import compile_model, make_ema, make_optimizer, train_step, validation_loss

from . import storage
from .stages import epoch_batches
from .tracking import TrainLogger

CSV_FIELDS = ["step", "loss", "val_loss", "samples_per_s", "data_wait", "lr", "elapsed_s"]


def _restore(cfg, model, ema, opt, opts, device, target=None, teacher=None):
    """Resume from Ray's latest checkpoint, else start from the --warm-start weights or, for a
    distillation, the `teacher`'s; returns (step, history). `target`: a distillation's EMA
    target network."""
    import ray.train  # [ray]

    ckpt = ray.train.get_checkpoint()  # [ray] set on retry or when the run folder has one
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_state(os.path.join(d, "state.ckpt"), map_location=device)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        if target is not None:
            target.load_state_dict(state["extra"]["target"])
        return state["step"], list(state["extra"].get("history", []))
    weights = teacher.state_dict() if teacher is not None else None
    if weights is None and opts.get("warm_start"):
        state = load_state(io.BytesIO(storage.read_bytes(opts["warm_start"])), device)
        weights = state["ema"] if state.get("ema") is not None else state["model"]
    if weights is not None:
        for m in (model, ema, target):
            if m is not None:
                m.load_state_dict(weights)
    return 0, []


def _teacher(uri: str, device):
    """The frozen teacher of a distillation (its EMA weights), on the worker's device."""
    from msdm.checkpoint import load_checkpoint

    _, teacher = load_checkpoint(io.BytesIO(storage.read_bytes(uri)), map_location=device,
                                 name=uri)
    return teacher


def _write_csv(uri: str, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(history)
    storage.write_bytes(uri, buf.getvalue().encode())


def quiet_ray_train_reports() -> None:
    """Every worker logs two INFO lines per checkpoint through Ray Train's own loggers
    ("Reporting training result N: TrainingReport(...)", "Checkpoint successfully created at
    ..."), which the driver log repeats; the job prints its own line per checkpoint, so these
    go to WARNING unless --verbose. (Ray's internal module names: skipped if they move.)"""
    import logging

    try:
        from ray.train.v2._internal.execution import context  # [ray]
    except ImportError:
        return
    for name in (context.__file__, "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train  # [ray]
    from ray.train.torch import get_device, prepare_model  # [ray]

    cfg, opts = Config.from_dict(config["cfg"]), config["opts"]
    if not opts.get("verbose"):
        quiet_ray_train_reports()
    ctx = ray.train.get_context()  # [ray]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()  # [ray]
    if opts.get("threads") and device.type == "cpu":
        torch.set_num_threads(opts["threads"])  # Ray pins a worker to OMP_NUM_THREADS = its CPUs
    if device.type == "cuda":  # the fp32 parts (optimizer, EMA, loss) may use TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    denoiser = build_model(cfg).to(device)  # model.kind: U-Net denoiser or regressor
    ema = make_ema(denoiser)  # the EMA copy (validation, export) stays eager
    if cfg.train.compile:
        compile_model(denoiser)
    opt = make_optimizer(denoiser, cfg)
    teacher = _teacher(opts["teacher"], device) if opts.get("teacher") else None
    target = make_target(denoiser, cfg) if teacher is not None else None  # None: the student
    step, history = _restore(cfg, denoiser, ema, opt, opts, device, target, teacher)
    model = prepare_model(denoiser)  # [ray] DDP (gloo on CPU, nccl on GPU) when world > 1
    # a copy: the object store's array is read-only
    val_x = torch.tensor(ray.get(opts["val_ref"]), device=device) if rank == 0 else None  # [ray]
    gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank + 7919 * step)
    per_worker = cfg.train.batch_size // world  # the driver checked that it divides
    shard = ray.train.get_dataset_shard("train")  # [ray]
    tracker = TrainLogger(opts["tracking"], opts["run_uri"], opts["name"],
                          flatten(cfg.to_dict()), rank) if opts.get("tracking") else None
    t_start, last_log, waited, samples = time.time(), time.time(), 0.0, 0
    first_step, val = step, {}
    tag = opts.get("job", "train")  # the progress lines' prefix: train or distill
    if rank == 0:
        print(f"[{tag}] world {world}, {per_worker} chunks per worker, device {device}, "
              f"{'resuming at step ' + str(step) if step else 'starting at step 0'}", flush=True)
    while step < cfg.train.max_steps:
        t_wait = time.time()
        seed = cfg.train.seed * 1000 + rank + 7919 * step  # a new row order every epoch
        for batch in epoch_batches(shard, per_worker, cfg.train.shuffle_buffer, seed):  # [ray]
            waited += time.time() - t_wait
            x = batch["x"].to(device, non_blocking=True)
            if cfg.data.train_samples:
                x = random_crop(x, cfg.data.train_samples, gen)
            if cfg.data.random_shift:
                x = random_shift(x, gen)
            if teacher is not None:  # pipelines.distill: consistency distillation
                loss, _ = distill_step(model, target, teacher, x, opt, cfg, gen, ema, step)
            else:
                loss = train_step(model, x, opt, cfg, gen, ema, step)
            step += 1
            samples += x.shape[0] * world
            done = step >= cfg.train.max_steps
            validated = step % cfg.train.val_every == 0 or step % cfg.train.checkpoint_every == 0
            if validated or done:
                check = validation_error if teacher is not None else validation_loss
                val, validated = (check(ema, val_x, cfg) if rank == 0 else {}), True
            if step % cfg.train.log_every == 0 or step % cfg.train.checkpoint_every == 0 or done:
                now = time.time()
                row = {"step": step, "loss": float(loss),  # val_loss only where validated
                       "val_loss": val.get("val_loss", "") if validated else "",
                       "samples_per_s": samples / max(now - last_log, 1e-9),
                       "data_wait": waited / max(now - last_log, 1e-9),
                       "lr": opt.param_groups[0]["lr"], "elapsed_s": now - t_start}
                history.append(row)
                if tracker is not None:
                    tracker.log(row)
                if rank == 0:
                    vl = f"{row['val_loss']:.4f}" if row["val_loss"] != "" else "-"
                    eta = (cfg.train.max_steps - step) * (now - t_start) / (step - first_step)
                    print(f"[{tag}] step {step}/{cfg.train.max_steps} loss {row['loss']:.4f} "
                          f"val {vl} {row['samples_per_s']:.1f} samples/s "
                          f"wait {100 * row['data_wait']:.1f}% lr {row['lr']:.2g} "
                          f"ETA {_clock(eta)}", flush=True)
                last_log, waited, samples = now, 0.0, 0
            if step % cfg.train.checkpoint_every == 0 or done:
                _checkpoint(cfg, denoiser, ema, opt, step, history, val, opts, rank, target)
            if done:
                break
            t_wait = time.time()
    if tracker is not None:  # the run's exported checkpoint (the best by validation loss)
        tracker.finish(storage.join(opts["run_uri"], "model.ckpt"))


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _checkpoint(cfg, denoiser, ema, opt, step, history, val, opts, rank, target=None) -> None:
    import ray.train  # [ray]

    metrics = {"step": step, "val_loss": float(val.get("val_loss", np.inf))}
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            extra = {"history": history}
            if target is not None:
                extra["target"] = target.state_dict()
            save(os.path.join(d, "state.ckpt"), cfg, denoiser, ema, step, opt, extra=extra)
            checkpoint = ray.train.Checkpoint.from_directory(d)  # [ray]
            _write_csv(opts["metrics_uri"], history)
        ray.train.report(metrics, checkpoint=checkpoint,  # [ray] every rank: it is a barrier
                         checkpoint_dir_name=f"checkpoint_{step:08d}")
