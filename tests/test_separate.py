"""pipelines.separate / pipelines.generate and their stages: sums, bad files, resume, S3, memory."""

import json
import os

import numpy as np
import pytest
import soundfile as sf
from conftest import processes_named

from msdm.audio import RatePlan, read_audio, resample, to_mono
from msdm.checkpoint import load_checkpoint
from msdm.config import apply_overrides
from pipelines import evaluate, generate, separate
from pipelines.assemble import Assembler
from pipelines.common import rss_mb
from pipelines.segments import SeparateSegments, decode_segments, split_segments

SR = 22050
STEMS = ("bass", "drums", "guitar", "piano")


def _residual_db(row, input_path, rate=None, mono=False):
    """Per channel: 10 log10 ||mixture - sum of the written stems||^2 / ||mixture||^2, from the
    files (the mixture resampled to the stems' rate, downmixed for mono stems)."""
    x, sr = read_audio(input_path)
    rate = rate or sr
    mix = resample(to_mono(x)[None] if mono else x, sr, rate).astype(np.float64)
    total = sum(read_audio(row["outputs"][s])[0].astype(np.float64) for s in row["outputs"])
    return 10 * np.log10(np.sum((mix - total) ** 2, -1) / np.sum(mix**2, -1) + 1e-30)


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


def _run_stages(item, cfg, ckpt, out, names=STEMS, fused=False, **decode):
    """The job's stages in-process: decode -> model -> channel split -> assembly (the split a
    stage of its own, or inside the model stage as the job runs it by default)."""
    rows = list(decode_segments(item, cfg.data.sample_rate, cfg.data.chunk_samples,
                                cfg.separation.margin, cfg.separation.overlap, **decode))
    assert len(rows) == rows[0]["num_segments"] > 1 and not rows[0]["error"]
    model = SeparateSegments(str(ckpt), cfg.to_dict(), split={} if fused else None)
    asm = Assembler(cfg, str(out), "{track}/{stem}.{ext}", "wav", "FLOAT", "g", list(names))
    done = []
    for i in range(len(rows) - 2, -3, -3):  # batches of 3, last segments first: any order works
        part = rows[max(i, 0) : i + 3]
        batch = {k: np.array([r[k] for r in part]) for k in part[0] if k != "window"}
        batch["window"] = np.stack([r["window"] for r in part])
        batch["key"] = batch["key"].astype(object)
        split = model(batch) if fused else split_segments(model(batch))
        for j in range(len(part)):
            row = asm.add({k: v[j] for k, v in split.items()})
            done += [row] if row else []
    assert len(done) == 1 and done[0]["status"] == "ok", done
    return done[0]


