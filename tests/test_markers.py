"""The ``unit`` mark means what it says: a unit test cannot start a process,
fork, bind or connect (tests/conftest.py refuses them), so ``pytest -m unit``
never depends on the machine's network or on other programs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_a_unit_test_cannot_start_a_process():
    with pytest.raises(AssertionError, match="unit test may not start a process"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)


def test_a_unit_test_cannot_fork():
    with pytest.raises(AssertionError, match="unit test may not fork"):
        os.fork()


def test_a_unit_test_cannot_open_a_connection_or_listen():
    with socket.socket() as s, pytest.raises(AssertionError, match="unit test may not bind"):
        s.bind(("127.0.0.1", 0))
    with pytest.raises(AssertionError, match="unit test may not open a connection"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)


def test_every_test_is_unit_or_e2e(request):
    marks = {m.name for m in request.node.iter_markers()}
    assert "unit" in marks and "e2e" not in marks
