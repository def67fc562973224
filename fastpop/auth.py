"""Authentication: user name checks, credential lookup, password verification.

Slow hashes are verified in the loop's thread pool so they never stall other
sessions; fast ones inline.  Results come back through a callback, on the
event loop, in both cases.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import unicodedata
from typing import Callable

from fastpop import passwords
from fastpop.passwd_file import PasswdFile, UserRecord

log = logging.getLogger("fastpop.auth")

MAX_USERNAME = 255
# local part and optional domain; no "/", "\\", whitespace or control characters,
# no leading dot and no "..": a name can never climb out of a mail root.
_USERNAME = re.compile(r"[A-Za-z0-9_+=~!#$%&'*^`{|}-][A-Za-z0-9._+=~!#$%&'*^`{|}-]*(@[A-Za-z0-9][A-Za-z0-9.-]*)?")

AuthCallback = Callable[["UserRecord | None"], None]


class AuthUnavailable(Exception):
    """The user database cannot be read right now ([SYS/TEMP])."""


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
    """The password as sent, then SASLprep'd (RFC 4013) if that differs."""
    if password.isascii() and password.isprintable():
        return [password]
    try:
        from scramp.utils import saslprep

        prepped = saslprep(password)
    except Exception:  # prohibited characters: only the raw form can match
        return [password]
    return [password] if prepped == password else [password, prepped]


def _verify_any(stored: str, candidates: list[str]) -> bool:
    return any(passwords.verify(stored, c) for c in candidates)


def expand_location(template: str, user: UserRecord) -> str:
    """Mail location from a template: %u user, %n local part, %d domain, %h home."""
    if template.startswith("maildir:"):  # accept Dovecot's mail_location syntax
        template = template[len("maildir:") :].split(":", 1)[0]
    local, _, domain = user.name.partition("@")
    out: list[str] = []
    i = 0
    while i < len(template):
        c = template[i]
        if c == "%" and i + 1 < len(template):
            key = template[i + 1]
            i += 2
            if key == "u":
                out.append(user.name)
            elif key == "n":
                out.append(local)
            elif key == "d":
                out.append(domain)
            elif key == "h":
                if not user.home:
                    raise ValueError(f"user {user.name} has no home for %h")
                out.append(user.home)
            elif key == "%":
                out.append("%")
            else:
                raise ValueError(f"unknown variable %{key} in mail location")
            continue
        if c == "~" and i == 0 and user.home:
            out.append(user.home)
        else:
            out.append(c)
        i += 1
    return os.path.normpath("".join(out))


class Authenticator:
    """Looks users up in the passwd-file and verifies passwords."""

    def __init__(self, passwd_path: str, mail_location: str) -> None:
        self.db = PasswdFile(passwd_path)
        self.mail_location = mail_location

    def lookup(self, name: str) -> UserRecord | None:
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

    def scram_keys(self, record: UserRecord, secret: bytes):
        """SCRAM-SHA-256 keys (salt, stored key, server key, iterations) for a
        user: the scram_sha256 extra field, a {SCRAM-SHA-256} password, or
        derived from a clear-text password (then a function to run in a
        thread is returned); None when only a one-way hash is stored."""
        from fastpop.sasl import SCRAM_EXTRA, SCRAM_ITERATIONS, parse_scram_keys

        extra = record.extra.get(SCRAM_EXTRA)
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
        salt = hmac.new(secret, b"derived-salt\0" + record.name.encode("utf-8"), hashlib.sha256).digest()[:16]

        def derive():
            from scramp import ScramMechanism

            return ScramMechanism("SCRAM-SHA-256").make_auth_info(secret_pw, SCRAM_ITERATIONS, salt)

        return derive

    def maildir_for(self, user: UserRecord) -> str:
        location = user.extra.get("userdb_mail") or user.extra.get("mail") or self.mail_location
        return expand_location(location, user)

    def verify_password(self, name: str, password: str, callback: AuthCallback) -> None:
        """Calls callback(record) on success, callback(None) on failure.

        Raises AuthUnavailable synchronously if the database cannot be read.
        """
        record = self.lookup(name)
        if record is None:
            callback(None)
            return
        candidates = password_candidates(password)
        if not passwords.is_expensive(record.password):
            callback(record if _verify_any(record.password, candidates) else None)
            return
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, _verify_any, record.password, candidates)

        def done(f: asyncio.Future) -> None:
            ok = not f.cancelled() and f.exception() is None and f.result()
            callback(record if ok else None)

        fut.add_done_callback(done)

    def verify_apop(self, name: str, timestamp: str, digest: str) -> UserRecord | None:
        """RFC 1939 APOP: MD5(timestamp + password); only for clear-text credentials."""
        record = self.lookup(name)
        if record is None:
            return None
        secret = passwords.plaintext(record.password)
        if secret is None:
            return None
        expected = hashlib.md5((timestamp + secret).encode("utf-8")).hexdigest()
        return record if hmac.compare_digest(expected, digest.lower()) else None
