"""One POP3 connection: the RFC 1939 state machine (protocol), message
sending (sending), STLS (tls), sessions behind a PROXY header (proxied)
and the counting session (metered).

A session sees its server only through context.SessionContext.  Imports
auth, store, wire and the leaves.
"""
