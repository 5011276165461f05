"""Experiment tracking: TensorBoard event files (read back with TensorBoard's reader), a real
local MLflow store (read back with its client) and W&B in offline mode, from train and tune."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import yaml

from msdm.config import ConfigError
from pipelines import train, tune

ROOT = Path(__file__).resolve().parents[1]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow_runs(uri: str, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def test_bad_tracking_fails_before_training_starts(synth_prepared, tmp_path):
    base = ["--data", str(synth_prepared / "prepared"), "--storage", str(tmp_path / "runs"),
            "--name", "x", "--config", "tiny", "--max-steps", "2"]
    with pytest.raises(ConfigError, match="unknown backend 'tensorbored'"):
        train.main(base + ["--tracking", "tensorbored"])
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot write the MLflow store"):
        train.main(base + ["--tracking", f"mlflow:file:{blocker}/mlruns"])
    assert not (tmp_path / "runs" / "x").exists()  # nothing was started


@pytest.mark.slow(seconds=40)
def test_train_logs_loss_lr_and_validation_to_tensorboard_mlflow_and_wandb(
        ray_local, synth_prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    store = f"file:{tmp_path / 'mlruns'}"
    out = train.main(["--data", str(synth_prepared / "prepared"), "--storage",
                      str(tmp_path / "runs"), "--name", "t1", "--config", "tiny",
                      "--max-steps", "8", "--set", "train.log_every=2", "--set",
                      "train.val_every=4", "--set", "train.checkpoint_every=4",
                      "--tracking", f"mlflow:{store}", "--tracking", "wandb",
                      "--experiment", "tracked"])
    run = tmp_path / "runs" / "t1"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    tb = _scalars(run / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == [int(r["step"]) for r in rows]
    for (_, v), r in zip(tb["train/loss"], rows):
        assert v == pytest.approx(float(r["loss"]), rel=1e-5)
    assert [s for s, _ in tb["train/val_loss"]] == [int(r["step"]) for r in rows if r["val_loss"]]
    assert [v for _, v in tb["train/lr"]] == pytest.approx([float(r["lr"]) for r in rows])
    client, runs = _mlflow_runs(store, "tracked")
    assert len(runs) == 1
    r = runs[0]
    assert r.data.params["train.max_steps"] == "8" and r.data.params["model.channels"]
    history = client.get_metric_history(r.info.run_id, "loss")
    assert [(m.step, round(m.value, 5)) for m in history] == \
        [(int(x["step"]), round(float(x["loss"]), 5)) for x in rows]
    assert r.data.tags["final_checkpoint"] == out["run"] + "/model.ckpt"
    assert (run / "model.ckpt").exists()
    offline = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


@pytest.mark.slow(seconds=35)
def test_tune_logs_si_sdri_and_nfe_per_trial(synth_prepared, tiny_unet_ckpt, tmp_path):
    space = yaml.safe_load((ROOT / "tune_spaces" / "cost_aware.yaml").read_text())
    space["space"]["sampler.num_steps"] = {"choice": [2, 3]}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    store = f"file:{tmp_path / 'mlruns'}"
    res = tune.main(["--ckpt", str(tiny_unet_ckpt), "--data", str(synth_prepared / "prepared"),
                     "--space", str(tmp_path / "space.yaml"), "--num-samples", "2",
                     "--storage", str(tmp_path / "sweeps"), "--name", "s", "--max-chunks",
                     "12", "--smoke-test", "--tracking", f"mlflow:{store}", "--experiment",
                     "sweep"])
    logged = sorted((round(v["si_sdri"][0][1], 4), v["nfe"][0][1]) for v in (
        {k.removeprefix("ray/tune/"): x for k, x in _scalars(d).items()}
        for d in (tmp_path / "sweeps" / "s").glob("sweep_trial_*")))
    assert logged == sorted((round(t["si_sdri"], 4), t["nfe"]) for t in res["trials"])
    client, runs = _mlflow_runs(store, "sweep")
    assert sorted(round(r.data.metrics["si_sdri"], 4) for r in runs) == \
        sorted(round(t["si_sdri"], 4) for t in res["trials"])
    assert all("nfe" in r.data.metrics for r in runs)


def test_tracking_none_and_names_resolve(tmp_path):
    from pipelines import tracking

    t = tracking.parse(["none"])
    assert not t.tensorboard and not t.mlflow and not t.wandb
    t = tracking.parse(["mlflow"])
    assert t.mlflow == "file:" + os.path.abspath("mlruns") and t.tensorboard
    assert tracking.parse(["mlflow:http://host:5000"]).mlflow == "http://host:5000"
