"""``fastpop import legacy ROOT``: move users off the classic CodeProject POP3 server.

That server keeps one folder per user, ``ROOT/<domain>/<user>/``, holding the
user's messages, one file each, and an empty file ``<password>.pwd`` whose
name is the password.  The import makes each folder a user ``user@domain``
in a passwd-file (the password hashed with argon2id, the Maildir named in
the ``mail`` field) and stores every message in
``MAIL_ROOT/<domain>/<user>`` through ``fastpop.delivery.local``, in the order of
the files' modification times.

It reads ROOT and never writes there.  Everything is checked before anything
is written: anything ambiguous (no or two .pwd files, a .pwd file that is not
empty, a sub-folder, a hidden or unreadable file, a name that cannot be a
user, a user already in the passwd-file with another password or mailbox)
is listed and nothing is imported.  Running it again imports only what is
new: each Maildir keeps a list of the files it got (``fastpop-legacy-import``:
SHA-256, path below ROOT, Maildir name), so messages already fetched and
deleted over POP3 do not come back.

The legacy users can write in their folders while this runs, so nothing in
ROOT is reached through a symbolic link: folders and files are opened relative
to their folder's descriptor with O_NOFOLLOW, a file is read only from a
descriptor whose fstat is the file that was checked (a regular file, same
device, inode, size and modification time), and anything that changed is
refused, never read.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import stat
import sys
from dataclasses import dataclass, field

MANIFEST = "fastpop-legacy-import"
PWD_SUFFIX = ".pwd"
# a message file is read whole (hashed, then stored): a larger one is refused,
# never read, as its user may make it as large as the disk (import mbox's default)
MAX_MESSAGE = 256 * 1024 * 1024

# a message file: never through a symbolic link, never blocking on a FIFO or
# device swapped in, never becoming a controlling terminal
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
# a domain or user folder below ROOT
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass
class Message:
    path: str  # absolute
    rel: str  # below ROOT, the manifest key
    mtime_ns: int
    sha256: str
    size: int  # as stored (CRLF)
    # the file that was checked: the copy reads only this very file
    dev: int = -1
    ino: int = -1
    st_size: int = -1  # in ROOT, as it was read


@dataclass
class LegacyUser:
    name: str  # user@domain
    folder: str
    password: str
    maildir: str
    messages: list[Message] = field(default_factory=list)
    exists: bool = False  # already in the passwd-file with this password and Maildir
    done: set[tuple[str, str]] = field(default_factory=set)  # (sha256, rel) imported before
    source: tuple[str, str, str] = ("", "", "")  # ROOT, domain, user: the folder, reopened without symlinks

    def todo(self) -> list[Message]:
        return [m for m in self.messages if (m.sha256, m.rel) not in self.done]


class Refused(Exception):
    """Something ambiguous or unreadable; the message says what and where."""


class Changed(OSError):
    """A file or folder of ROOT is not the one that was checked (swapped for a
    symbolic link or another file, or its size or time changed): refused, not read."""


def _open_checked(dir_fd: int, name: str, path: str, dev: int, ino: int, size: int, mtime_ns: int) -> int:
    """Open the message file ``name`` of the folder ``dir_fd`` (``path`` for
    messages) once, without following a symbolic link, and return the
    descriptor only if it is the regular file (dev, ino) of ``size`` bytes
    and modification time ``mtime_ns`` that was checked (the time too: an
    inode number freed by a deleted message can come back as another file);
    else raise Changed, nothing read.  Other failures to open raise the plain
    OSError."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Changed(f"{path}: not the file that was checked (a symbolic link now); refused, not read") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            why = "not a regular file now"
        elif (st.st_dev, st.st_ino) != (dev, ino):
            why = "another file now"
        elif st.st_size != size:
            why = f"its size changed from {size} to {st.st_size} bytes"
        elif st.st_mtime_ns != mtime_ns:
            why = "its modification time changed"
        else:
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    raise Changed(f"{path}: not the file that was checked ({why}); refused, not read")


