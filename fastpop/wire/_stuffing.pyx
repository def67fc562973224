# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled RFC 1939 transform: LF to CRLF and dot-stuffing in one pass.

The pure-Python twin is ``fastpop/wire/_stuffing_py.py``; both give identical
output for any input split into any chunks.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcpy


cdef extern from *:
    """
    #if defined(__SSE2__) && defined(__GNUC__)
    #include <emmintrin.h>
    #endif
    /* The smallest j in [from, n), j >= 1, with p[j - 1] == LF and p[j] == ".":
       a line of p that starts with a dot (the caller looks at p[0] itself), or -1.
       SSE2 compares 64 bytes a turn without branching on the text, so the cost
       does not depend on how many lines or periods it holds. */
    static Py_ssize_t fastpop_dot_line(const unsigned char *p, Py_ssize_t n, Py_ssize_t from) {
        Py_ssize_t i = from < 1 ? 1 : from;
    #if defined(__SSE2__) && defined(__GNUC__)
        const __m128i lf = _mm_set1_epi8(10), dot = _mm_set1_epi8(46);
        while (i + 64 <= n) {
            __m128i m0 = _mm_and_si128(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + i - 1)), lf),
                                       _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + i)), dot));
            __m128i m1 = _mm_and_si128(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + i + 15)), lf),
                                       _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + i + 16)), dot));
            __m128i m2 = _mm_and_si128(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + i + 31)), lf),
                                       _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + i + 32)), dot));
            __m128i m3 = _mm_and_si128(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + i + 47)), lf),
                                       _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + i + 48)), dot));
            if (_mm_movemask_epi8(_mm_or_si128(_mm_or_si128(m0, m1), _mm_or_si128(m2, m3)))) {
                int k;
                __m128i ms[4] = {m0, m1, m2, m3};
                for (k = 0; k < 4; k++) {
                    int bits = _mm_movemask_epi8(ms[k]);
                    if (bits)
                        return i + 16 * k + __builtin_ctz((unsigned)bits);
                }
            }
            i += 64;
        }
        for (; i < n; i++)
            if (p[i] == 46 && p[i - 1] == 10)
                return i;
        return -1;
    #else
        const unsigned char *lf;
        while (i < n) {
            lf = (const unsigned char *)memchr(p + i - 1, 10, (size_t)(n - i));
            if (lf == NULL)
                return -1;
            i = lf - p + 1;
            if (p[i] == 46)
                return i;
            i++;
        }
        return -1;
    #endif
    }
    """
    Py_ssize_t fastpop_dot_line(const unsigned char* p, Py_ssize_t n, Py_ssize_t start) nogil


cdef inline bytes shrink(bytes buf, Py_ssize_t used):
    if used == PyBytes_GET_SIZE(buf):
        return buf
    return PyBytes_FromStringAndSize(PyBytes_AS_STRING(buf), used)


cdef class DotStuffer:
    """Streaming transform; feed chunks split anywhere, then finish()."""

    cdef bint _line_start
    cdef bint _pending_cr

    def __cinit__(self):
        self._line_start = True
        self._pending_cr = False

    cdef Py_ssize_t _transform(self, const unsigned char* src, Py_ssize_t n, unsigned char* dst):
        """Writes the transform of src[0:n] to dst (room for 2n + 1); returns its length."""
        cdef Py_ssize_t i = 0, j, o = 0, end
        cdef const unsigned char* lf
        cdef bint cr_before = False
        if self._pending_cr:
            self._pending_cr = False
            dst[o] = 13
            o += 1
            cr_before = True
            self._line_start = False
        while i < n:
            if self._line_start and src[i] == 46:  # a line starting with "."
                dst[o] = 46
                o += 1
            lf = <const unsigned char*>memchr(src + i, 10, n - i)
            if lf == NULL:
                end = n
                if src[n - 1] == 13:  # hold back a trailing CR
                    end = n - 1
                    self._pending_cr = True
                if end > i:
                    memcpy(dst + o, src + i, end - i)
                    o += end - i
                    self._line_start = False
                break
            j = lf - src
            if j > i:
                memcpy(dst + o, src + i, j - i)
                o += j - i
                cr_before = src[j - 1] == 13
            if not cr_before:
                dst[o] = 13
                o += 1
            dst[o] = 10
            o += 1
            self._line_start = True
            cr_before = False
            i = j + 1
        return o

    def feed(self, chunk):
        cdef bytes data = chunk if type(chunk) is bytes else bytes(chunk)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef bytes out
        cdef Py_ssize_t used
        if n == 0:
            return b""
        out = PyBytes_FromStringAndSize(NULL, 2 * n + 1)
        used = self._transform(<const unsigned char*>PyBytes_AS_STRING(data), n,
                               <unsigned char*>PyBytes_AS_STRING(out))
        return shrink(out, used)

    cdef Py_ssize_t _finish(self, unsigned char* dst):
        cdef Py_ssize_t o = 0
        if self._pending_cr:
            dst[o] = 13
            o += 1
            self._pending_cr = False
            self._line_start = False
        if not self._line_start:
            dst[o] = 13
            dst[o + 1] = 10
            o += 2
            self._line_start = True
        return o

    def finish(self):
        """What must follow the last chunk (before the ".\\r\\n" terminator)."""
        cdef unsigned char tail[3]
        cdef Py_ssize_t used = self._finish(tail)
        return PyBytes_FromStringAndSize(<char*>tail, used)


