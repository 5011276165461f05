"""Shared pipeline plumbing: the parent CLI parser, config resolution, Ray start-up, logging."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from msdm.config import Config, load_config, load_sampler_yaml

from . import storage

_T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - _T0:7.1f}s] {msg}", flush=True)


def parser(doc: str, default_config: str = "paper") -> argparse.ArgumentParser:
    """Parent parser: --config, --set, --address, --seed, --smoke-test, --dry-run, --num-cpus."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("config and cluster")
    g.add_argument("--config", default=None,
                   help=f"preset name (paper, tiny) or YAML file (default: {default_config}; "
                        "tiny with --smoke-test)")
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
    p.set_defaults(_default_config=default_config)
    return p


def resolve_config(args, sampler_file: str | None = None) -> Config:
    """Preset or file (tiny under --smoke-test), then a sampler file, then --set overrides."""
    source = args.config or ("tiny" if args.smoke_test else args._default_config)
    cfg = load_config(source)
    if sampler_file:
        cfg = load_config(cfg.to_dict(), load_sampler_yaml(fetch_local(sampler_file)))
    return load_config(cfg.to_dict(), args.overrides) if args.overrides else cfg


def fetch_local(uri: str) -> str:
    """A local path for `uri` (remote files are copied to a temp file)."""
    if not storage.is_remote(uri):
        return uri
    import tempfile

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


def init_ray(args, runtime_env: dict | None = None):
    """Connect to --address / RAY_ADDRESS, or start a private local cluster.

    Does nothing if Ray is already initialised (a test fixture's cluster is reused).
    """
    import ray

    if ray.is_initialized():
        return ray
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    renv = dict(runtime_env or {})
    if env_vars:
        renv.setdefault("env_vars", {}).update(env_vars)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=renv or None, log_to_driver=True)
    else:
        num_cpus = args.num_cpus or (2 if args.smoke_test else None)
        # the dashboard hosts the State API that Ray Train's controller polls
        ray.init(address="local", num_cpus=num_cpus, runtime_env=renv or None)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    return ray


def write_json(uri: str, obj) -> None:
    storage.write_bytes(uri, (json.dumps(obj, indent=2, default=str) + "\n").encode())
