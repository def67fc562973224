"""Fixtures: ``server`` is one real fastpop per test module and parser
implementation (the compiled parser and its pure-Python twin); each test makes
its own users with ``server.add_user`` so tests do not share mailboxes.
``twin``/``twin_pair`` run a test on a compiled module and its Python twin.
The helpers themselves live in tests/support/.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess

import pytest
from support.server import NO_EXTENSIONS, PARSERS, ServerProcess, serving

from fastpop import _compiled


@pytest.fixture(params=["compiled", "python"])
def twin(request):
    """``twin("fastpop.wire._parser")``: the compiled module, then (second
    run of the test) its pure-Python twin, for any pair in fastpop._compiled.
    A compiled module that is not built fails the test, unless
    FASTPOP_NO_EXTENSIONS is set: then the compiled run is skipped."""

    def get(compiled: str):
        if request.param == "python":
            return importlib.import_module(_compiled.TWINS[compiled])
        if NO_EXTENSIONS:
            pytest.skip("FASTPOP_NO_EXTENSIONS: the pure-Python twins only")
        return importlib.import_module(compiled)

    return get


@pytest.fixture(scope="module")
def twin_pair():
    """``twin_pair("fastpop.wire._parser")``: the compiled module and its twin,
    for tests that compare the two on the same input.  As ``twin``: a compiled
    module that is not built fails the test; FASTPOP_NO_EXTENSIONS skips it."""

    def get(compiled: str):
        if NO_EXTENSIONS:
            pytest.skip("FASTPOP_NO_EXTENSIONS: the pure-Python twins only")
        return importlib.import_module(compiled), importlib.import_module(_compiled.TWINS[compiled])

    return get


@pytest.fixture(scope="module", params=list(PARSERS), ids=list(PARSERS))
def server(request, tmp_path_factory):
    yield from serving(ServerProcess(tmp_path_factory.mktemp("fastpop"), PARSERS[request.param]))


@pytest.fixture(params=list(PARSERS), ids=list(PARSERS))
def fresh_server(request, tmp_path):
    """A server of the test's own, for tests that restart or kill it."""
    srv = ServerProcess(tmp_path, PARSERS[request.param])
    yield srv
    if srv.proc is not None:
        srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


# Unit and end-to-end tests told apart: a module marks itself ``unit``
# (in-process, no other process, no network), every other test is ``e2e``, so
# ``pytest -m unit`` runs the fast ones alone.  The mark is enforced: a unit
# test that starts a process or opens a connection fails.
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("unit") is None:
            item.add_marker(pytest.mark.e2e)


def _isolated(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a unit test may not {what}: mark it e2e instead")

    return refuse


@pytest.fixture(autouse=True)
def _unit_isolation(request, monkeypatch):
    if request.node.get_closest_marker("unit") is not None:
        monkeypatch.setattr(subprocess.Popen, "__init__", _isolated("start a process"))
        monkeypatch.setattr(os, "fork", _isolated("fork"))
        monkeypatch.setattr(socket.socket, "connect", _isolated("open a connection"))
        monkeypatch.setattr(socket.socket, "bind", _isolated("bind a socket"))
    yield
