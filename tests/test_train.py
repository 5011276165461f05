"""pipelines.train: 2-worker gloo DDP on S3 storage, fault recovery, resume, export, and the
exported model.ckpt plugging into msdm.separate."""

import csv
import io

import pytest
import s3fs
import torch

import msdm
from pipelines import train


def _history(fs, run):
    return list(csv.DictReader(io.StringIO(fs.cat(f"{run}/metrics.csv").decode())))


@pytest.mark.slow
def test_ddp_training_on_s3_recovers_from_a_killed_worker_and_resumes(synth_prepared, s3_bucket,
                                                                      capfd):
    data = str(synth_prepared / "prepared")
    storage = f"s3://{s3_bucket}/runs"
    common = ["--data", data, "--storage", storage, "--name", "ddp", "--config", "tiny",
              "--num-workers", "2", "--set", "train.checkpoint_every=8",
              "--set", "train.val_every=8", "--set", "train.log_every=4"]
    # rank 1 dies at step 12 of the first attempt; the run restarts from checkpoint 8
    out = train.main(common + ["--max-steps", "16", "--set", "train.fault_step=12"])
    assert out["step"] in (8, 16)
    assert "fault injection: rank 1 exits at step 12" in capfd.readouterr().out
    fs = s3fs.S3FileSystem()
    run = f"{s3_bucket}/runs/ddp"
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(run)}
    assert {"checkpoint_00000008", "checkpoint_00000016", "model.ckpt", "metrics.csv",
            "loss.png", "config.json"} <= names
    first = _history(fs, run)
    assert [int(r["step"]) for r in first][-1] == 16

    # same name: resumes at step 16, not 0
    out2 = train.main(common + ["--max-steps", "24"])
    log = capfd.readouterr().out
    assert "resuming at step 16" in log
    hist = _history(fs, run)
    steps = [int(r["step"]) for r in hist]
    assert steps == [4, 8, 12, 16, 20, 24]  # one history across the failure and the resume
    vals = [float(r["val_loss"]) for r in hist if r["val_loss"]]
    print("validation loss per checkpoint:", [round(v, 4) for v in vals])
    assert vals[-1] < vals[0]  # the loss falls
    assert out2["step"] in (8, 16, 24)

    cfg, den = msdm.load_checkpoint(io.BytesIO(fs.cat(f"{run}/model.ckpt")))
    mixture = torch.randn(1, 1, cfg.data.chunk_samples) * 0.1
    est = msdm.separate(den, mixture, 4, msdm.SamplerConfig(num_steps=4, resamples=1))
    assert est.shape == (1, 4, cfg.data.chunk_samples)
    assert torch.isfinite(est).all()
    # stems sum to the mixture up to float32 rounding of the (barely trained) estimates
    tol = 1e-5 + 4 * torch.finfo(torch.float32).eps * est.abs().max()
    assert (est.sum(1, keepdim=True) - mixture).abs().max() <= tol
