"""fastpop.store.safefs: no link followed from the Maildir down, in both twins of
open_nofollow (compiled openat2, ctypes openat2; conftest's ``twin`` fixture)
and in the O_NOFOLLOW walk either falls back to where openat2 is missing.  The attacks on a whole server are in
tests/test_hostile_maildir.py and tests/test_maildir_audit.py."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from fastpop import _compiled
from fastpop.store import safefs

pytestmark = pytest.mark.unit

SAFEFS = "fastpop.store._safefs"


@pytest.fixture
def impl(twin):
    return twin(SAFEFS)


@pytest.fixture(params=["openat2", "walk"])
def open_nofollow(request, impl):
    """Each twin's open_nofollow, then the walk it falls back to (the compiled
    twin imports the Python one's)."""
    return impl.open_nofollow if request.param == "openat2" else impl.walk


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "box" / "cur").mkdir(parents=True)
    (tmp_path / "box" / "cur" / "msg").write_bytes(b"mail")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    (tmp_path / "box" / "cur" / "link").symlink_to(tmp_path / "outside" / "secret")
    (tmp_path / "box" / "linked").symlink_to(tmp_path / "outside")
    (tmp_path / "box" / "file").write_bytes(b"")
    return tmp_path.resolve()


def _errno(fn, *args) -> int:
    try:
        fd = fn(*args)
    except OSError as exc:
        return exc.errno
    os.close(fd)
    return 0


def test_opens_a_path_without_links(open_nofollow, tree):
    fd = open_nofollow(str(tree / "box" / "cur" / "msg"), os.O_RDONLY)
    try:
        assert os.read(fd, 10) == b"mail"
        assert fcntl_cloexec(fd)
    finally:
        os.close(fd)


def fcntl_cloexec(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


@pytest.mark.parametrize("rel", ["box/cur/link", "box/linked/secret"])
def test_a_link_in_any_component_is_eloop(open_nofollow, tree, rel):
    assert _errno(open_nofollow, str(tree / rel), os.O_RDONLY) == errno.ELOOP


def test_missing_and_misplaced(open_nofollow, tree):
    assert _errno(open_nofollow, str(tree / "box" / "cur" / "nothing"), os.O_RDONLY) == errno.ENOENT
    assert _errno(open_nofollow, str(tree / "box" / "file" / "x"), os.O_RDONLY) in (errno.ENOTDIR, errno.ELOOP)


def test_creates_exclusively_with_the_mode_asked(open_nofollow, tree):
    path = str(tree / "box" / "cur" / "new")
    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.close(fd)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 & ~_umask()
    assert _errno(open_nofollow, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    # a link planted at the name is not created through
    assert _errno(open_nofollow, str(tree / "box" / "cur" / "link"),
                  os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    assert (tree / "outside" / "secret").read_bytes() == b"secret"


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_the_chosen_implementation_is_recorded():
    assert safefs.SAFEFS_IMPL == ("python" if _compiled.NO_EXTENSIONS else "cython")
    chosen = SAFEFS if safefs.SAFEFS_IMPL == "cython" else _compiled.TWINS[SAFEFS]
    assert safefs.open_nofollow.__module__ == chosen
    assert safefs.has_entries.__module__ == chosen


@pytest.mark.parametrize("name, ok", [
    ("1700000000.M1P1.host,S=10:2,S", True), ("msg", True), ("é" * 127, True), ("é" * 128, False),
    ("", False), (".", False), ("..", False), (".hidden", False), ("a/b", False), ("../x", False),
    ("a\0b", False), ("x" * 255, True), ("x" * 256, False),
])
def test_valid_names(name, ok):
    assert safefs.valid_name(name) is ok


def test_canonical_maildir_resolves_the_parents_only(tmp_path):
    real = tmp_path / "real"
    (real / "Maildir").mkdir(parents=True)
    (tmp_path / "home").symlink_to(real)  # the operator's link above the Maildir
    (real / "Linked").symlink_to(real / "Maildir")  # the user's link: kept, refused on open
    assert safefs.canonical_maildir(str(tmp_path / "home" / "Maildir")) == str(real.resolve() / "Maildir")
    linked = str(tmp_path / "home" / "Linked")
    assert safefs.canonical_maildir(linked) == str(real.resolve() / "Linked")
    with pytest.raises(OSError) as exc:
        safefs.open_maildir(linked, os.geteuid())
    assert exc.value.errno == errno.ELOOP


def test_open_maildir_checks_the_owner(tmp_path):
    (tmp_path / "Maildir").mkdir()
    fd, owner = safefs.open_maildir(str(tmp_path / "Maildir"), os.geteuid())
    os.close(fd)
    assert owner == os.geteuid()
    with pytest.raises(PermissionError, match="served as uid"):
        safefs.open_maildir(str(tmp_path / "Maildir"), os.geteuid() + 1)
    fd, owner = safefs.open_maildir(str(tmp_path / "Maildir"), safefs.ANY_OWNER)
    os.close(fd)
    assert owner == os.geteuid()


def test_open_regular_refuses_fifos_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError, match="not a regular file"):
            safefs.open_regular(dfd, "fifo")
    finally:
        os.close(dfd)


@pytest.mark.parametrize("names, expected", [
    ([], False), ([".hidden"], False), (["1700000000.M1P1.host"], True),
    ([".a", ".b", "m"], True), ([f".{i:03d}" + "x" * 200 for i in range(60)], False),  # over one 4 KiB read
    ([f".{i:03d}" + "x" * 200 for i in range(60)] + ["late"], True),
])
def test_has_entries(impl, tmp_path, names, expected):
    for name in names:
        (tmp_path / name).write_bytes(b"")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert impl.has_entries(fd) is expected
    finally:
        os.close(fd)
