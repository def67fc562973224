"""The atheris harnesses of ``fuzz/``, run for a bounded time.

``fuzz/fuzz_parser.py`` (the compiled command parser against its Python
twin) and ``fuzz/fuzz_stuffing.py`` (the compiled dot-stuffing transform
against its twin, plus the invariants of the transform) run for
``FASTPOP_FUZZ_SECONDS`` (default 20) seconds each, side by side, through
``fuzz/run.py``; every seed and every saved regression input is replayed
first.  Longer runs: ``python fuzz/run.py --seconds 3600``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris: the fastpop[test] extra)")

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
HARNESSES = ("parser", "stuffing")
SECONDS = int(os.environ.get("FASTPOP_FUZZ_SECONDS", "20"))


def _env() -> dict:
    env = dict(os.environ)
    env.pop("FASTPOP_NO_EXTENSIONS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("name", HARNESSES)
def test_replay_seeds_and_regressions(name, tmp_path):
    """Every seed and every input that once failed still passes."""
    importlib.import_module(f"fastpop.wire._{name}")  # the harness needs the compiled module: built, or a failure
    files = sorted(p for d in ("seeds", "regressions") for p in (FUZZ / d / name).glob("*") if p.is_file())
    assert files, "no seeds"
    r = subprocess.run([sys.executable, str(FUZZ / f"fuzz_{name}.py"), *map(str, files)],
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Executed {files[-1]}" in r.stderr, r.stderr


@pytest.mark.timeout(SECONDS + 150)
def test_fuzz_for_a_while(tmp_path):
    """Both harnesses, coverage-guided, for SECONDS each; no failure."""
    for name in HARNESSES:
        importlib.import_module(f"fastpop.wire._{name}")  # the harness needs the compiled module: built, or a failure
    r = subprocess.run([sys.executable, str(FUZZ / "run.py"), "--seconds", str(SECONDS),
                        "--artifacts", str(tmp_path / "crashes")],
                       capture_output=True, text=True, env=_env(), timeout=SECONDS + 120)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in HARNESSES:
        line = next(x for x in r.stdout.splitlines() if x.startswith(f"fuzz {name}:"))
        assert int(line.split()[2]) > 1000, line  # it really ran