def _read_fd(fd: int, size: int, path: str) -> bytes:
    """The ``size`` bytes of ``fd`` (closed afterwards), the size it was checked
    at: Changed if it grew or shrank meanwhile (its owner may still be writing
    it), never read past that into memory."""
    with open(fd, "rb", closefd=True) as f:
        data = f.read(size + 1)
    if len(data) != size:
        raise Changed(f"{path}: not the file that was checked (its size changed while it was read); "
                      "refused, not read")
    return data


def _open_folder(name: str, dir_fd: int, path: str) -> int:
    """The folder ``name`` of ``dir_fd`` (``path`` for messages), not through a
    symbolic link: Changed if it is not a folder (any more)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        try:
            link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            link = False
        what = "a symbolic link now" if link else "not a folder now"
        raise Changed(f"{path}: not the folder that was checked ({what}); refused, not read") from None


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    imp = subparsers.add_parser("import", help="import users and mail from another server")
    kinds = imp.add_subparsers(dest="import_kind", required=True)
    p = kinds.add_parser(
        "legacy",
        help="the classic CodeProject POP3 server's ROOT/<domain>/<user>/ folders",
        description="Convert ROOT/<domain>/<user>/ folders (message files and an empty <password>.pwd) "
        "into Maildirs under --mail-root and passwd-file users user@domain (argon2id). "
        "ROOT is only read. Ambiguous input is refused before anything is written.",
    )
    p.add_argument("root", metavar="ROOT", help="the legacy server's mail root")
    p.add_argument("--passwd-file", required=True, help="passwd-file to add the users to (created if missing)")
    p.add_argument("--mail-root", required=True, metavar="DIR", help="where the Maildirs go: DIR/<domain>/<user>")
    p.add_argument("--max-message-size", type=int, default=MAX_MESSAGE, metavar="BYTES",
                   help=f"refuse ROOT if a message file is larger (default {MAX_MESSAGE})")
    p.add_argument("--dry-run", action="store_true", help="check and report, write nothing")
    p.set_defaults(func=cmd_import_legacy)
    from fastpop.delivery import mbox_import

    mbox_import.add_kind(kinds)
    mbox_import.add_x_uidl_kind(kinds)


def cmd_import_legacy(args: argparse.Namespace) -> int:
    try:
        users = scan(args.root, args.mail_root, args.passwd_file, args.max_message_size)
    except Refused as exc:
        print(f"fastpop import: {exc}", file=sys.stderr)
        print("fastpop import: nothing imported", file=sys.stderr)
        return 1
    if args.dry_run:
        report(users, dry_run=True)
        return 0
    try:
        counts = apply(users, args.passwd_file)
    except (OSError, ValueError) as exc:
        print(f"fastpop import: {exc}", file=sys.stderr)
        print("fastpop import: stopped; running it again continues where it stopped", file=sys.stderr)
        return 1
    report(users, counts=counts)
    return 0


# -- checking


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def scan(root: str, mail_root: str, passwd_file: str, max_message: int = MAX_MESSAGE) -> list[LegacyUser]:
    """Every user of ROOT, checked; raises Refused listing every problem."""
    from fastpop.auth.authenticator import valid_username

    if not os.path.isdir(root):
        raise Refused(f"{root} is not a directory")
    mail_root = os.path.abspath(mail_root)
    problems: list[str] = []
    for what, path in (("--mail-root", mail_root), ("--passwd-file", passwd_file)):
        if _inside(path, root):
            raise Refused(f"{what} {path} is inside {root}, which is only ever read")
    if any(c.isspace() for c in mail_root) or "%" in mail_root:
        raise Refused(f"--mail-root {mail_root}: a passwd-file mail field cannot hold whitespace or '%'")

    users: list[LegacyUser] = []
    seen: dict[str, str] = {}
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # ROOT itself as named
    except OSError as exc:
        problems.append(f"{root}: cannot list: {exc.strerror}")
        root_fd = None
    try:
        for domain in _entries(root, root_fd, problems) if root_fd is not None else ():
            assert root_fd is not None, "entries are listed only when ROOT opened"
            dpath = os.path.join(root, domain)
            domain_fd = _real_dir(root_fd, domain, dpath, problems)
            if domain_fd is None:
                continue
            try:
                for local in _entries(dpath, domain_fd, problems):
                    upath = os.path.join(dpath, local)
                    user_fd = _real_dir(domain_fd, local, upath, problems)
                    if user_fd is None:
                        continue
                    try:
                        name = f"{local}@{domain}"
                        if not valid_username(name):
                            problems.append(f"{upath}: {name!r} cannot be a user name")
                            continue
                        if name.lower() in seen:
                            problems.append(f"{upath}: same user as {seen[name.lower()]} (names differ only in case)")
                            continue
                        seen[name.lower()] = upath
                        user = _scan_user(root, upath, user_fd, name, os.path.join(mail_root, domain, local), problems,
                                          max_message)
                        if user is not None:
                            user.source = (root, domain, local)
                            users.append(user)
                    finally:
                        os.close(user_fd)
            finally:
                os.close(domain_fd)
    finally:
        if root_fd is not None:
            os.close(root_fd)
    _check_passwd_file(users, passwd_file, problems)
    if problems:
        raise Refused(f"{len(problems)} problem(s) in {root}:\n  " + "\n  ".join(problems))
    return users


def _entries(path: str, fd: int, problems: list[str]) -> list[str]:
    """The names in the folder open as ``fd`` (``path`` for messages)."""
    try:
        names = sorted(os.listdir(fd))
    except OSError as exc:
        problems.append(f"{path}: cannot list: {exc.strerror}")
        return []
    out = []
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            problems.append(f"{os.path.join(path, name)!r}: name is not UTF-8")
            continue
        out.append(name)
    return out


def _real_dir(dir_fd: int, name: str, path: str, problems: list[str]) -> int | None:
    """Domain and user folders: directories, opened (the descriptor returned)
    without following a symbolic link; a symlink is refused, a plain file at
    these levels is not a mailbox and is left alone (reported)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        problems.append(f"{path}: a symbolic link, not a folder")
        return None
    if st is None or not stat.S_ISDIR(st.st_mode):
        print(f"fastpop import: ignoring {path} (not a folder)", file=sys.stderr)
        return None
    try:
        fd = _open_folder(name, dir_fd, path)
    except Changed as exc:
        problems.append(str(exc))
        return None
    except OSError as exc:
        problems.append(f"{path}: cannot list: {exc.strerror}")
        return None
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        problems.append(f"{path}: not the folder that was checked (another folder now); refused, not read")
        return None
    return fd


