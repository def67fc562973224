"""Unit tests of password schemes, the passwd-file, user names, mail locations,
configuration and Maildir naming."""

from __future__ import annotations

import base64
import hashlib
import os
import stat

import pytest

from fastpop.auth import passwords
from fastpop.auth.authenticator import MAX_USERNAME, expand_location, valid_username
from fastpop.auth.passwd_file import (
    PasswdFile,
    UserRecord,
    format_record,
    parse_line,
    read_records,
    write_records,
)
from fastpop.config import Config, load_toml
from fastpop.net import parse_address
from fastpop.serve.validation import validate_all
from fastpop.store.maildir_names import parse_name, uidl_of

pytestmark = pytest.mark.unit

PW = "correct hörse bättery ✓"

# ---------------------------------------------------------------- passwords: creatable schemes


@pytest.fixture(scope="module", params=passwords.CREATABLE_SCHEMES)
def created(request):
    scheme = request.param
    return scheme, passwords.hash_password(PW, scheme), passwords.hash_password(PW, scheme)


def test_creatable_scheme_prefix(created):
    scheme, stored, _ = created
    assert stored.startswith(f"{{{scheme}}}")
    assert passwords.split_scheme(stored)[0] == scheme


def test_creatable_scheme_verifies(created):
    scheme, stored, again = created
    assert passwords.verify(stored, PW) is True
    assert passwords.verify(again, PW) is True


def test_creatable_scheme_rejects_wrong(created):
    scheme, stored, _ = created
    wrong = ["", PW + " ", PW.upper(), "correct horse battery ✓"]
    if not passwords.is_expensive(stored):
        wrong += ["x", PW[:-1], " " + PW]
    for candidate in wrong:
        assert passwords.verify(stored, candidate) is False, candidate


def test_creatable_scheme_is_salted(created):
    scheme, stored, again = created
    if scheme == "PLAIN":
        assert stored == again == "{PLAIN}" + PW
    else:
        assert stored != again


def test_creatable_scheme_expense(created):
    scheme, stored, _ = created
    expected = scheme not in ("PLAIN", "SSHA256", "SSHA512")
    assert passwords.is_expensive(stored) is expected


