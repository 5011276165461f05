"""Shared pipeline plumbing: the parent CLI parser, the one config resolution, checkpoint
arguments, Ray start-up, logging and memory probes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import sys
import tempfile
import time
from contextlib import contextmanager

from msdm.audio import AudioError
from msdm.checkpoint import CheckpointError
from msdm.config import (
    PRESETS,
    Config,
    ConfigError,
    apply_overrides,
    flatten,
    load_config,
    load_sampler_yaml,
    merge,
    read_partial,
)
from msdm.data import TrackError

from . import storage
from .models import check_init

_T0 = time.time()
FIXED_BY_CHECKPOINT = ("model.", "diffusion.", "data.stems", "train.stem")


def log(msg: str) -> None:
    print(f"[{time.time() - _T0:7.1f}s] {msg}", flush=True)


# errors in what the user gave (config, checkpoint, audio, track, storage): the message says it
USER_ERRORS = (ConfigError, CheckpointError, AudioError, TrackError, storage.StorageError)


def cli(main) -> None:
    """Run a job's main() from the command line: a user error ends with `job: error: message` and
    exit status 2, not a traceback (--verbose, or MSDM_TRACEBACK=1 for the jobs without that
    option, keeps the traceback)."""
    try:
        main()
    except USER_ERRORS as e:
        verbose = any(len(a) > 4 and "--verbose".startswith(a) for a in sys.argv[1:])
        if verbose or os.environ.get("MSDM_TRACEBACK", "") not in ("", "0"):
            raise
        job = os.path.basename(sys.argv[0]).removesuffix(".py")
        print(f"{job}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def parser(doc: str, default_config: str = "paper") -> argparse.ArgumentParser:
    """Parent parser: --config, --set, --address, --seed, --smoke-test, --dry-run, --num-cpus."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("config and cluster")
    g.add_argument("--config", default=None,
                   help=f"preset name ({', '.join(PRESETS)}) or YAML file (default: "
                        f"{default_config}; tiny with --smoke-test). With --ckpt: a YAML file of "
                        "keys applied over the checkpoint's config")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (e.g. --set sampler.s_churn=20)")
    g.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a new local cluster)")
    g.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of a new local cluster (default: all; 2 with --smoke-test)")
    g.add_argument("--seed", type=int, default=0, help="base random seed")
    g.add_argument("--smoke-test", action="store_true",
                   help="tiny preset, private 2-CPU local Ray, a few rows, CPU only")
    g.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    g.add_argument("--verbose", action="store_true",
                   help="also show Ray Data's and Ray Train's INFO lines")
    g.add_argument("--shared-fs", action="store_true",
                   help="local paths are on a mount every node shares (NFS); checked with a "
                        "probe file. Without it, a multi-node cluster refuses local paths")
    p.set_defaults(_default_config=default_config)
    return p


def add_init(p: argparse.ArgumentParser) -> None:
    """--init REGRESSOR_CKPT for the separating jobs (evaluate, separate, tune)."""
    p.add_argument("--init", default=None, metavar="REGRESSOR_CKPT",
                   help="regressor checkpoint (train --set model.kind=hdemucs) whose estimate, "
                        "re-noised to sampler.sigma_max, starts the sampler (sets separation.init)")


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return n


def add_threads(p: argparse.ArgumentParser) -> None:
    """--threads for the jobs with CPU model actors (evaluate, separate)."""
    p.add_argument("--threads", type=_threads, default=0,
                   help="torch threads per CPU model actor (default 0: one per CPU it holds, "
                        "i.e. 1). An actor holds one CPU; when reading is light (evaluate on a "
                        "small box) more threads use the cores the readers leave idle")


def resolve_config(args, base: Config | None = None, sampler_files=()) -> Config:
    """The one way every job resolves its config, before Ray starts.

    Without `base`: the --config preset or file (tiny under --smoke-test). With `base` (a
    checkpoint's config): --config must be a YAML file, applied over it. Then each sampler file,
    then the --set overrides, then --init. The network (model.*, diffusion.*, data.stems) of a
    checkpoint cannot be changed. Errors are ConfigError naming the key or file, and
    CheckpointError for a missing or mismatched --init.
    """
    if base is None:
        cfg = load_config(args.config or ("tiny" if args.smoke_test else args._default_config))
    else:
        cfg = base
        if args.config:
            if args.config in PRESETS:
                raise ConfigError(f"--config {args.config}: a preset cannot apply to a trained "
                                  "checkpoint (its network is fixed); give a YAML file of "
                                  "sampler/separation keys, --sampler-config or --set")
            partial = read_partial(fetch_local(args.config))
            if "preset" in partial:
                raise ConfigError(f"{args.config}: 'preset' cannot apply to a trained checkpoint")
            cfg = merge(cfg, partial)
    for f in sampler_files:
        cfg = apply_overrides(cfg, load_sampler_yaml(fetch_local(f)))
    if args.overrides:
        cfg = apply_overrides(cfg, args.overrides)
    if getattr(args, "init", None):
        cfg = apply_overrides(cfg, {"separation.init": storage.absolute(args.init)})
    if base is not None:
        _check_fixed(base, cfg)
        check_init(cfg)
    return cfg


