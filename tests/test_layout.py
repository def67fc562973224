"""The package's layering: no import cycle among fastpop's modules (imports
inside functions and under TYPE_CHECKING count too), and every module
imports alone in a fresh interpreter."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import fastpop

# The package under test: the source tree, or an installed wheel (scripts/check-wheel
# runs tests/ outside the sources).
PACKAGE = Path(fastpop.__file__).resolve().parent
SOURCES = Path(__file__).resolve().parent.parent / "fastpop"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the fastpop modules it imports, wherever the import statement is."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:  # "from fastpop import x" imports the module fastpop.x
                    found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    found = cycles(import_graph())
    detail = "\n".join(
        f"{component}: " + "; ".join(f"{m} -> {sorted(import_graph()[m] & set(component))}" for m in component)
        for component in found
    )
    assert not found, f"import cycles in fastpop:\n{detail}"


# The layers, bottom up (docs/architecture.md): a module imports only from its
# own layer and those below.  A layer is a subpackage; the leaves are the
# top-level modules every layer may use.
LEAVES = {"fastpop", "fastpop._version", "fastpop._compiled", "fastpop.config", "fastpop.net", "fastpop.errors",
          "fastpop.limits",
          "fastpop.faults", "fastpop.logline"}
LAYERS = ["leaves", "wire", "store", "auth", "session", "proxy", "delivery", "serve", "entry points"]
ENTRY_POINTS = {"fastpop.cli", "fastpop.demo", "fastpop.__main__"}


def layer_of(module: str) -> int:
    if module in LEAVES:
        return 0
    if module in ENTRY_POINTS or module.startswith("fastpop.bench"):
        return len(LAYERS) - 1
    package = module.split(".")[1]
    if package in LAYERS:
        return LAYERS.index(package)
    raise AssertionError(f"{module} is in no layer: put it in a layer's package (or tests/test_layout.py LEAVES)")


def test_imports_go_down_the_layers():
    graph = import_graph()
    upward = [
        f"{m} ({LAYERS[layer_of(m)]}) imports {d} ({LAYERS[layer_of(d)]})"
        for m, deps in sorted(graph.items()) for d in sorted(deps)
        if layer_of(d) > layer_of(m)
    ]
    assert not upward, "\n".join(upward)


def _import_alone(module: str) -> tuple[str, int, str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env,
                          timeout=60)
    return module, proc.returncode, proc.stderr[-2000:]


@pytest.mark.parametrize("extensions", ["compiled", "python"])
def test_every_module_imports_alone(extensions, monkeypatch):
    if extensions == "python":
        monkeypatch.setenv("FASTPOP_NO_EXTENSIONS", "1")
    else:
        monkeypatch.delenv("FASTPOP_NO_EXTENSIONS", raising=False)
    names = [m for m in _modules() if not m.endswith("__main__")]
    with ThreadPoolExecutor(8) as pool:
        failed = [(m, err) for m, code, err in pool.map(_import_alone, names) if code != 0]
    assert not failed, "\n\n".join(f"{m}:\n{err}" for m, err in failed)


# ----------------------------------------------------------------- compiled modules and their twins


def test_every_compiled_module_is_listed_with_a_twin_that_exists():
    from fastpop import _compiled

    if not (SOURCES / "__init__.py").exists():
        pytest.skip("the .pyx sources are checked in a source tree")
    pyx = {".".join(p.relative_to(SOURCES.parent).with_suffix("").parts) for p in SOURCES.rglob("*.pyx")}
    assert pyx == set(_compiled.TWINS), "fastpop._compiled.TWINS must list every .pyx (setup.py compiles them all)"
    modules = _modules()
    missing = [twin for twin in _compiled.TWINS.values() if twin not in modules]
    assert not missing, f"pure-Python twins missing: {missing}"


def test_compiled_modules_are_built(monkeypatch):
    """Unless FASTPOP_NO_EXTENSIONS is set, every compiled module imports:
    a build that silently fell back to the twins would test only them."""
    from fastpop import _compiled

    if _compiled.NO_EXTENSIONS:
        pytest.skip("FASTPOP_NO_EXTENSIONS: the pure-Python twins only")
    unbuilt = []
    for compiled in _compiled.TWINS:
        try:
            importlib.import_module(compiled)
        except ImportError as exc:
            unbuilt.append(f"{compiled}: {exc}")
    assert not unbuilt, ("not built (pip install -e . builds them; FASTPOP_NO_EXTENSIONS=1 tests without):\n"
                         + "\n".join(unbuilt))


def test_version_names_every_choice():
    env = dict(os.environ)
    env.pop("FASTPOP_NO_EXTENSIONS", None)
    out = subprocess.run([sys.executable, "-m", "fastpop", "--version"], capture_output=True, text=True, env=env,
                         timeout=60).stdout
    from fastpop import _compiled

    for compiled in _compiled.TWINS:
        assert f"{_compiled.short_name(compiled)}: cython" in out, out
    env["FASTPOP_NO_EXTENSIONS"] = "1"
    out = subprocess.run([sys.executable, "-m", "fastpop", "--version"], capture_output=True, text=True, env=env,
                         timeout=60).stdout
    assert "parser: python" in out and "cython" not in out, out