@pytest.mark.parametrize("scheme", [s for s in passwords.CREATABLE_SCHEMES if s != "PLAIN"])
def test_creatable_scheme_damaged_hash_fails_closed(scheme):
    stored = passwords.hash_password(PW, scheme)
    prefix, value = f"{{{scheme}}}", stored[len(scheme) + 2 :]
    damaged = [value[: len(value) // 2], value[:-3], value + "!!", "", "$", "garbage"]
    if "$" in value:
        damaged.append(value.replace("$", "%"))
    for broken in damaged:
        assert broken != value
        assert passwords.verify(prefix + broken, PW) is False, broken


def test_hash_password_scheme_case_and_aliases():
    assert passwords.hash_password("a b", "clear") == "{PLAIN}a b"
    assert passwords.hash_password("a b", "CLEARTEXT") == "{PLAIN}a b"
    stored = passwords.hash_password("pw", "ssha256")
    assert stored.startswith("{SSHA256}")
    assert passwords.verify(stored, "pw")


@pytest.mark.parametrize("scheme", ["SHA256", "SHA", "PLAIN-MD5", "NOPE", "", "MD5-CRYPT"])
def test_hash_password_refuses_uncreatable(scheme):
    with pytest.raises(ValueError):
        passwords.hash_password("pw", scheme)


def test_ssha_layout():
    stored = passwords.hash_password("pw", "SSHA512")
    raw = base64.b64decode(stored[len("{SSHA512}") :])
    digest, salt = raw[:64], raw[64:]
    assert len(salt) > 0
    assert hashlib.sha512(b"pw" + salt).digest() == digest


# ---------------------------------------------------------------- passwords: Dovecot strings


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


SALT = bytes(range(1, 9))


@pytest.mark.parametrize(
    "scheme, algo, salted",
    [
        ("SSHA256", "sha256", True),
        ("SSHA512", "sha512", True),
        ("SSHA", "sha1", True),
        ("SMD5", "md5", True),
        ("SHA256", "sha256", False),
        ("SHA512", "sha512", False),
        ("SHA", "sha1", False),
        ("SHA1", "sha1", False),
        ("LDAP-MD5", "md5", False),
    ],
)
def test_dovecot_digest_schemes(scheme, algo, salted):
    pw = "pässwörd with spaces"
    salt = SALT if salted else b""
    digest = hashlib.new(algo, pw.encode() + salt).digest()
    stored = f"{{{scheme}}}{b64(digest + salt)}"
    assert passwords.verify(stored, pw) is True
    assert passwords.verify(stored, pw + "x") is False
    assert passwords.is_expensive(stored) is False
    # hex encoding variant
    hexed = f"{{{scheme}.HEX}}{(digest + salt).hex()}"
    assert passwords.verify(hexed, pw) is True
    assert passwords.verify(hexed, "nope") is False
    # lower-case scheme name
    assert passwords.verify(f"{{{scheme.lower()}}}{b64(digest + salt)}", pw) is True
    if not salted:  # an unsalted scheme must not treat trailing octets as a salt
        salted_digest = hashlib.new(algo, pw.encode() + SALT).digest()
        assert passwords.verify(f"{{{scheme}}}{b64(salted_digest + SALT)}", pw) is False
        assert passwords.verify(f"{{{scheme}}}{b64(digest + b'XX')}", pw) is False


def test_dovecot_ssha256_known_vector():
    # base64(sha256("secret" + salt) + salt), salt a1b2c3d4e5f60718, as doveadm pw -s SSHA256 writes
    stored = "{SSHA256}p+aHVuiFSdLX1qJn8TeQUVO4cat3G3j/BxJeuqkfJ2ChssPU5fYHGA=="
    salt = bytes.fromhex("a1b2c3d4e5f60718")
    assert stored == "{SSHA256}" + b64(hashlib.sha256(b"secret" + salt).digest() + salt)
    assert passwords.verify(stored, "secret") is True
    assert passwords.verify(stored, "Secret") is False
    assert passwords.verify(stored, "secret ") is False
    assert passwords.verify(stored, "") is False


def test_dovecot_plain_md5_is_hex():
    stored = "{PLAIN-MD5}" + hashlib.md5(b"pw").hexdigest()
    assert passwords.verify(stored, "pw")
    assert not passwords.verify(stored, "pW")


# Test vectors of the SHA-crypt specification (Drepper), "Hello world!" / "saltstring".
SHA512_VECTOR = "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"
SHA512_VECTOR_ROUNDS = (
    "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v."
)
SHA256_VECTOR = "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"


@pytest.mark.parametrize("value", [SHA512_VECTOR, SHA512_VECTOR_ROUNDS])
def test_dovecot_sha512_crypt_vectors(value):
    stored = "{SHA512-CRYPT}" + value
    assert passwords.verify(stored, "Hello world!") is True
    assert passwords.verify(stored, "Hello world") is False
    assert passwords.is_expensive(stored) is True
    # Dovecot also accepts crypt strings with no scheme prefix (CRYPT)
    assert passwords.verify(value, "Hello world!") is True


def test_dovecot_sha512_crypt_computed():
    from passlib.hash import sha512_crypt

    value = sha512_crypt.using(salt="Zx9.abc/", rounds=5000).hash("pä ss")
    assert value.startswith("$6$Zx9.abc/$")
    assert passwords.verify("{SHA512-CRYPT}" + value, "pä ss")
    assert not passwords.verify("{SHA512-CRYPT}" + value, "pa ss")


def test_dovecot_sha256_crypt_vector():
    assert passwords.verify("{SHA256-CRYPT}" + SHA256_VECTOR, "Hello world!")
    assert not passwords.verify("{SHA256-CRYPT}" + SHA256_VECTOR, "hello world!")


def test_dovecot_md5_crypt():
    from passlib.hash import md5_crypt

    value = md5_crypt.using(salt="abcdefgh").hash("pw")
    assert passwords.verify("{MD5-CRYPT}" + value, "pw")
    assert not passwords.verify("{MD5-CRYPT}" + value, "px")


@pytest.mark.parametrize("prefix", ["$2y$", "$2a$", "$2b$"])
def test_dovecot_blf_crypt(prefix):
    import bcrypt

    made = bcrypt.hashpw(PW.encode(), bcrypt.gensalt(rounds=4)).decode("ascii")
    assert made.startswith("$2b$")
    value = prefix + made[4:]
    stored = "{BLF-CRYPT}" + value
    assert passwords.verify(stored, PW) is True
    assert passwords.verify(stored, PW + "!") is False
    assert passwords.is_expensive(stored) is True
    assert passwords.verify(value, PW) is True  # no prefix


def test_dovecot_blf_crypt_password_longer_than_72_bytes():
    """bcrypt (and so Dovecot's BLF-CRYPT) only uses the first 72 octets of a
    password; a hash Dovecot made for a longer password must still verify."""
    import bcrypt

    long_pw = "a-long-passphrase-" * 6  # 108 octets
    assert len(long_pw.encode()) > 72
    value = bcrypt.hashpw(long_pw.encode()[:72], bcrypt.gensalt(rounds=4)).decode("ascii")
    stored = "{BLF-CRYPT}$2y$" + value[4:]
    assert passwords.verify(stored, long_pw) is True
    assert passwords.verify(stored, long_pw[:72]) is True  # as with Dovecot: octets past 72 do not count
    assert passwords.verify(stored, "b" + long_pw[1:]) is False


def test_blf_crypt_hash_of_password_longer_than_72_bytes():
    long_pw = "ä" * 50  # 100 octets
    stored = passwords.hash_password(long_pw, "BLF-CRYPT")
    assert passwords.verify(stored, long_pw) is True
    assert passwords.verify(stored, "ö" + long_pw[1:]) is False


def test_dovecot_argon2_strings():
    import argon2

    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1, type=argon2.Type.ID)
    value = hasher.hash("pw")
    assert passwords.verify("{ARGON2ID}" + value, "pw")
    assert not passwords.verify("{ARGON2ID}" + value, "pW")
    assert passwords.verify(value, "pw")  # recognised by its $argon2 prefix
    i_value = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1, type=argon2.Type.I).hash("pw")
    assert passwords.verify("{ARGON2I}" + i_value, "pw")