def _check_fixed(base: Config, cfg: Config) -> None:
    a, b = flatten(base.to_dict()), flatten(cfg.to_dict())
    changed = sorted(k for k in a if a[k] != b[k]
                     and (k.startswith(FIXED_BY_CHECKPOINT) or k in FIXED_BY_CHECKPOINT))
    if changed:
        raise ConfigError(f"{', '.join(changed)}: fixed by the checkpoint's network, "
                          "cannot be overridden")


def parse_ckpt(values) -> str | dict[str, str]:
    """--ckpt URI (joint model) or --ckpt bass=URI --ckpt drums=URI ... (ISDM, one per stem)."""
    values = [values] if isinstance(values, str) else list(values or [])
    if not values:
        raise ConfigError("--ckpt is required")
    pairs = [re.match(r"^([A-Za-z][\w-]*)=(.+)$", v) for v in values]
    if len(values) == 1 and pairs[0] is None:
        return storage.absolute(values[0])
    out = {}
    for v, m in zip(values, pairs):
        if m is None:
            raise ConfigError(f"--ckpt {v!r}: give one URI for a joint model, or STEM=URI for "
                             "every stem of an ISDM model")
        stem, uri = m.groups()
        if stem in out:
            raise ConfigError(f"--ckpt given twice for stem {stem!r}")
        out[stem] = storage.absolute(uri)
    return out


def ckpt_uris(ckpt) -> list[str]:
    """The checkpoint URIs of a parsed --ckpt (one, or one per stem)."""
    return list(ckpt.values()) if isinstance(ckpt, dict) else [ckpt]


def fetch_local(uri: str) -> str:
    """A local path for `uri` (remote files are copied to a temp file)."""
    if not storage.is_remote(uri):
        return uri
    fd, path = tempfile.mkstemp(suffix=os.path.basename(uri))
    with os.fdopen(fd, "wb") as f:
        f.write(storage.read_bytes(uri))
    return path


def dry_run(cfg: Config, args, extra: dict | None = None) -> bool:
    """Print the resolved config (and job options) as YAML; True if the job should exit."""
    if args.dry_run:
        print(cfg.to_yaml())
        if extra:
            print(json.dumps(extra, indent=2, default=str))
    return args.dry_run


def init_ray(args, paths=(), runtime_env: dict | None = None):
    """Connect to --address / RAY_ADDRESS, or start a private local cluster, then check that
    the `paths` workers read or write are visible to every node (`check_paths`).

    Does not start a second cluster if Ray is already initialised (a test fixture's is reused).
    """
    import ray

    if not ray.is_initialized():
        _start_ray(ray, args, runtime_env)
    check_paths(ray, paths, getattr(args, "shared_fs", False))
    return ray


def _start_ray(ray, args, runtime_env):
    # S3 settings and the tracking backends' (MLflow, W&B) go to every worker
    env_vars = {k: v for k, v in os.environ.items()
                if k.startswith(("AWS_", "MSDM_", "MLFLOW_", "WANDB_"))}
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not getattr(args, "verbose", False):
        # Ray Data actors (a training run's SplitCoordinator) log an INFO line per epoch and
        # Ray Train's DatasetManager a deprecation warning about Ray's own option: quiet them
        # in every worker process, not only in the driver (below). A new local cluster's
        # workers inherit this process's environment (no runtime env, so Ray's pre-started
        # workers stay usable); an existing cluster's get it through the job's runtime env.
        quiet = {"RAY_DATA_LOG_LEVEL": "WARNING",
                 "PYTHONWARNINGS": "ignore:`ExecutionOptions.exclude_resources` is deprecated"}
        for k, v in quiet.items():
            if k not in os.environ:
                (env_vars if address else os.environ)[k] = v
    renv = dict(runtime_env or {})
    if env_vars:
        renv.setdefault("env_vars", {}).update(env_vars)
    if address:
        ray.init(address=address, runtime_env=renv or None, log_to_driver=True)
    else:
        num_cpus = args.num_cpus or (2 if args.smoke_test else None)
        store = getattr(args, "object_store_mb", None)
        # the dashboard hosts the State API that Ray Train's controller polls
        ray.init(address="local", num_cpus=num_cpus, runtime_env=renv or None,
                 object_store_memory=int(store * (1 << 20)) if store else None)
    ctx = ray.data.DataContext.get_current()
    # bars on a terminal, else progress as INFO log lines (seen with --verbose); never the
    # "Progress bars disabled" warning, which every Ray Data actor would print once
    ctx.enable_progress_bars, ctx.use_ray_tqdm = True, False
    if not getattr(args, "verbose", False):  # the jobs print their own progress lines
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)


