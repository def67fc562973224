"""TLS: the server's SSL contexts, their reload, and upgrading a live connection.

One ``TLSManager`` per server (per worker) holds a ``Certificate`` for the
default certificate (``[tls] cert``/``key``) and one for each certificate
chosen by SNI: the ``[tls] sni`` map (names given) and the ``[tls] cert_dir``
directory (names read from each certificate's subjectAltName DNS entries,
its common name without them).  Each keeps its own ``ssl.SSLContext``,
built with the same settings (TLS 1.2 at least).  Every handshake starts on
``listener_context``, whose SNI callback (called on every handshake, with or
without SNI) swaps in the context of the name the client asked for, or the
default one: no SNI, an unknown name.

Reloads.  SIGHUP calls ``reload()``: every certificate is read again.  Every
``reload_interval`` seconds ``check()`` compares each certificate's files
(what the path resolves to: device, inode, size, mtime, ctime; certbot swaps
symlinks into its archive) with what they were when last read, and reloads
the ones that changed; the directory is listed again too.  A certificate
that loads replaces the old context, and a log line says so; connections
made from then on use it, sessions already encrypted keep theirs, and
nothing is dropped.  One that fails to load (bad PEM, a key that does not
match, a half-written file, a file the server's user cannot read) is logged
as an error and the old context stays in service; it is tried again when its
files change again, or on SIGHUP.  The cost is bounded: a few stat(2) calls
per certificate per interval, in each process, never per connection.

STLS (RFC 2595) goes through ``upgrade()``: ``loop.start_tls`` on the
session's plain transport with ``listener_context``, bounded by the
handshake timeout; the session's part (suspending its command pull,
discarding what the client sent before the handshake) is in
``POP3Protocol.cmd_stls``.  The implicit-TLS listener (RFC 8314, port 995)
is the loop's own TLS server with ``listener_context`` too.  (Not start_tls
from connection_made: the loop starts reading only after connection_made
returns, so a fast ClientHello could reach the session instead of TLS.)
"""

from __future__ import annotations

import asyncio
import base64
import errno
import logging
import os
import re
import ssl
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fastpop.config import Config


class Session(Protocol):
    """What an upgrade needs from the session it secures (fastpop.session.protocol.POP3Protocol)."""

    loop: asyncio.AbstractEventLoop

    def tls_established(self, transport: asyncio.Transport) -> None: ...
    def tls_failed(self, exc: BaseException) -> None: ...

log = logging.getLogger("fastpop.tls")

MIN_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
# [tls] cert_dir: a subdirectory holding these two (certbot's live/DOMAIN/), or NAME.pem with key and chain
DIR_CHAIN, DIR_KEY = "fullchain.pem", "privkey.pem"
LOAD_ERRORS = (OSError, ValueError, ssl.SSLError)


def validate(config: Config) -> None:
    """The [tls] section's checks for fastpop.serve.validation (raises ValueError)."""
    if config.tls_min_version not in MIN_VERSIONS:
        raise ValueError(f"tls min_version must be one of {', '.join(MIN_VERSIONS)}")
    if config.tls_cert is not None:
        try:
            build_context(config.tls_cert, config.tls_key, config.tls_min_version)
        except LOAD_ERRORS as exc:
            raise ValueError(f"tls: cannot use certificate {config.tls_cert} / key {config.tls_key}: {exc}") from None
    for name, files in config.tls_sni.items():
        normal_name(name)
        try:
            build_context(files[0], files[1] if len(files) > 1 else None, config.tls_min_version)
        except LOAD_ERRORS as exc:
            raise ValueError(f"tls sni {name}: cannot use certificate {' / key '.join(files)}: {exc}") from None
    if config.tls_cert_dir is not None and not os.path.isdir(config.tls_cert_dir):
        raise ValueError(f"tls cert_dir {config.tls_cert_dir} is not a directory")


def normal_name(name: str) -> str:
    """A host name as SNI callbacks see it: lower case, IDNA A-labels, no final dot
    (``*.`` kept for a wildcard); ValueError if it is not one."""
    wild = name.startswith("*.")
    try:
        text = (name[2:] if wild else name).rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise ValueError(f"not a host name: {name!r} ({exc})") from None
    if not text or not re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", text) or ".." in text:
        raise ValueError(f"not a host name: {name!r}")
    return f"*.{text}" if wild else text


