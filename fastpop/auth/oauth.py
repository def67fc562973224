"""OAuth 2.0 bearer tokens for OAUTHBEARER and XOAUTH2: the validator hook.

A validator is any Python callable named in the configuration as
``"module:function"`` (``[oauth] validator``).  It is called once per login
attempt with a ``TokenRequest`` and returns the name of the user the token
belongs to, or ``None`` if the token is not valid:

    def validate(request: fastpop.auth.oauth.TokenRequest) -> str | None: ...
    async def validate(request: fastpop.auth.oauth.TokenRequest) -> str | None: ...

A plain function runs in a worker thread (it may block, e.g. on an HTTP
token-introspection call); a coroutine function runs on the event loop.
Raising any exception answers the client ``-ERR [SYS/TEMP]`` (the token could
not be checked); returning a name other than the one the client claimed, or
one not in the passwd-file, fails the login.  The passwd-file still decides
where the user's mail is.

Two validators ship, so the mechanisms work end to end without an
authorization server:

- ``hmac`` (``fastpop.auth.oauth:hmac_validator``): the token is a JWT signed with
  HS256 and the shared secret of ``[oauth] secret`` or ``secret_file``; it
  must carry ``sub`` (the user) and ``exp``; ``exp``, ``nbf`` and ``iat``
  must be finite numbers.  A token that is malformed in any way is refused
  like a wrong one, never answered [SYS/TEMP].  ``fastpop oauth token USER``
  mints one.
- ``command`` (``fastpop.auth.oauth:command_validator``): runs ``[oauth] command``
  with the token on standard input and ``FASTPOP_OAUTH_USER`` /
  ``FASTPOP_OAUTH_MECHANISM`` in the environment; exit status 0 and a user
  name on the first line of standard output accept the token.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import importlib
import inspect
import json
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastpop.config import Config

COMMAND_TIMEOUT = 10.0
ALIASES = {
    "hmac": "fastpop.auth.oauth:hmac_validator",
    "command": "fastpop.auth.oauth:command_validator",
    # where they were before the auth package: configurations may still say so
    "fastpop.oauth:hmac_validator": "fastpop.auth.oauth:hmac_validator",
    "fastpop.oauth:command_validator": "fastpop.auth.oauth:command_validator",
}


@dataclass(frozen=True)
class TokenRequest:
    token: str
    user: str | None  # the user the client claims (OAUTHBEARER's authzid, XOAUTH2's user=)
    mechanism: str  # "OAUTHBEARER" or "XOAUTH2"
    peer: str  # the client's address
    config: Config


def load_validator(spec: str) -> Callable[[TokenRequest], Any]:
    spec = ALIASES.get(spec, spec)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"oauth validator must be 'module:function' (or 'hmac', 'command'), not {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"oauth validator {spec!r}: {exc}") from None
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ValueError(f"oauth validator {spec!r}: no {attr} in {module_name}")
    if not callable(target):
        raise ValueError(f"oauth validator {spec!r} is not callable")
    return target


def run_validator(validator: Callable[[TokenRequest], Any], request: TokenRequest,
                  loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """A future for the validator's answer, whichever kind of callable it is."""
    if inspect.iscoroutinefunction(validator):
        return asyncio.ensure_future(validator(request), loop=loop)
    return loop.run_in_executor(None, validator, request)


# ----------------------------------------------------------------- HS256 JWTs


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def _unb64url(text: str) -> bytes:
    """base64url (RFC 7515: no padding, though padding is forgiven); ValueError
    for anything outside the alphabet, never silently skipped."""
    if _B64URL.fullmatch(text) is None:
        raise ValueError("not base64url")
    text = text.rstrip("=")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def _json_object(segment: str) -> dict | None:
    """A JWT segment's JSON object, or None: bad base64url or UTF-8, not JSON,
    NaN or Infinity anywhere, nesting too deep for the parser, not an object."""
    try:
        value = json.loads(_unb64url(segment), parse_constant=_no_constant)
    except (ValueError, RecursionError):  # binascii.Error, UnicodeDecodeError, JSONDecodeError are ValueErrors
        return None
    return value if isinstance(value, dict) else None


