# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled POP3 command parser: framing, length limits, keyword, arguments.

The pure-Python twin is ``fastpop/wire/_parser_py.py``; both share the keyword
table in ``fastpop.wire.commands`` and must give identical results.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.stdint cimport uint32_t
from libc.string cimport memchr

from fastpop.wire.commands import (
    KEYWORDS,
    MAX_COMMAND_LINE,
    MAX_CONTINUATION_LINE,
    REST_OF_LINE,
    Command,
)

cdef int C_TOO_LONG = Command.TOO_LONG
cdef int C_INVALID = Command.INVALID
cdef object TOO_LONG_RESULT = (C_TOO_LONG, ())
cdef object INVALID_RESULT = (C_INVALID, ())

# Keywords packed big-endian into 32 bits (3 or 4 upper-case letters), so a
# lookup is a short scan of integer compares.
cdef enum:
    MAX_KEYWORDS = 64
cdef uint32_t _kw_packed[MAX_KEYWORDS]
cdef int _kw_code[MAX_KEYWORDS]
cdef bint _kw_rest[MAX_KEYWORDS]
cdef int _kw_count = 0

for _kw, _code in KEYWORDS.items():
    _packed = 0
    for _ch in _kw:
        _packed = (_packed << 8) | _ch
    _kw_packed[_kw_count] = _packed
    _kw_code[_kw_count] = _code
    _kw_rest[_kw_count] = _code in REST_OF_LINE
    _kw_count += 1


cdef inline int lookup_keyword(const unsigned char* p, Py_ssize_t n, bint* rest) noexcept:
    cdef uint32_t packed = 0
    cdef unsigned char c
    cdef Py_ssize_t i
    cdef int k
    if n < 3 or n > 4:
        return 0
    for i in range(n):
        c = p[i]
        if c >= 97 and c <= 122:  # a-z
            c -= 32
        packed = (packed << 8) | c
    for k in range(_kw_count):
        if _kw_packed[k] == packed:
            rest[0] = _kw_rest[k]
            return _kw_code[k]
    return 0


cdef inline object decode(const unsigned char* p, Py_ssize_t n, bint utf8):
    if utf8:
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    return PyUnicode_DecodeASCII(<const char*>p, n, NULL)


cdef class CommandParser:
    """Frames a byte stream into POP3 command lines.

    ``feed()`` appends received bytes; ``next_command()`` returns the next
    complete command as ``(code, args)`` or ``None``.  Lines end in CRLF or a
    bare LF.  A line longer than ``max_line`` octets (terminator included) is
    reported once as ``Command.TOO_LONG`` and skipped without being buffered.
    ``next_line()`` returns a raw SASL continuation line, limited by
    ``max_continuation`` instead.  No method raises on any input.
    """

    cdef bytes _buf
    cdef Py_ssize_t _pos
    cdef bint _skipping
    cdef public Py_ssize_t max_line
    cdef public Py_ssize_t max_continuation
    cdef public bint utf8

    def __cinit__(self, Py_ssize_t max_line=MAX_COMMAND_LINE,
                  Py_ssize_t max_continuation=MAX_CONTINUATION_LINE):
        self._buf = b""
        self._pos = 0
        self._skipping = False
        self.max_line = max_line
        self.max_continuation = max_continuation
        self.utf8 = False

    def feed(self, data):
        cdef const char* p
        cdef const char* nl
        if type(data) is not bytes:
            data = bytes(data)
        if self._skipping:
            p = PyBytes_AS_STRING(data)
            nl = <const char*>memchr(p, 10, PyBytes_GET_SIZE(data))
            if nl == NULL:
                return
            data = data[nl - p + 1:]
            self._skipping = False
        if self._pos >= PyBytes_GET_SIZE(self._buf):
            self._buf = data
        else:
            self._buf = self._buf[self._pos:] + data
        self._pos = 0

    def discard(self):
        """Drop everything buffered (STLS: nothing sent before TLS may count)."""
        self._buf = b""
        self._pos = 0
        self._skipping = False

    @property
    def buffered(self):
        return PyBytes_GET_SIZE(self._buf) - self._pos

    cdef Py_ssize_t _take_line(self, Py_ssize_t limit, Py_ssize_t* end):
        """Start of the next line (its end without terminator in *end);
        -1 if incomplete, -2 if too long."""
        cdef const unsigned char* base = <const unsigned char*>PyBytes_AS_STRING(self._buf)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(self._buf)
        cdef Py_ssize_t pos = self._pos
        cdef const unsigned char* nl
        cdef Py_ssize_t i
        if pos >= n:
            return -1
        nl = <const unsigned char*>memchr(base + pos, 10, n - pos)
        if nl == NULL:
            if n - pos >= limit:
                self._buf = b""
                self._pos = 0
                self._skipping = True
                return -2
            return -1
        i = nl - base
        self._pos = i + 1
        if i + 1 - pos > limit:
            return -2
        if i > pos and base[i - 1] == 13:
            i -= 1
        end[0] = i
        return pos

    def next_command(self):
        cdef Py_ssize_t end = 0
        cdef Py_ssize_t start = self._take_line(self.max_line, &end)
        cdef const unsigned char* p
        cdef Py_ssize_t i, n, sp, tok
        cdef unsigned char c
        cdef bint rest = False
        cdef int code
        if start == -1:
            return None
        if start == -2:
            return TOO_LONG_RESULT
        p = <const unsigned char*>PyBytes_AS_STRING(self._buf) + start
        n = end - start
        sp = -1
        for i in range(n):
            c = p[i]
            if c < 32 or c == 127 or (c >= 128 and not self.utf8):
                return INVALID_RESULT
            if c == 32 and sp < 0:
                sp = i
        if self.utf8:
            try:
                PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
            except UnicodeDecodeError:
                return INVALID_RESULT
        code = lookup_keyword(p, n if sp < 0 else sp, &rest)
        if code == 0 or sp < 0:
            return (code, ())
        if rest:
            if sp + 1 < n:
                return (code, (decode(p + sp + 1, n - sp - 1, self.utf8),))
            return (code, ())
        args = []
        i = sp + 1
        while i < n:
            if p[i] == 32:
                i += 1
                continue
            tok = i
            while i < n and p[i] != 32:
                i += 1
            args.append(decode(p + tok, i - tok, self.utf8))
        return (code, tuple(args))

    def next_line(self):
        """Next SASL continuation line: (True, line), (False, b"") if too long, or None."""
        cdef Py_ssize_t end = 0
        cdef Py_ssize_t start = self._take_line(self.max_continuation, &end)
        if start == -1:
            return None
        if start == -2:
            return (False, b"")
        return (True, self._buf[start:end])
