"""cluster.yaml against Ray's launcher schema and EC2's RunInstances shape (offline), its security
settings, and a real two-node cluster started by cluster.yaml's own head and worker commands:
token auth on `ray job submit`, and local paths refused on a cluster whose nodes do not share a
disk unless --shared-fs (#17)."""

import copy
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
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


def _cfg():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _start_command(cfg, key):
    """The `ray start` line of head_/worker_start_ray_commands (the other one is `ray stop`)."""
    (cmd,) = [c for c in cfg[key] if "ray start" in c]
    return cmd


# The head command before issue #19: no token auth, dashboard on every interface.
OLD_HEAD = ("ulimit -n 65536; ray start --head --port=6379 --object-manager-port=8076 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=0.0.0.0")


def _check_token_auth(cfg):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        cmd = _start_command(cfg, key)
        before = cmd[:cmd.index("ray start")]
        assert "export RAY_AUTH_MODE=token;" in before, f"{key}: no token auth"


def test_every_node_starts_ray_with_token_auth():
    cfg = _cfg()
    _check_token_auth(cfg)
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]  # ray exec, attach, drivers
    text = (ROOT / "cluster.yaml").read_text()
    assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]\s*\S", text), "a token value in cluster.yaml"
    assert "RAY_AUTH_MODE=disabled" not in text
    hostile = copy.deepcopy(cfg)
    hostile["head_start_ray_commands"][-1] = OLD_HEAD
    with pytest.raises(AssertionError, match="head_start_ray_commands: no token auth"):
        _check_token_auth(hostile)


def _check_dashboard_on_loopback(cfg):
    args = shlex.split(_start_command(cfg, "head_start_ray_commands").split("ray start", 1)[1])
    hosts = [a.split("=", 1)[1] for a in args if a.startswith("--dashboard-host=")]
    hosts += [args[i + 1] for i, a in enumerate(args) if a == "--dashboard-host"]
    assert hosts == ["127.0.0.1"], f"dashboard host {hosts}: must be 127.0.0.1 (SSH tunnel)"


def test_dashboard_is_bound_to_loopback():
    cfg = _cfg()
    _check_dashboard_on_loopback(cfg)
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()
    hostile = copy.deepcopy(cfg)
    hostile["head_start_ray_commands"][-1] = OLD_HEAD
    with pytest.raises(AssertionError, match=r"\['0.0.0.0'\]: must be 127.0.0.1"):
        _check_dashboard_on_loopback(hostile)


def _check_token_mount(cfg):
    token = {dst: src for dst, src in cfg["file_mounts"].items() if "auth_token" in dst}
    # Ray's default token path on both sides: the client's `ray job submit` finds it there too.
    assert token == {"~/.ray/auth_token": "~/.ray/auth_token"}, f"token mount {token}"
    local = Path(os.path.expanduser(token["~/.ray/auth_token"])).resolve()
    if local.is_relative_to(ROOT):  # a token file in the repo must at least be git-ignored
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(local)])
        assert ignored.returncode == 0, f"{local} is in the repository and not git-ignored"


def test_token_file_is_mounted_from_outside_the_repo():
    cfg = _cfg()
    _check_token_mount(cfg)
    assert not Path(os.path.expanduser("~/.ray/auth_token")).resolve().is_relative_to(ROOT)
    hostile = copy.deepcopy(cfg)
    hostile["file_mounts"] = {"/home/ray/msdm": ".", "~/.ray/auth_token": str(ROOT / "auth_token")}
    with pytest.raises(AssertionError, match="token mount"):
        _check_token_mount(hostile)


def _check_node_types(cfg):
    for name, node_type in cfg["available_node_types"].items():
        node = node_type["node_config"]
        assert node.get("MetadataOptions") == {
            "HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 2,
        }, f"{name}: IMDSv2 not required"
        # No ImageId = Ray's default DLAMI (CUDA 11.2), whose driver is too old for torch 2.14.
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}|resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                            r"base-oss-nvidia-driver-gpu-ubuntu-2[24]\.04/latest/ami-id",
                            node.get("ImageId", "")), f"{name}: no pinned ImageId"


def test_every_node_type_requires_imdsv2_and_pins_a_gpu_image():
    cfg = _cfg()
    _check_node_types(cfg)
    no_image = copy.deepcopy(cfg)
    del no_image["available_node_types"]["gpu_worker"]["node_config"]["ImageId"]
    _validate(no_image)  # Ray accepts it and silently falls back to its CUDA 11.2 AMI
    with pytest.raises(AssertionError, match="gpu_worker: no pinned ImageId"):
        _check_node_types(no_image)
    imdsv1 = copy.deepcopy(cfg)
    head_imds = imdsv1["available_node_types"]["head"]["node_config"]["MetadataOptions"]
    head_imds["HttpTokens"] = "optional"
    with pytest.raises(AssertionError, match="head: IMDSv2 not required"):
        _check_node_types(imdsv1)


