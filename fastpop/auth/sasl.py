"""SASL mechanisms (RFC 4422) for POP3 AUTH (RFC 5034), and the plain logins.

Every way of logging in is a generator that the protocol drives; it yields
what it needs and returns an ``Outcome``:

- ``Challenge(data)``: send ``+ base64(data)`` and send back the client's
  decoded answer (the protocol handles base64, ``*`` and line limits);
- ``Gate(user)``: the credentials are about to be checked (or the user
  looked up); the protocol applies the failure penalty here (a timer), then
  resumes with ``None``;
- ``Hold(seconds)``: resume no earlier than ``seconds`` after the Gate opened
  (a timer, never a sleep);
- ``Pending(future)``: wait for an asyncio future (a password hash checked in
  a thread, a token validator) and resume with its result, or have its
  exception thrown in.

Mechanisms: PLAIN (RFC 4616), LOGIN, SCRAM-SHA-256 (RFC 7677, through
scramp), OAUTHBEARER (RFC 7628) and XOAUTH2 (token validation through the
hook in ``fastpop.auth.oauth``); ``password_login`` and ``apop_login`` give USER/PASS
and APOP the same path through penalties and failure handling.

Malformed input never raises out of a mechanism: it ends in a failed
``Outcome`` with ``malformed=True`` (counted as an attempt, not penalised).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, final

from fastpop.auth.userdb import allowed

if TYPE_CHECKING:
    from fastpop.auth.passwd_file import UserRecord
    from fastpop.config import Config

log = logging.getLogger("fastpop.auth")

SCRAM_ITERATIONS = 4096
SCRAM_SALT_BYTES = 32  # what ``make_scram_keys`` (scramp) stores: made-up salts are as long
# The server-first goes out this long after the lookup starts, whoever the
# user: deriving keys from a {PLAIN} password (PBKDF2, 4096 rounds: about 1 ms
# on a current x86 core, several on a small ARM board, more when queued in the
# thread pool) and a network user database's answer hide under it.  Derived
# keys are also remembered (fastpop.auth.authenticator), but that alone would still show a
# user's first probe.  The client spends a derivation of its own meanwhile,
# and nobody notices 50 ms at login.
SCRAM_FIRST_FLOOR = 0.05
SCRAM_EXTRA = "scram_sha256"  # passwd-file extra field: iter,salt,storedkey,serverkey (base64)


# Each step is matched by ``type(step) is ...`` (fastpop.session.login): none is subclassed.
@final
@dataclass(frozen=True, slots=True)
class Challenge:
    data: bytes
    failed: Outcome | None = None  # an error challenge: the attempt has already failed


@final
@dataclass(frozen=True, slots=True)
class Gate:
    user: str | None


@final
@dataclass(frozen=True, slots=True)
class Hold:
    seconds: float  # after the Gate opened


@final
@dataclass(frozen=True, slots=True)
class Pending:
    future: Any  # asyncio.Future


@dataclass(frozen=True, slots=True)
class Outcome:
    user: str | None  # the name that was tried (for logs and penalties)
    record: UserRecord | None = None  # set on success
    credentials: bytes | None = None  # a fingerprint source: same wrong credentials, no higher penalty
    malformed: bool = False
    reason: str = ""
    master: str | None = None  # a master user's login (set on success): who logged in as ``record``
    master_record: UserRecord | None = None  # the master's own line (its allow_nets, nologin apply too)


Step = Generator["Challenge | Gate | Hold | Pending", Any, Outcome]


class Services(Protocol):
    """What mechanisms may ask of the server (implemented by the protocol)."""

    # Each may answer at once (the passwd-file) or with a Pending (a network
    # user database); AuthUnavailable is raised or thrown in.
    def lookup(self, name: str) -> UserRecord | None | Pending: ...
    def valid_username(self, name: str) -> bool: ...
    def verify_password(self, name: str, password: str) -> UserRecord | None | Pending: ...
    def verify_apop(self, name: str, digest: str) -> UserRecord | None | Pending: ...
    def scram_keys(self, record: UserRecord) -> tuple[bytes, bytes, bytes, int] | Pending | None: ...
    def fake_scram_keys(self, name: str) -> tuple[bytes, bytes, bytes, int] | Pending: ...
    def refusal(self, record: UserRecord) -> str | None:
        """Why ``record`` may not log in here even with the right credentials
        (nologin, nopop3, allow_nets, fastpop deny), or None."""
    def validate_token(self, token: str, user: str | None, mechanism: str) -> Pending: ...
    def verify_master(self, name: str, password: str) -> UserRecord | None | Pending: ...
    @property
    def secret(self) -> bytes: ...
    @property
    def master_separator(self) -> str | None:
        """The master users' separator (``*``), or None: no master users."""