@pytest.mark.parametrize(
    "stored, good",
    [
        ("{PLAIN}with some spaces", "with some spaces"),
        ("{PLAIN}  leading and trailing  ", "  leading and trailing  "),
        ("{PLAIN}pässwörd ☃ 日本", "pässwörd ☃ 日本"),
        ("{CLEAR}x y", "x y"),
        ("{CLEARTEXT}x y", "x y"),
        ("{plain}lower", "lower"),
        ("{PLAIN}with}brace{", "with}brace{"),
    ],
)
def test_dovecot_plain(stored, good):
    assert passwords.verify(stored, good) is True
    assert passwords.verify(stored, good.strip() + "x") is False
    assert passwords.verify(stored, good.upper() if good != good.upper() else good.lower()) is False
    assert passwords.is_expensive(stored) is False
    assert passwords.plaintext(stored) == good


def test_plain_compares_exact_codepoints():
    import unicodedata

    nfc = "pässwörd"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    assert passwords.verify("{PLAIN}" + nfc, nfc)
    assert not passwords.verify("{PLAIN}" + nfc, nfd)


@pytest.mark.parametrize(
    "stored",
    [
        "{SSHA256}!!!not base64!!!",
        "{SSHA256}" + b64(b"short"),
        "{SSHA256}",
        "{SHA256.HEX}zz",
        "{SSHA512.B64}@@",
        "{PLAIN-MD5}not-hex",
        "{SHA512-CRYPT}garbage",
        "{SHA512-CRYPT}$6$",
        "{SHA512-CRYPT}" + SHA512_VECTOR[:-10],
        "{SHA256-CRYPT}$5$x",
        "{BLF-CRYPT}junk",
        "{BLF-CRYPT}$2y$10$short",
        "{BLF-CRYPT}$2y$99$" + "a" * 53,
        "{ARGON2ID}junk",
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c29tZXNhbHQ$junk",
        "{ARGON2I}",
        "{MD5-CRYPT}$1$",
        "{CRYPT}",
        "{DES-CRYPT}!",
        "{UNKNOWN-SCHEME}pw",
        "{}pw",
        "{",
        "",
        "$9$strange",
        "\x00\xff",
    ],
)
def test_malformed_hash_fails_closed(stored):
    assert passwords.verify(stored, "pw") is False
    assert passwords.verify(stored, "") is False


