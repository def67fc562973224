"""Declares the compiled extensions; everything else is in pyproject.toml.

Every ``fastpop/**/*.pyx`` is compiled into the module of the same dotted
name (``fastpop/wire/_parser.pyx`` -> ``fastpop.wire._parser``), so a new Cython module
needs no change here; each has a pure-Python twin that is used when the
compiled one is absent.  Cython runs when the extensions are built
(setuptools hands .pyx sources to Cython's build_ext), not when the sdist is
made: the sdist carries the .pyx files and no generated C.

FASTPOP_NO_EXTENSIONS=1 at build time skips compiling (the pure-Python twins
are used).  FASTPOP_CYTHON_TRACE=1 builds with line tracing and writes an
annotated HTML next to each .pyx, for profiling.
"""

import os
from pathlib import Path

from setuptools import Extension, setup

ext_modules = []
if not os.environ.get("FASTPOP_NO_EXTENSIONS"):
    trace = bool(os.environ.get("FASTPOP_CYTHON_TRACE"))
    directives = {"language_level": "3", "freethreading_compatible": True, "linetrace": trace}
    # Paths relative to this file's directory, as Cython and setuptools want.
    for pyx in sorted(Path("fastpop").rglob("*.pyx")):
        ext = Extension(
            ".".join(pyx.with_suffix("").parts),
            [pyx.as_posix()],
            define_macros=[("CYTHON_TRACE", "1")] if trace else [],
        )
        ext.cython_directives = directives
        ext_modules.append(ext)
    if trace:
        from Cython.Build import cythonize

        ext_modules = cythonize(ext_modules, compiler_directives=directives, annotate=True)

setup(ext_modules=ext_modules)