def _malformed(reason: str, user: str | None = None) -> Outcome:
    return Outcome(user, malformed=True, reason=reason)


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def decode_response(line: bytes) -> bytes | None:
    """A client's base64 SASL response; None if it is not valid base64.
    Blanks around it are ignored, as Dovecot's decoder does: some clients
    end the line with a space."""
    line = line.strip(b" \t")
    if line == b"=":  # RFC 5034: "=" is an empty initial response
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return None


def encode_challenge(data: bytes) -> bytes:
    return b"+ " + base64.b64encode(data) + b"\r\n"


# ----------------------------------------------------------------- plain logins


def split_master(name: str, separator: str | None) -> tuple[str, str] | None:
    """``alice*admin`` -> ("alice", "admin") when master users are on: the
    last separator splits (a master's name cannot hold one); a name without
    it, or master users off, is an ordinary name (None)."""
    if not separator or separator not in name:
        return None
    user, _, master = name.rpartition(separator)
    return user, master


def penalty_name(name: str, separator: str | None) -> str:
    """The name a failed login counts against: a master login's master
    (``*admin``, whatever user it named), else the name itself."""
    parts = split_master(name, separator)
    return name if parts is None else separator + parts[1]  # type: ignore[operator]  # (a separator split it)


def password_login(svc: Services, name: str, password: str) -> Step:
    """USER/PASS, and the end of PLAIN and LOGIN."""
    credentials = name.encode("utf-8", "surrogatepass") + b"\0" + password.encode("utf-8", "surrogatepass")
    parts = split_master(name, svc.master_separator)
    if parts is not None:
        return (yield from master_login(svc, name, parts[0], parts[1], password, credentials))
    if not svc.valid_username(name):
        yield Gate(None)
        return Outcome(name, credentials=credentials, reason="invalid user name")
    yield Gate(name)
    if not password or "\0" in password:
        # An empty password never logs in; nor one with a NUL, which bcrypt
        # and PBKDF2 (HMAC pads its key with NULs) take for a shorter one:
        # "\0" is "" to both.  Refused unlooked-up, as a wrong password.
        return Outcome(name, credentials=credentials, reason="empty password or NUL in it")
    found = svc.verify_password(name, password)
    record: UserRecord | None = (yield found) if type(found) is Pending else found
    if record is not None and not allowed(record, "allow_plaintext"):
        return Outcome(name, credentials=credentials, reason="plaintext logins disabled for this user")
    return Outcome(name, record, credentials=credentials, reason="" if record else "wrong password or unknown user")


def master_login(svc: Services, shown: str, user: str, master: str, password: str, credentials: bytes) -> Step:
    """A master user (from its own passwd-file, never the user database) logs
    in as ``user`` with the master's password.  ``shown``, the name as the
    client gave it (``alice*admin``), is what failures log; the penalty
    counts against the master (whatever user it names), so spreading guesses
    of a master's password over many users gains nothing."""
    sep = svc.master_separator
    assert sep is not None, "master logins only when master users are on"
    if not user or not master or not svc.valid_username(user) or not svc.valid_username(master):
        yield Gate(None)
        return Outcome(shown, credentials=credentials, reason="master login with an invalid user or master name")
    yield Gate(penalty_name(shown, sep))  # (a name no ordinary login can use while master users are on)
    if not password or "\0" in password:
        return Outcome(shown, credentials=credentials, reason="empty password or NUL in it")
    found = svc.verify_master(master, password)
    master_record: UserRecord | None = (yield found) if type(found) is Pending else found
    if master_record is None:
        return Outcome(shown, credentials=credentials, reason="master: wrong password or unknown master user")
    found = svc.lookup(user)
    record: UserRecord | None = (yield found) if type(found) is Pending else found
    if record is None:
        return Outcome(shown, credentials=credentials, reason="master: no such user to log in as")
    return Outcome(user, record, credentials=credentials, master=master_record.name, master_record=master_record)


