# fastpop: compiled from _core_py.py
#
# fastpop.session._core is written once, in Cython's pure Python mode: setup.py
# compiles _core_py.py, typed by _core.pxd, into this module, and the same file
# is its pure-Python twin, so the two cannot drift apart.  This file holds no
# code: it names the compiled module among the .pyx sources, where
# fastpop._compiled, the tests and scripts/check-wheel look for them.
