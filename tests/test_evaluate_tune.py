"""pipelines.evaluate and pipelines.tune on generated data with an analytic checkpoint."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import msdm
from msdm.checkpoint import load_checkpoint
from msdm.config import apply_overrides, config_keys
from msdm.data import batch_to_tensor
from msdm.metrics import summarize, windowed_si_sdri
from msdm.tasks import item_generators
from pipelines import evaluate, tune
from pipelines.common import parse_ckpt
from pipelines.models import stable_seed

ROOT = Path(__file__).resolve().parents[1]


def _direct(ckpt, split_dir, overrides=None, seed=0):
    """The protocol computed by hand: same seeds, no Ray."""
    cfg, den = load_checkpoint(ckpt)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    table = pq.read_table(str(split_dir)).sort_by([("track_id", "ascending"),
                                                   ("chunk_index", "ascending")])
    windows, kept_by_refs = [], 0
    for track in sorted(set(table.column("track_id").to_pylist())):
        rows = table.filter(np.array(table.column("track_id").to_pylist()) == track)
        ref = batch_to_tensor(rows)
        seeds = [stable_seed(seed, track, c) for c in rows.column("chunk_index").to_pylist()]
        est = msdm.separate(den, ref.sum(1, keepdim=True), 4, cfg.sampler,
                            constrained=cfg.separation.constrained,
                            generator=item_generators(seeds))
        ref_t, est_t = torch.cat(list(ref), -1), torch.cat(list(est), -1)
        windows.append(windowed_si_sdri(est_t, ref_t, cfg.data.sample_rate))
        kept_by_refs += windowed_si_sdri(ref_t, ref_t, cfg.data.sample_rate).shape[0]
    w = torch.cat(windows)
    return summarize(w, cfg.data.stems), w.shape[0], kept_by_refs


@pytest.mark.slow(seconds=45)
def test_evaluate_matches_direct_computation(synth_prepared, tiny_unet_ckpt, tmp_path):
    data = synth_prepared / "prepared"
    same = tmp_path / "same.yaml"  # the checkpoint's own sampler, written out: reused, not re-run
    same.write_text("sampler:\n  num_steps: 6\nseparation:\n  likelihood: dirac\n")
    out = evaluate.main(["--ckpt", str(tiny_unet_ckpt), "--data", str(data), "--output",
                         str(tmp_path / "eval"), "--batch-size", "5", "--sampler-config",
                         str(same), "--set", "sampler.num_steps=6"])
    assert out["configs"][1]["same_as"] == "checkpoint sampler"
    assert out["configs"][1]["si_sdri"] == out["configs"][0]["si_sdri"]
    scores, windows, by_refs = _direct(tiny_unet_ckpt, data / "test", {"sampler.num_steps": 6})
    # 9 s songs at 22050 Hz in 4096-sample chunks: 48 chunks = 8.9 s -> 4 windows (4 s / 2 s)
    assert out["windows"] == windows == by_refs == 4
    for stem, v in scores.items():
        assert out["si_sdri"][stem] == pytest.approx(v, abs=1e-4)
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(saved) >= {"si_sdri", "windows", "nfe", "seconds"}
    assert set(saved["si_sdri"]) == {"bass", "drums", "guitar", "piano", "all"}
    assert saved["nfe"] == 6  # 6 Euler steps x 1
    assert (tmp_path / "eval" / "si_sdri.png").stat().st_size > 1000
    assert "| checkpoint sampler |" in (tmp_path / "eval" / "results.md").read_text()


@pytest.mark.slow(seconds=45)
def test_tune_four_trials_and_best_yaml_round_trips_into_evaluate(synth_prepared, tiny_unet_ckpt,
                                                                  tmp_path, capfd):
    data = synth_prepared / "prepared"
    space = yaml.safe_load((ROOT / "tune_spaces" / "cost_aware.yaml").read_text())
    space["space"]["sampler.num_steps"] = {"choice": [2, 3, 4]}  # the real space, cheap trials
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    # a relative --ckpt: each Tune trial runs in its own working directory
    res = tune.main(["--ckpt", os.path.relpath(tiny_unet_ckpt), "--data", str(data), "--space",
                     str(tmp_path / "space.yaml"), "--num-samples", "4",
                     "--storage", str(tmp_path / "sweeps"), "--name", "s", "--max-chunks", "24",
                     "--smoke-test"])
    sweep = tmp_path / "sweeps" / "s"
    assert len(res["trials"]) == 4
    again = tune.main(["--ckpt", str(tiny_unet_ckpt), "--data", str(data), "--space",
                       str(tmp_path / "space.yaml"), "--num-samples", "4",
                       "--storage", str(tmp_path / "sweeps"), "--name", "s", "--max-chunks", "24",
                       "--smoke-test"])  # same name: the finished sweep is restored, not re-run
    assert "resuming sweep" in capfd.readouterr().out
    assert sorted(t["si_sdri"] for t in again["trials"]) == sorted(t["si_sdri"]
                                                                   for t in res["trials"])
    for f in ("best.yaml", "trials.csv", "trials.md", "si_sdri_vs_nfe.png"):
        assert (sweep / f).exists(), f
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    assert set(best) == {"sampler", "separation"}
    assert best["sampler"]["num_steps"] == res["best"]["sampler.num_steps"]
    out = evaluate.main(["--ckpt", str(tiny_unet_ckpt), "--data", str(data), "--split",
                         "validation", "--output", str(tmp_path / "ev"), "--sampler-config",
                         str(sweep / "best.yaml"), "--skip-checkpoint-sampler",
                         "--max-chunks", "24"])
    assert len(out["configs"]) == 1
    row = out["configs"][0]
    assert row["name"] == "best" and out["si_sdri"] == row["si_sdri"]
    assert row["sampler"]["num_steps"] == best["sampler"]["num_steps"]
    assert row["separation"]["constrained"] == best["separation"]["constrained"]
    # the sweep scored the same chunks with the same seeds: same number
    assert row["si_sdri"]["all"] == pytest.approx(res["best"]["si_sdri"], abs=1e-4)


def test_every_tune_space_key_is_a_config_field():
    spaces = sorted((ROOT / "tune_spaces").glob("*.yaml"))
    assert len(spaces) >= 3
    for path in spaces:
        spec = tune.load_space(str(path))
        assert set(spec["space"]) <= config_keys(), path.name
        tune.to_tune(spec["space"])  # every distribution builds


def test_bad_space_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  sampler.s_chrun: {uniform: [0, 1]}\n")
    with pytest.raises(ValueError, match="s_chrun"):
        tune.load_space(str(bad))
    bad.write_text("space:\n  sampler.s_churn: {gaussian: [0, 1]}\n")
    with pytest.raises(ValueError, match="expected one of"):
        tune.load_space(str(bad))
    bad.write_text("space:\n  sampler.s_churn: {uniform: [0, 1]}\n  sampler.num_steps: 4\n"
                   "points_to_evaluate:\n  - {sampler.num_steps: 5}\n")
    with pytest.raises(ValueError, match="exactly the swept keys"):
        tune.load_space(str(bad))


def test_read_chunks_limit_zero_reads_the_whole_split(synth_prepared):
    """tune --max-chunks 0 means all chunks of the split (as evaluate's does), not none; a
    positive limit stops inside the shard that reaches it (train has several shards)."""
    from pipelines.stages import read_chunks

    split = synth_prepared / "prepared" / "train"
    stems = ("bass", "drums", "guitar", "piano")
    shards = sorted(f for f in split.glob("*.parquet") if not f.name.startswith(("_", ".")))
    assert len(shards) > 1
    table, first = pq.read_table(split), pq.read_table(shards[0]).num_rows
    for limit in (0, -1):
        every = read_chunks(str(split), stems, limit)
        assert len(every["x"]) == table.num_rows
        assert sorted(zip(every["track_id"], every["chunk_index"])) == sorted(
            zip(table.column("track_id").to_pylist(), table.column("chunk_index").to_pylist()))
    assert len(read_chunks(str(split), stems, first + 1)["x"]) == first + 1
    assert len(read_chunks(str(split), stems, 3)["x"]) == 3


def test_ckpt_arguments():
    # local paths come back absolute (Tune trials run in their own working directories)
    assert parse_ckpt(["runs/a/model.ckpt"]) == os.path.abspath("runs/a/model.ckpt")
    assert parse_ckpt(["file:///x/m.ckpt"]) == "/x/m.ckpt"
    assert parse_ckpt(["bass=s3://b/x.ckpt", "drums=d.ckpt"]) == {
        "bass": "s3://b/x.ckpt", "drums": os.path.abspath("d.ckpt")}
    with pytest.raises(ValueError, match="STEM=URI"):
        parse_ckpt(["bass=a.ckpt", "b.ckpt"])
    with pytest.raises(ValueError, match="twice"):
        parse_ckpt(["bass=a.ckpt", "bass=b.ckpt"])


def test_trial_metrics_scores_finite_estimates_and_floors_diverged_ones():
    from msdm.config import load_config
    from pipelines.sweep import DIVERGED_DB, trial_metrics

    cfg = load_config("tiny", {"data.sample_rate": 1000, "data.chunk_samples": 2048,
                               "sampler.num_steps": 10, "sampler.resamples": 2})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 2048, generator=g) * torch.tensor([1.0, 0.5, 0.3, 0.2])[:, None]
    val = {"x": x.numpy(), "track_id": np.array(["a"] * 3 + ["b"] * 3),
           "chunk_index": np.array([0, 1, 2, 0, 1, 2], dtype=np.int32)}
    est = x + 0.1 * torch.randn(x.shape, generator=g)
    m = trial_metrics(est, val, cfg, cost_per_nfe=0.01)
    direct = torch.cat([windowed_si_sdri(torch.cat(list(est[i:i + 3]), -1),
                                         torch.cat(list(x[i:i + 3]), -1), 1000) for i in (0, 3)])
    want = summarize(direct, cfg.data.stems)
    assert m["diverged"] == 0 and m["windows"] == direct.shape[0] > 0 and m["nfe"] == 20
    assert m["si_sdri"] == pytest.approx(want["all"]) and m["si_sdri_piano"] == pytest.approx(
        want["piano"])
    assert m["score"] == pytest.approx(want["all"] - 0.2)
    est[4, 2, 100] = float("nan")  # a sampler that blew up on one chunk
    bad = trial_metrics(est, val, cfg, cost_per_nfe=0.01)
    assert bad["diverged"] == 1 and bad["windows"] == 0
    assert bad["si_sdri"] == bad["si_sdri_bass"] == DIVERGED_DB
    assert bad["score"] == pytest.approx(DIVERGED_DB - 0.2)


@pytest.mark.slow(seconds=15)
def test_scoring_no_window_is_an_error_that_names_the_window_lengths_and_fix(
        ray_local, synth_prepared, tiny_unet_ckpt, tmp_path):
    """--config tiny --max-chunks 2: two 0.19 s chunks of one track, shorter than the protocol's
    window: evaluate and tune fail with the reason, never `nan dB over 0 windows`."""
    from msdm.config import ConfigError

    data = str(synth_prepared / "prepared")
    with pytest.raises(ConfigError, match=r"no window was scored.*4 s windows.*"
                                          r"0\.4-0\.4 s long.*--max-chunks 0"):
        evaluate.main(["--ckpt", str(tiny_unet_ckpt), "--data", data, "--output",
                       str(tmp_path / "e"), "--max-chunks", "2"])
    assert not (tmp_path / "e" / "results.json").exists()
    with pytest.raises(ConfigError, match="no window was scored"):
        tune.main(["--ckpt", str(tiny_unet_ckpt), "--data", data, "--space", "cost_aware",
                   "--storage", str(tmp_path / "s"), "--name", "n", "--max-chunks", "2"])


def test_space_names_resolve_to_the_packaged_files():
    assert Path(tune.resolve_space("cost_aware")) == ROOT / "tune_spaces" / "cost_aware.yaml"
    assert tune.resolve_space(str(ROOT / "tune_spaces" / "demo.yaml")).endswith("demo.yaml")
    with pytest.raises(Exception, match="known: .*cost_aware"):
        tune.resolve_space("nope")