def _apop_digest_ok(digest: str) -> bool:
    """32 hex digits (either case), as MD5 gives; nothing else is looked at."""
    return len(digest) == 32 and not digest.strip(_HEX)  # (strip: every character one of them)


_HEX = "0123456789abcdefABCDEF"


def apop_login(svc: Services, name: str, digest: str) -> Step:
    """RFC 1939 APOP.  A digest that is not 32 hex digits (``APOP bob é``) is a
    wrong one: the same failure, after the same penalty and delay, counted and
    penalised, for every user, existing or not (no lookup)."""
    if not svc.valid_username(name):
        yield Gate(None)
        return Outcome(name, reason="invalid user name")
    yield Gate(name)
    if not _apop_digest_ok(digest):
        return Outcome(name, reason="malformed APOP digest")
    found = svc.verify_apop(name, digest)
    record: UserRecord | None = (yield found) if type(found) is Pending else found
    return Outcome(name, record, reason="" if record else "wrong digest or unknown user")


def plain(svc: Services, initial: bytes | None) -> Step:
    """RFC 4616: [authzid] NUL authcid NUL passwd."""
    data = initial if initial is not None else (yield Challenge(b""))
    parts = data.split(b"\0")
    if len(parts) != 3:
        return _malformed("PLAIN message without two NULs")
    authzid, authcid, password = (_utf8(p) for p in parts)
    if authzid is None or authcid is None or password is None:
        return _malformed("PLAIN message not UTF-8")
    if not authcid or not password:
        return _malformed("PLAIN message with an empty name or password")
    if authzid and authzid != authcid:
        sep = svc.master_separator
        if sep is None:
            return Outcome(authcid, reason="authorization identity differs (not supported)")
        # RFC 4616: authcid's credentials, acting as authzid: a master user
        # logging in as a user (never an authcid that is itself user*master)
        if sep in authzid or sep in authcid:
            return _malformed("PLAIN master login with a separator in its names", authcid)
        # credentials as USER would give them (user*master), so what relays them (fastpop proxy) logs in the same way
        shown = f"{authzid}{sep}{authcid}"
        credentials = shown.encode("utf-8", "surrogatepass") + b"\0" + password.encode("utf-8", "surrogatepass")
        return (yield from master_login(svc, shown, authzid, authcid, password, credentials))
    return (yield from password_login(svc, authcid, password))


def login(svc: Services, initial: bytes | None) -> Step:
    """The LOGIN mechanism (draft-murchison-sasl-login): user name, then password."""
    name = initial if initial is not None else (yield Challenge(b"Username:"))
    password = yield Challenge(b"Password:")
    user, secret = _utf8(name), _utf8(password)
    if user is None or secret is None:
        return _malformed("LOGIN data not UTF-8")
    if not user or not secret:
        return _malformed("LOGIN with an empty name or password")
    return (yield from password_login(svc, user, secret))


# ----------------------------------------------------------------- SCRAM-SHA-256


def parse_scram_keys(value: str) -> tuple[bytes, bytes, bytes, int] | None:
    """Dovecot's {SCRAM-SHA-256} body ``iter,salt,storedkey,serverkey`` (base64)
    -> scramp's (salt, stored_key, server_key, iterations); None if unusable."""
    if value.startswith("{"):
        close = value.find("}")
        if close < 0 or value[1:close].upper() != "SCRAM-SHA-256":
            return None
        value = value[close + 1 :]
    parts = value.split(",")
    if len(parts) != 4 or not parts[0].isdigit():
        return None
    try:
        salt, stored, server = (base64.b64decode(p, validate=True) for p in parts[1:])
    except (binascii.Error, ValueError):
        return None
    iterations = int(parts[0])
    if len(stored) != 32 or len(server) != 32 or not salt or iterations < 1:
        return None
    return salt, stored, server, iterations


