"""Pure-Python twin of ``fastpop.store._index``: LIST and UIDL lines from index
records (layout in ``fastpop/store/index.py``).  Same results as the compiled one."""

from __future__ import annotations

import struct

_HEADER_SIZE = 64
_RECORD = struct.Struct("<QQIHHI4x")


# Lines are joined this many records at a time: a large mailbox's listing is
# formatted in a thread (fastpop.session._core_py), and one join or free of
# millions of lines would hold the GIL, so the event loop, for as long.
_BLOCK = 65536


def format_list(buf, count: int, deleted) -> bytes:
    """LIST lines ("n size\\r\\n") for every message not marked deleted."""
    if count < 0 or len(buf) < _HEADER_SIZE + count * _RECORD.size or len(deleted) < count:
        raise ValueError("index buffer too short")
    whole = memoryview(buf)
    blocks = []
    for first in range(0, count, _BLOCK):
        view = whole[_HEADER_SIZE + first * _RECORD.size : _HEADER_SIZE + min(count, first + _BLOCK) * _RECORD.size]
        blocks.append(b"".join([b"%d %d\r\n" % (i + 1, rec[0])
                                for i, rec in enumerate(_RECORD.iter_unpack(view), first) if not deleted[i]]))
    return b"".join(blocks)


def format_uidl(buf, count: int, names_off: int, deleted) -> bytes:
    """UIDL lines ("n uidl\\r\\n") for every message not marked deleted."""
    if count < 0 or len(buf) < _HEADER_SIZE + count * _RECORD.size or len(deleted) < count:
        raise ValueError("index buffer too short")
    view = memoryview(buf)
    blocks = []
    for first in range(0, count, _BLOCK):
        last = min(count, first + _BLOCK)
        lines = []
        for i, (_, _, name_off, name_len, uidl_len, _) in enumerate(
            _RECORD.iter_unpack(view[_HEADER_SIZE + first * _RECORD.size : _HEADER_SIZE + last * _RECORD.size]), first
        ):
            start = names_off + name_off + name_len
            if start + uidl_len > len(buf):
                raise ValueError("index record points outside the file")
            if not deleted[i]:
                lines.append(b"%d %s\r\n" % (i + 1, bytes(view[start : start + uidl_len])))
        blocks.append(b"".join(lines))
    return b"".join(blocks)


def check_records(buf, count: int, names_off: int) -> int:
    """Sum of the records' sizes, after checking every record points inside
    the name table and holds a valid file name and UIDL; ValueError otherwise."""
    if count < 0 or len(buf) < _HEADER_SIZE + count * _RECORD.size or names_off > len(buf):
        raise ValueError("index buffer too short")
    total = 0
    with memoryview(buf) as data:  # (no copy of a mapped file; released at once)
        for size, _, name_off, name_len, uidl_len, _ in _RECORD.iter_unpack(
            data[_HEADER_SIZE : _HEADER_SIZE + count * _RECORD.size]
        ):
            start = names_off + name_off
            if start + name_len + uidl_len > len(buf):
                raise ValueError("index record points outside the name table")
            if size > 1 << 62:
                raise ValueError("index record size out of range")
            name = bytes(data[start : start + name_len])
            if not 0 < name_len <= 255 or name[0] == 0x2E or b"/" in name or b"\0" in name:
                raise ValueError("index record holds an invalid file name")
            uidl = bytes(data[start + name_len : start + name_len + uidl_len])
            if not 0 < uidl_len <= 70 or any(c < 0x21 or c > 0x7E for c in uidl):
                raise ValueError("index record holds an invalid UIDL")
            total += size
    return total