cdef bint _already_wire_form(const unsigned char* p, Py_ssize_t n):
    """Whether p[0:n] is its own transform: CRLF lines only, the last one
    ended, none starting with ".", as mail stored by an MTA mostly is."""
    cdef Py_ssize_t i = 0, j
    cdef const unsigned char* lf
    if n < 2 or p[0] == 46 or p[n - 1] != 10 or p[n - 2] != 13:
        return False
    while True:
        lf = <const unsigned char*>memchr(p + i, 10, n - i)
        j = lf - p  # never NULL: p[n - 1] is a LF
        if j == 0 or p[j - 1] != 13:
            return False
        if j + 1 == n:
            return True
        if p[j + 1] == 46:
            return False
        i = j + 1


def stuff_message(data):
    """Whole-message transform (the common, small-message path)."""
    cdef bytes src = data if type(data) is bytes else bytes(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(src)
    cdef DotStuffer s
    cdef bytes out
    cdef unsigned char* dst
    cdef Py_ssize_t used
    if n == 0:
        return b""
    if _already_wire_form(<const unsigned char*>PyBytes_AS_STRING(src), n):
        return src  # one scan, no copy
    s = DotStuffer()
    out = PyBytes_FromStringAndSize(NULL, 2 * n + 4)
    dst = <unsigned char*>PyBytes_AS_STRING(out)
    used = s._transform(<const unsigned char*>PyBytes_AS_STRING(src), n, dst)
    used += s._finish(dst + used)
    return shrink(out, used)


def pop3_size_of(data):
    """Octets RETR sends for this stored content, before dot-stuffing."""
    cdef bytes src = data if type(data) is bytes else bytes(data)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(src)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(src), i, bare_lf = 0
    if n == 0:
        return 0
    for i in range(n):
        if p[i] == 10 and (i == 0 or p[i - 1] != 13):
            bare_lf += 1
    return n + bare_lf + (0 if p[n - 1] == 10 else 2)


def line_dots(const unsigned char[::1] buf, Py_ssize_t base, bint after_lf, list out, Py_ssize_t most=-1):
    """Appends base + i for every buf[i] == "." that starts a line; a line
    starts at buf[0] if after_lf.  Returns whether buf ends with LF.
    ``most`` (if not negative): stops once it has appended that many (a
    window dense with dot lines is judged by the first few, not listed whole)."""
    cdef Py_ssize_t n = buf.shape[0], i = 1, added = 0
    cdef const unsigned char* p
    if n == 0:
        return after_lf
    p = &buf[0]
    if most == 0:
        return p[n - 1] == 10
    if after_lf and p[0] == 46:
        out.append(base)
        added = 1
    while added != most:
        i = fastpop_dot_line(p, n, i)
        if i < 0:
            break
        out.append(base + i)
        added += 1
        i += 1
    return p[n - 1] == 10


def first_dot_line(const unsigned char[::1] buf, bint after_lf):
    """The offset of the first "." that starts a line in buf (a line starts at
    buf[0] if after_lf), or -1 if no line of buf starts with one."""
    cdef Py_ssize_t n = buf.shape[0]
    if n == 0:
        return -1
    if after_lf and buf[0] == 46:
        return 0
    return fastpop_dot_line(&buf[0], n, 1)
