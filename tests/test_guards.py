"""Import-direction and layout guards (style C5, C9)."""

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted(p.stem for p in (ROOT / "pipelines").glob("*.py")
                   if 'if __name__ == "__main__"' in p.read_text())


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_msdm_never_imports_ray_pipelines_or_tests():
    bad = {str(p.relative_to(ROOT)): _imports(p) & {"ray", "pipelines", "tests"}
           for p in (ROOT / "msdm").rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


@pytest.mark.slow(seconds=9)
def test_import_msdm_works_with_ray_blocked():
    code = "import sys; sys.modules['ray'] = None; import msdm, msdm.audio, msdm.data, " \
           "msdm.training, msdm.metrics; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-c", "import msdm, sys; print('ray' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_entrypoints_do_not_import_each_other():
    for name in PIPELINES:
        tree = ast.parse((ROOT / "pipelines" / f"{name}.py").read_text())
        used = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module:
                mod = n.module.removeprefix("pipelines.") if n.level == 0 else n.module
                used |= {mod} | {a.name for a in n.names if mod == "pipelines"}
            elif isinstance(n, ast.Import):
                used |= {a.name.removeprefix("pipelines.") for a in n.names}
        clash = used & (set(PIPELINES) - {name})
        assert not clash, f"pipelines/{name}.py imports entrypoint(s) {clash}"


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_exposes_main_argv(name):
    mod = importlib.import_module(f"pipelines.{name}")
    assert callable(mod.main)
    assert "argv" in mod.main.__code__.co_varnames[: mod.main.__code__.co_argcount]
    assert mod.__doc__ and "python -m pipelines." in mod.__doc__


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_runs_main_through_cli(name):
    """Each entrypoint's __main__ is `cli(main)`, so a user error is one line, not a traceback."""
    tail = (ROOT / "pipelines" / f"{name}.py").read_text().rstrip().splitlines()[-2:]
    assert tail == ['if __name__ == "__main__":', "    cli(main)"]


@pytest.mark.slow(seconds=18)
def test_user_errors_are_one_line_with_exit_status_2(tmp_path):
    missing, junk = tmp_path / "none.ckpt", tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    cases = [("train", ["--data", str(tmp_path), "--storage", str(tmp_path), "--name", "r",
                        "--set", "train.p_mean=-4"], "train: error: unknown key(s) train.p_mean"),
             ("evaluate", ["--ckpt", str(missing), "--data", str(tmp_path),
                           "--output", str(tmp_path / "e")], f"evaluate: error: {missing}"),
             ("convert", ["--input", str(junk), "--output", str(tmp_path / "c.ckpt")],
              f"convert: error: {junk}")]
    for name, args, first in cases:
        out = subprocess.run([sys.executable, "-m", f"pipelines.{name}", *args],
                             capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith(first), out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c.ckpt").exists()
    for extra, env in (["--verb"], {}), ([], {"MSDM_TRACEBACK": "1"}):
        verbose = subprocess.run([sys.executable, "-m", "pipelines.train", *cases[0][1], *extra],
                                 capture_output=True, text=True, cwd=ROOT,
                                 env={**os.environ, **env})
        assert verbose.returncode == 1 and "Traceback" in verbose.stderr
