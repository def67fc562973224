# cython: language_level=3, boundscheck=False, wraparound=False
"""The bench client's in-place RETR check, compiled.

The twin of ``_wire_py.py``, which documents what is checked; both give the
same answer for any input (tests/test_bench_client.py runs both).  Here the
searches are memchr/memmem over the reply as it came off the socket, and the
SHA-256 is still hashlib's (OpenSSL), over a view of the body, not a copy.
"""

import hashlib

from cpython.buffer cimport PyBUF_READ
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.string cimport memcmp, memchr


cdef extern from "<string.h>" nogil:
    void* memmem(const void* haystack, size_t haystacklen, const void* needle, size_t needlelen)


cdef const char* CHECKSUM_NAME = b"X-Fastpop-Bench-Sha256:"
cdef enum:
    CHECKSUM_NAME_LEN = 23
    CHECKSUM_VALUE = CHECKSUM_NAME_LEN + 1  # after ": "
    CHECKSUM_LINE = CHECKSUM_VALUE + 64  # a SHA-256 in hex
    MAX_DIGITS = 18  # an announced size longer than this cannot be a real one: left to the reader

cdef object _sha256 = hashlib.sha256
cdef Py_ssize_t MAX_ANNOUNCED = 999_999_999_999_999_999  # MAX_DIGITS nines
cdef const char* HEX = b"0123456789abcdef"


cdef inline Py_ssize_t find(const char* p, Py_ssize_t start, Py_ssize_t end, const char* sub, Py_ssize_t k):
    """p[start:end].find(sub) as an index into p, or -1."""
    cdef const char* hit
    if end - start < k:
        return -1
    hit = <const char*>memmem(p + start, end - start, sub, k)
    return -1 if hit == NULL else hit - p


cdef inline Py_ssize_t count_stuffed(const char* p, Py_ssize_t start, Py_ssize_t end):
    """p[start:end].count(b"\\n..")"""
    cdef Py_ssize_t n = 0
    cdef const char* q = p + start
    cdef const char* stop = p + end - 2  # a match starts before this
    while q < stop:
        q = <const char*>memchr(q, 10, stop - q)
        if q == NULL:
            break
        if q[1] == 46 and q[2] == 46:
            n += 1
            q += 3
        else:
            q += 1
    return n


cdef inline bint is_space(char c):
    # bytes.split() with no separator: ASCII whitespace
    return c == 32 or c == 9 or c == 10 or c == 13 or c == 11 or c == 12


cdef Py_ssize_t announced_in(const char* p, Py_ssize_t end):
    """announced_size(p[:end]): the second whitespace-separated word if all digits, else -1."""
    cdef Py_ssize_t i = 0, start, digits, value = 0
    while i < end and is_space(p[i]):
        i += 1
    while i < end and not is_space(p[i]):  # the first word ("+OK")
        i += 1
    while i < end and is_space(p[i]):
        i += 1
    start = i
    while i < end and p[i] == 48:  # leading zeros count for nothing
        i += 1
    digits = i
    while i < end and 48 <= p[i] <= 57:
        if i - digits == MAX_DIGITS:
            return -2  # a number no message has: nothing can match it (and no overflow)
        value = value * 10 + (p[i] - 48)
        i += 1
    if i == start or (i < end and not is_space(p[i])):
        return -1
    return value


def announced_size(bytes status not None) -> int:
    """'+OK 1234 octets' -> 1234; -1 when the server does not say."""
    cdef Py_ssize_t v = announced_in(PyBytes_AS_STRING(status), PyBytes_GET_SIZE(status))
    if v == -2:
        return int(status.split(None, 2)[1])
    return v


def whole_retr(bytes data not None) -> int:
    """See ``_wire_py.whole_retr``."""
    cdef const char* p = PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data), i, announced
    if n < 3 or p[0] != 43 or p[1] != 79 or p[2] != 75:  # "+OK"
        return -1
    i = find(p, 0, n, b"\r\n", 2)
    if i < 0 or n - 5 <= i or memcmp(p + n - 5, b"\r\n.\r\n", 5) != 0:
        return -1
    announced = announced_in(p, i)
    if announced == -2:
        return -1  # no size of ours can match: let the reader say so
    return check(data, p, i + 2, n - 5, announced)


def verify_whole(bytes data not None, Py_ssize_t m, Py_ssize_t j, announced) -> int:
    """See ``_wire_py.verify_whole``."""
    if announced > MAX_ANNOUNCED:
        return -1  # no size of ours can match
    return check(data, PyBytes_AS_STRING(data), m, j, announced)


cdef Py_ssize_t check(bytes data, const char* p, Py_ssize_t m, Py_ssize_t j, Py_ssize_t announced) except -3:
    cdef Py_ssize_t h, k, e, size, x
    cdef char first = p[m]
    cdef bytes digest
    cdef const unsigned char* d
    cdef const char* expected
    if first == 13 or (first == 46 and p[m + 1] == 13):
        return -1  # no header block, or a "." line first
    h = find(p, m, j + 2, b"\r\n\r\n", 4)  # header block p[m : h + 2], body p[h + 4 : j + 2]
    if h < 0 or find(p, m, h + 4, b"\n.\r\n", 4) >= 0:
        return -1
    k = find(p, m, h + 2, CHECKSUM_NAME, CHECKSUM_NAME_LEN)
    if k < 0 or (k > m and p[k - 1] != 10):
        return -1
    e = k + CHECKSUM_LINE
    if e > h or p[e] != 13 or p[e + 1] != 10 or p[k + CHECKSUM_VALUE - 1] != 32:
        return -1
    digest = _sha256(PyMemoryView_FromMemory(<char*>p + h + 4, j + 2 - h - 4, PyBUF_READ)).digest()
    d = <const unsigned char*>PyBytes_AS_STRING(digest)
    expected = p + k + CHECKSUM_VALUE
    for x in range(32):  # as hexdigest() writes it: lower case
        if expected[2 * x] != HEX[d[x] >> 4] or expected[2 * x + 1] != HEX[d[x] & 15]:
            return -1
    size = (j + 2 - m - count_stuffed(p, h + 3, j + 2) - count_stuffed(p, m, h + 2)
            - (first == 46 and p[m + 1] == 46))
    if announced >= 0 and announced != size:
        return -1
    return size
