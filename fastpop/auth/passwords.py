"""Dovecot-compatible ``{SCHEME}hash`` password strings: verify and create.

A passwd-file or SQL table written for Dovecot works unchanged.  Slow schemes
(argon2, bcrypt, the crypt family) are flagged so callers run them off the
event loop; fast ones (PLAIN, salted SHA) are cheap enough to run inline.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os

log = logging.getLogger("fastpop.auth")

DEFAULT_SCHEME = "ARGON2ID"
_PLAIN = frozenset({"PLAIN", "CLEAR", "CLEARTEXT"})
# scheme -> (hashlib name, salted)
_DIGESTS = {
    "SHA": ("sha1", False),
    "SHA1": ("sha1", False),
    "SHA256": ("sha256", False),
    "SHA512": ("sha512", False),
    "SSHA": ("sha1", True),
    "SSHA256": ("sha256", True),
    "SSHA512": ("sha512", True),
    "LDAP-MD5": ("md5", False),
    "SMD5": ("md5", True),
    "PLAIN-MD5": ("md5", False),  # hex by default, see _default_encoding
}
_CRYPT = frozenset(
    {"CRYPT", "DES-CRYPT", "MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT", "BLF-CRYPT", "ARGON2I", "ARGON2ID"}
)
SCHEMES = sorted(_PLAIN | set(_DIGESTS) | _CRYPT)


def split_scheme(stored: str) -> tuple[str, str]:
    """'{SHA512-CRYPT}$6$...' -> ('SHA512-CRYPT', '$6$...'); no prefix means CRYPT."""
    if stored.startswith("{"):
        close = stored.find("}")
        if close > 1:
            return stored[1:close].upper(), stored[close + 1 :]
    return "CRYPT", stored


def is_expensive(stored: str) -> bool:
    """True when verifying this hash is slow enough to belong in a thread."""
    scheme = split_scheme(stored)[0].split(".")[0]
    return scheme not in _PLAIN and scheme not in _DIGESTS


def plaintext(stored: str) -> str | None:
    """The plaintext password if it is stored in clear (needed for APOP)."""
    scheme, value = split_scheme(stored)
    return value if scheme in _PLAIN else None


def verify(stored: str, password: str) -> bool:
    """Check ``password`` against a stored ``{SCHEME}hash``.  Never raises."""
    try:
        return _verify(stored, password.encode("utf-8"))
    except Exception as exc:  # a malformed hash must fail closed, not crash
        log.warning("unusable password hash (%s): %s", split_scheme(stored)[0], type(exc).__name__)
        return False


def _verify(stored: str, password: bytes) -> bool:
    scheme, value = split_scheme(stored)
    if scheme in _PLAIN:
        return hmac.compare_digest(value.encode("utf-8"), password)
    base_scheme, _, encoding = scheme.partition(".")
    if base_scheme in _DIGESTS:
        algo, salted = _DIGESTS[base_scheme]
        raw = _decode(value, encoding or _default_encoding(base_scheme))
        size = hashlib.new(algo).digest_size
        digest, salt = raw[:size], raw[size:]
        if not salted and salt:
            return False
        return hmac.compare_digest(hashlib.new(algo, password + salt).digest(), digest)
    if scheme == "SCRAM-SHA-256":  # Dovecot: iter,salt,storedkey,serverkey
        from fastpop.auth.sasl import parse_scram_keys

        keys = parse_scram_keys(value)
        if keys is None:
            raise ValueError("malformed SCRAM-SHA-256 value")
        salt, stored_key, _server_key, iterations = keys
        salted_password = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        client_key = hmac.new(salted_password, b"Client Key", hashlib.sha256).digest()
        return hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key)
    if scheme in ("ARGON2I", "ARGON2ID") or value.startswith("$argon2"):
        import argon2

        try:
            return argon2.PasswordHasher().verify(value, password)
        except argon2.exceptions.VerificationError:
            return False
    if scheme == "BLF-CRYPT" or value.startswith(("$2a$", "$2b$", "$2y$")):
        import bcrypt

        # bcrypt uses 72 bytes at most; Dovecot's crypt_blowfish silently truncates,
        # bcrypt>=5 raises instead, so truncate as the hash's creator did.
        return bcrypt.checkpw(password[:72], value.encode("ascii"))
    if scheme in _CRYPT:
        from passlib.context import CryptContext

        return _crypt_context(CryptContext).verify(password, value)
    log.warning("unknown password scheme %s", scheme)
    return False


_CRYPT_CTX = None


def _crypt_context(factory):
    global _CRYPT_CTX
    if _CRYPT_CTX is None:
        _CRYPT_CTX = factory(schemes=["sha512_crypt", "sha256_crypt", "md5_crypt", "des_crypt"])
    return _CRYPT_CTX


def _default_encoding(scheme: str) -> str:
    return "HEX" if scheme == "PLAIN-MD5" else "B64"


def _decode(value: str, encoding: str) -> bytes:
    if encoding.upper() == "HEX":
        return bytes.fromhex(value)
    return base64.b64decode(value, validate=True)


def hash_password(password: str, scheme: str = DEFAULT_SCHEME) -> str:
    """Create a stored password string in the given scheme."""
    scheme = scheme.upper()
    pw = password.encode("utf-8")
    if scheme in _PLAIN:
        return "{PLAIN}" + password
    if scheme == "ARGON2ID":
        import argon2

        return "{ARGON2ID}" + argon2.PasswordHasher(type=argon2.Type.ID).hash(pw)
    if scheme == "ARGON2I":
        import argon2

        return "{ARGON2I}" + argon2.PasswordHasher(type=argon2.Type.I).hash(pw)
    if scheme == "BLF-CRYPT":
        import bcrypt

        return "{BLF-CRYPT}" + bcrypt.hashpw(pw[:72], bcrypt.gensalt(rounds=10)).decode("ascii")
    if scheme in ("SHA512-CRYPT", "SHA256-CRYPT"):
        from passlib.hash import sha256_crypt, sha512_crypt

        crypt = sha512_crypt if scheme == "SHA512-CRYPT" else sha256_crypt
        # 5000 rounds is what doveadm pw writes; passlib's default is far higher.
        return f"{{{scheme}}}{crypt.using(rounds=5000).hash(pw)}"
    if scheme in _DIGESTS and _DIGESTS[scheme][1]:
        algo = _DIGESTS[scheme][0]
        salt = os.urandom(8)
        digest = hashlib.new(algo, pw + salt).digest()
        encoded = base64.b64encode(digest + salt).decode("ascii")
        return f"{{{scheme}}}{encoded}"
    raise ValueError(f"cannot create passwords in scheme {scheme}")


CREATABLE_SCHEMES = ["ARGON2ID", "ARGON2I", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "SSHA512", "SSHA256", "PLAIN"]
