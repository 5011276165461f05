"""pipelines.separate / pipelines.generate and their stages: sums, bad files, resume, S3, memory."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

from msdm.audio import read_audio, resample, to_mono
from msdm.checkpoint import load_checkpoint
from pipelines import generate, separate
from pipelines.segments import AssembleTrack, SeparateSegments, decode_segments

SR = 22050
STEMS = ("bass", "drums", "guitar", "piano")


def _residual_db(row, input_path, rate=None):
    """10 log10 ||mixture - sum of the written stems||^2 / ||mixture||^2, recomputed from files."""
    x, sr = read_audio(input_path)
    rate = rate or sr
    mix = resample(to_mono(x), sr, rate).astype(np.float64)
    total = sum(read_audio(row["outputs"][s])[0][0].astype(np.float64) for s in STEMS)
    return 10 * np.log10(np.sum((mix - total) ** 2) / np.sum(mix**2) + 1e-30)


def _song(seconds, sr=44100, channels=2, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.2 * np.sin(2 * np.pi * 110 * t) + 0.1 * np.sin(2 * np.pi * 440 * t)
    x = x + 0.02 * rng.standard_normal(len(t))
    return np.stack([x, 0.8 * x][:channels]).T.astype(np.float32)


def _inputs(folder, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sf.write(folder / f"song{i}.wav", _song(1.5 + i, seed=i), 44100)
    (folder / "broken.flac").write_bytes(b"fLaC" + bytes(64))
    sf.write(folder / "empty.wav", np.zeros((0, 2), np.float32), 44100)
    return folder


def test_stages_sum_exactly_to_the_mixture_without_ray(tmp_path, tiny_unet_ckpt):
    mono = _song(1.3, sr=SR, channels=1)[:, 0]
    sf.write(tmp_path / "a.wav", mono, SR, subtype="FLOAT")
    cfg, _ = load_checkpoint(tiny_unet_ckpt)
    item = {"input": str(tmp_path / "a.wav"), "key": "a", "track": "a", "parent": "x"}
    rows = decode_segments(item, SR, cfg.data.chunk_samples, cfg.separation.margin,
                           cfg.separation.overlap)
    assert len(rows) == rows[0]["num_segments"] > 1
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    batch["key"] = batch["key"].astype(object)
    out = SeparateSegments(str(tiny_unet_ckpt), cfg.to_dict())(batch)
    assert out["stems"].shape == (len(rows), 4, cfg.data.chunk_samples)
    row = json.loads(AssembleTrack(cfg.to_dict(), str(tmp_path / "out"), "{track}/{stem}.{ext}",
                                   "wav", "FLOAT", "original", "g")(out)["manifest"][0])
    assert row["status"] == "ok"
    total = sum(read_audio(row["outputs"][s])[0][0] for s in cfg.data.stems)
    assert np.abs(total - mono).max() < 1e-5


@pytest.mark.slow
def test_separate_folder_reports_bad_files_and_resumes(ray_local, tmp_path, tiny_unet_ckpt):
    src = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    args = ["--ckpt", str(tiny_unet_ckpt), "--input", str(src), "--output", str(out),
            "--batch-size", "16"]
    res = separate.main(args)
    m = res["manifest"]
    assert res["counts"] == {"ok": 2, "failed": 2, "skipped": 0}
    assert "cannot decode" in m[str(src / "broken.flac")]["error"]
    assert "zero-length" in m[str(src / "empty.wav")]["error"]
    for i in range(2):
        row = m[str(src / f"song{i}.wav")]
        assert row["sample_rate"] == 44100 and row["duration_s"] == pytest.approx(1.5 + i)
        stems = [read_audio(row["outputs"][s]) for s in ("bass", "drums", "guitar", "piano")]
        assert all(sr == 44100 and x.shape == (1, int((1.5 + i) * 44100)) for x, sr in stems)
        # content above the model's 11 kHz band is lost; the rest sums back
        assert _residual_db(row, src / f"song{i}.wav") < -20
        assert row["nfe"] == row["segments"] * 20
    lines = (out / "_manifest.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))

    (out / "song1" / "piano.wav").unlink()  # an incomplete track is redone, the rest skipped
    res2 = separate.main(args)
    assert res2["counts"] == {"ok": 1, "failed": 2, "skipped": 1}
    assert (out / "song1" / "piano.wav").exists()


@pytest.mark.slow
def test_model_rate_output_sums_exactly(ray_local, tmp_path, tiny_unet_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "s.flac", _song(2.0, sr=48000), 48000, subtype="PCM_24")
    res = separate.main(["--ckpt", str(tiny_unet_ckpt), "--input", str(src / "*.flac"), "--output",
                         str(tmp_path / "o"), "--sample-rate", "22050"])
    row = res["manifest"][str(src / "s.flac")]
    assert read_audio(row["outputs"]["bass"])[1] == 22050 and len(row["outputs"]) == 4
    # Dirac: the float stems sum exactly to the model-rate mixture (an untrained network's
    # stems exceed full scale, so PCM formats would clip them)
    assert _residual_db(row, src / "s.flac", 22050) < -100


@pytest.mark.slow
def test_s3_in_and_out(ray_local, s3_bucket, tmp_path, tiny_unet_ckpt):
    import s3fs

    fs = s3fs.S3FileSystem()
    src = _inputs(tmp_path / "in", 1)
    fs.put(str(src / "song0.wav"), f"{s3_bucket}/in/a/song0.wav")
    fs.put(str(tiny_unet_ckpt), f"{s3_bucket}/ckpt/model.ckpt")
    import boto3

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="in/../../../x/pwn.wav",  # #19.2
                                  Body=(src / "song0.wav").read_bytes())
    res = separate.main(["--ckpt", f"s3://{s3_bucket}/ckpt/model.ckpt", "--input",
                         f"s3://{s3_bucket}/in", "--output", f"s3://{s3_bucket}/out",
                         "--format", "flac", "--filename", "{key}/{stem}.{ext}"])
    assert res["counts"] == {"ok": 1, "failed": 1, "skipped": 0}
    hostile = [r for r in res["manifest"].values() if r["status"] == "failed"][0]
    assert "leaves the output folder" in hostile["error"]
    fs.invalidate_cache()
    keys = [k for k in fs.find(s3_bucket) if "/_manifest.parts/" not in k]
    assert sorted(k.rsplit("/", 1)[-1] for k in keys if k.startswith(f"{s3_bucket}/out/")) == [
        "_manifest.jsonl", "bass.flac", "drums.flac", "guitar.flac", "piano.flac"]
    assert not [k for k in keys if not k.startswith((f"{s3_bucket}/out/", f"{s3_bucket}/in/",
                                                     f"{s3_bucket}/ckpt/"))]  # nothing escaped
    assert fs.exists(f"{s3_bucket}/out/a/song0/bass.flac")
    res2 = separate.main(["--ckpt", f"s3://{s3_bucket}/ckpt/model.ckpt", "--input",
                          f"s3://{s3_bucket}/in", "--output", f"s3://{s3_bucket}/out",
                          "--format", "flac", "--filename", "{key}/{stem}.{ext}"])
    assert res2["counts"] == {"ok": 0, "failed": 1, "skipped": 1}


@pytest.mark.slow
def test_ten_minute_input_keeps_model_actor_memory_flat(ray_local, tmp_path, tiny_unet_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "short.wav", _song(20, sr=SR, channels=1), SR)
    sf.write(src / "long.wav", _song(600, sr=SR, channels=1), SR)
    rss = {}
    for name in ("short", "long"):
        res = separate.main(["--ckpt", str(tiny_unet_ckpt), "--input", str(src / f"{name}.wav"),
                             "--output", str(tmp_path / "o"), "--set", "sampler.num_steps=1",
                             "--batch-size", "32", "--sample-rate", "22050"])
        row = res["manifest"][str(src / f"{name}.wav")]
        assert row["status"] == "ok"
        rss[name] = row
    keys = ("actor_private_mb", "decode_rss_mb", "assemble_rss_mb")
    print({n: {k: round(r[k]) for k in keys} for n, r in rss.items()},
          "segments:", rss["long"]["segments"])
    assert rss["long"]["duration_s"] == pytest.approx(600)
    # a 30x longer track: the model actor's private memory stays within 50 MB
    assert rss["long"]["actor_private_mb"] - rss["short"]["actor_private_mb"] < 50


@pytest.mark.slow
def test_generate_total_and_partial(ray_local, tmp_path, tiny_unet_ckpt):
    rows = generate.main(["--ckpt", str(tiny_unet_ckpt), "--output", str(tmp_path / "g"),
                          "--num", "3", "--seconds", "0.5"])
    assert [r["index"] for r in rows] == [0, 1, 2]
    for r in rows:
        mix, sr = read_audio(f"{r['folder']}/mix.wav")
        parts = sum(read_audio(f"{r['folder']}/{s}.wav")[0] for s in ("bass", "drums", "guitar",
                                                                      "piano"))
        assert sr == SR and mix.shape == (1, SR // 2) and np.allclose(parts, mix, atol=1e-6)
    drums = _song(0.5, sr=SR, channels=1)[:, 0]
    sf.write(tmp_path / "drums.wav", drums, SR, subtype="FLOAT")
    rows = generate.main(["--ckpt", str(tiny_unet_ckpt), "--output", str(tmp_path / "p"),
                          "--num", "2", "--seconds", "0.5", "--given",
                          f"drums={tmp_path / 'drums.wav'}"])
    for r in rows:
        got = read_audio(f"{r['folder']}/drums.wav")[0][0]
        assert np.abs(got - drums).max() < 1e-6  # the given stem comes back exactly
    a, b = (read_audio(f"{r['folder']}/bass.wav")[0] for r in rows)
    assert not np.allclose(a, b)  # different seeds, different basslines


def test_templates_and_keys_cannot_leave_the_output_folder(tmp_path):
    """#19.2: a template or an input key that escapes --output is refused."""
    from pipelines.catalog import check_template, output_paths

    for bad in ("../../{stem}.{ext}", "/tmp/{stem}.{ext}", "{track}/../../{stem}.{ext}"):
        with pytest.raises(ValueError, match="leaves the output folder"):
            check_template(bad)
    with pytest.raises(ValueError, match="fields must be among"):
        check_template("{track}/{stem}.{ext}{__class__}")
    check_template("{key}/{stem}.{ext}")
    item = {"input": "s3://b/in/../../x/pwn.wav", "key": "../../x/pwn", "track": "pwn",
            "parent": "x"}
    with pytest.raises(ValueError, match="leaves the output folder"):
        output_paths(item, STEMS, str(tmp_path / "out"), "{key}/{stem}.{ext}", "wav")
    ok = output_paths(item, STEMS, str(tmp_path / "out"), "{track}/{stem}.{ext}", "wav")
    assert ok["bass"] == str(tmp_path / "out" / "pwn" / "bass.wav")


