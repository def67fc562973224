"""The session's extension points: every method a subclass of POP3Protocol
overrides exists in the base with the same signature, and the tables and
hooks the base declares are the ones the subclasses use."""

from __future__ import annotations

import inspect

import pytest

from fastpop.proxy.relay import routed
from fastpop.session.metered import MeteredProtocol, metered
from fastpop.session.protocol import POP3Protocol
from fastpop.session.proxied import ProxiedPOP3Protocol

pytestmark = pytest.mark.unit

SUBCLASSES = [MeteredProtocol, ProxiedPOP3Protocol, metered(ProxiedPOP3Protocol),
              routed(POP3Protocol), routed(ProxiedPOP3Protocol), metered(routed(ProxiedPOP3Protocol))]


def _overrides(cls: type) -> dict[str, object]:
    """What ``cls`` defines itself or inherits from classes between it and POP3Protocol."""
    own: dict[str, object] = {}
    for klass in reversed(cls.__mro__[: cls.__mro__.index(POP3Protocol)]):
        own.update({k: v for k, v in vars(klass).items() if not k.startswith("__")})
    return own


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
def test_every_override_exists_in_the_base_with_its_signature(cls):
    mismatched = []
    for name, value in _overrides(cls).items():
        if not callable(value) or isinstance(value, (staticmethod, classmethod)):
            continue
        base = getattr(POP3Protocol, name, None)
        if base is None:
            continue  # new behaviour of the subclass, not an override
        mine, theirs = inspect.signature(value), inspect.signature(base)
        if theirs.return_annotation is inspect.Signature.empty:  # a compiled cpdef method does not say it
            mine = mine.replace(return_annotation=inspect.Signature.empty)
        if mine != theirs:
            mismatched.append(f"{name}{mine} != base {theirs}")
    assert not mismatched, mismatched


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
def test_private_overrides_are_declared_hooks(cls):
    """A subclass may override only what the base declares as an extension
    point (POP3Protocol's docstring), not any private method."""
    hooks = {"_on_logged_in", "_on_login_refused", "_count_sent", "_unbusy", "start_session", "_auth_finished",
             "connection_made", "connection_lost", "data_received", "shutdown", "pause_writing", "resume_writing"}
    overridden = {name for name, value in _overrides(cls).items()
                  if callable(value) and hasattr(POP3Protocol, name)}
    assert overridden <= hooks, sorted(overridden - hooks)
    for name in hooks:
        assert f"``{name}" in POP3Protocol.__doc__ or name in ("data_received", "shutdown", "pause_writing",
                                                                "resume_writing"), name


def test_metered_tables_wrap_every_base_entry():
    for table in ("_authorization_table", "_transaction_table"):
        base, counted = getattr(POP3Protocol, table), getattr(MeteredProtocol, table)
        assert len(base) == len(counted) and all(a is not b for a, b in zip(base, counted, strict=True))
