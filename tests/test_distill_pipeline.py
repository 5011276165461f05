"""pipelines.distill: the driver's refusals before Ray starts, a distillation killed mid-run
that recovers and resumes, and the student checkpoint through evaluate, separate and --init."""

from __future__ import annotations

import csv
import os
import signal
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import processes_named
from test_separate import _residual_db, _song

from msdm.checkpoint import CheckpointError, build_model, load_state, save
from msdm.config import ConfigError, apply_overrides, get_preset
from msdm.distill import student_config
from pipelines import distill, evaluate, separate


def _history(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow(seconds=20)  # the session fixture prepares its data on first use
def test_driver_refuses_teachers_before_ray_starts(synth_prepared, tiny_unet_ckpt, tmp_path):
    data = str(synth_prepared / "prepared")
    base = ["--data", data, "--storage", str(tmp_path / "runs"), "--name", "x"]
    tiny = get_preset("tiny")

    def ckpt(name, cfg):
        save(tmp_path / name, cfg, build_model(cfg))
        return str(tmp_path / name)

    with pytest.raises(ConfigError, match="regressor"):
        distill.main(base + ["--teacher", ckpt("reg.ckpt", apply_overrides(
            tiny, {"model.kind": "hdemucs"}))])
    with pytest.raises(ConfigError, match="itself a distilled student"):
        distill.main(base + ["--teacher", ckpt("student.ckpt", student_config(tiny, "t.ckpt"))])
    with pytest.raises(ConfigError, match="prepared with data.sample_rate=22050"):
        distill.main(base + ["--teacher", ckpt("rate.ckpt", apply_overrides(
            tiny, {"data.sample_rate": 16000}))])
    with pytest.raises(ConfigError, match="prepared with .*data.stems"):
        distill.main(base + ["--teacher", ckpt("stems.ckpt", apply_overrides(
            tiny, {"data.stems": ["bass", "drums", "other"]}))])
    with pytest.raises(ConfigError, match="model.channels: fixed by the checkpoint"):
        distill.main(base + ["--teacher", str(tiny_unet_ckpt), "--set", "model.channels=64"])
    with pytest.raises(ConfigError, match="likelihood"):
        distill.main(base + ["--teacher", str(tiny_unet_ckpt), "--set",
                             "separation.likelihood=gaussian"])
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        distill.main(base + ["--teacher", str(junk)])
    assert not (tmp_path / "runs" / "x").exists()  # nothing was started


def _kill_a_worker_after(marker, killed: list, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not killed:
        if marker.exists():
            for pid in processes_named("RayTrainWorker"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.2)


@pytest.mark.slow(seconds=60)
def test_distill_recovers_resumes_and_the_student_plugs_in(ray_local, synth_prepared,
                                                           tiny_unet_ckpt, tmp_path):
    data = synth_prepared / "prepared"
    runs = tmp_path / "runs"
    common = ["--teacher", str(tiny_unet_ckpt), "--data", str(data), "--storage", str(runs),
              "--name", "s", "--set", "train.checkpoint_every=4", "--set", "train.val_every=4",
              "--set", "train.log_every=2", "--set", "train.val_chunks=4",
              "--set", "distill.num_scales=6", "--set", "separation.constrained=1"]
    killed: list = []
    killer = threading.Thread(target=_kill_a_worker_after,
                              args=(runs / "s" / "checkpoint_00000004" / "state.ckpt", killed))
    killer.start()
    distill.main(common + ["--max-steps", "8"])  # the worker is killed after checkpoint 4
    killer.join()
    assert killed, "no Ray Train worker was found to kill"
    first = _history(runs / "s")
    assert [int(r["step"]) for r in first] == [2, 4, 6, 8]
    distill.main(common + ["--max-steps", "12"])  # same name: resumes at step 8
    hist = _history(runs / "s")
    assert [int(r["step"]) for r in hist] == [2, 4, 6, 8, 10, 12] and hist[:4] == first
    assert all(float(r["val_loss"]) > 0 for r in hist if r["val_loss"])

    student = runs / "s" / "model.ckpt"
    state = load_state(student)
    cfg = state["config"]
    assert cfg.sampler.solver == "consistency" and cfg.sampler.num_steps == 2
    assert cfg.distill.teacher == str(tiny_unet_ckpt) and cfg.separation.constrained == 1
    teacher = load_state(tiny_unet_ckpt)["model"]  # the (EMA-less) teacher's weights
    assert any(not torch.equal(teacher[k], v) for k, v in state["model"].items())  # it learned

    out = evaluate.main(["--ckpt", str(student), "--data", str(data), "--output",
                         str(tmp_path / "eval"), "--max-chunks", "0", "--batch-size", "4"])
    assert out["configs"][0]["nfe"] == 2 and np.isfinite(out["si_sdri"]["all"])

    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "s.wav", _song(2.0, sr=44100), 44100)
    res = separate.main(["--ckpt", str(student), "--input", str(src / "s.wav"), "--output",
                         str(tmp_path / "sep")])
    row = res["manifest"][str(src / "s.wav")]
    assert set(row["outputs"]) == {"bass", "drums", "guitar", "piano"}
    assert (_residual_db(row, src / "s.wav") < -60).all()  # the stems sum to the user's file

    reg = apply_overrides(get_preset("tiny"), {"model.kind": "hdemucs"})
    save(tmp_path / "reg.ckpt", reg, build_model(reg))
    out = evaluate.main(["--ckpt", str(student), "--data", str(data), "--output",
                         str(tmp_path / "eval-init"), "--max-chunks", "0", "--init",
                         str(tmp_path / "reg.ckpt"), "--set", "sampler.num_steps=1",
                         "--set", "sampler.sigma_max=0.1"])
    assert out["configs"][0]["nfe"] == 2  # the regressor's pass and one consistency step
