# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled engine of the trivial POP3 responder: one epoll loop, no asyncio.

The trivial responder is the yardstick of the load generator: what bench
reaches against it is the generator's own ceiling, so every CPU cycle it
spends is one the generator does not get on a small machine.  This engine
answers with the same canned replies as the asyncio twin
(``trivial.TrivialProtocol``) but costs little more than the system calls a
session needs: accept, a read and a send per command, close.

Linux only (epoll, accept4), as fastpop is.  One command is answered at a
time: while a reply is still being sent, the connection's input waits.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from libc.errno cimport EAGAIN, EINTR, EMFILE, ENFILE, errno
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memmove, strlen
from libc.time cimport time, time_t


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        int fd
    struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

cdef extern from "<sys/socket.h>" nogil:
    int accept4(int sockfd, void* addr, void* addrlen, int flags)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    enum:
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        MSG_NOSIGNAL

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void* buf, size_t n)
    int close(int fd)


cdef enum:
    IN_SIZE = 1024  # a command line longer than this closes the connection
    MAX_EVENTS = 256

cdef const char* OK = b"+OK\r\n"
cdef const char* BYE = b"+OK bye\r\n"
cdef const char* GREETING = b"+OK trivial ready\r\n"
cdef const char* NO_SUCH = b"-ERR no such message\r\n"
cdef Py_ssize_t OK_LEN = strlen(OK), BYE_LEN = strlen(BYE), GREETING_LEN = strlen(GREETING)
cdef Py_ssize_t NO_SUCH_LEN = strlen(NO_SUCH)


cdef struct Conn:
    const char* out      # the rest of the reply being sent, or NULL
    Py_ssize_t out_len
    bint closing         # close once ``out`` is sent (after QUIT)
    Py_ssize_t used      # bytes in inbuf
    char inbuf[IN_SIZE]


cdef inline unsigned int word(const char* p):
    """The first four bytes of a command, upper-cased, as one number."""
    return ((<unsigned int>(p[0] & 0xDF) << 24) | (<unsigned int>(p[1] & 0xDF) << 16)
            | (<unsigned int>(p[2] & 0xDF) << 8) | <unsigned int>(p[3] & 0xDF))


cdef unsigned int W_RETR = word(b"RETR"), W_STAT = word(b"STAT"), W_UIDL = word(b"UIDL")
cdef unsigned int W_LIST = word(b"LIST"), W_CAPA = word(b"CAPA"), W_QUIT = word(b"QUIT")


