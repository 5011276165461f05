"""The file-level Python API (msdm.Separator) against the Ray job, and the `msdm` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import msdm
from pipelines import command, separate

ROOT = Path(__file__).resolve().parents[1]


def _song(seconds, sr=44100, channels=2, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.2 * np.sin(2 * np.pi * 110 * t) + 0.1 * np.sin(2 * np.pi * 440 * t)
    x = x + 0.02 * rng.standard_normal(len(t))
    return np.stack([x, 0.6 * x + 0.01 * rng.standard_normal(len(t))][:channels]).T.astype(
        np.float32)


@pytest.mark.slow(seconds=25)
def test_the_python_api_and_the_job_write_the_same_stems(ray_local, tmp_path, tiny_unet_ckpt):
    """Stereo 44.1 kHz in, the job's files and separate_file's arrays: the same stems (same
    seeds, same segments, same split), at the input's rate and channels, summing to it."""
    x = _song(2.5)
    src = tmp_path / "in" / "song.wav"
    src.parent.mkdir()
    sf.write(src, x, 44100, subtype="FLOAT")
    out = tmp_path / "out"
    res = separate.main(["--ckpt", str(tiny_unet_ckpt), "--input", str(src), "--output",
                         str(out)])
    assert res["counts"]["ok"] == 1
    sep = msdm.Separator.from_checkpoint(str(tiny_unet_ckpt), device="cpu")
    api = sep.separate_file(src)
    assert list(api) == list(sep.stems)
    total = 0
    for stem, (y, rate) in api.items():
        job, job_rate = sf.read(out / "song" / f"{stem}.wav", dtype="float32", always_2d=True)
        assert rate == job_rate == 44100 and y.shape == job.T.shape == (2, len(x))
        np.testing.assert_allclose(y, job.T, atol=2e-5)
        total = total + y
    np.testing.assert_allclose(total, x.T, atol=1e-4)  # the stems sum to the file


def test_separate_takes_waveforms_of_any_shape_and_rate(tiny_unet_ckpt):
    sep = msdm.Separator.from_checkpoint(str(tiny_unet_ckpt))
    mono = _song(1.2, sr=16000, channels=1)[:, 0]
    stems = sep.separate(mono, 16000)
    assert all(y.shape == mono.shape for y in stems.values())
    np.testing.assert_allclose(sum(stems.values()), mono, atol=1e-4)
    stereo = _song(1.0, sr=48000).T
    stems = sep.separate(stereo, 48000, output_rate=24000)
    assert all(y.shape == (2, 24000) for y in stems.values())
    with pytest.raises(ValueError, match="NaN"):
        sep.separate(np.full(1000, np.nan, np.float32), 44100)
    with pytest.raises(ValueError, match=r"\[T\] or \[C, T\]"):
        sep.separate(np.zeros((1, 2, 100), np.float32), 44100)


def test_the_api_runs_without_ray(tmp_path, tiny_unet_ckpt):
    sf.write(tmp_path / "a.flac", _song(1.0), 44100)
    code = ("import sys; sys.modules['ray'] = None; import msdm; "
            f"s = msdm.Separator.from_checkpoint({str(tiny_unet_ckpt)!r}); "
            f"out = s.separate_file({str(tmp_path / 'a.flac')!r}); "
            "print(sorted(out), out['bass'][0].shape, out['bass'][1])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, check=True)
    assert run.stdout.strip() == "['bass', 'drums', 'guitar', 'piano'] (2, 44100) 44100"


def test_msdm_command_lists_the_jobs_and_runs_them(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        command.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for job in command.JOBS:
        assert f"  {job} " in text
    command.main(["--version"])
    assert capsys.readouterr().out.strip() == f"msdm {command.version()}"
    with pytest.raises(SystemExit) as e:
        command.main(["nope"])
    assert e.value.code == 2 and "unknown job 'nope'" in capsys.readouterr().err
    run = subprocess.run([sys.executable, "-m", "pipelines", "synth", "--output",
                          str(tmp_path / "s"), "--tracks", "1", "--seconds", "2",
                          "--renderer", "additive", "--workers", "1"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert list((tmp_path / "s").glob("*/Track00001/mix.flac"))
    bad = subprocess.run([sys.executable, "-m", "pipelines", "prepare", "--input",
                          str(tmp_path / "missing"), "--output", str(tmp_path / "p")], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("msdm prepare: error: ")


@pytest.mark.slow(seconds=20)
def test_separate_takes_files_and_folders_mixed_and_skips_what_is_missing(
        ray_local, tmp_path, tiny_unet_ckpt, monkeypatch, capsys):
    """`msdm separate a.wav folder/ missing.wav empty/`: the missing path and the folder with no
    audio are named on one line each, the unreadable file is a failed row, the good files are
    separated under separated/<checkpoint name>/ (the working directory's), ending with where."""
    monkeypatch.chdir(tmp_path)
    sf.write(tmp_path / "a.wav", _song(1.0), 44100)
    (tmp_path / "folder" / "deeper").mkdir(parents=True)
    sf.write(tmp_path / "folder" / "deeper" / "b.flac", _song(1.2, seed=1), 44100)
    (tmp_path / "folder" / "broken.wav").write_bytes(b"RIFF" + bytes(40))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not audio")
    res = separate.main(["a.wav", "folder", "missing.wav", "empty", "--ckpt",
                         str(tiny_unet_ckpt)])
    text = capsys.readouterr().out
    assert res["counts"] == {"ok": 2, "failed": 1, "skipped": 0}
    assert "skipped missing.wav" in text and "skipped empty: no audio files" in text
    out = tmp_path / "separated" / "tiny"
    assert f"stems in {out}" in text
    for track, seconds in (("a", 1.0), ("b", 1.2)):
        stems = sorted(p.name for p in (out / track).glob("*.wav"))
        assert stems == ["bass.wav", "drums.wav", "guitar.wav", "piano.wav"]
        y, rate = sf.read(out / track / "bass.wav", always_2d=True)
        assert rate == 44100 and y.shape == (int(seconds * 44100), 2)
    row = res["manifest"][str(tmp_path / "folder" / "broken.wav")]
    assert row["status"] == "failed" and row["error"]
    with pytest.raises(SystemExit, match="nothing to separate: missing.wav, empty"):
        separate.main(["missing.wav", "empty", "--ckpt", str(tiny_unet_ckpt)])


def test_default_output_is_named_after_the_checkpoint():
    assert separate.default_output("runs/demo/model.ckpt") == "separated/demo"
    assert separate.default_output("ckpts/epoch=419.ckpt") == "separated/epoch=419"
    assert separate.default_output("s3://b/exp/last.ckpt") == "separated/exp"
    assert separate.default_output("model.ckpt") == "separated/model"
