"""Maildir storage: opening a mailbox at login, message files, deletion.

At login (under the session lock) messages in new/ move to cur/ with
``:2,`` info, as Dovecot does, and the mailbox index (``fastpop.index``)
(in the Maildir, or in the ``[mail] index`` directory: fastpop.store.index)
is brought up to date.  When nothing changed — cur/'s mtime is the one the
index recorded and new/ is empty — that costs a stat, a listdir of the empty
new/ and the index header: nothing grows with the mailbox.  When something
changed, cur/ is listed once and only messages the index does not know are
measured (read once: the size from W= in the name or counted, and whether a
line starts with ".").

UIDLs come from the Maildir unique name, or from Dovecot's dovecot-uidlist
for messages Dovecot had seen, so clients migrating from Dovecot do not fetch
everything again.  Nothing is deleted here except by ``delete()``, which the
protocol calls only in the UPDATE state.

Everything in a Maildir is untrusted (fastpop.store.safefs): it is reached through
descriptors of the Maildir and its subdirectories, never through a link;
links, FIFOs and other non-regular entries are skipped with a log line; a
Maildir or subdirectory that is a link or belongs to another uid than the
one it is served as is refused (PermissionError/ELOOP: [SYS/PERM]).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time

from fastpop import faults
from fastpop.store import courier, dovecot_keywords, dovecot_uidlist, maildirsize, safefs
from fastpop.store import index as mindex
from fastpop.store.index import FLAG_NO_DOT_LINES, Entry, MailboxIndex
from fastpop.store.maildir_names import base_name as _base
from fastpop.store.maildir_names import delivery_order, has_flag, uidl_of, with_flag
from fastpop.store.measure import measure
from fastpop.store.safefs import O_MESSAGE, open_nofollow

log = logging.getLogger("fastpop.maildir")
SUBDIRS = ("cur", "new", "tmp")
# A directory mtime this recent may still change within the same clock tick
# unseen; the index does not trust such an mtime (it rescans next time).
MTIME_SETTLE_NS = 2_000_000_000
# tmp/ files older than this are a dead delivery's (Maildir specification).
TMP_MAX_AGE = 36 * 3600


# errno values that mean the Maildir is broken or forbidden, not busy: an
# administrator must act (RFC 3206 [SYS/PERM], as Dovecot answers them).
_PERMANENT = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EEXIST}


def is_permanent(exc: BaseException) -> bool:
    """Whether a storage error calls for [SYS/PERM] rather than [SYS/TEMP]."""
    if isinstance(exc, dovecot_uidlist.UidlistCorrupt):
        return True  # [mail] uidl = "dovecot" cannot give a UIDL that is sure to last
    return isinstance(exc, OSError) and exc.errno in _PERMANENT


def ensure_maildir(path: str, owner: int | None = None) -> None:
    """Create the Maildir (and the operator's directories above it) and its
    cur/, new/ and tmp/, never through a link.  ``owner``: the uid it is
    served as, given to what is created when that is not this process's."""
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:
            pass
    fd = safefs.open_nofollow(safefs.canonical_maildir(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        # the uid to give what is created, or None to keep this process's
        give = owner if owner is not None and owner >= 0 and owner != os.geteuid() else None
        if give is not None:
            if created:
                _give_new_directory(fd, give, path)
            elif os.fstat(fd).st_uid != give:  # another's directory: nothing is created in it for this uid
                raise PermissionError(errno.EPERM, f"not owned by uid {give}", path)
        for sub in SUBDIRS:
            try:
                os.mkdir(sub, 0o700, dir_fd=fd)
            except FileExistsError:
                continue
            if give is not None:  # by a descriptor: the name may be a hard link to a file by now
                sub_fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                try:
                    _give_new_directory(sub_fd, give, f"{path}/{sub}")
                finally:
                    os.close(sub_fd)
    finally:
        os.close(fd)


def _give_new_directory(fd: int, uid: int, path: str) -> None:
    """chown a directory this process just made to ``uid``: only if it still
    is that one (ours and empty), not one of root's the user renamed into its
    place meanwhile (a rename within one directory needs no right on it)."""
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or os.listdir(fd):
        raise PermissionError(errno.EPERM, "replaced while it was created", path)
    os.fchown(fd, uid, -1)


def read_dovecot_uidlist(dir_fd: int, wanted: set[str] | None = None) -> tuple[int, dict[str, str]]:
    """(UIDVALIDITY, {base name: UIDL}) from Dovecot's dovecot-uidlist in the
    Maildir open as ``dir_fd`` (a regular file, not through a link): the
    UIDLs Dovecot's POP3 serves (fastpop.store.dovecot_uidlist), or (0, {})
    if there is none or it cannot be parsed.  ``wanted``: only these base
    names (the user may fill the file with made-up records: only those of
    messages being indexed are kept)."""
    try:
        uidlist = dovecot_uidlist.read(dir_fd, wanted)
    except (OSError, ValueError) as exc:
        log.warning("ignoring dovecot-uidlist of the Maildir: %s", exc)
        return 0, {}
    if uidlist is None:
        return 0, {}
    return uidlist.validity, {base: uidlist.uidl(base) or "" for base in uidlist.records}


# [mail] uidl: "maildir" (fastpop never writes dovecot-uidlist) or "dovecot"
_uidl_mode = "maildir"


def configure_uidl(mode: str) -> None:
    """``[mail] uidl``: "dovecot" gives every message a UID in dovecot-uidlist
    before it is served (fastpop.store.dovecot_uidlist); "maildir" only reads it."""
    global _uidl_mode
    if mode not in ("maildir", "dovecot"):
        raise ValueError(f"mail uidl must be 'maildir' or 'dovecot', not {mode!r}")
    _uidl_mode = mode


# [pop3] deleted_flag: an IMAP keyword that hides a message from POP3 instead of deleting it
_deleted_flag = ""


def configure_deleted_flag(keyword: str) -> None:
    """``[pop3] deleted_flag``: POP3 deletion adds this keyword (Dovecot's
    ``pop3_deleted_flag``) and messages with it are not shown; "" deletes."""
    global _deleted_flag
    if keyword and not dovecot_keywords.VALID_KEYWORD.fullmatch(keyword):
        raise ValueError(f"not an IMAP keyword: {keyword!r}")
    _deleted_flag = keyword


def _listing(dir_fd: int, where: str) -> list[str]:
    """The message names in cur/ or new/: regular files with valid names.
    Anything else is skipped with a log line and never touched."""
    names = []
    skipped = []
    with os.scandir(dir_fd) as it:
        for entry in it:
            name = entry.name
            if name[0] == ".":
                continue
            try:
                regular = entry.is_file(follow_symlinks=False)
            except OSError:
                continue
            if regular and safefs.valid_name(name):
                names.append(name)
            else:
                skipped.append(name)
    if skipped:
        log.warning(
            "skipping %d entries of %s that are not message files (links, FIFOs, directories, bad names): %s",
            len(skipped), where, ", ".join(repr(n) for n in skipped[:5]),
        )
    return names


# new/ of a Maildir last seen empty, by canonical path: its (device, inode,
# mtime, ctime) then and the uid it was served as.  Kept only when that mtime
# was settled (older than MTIME_SETTLE_NS) when the listing began: any entry
# added to or removed from new/ since gives it a later mtime and ctime, so the
# same stamp means it is still empty, and a login checks it with one lstat
# instead of an open, a listing and a close (Dovecot's maildir-sync trusts
# new/'s mtime the same way, outside its "dirty" window).  Per process, bounded.
_empty_new: dict[str, tuple[int, int, int, int, int]] = {}
EMPTY_NEW_MAX = 4096
# Entries of new/ the event loop reads at most to find it empty (an empty new/
# holds "." and ".."): its user can fill it with hidden names, which are never
# messages, and give it an mtime in the future, so that it is never remembered
# empty: every login then listed it all in the event loop (150,000 names held
# every other session of the worker ~50 ms at each).  More: not known empty,
# and the login's thread lists it (sync_index).
NEW_IN_LOOP_MOST = 256


def _new_is_empty(canonical: str, path: str, owner: int) -> bool | None:
    """Whether new/ holds no message; None if it is missing.  Raises OSError
    for a new/ that must be refused (a link, not a directory, another owner's)."""
    known = _empty_new.get(canonical)
    if known is not None:
        try:  # (a Maildir swapped for a link makes this another inode: then listed below, refused)
            st = os.stat(canonical + "/new", follow_symlinks=False)
        except FileNotFoundError:
            return None
        if (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, owner) == known:
            return True
        del _empty_new[canonical]
    try:
        new = safefs.open_nofollow(canonical + "/new", os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(new)  # before the listing: a change during it gives a later stamp
        safefs.check_directory(st, owner, path + "/new")
        if safefs.has_entries(new, NEW_IN_LOOP_MOST):
            return False
    finally:
        os.close(new)
    if time.time_ns() - st.st_mtime_ns > MTIME_SETTLE_NS:
        if len(_empty_new) >= EMPTY_NEW_MAX:
            del _empty_new[next(iter(_empty_new))]  # the oldest entry
        _empty_new[canonical] = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, owner)
    return True


def current_index(path: str, owner: int) -> MailboxIndex | None:
    """The index if it is up to date and nothing waits in new/, else None.

    This is the whole cost of a login to an unchanged mailbox: a stat of
    new/ (when it was seen empty before with the same stamp, see _empty_new;
    else an open of it, no link followed, and its listing), a stat of cur/
    and of the index file, whatever their size.  An index file this process
    has not read unchanged before and that is larger than index.IN_LOOP_MOST
    gives None: the caller's thread reads it (Mailbox.open).
    Raises OSError for a new/ or cur/ that must be refused; the Maildir
    itself was checked when the index was built (sync_index), and only root
    can give it to another owner since.
    """
    canonical = safefs.canonical_maildir(path)
    if not _new_is_empty(canonical, path, owner):
        return None
    try:
        # (a Maildir swapped for a link since the open above only makes this mtime
        # differ, or the index unreadable: the full open then refuses it)
        st = os.stat(canonical + "/cur", follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None  # the full open refuses it
    cur_owner = safefs.check_directory(st, owner, path + "/cur")
    current = mindex.load(path, owner=cur_owner, most=mindex.IN_LOOP_MOST)  # (a larger one: opened in a thread)
    if current is not None and current.cur_mtime_ns == st.st_mtime_ns != 0:
        return current
    return None


def sync_index(path: str, owner: int, lock_wait: float = dovecot_uidlist.LOCK_WAIT) -> MailboxIndex:
    """Move new/ to cur/ and return an index that matches cur/ (see module doc).

    May read many files: the protocol runs it in a thread unless
    current_index() already answered.  ``lock_wait``: seconds to wait for a
    live dovecot-uidlist.lock ([mail] uidl = "dovecot"), then UidlistLocked;
    a session passes 0 and tries again later, holding no thread meanwhile."""
    try:
        fd, owner = safefs.open_maildir(path, owner)
    except FileNotFoundError:
        ensure_maildir(path, owner)
        fd, owner = safefs.open_maildir(path, owner)
    subs: dict[str, int] = {}
    try:
        for sub in SUBDIRS:
            try:
                subs[sub] = safefs.open_subdir(fd, sub, owner, path)
            except FileNotFoundError:
                os.mkdir(sub, 0o700, dir_fd=fd)
                subs[sub] = safefs.open_subdir(fd, sub, owner, path)
        return _sync(path, fd, subs["cur"], subs["new"], subs["tmp"], owner, lock_wait)
    finally:
        for sub_fd in subs.values():
            os.close(sub_fd)
        os.close(fd)


def _sync(path: str, fd: int, cur: int, new: int, tmp: int, owner: int, lock_wait: float) -> MailboxIndex:
    arrived = _listing(new, path + "/new")
    for name in arrived:
        target = name if ":" in name else name + ":2,"
        try:
            os.rename(name, target, src_dir_fd=new, dst_dir_fd=cur)
        except FileNotFoundError:
            pass  # moved by another program in the meantime
        if faults.ACTIVE:
            faults.hit("sync.after_move")
    st = os.fstat(cur)
    current = mindex.load(path, fd, owner)
    if current is not None and not arrived and current.cur_mtime_ns == st.st_mtime_ns != 0:
        return current
    _remove_leftovers(path, fd, tmp)
    return _rebuild(path, fd, cur, st.st_mtime_ns, current, owner, lock_wait)


def _remove_leftovers(path: str, fd: int, tmp: int) -> None:
    """What writers that died (killed, power lost) left behind: index
    temporaries (the index is written only under the session lock, which the
    caller holds, so any is a dead writer's) and tmp/ files older than
    TMP_MAX_AGE (the Maildir specification's 36 hours, as Dovecot does).
    unlinkat removes a link itself, never what it points to."""
    prefix = mindex.INDEX_FILE + ".tmp."
    try:
        for name in os.listdir(fd):
            if name.startswith(prefix):
                _unlink_leftover(fd, name, path)
        too_old = time.time() - TMP_MAX_AGE
        with os.scandir(tmp) as it:
            for entry in it:
                try:
                    stale = (entry.is_file(follow_symlinks=False)
                             and entry.stat(follow_symlinks=False).st_mtime < too_old)
                except FileNotFoundError:
                    continue  # a delivery in progress renamed it into new/ meanwhile
                if stale:
                    _unlink_leftover(tmp, entry.name, path + "/tmp")
    except OSError as exc:
        log.warning("cannot clean up leftovers in %s: %s", path, exc.strerror)


def _unlink_leftover(dir_fd: int, name: str, where: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
        log.info("removed leftover %s/%s", where, name)
    except FileNotFoundError:
        pass


def _rebuild(path: str, fd: int, cur: int, cur_mtime_ns: int, old: MailboxIndex | None, owner: int,
             lock_wait: float = dovecot_uidlist.LOCK_WAIT) -> MailboxIndex:
    """List cur/ and write a new index, reusing what the old one knew."""
    names = _listing(cur, path + "/cur")
    if _deleted_flag:  # messages POP3 deleted with [pop3] deleted_flag: kept for IMAP, not shown
        letter = dovecot_keywords.read(fd).get(_deleted_flag)
        if letter is not None:
            flag = dovecot_keywords.letter(letter)
            names = [n for n in names if not has_flag(n, flag)]
    # by base name, in the old index's order (dicts keep insertion order)
    known = {_base(e.name): e for e in old.entries()} if old is not None else {}
    added: list[str] = []
    for name in names:
        entry = known.get(_base(name))
        if entry is None:
            added.append(name)
        else:
            entry.name = name  # flags may have changed the info suffix
    present = {_base(n) for n in names}
    kept = [e for base, e in known.items() if base in present]
    added.sort(key=delivery_order)
    # the UIDLs Courier's POP3 served (docs/migration.md): for messages not served here yet
    migrated = _migrated_uidls(fd, added, kept, path)
    if _uidl_mode == "dovecot":
        # every message gets its UID in dovecot-uidlist before it is served, and one
        # already served keeps its UIDL there too: the UIDL never depends on this index
        kept_uidls = {_base(e.name): e.uidl for e in kept}
        uidlist = dovecot_uidlist.assign(fd, [*kept_uidls, *(_base(n) for n in added)],
                                         {**migrated, **kept_uidls}, owner, lock_wait)
        uidvalidity = uidlist.validity
        dovecot_uidls = {_base(n): uidlist.uidl(_base(n)) or "" for n in added}
    else:
        uidvalidity, dovecot_uidls = (read_dovecot_uidlist(fd, {_base(n) for n in added})
                                      if added or old is None else (0, {}))
    if old is not None and not uidvalidity:
        uidvalidity = old.uidvalidity
    for name in added:
        measured = measure(cur, name, owner, path + "/cur")
        if measured is None:
            continue
        size, file_size, flags = measured
        base = _base(name)
        uidl = migrated.get(base) or dovecot_uidls.get(base) or uidl_of(name)
        kept.append(Entry(name, size, file_size, flags, courier.safe_uidl(uidl)))
    trusted = cur_mtime_ns if time.time_ns() - cur_mtime_ns > MTIME_SETTLE_NS else 0
    try:
        mindex.write(path, kept, trusted, uidvalidity, fd)
    except OSError as exc:  # a read-only or full disk must not stop POP3: serve from memory
        log.warning("cannot write index in %s: %s", path, exc)
        return MailboxIndex(mindex.encode(kept, 0, uidvalidity))
    loaded = mindex.load(path, fd, owner)
    return loaded if loaded is not None else MailboxIndex(mindex.encode(kept, trusted, uidvalidity))


def _migrated_uidls(fd: int, added: list[str], kept: list[Entry], path: str) -> dict[str, str]:
    """{base name: UIDL} that Courier's POP3 served (courierpop3dsizelist) for
    the messages in ``added``, made RFC 1939-valid (courier.safe_uidl).  One
    that another message of the mailbox has already (served, or an earlier
    one of ``added``) is left out: that message then gets its own UIDL, as
    RFC 1939 requires them unique, and the same one after an index loss (the
    order of ``added`` is the delivery order)."""
    if not added:
        return {}
    listed = courier.read(fd, path, {_base(n) for n in added})
    if not listed:
        return {}
    taken = {e.uidl for e in kept}
    out: dict[str, str] = {}
    for name in added:
        base = _base(name)
        uidl = listed.get(base)
        if uidl is None:
            continue
        uidl = courier.safe_uidl(uidl)
        if uidl in taken:
            log.warning("%s: Courier UIDL %s of %r is another message's; not used", path, uidl, base)
            continue
        taken.add(uidl)
        out[base] = uidl
    return out


class Mailbox:
    """What one session sees: the index snapshot taken at login.  Numbering
    is fixed for the session; the index object is shared and never changes.

    It holds no descriptor: message files are opened by their canonical path
    (fastpop.store.safefs: no link in any component), names checked by the index."""

    __slots__ = ("path", "_cur", "index", "_renamed", "owner", "_as_root", "_seen", "expire_days", "_retrieved",
                 "_listing", "_listed_at")

    def __init__(self, path: str, index: MailboxIndex, owner: int) -> None:
        self.path = path
        self._cur = safefs.canonical_maildir(path) + "/cur/"
        self.index = index
        self._renamed: dict[int, str] | None = None
        # The session's last listing of cur/ for renamed messages (list_cur, in a
        # thread: RETR/TOP), by base name, and the time.monotonic() it began
        self._listing: dict[str, str] | None = None
        self._listed_at = 0.0
        self._seen: set[int] | None = None  # RETR'd messages to mark \Seen at QUIT ([pop3] seen_on_retr)
        # EXPIRE days of the session's user (None: NEVER) and what it RETR'd (fastpop.store.expire)
        self.expire_days: int | None = None
        self._retrieved: set[int] | None = None
        if owner == safefs.ANY_OWNER:  # (as root, for a user without a uid: see safefs.served_uid)
            owner = os.lstat(self._cur[:-5]).st_uid
        self.owner = owner
        self._as_root = safefs.euid() == 0  # (root reads anything: the owner decides)

    @classmethod
    def open(cls, path: str, owner: int, lock_wait: float = dovecot_uidlist.LOCK_WAIT) -> Mailbox:
        """Bring the index up to date (may be slow) and open the mailbox
        (``lock_wait``: see sync_index)."""
        return cls(path, sync_index(path, owner, lock_wait), owner)

    @classmethod
    def open_current(cls, path: str, owner: int) -> Mailbox | None:
        """Open the mailbox if its index is up to date (fast), else None."""
        current = current_index(path, owner)
        return None if current is None else cls(path, current, owner)

    def __len__(self) -> int:
        return self.index.count

    def close(self) -> None:
        """At the session's end: unmap its index now (fastpop.store.index), not
        whenever the session object is collected.  Nothing may use it after."""
        self.index.close()

    @property
    def total_size(self) -> int:
        return self.index.total_size

    def size(self, index: int) -> int:
        return self.index.size(index)

    def uidl(self, index: int) -> str:
        return self.index.uidl(index)

    def no_dot_lines(self, index: int) -> bool:
        """Whether message ``index`` was measured and has no line starting
        with "." (as its file was then: see fastpop.store.index)."""
        return bool(self.index.flags(index) & FLAG_NO_DOT_LINES)

    def name(self, index: int) -> str:
        if self._renamed is not None and index in self._renamed:
            return self._renamed[index]
        return self.index.name(index)

    def file_path(self, index: int) -> str:
        return self._cur + self.name(index)

    def message_file(self, index: int) -> tuple[str, int, int]:
        """(path, POP3 size, file size) of message ``index``, for RETR and TOP."""
        name, size, file_size = self.index.message(index)
        if self._renamed is not None and index in self._renamed:
            name = self._renamed[index]
        return self._cur + name, size, file_size

    def open_message(self, path: str) -> int:
        """A descriptor of a message file from message_file()/listed_path(),
        opened without following any link and without blocking on a FIFO.
        Served as root, a file that is not the owner's is refused (EACCES)."""
        fd = open_nofollow(path, O_MESSAGE)
        if self._as_root:
            try:
                st = os.fstat(fd)
                if st.st_uid != self.owner:
                    raise PermissionError(errno.EACCES, f"owned by uid {st.st_uid}, served as uid {self.owner}", path)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def _open_cur(self) -> int:
        return self._open_own(self._cur)

    def _open_own(self, path: str) -> int:
        """cur/ or the Maildir, opened anew after login: the user may have put
        another's directory in its place since, which must not be written."""
        fd = safefs.open_nofollow(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            safefs.check_directory(os.fstat(fd), self.owner, path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def find_renamed(self, index: int, listing: dict[str, str]) -> str | None:
        """Path of message ``index`` if another program (an IMAP server setting
        flags) renamed it since login: same unique name, other info suffix.
        ``listing``: cur/'s names by base name, listed once for a whole QUIT
        (the user may fill cur/: a listing per message held the event loop)."""
        name = listing.get(_base(self.name(index)))
        if name is None:
            return None
        if self._renamed is None:
            self._renamed = {}
        self._renamed[index] = name
        return self._cur + name

    def _list_cur(self, wanted: set[str]) -> dict[str, str]:
        """cur/'s names by base name, only the bases in ``wanted``."""
        cur = self._open_cur()
        try:
            out: dict[str, str] = {}
            for name in _listing(cur, self._cur):
                base = _base(name)
                if base in wanted:
                    out[base] = name
            return out
        finally:
            os.close(cur)

    def list_cur(self) -> tuple[float, dict[str, str]]:
        """cur/'s message names by base name (the unique part, before ":"), and
        the time.monotonic() the listing began, for use_listing().  Blocking,
        and as slow as the user makes cur/: a session runs it in a thread.
        Only this session's messages are kept (the user may put a million
        other entries in cur/, and the session keeps the listing), so what
        it holds is bounded by the index; an index closed meanwhile (the
        session ended) makes it raise ValueError, which nobody waits for."""
        started = time.monotonic()
        index = self.index
        wanted = {_base(index.name(i)) for i in range(index.count)}
        return started, self._list_cur(wanted)

    def use_listing(self, listed: tuple[float, dict[str, str]]) -> None:
        """Keep a list_cur() result: listed_path() looks every renamed message up in it."""
        self._listed_at, self._listing = listed

    def listing_age(self) -> float:
        """Seconds since the kept listing of cur/ began (infinite: none yet)."""
        return float("inf") if self._listing is None else time.monotonic() - self._listed_at

    def listed_path(self, index: int) -> str | None:
        """Message ``index``'s file was not found under its known name: its
        path in the kept listing of cur/, which becomes its known name; ""
        if the listing does not hold it (deleted before the listing: the
        index holds only messages that were in cur/ at login, and a unique
        name never comes back); None if there is no listing or it shows the
        known name (renamed since the listing: only a new one can tell)."""
        listing = self._listing
        if listing is None:
            return None
        known = self.name(index)
        name = listing.get(_base(known))
        if name is None:
            return ""
        if name == known:
            return None
        if self._renamed is None:
            self._renamed = {}
        self._renamed[index] = name
        return self._cur + name

    def _renamed_in(self, index: int, listing: list[dict[str, str]]) -> str | None:
        """find_renamed() with cur/ listed at most once per QUIT (``listing``: [] until then;
        only this session's names are kept: bounded by the index, however full cur/ is)."""
        if not listing:
            try:
                listing.append(self.list_cur()[1])
            except OSError:
                return None
        return self.find_renamed(index, listing[0])

    def has_changes(self) -> bool:
        """Whether QUIT has files to change besides deletions: \\Seen flags
        (seen_on_retr), the EXPIRE record of what was retrieved."""
        return bool(self._seen) or (self.expire_days is not None and bool(self._retrieved))

    def mark_seen(self, index: int) -> None:
        """Remember that message ``index`` was retrieved (RETR, not TOP), to be
        flagged \\Seen by apply_seen() at QUIT, as Dovecot's POP3 does."""
        if self._seen is None:
            self._seen = set()
        self._seen.add(index)

    def mark_retrieved(self, index: int) -> None:
        """Remember that message ``index`` was RETR'd (EXPIRE: recorded at QUIT)."""
        if self._retrieved is None:
            self._retrieved = set()
        self._retrieved.add(index)

    def retrieved(self) -> list[int]:
        """The messages RETR'd in this session (RSET does not undo a download)."""
        return sorted(self._retrieved) if self._retrieved else []

    def forget_seen(self) -> None:
        """RSET: nothing retrieved so far is flagged (as Dovecot)."""
        self._seen = None

    def apply_seen(self, deleted: bytearray) -> None:
        """Add the S flag to the retrieved messages that are not deleted: a
        rename within cur/ (by its descriptor) to ``:2,`` plus the flags in
        ASCII order, merged with those the file has (another program, an IMAP
        server, may have set some since login: then the file is found by its
        unique name).  The unique name, so the UIDL, never changes.  Failures
        are logged: a flag is not worth failing a QUIT for."""
        seen = self._seen
        self._seen = None
        if not seen:
            return
        try:
            cur = self._open_cur()
        except OSError as exc:
            log.warning("cannot flag messages seen in %s: %s", self._cur, exc.strerror)
            return
        listing: list[dict[str, str]] = []  # cur/'s names, listed once if a message was renamed
        try:
            for i in sorted(seen):
                if i < len(deleted) and deleted[i]:
                    continue  # as Dovecot: a deleted message is not flagged
                for attempt in (0, 1):
                    name = self.name(i)
                    target = with_flag(name, "S")
                    if target is None:
                        break
                    try:
                        os.rename(name, target, src_dir_fd=cur, dst_dir_fd=cur)
                        if self._renamed is None:
                            self._renamed = {}
                        self._renamed[i] = target
                        break
                    except FileNotFoundError:
                        if attempt or self._renamed_in(i, listing) is None:
                            break  # expunged by another program meanwhile
                    except OSError as exc:
                        log.warning("cannot flag message %s%s seen: %s", self._cur, name, exc.strerror)
                        break
        finally:
            os.close(cur)

    def _flag_deleted(self, cur: int, indices: list[int], lock_wait: float) -> int:
        """[pop3] deleted_flag: add the keyword's letter (dovecot-keywords)
        to each message's info by a rename within cur/; returns how many
        could not be flagged (they stay visible to POP3)."""
        try:
            top = self._open_own(self._cur[:-5])
            try:
                letter = dovecot_keywords.letter_for(top, _deleted_flag, self.owner, lock_wait)
            finally:
                os.close(top)
        except OSError as exc:
            log.error("cannot flag messages deleted in %s: %s", self._cur, exc.strerror)
            return len(indices)
        if letter is None:
            log.error("cannot flag messages deleted in %s: all 26 Maildir keywords are taken", self._cur)
            return len(indices)
        failed = 0
        listing: list[dict[str, str]] = []  # cur/'s names, listed once if a message was renamed
        for i in indices:
            for attempt in (0, 1):
                name = self.name(i)
                target = with_flag(name, letter)
                if target is None:
                    break  # flagged already
                try:
                    os.rename(name, target, src_dir_fd=cur, dst_dir_fd=cur)
                    break
                except FileNotFoundError:
                    if attempt or self._renamed_in(i, listing) is None:
                        break  # expunged by another program meanwhile
                except OSError as exc:
                    failed += 1
                    log.error("cannot flag message %s%s deleted: %s", self._cur, name, exc.strerror)
                    break
        try:
            os.fsync(cur)
        except OSError as exc:
            log.warning("cannot fsync %s after flagging: %s", self._cur, exc)
        return failed

    def delete(self, indices: list[int], lock_wait: float = dovecot_keywords.LOCK_WAIT) -> int:
        """Unlink these messages; returns how many could not be removed.
        unlinkat in cur/'s descriptor: a name never reaches outside cur/.
        ``lock_wait``: seconds to wait for dovecot-keywords.lock ([pop3]
        deleted_flag); 0 for a session, whose update thread a lock the user
        planted would otherwise hold."""
        try:
            cur = self._open_cur()
        except FileNotFoundError:
            return 0  # the whole Maildir was removed by another program
        except OSError as exc:
            log.error("cannot delete messages in %s: %s", self._cur, exc.strerror)
            return len(indices)
        try:
            return self._delete(cur, indices, lock_wait)
        finally:
            os.close(cur)

    def _delete(self, cur: int, indices: list[int], lock_wait: float) -> int:
        if _deleted_flag:
            return self._flag_deleted(cur, indices, lock_wait)
        failed = 0
        removed = removed_size = 0  # for maildirsize: what this unlinked, not what others removed
        listing: list[dict[str, str]] = []  # cur/'s names, listed once if a message was renamed
        for i in indices:
            if faults.ACTIVE:
                faults.hit("update.before_unlink")
            name = self.name(i)
            try:
                os.unlink(name, dir_fd=cur)
                removed += 1
                removed_size += maildirsize.quota_size(name, self.index.message(i)[2])
            except FileNotFoundError:
                renamed = self._renamed_in(i, listing)
                if renamed is not None:
                    try:
                        os.unlink(self.name(i), dir_fd=cur)
                        removed += 1
                        removed_size += maildirsize.quota_size(self.name(i), self.index.message(i)[2])
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        failed += 1
                        log.error("cannot delete message %s: %s", renamed, exc.strerror)
                # else: already removed by another program
            except OSError as exc:
                failed += 1
                log.error("cannot delete message %s%s: %s", self._cur, name, exc.strerror)
            if faults.ACTIVE:
                faults.hit("update.after_unlink")
        try:
            os.fsync(cur)
        except OSError as exc:  # the unlinks happened; only their durability is in doubt
            log.warning("cannot fsync %s after deletions: %s", self._cur, exc)
        if removed:
            try:
                top = self._open_own(self._cur[:-5])
            except OSError as exc:
                log.warning("cannot update the quota of %s: %s", self._cur[:-5], exc.strerror)
            else:
                try:
                    maildirsize.record_removed(top, removed_size, removed, self.owner, self._cur[:-5])
                finally:
                    os.close(top)
        return failed
