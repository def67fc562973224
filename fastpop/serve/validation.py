"""Checking a whole configuration before it is used: fastpop.config's own
checks, then each subsystem's for its section.  Above every subsystem it
names, so that config.py imports none of them."""

from __future__ import annotations

from fastpop.auth import oauth, sasl, userdb_drivers
from fastpop.config import Config
from fastpop.proxy import routing
from fastpop.serve import logformat
from fastpop.session import tls


def validate_all(config: Config) -> None:
    """Raise ValueError naming the first setting that cannot work."""
    userdb_drivers.validate(config)
    config.validate()
    tls.validate(config)
    sasl.validate(config)
    oauth.validate(config)
    logformat.validate(config)
    routing.validate(config)
