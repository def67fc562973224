"""Everything the server may need once it runs as ``[server] user``, imported
and read before it drops privileges.

Python imports a module the first time a line needs it, and reads it from the
installation then.  Where that installation (a virtual environment in root's
home, an interpreter installed there) or a secret file is not readable by the
user the server becomes, a lazy import or read fails at that first use: a
user's first SCRAM login, the first bcrypt hash, the first query to the user
database.  ``preload`` does them all at start, as root, so that such a
setup fails (or works) at once.  What a configuration cannot need (a user
database driver it does not name) is left alone; optional libraries that are
not installed are skipped (what needs them fails as it would anyway).

A module added later that some path imports lazily belongs here;
tests/test_privileges.py runs a server from an installation its user cannot
read and exercises every mechanism, driver and listener.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastpop.config import Config

log = logging.getLogger("fastpop")

# Whatever the configuration: a reload (SIGHUP) may offer TLS, OAuth or other
# mechanisms, and any password line may use any scheme.
ALWAYS = (
    # SASL: SCRAM-SHA-256 and SASLprep of non-ASCII passwords (scramp)
    "fastpop.auth.sasl", "scramp", "scramp.utils", "stringprep",
    # password schemes (fastpop.auth.passwords): argon2, bcrypt, passlib's crypt(3) ones
    "fastpop.auth.passwords", "argon2", "bcrypt", "passlib.context", "passlib.handlers.sha2_crypt",
    "passlib.handlers.md5_crypt", "passlib.handlers.des_crypt", "passlib.crypto.des",
    # STLS and implicit TLS; OAUTHBEARER and XOAUTH2 (fastpop.session.login)
    "ssl", "fastpop.session.tls", "fastpop.auth.oauth",
    # codecs are looked up by name when first used: host names in TLS (idna)
    "encodings.idna", "encodings.punycode",
    # run_in_executor's default pool (SCRAM keys from a clear-text password, validators)
    "concurrent.futures.thread",
)

# [userdb] driver: its code and its client library, with the modules that
# library itself imports on first use (connecting, TLS, errors).
DRIVERS = {
    "sqlite": ("fastpop.auth.userdb_sql", "sqlite3"),
    "postgresql": ("fastpop.auth.userdb_sql", "asyncpg"),
    "mysql": ("fastpop.auth.userdb_sql", "aiomysql"),
    "ldap": ("fastpop.auth.userdb_ldap", "ldap3", "ldap3.core.exceptions"),
}


def modules_for(config: Config) -> list[str]:
    """The modules ``preload`` imports for ``config``."""
    names = list(ALWAYS)
    names += DRIVERS.get(config.userdb_driver, ())
    if config.lmtp_listen:
        names += ["fastpop.delivery.lmtp", "fastpop.delivery.local"]
    if config.proxy_listen or config.proxy_listen_tls:
        names.append("fastpop.session.proxied")
    if config.metrics_listen:  # (PROMETHEUS_MULTIPROC_DIR is set by now: fastpop.serve.metrics)
        names += ["fastpop.session.metered", "fastpop.serve.metrics", "prometheus_client",
                  "prometheus_client.multiprocess"]
    return names


def preload(config: Config) -> list[str]:
    """Import what ``config`` may need and read what it may read later; the
    names of the modules that are not installed."""
    missing = []
    for name in modules_for(config):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        log.debug("not installed (what needs them will fail): %s", ", ".join(missing))
    _read_secrets(config)
    return missing


def _read_secrets(config: Config) -> None:
    """The hmac validator's secret, read once and kept (fastpop.auth.oauth)."""
    from fastpop.auth import oauth

    if config.oauth_validator and oauth.ALIASES.get(config.oauth_validator, config.oauth_validator) == \
            oauth.ALIASES["hmac"]:
        oauth.hmac_validator(oauth.TokenRequest("", None, "OAUTHBEARER", "", config))  # (the empty token fails)
