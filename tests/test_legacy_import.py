"""``fastpop import legacy``: the classic CodeProject server's folders become
Maildirs and passwd-file users, checked through a real server; ambiguous
input is refused before anything is written; ROOT is never touched."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support.server import ServerProcess

from fastpop.auth.passwd_file import read_records
from fastpop.auth.passwords import verify

T0 = 1_600_000_000  # mtimes of the legacy files: the order they were received in


def run_import(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastpop", "import", "legacy", *map(str, args)],
        capture_output=True,
        timeout=timeout,
        **kw,
    )


def make_user(root: Path, domain: str, user: str, password: str | None, messages: dict[str, bytes]) -> Path:
    folder = root / domain / user
    folder.mkdir(parents=True)
    if password is not None:
        (folder / f"{password}.pwd").write_bytes(b"")
    for i, (name, data) in enumerate(messages.items()):
        path = folder / name
        path.write_bytes(data)
        os.utime(path, ns=((T0 + i * 60) * 10**9, (T0 + i * 60) * 10**9))
    return folder


def legacy_message(n: int, lf: bool = False) -> bytes:
    text = f"From: sender{n}@example.org\r\nTo: someone\r\nSubject: legacy {n}\r\n\r\nBody {n}.\r\n.dot line\r\n"
    return text.replace("\r\n", "\n").encode() if lf else text.encode()


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything about ROOT that an import could change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture
def legacy(tmp_path):
    root = tmp_path / "legacy"
    make_user(root, "example.com", "alice", "Secr3t!", {
        "00000003.eml": legacy_message(3),  # names out of order: mtimes give the order
        "00000001.eml": legacy_message(1),
        "00000002.eml": legacy_message(2, lf=True),
    })
    make_user(root, "example.com", "bob", "hunter2", {})
    make_user(root, "example.org", "alice", "other pw", {"m.eml": legacy_message(9) + b"no final newline"})
    (root / "server.ini").write_text("[settings]\n")  # the old server's own file, not a domain
    return root


@pytest.fixture
def target(tmp_path):
    srv = ServerProcess(tmp_path / "fastpop", "cython")
    yield srv
    if srv.proc is not None:
        srv.stop()
    assert "Traceback" not in srv.log()


def import_into(srv: ServerProcess, root: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_import(root, "--passwd-file", srv.passwd, "--mail-root", srv.mail, *extra)


def fetch(srv: ServerProcess, name: str, password: str, delete: bool = False) -> list[bytes]:
    p = srv.connect()
    try:
        p.user(name)
        p.pass_(password)
        out = []
        for i in range(p.stat()[0]):
            lines = p.retr(i + 1)[1]
            out.append(b"\r\n".join(lines) + b"\r\n" if lines else b"")
            if delete:
                p.dele(i + 1)
    finally:
        p.quit()
    return out


def crlf(data: bytes) -> bytes:
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def test_import_then_pop3(legacy, target):
    before = snapshot(legacy)
    r = import_into(target, legacy)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    assert f"alice@example.com: 3 message(s) imported -> {target.mail}/example.com/alice (user added)" in out
    assert f"bob@example.com: 0 message(s) imported -> {target.mail}/example.com/bob (user added)" in out
    assert "alice@example.org: 1 message(s) imported" in out
    assert "imported 3 user(s) (3 new), 4 message(s); the source was not modified" in out
    assert f"ignoring {legacy}/server.ini (not a folder)" in err
    assert snapshot(legacy) == before

    records = {r.name: r for r in read_records(str(target.passwd))}
    assert sorted(records) == ["alice@example.com", "alice@example.org", "bob@example.com"]
    for name, pw in (("alice@example.com", "Secr3t!"), ("bob@example.com", "hunter2"),
                     ("alice@example.org", "other pw")):
        rec = records[name]
        assert rec.password.startswith("{ARGON2ID}$argon2id$")
        assert verify(rec.password, pw) and not verify(rec.password, pw + "x")
        local, domain = name.split("@")
        assert rec.extra == {"mail": f"maildir:{target.mail}/{domain}/{local}"}

    target.start()
    assert fetch(target, "alice@example.com", "Secr3t!") == [crlf(legacy_message(n, lf=(n == 2))) for n in (3, 1, 2)]
    assert fetch(target, "bob@example.com", "hunter2") == []
    assert fetch(target, "alice@example.org", "other pw") == [legacy_message(9) + b"no final newline\r\n"]
    for maildir in (target.mail / "example.com" / "alice").glob("cur/*"):
        size = int(maildir.name.split(",W=")[1].split(":")[0])
        assert size == maildir.stat().st_size


def test_second_run_imports_only_what_is_new(legacy, target):
    assert import_into(target, legacy).returncode == 0
    passwd_before = target.passwd.read_bytes()
    target.start()
    # alice fetches and deletes her mail; the old server then got one more message
    assert len(fetch(target, "alice@example.com", "Secr3t!", delete=True)) == 3
    newer = legacy / "example.com" / "alice" / "00000004.eml"
    newer.write_bytes(legacy_message(4))
    r = import_into(target, legacy)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "alice@example.com: 1 message(s) imported, 3 already there" in out
    assert "bob@example.com: 0 message(s) imported" in out and "(user exists)" in out
    assert "imported 3 user(s) (0 new), 1 message(s)" in out
    assert target.passwd.read_bytes() == passwd_before  # same users, same hashes
    assert fetch(target, "alice@example.com", "Secr3t!") == [legacy_message(4)]
    # and a third run changes nothing
    r = import_into(target, legacy)
    assert r.returncode == 0 and "imported 3 user(s) (0 new), 0 message(s)" in r.stdout.decode()
    assert fetch(target, "alice@example.com", "Secr3t!") == [legacy_message(4)]


def test_dry_run_writes_nothing(legacy, tmp_path):
    passwd, mail = tmp_path / "passwd", tmp_path / "mail"
    r = run_import(legacy, "--passwd-file", passwd, "--mail-root", mail, "--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    size = sum(len(crlf(legacy_message(n, lf=(n == 2)))) for n in (1, 2, 3))
    assert f"alice@example.com: 3 message(s), {size} bytes to import -> {mail}/example.com/alice (new user)" in out
    assert "would import 3 user(s) (3 new), 4 message(s)" in out
    assert not passwd.exists() and not mail.exists()


# -- refusals: a clear message, exit 1, nothing written


SECRET = b"root:$6$the-shadow-line-nobody-may-read:19000:0:99999:7:::\n"


def secret_file(root: Path) -> Path:
    """A file outside ROOT that the legacy users must never get into a Maildir."""
    path = root.parent / "shadow"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


REFUSALS = {
    "two pwd files": (lambda root: (root / "example.com" / "alice" / "other.pwd").write_bytes(b""),
                      "2 .pwd files (Secr3t!.pwd, other.pwd): which is the password?"),
    "no pwd file": (lambda root: (root / "example.com" / "bob" / "hunter2.pwd").unlink(),
                    "example.com/bob: no <password>.pwd file"),
    "pwd file with content": (lambda root: (root / "example.com" / "bob" / "hunter2.pwd").write_bytes(b"secret\n"),
                              "the .pwd file is not empty"),
    "empty password": (lambda root: (root / "example.com" / "bob" / "hunter2.pwd").rename(
                           root / "example.com" / "bob" / ".pwd"),
                       "empty password"),
    "sub-folder": (lambda root: (root / "example.com" / "alice" / "Sent").mkdir(),
                   "example.com/alice/Sent: a folder inside a user's folder"),
    "hidden file": (lambda root: (root / "example.com" / "alice" / ".DS_Store").write_bytes(b"x"),
                    "a hidden file"),
    "not a user name": (lambda root: make_user(root, "example.com", "john doe", "pw", {}),
                        "'john doe@example.com' cannot be a user name"),
    "names differing in case": (lambda root: make_user(root, "EXAMPLE.COM", "alice", "pw", {}),
                                "names differ only in case"),
    "symlinked user folder": (lambda root: (root / "example.com" / "carol").symlink_to(root / "example.com" / "bob"),
                              "example.com/carol: a symbolic link, not a folder"),
    "fifo": (lambda root: os.mkfifo(root / "example.com" / "alice" / "pipe"), "alice/pipe: not a regular file"),
    # a symbolic link is never followed, whatever it points at: inside ROOT or to a file only root may read
    "symlinked message file": (lambda root: (root / "example.com" / "alice" / "00000004.eml").symlink_to(
                                   secret_file(root)),
                               "alice/00000004.eml: not a regular file"),
    "symlinked domain folder": (lambda root: (root / "example.net").symlink_to(root / "example.com"),
                                "legacy/example.net: a symbolic link, not a folder"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refuses_ambiguous_input(legacy, tmp_path, case):
    change, expected = REFUSALS[case]
    change(legacy)
    before = snapshot(legacy)
    passwd, mail = tmp_path / "passwd", tmp_path / "mail"
    r = run_import(legacy, "--passwd-file", passwd, "--mail-root", mail)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert expected in err
    assert "nothing imported" in err and "Traceback" not in err
    assert not passwd.exists() and not mail.exists()
    assert snapshot(legacy) == before


def test_every_problem_is_listed(legacy, tmp_path):
    (legacy / "example.com" / "alice" / "x.pwd").write_bytes(b"")
    (legacy / "example.org" / "alice" / "sub").mkdir()
    r = run_import(legacy, "--passwd-file", tmp_path / "p", "--mail-root", tmp_path / "m")
    err = r.stderr.decode()
    assert r.returncode == 1
    assert "2 problem(s)" in err and "which is the password?" in err and "a folder inside" in err


def test_existing_user_with_another_password_or_mailbox(legacy, target):
    target.passwd.write_text("alice@example.com:{PLAIN}not the legacy one\n")
    r = import_into(target, legacy)
    assert r.returncode == 1
    assert "alice@example.com is already in" in r.stderr.decode()
    assert "no mail= field" in r.stderr.decode()
    target.passwd.write_text(f"alice@example.com:{{PLAIN}}other::::::mail=maildir:{target.mail}/example.com/alice\n")
    r = import_into(target, legacy)
    assert r.returncode == 1 and "with another password" in r.stderr.decode()
    assert target.passwd.read_text().count("\n") == 1 and not (target.mail / "example.com").exists()
    # the same password is no conflict: the user is kept as it is, the mail imported
    target.passwd.write_text(f"alice@example.com:{{PLAIN}}Secr3t!::::::mail=maildir:{target.mail}/example.com/alice\n")
    r = import_into(target, legacy)
    assert r.returncode == 0, r.stderr
    assert "alice@example.com: 3 message(s) imported" in r.stdout.decode() and "(user exists)" in r.stdout.decode()
    assert target.passwd.read_text().startswith("alice@example.com:{PLAIN}Secr3t!:")


def test_target_inside_root_is_refused(legacy, tmp_path):
    r = run_import(legacy, "--passwd-file", tmp_path / "p", "--mail-root", legacy / "maildirs")
    assert r.returncode == 1 and "is inside" in r.stderr.decode()
    assert not (legacy / "maildirs").exists() and not (tmp_path / "p").exists()
    r = run_import(tmp_path / "nope", "--passwd-file", tmp_path / "p", "--mail-root", tmp_path / "m")
    assert r.returncode == 1 and "is not a directory" in r.stderr.decode()


@pytest.fixture
def open_dir():
    path = Path(tempfile.mkdtemp(prefix="fastpop-legacy-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_unreadable_file_is_refused(open_dir):
    root = open_dir / "legacy"
    folder = make_user(root, "example.com", "alice", "pw", {"1.eml": legacy_message(1), "2.eml": legacy_message(2)})
    (folder / "2.eml").chmod(0o000)
    out = open_dir / "out"
    out.mkdir()
    args = [root, "--passwd-file", out / "passwd", "--mail-root", out / "mail"]
    if os.geteuid() == 0:  # root reads anything: run the import as nobody
        nobody = pwd.getpwnam("nobody")
        os.chown(out, nobody.pw_uid, nobody.pw_gid)
        code = (
            "import os, pwd, sys, argon2, fastpop.cli, fastpop.delivery.legacy_import, fastpop.auth.authenticator,"
            " fastpop.delivery.local, fastpop.auth.passwd_file, fastpop.auth.passwords, fastpop.store.maildir,"
            " hashlib, stat\n"
            "fastpop.cli.build_parser()  # imports every subcommand's module while still root\n"
            "n = pwd.getpwnam('nobody'); os.setgroups([]); os.setgid(n.pw_gid); os.setuid(n.pw_uid)\n"
            "sys.exit(fastpop.cli.main(['import', 'legacy', *sys.argv[1:]]))\n"
        )
        r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, timeout=60)
    else:
        r = run_import(*args)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "2.eml: cannot read: Permission denied" in err
    assert list(out.iterdir()) == []


# -- the files are opened once, without following symbolic links, and must be the ones checked


def contains_secret(top: Path) -> bool:
    return any(SECRET.strip() in p.read_bytes() for p in top.rglob("*") if p.is_file() and not p.is_symlink())


def swap_message_for_symlink(root: Path) -> None:
    secret = secret_file(root)
    msg = root / "example.com" / "alice" / "00000001.eml"
    msg.unlink()
    msg.symlink_to(secret)


def swap_message_for_another_file(root: Path) -> None:
    # same name, a regular file, but another inode (a hard link made after the check)
    secret = secret_file(root)  # first: the message's inode number is not free yet
    msg = root / "example.com" / "alice" / "00000001.eml"
    msg.unlink()
    os.link(secret, msg)


def swap_user_folder_for_symlink(root: Path) -> None:
    secret = secret_file(root)
    folder = root / "example.com" / "alice"
    elsewhere = root.parent / "elsewhere"
    folder.rename(elsewhere)
    (elsewhere / "00000001.eml").unlink()
    os.link(secret, elsewhere / "00000001.eml")
    folder.symlink_to(elsewhere)


def reuse_message_inode(root: Path) -> None:
    # the message deleted and a same-sized file created: it may well get the freed inode number
    msg = root / "example.com" / "alice" / "00000001.eml"
    size = msg.stat().st_size
    msg.unlink()
    secret = root.parent / "shadow"
    secret.write_bytes(SECRET.strip().ljust(size - 1, b"x") + b"\n")
    secret.chmod(0o600)
    os.link(secret, msg)


SWAPS = {
    "message becomes a symlink": (swap_message_for_symlink,
                                  "alice/00000001.eml: not the file that was checked (a symbolic link now)"),
    "message becomes another file": (swap_message_for_another_file,
                                     "alice/00000001.eml: not the file that was checked (another file now)"),
    "user folder becomes a symlink": (swap_user_folder_for_symlink,
                                      "example.com/alice: not the folder that was checked (a symbolic link now)"),
    "message inode reused": (reuse_message_inode, "alice/00000001.eml: not the file that was checked ("),
}


@pytest.mark.parametrize("case", list(SWAPS))
def test_file_swapped_between_check_and_copy_is_refused(legacy, tmp_path, monkeypatch, capsys, case):
    """The attack: a legacy user swaps a checked message for a link to a file
    only root may read after scan() checked it and before apply() copies it."""
    import fastpop.cli
    import fastpop.delivery.legacy_import as li

    swap, expected = SWAPS[case]
    real_scan = li.scan

    def scan_then_swap(*args, **kw):
        users = real_scan(*args, **kw)
        swap(legacy)
        return users

    monkeypatch.setattr(li, "scan", scan_then_swap)
    passwd, mail = tmp_path / "passwd", tmp_path / "mail"
    code = fastpop.cli.main(["import", "legacy", str(legacy), "--passwd-file", str(passwd), "--mail-root", str(mail)])
    out, err = capsys.readouterr()
    assert code == 1, err
    assert expected in err and "refused, not read" in err
    assert "stopped; running it again continues where it stopped" in err
    assert "Traceback" not in err and SECRET.strip().decode() not in out + err
    assert not contains_secret(mail)
    manifest = mail / "example.com" / "alice" / li.MANIFEST
    assert not manifest.exists() or "00000001.eml" not in manifest.read_text()


def test_symlinked_message_leaks_nothing(legacy, tmp_path):
    """A link present at the check is refused with everything else: nothing
    of what it points at is read, sized or copied."""
    swap_message_for_symlink(legacy)
    passwd, mail = tmp_path / "passwd", tmp_path / "mail"
    for extra in ((), ("--dry-run",)):
        r = run_import(legacy, "--passwd-file", passwd, "--mail-root", mail, *extra)
        err = r.stderr.decode()
        assert r.returncode == 1, err
        assert "alice/00000001.eml: not a regular file" in err and "nothing imported" in err
        assert SECRET.strip() not in r.stdout + r.stderr
        assert not passwd.exists() and not mail.exists()


def test_check_opens_without_following(legacy):
    """_open_checked refuses, without reading, whatever is not what was checked."""
    import fastpop.delivery.legacy_import as li

    folder = legacy / "example.com" / "alice"
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)

    def check(name: str, st: os.stat_result) -> int:
        return li._open_checked(dfd, name, str(folder / name), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    try:
        st = (folder / "00000001.eml").lstat()
        with open(check("00000001.eml", st), "rb") as f:
            assert f.read() == legacy_message(1)
        swap_message_for_symlink(legacy)
        with pytest.raises(li.Changed, match="a symbolic link now"):
            check("00000001.eml", st)
        (folder / "00000001.eml").unlink()
        os.mkfifo(folder / "00000001.eml")  # opened without blocking, never read
        with pytest.raises(li.Changed, match="not a regular file now"):
            check("00000001.eml", st)
        st2 = (folder / "00000002.eml").lstat()
        (folder / "00000002.eml").write_bytes(legacy_message(2) + b"more")  # same file, grown
        with pytest.raises(li.Changed, match="its size changed"):
            check("00000002.eml", st2)
        st3 = (folder / "00000003.eml").lstat()
        os.utime(folder / "00000003.eml", ns=(st3.st_atime_ns, st3.st_mtime_ns + 10**9))
        with pytest.raises(li.Changed, match="its modification time changed"):
            check("00000003.eml", st3)
    finally:
        os.close(dfd)
