"""pipelines.separate / pipelines.generate and their stages: sums, bad files, resume, S3, memory."""

import json

import numpy as np
import pytest
import soundfile as sf

from msdm.audio import read_audio
from msdm.checkpoint import load_checkpoint
from pipelines import generate, separate
from pipelines.catalog import AssembleTrack, SeparateSegments, _plan_sizes, decode_segments

SR = 22050


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


def test_stages_sum_exactly_to_the_mixture_without_ray(tmp_path, gauss_ckpt):
    mono = _song(1.3, sr=SR, channels=1)[:, 0]
    sf.write(tmp_path / "a.wav", mono, SR, subtype="FLOAT")
    cfg, _ = load_checkpoint(gauss_ckpt)
    item = {"input": str(tmp_path / "a.wav"), "key": "a", "track": "a", "parent": "x"}
    rows = decode_segments(item, SR, cfg.data.chunk_samples, *_plan_sizes(cfg))
    assert len(rows) == rows[0]["num_segments"] > 1
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    batch["key"] = batch["key"].astype(object)
    out = SeparateSegments(str(gauss_ckpt))(batch)
    assert out["stems"].shape == (len(rows), 4, cfg.data.chunk_samples)
    row = json.loads(AssembleTrack(cfg.to_dict(), str(tmp_path / "out"), "{track}/{stem}.{ext}",
                                   "wav", "FLOAT", "original", "g")(out)["manifest"][0])
    assert row["status"] == "ok" and row["residual_db"] < -100
    total = sum(read_audio(row["outputs"][s])[0][0] for s in cfg.data.stems)
    assert np.abs(total - mono).max() < 1e-5


@pytest.mark.slow
def test_separate_folder_reports_bad_files_and_resumes(ray_local, tmp_path, gauss_ckpt):
    src = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    args = ["--ckpt", str(gauss_ckpt), "--input", str(src), "--output", str(out),
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
        assert row["residual_db"] < -20 and row["nfe"] == row["segments"] * 20
    lines = (out / "_manifest.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))

    (out / "song1" / "piano.wav").unlink()  # an incomplete track is redone, the rest skipped
    res2 = separate.main(args)
    assert res2["counts"] == {"ok": 1, "failed": 2, "skipped": 1}
    assert (out / "song1" / "piano.wav").exists()


@pytest.mark.slow
def test_model_rate_output_sums_exactly(ray_local, tmp_path, gauss_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "s.flac", _song(2.0, sr=48000), 48000, subtype="PCM_24")
    res = separate.main(["--ckpt", str(gauss_ckpt), "--input", str(src / "*.flac"), "--output",
                         str(tmp_path / "o"), "--sample-rate", "22050", "--format", "flac",
                         "--subtype", "PCM_24"])
    row = res["manifest"][str(src / "s.flac")]
    assert row["residual_db"] < -100  # Dirac: exact sum before quantisation
    stems = np.stack([read_audio(p)[0][0] for p in row["outputs"].values()])
    mix = read_audio(tmp_path / "o" / "s" / "bass.flac")[1]
    assert mix == 22050 and stems.shape[0] == 4


@pytest.mark.slow
def test_s3_in_and_out(ray_local, s3_bucket, tmp_path, gauss_ckpt):
    import s3fs

    fs = s3fs.S3FileSystem()
    src = _inputs(tmp_path / "in", 1)
    fs.put(str(src / "song0.wav"), f"{s3_bucket}/in/a/song0.wav")
    fs.put(str(gauss_ckpt), f"{s3_bucket}/ckpt/model.ckpt")
    res = separate.main(["--ckpt", f"s3://{s3_bucket}/ckpt/model.ckpt", "--input",
                         f"s3://{s3_bucket}/in", "--output", f"s3://{s3_bucket}/out",
                         "--format", "flac", "--filename", "{key}/{stem}.{ext}"])
    assert res["counts"]["ok"] == 1
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{s3_bucket}/out"))
    assert names == ["_manifest.jsonl", "bass.flac", "drums.flac", "guitar.flac", "piano.flac"]
    assert fs.exists(f"{s3_bucket}/out/a/song0/bass.flac")
    res2 = separate.main(["--ckpt", f"s3://{s3_bucket}/ckpt/model.ckpt", "--input",
                          f"s3://{s3_bucket}/in", "--output", f"s3://{s3_bucket}/out",
                          "--format", "flac", "--filename", "{key}/{stem}.{ext}"])
    assert res2["counts"] == {"ok": 0, "failed": 0, "skipped": 1}


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
def test_generate_total_and_partial(ray_local, tmp_path, gauss_ckpt):
    rows = generate.main(["--ckpt", str(gauss_ckpt), "--output", str(tmp_path / "g"),
                          "--num", "3", "--seconds", "0.5"])
    assert [r["index"] for r in rows] == [0, 1, 2]
    for r in rows:
        mix, sr = read_audio(f"{r['folder']}/mix.wav")
        parts = sum(read_audio(f"{r['folder']}/{s}.wav")[0] for s in ("bass", "drums", "guitar",
                                                                      "piano"))
        assert sr == SR and mix.shape == (1, SR // 2) and np.allclose(parts, mix, atol=1e-6)
    drums = _song(0.5, sr=SR, channels=1)[:, 0]
    sf.write(tmp_path / "drums.wav", drums, SR, subtype="FLOAT")
    rows = generate.main(["--ckpt", str(gauss_ckpt), "--output", str(tmp_path / "p"),
                          "--num", "2", "--seconds", "0.5", "--given",
                          f"drums={tmp_path / 'drums.wav'}"])
    for r in rows:
        got = read_audio(f"{r['folder']}/drums.wav")[0][0]
        assert np.abs(got - drums).max() < 1e-6  # the given stem comes back exactly
    a, b = (read_audio(f"{r['folder']}/bass.wav")[0] for r in rows)
    assert not np.allclose(a, b)  # different seeds, different basslines
