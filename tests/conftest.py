"""Shared fixtures: tiny config, synthetic stems, the exact Gaussian denoiser, a local Ray
cluster and an S3 server on loopback (moto_server)."""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from msdm.config import get_preset
from msdm.diffusion import GaussianDenoiser

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on 2 cores next to their Ray workers: one thread each.
    # Two torch threads in a worker that shares its core spin against each other (measured: the
    # overfit test took 44 s under `-n 2` with two threads, 6 s alone with one).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# A 4-stem prior with distinct variances and correlations (variance ~ sigma_data^2).
COV = torch.tensor(
    [[0.040, 0.020, 0.010, 0.015],
     [0.020, 0.050, 0.012, 0.010],
     [0.010, 0.012, 0.030, 0.020],
     [0.015, 0.010, 0.020, 0.045]], dtype=torch.float64)


@pytest.fixture
def tiny_cfg():
    return get_preset("tiny")


@pytest.fixture
def cov():
    return COV.clone()


@pytest.fixture
def gaussian_denoiser():
    return GaussianDenoiser(COV)


def gaussian_samples(cov: torch.Tensor, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """x ~ N(0, cov) i.i.d. over time: [B, S, T] float32."""
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(cov)
    z = torch.randn(batch, cov.shape[0], length, generator=g, dtype=torch.float64)
    return (chol @ z).float()


@pytest.fixture
def synthetic_stems():
    """Sines and noise: [2, 4, 4096] at 22.05 kHz, amplitude ~0.3."""
    t = torch.arange(4096) / 22050
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in range(2):
        rows.append(torch.stack([
            0.3 * torch.sin(2 * math.pi * 55 * (b + 1) * t),
            0.2 * torch.randn(4096, generator=g) * (torch.arange(4096) % 2048 < 256),
            0.25 * torch.sin(2 * math.pi * 330 * (b + 1) * t),
            0.2 * torch.sin(2 * math.pi * 440 * (b + 1) * t) * torch.exp(-t * 8),
        ]))
    return torch.stack(rows)


def ancestors(pid: int) -> list[int]:
    """Parent, grandparent, ... of a process (from /proc)."""
    out = []
    while pid > 1:
        try:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        out.append(pid)
    return out


def processes_named(text: str, prefix: bool = False) -> list[int]:
    """Processes of this test run's Ray cluster (descendants of this process) whose command
    line contains `text` (starts with it, with `prefix`): never another pytest worker's."""
    pids, want = [], text.encode()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            if (cmd.startswith(want) if prefix else want in cmd) and \
                    os.getpid() in ancestors(int(entry)):
                pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return sorted(pids)


_ISSUED: set[int] = set()


def _quiet_port_ranges() -> list[range]:
    """Ports above Ray's worker ports (10002-19999) and outside the kernel's ephemeral range."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    spans = [range(20000, min(low, 32000)), range(max(high + 1, 20000), 65536)]
    return [r for r in spans if len(r) >= 1000]


def free_port() -> int:
    """A free TCP port outside the kernel's ephemeral range (read from /proc) and Ray's worker
    ports, never one this process handed out before. A port the kernel handed out for port 0
    and we released can be handed out again before our server binds it; a gRPC server (Ray's
    GCS) then binds it too, with SO_REUSEPORT, and clients reach the wrong process: the "head
    that never serves" seen in make test runs. Outside that range nothing is handed out behind
    our back. Where no such range is left, the kernel's choice, as before."""
    rng = random.Random()
    ranges = _quiet_port_ranges()
    for _ in range(200 if ranges else 0):
        port = rng.choice(rng.choice(ranges))
        if port in _ISSUED:
            continue
        try:
            with socket.socket() as s:
                s.bind(("0.0.0.0", port))
        except OSError:
            continue
        _ISSUED.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto_server) on 127.0.0.1; sets the standard AWS env variables."""
    port = free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server):
    import boto3

    name = f"bkt-{time.time_ns() % 10**9}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One private local Ray cluster for the whole run (S3 env exported before init)."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # idle task workers are kept (Ray kills those above the CPU count after 1 s): a test run
    # starts ~50 worker processes, each paying the torch import, and most of them only to
    # replace one just killed
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tmp,
             configure_logging=False, log_to_driver=True,
             _system_config={"idle_worker_killing_time_threshold_ms": 300_000,
                             "num_workers_soft_limit": 6})
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def tmp_dir(tmp_path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def synth_prepared(ray_local, tmp_path_factory):
    """6 generated songs of 9 s, prepared with the tiny preset (train/validation/test). Read-only
    for the tests; under `pytest -n 2` the workers share one copy (the first one prepares it)."""
    from filelock import FileLock

    from pipelines import prepare
    from pipelines.songs import generate_dataset

    if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp = pytest-N/popen-gwK: share pytest-N/
        root = tmp_path_factory.getbasetemp().parent / "synth"
    else:
        root = tmp_path_factory.mktemp("synth")
    with FileLock(str(root) + ".lock"):
        if not (root / "prepared" / "_report.json").exists():
            generate_dataset(root / "slakh", 6, 9.0, seed=3)
            prepare.main(["--input", str(root / "slakh"), "--output", str(root / "prepared"),
                          "--config", "tiny"])
    return root


@pytest.fixture(scope="session")
def tiny_unet_ckpt(tmp_path_factory):
    """An (untrained) tiny U-Net checkpoint: the real network code path, fast on CPU."""
    from msdm.checkpoint import build_denoiser, save

    torch.manual_seed(0)
    cfg = get_preset("tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    save(path, cfg, build_denoiser(cfg))
    return path


def _seconds(item) -> float:
    marker = item.get_closest_marker("slow")
    return 1.0 if marker is None else float(marker.kwargs.get("seconds", 20))


@pytest.hookimpl(trylast=True)  # after pytest's own -k/-m deselection
def pytest_collection_modifyitems(config, items):
    """Longest tests first, spread evenly over the xdist workers. `--dist worksteal` (make test)
    gives each worker one contiguous block of the collection (n // k items to the first, ...)
    and later moves tests from the tail of a busy worker's block to an idle one. So the
    collection is built as those blocks: each test in turn, longest first (`slow(seconds=N)`,
    its wall time in make test), goes to the block with the least expected time that still has
    room; in each block its long tests come first and its quick ones form the tail."""
    k = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    sizes, left = [], len(items)
    for i in range(k):  # xdist's own split: len(pending) // nodes_remaining, in turn
        sizes.append(left // (k - i))
        left -= sizes[-1]
    blocks = [[] for _ in range(k)]
    load = [0.0] * k
    for item in sorted(items, key=_seconds, reverse=True):  # stable: ties keep file order
        b = min((i for i in range(k) if len(blocks[i]) < sizes[i]), key=lambda i: load[i])
        blocks[b].append(item)
        load[b] += _seconds(item)
    items[:] = [item for block in blocks for item in block]
