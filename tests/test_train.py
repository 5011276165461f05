"""pipelines.train: 2-worker gloo DDP on S3 storage, recovery from a worker killed from outside,
resume, export, the exported model.ckpt plugging into msdm.separate, and the checks the driver
makes before Ray starts."""

import csv
import io
import os
import signal
import threading
import time

import pytest
import s3fs
import torch
from conftest import processes_named

import msdm
from msdm.checkpoint import CheckpointError, build_denoiser, save
from msdm.config import ConfigError, apply_overrides, get_preset
from pipelines import train


def _history(fs, run):
    return list(csv.DictReader(io.StringIO(fs.cat(f"{run}/metrics.csv").decode())))


def _kill_a_worker_after(fs, marker: str, killed: list, timeout: float = 300) -> None:
    """SIGKILL one Ray Train worker process once `marker` exists in storage."""
    deadline = time.time() + timeout
    while time.time() < deadline and not killed:
        if fs.exists(marker):
            for pid in processes_named("RayTrainWorker"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.2)
        fs.invalidate_cache()


@pytest.mark.slow(seconds=160)
def test_ddp_training_on_s3_recovers_from_a_killed_worker_and_resumes(synth_prepared, s3_bucket):
    data = str(synth_prepared / "prepared")
    storage = f"s3://{s3_bucket}/runs"
    common = ["--data", data, "--storage", storage, "--name", "ddp", "--config", "tiny",
              "--num-workers", "2", "--set", "train.checkpoint_every=8",
              "--set", "train.val_every=8", "--set", "train.log_every=4"]
    fs = s3fs.S3FileSystem()
    run = f"{s3_bucket}/runs/ddp"
    killed: list = []
    killer = threading.Thread(target=_kill_a_worker_after,
                              args=(fs, f"{run}/checkpoint_00000008/state.ckpt", killed))
    killer.start()
    out = train.main(common + ["--max-steps", "24"])  # a worker is killed after checkpoint 8
    killer.join()
    assert killed, "no Ray Train worker was found to kill"
    assert not os.path.exists(f"/proc/{killed[0]}")
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(run)}
    assert {"model.ckpt", "metrics.csv", "loss.png", "config.json"} <= names
    first = _history(fs, run)  # the run recovered from the kill and finished
    assert [int(r["step"]) for r in first] == list(range(4, 25, 4))
    assert out["step"] % 8 == 0

    # same name: resumes at step 24, not 0
    out2 = train.main(common + ["--max-steps", "32"])
    hist = _history(fs, run)
    assert [int(r["step"]) for r in hist] == list(range(4, 33, 4))
    assert hist[:6] == first  # resumed at step 24 with its history, not restarted from 0
    vals = [float(r["val_loss"]) for r in hist if r["val_loss"]]
    print("validation loss per checkpoint:", [round(v, 4) for v in vals])
    assert vals[-1] < vals[0]  # the loss falls
    assert out2["step"] % 8 == 0

    cfg, den = msdm.load_checkpoint(io.BytesIO(fs.cat(f"{run}/model.ckpt")))
    mixture = torch.randn(1, 1, cfg.data.chunk_samples) * 0.1
    est = msdm.separate(den, mixture, 4, msdm.SamplerConfig(num_steps=4, resamples=1))
    assert est.shape == (1, 4, cfg.data.chunk_samples)
    assert torch.isfinite(est).all()
    # stems sum to the mixture up to float32 rounding of the (barely trained) estimates
    tol = 1e-5 + 4 * torch.finfo(torch.float32).eps * est.abs().max()
    assert (est.sum(1, keepdim=True) - mixture).abs().max() <= tol


def test_driver_refuses_bad_runs_before_ray_starts(synth_prepared, tmp_path):
    """#19.4, #19.8, #17: data prepared at another rate, a batch the workers cannot split, and a
    broken or foreign --warm-start are errors in the driver, not retried inside workers."""
    data = str(synth_prepared / "prepared")
    base = ["--data", data, "--storage", str(tmp_path / "runs"), "--name", "x", "--config",
            "tiny"]
    with pytest.raises(ConfigError, match=r"prepared with data.sample_rate=22050"):
        train.main(base + ["--set", "data.sample_rate=16000"])
    with pytest.raises(SystemExit, match="must divide by --num-workers"):
        train.main(base + ["--num-workers", "3"])
    with pytest.raises(SystemExit, match="--threads must be >= 0"):
        train.main(base + ["--threads", "-1"])
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        train.main(base + ["--warm-start", str(junk)])
    other = apply_overrides(get_preset("tiny"), {"model.channels": 32})
    save(tmp_path / "other.ckpt", other, build_denoiser(other))
    with pytest.raises(CheckpointError, match="differs"):
        train.main(base + ["--warm-start", str(tmp_path / "other.ckpt")])
    assert not (tmp_path / "runs" / "x" / "config.json").exists()  # nothing was started


@pytest.mark.slow(seconds=5)
def test_more_workers_than_the_cluster_has_fail_with_a_message(ray_local, synth_prepared,
                                                               tmp_path):
    """#19.11: 16 workers on a 2-CPU cluster is an error naming the resources, not a hang."""
    with pytest.raises(SystemExit, match="needs 4 CPU but the cluster has 2"):
        train.main(["--data", str(synth_prepared / "prepared"), "--storage",
                    str(tmp_path / "r"), "--name", "n", "--config", "tiny", "--num-workers",
                    "16", "--set", "train.batch_size=16"])


@pytest.mark.slow(seconds=15)
def test_training_order_differs_across_epochs_and_seeds(ray_local, synth_prepared):
    """#17: seeded file/block order per epoch and a seeded shuffle buffer: the rows of an epoch
    come in another order in the next epoch and under another seed, and cover the split."""
    import numpy as np

    from msdm.config import load_config
    from pipelines.stages import epoch_batches, train_dataset

    cfg = load_config("tiny")
    uri = str(synth_prepared / "prepared" / "train")

    def order(seed, epoch, ds):
        rows = [b["x"][:, :, :64].reshape(b["x"].shape[0], -1).sum(1).tolist()
                for b in epoch_batches(ds.iterator(), 4, 16, seed * 1000 + epoch)]
        return [round(v, 5) for batch in rows for v in batch]

    one = train_dataset(ray_local, uri, cfg, seed=1, materialize=True)
    two = train_dataset(ray_local, uri, cfg, seed=2, materialize=False)
    first, second, other = order(1, 0, one), order(1, 1, one), order(2, 0, two)
    assert len(first) >= 40 and first != second and first != other
    assert sorted(first) == sorted(second) == sorted(other)  # the same chunks, reordered
    assert np.mean(np.array(first) == np.array(second)) < 0.5