def test_is_expensive():
    assert passwords.is_expensive("{PLAIN}x") is False
    assert passwords.is_expensive("{CLEARTEXT}x") is False
    assert passwords.is_expensive("{SSHA256}abc") is False
    assert passwords.is_expensive("{ssha512.hex}abc") is False
    assert passwords.is_expensive("{SHA}abc") is False
    assert passwords.is_expensive("{PLAIN-MD5}abc") is False
    assert passwords.is_expensive("{SHA512-CRYPT}$6$x$y") is True
    assert passwords.is_expensive("{BLF-CRYPT}$2y$...") is True
    assert passwords.is_expensive("{ARGON2ID}$argon2id$...") is True
    assert passwords.is_expensive("$6$salt$hash") is True  # bare crypt string


def test_plaintext():
    assert passwords.plaintext("{PLAIN}a b c") == "a b c"
    assert passwords.plaintext("{CLEAR}x") == "x"
    assert passwords.plaintext("{PLAIN}") == ""
    assert passwords.plaintext("{SSHA256}abc") is None
    assert passwords.plaintext("{PLAIN-MD5}abc") is None
    assert passwords.plaintext("plain-looking-but-crypt") is None
    assert passwords.plaintext("{ARGON2ID}$argon2id$x") is None


def test_split_scheme():
    assert passwords.split_scheme("{sha512-crypt}$6$x") == ("SHA512-CRYPT", "$6$x")
    assert passwords.split_scheme("$6$x") == ("CRYPT", "$6$x")
    assert passwords.split_scheme("{}x") == ("CRYPT", "{}x")
    assert passwords.split_scheme("{PLAIN}a}b") == ("PLAIN", "a}b")


# ---------------------------------------------------------------- passwd-file

DOVECOT_LINE = "user:{PLAIN}pw:1000:1000::/home/u::userdb_mail=maildir:/x"


def test_parse_dovecot_eight_fields():
    rec = parse_line(DOVECOT_LINE)
    assert rec == UserRecord(
        name="user", password="{PLAIN}pw", uid=1000, gid=1000, home="/home/u", extra={"userdb_mail": "maildir:/x"}
    )
    assert format_record(rec) == DOVECOT_LINE
    assert parse_line(DOVECOT_LINE + "\n") == rec
    assert parse_line(DOVECOT_LINE + "\r\n") == rec


def test_parse_minimal_line():
    rec = parse_line("bob:{SHA512-CRYPT}$6$salt$hash")
    assert rec.name == "bob"
    assert rec.password == "{SHA512-CRYPT}$6$salt$hash"
    assert rec.uid is None and rec.gid is None and rec.home is None
    assert rec.extra == {}
    assert format_record(rec) == "bob:{SHA512-CRYPT}$6$salt$hash"


def test_parse_plain_password_with_spaces():
    rec = parse_line("carol:{PLAIN}a b  c ::\n")
    assert rec.password == "{PLAIN}a b  c "
    assert passwords.verify(rec.password, "a b  c ")


