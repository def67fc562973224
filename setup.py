"""Declares the compiled extensions; everything else is in pyproject.toml.

Every ``fastpop/**/*.pyx`` is compiled into the module of the same dotted
name (``fastpop/wire/_parser.pyx`` -> ``fastpop.wire._parser``), so a new Cython module
needs no change here; each has a pure-Python twin that is used when the
compiled one is absent.  A module written once, in Cython's pure Python mode,
is its own twin: its .pyx only names the .py to compile (``# fastpop:
compiled from _core_py.py``: fastpop/session/_core.pyx), and the .pxd of the
compiled module's name gives the types.  Cython runs when the extensions are
built (setuptools hands the sources to Cython's build_ext), not when the
sdist is made: the sdist carries the .pyx, .pxd and .py files and no
generated C.

FASTPOP_NO_EXTENSIONS=1 at build time skips compiling (the pure-Python twins
are used).  FASTPOP_CYTHON_TRACE=1 builds with line tracing and writes an
annotated HTML next to each compiled source, for profiling.
"""

import os
from pathlib import Path

from setuptools import Extension, setup

# A .pyx whose first line is this holds no code: its module is compiled from the
# pure-mode .py named there (and typed by the .pxd of the module's name).
COMPILED_FROM = "# fastpop: compiled from "


def compiled_sources(root: Path) -> dict[str, str]:
    """Compiled module name -> the source Cython compiles for it."""
    sources = {}
    for pyx in sorted(root.rglob("*.pyx")):
        source = pyx
        first = pyx.read_text().partition("\n")[0]
        if first.startswith(COMPILED_FROM):
            source = pyx.with_name(first[len(COMPILED_FROM):].strip())
            pxd = pyx.with_suffix(".pxd")
            # Cython's change tracking looks for a .pxd named after the .py, not
            # this one: a generated C older than it is stale.
            generated = source.with_suffix(".c")
            if generated.exists() and generated.stat().st_mtime < pxd.stat().st_mtime:
                generated.unlink()
        sources[".".join(pyx.with_suffix("").parts)] = source.as_posix()
    return sources


ext_modules = []
if not os.environ.get("FASTPOP_NO_EXTENSIONS"):
    trace = bool(os.environ.get("FASTPOP_CYTHON_TRACE"))
    directives = {"language_level": "3", "freethreading_compatible": True, "linetrace": trace}
    # Paths relative to this file's directory, as Cython and setuptools want.
    for name, source in compiled_sources(Path("fastpop")).items():
        ext = Extension(name, [source], define_macros=[("CYTHON_TRACE", "1")] if trace else [])
        # A pure-mode module's types are its .pxd's: its annotations are for the type checker.
        ext.cython_directives = dict(directives, annotation_typing=False) if source.endswith(".py") else directives
        ext_modules.append(ext)
    if trace:
        from Cython.Build import cythonize

        ext_modules = [compiled for ext in ext_modules
                       for compiled in cythonize([ext], compiler_directives=ext.cython_directives, annotate=True)]

setup(ext_modules=ext_modules)
