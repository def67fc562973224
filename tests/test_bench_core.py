"""`fastpop bench` from the core install: `pip install fastpop` and it runs,
the presentation extras (rich, matplotlib) only make it prettier."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import fastpop

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(fastpop.__file__).parent / "bench"
OPTIONAL = {"rich", "matplotlib"}  # fastpop[bench], fastpop[plot]: imported only when there
# the distribution each third-party module of fastpop.bench comes from
DISTRIBUTION = {"hdrh": "hdrhistogram", "uvloop": "uvloop"}


def _core_dependencies() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {d.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps}


def _third_party_imports() -> set[str]:
    names = set()
    for path in BENCH_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "fastpop"}


def test_every_module_bench_needs_is_a_core_dependency():
    core = _core_dependencies()
    needed = _third_party_imports() - OPTIONAL
    assert "hdrh" in needed  # the histograms: not optional
    missing = {m for m in needed if DISTRIBUTION.get(m, m) not in core}
    assert not missing, f"fastpop.bench imports {missing}, which the core install does not bring"
    assert not OPTIONAL & core  # presentation stays an extra


def _without_extras(tmp_path: Path) -> dict:
    """An environment in which rich and matplotlib cannot be imported, as after
    a plain `pip install fastpop` (inherited by the spawned server and clients)."""
    shadow = tmp_path / "shadow"
    for name in OPTIONAL:
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name}: not in the core install')\n")
    path = [str(shadow), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def test_bench_runs_without_the_presentation_extras(tmp_path):
    env = _without_extras(tmp_path)
    check = subprocess.run([sys.executable, "-c", "import rich"], env=env, capture_output=True, text=True)
    assert "not in the core install" in check.stderr  # the shadow works
    bench = [sys.executable, "-m", "fastpop", "bench"]
    helped = subprocess.run([*bench, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert "--scenario" in helped.stdout
    out = tmp_path / "run.json"
    run = subprocess.run([*bench, "--mailboxes", "8", "--messages", "3", "-p", "1", "-c", "2", "-w", "0.2",
                          "-d", "1", "--json", str(out)], env=env, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "latency (ms)" in run.stdout and "no errors" in run.stdout  # the plain-text summary
    assert "[green]" not in run.stdout  # markup removed, not printed
    result = json.loads(out.read_text())
    assert result["totals"]["sessions"] > 0 and result["errors"]["total"] == 0
    compared = subprocess.run([*bench, "compare", str(out), str(out)], env=env, capture_output=True, text=True,
                              timeout=60)
    assert compared.returncode == 0, compared.stderr
    assert "sessions/s" in compared.stdout and "1.00x" in compared.stdout
    plotted = subprocess.run([*bench, "-n", "4", "-c", "1", "-p", "1", "--mailboxes", "2", "--messages", "1",
                              "-w", "0", "-q", "--plot", str(tmp_path / "p.png")],
                             env=env, capture_output=True, text=True, timeout=90)
    assert "--plot needs matplotlib" in plotted.stdout + plotted.stderr  # the one extra that is needed, named
    assert "Traceback" not in plotted.stdout + plotted.stderr
