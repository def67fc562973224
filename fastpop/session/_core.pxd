# Cython's declarations for _core_py.py compiled as fastpop.session._core (an
# augmenting .pxd: Cython reads it beside the .py under the compiled module's
# name).  Every field is public: the Python parts of POP3Protocol (Login,
# Retrieval, STLS), its subclasses and the tests read and set them.  cpdef:
# called from those parts and, as C calls, from the core.  cdef: the core's
# own steps, never called from Python.  The hooks that subclasses override
# (_unbusy, _on_logged_in, connection_lost...) stay def: called through the
# instance, with the signature tests/test_protocol_hooks.py compares.
cimport cython

cdef int AUTHORIZATION, TRANSACTION, UPDATE, CLOSED
cdef int BUSY_AUTH, BUSY_CLOSING, BUSY_SENDING, BUSY_TLS, BUSY_WRITE_PAUSED, BUSY_YIELD
cdef Py_ssize_t FLUSH_BYTES, FLUSH_REPLIES, SMALL_MESSAGE
cdef long long MAX_TOP_LINES


cdef class SessionCore:
    cdef public object _ctx
    cdef public object loop
    cdef public object transport
    cdef public object _parser
    cdef public int _state
    cdef public tuple _table
    cdef public list _out
    cdef public Py_ssize_t _out_size
    cdef public int _busy
    cdef public bint _in_process
    cdef public bint _reading_paused
    cdef public double _last_activity
    cdef public object _timer
    cdef public object _timestamp
    cdef public object _peer
    cdef public object _user_name
    cdef public object _user
    cdef public Py_ssize_t _auth_failures
    cdef public Py_ssize_t _bad_commands
    cdef public object _lock
    cdef public object _mailbox
    cdef public bytearray _deleted
    cdef public Py_ssize_t _deleted_count
    cdef public long long _deleted_size
    cdef public object _stream
    cdef public bint _stream_is_top
    cdef public long long _top_count
    cdef public long long _top_bytes
    cdef public long long _retr_count
    cdef public long long _retr_bytes
    cdef public object _end_reason
    cdef public bint _implicit_tls
    cdef public bint _secure
    cdef public bint _trusted
    cdef public object _addr_key
    cdef public bint _counted
    cdef public object _tls_task
    cdef public object _auth
    cdef public bint _auth_wants_line
    cdef public double _auth_started
    cdef public object _auth_failure
    cdef public object _auth_mech
    cdef public Py_ssize_t _last_retr
    cdef public double _since
    cdef public bint _cap_exempt
    cdef public object _master
    cdef public bint _proxy_master

    @cython.locals(out=list, cmd=tuple)
    cdef _process(self)
    @cython.locals(out=list)
    cpdef _flush(self)
    cpdef _close(self, reason)
    cdef _rearm_timer(self)
    cdef double _timeout(self)
    cpdef _bad(self, bytes reply)
    @cython.locals(n=Py_ssize_t)
    cpdef Py_ssize_t _message_index(self, arg) except? -2
    cpdef _run_auth(self, exchange)
    cpdef _auth_step(self, value, exc)
    cdef _auth_resume(self)
    cpdef _auth_finished(self, outcome)
    cdef _login_succeeded(self, user)
    cdef _open_mailbox(self, user)
    @cython.locals(index=Py_ssize_t, top=Py_ssize_t, size=Py_ssize_t, fd=int)
    cdef _send(self, index, top)
    cpdef _enter_transaction(self, user, lock, mailbox)
    cpdef _finish_login(self, bytes reply, refused=*)
    cdef _release_mailbox(self)
    cdef _log_end(self)