def _numeric_date(value: Any) -> float | None:
    """A JWT NumericDate (RFC 7519 2) as a finite float; None for anything
    else: a string, a boolean, null, NaN, an infinity, an integer too large
    for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


SECRET_FILE = "[oauth] secret_file"
_SECRETS: dict[tuple[str | None, str | None], bytes] = {}  # what was read, by where it was read from


def read_secret(config: Config) -> bytes:
    """The hmac validator's secret, from ``[oauth] secret_file`` or ``secret``;
    ValueError saying what is wrong.  The file is checked as the server
    secret is (a regular file of root, of this uid or of the serving user,
    that nobody else may read or write): whoever can read it can sign a
    token for any user.  A file read before that this process may no
    longer read (a SIGHUP after privileges dropped, the file root's) keeps
    the secret read then."""
    key = (config.oauth_secret, config.oauth_secret_file)
    path = config.oauth_secret_file
    if path:
        from fastpop.auth.authenticator import read_checked_secret, serving_uids

        secret = read_checked_secret(path, SECRET_FILE, serving_uids(config.user), known=_SECRETS.get(key))
    else:
        secret = (config.oauth_secret or "").encode("utf-8")
    if len(secret) < 16:
        raise ValueError("the oauth secret must be at least 16 bytes ([oauth] secret or secret_file)")
    _SECRETS[key] = secret  # (a reload that reads a changed file is what the validator uses next)
    return secret


def validate(config: Config) -> None:
    """The [oauth] section's checks for fastpop.serve.validation (raises ValueError)."""
    if not config.oauth_validator:
        return
    load_validator(config.oauth_validator)  # raises ValueError with the reason
    spec = ALIASES.get(config.oauth_validator, config.oauth_validator)
    if spec == ALIASES["hmac"]:
        read_secret(config)  # (ValueError saying what is wrong)
    if spec == ALIASES["command"] and not config.oauth_command:
        raise ValueError("oauth validator 'command' needs [oauth] command (--oauth-command)")


def make_token(secret: bytes, user: str, ttl: float = 3600.0, now: float | None = None) -> str:
    """An HS256 JWT for ``user`` that the hmac validator accepts for ``ttl`` seconds."""
    now = time.time() if now is None else now
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps({"sub": user, "iat": int(now), "exp": int(now + ttl)}, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    return f"{header}.{payload}.{_b64url(hmac.new(secret, signing_input, hashlib.sha256).digest())}"


def check_token(secret: bytes, token: str, now: float | None = None, leeway: float = 30.0) -> str | None:
    """The ``sub`` of a valid, unexpired HS256 JWT signed with ``secret``; else
    None, whatever the token holds (never an exception).

    The signature is checked before anything is decoded, so a client without
    the secret never gets its JSON parsed.  ``exp`` is required, ``nbf`` and
    ``iat`` optional; each present must be a finite number (RFC 7519
    NumericDate), ``nbf`` and ``iat`` not in the future."""
    parts = token.split(".")
    if len(parts) != 3 or not token.isascii():
        return None
    try:
        signature = _unb64url(parts[2])
    except ValueError:
        return None
    expected = hmac.new(secret, f"{parts[0]}.{parts[1]}".encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        return None
    header = _json_object(parts[0])
    payload = _json_object(parts[1])
    if header is None or payload is None or header.get("alg") != "HS256":
        return None
    now = time.time() if now is None else now
    exp = _numeric_date(payload.get("exp"))
    if exp is None or now > exp + leeway:
        return None
    for claim in ("nbf", "iat"):
        if claim in payload:
            when = _numeric_date(payload[claim])
            if when is None or now + leeway < when:
                return None
    sub = payload.get("sub")
    return sub if isinstance(sub, str) and sub else None


def hmac_validator(request: TokenRequest) -> str | None:
    config = request.config
    key = (config.oauth_secret, config.oauth_secret_file)
    secret = _SECRETS.get(key)
    if secret is None:
        secret = _SECRETS[key] = read_secret(config)
    return check_token(secret, request.token)


async def command_validator(request: TokenRequest) -> str | None:
    config = request.config
    if not config.oauth_command:
        raise RuntimeError("oauth validator 'command' needs [oauth] command")
    env = dict(os.environ)
    env["FASTPOP_OAUTH_USER"] = request.user or ""
    env["FASTPOP_OAUTH_MECHANISM"] = request.mechanism
    env["FASTPOP_OAUTH_PEER"] = request.peer
    proc = await asyncio.create_subprocess_exec(
        *shlex.split(config.oauth_command),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env,
    )
    try:
        out = await asyncio.wait_for(_answer(proc, request.token.encode("utf-8") + b"\n"), COMMAND_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError("oauth command timed out") from None
    if proc.returncode != 0:
        return None
    lines = out.decode("utf-8", "replace").splitlines()
    return (lines[0].strip() or None) if lines else None


async def _answer(proc: asyncio.subprocess.Process, token: bytes) -> bytes:
    """Give the command the token, then its standard output once it exits.  A
    command that exits without reading the token (it rejects at once) is
    answered by its exit status: the broken pipe is no error of the validator
    (asyncio's communicate() ignores it; uvloop's raised, answering [SYS/TEMP])."""
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(token)  # (at most a SASL line: it fits in the pipe, the drain does not wait on the command)
        await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError, RuntimeError):
        pass
    try:
        proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError, RuntimeError):  # (uvloop: a pipe already closed)
        pass
    out = await proc.stdout.read()
    await proc.wait()
    return out


# ----------------------------------------------------------------- fastpop oauth token


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("oauth", help="mint bearer tokens for the hmac validator")
    sub = p.add_subparsers(dest="oauth_command", required=True)
    t = sub.add_parser("token", help="print an HS256 token for USER (OAUTHBEARER / XOAUTH2 with validator = \"hmac\")")
    t.add_argument("user")
    t.add_argument("--ttl", type=float, default=3600.0, metavar="SECONDS", help="lifetime (default 3600)")
    t.add_argument("--config", help="take [oauth] secret or secret_file from this TOML configuration")
    t.add_argument("--secret-file", help="file holding the shared secret")
    p.set_defaults(func=_cmd_oauth)


def _cmd_oauth(args: argparse.Namespace) -> int:
    from fastpop.config import Config, load_toml

    config = load_toml(args.config) if args.config else Config()
    if args.secret_file:
        config.oauth_secret_file = args.secret_file
    try:
        secret = read_secret(config)
    except ValueError as exc:
        print(f"fastpop: {exc}", file=sys.stderr)
        return 2
    print(make_token(secret, args.user, args.ttl))
    return 0
