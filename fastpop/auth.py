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
    return len(name) <= MAX_USERNAME and ".." not in name and _USERNAME.fullmatch(name) is not None


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
            return self.db.lookup(name)
        except (OSError, ValueError) as exc:
            log.error("user database unavailable: %s", exc)
            raise AuthUnavailable(str(exc)) from None

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
        if not passwords.is_expensive(record.password):
            callback(record if passwords.verify(record.password, password) else None)
            return
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, passwords.verify, record.password, password)

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