def _stereo_song(seconds, sr=44100, seed=0):
    """Two different channels with content up to 20 kHz and the right channel silent 1-2 s."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    hats = rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 4 * t) > 0.9)
    x = np.stack([0.2 * np.sin(2 * np.pi * 110 * t) + 0.05 * hats,
                  0.1 * np.sin(2 * np.pi * 330 * t) + 0.05 * np.sin(2 * np.pi * 16000 * t)])
    x[1, sr : 2 * sr] = 0
    return x.astype(np.float32)


def test_stages_give_stereo_full_band_stems_without_ray(tmp_path, tiny_unet_ckpt):
    """#14: stereo in -> stereo out at the input rate; stems sum to each channel over the full
    band; a silent stretch stays silent in every stem; dual-mono stays dual-mono."""
    cfg, _ = load_checkpoint(tiny_unet_ckpt)
    cfg = apply_overrides(cfg, ["sampler.num_steps=2", "data.chunk_samples=8192"])
    x = _stereo_song(2.2)
    sf.write(tmp_path / "a.wav", x.T, 44100, subtype="FLOAT")
    sf.write(tmp_path / "d.wav", np.stack([x[0], x[0]]).T, 44100, subtype="FLOAT")
    item = {"input": str(tmp_path / "a.wav"), "key": "a", "track": "a", "parent": "x"}
    row = _run_stages(item, cfg, tiny_unet_ckpt, tmp_path / "out")
    stems = {s: read_audio(row["outputs"][s]) for s in STEMS}
    assert all(sr == 44100 and y.shape == x.shape for y, sr in stems.values())
    total = sum(y for y, _ in stems.values())
    res = 10 * np.log10(np.sum((x - total) ** 2, -1) / np.sum(x**2, -1))
    assert (res < -60).all() and max(row["residual_db_per_channel"]) < -60, res
    hf = [np.abs(np.fft.rfft(y[1]))[16000 * len(y[1]) // 44100] for y, _ in stems.values()]
    assert sum(h > 1 for h in hf) >= 1  # the 16 kHz tone (above 11 kHz) went to the stems
    n_fft = 2048
    for y, _ in stems.values():  # silent 1-2 s in the right channel, away from its edges
        assert np.abs(y[1, 44100 + n_fft : 2 * 44100 - n_fft]).max() == 0
    fused = _run_stages(item, cfg, tiny_unet_ckpt, tmp_path / "fused", fused=True)
    for s in STEMS:  # the split inside the model stage (the job's default) writes the same
        assert np.array_equal(read_audio(fused["outputs"][s])[0], stems[s][0])
    item = {"input": str(tmp_path / "d.wav"), "key": "d", "track": "d", "parent": "x"}
    row = _run_stages(item, cfg, tiny_unet_ckpt, tmp_path / "out")
    for s in STEMS:
        y = read_audio(row["outputs"][s])[0]
        assert np.array_equal(y[0], y[1])


def test_window_resampling_matches_the_whole_file():
    """Decoding in blocks: every segment window, resampled on its own, equals the same span
    of the whole file resampled at once (to well under -60 dB), at 44.1 and 48 kHz."""
    rng = np.random.default_rng(0)
    for sr_in, sr_out in [(44100, 44100), (48000, 48000), (48000, 22050)]:
        x = rng.standard_normal((2, sr_in * 2)).astype(np.float32) * 0.1
        plan = RatePlan.build(x.shape[1], sr_in, sr_out, SR, 4096, 0.0625, 0.125)
        whole, mid = resample(x, sr_in, sr_out), resample(x.mean(0), sr_in, SR)
        for j in range(plan.num_segments):
            lo, hi = plan.in_span(j)
            w = np.zeros((2, hi - lo), np.float32)
            w[:, max(lo, 0) - lo : min(hi, x.shape[1]) - lo] = x[:, max(lo, 0) : hi]
            win, seg = plan.split(w)
            s = plan.out.start(j)
            a, b = max(s, 0), min(s + plan.out.segment, whole.shape[1])
            assert np.abs(win[:, a - s : b - s] - whole[:, a:b]).max() < 1e-5
            s = s * SR // sr_out
            a, b = max(s, 0), min(s + 4096, len(mid))
            assert np.abs(seg[a - s : b - s] - mid[a:b]).max() < 1e-5


@pytest.mark.slow(seconds=19)
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
        assert all(sr == 44100 and x.shape == (2, int((1.5 + i) * 44100)) for x, sr in stems)
        # stereo, full band: the stems sum back to each channel
        assert (_residual_db(row, src / f"song{i}.wav") < -60).all()
        assert row["nfe"] == row["segments"] * 20
    lines = (out / "_manifest.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))

    (out / "song1" / "piano.wav").unlink()  # an incomplete track is redone, the rest skipped
    res2 = separate.main(args)
    assert res2["counts"] == {"ok": 1, "failed": 2, "skipped": 1}
    assert (out / "song1" / "piano.wav").exists()


@pytest.mark.slow(seconds=13)
def test_model_rate_output_sums_exactly(ray_local, tmp_path, tiny_unet_ckpt):
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "s.flac", _song(2.0, sr=48000), 48000, subtype="PCM_24")
    res = separate.main(["--ckpt", str(tiny_unet_ckpt), "--input", str(src / "*.flac"), "--output",
                         str(tmp_path / "o"), "--sample-rate", "22050", "--stems",
                         "bass,drums,guitar,piano", "--split-tasks", "1"])  # split: own stage
    row = res["manifest"][str(src / "s.flac")]
    assert read_audio(row["outputs"]["bass"])[1] == 22050 and len(row["outputs"]) == 4
    # exact sum at the model rate (float stems: an untrained model's stems can pass full scale,
    # which PCM subtypes would clip; the manifest's `peak` tells)
    assert (_residual_db(row, src / "s.flac", 22050) < -100).all()
    assert row["peak"] > 0


@pytest.mark.slow(seconds=10)
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


@pytest.mark.slow(seconds=22)
def test_channels_mono_stem_subsets_two_stems_and_mp3(ray_local, tmp_path, tiny_unet_ckpt):
    """#14: --channels mono keeps model-rate mid stems (resampled); --stems writes a subset;
    --two-stems STEM writes STEM and no_STEM = mixture - STEM; MP3 input decodes."""
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "s.wav", _song(1.2, seed=3), 44100, subtype="FLOAT")
    sf.write(src / "m.mp3", _song(1.0, seed=4), 44100, format="MP3")
    base = ["--ckpt", str(tiny_unet_ckpt), "--set", "sampler.num_steps=2"]
    res = separate.main(base + ["--input", str(src / "s.wav"), "--output", str(tmp_path / "mono"),
                                "--channels", "mono"])
    row = res["manifest"][str(src / "s.wav")]
    assert read_audio(row["outputs"]["bass"])[0].shape == (1, int(1.2 * 44100))
    assert (_residual_db(row, src / "s.wav", mono=True) < -20).all()  # no content above 11 kHz
    res = separate.main(base + ["--input", str(src), "--output", str(tmp_path / "sub"),
                                "--stems", "bass,drums"])
    assert res["counts"]["ok"] == 2
    assert sorted(p.name for p in (tmp_path / "sub" / "s").iterdir()) == ["bass.wav",
                                                                          "drums.wav"]
    mp3 = res["manifest"][str(src / "m.mp3")]
    assert read_audio(mp3["outputs"]["bass"])[0].shape[0] == 2
    res = separate.main(base + ["--input", str(src / "s.wav"), "--output", str(tmp_path / "two"),
                                "--two-stems", "drums"])
    row = res["manifest"][str(src / "s.wav")]
    assert sorted(row["outputs"]) == ["drums", "no_drums"]
    assert (_residual_db(row, src / "s.wav") < -60).all()
    with pytest.raises(SystemExit, match="unknown stem"):
        separate.main(base + ["--input", str(src), "--output", str(tmp_path / "x"),
                              "--two-stems", "vocals"])


def _job_pids() -> list[int]:
    """This process and every Ray worker process it started (descendants named ray::)."""
    return [os.getpid(), *processes_named("ray::", prefix=True)]


def _peak_rss_while(fn) -> dict[int, np.ndarray]:
    """Peak (RSS, RSS - shared) in MB of every process of the job, sampled while fn() runs."""
    import threading

    peaks: dict[int, float] = {}
    stop = threading.Event()

    def sample():
        pids, tick = [], 0
        while not stop.is_set():
            if tick % 5 == 0:  # the /proc scan for new workers every 0.25 s, RSS every 0.05 s
                pids = _job_pids()
            tick += 1
            for pid in pids:
                peaks[pid] = np.maximum(peaks.get(pid, 0.0), rss_mb(pid))
            stop.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    return peaks


def _name(pid: int) -> str:
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read()[:40].replace(b"\0", b" ")
        return f"{pid}:" + cmd.decode(errors="replace").strip()
    except OSError:
        return str(pid)


def _write_long(path, seconds, sr=44100):
    """A stereo test song written block by block (the test process never holds all of it)."""
    with sf.SoundFile(path, "w", sr, 2, "PCM_16") as f:
        for i in range(int(np.ceil(seconds / 10))):
            f.write(_song(min(10, seconds - 10 * i), sr=sr, seed=i))


@pytest.mark.slow(seconds=50)
def test_memory_of_every_process_is_flat_in_track_length(ray_local, tmp_path, tiny_unet_ckpt):
    """#14: peak RSS of the largest process of the job (driver, decoders, model actor with the
    channel split) grows <= 25 % from a 15-second to a 120-second stereo 44.1 kHz file (8x, as
    from 4 to 32 minutes; benchmarks/bench_memory.py measures those lengths)."""
    src = tmp_path / "in"
    src.mkdir()
    for name, seconds in (("warm", 10), ("short", 15), ("long", 120)):
        _write_long(src / f"{name}.wav", seconds)
    peaks, rows = {}, {}
    for name in ("warm", "short", "long"):  # the warm-up run loads what every run loads
        def run(name=name):
            res = separate.main(["--ckpt", str(tiny_unet_ckpt), "--input", str(src / f"{name}.wav"),
                                 "--output", str(tmp_path / "o"), "--set", "sampler.num_steps=1",
                                 "--set", "data.chunk_samples=32768", "--batch-size", "4"])
            rows[name] = res["manifest"][str(src / f"{name}.wav")]
            assert rows[name]["status"] == "ok"
        peaks[name] = _peak_rss_while(run)
    print({n: rows[n]["max_pending"] for n in rows})
    assert rows["long"]["max_pending"] <= 8  # segments held by the driver's reorder buffer
    for n, p in peaks.items():
        top = sorted(p.items(), key=lambda kv: -kv[1][0])
        print(n, rows[n]["segments"], {_name(pid): v.round().tolist() for pid, v in top})
    short, long = (max(v[1] for v in peaks[n].values()) for n in ("short", "long"))
    assert len(peaks["long"]) >= 3  # the driver and at least two Ray workers were seen
    assert long <= 1.25 * short, (short, long)


@pytest.mark.slow(seconds=15)
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
    with pytest.raises(SystemExit, match="--split-tasks must be >= 1"):
        separate.main(base + ["--split-tasks", "0"])
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


@pytest.mark.slow(seconds=30)
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


def test_a_model_error_on_one_segment_fails_only_its_track(tmp_path, tiny_unet_ckpt):
    """#17: the model raising on one item of a batch (here a segment of the wrong length, which
    the U-Net cannot take) gives that track a failed row with the model's error, no partial
    files, and the other track of the same batches its normal output."""
    cfg, _ = load_checkpoint(tiny_unet_ckpt)
    cfg = apply_overrides(cfg, ["sampler.num_steps=2", "data.chunk_samples=8192"])
    for name, seed in (("good", 0), ("bad", 1)):
        sf.write(tmp_path / f"{name}.wav", _song(1.2, seed=seed), 44100)
    rows = []
    for name in ("good", "bad"):
        item = {"input": str(tmp_path / f"{name}.wav"), "key": name, "track": name, "parent": "x"}
        rows += list(decode_segments(item, cfg.data.sample_rate, cfg.data.chunk_samples,
                                     cfg.separation.margin, cfg.separation.overlap))
    bad = next(i for i, r in enumerate(rows) if r["key"] == "bad" and r["seg"] == 1)
    rows[bad]["mixture"] = rows[bad]["mixture"][..., :1001]  # not a multiple of the U-Net's
    model = SeparateSegments(str(tiny_unet_ckpt), cfg.to_dict())
    asm = Assembler(cfg, str(tmp_path / "out"), "{track}/{stem}.{ext}", "wav", "FLOAT", "g",
                    list(STEMS))
    done = []
    for i in range(0, len(rows), 4):  # 5 + 5 segments: batch 2 holds good's 5th and bad's 2nd
        part = rows[i : i + 4]
        if any(r is rows[bad] for r in part):
            assert any(r["key"] == "good" for r in part)
        batch = {k: np.array([r[k] for r in part]) for k in part[0] if k != "mixture"}
        batch["key"] = batch["key"].astype(object)
        batch["mixture"] = np.empty(len(part), dtype=object)  # ragged, as Ray passes it
        batch["mixture"][:] = [r["mixture"] for r in part]
        split = split_segments(model(batch))
        for j in range(len(part)):
            row = asm.add({k: v[j] for k, v in split.items()})
            done += [row] if row else []
    done += asm.finish()
    by_key = {r["key"]: r for r in done}
    assert set(by_key) == {"good", "bad"}
    assert by_key["good"]["status"] == "ok" and not by_key["good"]["error"]
    assert by_key["bad"]["status"] == "failed"
    assert "model failed on segment 1" in by_key["bad"]["error"]
    assert not (tmp_path / "out" / "bad").exists() or not any((tmp_path / "out" / "bad").iterdir())
    good = read_audio(by_key["good"]["outputs"]["bass"])[0]
    assert good.shape == _song(1.2).T.shape


def test_model_actors_that_take_every_cpu_are_refused(ray_local, synth_prepared, tmp_path,
                                                      tiny_unet_ckpt):
    """One CPU per model actor: on the 2-CPU test cluster, 2 actors would leave no CPU for the
    read tasks and the job would wait forever (it did). Both jobs refuse up front."""
    with pytest.raises(SystemExit, match="leaves none to read the input; use --actors 1"):
        separate.main(["--ckpt", str(tiny_unet_ckpt), "--input", str(_inputs(tmp_path / "in", 1)),
                       "--output", str(tmp_path / "out"), "--actors", "2"])
    with pytest.raises(SystemExit, match="leaves none to read the input; use --actors 1"):
        evaluate.main(["--ckpt", str(tiny_unet_ckpt), "--data", str(synth_prepared / "prepared"),
                       "--output", str(tmp_path / "eval"), "--actors", "2"])
    assert not (tmp_path / "eval" / "results.json").exists()
