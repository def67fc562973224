"""The bench client's in-place RETR check, pure Python.

The twin of ``_wire.pyx`` (used when the compiled module is absent or
``FASTPOP_NO_EXTENSIONS`` is set); both give the same answer for any input.
A download session spends most of its client-side Python time here, once
per RETR, which is why it is compiled.

Both functions only ever *accept* what ``client.MessageReader`` accepts,
with the size it would count; when they cannot say (-1) the caller hands the
same bytes to the reader, which gives the verdict and its wording.
"""

from __future__ import annotations

import hashlib

CHECKSUM_NAME = b"X-Fastpop-Bench-Sha256:"  # as the seeding writes it
CHECKSUM_VALUE = len(CHECKSUM_NAME) + 1  # after ": "
CHECKSUM_LINE = CHECKSUM_VALUE + 64  # a SHA-256 in hex

_sha256 = hashlib.sha256

# verified body (its SHA-256 in hex) -> lines in it that start with a stuffed dot
_body_dots: dict[bytes, int] = {}
BODY_DOTS_CACHE = 1 << 16


def announced_size(status: bytes) -> int:
    """'+OK 1234 octets' -> 1234; -1 when the server does not say."""
    parts = status.split(None, 2)
    if len(parts) >= 2 and parts[1].isdigit():
        return int(parts[1])
    return -1


def whole_retr(data: bytes) -> int:
    """``data`` is one read holding a whole RETR reply and nothing else (the
    usual case, one command at a time): its message's size if the in-place
    check accepts it, else -1 (not "+OK", not whole, or see ``verify_whole``)."""
    if not data.startswith(b"+OK"):
        return -1
    i = data.find(b"\r\n")
    n = len(data)
    if i < 0 or n - 5 <= i or not data.endswith(b"\r\n.\r\n"):
        return -1
    return verify_whole(data, i + 2, n - 5, announced_size(data[:i]))


def verify_whole(data: bytes, m: int, j: int, announced: int) -> int:
    """Checks a RETR message that lies whole in ``data``: its wire form is
    ``data[m : j + 2]``, and ``data`` ends with the terminator at ``j``.
    Returns its unstuffed size when it is intact, -1 when this check cannot
    say: no header block, no checksum header in the exact form the seeding
    writes, a "." line in the header, a checksum or size that does not match.

    The terminator is taken to be the one that ends the data without a scan
    for an earlier one: the header block is searched for a "." line here,
    and the body is the one the checksum was made of, as a correct server
    stuffs it, so it holds none.
    """
    # (indexing, not startswith/find, where one octet or two say it: a bytes method call
    # costs more than the search)
    first = data[m]
    if first == 13 or (first == 46 and data[m + 1] == 13):
        return -1  # no header block, or a "." line first
    h = data.find(b"\r\n\r\n", m, j + 2)  # the header block is data[m : h + 2], the body data[h + 4 : j + 2]
    if h < 0 or data.find(b"\n.\r\n", m, h + 4) >= 0:
        return -1
    k = data.find(CHECKSUM_NAME, m, h + 2)
    if k < 0 or (k > m and data[k - 1] != 10):
        return -1
    # ": " and 64 octets, then the line's CRLF (the first after the name: the hex digest
    # it is compared with has none)
    e = k + CHECKSUM_LINE
    if e > h or data[e] != 13 or data[e + 1] != 10 or data[k + CHECKSUM_VALUE - 1] != 32:
        return -1
    expected = data[k + CHECKSUM_VALUE : e]
    if _sha256(memoryview(data)[h + 4 : j + 2]).hexdigest().encode() != expected:
        return -1
    # the unstuffed size: wire octets less one per stuffed line ("\n..").  The body's
    # count is a function of the body, which the checksum just verified: counted once
    # per distinct body
    dots = _body_dots.get(expected)
    if dots is None:
        dots = data.count(b"\n..", h + 3, j + 2)
        if len(_body_dots) < BODY_DOTS_CACHE:
            _body_dots[expected] = dots
    size = j + 2 - m - dots - data.count(b"\n..", m, h + 2) - (first == 46 and data[m + 1] == 46)
    if announced >= 0 and announced != size:
        return -1
    return size