def test_parse_extra_fields():
    rec = parse_line("d@example.com:{PLAIN}x:::::: userdb_mail=maildir:~/Mail  nopassword allow_nets=10.0.0.0/8")
    assert rec.name == "d@example.com"
    assert rec.extra == {"userdb_mail": "maildir:~/Mail", "nopassword": "", "allow_nets": "10.0.0.0/8"}
    again = parse_line(format_record(rec))
    assert again == rec


@pytest.mark.parametrize("line", ["", "\n", "   \n", "# comment", "   # indented comment", "#user:{PLAIN}x"])
def test_parse_blank_and_comments(line):
    assert parse_line(line) is None


@pytest.mark.parametrize("line", [":{PLAIN}x", ":", "u:pw:notanumber", "u:pw:1:x"])
def test_parse_bad_lines(line):
    with pytest.raises(ValueError):
        parse_line(line)


@pytest.mark.parametrize(
    "rec",
    [
        UserRecord("a", "{PLAIN}x"),
        UserRecord("a", "{PLAIN}x y", uid=5),
        UserRecord("a", "{PLAIN}x", gid=7),
        UserRecord("a@b.c", "{SSHA256}abc=", uid=0, gid=0),
        UserRecord("a", "{PLAIN}x", home="/home/a"),
        UserRecord("a", "{PLAIN}x", extra={"userdb_mail": "maildir:/var/mail/a:LAYOUT=fs"}),
        UserRecord("a", "{PLAIN}x", 1, 2, "/h", {"k": "v", "flag": ""}),
        UserRecord("a", ""),
    ],
)
def test_format_parse_round_trip(rec):
    line = format_record(rec)
    assert "\n" not in line
    assert parse_line(line) == rec
    assert format_record(parse_line(line)) == line


def test_write_and_read_records(tmp_path):
    path = str(tmp_path / "passwd")
    assert read_records(path) == []
    recs = [parse_line(DOVECOT_LINE), UserRecord("b", "{PLAIN}p w"), UserRecord("c", "{PLAIN}z", uid=3)]
    write_records(path, recs)
    assert read_records(path) == recs
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p for p in os.listdir(tmp_path) if p != "passwd"] == []  # no temp file left behind


def _set_mtime(path, ns):
    os.utime(path, ns=(ns, ns))


def test_passwd_file_reloads_when_changed(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("# users\nalice:{PLAIN}one\n\nbob:{PLAIN}two\n")
    base = 1_700_000_000 * 10**9
    _set_mtime(path, base)
    db = PasswdFile(str(path))
    assert len(db) == 2
    assert db.lookup("alice").password == "{PLAIN}one"
    assert db.lookup("nobody") is None
    assert db.reload_if_changed() is False

    # a new user: the size changes
    with open(path, "a") as f:
        f.write("carol:{PLAIN}three\n")
    _set_mtime(path, base)
    assert db.lookup("carol").password == "{PLAIN}three"
    assert len(db) == 3

    # same size, new mtime
    path.write_text(path.read_text().replace("{PLAIN}one", "{PLAIN}uno"))
    _set_mtime(path, base + 10**9)
    assert db.lookup("alice").password == "{PLAIN}uno"

    # atomic replacement by write_records, user removed
    write_records(str(path), [UserRecord("bob", "{PLAIN}two")])
    _set_mtime(path, base + 2 * 10**9)
    assert db.lookup("alice") is None
    assert db.lookup("bob").password == "{PLAIN}two"
    assert len(db) == 1
    assert db.reload_if_changed() is False


def test_passwd_file_bad_line_is_logged_with_position_and_skipped(tmp_path, caplog):
    """As Dovecot: a malformed line is logged (where, whose, why; never the
    field's value, which may be part of a password) and skipped; the other
    users are still there."""
    path = tmp_path / "passwd"
    path.write_text("ok:{PLAIN}x\nbad:{PLAIN}y:notanumber\nalso:{PLAIN}z\n")
    with caplog.at_level("ERROR", logger="fastpop.auth"):
        db = PasswdFile(str(path))
    assert db.lookup("ok").password == "{PLAIN}x" and db.lookup("also").password == "{PLAIN}z"
    assert db.lookup("bad") is None and len(db) == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"passwd-file line skipped: {path}:2 (user 'bad'): uid is not a number"]