cdef class TrivialEngine:
    """Serves one listening socket until a signal handler raises."""

    cdef int epfd
    cdef int listen_fd
    cdef int wakeup_fd  # signal.set_wakeup_fd's: readable when a signal came
    cdef bint accepting  # False while out of descriptors
    cdef time_t resume_at  # then: when to try again
    cdef object keep  # the Python objects whose buffers the replies point into
    cdef const char** retr
    cdef Py_ssize_t* retr_len
    cdef const char** corrupted
    cdef Py_ssize_t* corrupted_len
    cdef Py_ssize_t messages
    cdef const char* stat
    cdef Py_ssize_t stat_len
    cdef const char* uidl
    cdef Py_ssize_t uidl_len
    cdef const char* listing
    cdef Py_ssize_t listing_len
    cdef const char* capa
    cdef Py_ssize_t capa_len
    cdef long corrupt
    cdef long retr_count
    cdef Conn** conns
    cdef int max_fd

    def __cinit__(self):
        self.epfd = -1
        self.conns = NULL
        self.retr = NULL
        self.retr_len = NULL
        self.corrupted = NULL
        self.corrupted_len = NULL

    def __init__(self, int listen_fd, int wakeup_fd, state, bytes capa, int max_fd=65536):
        """``state`` is a ``trivial.TrivialState``; ``listen_fd`` a non-blocking listening
        socket; ``wakeup_fd`` the read end of the non-blocking pair given to
        ``signal.set_wakeup_fd``, so that a signal wakes the loop wherever it lands."""
        cdef Py_ssize_t i
        cdef bytes b
        self.listen_fd = listen_fd
        self.wakeup_fd = wakeup_fd
        self.accepting = True
        self.keep = (state, capa, list(state.retr), list(state.corrupted))
        self.messages = len(state.retr)
        self.retr = <const char**>malloc(sizeof(char*) * (self.messages + 1))
        self.retr_len = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (self.messages + 1))
        self.corrupted = <const char**>malloc(sizeof(char*) * (self.messages + 1))
        self.corrupted_len = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (self.messages + 1))
        if not (self.retr and self.retr_len and self.corrupted and self.corrupted_len):
            raise MemoryError()
        for i in range(self.messages):
            b = self.keep[2][i]
            self.retr[i] = PyBytes_AS_STRING(b)
            self.retr_len[i] = PyBytes_GET_SIZE(b)
            b = self.keep[3][i]
            self.corrupted[i] = PyBytes_AS_STRING(b)
            self.corrupted_len[i] = PyBytes_GET_SIZE(b)
        self.stat, self.stat_len = PyBytes_AS_STRING(state.stat), PyBytes_GET_SIZE(state.stat)
        self.uidl, self.uidl_len = PyBytes_AS_STRING(state.uidl), PyBytes_GET_SIZE(state.uidl)
        self.listing, self.listing_len = PyBytes_AS_STRING(state.list), PyBytes_GET_SIZE(state.list)
        self.capa, self.capa_len = PyBytes_AS_STRING(capa), PyBytes_GET_SIZE(capa)
        self.corrupt = state.corrupt
        self.retr_count = 0
        self.max_fd = max_fd
        self.conns = <Conn**>malloc(sizeof(Conn*) * max_fd)
        if self.conns == NULL:
            raise MemoryError()
        for i in range(max_fd):
            self.conns[i] = NULL

    def __dealloc__(self):
        cdef int fd
        if self.conns != NULL:
            for fd in range(self.max_fd):
                if self.conns[fd] != NULL:
                    close(fd)
                    free(self.conns[fd])
            free(self.conns)
        if self.epfd >= 0:
            close(self.epfd)
        free(self.retr)
        free(self.retr_len)
        free(self.corrupted)
        free(self.corrupted_len)

    def serve(self) -> None:
        """Runs the loop; returns only by an exception (a signal handler's, or OSError)."""
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i, fd
        cdef char drain[64]
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            PyErr_SetFromErrno(OSError)  # raises
        self._watch(self.listen_fd, EPOLL_CTL_ADD)
        self._watch(self.wakeup_fd, EPOLL_CTL_ADD)
        while True:
            # out of descriptors, the listening socket (level-triggered) is left out
            # of the set for a while rather than spun on
            n = epoll_wait(self.epfd, events, MAX_EVENTS, -1 if self.accepting else 100)
            if n < 0 and errno != EINTR:
                PyErr_SetFromErrno(OSError)  # raises
            PyErr_CheckSignals()  # runs the signal handlers; their exception ends the loop
            if not self.accepting and time(NULL) >= self.resume_at:
                self.accepting = True
                self._watch(self.listen_fd, EPOLL_CTL_ADD)
            for i in range(n):
                fd = events[i].data.fd
                if fd == self.listen_fd:
                    self._accept()
                elif fd == self.wakeup_fd:
                    while read(fd, drain, sizeof(drain)) > 0:
                        pass
                elif events[i].events & EPOLLOUT:
                    self._flush(fd)
                else:
                    self._readable(fd)

    cdef void _watch(self, int fd, int op) except *:
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.fd = fd
        if epoll_ctl(self.epfd, op, fd, &ev) < 0:
            PyErr_SetFromErrno(OSError)

    cdef void _accept(self):
        cdef int fd
        cdef Conn* c
        cdef epoll_event ev
        while True:
            fd = accept4(self.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EMFILE or errno == ENFILE:
                    self.accepting = False
                    self.resume_at = time(NULL) + 1
                    epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.listen_fd, &ev)
                return
            if fd >= self.max_fd:
                close(fd)
                continue
            c = <Conn*>malloc(sizeof(Conn))
            if c == NULL:
                close(fd)
                continue
            c.out = NULL
            c.closing = False
            c.used = 0
            self.conns[fd] = c
            ev.events = EPOLLIN
            ev.data.fd = fd
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
                self._close(fd)
                continue
            self._send(fd, c, GREETING, GREETING_LEN)

    cdef void _close(self, int fd):
        close(fd)  # also takes it out of the epoll set
        free(self.conns[fd])
        self.conns[fd] = NULL

    cdef bint _send(self, int fd, Conn* c, const char* data, Py_ssize_t n):
        """Sends a reply; what the socket does not take waits for EPOLLOUT.  False if fd was closed."""
        cdef ssize_t sent = send(fd, data, n, MSG_NOSIGNAL)
        cdef epoll_event ev
        if sent == n:
            if c.closing:
                self._close(fd)
                return False
            return True
        if sent < 0:
            if errno != EAGAIN:
                self._close(fd)
                return False
            sent = 0
        c.out = data + sent
        c.out_len = n - sent
        ev.events = EPOLLOUT
        ev.data.fd = fd
        epoll_ctl(self.epfd, EPOLL_CTL_MOD, fd, &ev)
        return True

    cdef void _flush(self, int fd):
        cdef Conn* c = self.conns[fd]
        cdef const char* data
        cdef epoll_event ev
        if c == NULL:
            return
        data = c.out
        c.out = NULL
        ev.events = EPOLLIN
        ev.data.fd = fd
        epoll_ctl(self.epfd, EPOLL_CTL_MOD, fd, &ev)
        if self._send(fd, c, data, c.out_len):
            self._answer(fd, c)  # commands that arrived while the reply was going out

    cdef void _readable(self, int fd):
        cdef Conn* c = self.conns[fd]
        cdef ssize_t got
        if c == NULL:
            return
        got = read(fd, c.inbuf + c.used, IN_SIZE - c.used)
        if got <= 0:
            if got == 0 or errno != EAGAIN:
                self._close(fd)
            return
        c.used += got
        self._answer(fd, c)

    cdef void _answer(self, int fd, Conn* c):
        """Answers the complete command lines in c.inbuf, one at a time."""
        cdef const char* line
        cdef const char* lf
        cdef Py_ssize_t length, i, k
        cdef unsigned int w
        cdef const char* reply
        cdef Py_ssize_t reply_len
        while c.out == NULL:
            line = c.inbuf
            lf = <const char*>memchr(line, 10, c.used)
            if lf == NULL:
                if c.used == IN_SIZE:
                    self._close(fd)
                return
            length = lf - line
            if length and line[length - 1] == 13:
                length -= 1
            reply, reply_len = OK, OK_LEN  # USER, PASS, AUTH, DELE, NOOP, RSET: all fine
            w = word(line) if length >= 4 else 0
            if w == W_RETR:
                k = 0
                i = 5
                while i < length and 48 <= line[i] <= 57 and k < 1000000000:
                    k = k * 10 + (line[i] - 48)
                    i += 1
                if length <= 5 or i != length or k < 1 or k > self.messages:
                    reply, reply_len = NO_SUCH, NO_SUCH_LEN
                else:
                    self.retr_count += 1
                    if self.corrupt and self.retr_count % self.corrupt == 0:
                        reply, reply_len = self.corrupted[k - 1], self.corrupted_len[k - 1]
                    else:
                        reply, reply_len = self.retr[k - 1], self.retr_len[k - 1]
            elif w == W_STAT:
                reply, reply_len = self.stat, self.stat_len
            elif w == W_UIDL:
                reply, reply_len = self.uidl, self.uidl_len
            elif w == W_LIST:
                reply, reply_len = self.listing, self.listing_len
            elif w == W_CAPA:
                reply, reply_len = self.capa, self.capa_len
            elif w == W_QUIT:
                reply, reply_len = BYE, BYE_LEN
                c.closing = True
            c.used -= lf + 1 - line
            if c.used:
                memmove(c.inbuf, lf + 1, c.used)
            if not self._send(fd, c, reply, reply_len):
                return
