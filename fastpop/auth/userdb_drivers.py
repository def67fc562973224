"""Choosing the user database a configuration names, and checking its
settings: above the drivers (fastpop.auth.userdb for the passwd-file and the
base class, fastpop.auth.userdb_sql, fastpop.auth.userdb_ldap), which import their
client libraries lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastpop.auth.userdb import DRIVERS, PasswdFileDB, UserDB, expand_vars

if TYPE_CHECKING:
    from fastpop.config import Config


def open_userdb(config: Config) -> UserDB:
    """The driver the configuration names (drivers import their client libraries lazily)."""
    driver = config.userdb_driver
    if driver == "passwd-file":
        assert config.passwd_file is not None
        return PasswdFileDB(config.passwd_file)
    if driver in ("postgresql", "mysql", "sqlite"):
        from fastpop.auth.userdb_sql import open_sql

        return open_sql(config)
    if driver == "ldap":
        from fastpop.auth.userdb_ldap import LDAPUserDB

        return LDAPUserDB(config)
    raise ValueError(f"unknown userdb driver {driver!r} (known: {', '.join(DRIVERS)})")


_EXTRAS = {"postgresql": ("asyncpg", "postgres"), "mysql": ("aiomysql", "mysql"), "ldap": ("ldap3", "ldap")}


def validate(config: Config) -> None:
    """Configuration checks for ``Config.validate`` (raises ValueError)."""
    driver = config.userdb_driver
    if driver not in DRIVERS:
        raise ValueError(f"userdb driver must be one of {', '.join(DRIVERS)}, not {driver!r}")
    if driver == "passwd-file":
        if config.passwd_file is None:
            raise ValueError("no passwd_file configured (use --passwd-file, the config file, or --demo)")
    elif driver in ("postgresql", "mysql", "sqlite"):
        if not config.userdb_connect:
            raise ValueError(f"userdb driver {driver} needs [userdb] connect")
        if not config.userdb_password_query:
            raise ValueError(f"userdb driver {driver} needs [userdb] password_query")
        for query in (config.userdb_password_query, config.userdb_user_query):
            if query:
                expand_vars(query, "u@d", None)  # unknown variables are errors now, not at login
    elif driver == "ldap":
        if not config.ldap_uri:
            raise ValueError("userdb driver ldap needs [ldap] uri")
        if not config.ldap_base and not config.ldap_bind_dn_template:
            raise ValueError("userdb driver ldap needs [ldap] base")
        from fastpop.auth.userdb_ldap import escape_filter

        expand_vars(config.ldap_filter, "u@d", None, escape_filter)
        for item in config.ldap_attrs:
            if "=" not in item:
                raise ValueError(f"ldap attrs entries are FIELD=ATTRIBUTE, not {item!r}")
    if driver in _EXTRAS:
        module, extra = _EXTRAS[driver]
        try:
            __import__(module)
        except ImportError:
            raise ValueError(f"userdb driver {driver} needs {module}: pip install 'fastpop[{extra}]'") from None
    for name in ("userdb_connect_timeout", "userdb_query_timeout", "userdb_retry_interval",
                 "auth_cache_ttl", "auth_cache_negative_ttl"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must not be negative")
    if config.userdb_pool_max < 1 or config.userdb_pool_min < 0 or config.userdb_pool_min > config.userdb_pool_max:
        raise ValueError("userdb pool sizes: 0 <= pool_min <= pool_max, pool_max >= 1")
    if config.auth_cache_size < 0:
        raise ValueError("auth_cache size must not be negative")