def test_node_configs_match_ec2_run_instances():
    """Ray passes node_config to EC2 create_instances unchanged: check its keys with botocore."""
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    ec2 = botocore_session.get_session().get_service_model("ec2")
    shape = ec2.operation_model("RunInstances").input_shape
    cfg = _cfg()
    for name, node_type in cfg["available_node_types"].items():
        params = {**node_type["node_config"], "MinCount": 1, "MaxCount": 1}
        report = ParamValidator().validate(params, shape)
        assert not report.has_errors(), (name, report.generate_report())
    hostile = {**cfg["available_node_types"]["head"]["node_config"], "MinCount": 1, "MaxCount": 1,
               "MetadataOptions": {"HttpToken": "required"}}  # misspelt: EC2 rejects the launch
    assert "HttpToken" in ParamValidator().validate(hostile, shape).generate_report()


def _lan_ip():
    """This machine's address on its default route, or None (a dashboard there must be refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def _node_ports() -> str:
    """Every port a node opens, chosen outside the kernel's ephemeral range (conftest.free_port):
    two nodes share this machine, next to the test run's own Ray clusters."""
    return " ".join(f"--{name}={free_port()}" for name in (
        "object-manager-port", "node-manager-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"))


def _node_commands(cfg, port, dash, temp):
    """cluster.yaml's head and worker start commands, run as written except for node-local ports
    and paths, the CPU counts (a CPU-less head, as in cluster.yaml, and a 2-CPU worker) and the
    head's address, which the launcher fills in. Each node gets its own temporary folder, as on
    two machines: sharing one, the worker node's runtime-env agent deletes the job's working
    directory (the head's copy too) when its own tasks no longer need it."""
    head = _start_command(cfg, "head_start_ray_commands")
    worker = _start_command(cfg, "worker_start_ray_commands")
    for old, new in [("--port=6379", f"--port={port}"), ("--object-manager-port=8076", ""),
                     ("--autoscaling-config=~/ray_bootstrap_config.yaml", "")]:
        assert head.count(old) == 1, old
        head = head.replace(old, new)
    for old, new in [("$RAY_HEAD_IP:6379", f"127.0.0.1:{port}"),
                     ("--object-manager-port=8076", "")]:
        assert worker.count(old) == 1, old
        worker = worker.replace(old, new)
    head += (f" --block --num-cpus=0 --dashboard-port={dash} --temp-dir={temp} "
             f"--ray-client-server-port={free_port()} --disable-usage-stats {_node_ports()}")
    worker += (f" --block --num-cpus=2 --temp-dir={temp}/worker --disable-usage-stats "
               f"{_node_ports()}")
    return head, worker


