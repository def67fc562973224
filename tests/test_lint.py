"""The sources stay clean: ``ruff check`` and ``mypy`` pass, with the
configuration in pyproject.toml ([tool.ruff], [tool.mypy]).

Both run as the test command runs them, from the repository root; mypy keeps
its cache in .mypy_cache (ruff in .ruff_cache, each ignored by git), so after
the first run they take well under a second.  Each compiled module has the
.pyi stub mypy reads for it, naming only what its pure-Python twin has.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from fastpop import _compiled

REPO = Path(__file__).resolve().parent.parent

if not (REPO / "fastpop" / "__init__.py").exists():
    # scripts/check-wheel and cibuildwheel run tests/ against an installed wheel, outside the sources
    pytest.skip("the sources are linted in a source tree", allow_module_level=True)

# What ruff checks: the package, its tests, benchmarks, fuzz harnesses and the Python scripts.
RUFF_PATHS = ["fastpop", "tests", "benchmarks", "fuzz", "scripts/check-wheel", "setup.py"]


def _run(module: str, *args: str) -> None:
    assert importlib.util.find_spec(module) is not None, f"{module} is in the test extra: pip install -e '.[test]'"
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=90)
    assert proc.returncode == 0, f"{module} {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"


def test_ruff_finds_nothing():
    _run("ruff", "check", "--no-fix", *RUFF_PATHS)


def test_mypy_finds_nothing():
    _run("mypy")  # files and options from [tool.mypy]


def _stub_names(stub: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(stub.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


@pytest.mark.parametrize("compiled", sorted(_compiled.TWINS))
def test_every_compiled_module_has_a_stub_of_its_twins_interface(compiled):
    """mypy reads ``X.pyi`` for the compiled ``X.pyx``; what it declares is what both twins offer."""
    source = REPO / Path(*compiled.split("."))
    stub = source.with_suffix(".pyi")
    assert source.with_suffix(".pyx").exists(), compiled
    assert stub.exists(), f"{compiled}: no {stub.relative_to(REPO)} (mypy would not know its types)"
    names = _stub_names(stub)
    assert names, f"{stub.relative_to(REPO)} declares nothing"
    twin = importlib.import_module(_compiled.TWINS[compiled])
    assert not [n for n in names if not hasattr(twin, n)], f"{stub.relative_to(REPO)} names what {twin.__name__} lacks"
    if not _compiled.NO_EXTENSIONS:
        module = importlib.import_module(compiled)
        assert not [n for n in names if not hasattr(module, n)], f"{stub.relative_to(REPO)} names what {compiled} lacks"