def _scan_user(
    root: str, upath: str, user_fd: int, name: str, maildir: str, problems: list[str], max_message: int = MAX_MESSAGE
) -> LegacyUser | None:
    from fastpop.delivery.local import normalize

    before = len(problems)
    pwds: list[str] = []
    messages: list[Message] = []
    for entry in _entries(upath, user_fd, problems):
        path = os.path.join(upath, entry)
        try:
            st = os.stat(entry, dir_fd=user_fd, follow_symlinks=False)
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror}")
            continue
        if stat.S_ISDIR(st.st_mode):
            problems.append(f"{path}: a folder inside a user's folder")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{path}: not a regular file")
            continue
        if entry.lower().endswith(PWD_SUFFIX):
            pwds.append(entry)
            if st.st_size:
                problems.append(f"{path}: the .pwd file is not empty (is the password its name or its content?)")
            continue
        if entry.startswith("."):
            problems.append(f"{path}: a hidden file, not a message the server wrote")
            continue
        if st.st_size > max_message:
            problems.append(f"{path}: larger than {max_message} bytes (--max-message-size)")
            continue
        try:
            fd = _open_checked(user_fd, entry, path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            data = _read_fd(fd, st.st_size, path)
        except Changed as exc:
            problems.append(str(exc))
            continue
        except OSError as exc:
            problems.append(f"{path}: cannot read: {exc.strerror}")
            continue
        rel = os.path.relpath(path, root)
        messages.append(
            Message(path, rel, st.st_mtime_ns, hashlib.sha256(data).hexdigest(), len(normalize(data)),
                    dev=st.st_dev, ino=st.st_ino, st_size=st.st_size)
        )
    if not pwds:
        problems.append(f"{upath}: no <password>.pwd file")
    elif len(pwds) > 1:
        problems.append(f"{upath}: {len(pwds)} .pwd files ({', '.join(pwds)}): which is the password?")
    elif len(pwds[0]) == len(PWD_SUFFIX):
        problems.append(f"{upath}: {pwds[0]}: empty password")
    if len(problems) > before:
        return None
    messages.sort(key=lambda m: (m.mtime_ns, m.rel))
    try:
        done = _read_manifest(maildir)
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{os.path.join(maildir, MANIFEST)}: cannot read: {exc}")
        return None
    return LegacyUser(name, upath, pwds[0][: -len(PWD_SUFFIX)], maildir, messages, done=done)


# A manifest line is ~100 bytes: this is some 600,000 messages.  The user may
# write the file, so a larger one is refused, never read into memory.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


def _open_manifest(maildir: str, flags: int) -> int:
    """The manifest in the Maildir, which its user may write: never through a
    link, a regular file only (fastpop.store.safefs).  One to be written must
    be the Maildir's own (one link, owned by root or the Maildir's owner):
    the user may have hard-linked a file they can write but do not own."""
    from fastpop.store import safefs

    dir_fd = safefs.open_nofollow(safefs.canonical_maildir(maildir), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd, st = safefs.open_regular(dir_fd, MANIFEST, flags)
        if flags & (os.O_WRONLY | os.O_RDWR) and (
            st.st_nlink != 1 or (os.geteuid() == 0 and st.st_uid not in (0, os.fstat(dir_fd).st_uid))
        ):
            os.close(fd)
            raise OSError(errno.EPERM, "a hard link or another user's file: not written",
                          os.path.join(maildir, MANIFEST))
        return fd
    finally:
        os.close(dir_fd)


def _read_manifest(maildir: str) -> set[tuple[str, str]]:
    done: set[tuple[str, str]] = set()
    try:
        fd = _open_manifest(maildir, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return done
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= MAX_MANIFEST_BYTES and (chunk := os.read(fd, 1 << 20)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_MANIFEST_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_MANIFEST_BYTES} bytes, not read", os.path.join(maildir, MANIFEST))
    text = b"".join(chunks).decode("utf-8")
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):  # as open() in text mode splits
        digest, _, rest = line.partition(" ")
        done.add((digest, rest.rpartition(" ")[0]))
    return done


def _check_passwd_file(users: list[LegacyUser], passwd_file: str, problems: list[str]) -> None:
    from fastpop.auth.authenticator import expand_location
    from fastpop.auth.passwd_file import read_records
    from fastpop.auth.passwords import verify

    directory = os.path.dirname(os.path.abspath(passwd_file))
    if not os.path.isdir(directory):  # (the file is made there, next to its temporary copy)
        problems.append(f"--passwd-file {passwd_file}: no directory {directory} to create it in")
        return
    try:
        records = {r.name: r for r in read_records(passwd_file)}
    except (OSError, ValueError) as exc:
        problems.append(f"{passwd_file}: cannot read: {getattr(exc, 'strerror', None) or exc}")
        return
    for user in users:
        rec = records.get(user.name)
        if rec is None:
            continue
        location = rec.extra.get("userdb_mail") or rec.extra.get("mail")
        try:
            where = expand_location(location, rec) if location else None
        except ValueError:
            where = None
        if where != os.path.normpath(user.maildir):
            problems.append(
                f"{user.folder}: {user.name} is already in {passwd_file} with "
                + (f"another mailbox ({where})" if where else "no mail= field (where is its Maildir?)")
            )
        elif not verify(rec.password, user.password):
            problems.append(f"{user.folder}: {user.name} is already in {passwd_file} with another password")
        else:
            user.exists = True


# -- writing


def apply(users: list[LegacyUser], passwd_file: str) -> dict[str, int]:
    """Add the new users, then store the messages not yet imported; returns
    how many messages each user got now."""
    from fastpop.auth.passwd_file import UserRecord, read_records, write_records
    from fastpop.auth.passwords import hash_password

    new = [u for u in users if not u.exists]
    if new:
        records = read_records(passwd_file)
        for u in new:
            stored = hash_password(u.password, "ARGON2ID")
            records.append(UserRecord(u.name, stored, extra={"mail": f"maildir:{u.maildir}"}))
        write_records(passwd_file, records)
    return {u.name: _import_messages(u) for u in users}


def _import_messages(user: LegacyUser) -> int:
    from fastpop.store.maildir import ensure_maildir

    ensure_maildir(user.maildir)
    manifest = os.path.join(user.maildir, MANIFEST)
    done = _read_manifest(user.maildir)
    count = 0
    last_us = 0
    folder_fd: int | None = None
    try:
        for m in user.messages:
            # strictly increasing times keep the files' order in the Maildir names
            when_us = max(m.mtime_ns // 1000, last_us + 1)
            last_us = when_us
            if (m.sha256, m.rel) in done:
                continue
            if folder_fd is None:
                folder_fd = _open_user_folder(user)
            _store(user, m, folder_fd, when_us, manifest)
            count += 1
    finally:
        if folder_fd is not None:
            os.close(folder_fd)
    return count


def _open_user_folder(user: LegacyUser) -> int:
    """ROOT/<domain>/<user> again, each folder below ROOT without following a
    symbolic link (Changed if one is not a folder any more)."""
    root, domain, local = user.source
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name, path in ((domain, os.path.join(root, domain)), (local, user.folder)):
            try:
                sub = _open_folder(name, fd, path)
            except Changed:
                raise
            except OSError as exc:  # as the plain open() said it: where, and why
                raise OSError(f"{path}: cannot open: {exc.strerror}") from None
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def _store(user: LegacyUser, m: Message, folder_fd: int, when_us: int, manifest: str) -> None:
    """Copy one message from the descriptor that is the file checked; Changed
    (nothing read) if it is not."""
    from fastpop.delivery.local import DeliveryError, store_message

    name = os.path.basename(m.path)
    try:
        fd = _open_checked(folder_fd, name, m.path, m.dev, m.ino, m.st_size, m.mtime_ns)
    except Changed:
        raise
    except OSError as exc:
        raise OSError(f"{m.path}: cannot read: {exc.strerror}") from None
    data = _read_fd(fd, m.st_size, m.path)
    digest = hashlib.sha256(data).hexdigest()
    try:
        # moving existing mail: the quota is the old server's business, not a reason to lose some
        stored = store_message(user.maildir, data, when=when_us / 1_000_000, quota=False)
    except DeliveryError as exc:
        raise OSError(f"{m.path}: {exc}") from None
    with open(_open_manifest(user.maildir, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK), "a",
              encoding="utf-8") as f:
        f.write(f"{digest} {m.rel} {stored.name}\n")
        f.flush()
        os.fsync(f.fileno())


def report(users: list[LegacyUser], dry_run: bool = False, counts: dict[str, int] | None = None) -> None:
    total_msgs = 0
    for u in users:
        state = "user exists" if u.exists else ("new user" if dry_run else "user added")
        if dry_run:
            todo = u.todo()
            got = len(todo)
            line = f"{u.name}: {got} message(s), {sum(m.size for m in todo)} bytes to import"
        else:
            got = counts.get(u.name, 0) if counts else 0
            line = f"{u.name}: {got} message(s) imported"
        total_msgs += got
        skipped = len(u.messages) - got
        if skipped:
            line += f", {skipped} already there"
        print(f"{line} -> {u.maildir} ({state})")
    new_users = sum(1 for u in users if not u.exists)
    verb = "would import" if dry_run else "imported"
    print(f"{verb} {len(users)} user(s) ({new_users} new), {total_msgs} message(s); the source was not modified")
