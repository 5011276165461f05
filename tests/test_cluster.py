"""cluster.yaml against Ray's launcher schema (offline), and `ray job submit` to a real head."""

import copy
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def _validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_is_valid_for_ray_up():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    _validate(cfg)
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert cfg["available_node_types"]["gpu_worker"]["min_workers"] == 0
    assert cfg["docker"]["image"].startswith("rayproject/ray:2.60.0-")
    setup = " ".join(cfg["setup_commands"])
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pin in re.findall(r'"(torch[^"]*|torchaudio[^"]*)"', setup):
        assert pin.split()[0] in pyproject, pin  # the same pins as the project
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = 0  # misspelt key
    with pytest.raises(Exception, match="min_worker"):
        _validate(bad)


def test_every_cluster_key_has_a_comment():
    keys = [ln for ln in (ROOT / "cluster.yaml").read_text().splitlines()
            if re.match(r'^\s*[A-Za-z"_/.-]+:', ln)]
    assert keys and [ln for ln in keys if "#" not in ln] == []


@pytest.mark.slow
def test_job_submission_to_a_local_head(tmp_path):
    """`ray start --head` (own temp dir and ports, token auth) -> `ray job submit` prepare."""
    from pipelines.songs import generate_dataset

    generate_dataset(tmp_path / "slakh", 3, 2.0, seed=5)
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    head = subprocess.Popen(
        [f"{bindir}/ray", "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
         "--dashboard-port", str(dash), "--dashboard-host", "127.0.0.1", "--temp-dir", temp,
         "--disable-usage-stats"], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without the token: the server is up
                break
            except OSError:
                assert time.time() < deadline and head.poll() is None, "head did not start"
                time.sleep(1)
        out = tmp_path / "prepared"
        proc = subprocess.run(
            [f"{bindir}/ray", "job", "submit", "--address", url, "--working-dir", str(ROOT),
             "--", "python", "-m", "pipelines.prepare", "--input", str(tmp_path / "slakh"),
             "--output", str(out), "--config", "tiny"],
            env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "succeeded" in proc.stdout + proc.stderr
        report = yaml.safe_load((out / "_report.json").read_text())
        assert report["splits"]["train"]["tracks"] == 1 and not report["failed"]
        assert list((out / "train").glob("*.parquet"))
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