def test_passwd_file_missing(tmp_path):
    with pytest.raises(OSError):
        PasswdFile(str(tmp_path / "absent"))


# ---------------------------------------------------------------- user names


@pytest.mark.parametrize(
    "name",
    [
        "alice", "a", "Bob", "user1", "first.last", "first_last", "first-last", "x+tag",
        "alice@example.com", "a.b@mail.example.co.uk", "u@localhost", "x" * MAX_USERNAME,
        "o'brien", "a=b",
        # RFC 6856 (UTF8): letters, marks and digits beyond ASCII
        "jörg", "Jörg@bücher.example", "用户", "δοκιμή@παράδειγμα.δοκιμή", "ü" * (MAX_USERNAME // 2),
    ],
)
def test_valid_usernames(name):
    assert valid_username(name) is True


@pytest.mark.parametrize(
    "name",
    [
        "", "../x", "..", ".", "a/b", "/abs", "a\\b", "a\x00b", ".hidden", "a..b", "a@b..c",
        "a b", " a", "a ", "a\tb", "a\nb", "a\n", "a\r", "x" * (MAX_USERNAME + 1), "a@", "@b",
        "a@b@c", "a@.b", "a@-b", "a:b", "a@b/c", "a@../b",
        # beyond ASCII, no punctuation, symbols, spaces or invisible characters
        # (no look-alike of "/" or "."), and at most MAX_USERNAME octets
        "a\uff0fb", "..\uff0fx", "a\u2215b", "a\u2044b", "\uff0e\uff0e", "a\u3002b", "a\u200bb",
        "a\u00a0b", "a\u202eb", "\u00e9" * (MAX_USERNAME // 2 + 1),
    ],
)
def test_invalid_usernames(name):
    assert valid_username(name) is False


# ---------------------------------------------------------------- mail location

BOB = UserRecord("bob@example.com", "{PLAIN}x", home="/home/bob")
ALICE = UserRecord("alice", "{PLAIN}x")


@pytest.mark.parametrize(
    "template, user, want",
    [
        ("/var/mail/%u", BOB, "/var/mail/bob@example.com"),
        ("/var/mail/%d/%n", BOB, "/var/mail/example.com/bob"),
        ("/var/mail/%n", ALICE, "/var/mail/alice"),
        ("%h/Maildir", BOB, "/home/bob/Maildir"),
        ("~/Maildir", BOB, "/home/bob/Maildir"),
        ("/m/100%%/%u", ALICE, "/m/100%/alice"),
        ("/m/%%u", ALICE, "/m/%u"),
        ("maildir:/var/mail/%u", ALICE, "/var/mail/alice"),
        ("maildir:%h/Maildir:LAYOUT=fs:INBOX=/x", BOB, "/home/bob/Maildir"),
        ("maildir:~/Maildir", BOB, "/home/bob/Maildir"),
        ("/var/mail/%d/%n/", BOB, "/var/mail/example.com/bob"),
    ],
)
def test_expand_location(template, user, want):
    assert expand_location(template, user) == want


@pytest.mark.parametrize("template", ["/m/%x", "/m/%U", "/m/%{user}", "/m/%1", "/m/% "])
def test_expand_location_refuses_unknown_variables(template):
    with pytest.raises(ValueError):
        expand_location(template, BOB)


def test_expand_location_home_required_for_h():
    with pytest.raises(ValueError):
        expand_location("%h/Maildir", ALICE)


# ---------------------------------------------------------------- configuration


def write_toml(tmp_path, text: str) -> str:
    path = tmp_path / "fastpop.toml"
    path.write_text(text)
    return str(path)


def test_load_toml_applies_every_section(tmp_path):
    path = write_toml(
        tmp_path,
        """
[server]
listen = ["0.0.0.0:110", "[::]:110"]
loop = "asyncio"
log_level = "debug"
hostname = "mail.example.com"
max_bad_commands = 5

[auth]
passwd_file = "/etc/fastpop/passwd"
failure_delay = 1
max_attempts = 4

[mail]
location = "/var/mail/%d/%n"

[timeouts]
authorization = 30
transaction = 900.5

[pop3]
expire = "30"
login_delay = 60
""",
    )
    c = load_toml(path)
    assert c.listen == ["0.0.0.0:110", "[::]:110"]
    assert c.loop == "asyncio"
    assert c.log_level == "debug"
    assert c.hostname == "mail.example.com"
    assert c.max_bad_commands == 5
    assert c.passwd_file == "/etc/fastpop/passwd"
    assert c.auth_failure_delay == 1.0 and isinstance(c.auth_failure_delay, float)
    assert c.auth_max_attempts == 4
    assert c.mail_location == "/var/mail/%d/%n"
    assert c.timeout_authorization == 30.0 and isinstance(c.timeout_authorization, float)
    assert c.timeout_transaction == 900.5
    assert c.expire == "30"
    assert c.login_delay == 60
    validate_all(c)


def test_load_toml_partial_keeps_defaults(tmp_path):
    defaults = Config()
    path = write_toml(tmp_path, '[server]\nlisten = "127.0.0.1:1110"\n')
    c = load_toml(path)
    assert c.listen == ["127.0.0.1:1110"]
    assert c.loop == defaults.loop
    assert c.mail_location == defaults.mail_location
    assert c.timeout_transaction == defaults.timeout_transaction


def test_load_toml_onto_existing_config(tmp_path):
    base = Config(passwd_file="/p", loop="asyncio")
    path = write_toml(tmp_path, "[mail]\nlocation = '/m/%u'\n")
    c = load_toml(path, base)
    assert c is base
    assert (c.passwd_file, c.loop, c.mail_location) == ("/p", "asyncio", "/m/%u")


def test_load_toml_empty_file(tmp_path):
    assert load_toml(write_toml(tmp_path, "")) == Config()


@pytest.mark.parametrize(
    "text",
    [
        "[server]\nlisen = ['0.0.0.0:110']\n",
        "[auth]\npasswd = '/x'\n",
        "[mail]\nlocation = '/x'\ndriver = 'mbox'\n",
        "[serve]\nlisten = ['0.0.0.0:110']\n",
        "[timeouts]\nidle = 5\n",
        "[pop3]\nEXPIRE = 'NEVER'\n",
        "listen = '0.0.0.0:110'\n",
    ],
)
def test_load_toml_rejects_unknown_keys(tmp_path, text):
    with pytest.raises(ValueError):
        load_toml(write_toml(tmp_path, text))


def test_load_toml_rejects_bad_toml(tmp_path):
    with pytest.raises(ValueError):  # tomllib.TOMLDecodeError is a ValueError
        load_toml(write_toml(tmp_path, "[server\n"))


def test_load_toml_missing_file(tmp_path):
    with pytest.raises(OSError):
        load_toml(str(tmp_path / "missing.toml"))


@pytest.mark.parametrize(
    "text",
    [
        "[auth]\npasswd_file = '/p'\nmax_attempts = '3'\n",
        "[auth]\npasswd_file = '/p'\n[timeouts]\ntransaction = '600'\n",
        "[auth]\npasswd_file = '/p'\n[server]\nlisten = 110\n",
    ],
)
def test_config_with_wrong_value_type_is_a_value_error(tmp_path, text):
    """The CLI reports ValueError/OSError as a one-line error; a wrongly typed
    setting must end up as one of those, not as a traceback."""
    with pytest.raises(ValueError):
        validate_all(load_toml(write_toml(tmp_path, text)))


def test_validate():
    validate_all(Config(passwd_file="/p"))
    with pytest.raises(ValueError):
        validate_all(Config())  # no passwd_file
    with pytest.raises(ValueError):
        validate_all(Config(passwd_file="/p", loop="trio"))
    with pytest.raises(ValueError):
        validate_all(Config(passwd_file="/p", auth_max_attempts=0))
    with pytest.raises(ValueError):
        validate_all(Config(passwd_file="/p", expire="soon"))
    with pytest.raises(ValueError):
        validate_all(Config(passwd_file="/p", listen=["nohost"]))
    validate_all(Config(passwd_file="/p", expire="never"))


@pytest.mark.parametrize(
    "text, want",
    [
        ("127.0.0.1:110", ("127.0.0.1", 110)),
        ("0.0.0.0:995", ("0.0.0.0", 995)),
        ("[::1]:110", ("::1", 110)),
        ("[::]:0", ("::", 0)),
        (":110", ("0.0.0.0", 110)),
        ("mail.example.com:65535", ("mail.example.com", 65535)),
    ],
)
def test_parse_address(text, want):
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["110", "localhost", "host:", "host:65536", "host:-1", "host:http", "", ":", "h: 1"])
def test_parse_address_refuses(text):
    with pytest.raises(ValueError):
        parse_address(text)


# ---------------------------------------------------------------- Maildir names


@pytest.mark.parametrize(
    "name, want",
    [
        ("1700000001.M1P2.host,S=100,W=102:2,S", ("1700000001.M1P2.host", 100, 102)),
        ("1700000001.M1P2.host,S=100:2,", ("1700000001.M1P2.host", 100, -1)),
        ("1700000001.M1P2.host,W=7", ("1700000001.M1P2.host", -1, 7)),
        ("1700000001.M1P2.host", ("1700000001.M1P2.host", -1, -1)),
        ("1700000001.M1P2.host:2,RS", ("1700000001.M1P2.host", -1, -1)),
        ("u,S=abc,W=", ("u", -1, -1)),
        ("u,S=-5,W=12x", ("u", -1, -1)),
        ("u,W=0,S=0", ("u", 0, 0)),
        ("u,X=1,S=9:2,W=50", ("u", 9, -1)),  # W= after ":" is in the info part, not the name
    ],
)
def test_parse_name(name, want):
    assert parse_name(name) == want


def md5hex(text: str) -> str:
    return hashlib.md5(text.encode("utf-8", "surrogateescape")).hexdigest()


@pytest.mark.parametrize(
    "name, want",
    [
        ("1700000001.M1P2.host,S=100,W=102:2,S", "1700000001.M1P2.host"),
        ("1700000001.M1P2.host:2,", "1700000001.M1P2.host"),
        ("plain", "plain"),
        ("!", "!"),
        ("~" * 70, "~" * 70),
        ("x" * 70 + ",S=1:2,", "x" * 70),
        ("x" * 71, md5hex("x" * 71)),
        ("has space", md5hex("has space")),
        ("tab\there", md5hex("tab\there")),
        ("del\x7f", md5hex("del\x7f")),
        ("jörg", md5hex("jörg")),
        ("undecodable\udcff", md5hex("undecodable\udcff")),
        (":2,S", md5hex("")),
        (",S=5", md5hex("")),
    ],
)
def test_uidl_of(name, want):
    got = uidl_of(name)
    assert got == want
    assert 1 <= len(got) <= 70
    assert all(0x21 <= ord(c) <= 0x7E for c in got)


def test_uidl_is_stable_across_flag_changes_and_distinct():
    base = "1700000001.M1P2.host,S=10"
    assert uidl_of(base + ":2,") == uidl_of(base + ":2,S") == uidl_of(base + ":2,RST")
    assert uidl_of("a" * 71) != uidl_of("a" * 72)
    assert uidl_of("a b") != uidl_of("a  b")