def build_context(cert: str, key: str | None, min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A server context for ``cert`` (a chain, leaf first) and ``key``; raises on any problem."""
    try:
        minimum = MIN_VERSIONS[min_version]
    except KeyError:
        raise ValueError(f"tls min_version must be one of {', '.join(MIN_VERSIONS)}, not {min_version!r}") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if hasattr(ssl, "OP_NO_RENEGOTIATION"):
        ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert, key)
    return ctx


# ----------------------------------------------------------------- names in a certificate

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.DOTALL)
_SAN_OID = bytes.fromhex("551d11")  # 2.5.29.17 subjectAltName
_CN_OID = bytes.fromhex("550403")  # 2.5.4.3 commonName


def _element(der: bytes, pos: int) -> tuple[int, int, int]:
    """The DER element at ``pos``: (tag, start of its value, end of its value)."""
    if pos + 2 > len(der):
        raise ValueError("truncated certificate")
    tag, length, pos = der[pos], der[pos + 1], pos + 2
    if length & 0x80:
        n = length & 0x7F
        if not 1 <= n <= 4 or pos + n > len(der):
            raise ValueError("bad length in certificate")
        length, pos = int.from_bytes(der[pos:pos + n], "big"), pos + n
    if pos + length > len(der):
        raise ValueError("truncated certificate")
    return tag, pos, pos + length


def _children(der: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    while start < end:
        element = _element(der, start)
        yield element
        start = element[2]


def certificate_names(der: bytes) -> list[str]:
    """The DNS names a certificate (DER) is for: its subjectAltName dNSNames,
    else its subject's common names (RFC 6125 6.4.4)."""
    _, start, end = _element(der, 0)  # Certificate
    _, start, end = _element(der, start)  # TBSCertificate
    fields = list(_children(der, start, end))
    if fields and fields[0][0] == 0xA0:  # [0] version
        fields = fields[1:]
    if len(fields) < 6:
        raise ValueError("not a certificate")
    dns: list[str] = []
    for tag, start, end in fields[6:]:
        if tag != 0xA3:  # [3] extensions
            continue
        _, start, end = _element(der, start)
        for _, ext_start, ext_end in _children(der, start, end):
            parts = list(_children(der, ext_start, ext_end))  # OID, critical?, OCTET STRING
            if len(parts) < 2 or der[parts[0][1]:parts[0][2]] != _SAN_OID:
                continue
            _, start, end = _element(der, parts[-1][1])  # GeneralNames
            dns += [der[s:e].decode("ascii") for tag, s, e in _children(der, start, end) if tag == 0x82]
    if dns:
        return dns
    common = []
    _, start, end = fields[4]  # subject
    for _, set_start, set_end in _children(der, start, end):
        for _, start, end in _children(der, set_start, set_end):
            (_, o1, o2), (_, v1, v2) = list(_children(der, start, end))[:2]
            if der[o1:o2] == _CN_OID:
                common.append(der[v1:v2].decode("utf-8", "replace"))
    return common


def names_in_file(path: str) -> list[str]:
    """``certificate_names`` of the first certificate in a PEM file (the leaf);
    ValueError if there is none or it cannot be read."""
    with open(path, "rb") as f:
        found = _PEM_CERT.search(f.read())
    if found is None:
        raise ValueError(f"no certificate in {path}")
    try:
        return certificate_names(base64.b64decode(found.group(1)))
    except (ValueError, IndexError) as exc:  # (binascii.Error and UnicodeDecodeError are ValueErrors)
        raise ValueError(f"{path}: malformed certificate ({exc})") from None


def host_names(names: list[str]) -> list[str]:
    """The names of ``names`` that are host names (a common name may be anything), normalized."""
    out = []
    for name in names:
        try:
            out.append(normal_name(name))
        except ValueError:
            log.debug("TLS: %r in a certificate is no host name: not served by SNI", name)
    return out


# ----------------------------------------------------------------- certificates and their files


SETTLING = 2.0  # seconds: a failed load of files this recent is retried quietly (a renewal under way)


def _stamp(path: str) -> tuple:
    """What ``path`` resolves to now; a different value means different contents
    (or an error that may have gone)."""
    try:
        st = os.stat(path)  # follows links: certbot's live/ -> archive/ swap changes the inode
    except OSError as exc:
        return ("error", exc.errno)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Certificate:
    """One certificate chain and key: its files, its context (None until one loads),
    the names it serves, and what its files were when last read."""

    def __init__(self, cert: str, key: str | None, names: list[str] | None = None) -> None:
        self.cert, self.key = cert, key
        self.fixed_names = names  # [tls] sni: the map's names; None: the certificate's own
        self.names: list[str] = list(names or [])
        self.context: ssl.SSLContext | None = None
        self.stamp: tuple | None = None
        self.generation = 0

    def files(self) -> list[str]:
        return [self.cert] if self.key is None else [self.cert, self.key]

    def stamps(self) -> tuple:
        return tuple(_stamp(path) for path in self.files())

    def describe(self) -> str:
        return self.cert if self.key is None else f"{self.cert} (key {self.key})"

    def settling(self) -> bool:
        """Whether a file (or a link to it) changed in the last SETTLING seconds:
        certbot swaps the chain's link, then the key's; a copy takes a moment."""
        now = time.time()
        for path in self.files():
            for follow in (True, False):
                try:
                    if now - os.stat(path, follow_symlinks=follow).st_ctime < SETTLING:
                        return True
                except OSError:
                    continue
        return False

    def load(self, min_version: str, patient: bool = False) -> bool:
        """Read the files again; keep the old context (and log why) if they do not
        load.  ``patient``: files that changed a moment ago and do not load yet are
        tried again at the next check before that is called an error."""
        self.stamp = self.stamps()
        try:
            context = build_context(self.cert, self.key, min_version)
            names = self.fixed_names if self.fixed_names is not None else host_names(names_in_file(self.cert))
        except LOAD_ERRORS as exc:
            if patient and self.settling():
                log.debug("TLS certificate %s does not load yet (its files are changing): %s", self.describe(), exc)
                self.stamp = None  # tried again at the next check
                return False
            if self.context is None:
                log.error("TLS certificate %s not loaded (its names get the default certificate): %s%s",
                          self.describe(), exc, _unreadable_hint(exc))
            else:
                log.error("TLS reload failed, still serving the previous certificate of %s: %s%s",
                          self.describe(), exc, _unreadable_hint(exc))
            return False
        if not names and self.fixed_names is None:
            log.warning("TLS certificate %s holds no host name (subjectAltName DNS, common name): no client gets it",
                        self.describe())
        self.context, self.names = context, list(names)
        self.generation += 1
        return True


def _unreadable_hint(exc: BaseException) -> str:
    if isinstance(exc, PermissionError) or getattr(exc, "errno", None) == errno.EACCES:
        return (f" (fastpop runs as uid {os.geteuid()} now: a renewed certificate and key must be readable by"
                " that user, else only a restart loads them; docs/authentication.md#certificates-and-renewals)")
    return ""


def scan_directory(directory: str) -> list[tuple[str, str | None]]:
    """The certificates of ``[tls] cert_dir``, as (chain, key) file pairs: each
    subdirectory with fullchain.pem and privkey.pem (certbot's live/DOMAIN/),
    each NAME.pem file (key and chain in one file)."""
    found: list[tuple[str, str | None]] = []
    with os.scandir(directory) as listing:  # (OSError: the caller keeps what it had)
        entries = sorted(listing, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = os.path.join(directory, entry.name)
        try:
            if entry.is_dir():
                chain, key = os.path.join(path, DIR_CHAIN), os.path.join(path, DIR_KEY)
                if os.path.exists(chain) or os.path.exists(key):
                    found.append((chain, key))
            elif entry.name.endswith(".pem") and entry.is_file():
                found.append((path, None))
        except OSError:
            continue
    return found


# ----------------------------------------------------------------- the manager


class TLSManager:
    def __init__(self, config: Config) -> None:
        assert config.tls_cert is not None
        self.default = Certificate(config.tls_cert, config.tls_key)
        self.sni: dict[tuple[str, str | None], Certificate] = {}  # by files
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}  # "*.example.com" as "example.com"
        self._timer: asyncio.TimerHandle | None = None
        self._dir_error: str | None = None
        self.configure(config)
        self.default.stamp = self.default.stamps()
        self.default.context = build_context(self.default.cert, self.default.key, self.min_version)
        self.default.generation = 1
        self._refresh(initial=True)
        # Every handshake starts here; the SNI callback swaps in the context to serve.
        self.listener_context = self.default.context
        self.listener_context.sni_callback = self._choose

    def configure(self, config: Config) -> None:
        """Take a (re-read) configuration's [tls] settings; the files are read by reload()."""
        assert config.tls_cert is not None
        if (config.tls_cert, config.tls_key) != (self.default.cert, self.default.key):
            self.default.cert, self.default.key = config.tls_cert, config.tls_key
        self.min_version = config.tls_min_version
        listener = getattr(self, "listener_context", None)
        if listener is not None:
            # A connection's version range is its first context's (a swap by SNI keeps it): set it here
            listener.minimum_version = MIN_VERSIONS[config.tls_min_version]
        self.handshake_timeout = config.tls_handshake_timeout
        self.interval = config.tls_reload_interval
        self.cert_dir = config.tls_cert_dir
        self.mapped = {normal_name(name): (files[0], files[1] if len(files) > 1 else None)
                       for name, files in config.tls_sni.items()}

    @property
    def context(self) -> ssl.SSLContext:
        """The default certificate's context (no SNI, an unknown name)."""
        assert self.default.context is not None
        return self.default.context

    @property
    def generation(self) -> int:
        return self.default.generation

    def _choose(self, sslobj: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        chosen = None
        if server_name:
            name = server_name.lower().rstrip(".")
            chosen = self.exact.get(name)
            if chosen is None:
                chosen = self.wildcard.get(name.partition(".")[2])
        if chosen is None:
            chosen = self.context
        if chosen is not context:
            sslobj.context = chosen

    def _refresh(self, initial: bool = False, force: bool = False, why: str = "") -> None:
        """Find the SNI certificates (the map, the directory), load what is new,
        changed (or everything: ``force``), and rebuild the name tables."""
        wanted: dict[tuple[str, str | None], list[str] | None] = {}
        for name, files in self.mapped.items():
            names = wanted.setdefault(files, [])
            assert names is not None
            names.append(name)
        if self.cert_dir is not None:
            try:
                listed = scan_directory(self.cert_dir)
                self._dir_error = None
            except OSError as exc:
                # keep serving what the directory held; say so once, not at every check
                if str(exc) != self._dir_error:
                    log.error("TLS cert_dir %s not read, keeping its certificates as they are: %s%s",
                              self.cert_dir, exc, _unreadable_hint(exc))
                    self._dir_error = str(exc)
                listed = [files for files, cert in self.sni.items() if cert.fixed_names is None]
            for files in listed:
                wanted.setdefault(files, None)
        for files in list(self.sni):
            if files not in wanted or self.sni[files].fixed_names != wanted[files]:
                del self.sni[files]  # gone from the directory or the map (or its names changed)
        for files, names in wanted.items():
            cert = self.sni.get(files)
            if cert is None:
                cert = self.sni[files] = Certificate(files[0], files[1], names)
                if cert.load(self.min_version, patient=not initial and not force) and not initial:
                    log.info("TLS certificate for %s loaded from %s (%s)", ", ".join(cert.names), cert.describe(),
                             why or "new")
            elif force or cert.stamps() != cert.stamp:
                if cert.load(self.min_version, patient=not force):
                    log.info("TLS certificate for %s reloaded from %s (generation %d) on %s",
                             ", ".join(cert.names), cert.describe(), cert.generation, why)
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        # the map first, then the directory in name order: the first certificate to claim a name keeps it
        for cert in sorted(self.sni.values(), key=lambda c: c.fixed_names is None):
            if cert.context is None:
                continue
            for name in cert.names:
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], cert.context)
                else:
                    exact.setdefault(name, cert.context)
        self.exact, self.wildcard = exact, wildcard
        if initial and self.sni:
            log.info("TLS: %d certificates chosen by SNI (%d names, %d wildcards), default %s",
                     sum(c.context is not None for c in self.sni.values()), len(exact), len(wildcard),
                     self.default.cert)

    def reload(self) -> bool:
        """SIGHUP: re-read every certificate and key; keep the old context of
        each one that does not load.  Whether the default one loaded."""
        ok = self._reload_default(force=True, why="SIGHUP")
        self._refresh(force=True, why="SIGHUP")
        return ok

    def _reload_default(self, force: bool, why: str) -> bool:
        if not force and self.default.stamps() == self.default.stamp:
            return True
        if not self.default.load(self.min_version, patient=not force):
            return False
        log.info("TLS certificate reloaded from %s (generation %d) on %s", self.default.describe(),
                 self.default.generation, why)
        return True

    def check(self) -> None:
        """Reload the certificates whose files changed (renewals), pick up the
        directory's new ones."""
        self._reload_default(force=False, why="a change of its files")
        self._refresh(why="a change of its files")

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Every ``reload_interval`` seconds (0: never), ``check()``."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.interval > 0:
            self._timer = loop.call_later(self.interval, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        try:
            self.check()
        finally:
            self.watch(loop)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def warn_unreadable(self) -> None:
        """After the switch of user: say which files a renewal could not be read from."""
        if os.geteuid() == 0:
            return
        certs = [self.default, *self.sni.values()]
        paths = [p for c in certs for p in c.files()]
        if self.cert_dir is not None:
            paths.append(self.cert_dir)
        blocked = [p for p in dict.fromkeys(paths) if not os.access(p, os.R_OK)]
        if blocked:
            log.warning("TLS: %s not readable by uid %d: the certificates loaded at start are served, but a "
                        "renewal (or SIGHUP) cannot load them until a restart; make them readable by that user "
                        "(docs/authentication.md#certificates-and-renewals)", ", ".join(blocked), os.geteuid())

    async def upgrade(self, session: Session, transport: asyncio.Transport) -> None:
        """Run the server side of a handshake on ``transport``, then hand the
        session its TLS transport (or the reason it failed)."""
        loop = session.loop
        started = loop.time()
        try:
            tls_transport = await loop.start_tls(
                # the session is an asyncio.Protocol (POP3Protocol); Session names only what is used here
                transport, session, self.listener_context, server_side=True,  # type: ignore[arg-type]
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except (OSError, ssl.SSLError, asyncio.TimeoutError, EOFError, RuntimeError, ValueError) as exc:
            transport.abort()
            session.tls_failed(exc)
            return
        if tls_transport is None or tls_transport.is_closing():
            # The connection went away during the handshake, or the loop
            # gave up on it: the timeout ends up here too, without an error.
            transport.abort()
            reason: OSError
            if loop.time() - started >= self.handshake_timeout * 0.99:
                reason = TimeoutError(f"no TLS handshake within {self.handshake_timeout:g} seconds")
            else:
                reason = ConnectionResetError("connection lost during the TLS handshake")
            session.tls_failed(reason)
            return
        session.tls_established(tls_transport)


# A TLS transport's high-water marks, for what it has to send and what it
# has read (the low ones are a quarter): those of a plain transport.
TLS_HIGH_WATER = 64 * 1024


def bound_tls_buffers(transport) -> None:
    """A TLS transport pauses the session at the high-water mark of a plain
    one (64 KiB), not at its own default (512 KiB of records, held for a
    client that does not read, on top of the socket transport's buffer), and
    stops reading the socket past 64 KiB of records the session has not
    taken (not 256 KiB)."""
    if transport.get_extra_info("sslcontext") is None:
        return  # TLS ended at a proxy: a plain socket
    transport.set_write_buffer_limits(high=TLS_HIGH_WATER)
    set_read_limits = getattr(transport, "set_read_buffer_limits", None)  # (not Python 3.10's asyncio)
    if set_read_limits is not None:
        set_read_limits(high=TLS_HIGH_WATER)
