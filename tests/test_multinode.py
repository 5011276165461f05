"""A two-node local cluster (a CPU-less head plus a worker node, `ray start` twice): local paths
are refused up front with a clear message and nothing is deleted; --shared-fs is verified with a
probe file seen from the other node; train refuses local storage before its first step (#17)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def _start(args, env):
    return subprocess.Popen([f"{os.path.dirname(sys.executable)}/ray", "start", "--block",
                             "--disable-usage-stats", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # it exited, and its group with it (a head that failed to start)
        proc.wait(timeout=10)
        return
    try:
        proc.wait(timeout=5)  # `ray start --block` rarely exits on SIGTERM alone
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def _ready(port: int, env: dict, budget: float) -> tuple[bool, str]:
    """Both nodes alive, seen by a fresh client; retried, since under load the head's GCS can
    answer its port before its RPCs (clients time out, or hang in ray.init)."""
    code = ("import ray, time; ray.init(address='127.0.0.1:%d'); t = time.time()\n"
            "while len([n for n in ray.nodes() if n['Alive']]) < 2 and time.time() - t < 30:\n"
            "    time.sleep(1)\n"
            "print(len([n for n in ray.nodes() if n['Alive']]))" % port)
    deadline, seen = time.time() + budget, ""
    while time.time() < deadline:
        try:
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True, timeout=60)
            if out.stdout.strip().endswith("2"):
                return True, ""
            seen = out.stdout + out.stderr
        except subprocess.TimeoutExpired as e:
            seen = f"readiness check hung for {e.timeout} s: {e.stderr!r}"
        time.sleep(2)
    return False, seen[-3000:]


def _gcs_log(temp: str) -> str:
    logs = sorted(Path(temp).glob("session_*/logs/gcs_server.*"))
    return "".join(f"\n--- {p.name}:\n{p.read_text(errors='replace')[-1500:]}" for p in logs)


@pytest.fixture(scope="module")
def two_nodes():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    failures = []
    for _ in range(3):  # a head that never serves (seen twice in make test runs) is restarted
        port = free_port()  # anew, on a new port
        temp = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")
        head = _start(["--head", "--num-cpus=0", f"--port={port}", f"--temp-dir={temp}",
                       "--include-dashboard=false"], env)
        worker = None
        try:
            try:
                _wait_for_port(port)  # the head's GCS
            except OSError as e:
                failures.append(f"head on port {port}: port closed after 60 s ({e})")
                continue
            worker = _start([f"--address=127.0.0.1:{port}", "--num-cpus=2"], env)
            ok, seen = _ready(port, env, budget=120)
            if ok:
                yield f"127.0.0.1:{port}", env
                return
            failures.append(f"head on port {port} (alive: {head.poll() is None}): {seen}"
                            f"{_gcs_log(temp)}")
        finally:
            if worker is not None:
                _stop(worker)
            _stop(head)
            shutil.rmtree(temp, ignore_errors=True)
    pytest.fail("the two-node cluster never became ready:\n" + "\n".join(failures))


def _job(name, args, env):
    return subprocess.run([sys.executable, "-m", f"pipelines.{name}", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_local_paths_on_a_two_node_cluster(two_nodes, tmp_path):
    from pipelines.songs import generate_dataset

    address, env = two_nodes
    generate_dataset(tmp_path / "slakh", 3, 1.0, seed=2)
    out = tmp_path / "prepared"
    (out / "train").mkdir(parents=True)
    (out / "train" / "old.parquet").write_bytes(b"previous shards")
    args = ["--input", str(tmp_path / "slakh"), "--output", str(out), "--config", "tiny",
            "--address", address]
    refused = _job("prepare", args, env)
    assert refused.returncode != 0
    assert "local path(s), but this Ray cluster has 1 node(s) besides the driver's" in \
        refused.stderr + refused.stdout
    assert "--shared-fs" in refused.stderr + refused.stdout
    assert (out / "train" / "old.parquet").read_bytes() == b"previous shards"  # nothing deleted

    shared = _job("prepare", args + ["--shared-fs"], env)
    assert shared.returncode == 0, shared.stdout[-3000:] + shared.stderr[-3000:]
    assert not (out / "train" / "old.parquet").exists() and list((out / "train").glob("*.parquet"))
    assert not list(out.glob("._msdm_shared_probe_*"))

    t0 = time.time()
    train = _job("train", ["--data", str(out), "--storage", str(tmp_path / "runs"), "--name", "r",
                           "--config", "tiny", "--address", address], env)
    assert train.returncode != 0 and "local path(s)" in train.stderr + train.stdout
    assert not list((tmp_path / "runs").glob("r/checkpoint_*"))  # refused before the first step
    print(f"train refused local storage after {time.time() - t0:.1f} s")