@contextmanager
def data_context(ray, settings: dict):
    """Ray Data settings for one job ("execution_options.X" for its execution options), put
    back afterwards: the DataContext is the process's, and later jobs in it (tests, notebooks)
    must not inherit them."""
    ctx = ray.data.DataContext.get_current()
    targets = [(ctx.execution_options, k.split(".", 1)[1]) if k.startswith("execution_options.")
               else (ctx, k) for k in settings]
    saved = [getattr(obj, name) for obj, name in targets]
    try:
        for (obj, name), value in zip(targets, settings.values()):
            setattr(obj, name, value)
        yield ctx
    finally:
        for (obj, name), value in zip(targets, saved):
            setattr(obj, name, value)


def autoscaling() -> bool:
    """True on a `ray up` cluster whose autoscaler can add nodes (a local cluster cannot)."""
    return os.path.exists(os.path.expanduser("~/ray_bootstrap_config.yaml"))


def check_actor_cpus(ray, job: str, actors: int, gpus_per_actor: float) -> None:
    """CPU model actors hold one CPU each for the whole job; the tasks that read and decode
    their input need at least one more, or the job waits forever for a read (a 2-CPU cluster
    with --actors 2 hung). Fail up front instead, unless an autoscaler can add a node."""
    if actors < 1:
        raise SystemExit(f"{job}: --actors must be >= 1 (got {actors})")
    total = ray.cluster_resources().get("CPU", 0)
    if gpus_per_actor == 0 and actors + 1 > total and not autoscaling():
        raise SystemExit(
            f"{job}: --actors {actors} takes {actors} of the cluster's {total:g} CPUs (one per "
            f"model actor) and leaves none to read the input; use --actors "
            f"{max(1, int(total) - 1)} or a cluster with more CPUs")


def check_paths(ray, uris, shared_fs: bool) -> None:
    """On a cluster with nodes besides the driver's, a local path would scatter outputs over
    the nodes' own disks (or read a different file on each): refuse it, unless --shared-fs says
    it is a shared mount, which a probe file seen from every other node then confirms."""
    local = [str(u) for u in uris if u and not storage.is_remote(str(u))]
    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not local or not others:
        return
    if not shared_fs:
        raise SystemExit(f"{', '.join(local)}: local path(s), but this Ray cluster has "
                         f"{len(others)} node(s) besides the driver's, whose workers would read "
                         "and write their own disks. Use s3://... URIs, or --shared-fs if the "
                         "paths are on a mount every node shares (NFS)")
    for uri in local:
        _probe(ray, os.path.abspath(uri), others)


def _probe(ray, path: str, nodes: list[str]) -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = path
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    probe = os.path.join(folder, f"._msdm_shared_probe_{os.getpid()}_{time.time_ns()}")
    with open(probe, "w") as f:
        f.write("probe")

    @ray.remote(num_cpus=0)
    def sees(p):
        return os.path.exists(p)

    try:
        seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n, soft=False)).remote(probe) for n in nodes], timeout=120)
    finally:
        os.remove(probe)
    if not all(seen):
        raise SystemExit(f"--shared-fs: {folder} is not shared: a probe file written there is "
                         f"missing on {seen.count(False)} other node(s). Use s3://... URIs")


def write_json(uri: str, obj) -> None:
    storage.write_bytes(uri, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb(pid: int | str = "self") -> tuple[float, float]:
    """(RSS, RSS without shared memory) of a process now, in MB (0 if it is gone). The shared
    part is Ray's object store, one mapping shared by every process of a node."""
    kb = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(("VmRSS:", "RssShmem:")):
                kb[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return kb.get("VmRSS", 0) / 1024, (kb.get("VmRSS", 0) - kb.get("RssShmem", 0)) / 1024


def private_mb() -> float:
    """Private (anonymous) resident memory now. Unlike RSS it leaves out pages of Ray's shared
    object store, which a worker maps for every block it reads."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()