def test_config_errors_come_before_any_work(tmp_path, tiny_unet_ckpt):
    """#19.9: --config with a checkpoint, and semantic errors, fail in the driver."""
    from msdm.config import ConfigError

    src = _inputs(tmp_path / "in", 1)
    base = ["--ckpt", str(tiny_unet_ckpt), "--input", str(src), "--output", str(tmp_path / "o")]
    for extra, match in [(["--config", "tiny"], "a preset cannot apply"),
                         (["--config", str(tmp_path / "none.yaml")], "neither a preset"),
                         (["--set", "separation.constrained=9"], "must index one of"),
                         (["--set", "separation.margin=0.6"], "margin"),
                         (["--set", "data.sample_rate=0"], "sample_rate must be positive"),
                         (["--set", "model.channels=8"], "fixed by the checkpoint")]:
        with pytest.raises(ConfigError, match=match):
            separate.main(base + extra)
    with pytest.raises(SystemExit, match="leaves the output folder"):
        separate.main(base + ["--filename", "../../{stem}.{ext}"])
    assert not (tmp_path / "o").exists()


def test_manifest_keeps_good_lines_and_merges_concurrent_jobs(tmp_path):
    """#19.6 / #19.7: a truncated last line is skipped and reported; two jobs writing the same
    output keep every row."""
    from pipelines.catalog import MANIFEST, ManifestWriter, read_manifest

    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text('{"input": "a", "status": "ok", "time": 1}\n{"input": "b", "st')
    rows, problems = read_manifest(str(out))
    assert list(rows) == ["a"] and len(problems) == 1 and "line 2" in problems[0]
    one, two = ManifestWriter(str(out)), ManifestWriter(str(out))
    one.append([{"input": "c", "status": "ok", "time": 2}])
    two.append([{"input": "d", "status": "ok", "time": 3}])
    one.append([{"input": "e", "status": "failed", "time": 4}])
    merged = one.compact()  # job one finishes while job two still runs
    two.append([{"input": "a", "status": "failed", "time": 5}])
    final = two.compact()
    assert sorted(merged) == ["a", "c", "d", "e"]
    assert sorted(final) == ["a", "c", "d", "e"] and final["a"]["status"] == "failed"
    lines = (out / MANIFEST).read_text().splitlines()
    assert len(lines) == 4 and {json.loads(x)["input"] for x in lines} == {"a", "c", "d", "e"}