def format_scram_keys(salt: bytes, stored: bytes, server: bytes, iterations: int) -> str:
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"{iterations},{b64(salt)},{b64(stored)},{b64(server)}"


def make_scram_keys(password: str, iterations: int = SCRAM_ITERATIONS, salt: bytes | None = None) -> str:
    """What ``fastpop user add`` stores (the password is SASLprep'd, as clients do)."""
    from scramp import ScramMechanism

    salt_, stored, server, i = ScramMechanism("SCRAM-SHA-256").make_auth_info(password, iterations, salt)
    return format_scram_keys(salt_, stored, server, i)


def _scram_unescape(name: str) -> str | None:
    """RFC 5802 saslname: "=2C" is ",", "=3D" is "=", any other "=" is an error."""
    out, i = [], 0
    while i < len(name):
        c = name[i]
        if c == "=":
            code = name[i + 1 : i + 3]
            if code == "2C":
                out.append(",")
            elif code == "3D":
                out.append("=")
            else:
                return None
            i += 3
            continue
        out.append(c)
        i += 1
    return "".join(out)


def fake_scram_keys(secret: bytes, name: str) -> tuple[bytes, bytes, bytes, int]:
    """For unknown users: a salt as long and as stable as a real one (the
    secret persists across restarts and is the same in every worker), the
    iterations ``fastpop user add`` stores, keys nobody can match."""
    salt = hmac.new(secret, b"scram-salt\0" + name.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return salt[:SCRAM_SALT_BYTES], os.urandom(32), os.urandom(32), SCRAM_ITERATIONS


class _Gs2AsSent:
    """Stands in for scramp's gs2-header when the client sent an authzid
    (scramp refuses any): the channel-binding input is the header as sent."""

    __slots__ = ("_header",)

    def __init__(self, header: str) -> None:
        self._header = header.encode("utf-8")

    def make_cbind_input(self, _channel_binding: object) -> bytes:
        return self._header


def _keys_of_empty_password(salt: bytes, stored_key: bytes, iterations: int) -> bool:
    """Whether SCRAM-SHA-256 keys are the empty password's."""
    salted = hashlib.pbkdf2_hmac("sha256", b"", salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key)


_EMPTY_KEYS: dict[tuple[bytes, bytes, int], bool] = {}  # (salt, stored key, iterations) -> that
_EMPTY_KEYS_MAX = 10000


def scram_sha256(svc: Services, initial: bytes | None) -> Step:
    from scramp import ScramException, ScramMechanism

    first = initial if initial is not None else (yield Challenge(b""))
    text = _utf8(first)
    if text is None:
        return _malformed("SCRAM client-first not UTF-8")
    parts = text.split(",", 3)
    if len(parts) < 4 or parts[0] not in ("n", "y") or not parts[2].startswith("n="):
        return _malformed("SCRAM client-first malformed (or asks for channel binding)")
    authzid = parts[1]
    name = _scram_unescape(parts[2][2:])
    if name is None or not name:
        return _malformed("SCRAM user name malformed")
    if authzid:
        # GNU SASL (mutt) sends "a=USER": the user asking to act as itself is
        # the same login; another identity is not supported.  scramp takes no
        # authzid: it sees the client-first without it (_Gs2AsSent below).
        wanted = _scram_unescape(authzid[2:]) if authzid.startswith("a=") else None
        if not wanted:
            return _malformed("SCRAM authorization identity malformed", name)
        if wanted != name:
            return Outcome(name, reason="authorization identity differs (not supported)")
        text = f"{parts[0]},,{parts[2]},{parts[3]}"
    # The penalty before the lookup: a guesser under penalty learns nothing
    # about the user (salt, timing) sooner than one guess is checked.
    valid = svc.valid_username(name)
    yield Gate(name if valid else None)
    found = svc.lookup(name) if valid else None
    record: UserRecord | None = (yield found) if type(found) is Pending else found
    keys: tuple[bytes, bytes, bytes, int] | None = None
    if record is not None:
        found_keys = svc.scram_keys(record)
        keys = (yield found_keys) if isinstance(found_keys, Pending) else found_keys
        if keys is None:
            log.info("no SCRAM-SHA-256 keys for user=%s (hash-only password: set it again with fastpop user passwd)",
                     name)
            record = None
    if keys is None:  # made up, at the cost most users' keys have (a derivation in the login threads, or none)
        found_keys = svc.fake_scram_keys(name)
        keys = (yield found_keys) if isinstance(found_keys, Pending) else found_keys
    server = ScramMechanism("SCRAM-SHA-256").make_server(lambda _user: keys)
    try:
        server.set_client_first(text)
        server_first = server.get_server_first()
    except ScramException as exc:
        return _malformed(f"SCRAM client-first rejected: {exc}", name)
    if authzid:  # the client-final's c= is the gs2-header as sent, authzid and all
        server.gs2_header = _Gs2AsSent(f"{parts[0]},{authzid},")
    yield Hold(SCRAM_FIRST_FLOOR)  # unknown, stored keys or derived: the same moment
    client_final = yield Challenge(server_first.encode("utf-8"))
    final_text = _utf8(client_final)
    if final_text is None:
        return _malformed("SCRAM client-final not UTF-8", name)
    try:
        server.set_client_final(final_text)
        server_final = server.get_server_final()
    except ScramException as exc:
        return Outcome(name, reason=f"SCRAM: {exc}")
    if record is None:
        return Outcome(name, reason="SCRAM: unknown user")  # pragma: no cover - random keys never verify
    # A user the login refuses anyway gets no server-final: it is the server's
    # proof, sent only to a client whose own proof was right, so it would tell
    # a stolen password is right (docs/security.md: it must not).  Before the
    # empty-password check, whose first time waits in the login threads: a wrong
    # password's failure waits for nothing.
    refused = svc.refusal(record)
    if refused is not None:
        return Outcome(name, reason=refused)
    # Keys of the empty password never log in.  Only a client that proved it
    # knows the password gets here; one key derivation per set of keys (in a
    # thread), remembered.
    checked = (keys[0], keys[1], keys[3])  # salt, stored key, iterations
    empty = _EMPTY_KEYS.get(checked)
    if empty is None:
        empty = yield Pending(asyncio.get_running_loop().run_in_executor(None, _keys_of_empty_password, *checked))
        if len(_EMPTY_KEYS) >= _EMPTY_KEYS_MAX:
            del _EMPTY_KEYS[next(iter(_EMPTY_KEYS))]
        _EMPTY_KEYS[checked] = empty
    if empty:
        return Outcome(name, reason="empty password")
    # RFC 5034 has no success data: the server-final goes out as a last
    # challenge, and the client's (empty) answer completes the exchange.
    answer = yield Challenge(server_final.encode("utf-8"))
    if answer:
        return _malformed("SCRAM: data after server-final", name)
    return Outcome(name, record)


# ----------------------------------------------------------------- OAuth 2.0 bearer tokens

OAUTH_ERROR = json.dumps({"status": "invalid_token", "schemes": "bearer", "scope": "email"}).encode("ascii")


def _bearer(value: str | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _validated(svc: Services, token: str, user: str | None, mechanism: str) -> Step:
    """Shared end of both OAuth mechanisms: the hook names the token's user."""
    if user is not None and not svc.valid_username(user):
        # no token makes this name log in: a wrong token's failure, and the
        # validator never sees it (the command validator's environment refuses a NUL)
        yield Gate(None)
        return Outcome(user, reason="invalid user name")
    yield Gate(user)
    owner = yield svc.validate_token(token, user, mechanism)
    if owner is not None and not isinstance(owner, str):
        owner = None
    if owner is None:
        return Outcome(user, reason="token rejected by the validator")
    if user is not None and owner != user:
        return Outcome(user, reason=f"token belongs to {owner!r}")
    if not svc.valid_username(owner):
        return Outcome(owner, reason="validator returned an invalid user name")
    found = svc.lookup(owner)
    record: UserRecord | None = (yield found) if type(found) is Pending else found
    if record is None:
        return Outcome(owner, reason="token valid but no such user in the user database")
    refused = svc.refusal(record)
    if refused is not None:  # the error challenge, as for a rejected token: a valid one is not confirmed
        return Outcome(owner, reason=refused)
    return Outcome(owner, record)


def oauthbearer(svc: Services, initial: bytes | None) -> Step:
    """RFC 7628: gs2-header, then key=value pairs separated by ^A."""
    data = initial if initial is not None else (yield Challenge(b""))
    text = _utf8(data)
    if text is None:
        return _malformed("OAUTHBEARER message not UTF-8")
    gs2, sep, rest = text.partition("\x01")
    head = gs2.split(",")
    if not sep or len(head) != 3 or head[0] not in ("n", "y") or head[2] != "" or not rest.endswith("\x01"):
        return _malformed("OAUTHBEARER message malformed")
    user = None
    if head[1]:
        if not head[1].startswith("a="):
            return _malformed("OAUTHBEARER authzid malformed")
        user = _scram_unescape(head[1][2:])
        if not user:
            return _malformed("OAUTHBEARER authzid malformed")
    fields = dict(kv.partition("=")[::2] for kv in rest.split("\x01") if kv)
    token = _bearer(fields.get("auth"))
    if token is None:
        return _malformed("OAUTHBEARER without a bearer token", user)
    outcome = yield from _validated(svc, token, user, "OAUTHBEARER")
    if outcome.record is None:
        # RFC 7628 3.2.2: an error challenge; the client answers with ^A.
        yield Challenge(OAUTH_ERROR, outcome)
    return outcome


def xoauth2(svc: Services, initial: bytes | None) -> Step:
    """Google's XOAUTH2: user=NAME ^A auth=Bearer TOKEN ^A ^A."""
    data = initial if initial is not None else (yield Challenge(b""))
    text = _utf8(data)
    if text is None or not text.endswith("\x01\x01"):
        return _malformed("XOAUTH2 message malformed")
    fields = dict(kv.partition("=")[::2] for kv in text.split("\x01") if kv)
    user = fields.get("user") or None
    token = _bearer(fields.get("auth"))
    if user is None or token is None:
        return _malformed("XOAUTH2 message without user or bearer token", user)
    outcome = yield from _validated(svc, token, user, "XOAUTH2")
    if outcome.record is None:
        yield Challenge(OAUTH_ERROR, outcome)  # the client answers with an empty line
    return outcome


# ----------------------------------------------------------------- the table


@dataclass(frozen=True, slots=True)
class Mechanism:
    name: str
    start: Callable[[Services, bytes | None], Step]
    plaintext: bool  # the credentials travel in clear: only over TLS or from trusted networks


MECHANISMS: dict[str, Mechanism] = {
    m.name: m
    for m in (
        Mechanism("PLAIN", plain, True),
        Mechanism("LOGIN", login, True),
        Mechanism("SCRAM-SHA-256", scram_sha256, False),
        # A bearer token is a replayable credential: treated as plaintext.
        Mechanism("OAUTHBEARER", oauthbearer, True),
        Mechanism("XOAUTH2", xoauth2, True),
    )
}
OAUTH_MECHANISMS = frozenset({"OAUTHBEARER", "XOAUTH2"})


def validate(config: Config) -> None:
    """The offered mechanisms' checks for fastpop.serve.validation (raises ValueError)."""
    for mech in config.mechanisms():
        if mech not in MECHANISMS:
            raise ValueError(f"unknown SASL mechanism {mech!r} (known: {', '.join(MECHANISMS)})")
        if mech in OAUTH_MECHANISMS and not config.oauth_validator:
            raise ValueError(f"SASL mechanism {mech} needs an oauth validator ([oauth] validator)")
    if config.auth_master_passwd_file:
        from fastpop.auth.passwd_file import check_master_file

        check_master_file(config.auth_master_passwd_file)
