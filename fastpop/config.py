"""Server configuration: defaults, a TOML file, command-line flags (flags win).

``Config`` holds every setting with its default; ``_TOML_KEYS`` maps each
``[section] key`` of the TOML file to its field, and ``load_toml`` applies a
file (an unknown key is an error).  The reference, every key with its flag,
default and meaning, is docs/configuration.md; tests/test_docs.py checks it
against this module and the flags of fastpop/cli.py.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass, field, fields

from fastpop.net import Networks, parse_address

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


MASTER_SEPARATORS = "*!#$%&^|~+="

# Dovecot's pop3_client_workarounds (fastpop.session.retrieval applies them).
CLIENT_WORKAROUNDS = ("outlook-no-nuls", "oe-ns-eoh")


@dataclass
class Config:
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:110"])
    loop: str = "uvloop"
    log_level: str = "info"
    hostname: str = field(default_factory=socket.gethostname)
    user: str | None = None  # switch to this user after binding (when started as root)
    group: str | None = None
    allow_mail_as_root: bool = False  # root without ``user``: refused unless this is set
    passwd_file: str | None = None
    auth_failure_delay: float = 2.0
    auth_max_attempts: int = 3
    auth_apop: bool = False  # APOP offered (the greeting's timestamp); off by default, as Dovecot
    auth_secret_file: str | None = None  # None: fastpop.auth.authenticator.default_secret_path()
    mail_location: str = "%h/Maildir"
    mail_lock: str = "table"  # "table" (one host) or "symlink" (several hosts on NFS); fastpop.store.locking
    mail_lock_table: str | None = None  # None: fastpop.store.locking.default_table_path()
    mail_uidl: str = "maildir"  # "dovecot": UIDs given in dovecot-uidlist (fastpop.store.dovecot_uidlist)
    mail_index: str | None = None  # a directory of fastpop's own for the indexes (fastpop.store.index); None: Maildirs
    timeout_authorization: float = 60.0
    timeout_transaction: float = 600.0
    expire: str = "NEVER"  # days after which retrieved mail is deleted (fastpop.store.expire)
    expire_per_user: bool = False  # CAPA before login says "EXPIRE n USER": the user database may set others
    deleted_flag: str = ""  # an IMAP keyword POP3 deletion adds instead of deleting (fastpop.store.dovecot_keywords)
    seen_on_retr: bool = False  # RETR'd messages get the Maildir S flag at QUIT (Dovecot POP3's default)
    login_delay: int = 0
    client_workarounds: list[str] = field(default_factory=list)  # of CLIENT_WORKAROUNDS; none by default, as Dovecot
    pop3_last: bool = False  # RFC 1460's obsolete LAST command, for old clients
    max_bad_commands: int = 20
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # processes sharing the listeners
    max_connections: int = 0  # server-wide, over all workers; 0: only what descriptors allow
    shutdown_timeout: float = 30.0  # SIGTERM: seconds logged-in sessions may take to finish
    sendfile: bool = True  # RETR of CRLF-stored messages with sendfile(2)
    lmtp_listen: list[str] = field(default_factory=list)  # HOST:PORT or unix:PATH
    lmtp_max_connections: int = 100  # LMTP connections at once (fastpop.delivery.lmtp: also at most half the budget)
    lmtp_max_recipients: int = 1000  # accepted RCPTs per transaction; more: 452 4.5.3
    lmtp_timeout: float = 300.0  # idle seconds before an LMTP connection is closed
    tls_cert: str | None = None  # certificate chain (PEM); enables STLS
    tls_key: str | None = None  # private key (PEM); None: in the cert file
    tls_min_version: str = "TLSv1.2"
    tls_handshake_timeout: float = 30.0
    tls_sni: dict[str, list[str]] = field(default_factory=dict)  # host name (or *.domain) -> [chain, key?]
    tls_cert_dir: str | None = None  # certificates chosen by SNI, named by their own subjectAltNames
    tls_reload_interval: float = 5.0  # seconds between checks of the certificate files; 0: SIGHUP only
    listen_tls: list[str] = field(default_factory=list)  # implicit-TLS listeners
    trusted_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    auth_mechanisms: list[str] | None = None  # None: PLAIN LOGIN SCRAM-SHA-256 (+ OAuth with a validator)
    auth_penalty_initial: float = 2.0
    auth_penalty_max: float = 15.0
    auth_penalty_half_life: float = 300.0
    auth_penalty_per_user: bool = True
    max_connections_per_ip: int = 50
    max_connections_per_ip_exempt: list[str] = field(default_factory=list)  # CIDRs without the per-address cap
    auth_master_passwd_file: str | None = None  # master users (fastpop.auth.sasl): off unless set
    auth_master_separator: str = "*"  # USER alice*admin: admin logs in as alice
    oauth_validator: str | None = None  # "hmac", "command" or "module:function"
    oauth_secret: str | None = None
    oauth_secret_file: str | None = None
    oauth_command: str | None = None
    # listeners requiring a PROXY header (fastpop.session.proxied)
    proxy_listen: list[str] = field(default_factory=list)
    proxy_listen_tls: list[str] = field(default_factory=list)  # the same, then implicit TLS
    proxy_trusted_networks: list[str] = field(default_factory=list)  # who may send one
    proxy_timeout: float = 5.0  # seconds to wait for the header
    # the user database (fastpop.auth.userdb) and the auth cache
    userdb_driver: str = "passwd-file"
    userdb_connect: str | None = None
    userdb_password_query: str | None = None
    userdb_user_query: str | None = None
    userdb_pool_min: int = 1
    userdb_pool_max: int = 10
    userdb_connect_timeout: float = 5.0
    userdb_query_timeout: float = 5.0
    userdb_retry_interval: float = 1.0
    ldap_uri: list[str] = field(default_factory=list)
    ldap_starttls: bool = False
    ldap_tls_ca_file: str | None = None
    ldap_bind_dn: str | None = None
    ldap_bind_password: str | None = None
    ldap_base: str | None = None
    ldap_filter: str = "(uid=%u)"
    ldap_auth_bind: bool = False
    ldap_bind_dn_template: str | None = None
    ldap_password_attr: str = "userPassword"
    ldap_attrs: list[str] = field(default_factory=lambda: ["home=homeDirectory", "uid=uidNumber", "gid=gidNumber"])
    auth_cache_size: int = 10000
    auth_cache_ttl: float = 300.0
    auth_cache_negative_ttl: float = 60.0
    # operations (fastpop.serve.logformat, fastpop.serve.metrics)
    log_format: str = "text"  # "text", "keyvalue" or "json"
    metrics_listen: str | None = None  # HOST:PORT of the Prometheus endpoint; None: metrics off
    metrics_flush_interval: float = 1.0  # seconds between moves of the counts into the metrics
    # fastpop proxy (fastpop.proxy): each user's session relayed to their backend
    backend_route: bool = False  # set by ``fastpop proxy``: logins go to backends, no Maildir here
    backend_servers: list[str] = field(default_factory=list)  # HOST:PORT, for users without a host field
    backend_port: int = 110  # the port of a host field without a port field
    backend_login: str = "plain"  # "plain" (AUTH PLAIN) or "user" (USER/PASS) at the backend
    backend_proxy_header: bool = True  # a PROXY v2 header naming the client first
    backend_connect_timeout: float = 5.0  # connect, greeting and login at a backend
    backend_health_interval: float = 5.0  # seconds between health checks; 0: none
    backend_rehash: bool = False  # a down backend's users to the next one (shared store only)
    # the proxy's master login at the backends (fastpop.proxy.relay): any mechanism relays with it
    backend_master_user: str | None = None
    backend_master_password_file: str | None = None  # its password, read as the proxy starts (0600)
    # the control socket (fastpop.serve.control): fastpop who, kick, deny, allow, maintenance
    control_socket: str | None = None  # None: control.sock in the lock table's runtime directory; "none": off
    control_group: str | None = None  # this group may use it too (mode 0660)
    control_deny_file: str | None = None  # None: denied-users beside the auth secret

    def validate(self) -> None:
        """This file's own checks (raises ValueError); the subsystems check
        their sections in fastpop.serve.validation.validate_all, which calls this."""
        if self.mail_lock not in ("table", "symlink"):
            raise ValueError(f"mail lock must be 'table' or 'symlink', not {self.mail_lock!r}")
        if self.deleted_flag and not re.fullmatch(r"[!#$&'+\-.0-9:;<=>?@A-Z^_`a-z|~]{1,64}", self.deleted_flag):
            raise ValueError(f"pop3 deleted_flag must be an IMAP keyword (an atom, no \\), not {self.deleted_flag!r}")
        if self.mail_uidl not in ("maildir", "dovecot"):
            raise ValueError(f"mail uidl must be 'maildir' or 'dovecot', not {self.mail_uidl!r}")
        if self.mail_index is not None and not os.path.isabs(self.mail_index):
            raise ValueError(f"mail index must be an absolute path, not {self.mail_index!r}")
        if self.loop not in ("uvloop", "asyncio"):
            raise ValueError(f"loop must be 'uvloop' or 'asyncio', not {self.loop!r}")
        for name in ("timeout_authorization", "timeout_transaction", "auth_failure_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.auth_max_attempts < 1:
            raise ValueError("auth max_attempts must be at least 1")
        expire = self.expire.upper()
        if expire != "NEVER" and not (expire.isascii() and expire.isdigit() and len(expire) <= 6):
            raise ValueError("pop3 expire must be NEVER or a number of days")
        for name in self.client_workarounds:
            if name not in CLIENT_WORKAROUNDS:
                raise ValueError(f"pop3 client_workarounds: unknown workaround {name!r}"
                                 f" (known: {', '.join(CLIENT_WORKAROUNDS)})")
        for addr in self.listen:
            parse_address(addr)
        if not 1 <= self.workers <= 1024:
            raise ValueError("workers must be between 1 and 1024")
        for addr in self.lmtp_listen:
            if not addr.startswith("unix:"):
                parse_address(addr)
            elif len(addr) == len("unix:"):
                raise ValueError("lmtp listen address unix: needs a path")
        if self.lmtp_max_connections < 1 or self.lmtp_max_recipients < 1:
            raise ValueError("lmtp max_connections and max_recipients must be at least 1")
        if not self.lmtp_timeout > 0:
            raise ValueError("lmtp timeout must be positive")
        if self.user is not None:
            import pwd

            try:
                pwd.getpwnam(self.user)
            except KeyError:
                raise ValueError(f"no such system user {self.user!r}") from None
        self._validate_security()
        self._validate_proxy()
        self._validate_operations()
        self._validate_backends()
        if self.group is not None:
            import grp

            try:
                grp.getgrnam(self.group)
            except KeyError:
                raise ValueError(f"no such system group {self.group!r}") from None

    def _validate_security(self) -> None:
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("tls key given without a certificate")
        if self.listen_tls and self.tls_cert is None:
            raise ValueError("implicit-TLS listeners need a certificate (--tls-cert, [tls] cert)")
        if (self.tls_sni or self.tls_cert_dir) and self.tls_cert is None:
            raise ValueError("certificates chosen by SNI need a default one too (--tls-cert, [tls] cert)")
        for name, files in self.tls_sni.items():
            if not 1 <= len(files) <= 2 or not all(files):
                raise ValueError(f"tls sni {name!r}: give the certificate chain, and the key unless it is in that file")
        if not 0 <= self.tls_reload_interval <= 86400:
            raise ValueError("tls reload_interval must be between 0 (SIGHUP only) and 86400 seconds")
        for addr in self.listen_tls:
            parse_address(addr)
        try:
            Networks(self.trusted_networks)
        except ValueError as exc:
            raise ValueError(f"auth trusted_networks: {exc}") from None
        for name in ("tls_handshake_timeout", "auth_penalty_initial", "auth_penalty_max", "auth_penalty_half_life"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_connections_per_ip < 0:
            raise ValueError("max_connections_per_ip must not be negative")
        try:
            Networks(self.max_connections_per_ip_exempt)
        except ValueError as exc:
            raise ValueError(f"auth max_connections_per_ip_exempt: {exc}") from None
        sep = self.auth_master_separator
        # one character a user name may hold (USER takes it), but not one of a domain's or "@"
        if len(sep) != 1 or sep not in MASTER_SEPARATORS:
            raise ValueError(f"auth master_separator must be one of {MASTER_SEPARATORS}, not {sep!r}")
        if self.max_connections < 0:
            raise ValueError("max_connections must not be negative")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must not be negative")

    def _validate_proxy(self) -> None:
        for addr in self.proxy_listen + self.proxy_listen_tls:
            if not parse_address(addr)[1]:
                continue  # port 0: each gets a port of its own
            if addr in self.listen + self.listen_tls or (self.proxy_listen + self.proxy_listen_tls).count(addr) > 1:
                raise ValueError(f"{addr} is given as two listeners (a PROXY listener needs an address of its own)")
        if self.proxy_listen_tls and self.tls_cert is None:
            raise ValueError("implicit-TLS PROXY listeners need a certificate (--tls-cert, [tls] cert)")
        try:
            Networks(self.proxy_trusted_networks)
        except ValueError as exc:
            raise ValueError(f"proxy trusted_networks: {exc}") from None
        if (self.proxy_listen or self.proxy_listen_tls) and not self.proxy_trusted_networks:
            raise ValueError("PROXY listeners need the proxies' addresses:"
                             " [proxy] trusted_networks (--proxy-trusted-networks)")
        if self.proxy_timeout <= 0:
            raise ValueError("proxy timeout must be positive")

    def _validate_operations(self) -> None:
        if self.metrics_listen is not None:
            parse_address(self.metrics_listen)
            import importlib.util

            # found, not imported: it must first see PROMETHEUS_MULTIPROC_DIR (fastpop.serve.metrics)
            if importlib.util.find_spec("prometheus_client") is None:
                raise ValueError("metrics need prometheus-client: pip install 'fastpop[metrics]'")
        if not 0.05 <= self.metrics_flush_interval <= 3600:
            raise ValueError("metrics flush_interval must be between 0.05 and 3600 seconds")
        if self.control_socket not in (None, "none") and not os.path.isabs(self.control_socket):
            raise ValueError(f"control socket must be an absolute path or 'none', not {self.control_socket!r}")
        if self.control_socket is not None and len(os.fsencode(self.control_socket)) > 107:
            raise ValueError("control socket path longer than a Unix socket's 107 bytes")
        if self.control_deny_file is not None and not os.path.isabs(self.control_deny_file):
            raise ValueError(f"control deny_file must be an absolute path, not {self.control_deny_file!r}")
        if self.control_group is not None:
            import grp

            try:
                grp.getgrnam(self.control_group)
            except KeyError:
                raise ValueError(f"no such system group {self.control_group!r} (control group)") from None

    def _validate_backends(self) -> None:
        for addr in self.backend_servers:
            parse_address(addr)
        if len(set(self.backend_servers)) != len(self.backend_servers):
            raise ValueError("backends servers: an address is given twice")
        if not 1 <= self.backend_port <= 65535:
            raise ValueError("backends port must be between 1 and 65535")
        if self.backend_login not in ("plain", "user"):
            raise ValueError(f"backends login must be 'plain' or 'user', not {self.backend_login!r}")
        if not self.backend_connect_timeout > 0:
            raise ValueError("backends connect_timeout must be positive")
        if self.backend_health_interval < 0:
            raise ValueError("backends health_interval must not be negative")
        if self.backend_route and self.lmtp_listen:
            raise ValueError("fastpop proxy stores no mail: [lmtp] listen belongs on the backends")
        if (self.backend_master_user is None) != (self.backend_master_password_file is None):
            raise ValueError("backends master_user and master_password_file go together: give both or neither")
        if self.backend_route and self.backend_master_user is None:
            relayable = {"PLAIN", "LOGIN"}  # the mechanisms that give the proxy the password
            if self.auth_apop or not set(self.mechanisms()) <= relayable:
                raise ValueError("fastpop proxy without [backends] master_user logs in to the backends with the "
                                 "user's password: [auth] mechanisms may only hold PLAIN and LOGIN, and apop "
                                 "must be off")

    def mechanisms(self) -> list[str]:
        """The SASL mechanisms offered, in CAPA order."""
        if self.auth_mechanisms is not None:
            return [m.upper() for m in self.auth_mechanisms]
        names = ["PLAIN", "LOGIN", "SCRAM-SHA-256"]
        if self.oauth_validator:
            names += ["OAUTHBEARER", "XOAUTH2"]
        return names


# TOML (section, key) -> Config field
_TOML_KEYS = {
    ("server", "listen"): "listen",
    ("server", "loop"): "loop",
    ("server", "log_level"): "log_level",
    ("server", "hostname"): "hostname",
    ("server", "user"): "user",
    ("server", "group"): "group",
    ("server", "allow_mail_as_root"): "allow_mail_as_root",
    ("server", "max_bad_commands"): "max_bad_commands",
    ("server", "workers"): "workers",
    ("server", "sendfile"): "sendfile",
    ("server", "max_connections"): "max_connections",
    ("server", "shutdown_timeout"): "shutdown_timeout",
    ("auth", "passwd_file"): "passwd_file",
    ("auth", "failure_delay"): "auth_failure_delay",
    ("auth", "max_attempts"): "auth_max_attempts",
    ("auth", "apop"): "auth_apop",
    ("auth", "secret_file"): "auth_secret_file",
    ("mail", "location"): "mail_location",
    ("mail", "lock"): "mail_lock",
    ("mail", "lock_table"): "mail_lock_table",
    ("mail", "index"): "mail_index",
    ("mail", "uidl"): "mail_uidl",
    ("timeouts", "authorization"): "timeout_authorization",
    ("timeouts", "transaction"): "timeout_transaction",
    ("pop3", "expire"): "expire",
    ("pop3", "expire_per_user"): "expire_per_user",
    ("pop3", "login_delay"): "login_delay",
    ("pop3", "client_workarounds"): "client_workarounds",
    ("pop3", "last"): "pop3_last",
    ("pop3", "seen_on_retr"): "seen_on_retr",
    ("pop3", "deleted_flag"): "deleted_flag",
    ("lmtp", "listen"): "lmtp_listen",
    ("lmtp", "max_connections"): "lmtp_max_connections",
    ("lmtp", "max_recipients"): "lmtp_max_recipients",
    ("lmtp", "timeout"): "lmtp_timeout",
    ("tls", "cert"): "tls_cert",
    ("tls", "key"): "tls_key",
    ("tls", "min_version"): "tls_min_version",
    ("tls", "handshake_timeout"): "tls_handshake_timeout",
    ("tls", "listen"): "listen_tls",
    ("tls", "sni"): "tls_sni",
    ("tls", "cert_dir"): "tls_cert_dir",
    ("tls", "reload_interval"): "tls_reload_interval",
    ("auth", "trusted_networks"): "trusted_networks",
    ("auth", "mechanisms"): "auth_mechanisms",
    ("auth", "penalty_initial"): "auth_penalty_initial",
    ("auth", "penalty_max"): "auth_penalty_max",
    ("auth", "penalty_half_life"): "auth_penalty_half_life",
    ("auth", "penalty_per_user"): "auth_penalty_per_user",
    ("auth", "max_connections_per_ip"): "max_connections_per_ip",
    ("auth", "max_connections_per_ip_exempt"): "max_connections_per_ip_exempt",
    ("auth", "master_passwd_file"): "auth_master_passwd_file",
    ("auth", "master_separator"): "auth_master_separator",
    ("oauth", "validator"): "oauth_validator",
    ("oauth", "secret"): "oauth_secret",
    ("oauth", "secret_file"): "oauth_secret_file",
    ("oauth", "command"): "oauth_command",
    ("proxy", "listen"): "proxy_listen",
    ("proxy", "listen_tls"): "proxy_listen_tls",
    ("proxy", "trusted_networks"): "proxy_trusted_networks",
    ("proxy", "timeout"): "proxy_timeout",
    **{("userdb", k): f"userdb_{k}" for k in (
        "driver", "connect", "password_query", "user_query", "pool_min", "pool_max",
        "connect_timeout", "query_timeout", "retry_interval")},
    **{("ldap", k): f"ldap_{k}" for k in (
        "uri", "starttls", "tls_ca_file", "bind_dn", "bind_password", "base", "filter", "auth_bind",
        "bind_dn_template", "password_attr", "attrs")},
    ("auth_cache", "size"): "auth_cache_size",
    ("auth_cache", "ttl"): "auth_cache_ttl",
    ("auth_cache", "negative_ttl"): "auth_cache_negative_ttl",
    ("server", "log_format"): "log_format",
    ("metrics", "listen"): "metrics_listen",
    ("metrics", "flush_interval"): "metrics_flush_interval",
    **{("backends", k): f"backend_{k}" for k in (
        "route", "servers", "port", "login", "proxy_header", "connect_timeout", "health_interval", "rehash",
        "master_user", "master_password_file")},
    ("control", "socket"): "control_socket",
    ("control", "group"): "control_group",
    ("control", "deny_file"): "control_deny_file",
}


def load_toml(path: str, config: Config | None = None) -> Config:
    """Apply a TOML file to ``config`` (defaults if None); unknown keys are errors."""
    config = config or Config()
    with open(path, "rb") as f:
        data = tomllib.load(f)
    types = {f.name: str(f.type) for f in fields(Config)}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: '{section}' must be a [section]")
        for key, value in table.items():
            name = _TOML_KEYS.get((section, key))
            if name is None:
                raise ValueError(f"{path}: unknown setting [{section}] {key}")
            setattr(config, name, _typed(value, types[name], f"{path}: [{section}] {key}"))
    return config


def _typed(value: object, type_name: str, where: str) -> object:
    """Check a TOML value against a Config field's annotation (a string here)."""
    if type_name.startswith("bool"):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false")
        return value
    if type_name.startswith("dict"):  # [tls] sni: a table of name = "chain" or ["chain", "key"]
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a table")
        table = {}
        for key, item in value.items():
            if isinstance(item, dict):  # mail.example.com = ... is a table of tables in TOML
                raise ValueError(f"{where}: quote each host name (\"mail.example.com\" = ...), else TOML"
                                 f" reads its dots as tables ({key!r})")
            table[key] = _typed(item, "list[str]", f"{where}.{key}")
        return table
    if type_name.startswith("list"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where} must be a string or a list of strings")
        return value
    if type_name.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number")
        return float(value)
    if type_name.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be a whole number")
        return value
    if type_name.startswith("str"):
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string")
        return value
    raise ValueError(f"{where}: unsupported setting type {type_name}")  # pragma: no cover
