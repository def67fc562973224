"""The one place that chooses, for each module with a compiled twin, the
compiled extension or its pure-Python twin (as multidict and yarl do), and
records which one was loaded.

The compiled module is used unless it is not built or ``FASTPOP_NO_EXTENSIONS``
is set (then every twin is pure Python).  setup.py compiles every
``fastpop/**/*.pyx`` (a module written once, in Cython's pure Python mode, has
a .pyx that only names its source: the twin itself); each must be listed in
``TWINS`` with its twin, which the tests run against the same cases
(tests/conftest.py's ``twin`` fixture).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

NO_EXTENSIONS = bool(os.environ.get("FASTPOP_NO_EXTENSIONS"))

# compiled module -> its pure-Python twin
TWINS = {
    "fastpop.wire._parser": "fastpop.wire._parser_py",
    "fastpop.wire._stuffing": "fastpop.wire._stuffing_py",
    "fastpop.store._index": "fastpop.store._index_py",
    "fastpop.store._safefs": "fastpop.store._safefs_py",
    "fastpop.bench._wire": "fastpop.bench._wire_py",
    "fastpop.bench._trivial": "fastpop.bench._trivial_py",
    "fastpop.session._core": "fastpop.session._core_py",  # one source: _core_py.py, typed by _core.pxd
}

LOADED: dict[str, str] = {}  # compiled module -> "cython" or "python", as loaded so far


def load(compiled: str) -> ModuleType:
    """The compiled module ``compiled`` if it can be used, else its twin."""
    if not NO_EXTENSIONS:
        try:
            module = importlib.import_module(compiled)
        except ImportError:
            pass
        else:
            LOADED[compiled] = "cython"
            return module
    LOADED[compiled] = "python"
    return importlib.import_module(TWINS[compiled])


def short_name(compiled: str) -> str:
    """``fastpop.wire._parser`` -> ``parser``; ``fastpop.bench._wire`` -> ``bench.wire``."""
    package, _, name = compiled.rpartition(".")
    name = name.lstrip("_")
    return f"bench.{name}" if package == "fastpop.bench" else name


def implementations() -> dict[str, str]:
    """Which of each twin pair this process uses (each loaded if not yet), by short name."""
    for compiled in TWINS:
        if compiled not in LOADED:
            load(compiled)
    return {short_name(c): LOADED[c] for c in TWINS}
