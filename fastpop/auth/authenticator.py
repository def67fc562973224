"""Authentication: user name checks, credential lookup, password verification.

Credentials come from the user database (``fastpop.auth.userdb``: the passwd-file,
SQL or LDAP), network databases through the auth cache (``fastpop.auth.cache``).

Slow hashes are verified in the loop's thread pool so they never stall other
sessions; fast ones inline.  Results come back through a callback, on the
event loop, in both cases.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from fastpop.auth import passwords
from fastpop.auth.cache import MISSING, AuthCache
from fastpop.auth.passwd_file import UserRecord
from fastpop.auth.userdb import PasswdFileDB, UserDB, allowed
from fastpop.auth.userdb_drivers import open_userdb
from fastpop.errors import AuthUnavailable

if TYPE_CHECKING:
    from fastpop.config import Config

log = logging.getLogger("fastpop.auth")

MAX_USERNAME = 255
# local part and optional domain; no "/", "\\", whitespace or control characters,
# no leading dot and no "..": a name can never climb out of a mail root.
_USERNAME = re.compile(r"[A-Za-z0-9_+=~!#$%&'*^`{|}-][A-Za-z0-9._+=~!#$%&'*^`{|}-]*(@[A-Za-z0-9][A-Za-z0-9.-]*)?")

AuthCallback = Callable[["UserRecord | None"], None]


def valid_username(name: str) -> bool:
    if len(name) > MAX_USERNAME or ".." in name:
        return False
    if name.isascii():
        return _USERNAME.fullmatch(name) is not None
    # UTF-8 names (RFC 6856): beyond ASCII only letters, marks and digits,
    # never punctuation or symbols (no look-alike of "/" or "."), and at most
    # MAX_USERNAME octets.
    if len(name.encode("utf-8", "surrogatepass")) > MAX_USERNAME:
        return False
    mapped = "".join(c if c.isascii() else ("a" if unicodedata.category(c)[0] in "LMN" else "/") for c in name)
    return _USERNAME.fullmatch(mapped) is not None


def password_candidates(password: str) -> list[str]:
    """The password as sent, then SASLprep'd (RFC 4013) if that differs.  A
    password SASLprep maps to nothing (a soft hyphen, a zero-width space) is
    not tried as the empty one: an empty password never logs in."""
    if password.isascii() and password.isprintable():
        return [password]
    try:
        from scramp.utils import saslprep

        prepped = saslprep(password)
    except Exception:  # prohibited characters: only the raw form can match
        return [password]
    return [password] if prepped == password or not prepped else [password, prepped]


def _verify_any(stored: str, candidates: list[str]) -> bool:
    for candidate in candidates:  # (a loop, not any() over a generator: once per login)
        if passwords.verify(stored, candidate):
            return True
    return False


_VARIABLES = frozenset("undh%")


@functools.lru_cache(maxsize=256)
def _compile_location(template: str) -> tuple[tuple[bool, str], ...]:
    """A template as (is_variable, text) parts, parsed once (a login expands
    it every time); unknown variables are refused here."""
    if template.startswith("maildir:"):  # accept Dovecot's mail_location syntax
        template = template[len("maildir:") :].split(":", 1)[0]
    parts: list[tuple[bool, str]] = []
    literal: list[str] = []
    i = 0
    while i < len(template):
        c = template[i]
        if c == "%" and i + 1 < len(template):
            key = template[i + 1]
            if key not in _VARIABLES:
                raise ValueError(f"unknown variable %{key} in mail location")
            if literal:
                parts.append((False, "".join(literal)))
                literal = []
            parts.append((True, key))
            i += 2
            continue
        if c == "~" and i == 0:
            parts.append((True, "~"))
        else:
            literal.append(c)
        i += 1
    if literal:
        parts.append((False, "".join(literal)))
    return tuple(parts)


def expand_location(template: str, user: UserRecord) -> str:
    """Mail location from a template: %u user, %n local part, %d domain, %h home."""
    return _expand_location(template, user.name, user.home)


@functools.lru_cache(maxsize=4096)  # every login expands the same few templates for the same users
def _expand_location(template: str, name: str, home: str | None) -> str:
    local, _, domain = name.partition("@")
    out: list[str] = []
    for variable, text in _compile_location(template):
        if not variable:
            out.append(text)
        elif text == "u":
            out.append(name)
        elif text == "n":
            out.append(local)
        elif text == "d":
            out.append(domain)
        elif text == "h":
            if not home:
                raise ValueError(f"user {name} has no home for %h")
            out.append(home)
        elif text == "%":
            out.append("%")
        elif home:  # a leading "~"
            out.append(home)
        else:
            out.append("~")
    return os.path.normpath("".join(out))


# ----------------------------------------------------------------- the persistent secret

SECRET_MIN_BYTES = 32


class SecretRefused(PermissionError):
    """The secret file exists but is not safe to use (refused, never replaced)."""


def default_secret_path() -> str:
    """Where the secret is kept without ``[auth] secret_file``: systemd's
    StateDirectory=, else /var/lib/fastpop for root, else the user's XDG state
    directory (~/.local/state/fastpop)."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if os.path.isabs(state):
        return os.path.join(state, "auth.key")
    if os.geteuid() == 0:
        return "/var/lib/fastpop/auth.key"
    base = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "fastpop", "auth.key")


