"""The installable package: a wheel built from the checkout, installed (not editable) into a new
venv in another folder, runs `msdm` with its presets, search spaces and song generator."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow(seconds=60)
def test_the_wheel_installs_and_msdm_runs_outside_the_checkout(tmp_path, tiny_unet_ckpt):
    dist, src = tmp_path / "dist", tmp_path / "src"
    # a copy: a build writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        "demo_out", "bench_out", "runs", "data"))
    build = subprocess.run([sys.executable, "-m", "build", "--wheel", "--sdist",
                            "--no-isolation", "--outdir", str(dist), str(src)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(dist.glob("msdm-*.whl"))
    assert next(dist.glob("msdm-*.tar.gz"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # the dependencies (torch, Ray, ...) come from this environment, listed after the venv's
    # own site-packages; the package itself is installed from the wheel alone
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps",
                          "--no-index", str(wheel)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"

    def msdm(*args, timeout=300):
        run = subprocess.run([str(venv / "bin" / "msdm"), *args], cwd=work, env=env,
                             capture_output=True, text=True, timeout=timeout)
        assert run.returncode == 0, (args, run.stdout[-2000:], run.stderr[-2000:])
        return run.stdout

    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import msdm, pipelines; print(msdm.__file__, pipelines.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert str(ROOT) not in where.stdout and str(site) in where.stdout
    assert "separate" in msdm("--help") and msdm("--version").strip() == "msdm 0.1.0"
    msdm("synth", "--output", "songs", "--tracks", "2", "--seconds", "2", "--workers", "1")
    assert len(list((work / "songs").glob("*/Track*/MIDI/S00.mid"))) == 2
    dry = msdm("tune", "--ckpt", str(tiny_unet_ckpt), "--data", "nowhere", "--space",
               "cost_aware", "--storage", "s", "--name", "n", "--dry-run")
    assert "sampler.num_steps" in dry  # the packaged space, found by name
    x = 0.1 * np.random.default_rng(0).standard_normal((22050, 2)).astype(np.float32)
    sf.write(work / "song.wav", x, 22050)
    out = msdm("separate", "song.wav", "--ckpt", str(tiny_unet_ckpt), "--set",
               "sampler.num_steps=2", "--num-cpus", "2")
    stems = sorted((work / "separated" / "tiny" / "song").glob("*.wav"))
    assert [p.stem for p in stems] == ["bass", "drums", "guitar", "piano"]
    assert f"stems in {work / 'separated' / 'tiny'}" in out