def _start(cmd, env):
    return subprocess.Popen(["bash", "-c", cmd], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # it exited, and its group with it (a node that failed to start)
        proc.wait(timeout=10)
        return
    try:
        proc.wait(timeout=5)  # `ray start --block` rarely exits on SIGTERM alone
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _job_api_wants_the_token(url, head, timeout=90) -> str:
    """'' once the job API answers and wants the token; else why it never answered."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            pytest.fail("the job API answered a request without the token")
        except urllib.error.HTTPError as e:  # the server is up and wants the token
            assert e.code in (401, 403), e.code
            return ""
        except OSError as e:
            if head.poll() is not None:
                return f"the head exited with code {head.returncode}"
            if time.time() > deadline:
                return f"no answer on {url} after {timeout} s ({e})"
            time.sleep(1)


def _two_nodes_alive(port, env, budget=120) -> tuple[bool, str]:
    """Both nodes registered, seen by a fresh client (which needs the token too)."""
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
            seen = f"the check hung for {e.timeout} s: {e.stderr!r}"
        time.sleep(2)
    return False, seen[-3000:]


def _gcs_log(temp: str) -> str:
    logs = sorted(Path(temp).glob("session_*/logs/gcs_server.*"))
    return "".join(f"\n--- {p.name}:\n{p.read_text(errors='replace')[-1500:]}" for p in logs)


@pytest.fixture(scope="module")
def cluster_yaml_nodes(tmp_path_factory):
    """A head and a worker node on this machine, each started by cluster.yaml's own command with
    token auth; the token reaches a node as ~/.ray/auth_token (file_mounts). Yields the GCS
    address, the job API's URL, the environment of a client holding the token, and the base
    environment (no token anywhere)."""
    bindir = os.path.dirname(sys.executable)
    base = {k: v for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    base["PATH"] = f"{bindir}:{os.environ['PATH']}"
    home = tmp_path_factory.mktemp("node_home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    (home / ".ray" / "auth_token").chmod(0o600)
    node_env = {**base, "HOME": str(home)}
    client = {**node_env, "RAY_AUTH_MODE": "token"}
    failures = []
    for _ in range(2):  # a head that never serves is restarted anew, on new ports
        port, dash = free_port(), free_port()
        temp = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
        head_cmd, worker_cmd = _node_commands(_cfg(), port, dash, temp)
        head, worker = _start(head_cmd, node_env), None
        try:
            url = f"http://127.0.0.1:{dash}"
            if why := _job_api_wants_the_token(url, head):
                failures.append(f"head on port {port}: {why}{_gcs_log(temp)}")
                continue
            worker = _start(worker_cmd, node_env)
            ok, seen = _two_nodes_alive(port, client)
            if ok:
                yield f"127.0.0.1:{port}", url, client, base
                return
            failures.append(f"head on port {port} (alive: {head.poll() is None}): {seen}"
                            f"{_gcs_log(temp)}")
        finally:
            if worker is not None:
                _stop(worker)
            _stop(head)
            shutil.rmtree(temp, ignore_errors=True)
    pytest.fail("the two-node cluster never became ready:\n" + "\n".join(failures))


def _submit(url, env, *entrypoint, working_dir=None):
    wd = ["--working-dir", str(working_dir)] if working_dir else []
    ray = f"{os.path.dirname(sys.executable)}/ray"
    deadline = time.time() + 60
    while True:  # the head's job agent starts a few seconds after its dashboard answers
        proc = subprocess.run([ray, "job", "submit", "--address", url, *wd, "--", *entrypoint],
                              env=env, capture_output=True, text=True, timeout=300)
        if "No available agent" not in proc.stderr or time.time() > deadline:
            return proc
        time.sleep(2)


def _driver(name, args, env):
    return subprocess.run([sys.executable, "-m", f"pipelines.{name}", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow(seconds=90)
def test_cluster_yaml_nodes_refuse_jobs_without_the_token_and_local_paths(cluster_yaml_nodes,
                                                                         tmp_path):
    """One cluster, two nodes, both started by cluster.yaml's commands:
    - the job API listens on 127.0.0.1 only and refuses a submit without the token or with a
      wrong one (AuthenticationError);
    - local paths are refused up front with a clear message, and nothing is deleted (#17): the
      other node cannot see this machine's disk;
    - with the token, `ray job submit ... pipelines.prepare --shared-fs` runs, after its probe
      file is seen from the other node;
    - train refuses local storage before its first step."""
    from pipelines.songs import generate_dataset

    address, url, client, base = cluster_yaml_nodes
    dash = int(url.rsplit(":", 1)[1])
    if (ip := _lan_ip()) is not None:  # --dashboard-host=127.0.0.1: nothing on other interfaces
        with pytest.raises(OSError):
            socket.create_connection((ip, dash), timeout=2).close()
    stranger = tmp_path / "stranger_home"  # a client with no token anywhere
    stranger.mkdir()
    no_token = _submit(url, {**base, "HOME": str(stranger)}, "echo", "pwned")
    assert no_token.returncode != 0 and "pwned" not in no_token.stdout
    assert "AuthenticationError" in no_token.stderr, no_token.stderr[-2000:]
    assert "no authentication token was found" in no_token.stderr, no_token.stderr[-2000:]
    wrong = _submit(url, {**base, "HOME": str(stranger), "RAY_AUTH_MODE": "token",
                          "RAY_AUTH_TOKEN": secrets.token_hex(32)}, "echo", "pwned")
    assert wrong.returncode != 0 and "pwned" not in wrong.stdout
    assert "invalid or incorrect" in wrong.stderr, wrong.stderr[-2000:]

    generate_dataset(tmp_path / "slakh", 3, 2.0, seed=5)
    out = tmp_path / "prepared"
    (out / "train").mkdir(parents=True)
    (out / "train" / "old.parquet").write_bytes(b"previous shards")
    args = ["--input", str(tmp_path / "slakh"), "--output", str(out), "--config", "tiny"]
    refused = _driver("prepare", args + ["--address", address], client)
    assert refused.returncode != 0
    assert "local path(s), but this Ray cluster has 1 node(s) besides the driver's" in \
        refused.stderr + refused.stdout
    assert "--shared-fs" in refused.stderr + refused.stdout
    assert (out / "train" / "old.parquet").read_bytes() == b"previous shards"  # nothing deleted

    # the client's token: ~/.ray/auth_token, as on the nodes
    proc = _submit(url, client, "python", "-m", "pipelines.prepare", *args, "--shared-fs",
                   working_dir=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "succeeded" in proc.stdout + proc.stderr
    report = yaml.safe_load((out / "_report.json").read_text())
    assert report["splits"]["train"]["tracks"] == 1 and not report["failed"]
    assert not (out / "train" / "old.parquet").exists() and list((out / "train").glob("*.parquet"))
    assert not list(out.glob("._msdm_shared_probe_*"))

    t0 = time.time()
    train = _driver("train", ["--data", str(out), "--storage", str(tmp_path / "runs"), "--name",
                              "r", "--config", "tiny", "--address", address], client)
    assert train.returncode != 0 and "local path(s)" in train.stderr + train.stdout
    assert not list((tmp_path / "runs").glob("r/checkpoint_*"))  # refused before the first step
    print(f"train refused local storage after {time.time() - t0:.1f} s")
