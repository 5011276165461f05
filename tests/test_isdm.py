"""ISDM end to end: four single-stem priors trained with pipelines.train --stem, then coupled by
the Dirac sampler in pipelines.evaluate and pipelines.separate."""

import numpy as np
import pytest
import soundfile as sf

from msdm.audio import read_audio
from msdm.checkpoint import CheckpointError, load_checkpoint
from pipelines import evaluate, separate, train

STEMS = ("bass", "drums", "guitar", "piano")


@pytest.mark.slow
def test_four_single_stem_priors_separate_together(synth_prepared, tmp_path):
    data = str(synth_prepared / "prepared")
    ckpts = {}
    for stem in STEMS:
        out = train.main(["--data", data, "--storage", str(tmp_path / "runs"), "--name", stem,
                          "--config", "tiny", "--stem", stem, "--max-steps", "3",
                          "--set", "train.checkpoint_every=3", "--set", "train.log_every=3"])
        ckpts[stem] = f"{out['run']}/model.ckpt"
        cfg, den = load_checkpoint(ckpts[stem])
        assert cfg.train.stem == stem and den.net.in_channels == 1  # a single-stem prior
    args = [f"--ckpt={s}={ckpts[s]}" for s in STEMS]
    res = evaluate.main(args + ["--data", data, "--output", str(tmp_path / "eval"),
                                "--max-chunks", "24", "--split", "validation"])
    assert res["windows"] >= 1 and res["configs"][0]["sampler"]["s_churn"] == 40.0  # ISDM default

    mix = np.random.default_rng(0).standard_normal(22050).astype(np.float32) * 0.05
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "m.wav", mix, 22050, subtype="FLOAT")
    sep = separate.main(args + ["--input", str(tmp_path / "in"), "--output",
                                str(tmp_path / "sep")])
    row = sep["manifest"][str(tmp_path / "in" / "m.wav")]
    assert row["status"] == "ok"
    total = sum(read_audio(row["outputs"][s])[0][0] for s in STEMS)  # recomputed from the files
    assert np.abs(total - mix).max() < 1e-5  # stems sum to the mixture

    with pytest.raises(CheckpointError, match="missing"):
        evaluate.main(args[:3] + ["--data", data, "--output", str(tmp_path / "e2")])
    swapped = [f"--ckpt=bass={ckpts['drums']}"] + args[1:]
    with pytest.raises(CheckpointError, match="prior of drums"):
        evaluate.main(swapped + ["--data", data, "--output", str(tmp_path / "e3")])