def read_secret_file(path: str, create: bool = True, make_dirs: bool = False) -> bytes:
    """The secret in ``path`` (surrounding whitespace removed), made first if
    missing and ``create``: 32 random bytes, in hex.  Refused (SecretRefused)
    as ``read_private_file`` refuses, or when it holds fewer than 32 bytes."""
    try:
        data = read_private_file(path, "secret file")
    except FileNotFoundError:
        if not create:
            raise
        if make_dirs:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        _create_secret_file(path)
        return read_secret_file(path, create=False)
    if len(data) < SECRET_MIN_BYTES:
        raise SecretRefused(f"secret file {path} holds {len(data)} bytes, fewer than {SECRET_MIN_BYTES}")
    return data


def read_private_file(path: str, what: str, owners: tuple[int, ...] = (), limit: int = 4096) -> bytes:
    """At most ``limit`` bytes of a secret file, surrounding whitespace
    removed: the server secret, the proxy's master password
    ([backends] master_password_file).  Refused (SecretRefused, its message
    naming the file as ``what``) unless a regular file, not a symbolic link,
    of root, this uid or one of ``owners`` (the uid the server will serve
    as), that nobody else may read or write."""
    try:
        # O_NONBLOCK: a FIFO put there must not hang the start
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SecretRefused(f"{what} {path} is a symbolic link; give the file itself") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretRefused(f"{what} {path} is not a regular file")
        if st.st_uid not in (0, os.geteuid(), *owners):
            uids = " or ".join(f"uid {uid}" for uid in dict.fromkeys((os.geteuid(), *owners)))
            raise SecretRefused(f"{what} {path} must belong to {uids} or root, not uid {st.st_uid}")
        if st.st_mode & 0o077:
            raise SecretRefused(f"{what} {path} is mode {stat.S_IMODE(st.st_mode):04o}: "
                                f"others may read it (chmod 600 {path})")
        return os.read(fd, limit).strip()
    finally:
        os.close(fd)


def read_checked_secret(path: str, what: str, owners: tuple[int, ...] = (), limit: int = 4096,
                        known: bytes | None = None) -> bytes:
    """read_private_file() with each refusal a ValueError naming the file.
    ``known``: what was read from it before; a file this process may no
    longer read (a SIGHUP after privileges dropped, the file root's) gives
    that back, with a warning, rather than failing the reload."""
    try:
        return read_private_file(path, what, owners, limit)
    except SecretRefused as exc:
        raise ValueError(str(exc)) from None
    except PermissionError as exc:
        if known is None:
            raise ValueError(f"{what} {path}: {exc.strerror or exc}") from None
        log.warning("%s %s not re-read (%s): keeping what was read at start", what, path, exc.strerror or exc)
        return known
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror or exc}") from None


