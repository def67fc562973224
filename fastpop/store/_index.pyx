# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled LIST and UIDL formatting straight from index records.

The pure-Python twin is ``fastpop/store/_index_py.py``; the record layout is
documented in ``fastpop/store/index.py`` (64-byte header, 32-byte records,
little-endian).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

cdef enum:
    HEADER_SIZE = 64
    RECORD_SIZE = 32


cdef inline uint64_t le64(const unsigned char* p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int k
    for k in range(7, -1, -1):
        v = (v << 8) | p[k]
    return v


cdef inline Py_ssize_t le_n(const unsigned char* p, int n) noexcept nogil:
    cdef Py_ssize_t v = 0
    cdef int k
    for k in range(n - 1, -1, -1):
        v = (v << 8) | p[k]
    return v


cdef inline Py_ssize_t put_uint(unsigned char* dst, uint64_t v) noexcept nogil:
    cdef unsigned char tmp[20]
    cdef Py_ssize_t n = 0, i
    while True:
        tmp[n] = 48 + (v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    for i in range(n):
        dst[i] = tmp[n - 1 - i]
    return n


cdef bytes _shrunk(bytes out, Py_ssize_t size):
    """The first ``size`` octets of ``out``, copied without the GIL (a large
    mailbox's listing is tens of MB: the event loop runs meanwhile)."""
    cdef bytes res = PyBytes_FromStringAndSize(NULL, size)
    cdef char* dst = PyBytes_AS_STRING(res)
    cdef const char* src = PyBytes_AS_STRING(out)
    with nogil:
        memcpy(dst, src, size)
    return res


def format_list(const unsigned char[::1] buf, Py_ssize_t count, const unsigned char[::1] deleted):
    """LIST lines ("n size\\r\\n") for every message not marked deleted."""
    cdef bytes out
    cdef unsigned char* dst
    cdef const unsigned char* base
    cdef Py_ssize_t i, o = 0
    if count < 0 or buf.shape[0] < HEADER_SIZE + count * RECORD_SIZE or deleted.shape[0] < count:
        raise ValueError("index buffer too short")
    out = PyBytes_FromStringAndSize(NULL, count * 34 + 1)
    dst = <unsigned char*>PyBytes_AS_STRING(out)
    base = &buf[0]
    with nogil:  # (a large mailbox's is formatted in a thread: the event loop runs meanwhile)
        for i in range(count):
            if deleted[i]:
                continue
            o += put_uint(dst + o, i + 1)
            dst[o] = 32
            o += 1
            o += put_uint(dst + o, le64(base + HEADER_SIZE + i * RECORD_SIZE))
            dst[o] = 13
            dst[o + 1] = 10
            o += 2
    return _shrunk(out, o)


def format_uidl(const unsigned char[::1] buf, Py_ssize_t count, Py_ssize_t names_off,
                const unsigned char[::1] deleted):
    """UIDL lines ("n uidl\\r\\n") for every message not marked deleted."""
    cdef const unsigned char* base
    cdef const unsigned char* rec
    cdef Py_ssize_t i, o = 0, total = 0, name_off, name_len, uidl_len, n = buf.shape[0]
    cdef bint outside = False
    cdef bytes out
    cdef unsigned char* dst
    if count < 0 or n < HEADER_SIZE + count * RECORD_SIZE or deleted.shape[0] < count:
        raise ValueError("index buffer too short")
    base = &buf[0]
    with nogil:  # (a large mailbox's is formatted in a thread: the event loop runs meanwhile)
        for i in range(count):
            rec = base + HEADER_SIZE + i * RECORD_SIZE
            name_off = le_n(rec + 16, 4)
            name_len = le_n(rec + 20, 2)
            uidl_len = le_n(rec + 22, 2)
            if names_off + name_off + name_len + uidl_len > n:
                outside = True
                break
            total += uidl_len + 14
    if outside:
        raise ValueError("index record points outside the file")
    out = PyBytes_FromStringAndSize(NULL, total + 1)
    dst = <unsigned char*>PyBytes_AS_STRING(out)
    with nogil:
        for i in range(count):
            if deleted[i]:
                continue
            rec = base + HEADER_SIZE + i * RECORD_SIZE
            name_off = le_n(rec + 16, 4)
            name_len = le_n(rec + 20, 2)
            uidl_len = le_n(rec + 22, 2)
            o += put_uint(dst + o, i + 1)
            dst[o] = 32
            o += 1
            memcpy(dst + o, base + names_off + name_off + name_len, uidl_len)
            o += uidl_len
            dst[o] = 13
            dst[o + 1] = 10
            o += 2
    return _shrunk(out, o)


cdef inline bint bad_name(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Not one Maildir entry: empty, over 255 bytes, hidden (also . and ..), a "/" or NUL."""
    cdef Py_ssize_t k
    if n == 0 or n > 255 or p[0] == 46:  # "."
        return True
    for k in range(n):
        if p[k] == 47 or p[k] == 0:  # "/", NUL
            return True
    return False


cdef inline bint bad_uidl(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Not an RFC 1939 unique-id: 1 to 70 octets in 0x21-0x7E."""
    cdef Py_ssize_t k
    if n == 0 or n > 70:
        return True
    for k in range(n):
        if p[k] < 0x21 or p[k] > 0x7E:
            return True
    return False


# A worker thread checks large indexes (an index of 2 million records, which
# the Maildir's user can write, takes tens of milliseconds): the GIL is let go
# meanwhile so the event loop runs on.  Not for small ones, which the event
# loop checks itself and would then have to take the GIL back from a thread.
cdef Py_ssize_t NOGIL_RECORDS = 4096


def check_records(const unsigned char[::1] buf, Py_ssize_t count, Py_ssize_t names_off):
    """Sum of the records' sizes, after checking every record points inside
    the name table and holds a valid file name and UIDL; ValueError otherwise."""
    cdef const unsigned char* base
    cdef Py_ssize_t n = buf.shape[0]
    cdef uint64_t total = 0
    cdef int problem
    if count < 0 or n < HEADER_SIZE + count * RECORD_SIZE or names_off > n:
        raise ValueError("index buffer too short")
    base = &buf[0]
    if count >= NOGIL_RECORDS:
        with nogil:
            problem = _check(base, n, count, names_off, &total)
    else:
        problem = _check(base, n, count, names_off, &total)
    if problem:
        raise ValueError(_PROBLEMS[problem - 1])
    return total


_PROBLEMS = (
    "index record points outside the name table",
    "index record size out of range",
    "index record holds an invalid file name",
    "index record holds an invalid UIDL",
)


cdef int _check(const unsigned char* base, Py_ssize_t n, Py_ssize_t count, Py_ssize_t names_off,
                uint64_t* total_out) noexcept nogil:
    """check_records' loop: 0, or 1 + the index of its problem in _PROBLEMS."""
    cdef const unsigned char* rec
    cdef const unsigned char* name
    cdef Py_ssize_t i, name_len, uidl_len
    cdef uint64_t total = 0, size
    for i in range(count):
        rec = base + HEADER_SIZE + i * RECORD_SIZE
        name_len = le_n(rec + 20, 2)
        uidl_len = le_n(rec + 22, 2)
        if names_off + le_n(rec + 16, 4) + name_len + uidl_len > n:
            return 1
        size = le64(rec)
        if size > (<uint64_t>1 << 62) or total + size < total:
            return 2
        name = base + names_off + le_n(rec + 16, 4)
        if bad_name(name, name_len):
            return 3
        if bad_uidl(name + name_len, uidl_len):
            return 4
        total += size
    total_out[0] = total
    return 0
