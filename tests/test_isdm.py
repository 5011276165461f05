"""ISDM end to end: single-stem priors (one trained with pipelines.train --stem, the other three
saved untrained: every Ray Train fit costs ~25 s of start-up on 2 CPUs, and the --stem path is the
same for every stem), coupled by the Dirac sampler in pipelines.evaluate and pipelines.separate."""

import signal
import time

import numpy as np
import pytest
import soundfile as sf
from conftest import processes_named

from msdm.audio import read_audio
from msdm.checkpoint import CheckpointError, build_denoiser, load_checkpoint, save
from msdm.config import apply_overrides, get_preset
from pipelines import evaluate, separate, train

STEMS = ("bass", "drums", "guitar", "piano")


@pytest.mark.slow(seconds=80)
def test_four_single_stem_priors_separate_together(synth_prepared, tmp_path, capfd):
    data = str(synth_prepared / "prepared")
    ctrl_c = signal.getsignal(signal.SIGINT)
    out = train.main(["--data", data, "--storage", str(tmp_path / "runs"), "--name", "guitar",
                      "--config", "tiny", "--stem", "guitar", "--max-steps", "3",
                      "--set", "train.checkpoint_every=3", "--set", "train.log_every=3"])
    # the driver goes on: Ray Train's Ctrl-C handler is gone, and with it the run's controller
    # (it held ~1 GB in three processes after the run, and a later Ctrl-C "aborted" the run)
    assert signal.getsignal(signal.SIGINT) is ctrl_c
    deadline = time.time() + 20
    while processes_named("TrainController") and time.time() < deadline:
        time.sleep(0.5)
    assert not processes_named("TrainController")
    ckpts = {"guitar": f"{out['run']}/model.ckpt"}
    cfg, den = load_checkpoint(ckpts["guitar"])
    assert cfg.train.stem == "guitar" and den.net.in_channels == 1  # a single-stem prior
    for stem in ("bass", "drums", "piano"):
        other = apply_overrides(get_preset("tiny"), {"train.stem": stem})
        ckpts[stem] = str(tmp_path / f"{stem}.ckpt")
        save(ckpts[stem], other, build_denoiser(other))
    args = [f"--ckpt={s}={ckpts[s]}" for s in STEMS]
    res = evaluate.main(args + ["--data", data, "--output", str(tmp_path / "eval"),
                                "--max-chunks", "24", "--split", "validation",
                                "--set", "sampler.num_steps=4"])
    assert res["windows"] >= 1 and res["configs"][0]["sampler"]["s_churn"] == 40.0  # ISDM default
    log = "".join(capfd.readouterr())  # the worker's lines reached this driver by now
    assert "[train] step 3/3" in log  # the job's own line per checkpoint, once
    assert log.count("[train] step 3/3") == 1
    assert "Reporting training result" not in log and "successfully created" not in log

    mix = np.random.default_rng(0).standard_normal(22050).astype(np.float32) * 0.05
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "m.wav", mix, 22050, subtype="FLOAT")
    sep = separate.main(args + ["--input", str(tmp_path / "in"), "--output",
                                str(tmp_path / "sep"), "--set", "sampler.num_steps=4"])
    row = sep["manifest"][str(tmp_path / "in" / "m.wav")]
    assert row["status"] == "ok"
    stems = [read_audio(row["outputs"][s])[0][0] for s in STEMS]  # recomputed from the files
    # stems sum to the mixture up to float32 rounding of the (untrained) priors' estimates
    tol = 1e-6 + 8 * np.finfo(np.float32).eps * max(np.abs(x).max() for x in stems)
    assert np.abs(sum(stems) - mix).max() < tol, tol

    with pytest.raises(CheckpointError, match="missing"):
        evaluate.main(args[:3] + ["--data", data, "--output", str(tmp_path / "e2")])
    swapped = [f"--ckpt=bass={ckpts['drums']}"] + args[1:]
    with pytest.raises(CheckpointError, match="prior of drums"):
        evaluate.main(swapped + ["--data", data, "--output", str(tmp_path / "e3")])