def test_complete_outputs_without_rows_get_real_rows(tmp_path, tiny_unet_ckpt):
    """#19.6: a job killed after writing stems but before its manifest: the re-run records the
    outputs, not bare `skipped` rows."""
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "song0.wav", _song(0.5, sr=SR, channels=1), SR)
    out = tmp_path / "out"
    for s in STEMS:
        (out / "song0").mkdir(parents=True, exist_ok=True)
        sf.write(out / "song0" / f"{s}.wav", np.zeros(100, np.float32), SR)
    res = separate.main(["--ckpt", str(tiny_unet_ckpt), "--input", str(src), "--output",
                         str(out)])
    row = res["manifest"][str(src / "song0.wav")]
    assert row["status"] == "skipped"
    assert row["outputs"] == {s: str(out / "song0" / f"{s}.wav") for s in STEMS}


@pytest.mark.slow
def test_bad_entries_become_failed_rows_and_all_failing_exits_non_zero(ray_local, tmp_path,
                                                                      tiny_unet_ckpt):
    """#19.5: a folder named like audio and a symlink loop are failed rows, not a crash."""
    src = _inputs(tmp_path / "in", 1)
    (src / "x.wav").mkdir()
    os.symlink("loop.wav", src / "loop.wav")
    os.symlink("..", src / "x.wav" / "up")  # a folder loop
    res = separate.main(["--ckpt", str(tiny_unet_ckpt), "--input", str(src), "--output",
                         str(tmp_path / "out")])
    m = res["manifest"]
    assert res["counts"] == {"ok": 1, "failed": 4, "skipped": 0}
    assert m[str(src / "x.wav")]["status"] == "failed"
    assert "loop" in m[str(src / "loop.wav")]["error"].lower() or m[str(src / "loop.wav")]["error"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.flac").write_bytes(b"fLaC" + bytes(64))
    with pytest.raises(SystemExit, match="every input failed"):
        separate.main(["--ckpt", str(tiny_unet_ckpt), "--input", str(bad), "--output",
                       str(tmp_path / "out2")])
    assert (tmp_path / "out2" / "_manifest.jsonl").exists()
