"""Declares the compiled extension; everything else is in pyproject.toml.

FASTPOP_NO_EXTENSIONS=1 at build time skips compiling (the pure-Python twin
is used).  FASTPOP_CYTHON_TRACE=1 builds with line tracing and writes an
annotated HTML next to the .pyx, for profiling.
"""

import os

from setuptools import Extension, setup

ext_modules = []
if not os.environ.get("FASTPOP_NO_EXTENSIONS"):
    from Cython.Build import cythonize

    trace = bool(os.environ.get("FASTPOP_CYTHON_TRACE"))
    macros = [("CYTHON_TRACE", "1")] if trace else []
    ext_modules = cythonize(
        [Extension("fastpop._parser", ["fastpop/_parser.pyx"], define_macros=macros)],
        compiler_directives={
            "language_level": "3",
            "freethreading_compatible": True,
            "linetrace": trace,
        },
        annotate=trace,
    )

setup(ext_modules=ext_modules)