def serving_uids(user: str | None) -> tuple[int, ...]:
    """The uid of ``[server] user`` (the owner a secret file may have besides
    root and this uid), or none."""
    if not user:
        return ()
    import pwd

    try:
        return (pwd.getpwnam(user).pw_uid,)
    except KeyError:
        return ()  # (fastpop.config refuses an unknown [server] user)


def _create_secret_file(path: str) -> None:
    """Write a new secret beside ``path`` (O_EXCL, O_NOFOLLOW, 0600), then link it
    into place: never replaces a file, and nobody ever reads a half-written
    one (two servers starting at once: the first link wins, both read it)."""
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            data = (secrets.token_hex(SECRET_MIN_BYTES) + "\n").encode("ascii")
            if os.write(fd, data) != len(data):
                raise OSError(errno.EIO, f"short write to {tmp}")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return
    finally:
        os.unlink(tmp)
    log.info("made a new secret for made-up SCRAM salts: %s", path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_SECRETS: dict[str, bytes] = {}  # path -> secret, once per process (and its forks)


def server_secret(config: Config) -> bytes:
    """The server's persistent secret (``[auth] secret_file``), read or made
    once per process: the supervisor reads it before forking its workers, a
    SIGHUP keeps it.  Keys the made-up SCRAM salts of unknown users and the
    salts of keys derived from {PLAIN} passwords, which must not change
    between workers or restarts.  An unusable configured file stops the start
    (OSError); the default location, when it cannot be made, gives way to a
    secret of this run only, with a warning."""
    path = config.auth_secret_file or default_secret_path()
    secret = _SECRETS.get(path)
    if secret is not None:
        return secret
    try:
        secret = read_secret_file(path, make_dirs=config.auth_secret_file is None)
    except SecretRefused:
        raise
    except OSError as exc:
        if config.auth_secret_file is not None:
            raise OSError(exc.errno, f"[auth] secret_file {path}: {exc.strerror or exc}") from None
        log.warning(
            "cannot keep a secret in %s (%s): using one for this run only; the SCRAM salts made up "
            "for unknown users will change at each restart, which tells them from real users: set "
            "[auth] secret_file (--auth-secret-file) to a file fastpop may create", path, exc.strerror or exc)
        secret = os.urandom(SECRET_MIN_BYTES)
    _SECRETS[path] = secret
    return secret


class _DerivedKeys:
    """SCRAM keys derived from {PLAIN} passwords, remembered (least recently
    used out first) under a keyed hash of name and password: a derivation
    costs a PBKDF2, which a client could otherwise ask for again and again.
    Filled from the thread pool, read from the event loop: a lock."""

    def __init__(self, size: int = 10000) -> None:
        self.size = size
        self._keys: OrderedDict[bytes, tuple[bytes, bytes, bytes, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> tuple[bytes, bytes, bytes, int] | None:
        with self._lock:
            keys = self._keys.get(key)
            if keys is not None:
                self._keys.move_to_end(key)
            return keys

    def put(self, key: bytes, keys: tuple[bytes, bytes, bytes, int]) -> None:
        with self._lock:
            self._keys[key] = keys
            self._keys.move_to_end(key)
            while len(self._keys) > self.size:
                self._keys.popitem(last=False)


class Authenticator:
    """Looks users up in the user database (``fastpop.auth.userdb``) and verifies
    passwords.

    The passwd-file is synchronous: ``lookup`` and ``verify_password`` answer
    at once, with no future or task on the way (the login path of the
    default stays as cheap as it was).  Network databases are asynchronous
    (``is_async``): ``lookup_async``, ``verify_password_async`` and
    ``verify_apop_async`` go through the auth cache and raise
    AuthUnavailable when the database cannot answer in time.
    """

    def __init__(self, passwd_path: str | None, mail_location: str, db: UserDB | None = None,
                 cache: AuthCache | None = None) -> None:
        if db is None:
            assert passwd_path is not None
            db = PasswdFileDB(passwd_path)
        self.db = db
        self.is_async = db.is_async
        self.mail_location = mail_location
        self.cache = cache if cache is not None else AuthCache(0, 0, 0)
        self.derived_keys = _DerivedKeys()
        # A network database's last slow hash: what an unknown user's password is checked against there
        self._seen_decoy: str | None = None
        # Whether an unknown user's SCRAM keys are made up at a derivation's cost (fake_scram_keys):
        # for a network database, whether the last user's were (the passwd-file: _file_traits)
        self._seen_derives = False
        # (the passwd-file's records, its decoy hash, whether most of its users' keys are derived),
        # computed once per read of the file
        self._traits: tuple[object, str | None, bool] = (None, None, False)

    @classmethod
    def from_config(cls, config: Config) -> Authenticator:
        db = open_userdb(config)
        cache = None
        if db.is_async:  # the passwd-file is in memory already: no cache in front of it
            cache = AuthCache(config.auth_cache_size, config.auth_cache_ttl, config.auth_cache_negative_ttl)
        return cls(config.passwd_file, config.mail_location, db, cache)

    def lookup(self, name: str) -> UserRecord | None:
        if self.is_async:
            raise RuntimeError("an asynchronous user database needs lookup_async")
        try:
            record = self.db.lookup(name)
            if record is None and not name.isascii():
                nfc = unicodedata.normalize("NFC", name)
                if nfc != name:
                    record = self.db.lookup(nfc)
            return record
        except (OSError, ValueError) as exc:
            log.error("user database unavailable: %s", exc)
            raise AuthUnavailable(str(exc)) from None

    # ------------------------------------------------------------ asynchronous databases

    def _key(self, name: str, remote_ip: str | None) -> object:
        return (name, remote_ip) if self.db.uses_remote_ip else name

    async def _fetch(self, name: str, remote_ip: str | None) -> UserRecord | None:
        """Ask the database (no cache) and remember the answer."""
        record = await self.db.fetch(name, remote_ip)
        if record is None and not name.isascii():
            nfc = unicodedata.normalize("NFC", name)
            if nfc != name:
                record = await self.db.fetch(nfc, remote_ip)
        self.cache.put(self._key(name, remote_ip), record)
        return record

    async def _cached(self, name: str, remote_ip: str | None) -> tuple[UserRecord | None, bool]:
        """(record, whether it came from the cache)."""
        hit = self.cache.get(self._key(name, remote_ip))
        if hit is not MISSING:
            return hit, True  # type: ignore[return-value]
        return await self._fetch(name, remote_ip), False

    async def lookup_async(self, name: str, remote_ip: str | None = None) -> UserRecord | None:
        """Any database: the user's record (through the cache), or None."""
        if not self.is_async:
            return self.lookup(name)
        return (await self._cached(name, remote_ip))[0]

    async def verify_password_async(self, name: str, password: str, remote_ip: str | None = None) -> UserRecord | None:
        """The record if the password is right, else None.  A cached record is
        checked against its stored hash like a fresh one; when that fails the
        database is asked again, so a changed password works at once."""
        candidates = password_candidates(password)
        if self.db.auth_bind:
            return await self._verify_bind(name, password, candidates, remote_ip)
        record, cached = await self._cached(name, remote_ip)
        if record is None:
            if self._seen_decoy is not None:  # as long as a wrong password (see verify_password)
                await _check(self._seen_decoy, candidates)
            return None
        self._seen_decoy = record.password if record.password and passwords.is_expensive(record.password) else None
        if await _check(record.password, candidates):
            return record
        if cached:
            fresh = await self._fetch(name, remote_ip)
            if fresh is not None and fresh.password != record.password and await _check(fresh.password, candidates):
                return fresh
        return None

    async def _verify_bind(self, name: str, password: str, candidates: list[str],
                           remote_ip: str | None) -> UserRecord | None:
        """LDAP auth_bind: the directory checks the password.  A success is
        cached with a salted hash of the password that bound, so a cached
        login is still a password check, never a name alone."""
        key = self._key(name, remote_ip)
        hit = self.cache.get(key)
        if isinstance(hit, UserRecord) and hit.password and await _check(hit.password, candidates):
            return hit
        record = await self.db.bind(name, password, remote_ip)
        if record is None:
            return None
        record = replace(record, password=passwords.hash_password(password, "SSHA256"))
        self.cache.put(key, record)
        return record

    async def verify_apop_async(self, name: str, timestamp: str, digest: str,
                                remote_ip: str | None = None) -> UserRecord | None:
        record, cached = await self._cached(name, remote_ip)
        if record is None:
            return None
        if _apop_matches(record, timestamp, digest):
            return record
        if cached:
            fresh = await self._fetch(name, remote_ip)
            if fresh is not None and fresh.password != record.password and _apop_matches(fresh, timestamp, digest):
                return fresh
        return None

    def reload(self) -> None:
        """SIGHUP: re-read the passwd-file now (even an edit its size and
        mtime do not show); empty the cache in front of SQL and LDAP."""
        if isinstance(self.db, PasswdFileDB):
            self.db.file.reload()
        self.flush_cache()

    def watch(self, loop) -> bool:
        """Let ``loop`` watch the passwd-file (PasswdFile.watch); False for
        other user databases, or where it cannot be watched."""
        return isinstance(self.db, PasswdFileDB) and self.db.watch(loop)

    def flush_cache(self) -> int:
        """Forget every cached answer (SIGHUP, ``fastpop user flush``)."""
        n = self.cache.flush()
        if self.cache.enabled:
            log.info("auth cache flushed (%d entries)", n)
        return n

    async def close(self) -> None:
        await self.db.close()

    # ------------------------------------------------------------ both kinds

    def scram_keys(self, record: UserRecord, secret: bytes):
        """SCRAM-SHA-256 keys (salt, stored key, server key, iterations) for a
        user: the scram_sha256 extra field, a {SCRAM-SHA-256} password, or
        derived from a clear-text password (remembered; a first time, a
        function to run in a thread is returned); None when only a one-way
        hash is stored."""
        from fastpop.auth.sasl import (
            SCRAM_EXTRA,
            SCRAM_ITERATIONS,
            SCRAM_SALT_BYTES,
            parse_scram_keys,
        )

        extra = record.extra.get(SCRAM_EXTRA)
        self._seen_derives = False
        if extra:
            keys = parse_scram_keys(extra)
            if keys is not None:
                return keys
            log.warning("unusable %s field for user=%s", SCRAM_EXTRA, record.name)
        scheme, value = passwords.split_scheme(record.password)
        if scheme == "SCRAM-SHA-256":
            return parse_scram_keys(value)
        secret_pw = passwords.plaintext(record.password)
        if secret_pw is None:
            return None
        self._seen_derives = True
        name = record.name.encode("utf-8", "surrogatepass")
        remembered = hmac.new(secret, b"derived-keys\0" + name + b"\0" + secret_pw.encode("utf-8", "surrogatepass"),
                              hashlib.sha256).digest()
        keys = self.derived_keys.get(remembered)
        if keys is not None:
            return keys
        # as long as a stored salt, and as stable (the secret persists)
        salt = hmac.new(secret, b"derived-salt\0" + name, hashlib.sha256).digest()[:SCRAM_SALT_BYTES]

        def derive():
            from scramp import ScramMechanism

            keys = ScramMechanism("SCRAM-SHA-256").make_auth_info(secret_pw, SCRAM_ITERATIONS, salt)
            self.derived_keys.put(remembered, keys)
            return keys

        return derive

    def fake_scram_keys(self, name: str, secret: bytes):
        """Made-up SCRAM-SHA-256 keys for an unknown user (or one with only a
        one-way hash).  Where most users' keys are derived from a {PLAIN}
        password, a name's first exchange also costs a derivation in the
        login threads, as a real user's does (remembered like one): the
        server-first's floor (50 ms) hides a derivation, not a queue of
        other logins' checks in front of it."""
        from fastpop.auth.sasl import SCRAM_ITERATIONS, fake_scram_keys

        keys = fake_scram_keys(secret, name)
        if not self._most_derive():
            return keys
        remembered = hmac.new(secret, b"made-up-keys\0" + name.encode("utf-8", "surrogatepass"),
                              hashlib.sha256).digest()
        if self.derived_keys.get(remembered) is not None:
            return keys

        def derive():
            hashlib.pbkdf2_hmac("sha256", os.urandom(16), keys[0], SCRAM_ITERATIONS)  # (its cost only)
            self.derived_keys.put(remembered, keys)
            return keys

        return derive

    def _decoy(self) -> str | None:
        """The stored password an unknown user's is checked against, so that its
        failure costs, in the login threads, what most users' wrong passwords
        cost: the passwd-file's first slow hash when most of its passwords are
        slow hashes, else None (no check: most checks are as quick as none)."""
        return self._file_traits()[1] if isinstance(self.db, PasswdFileDB) else None

    def _most_derive(self) -> bool:
        """Whether most users' SCRAM keys are derived (see fake_scram_keys)."""
        return self._file_traits()[2] if isinstance(self.db, PasswdFileDB) else self._seen_derives

    def _file_traits(self) -> tuple[object, str | None, bool]:
        """What _decoy and _most_derive tell of the passwd-file, once per read of it."""
        assert isinstance(self.db, PasswdFileDB)
        users = self.db.file.users
        if self._traits[0] is not users:
            from fastpop.auth.sasl import SCRAM_EXTRA

            slow = [rec.password for rec in users.values() if rec.password and passwords.is_expensive(rec.password)]
            derived = sum(1 for rec in users.values() if not rec.extra.get(SCRAM_EXTRA)
                          and passwords.plaintext(rec.password))
            self._traits = (users, slow[0] if slow and len(slow) * 2 >= len(users) else None,
                            derived > 0 and derived * 2 >= len(users))
        return self._traits

    def maildir_for(self, user: UserRecord) -> str:
        location = user.extra.get("userdb_mail") or user.extra.get("mail") or self.mail_location
        return expand_location(location, user)

    def verify_password(self, name: str, password: str, callback: AuthCallback) -> None:
        """Calls callback(record) on success, callback(None) on failure.

        Raises AuthUnavailable synchronously if the database cannot be read.
        """
        record = self.lookup(name)
        candidates = password_candidates(password)
        if record is None:
            # An unknown user's password is checked against a slow hash too, in
            # the same threads: a wrong password of an existing user waits there
            # behind every other login's check, and past the failure delay when
            # they are many (an attacker's own logins); an unknown user that
            # waited for nothing would be told apart by the reply's moment.
            decoy = self._decoy()
            if decoy is None:
                callback(None)
                return
            password_hash = decoy
        else:
            password_hash = record.password
        if not passwords.is_expensive(password_hash):
            callback(record if _verify_any(password_hash, candidates) else None)
            return
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, _verify_any, password_hash, candidates)

        def done(f: asyncio.Future) -> None:
            ok = not f.cancelled() and f.exception() is None and f.result()
            callback(record if ok else None)  # (the decoy's answer, whatever it is, fails: no record)

        fut.add_done_callback(done)

    def verify_apop(self, name: str, timestamp: str, digest: str) -> UserRecord | None:
        """RFC 1939 APOP: MD5(timestamp + password); only for clear-text credentials."""
        record = self.lookup(name)
        if record is None:
            return None
        return record if _apop_matches(record, timestamp, digest) else None


def _apop_matches(record: UserRecord, timestamp: str, digest: str) -> bool:
    if not allowed(record, "allow_apop"):
        return False
    secret = passwords.plaintext(record.password)
    if not secret:  # a one-way hash, or an empty password (which never logs in)
        return False
    expected = hashlib.md5((timestamp + secret).encode("utf-8", "surrogatepass")).hexdigest()
    # bytes: comparing str raises TypeError on non-ASCII (fastpop.auth.sasl.apop_login
    # lets only 32 hex digits through; this never raises whatever it is given)
    return hmac.compare_digest(expected.encode("ascii"), digest.lower().encode("utf-8", "surrogatepass"))


async def _check(stored: str, candidates: list[str]) -> bool:
    if not stored:
        return False
    if not passwords.is_expensive(stored):
        return _verify_any(stored, candidates)
    return await asyncio.get_running_loop().run_in_executor(None, _verify_any, stored, candidates)
