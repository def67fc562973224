# The compiled module is _core_py.py built by Cython: its interface is the twin's.
from fastpop.session import _core_py

SessionCore = _core_py.SessionCore
