"""The `msdm` command: `msdm <job> ...` runs `python -m pipelines.<job> ...` with the same flags
and outputs (console script of the installed package; `python -m pipelines` too)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys

# in the order of the story: data, training, sweeps, separation, tools
JOBS = ("synth", "render", "prepare", "train", "distill", "evaluate", "tune", "separate",
        "generate", "convert", "demo")


def summary(job: str) -> str:
    """The first paragraph of a job's docstring, read without importing the job (torch, Ray)."""
    spec = importlib.util.find_spec(f"pipelines.{job}")
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())  # the first paragraph, one line
    return first.split(". ")[0].rstrip(".")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("msdm")
    except PackageNotFoundError:  # a checkout that was never installed
        from msdm import __version__

        return __version__


def usage() -> str:
    width = max(map(len, JOBS))
    lines = ["usage: msdm <job> [options]   (msdm <job> --help for a job's options)", "",
             "Multi-Source Diffusion Models for music: one score model of the joint distribution "
             "of aligned stems;", "generation, imputation and source separation, run at scale "
             "with Ray.", "", "jobs:"]
    lines += [f"  {job:<{width}}  {summary(job)}" for job in JOBS]
    lines += ["", "options:", "  -h, --help     this list", "  --version      the installed "
              "version", "", "quick start:  msdm separate song.mp3 --ckpt model.ckpt   "
              "(stems under separated/)"]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    if argv[0] == "--version":
        print(f"msdm {version()}")
        return
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        print(f"msdm: unknown job {job!r}; the jobs are {', '.join(JOBS)} (msdm --help)",
              file=sys.stderr)
        raise SystemExit(2)
    from .common import cli

    module = importlib.import_module(f"pipelines.{job}")
    sys.argv = [f"msdm {job}", *rest]  # usage lines and error prefixes say `msdm <job>`
    cli(module.main)
