"""The session's states and the reasons its command pull is suspended,
shared by the parts of the session (protocol, login, retrieval)."""

AUTHORIZATION, TRANSACTION, UPDATE, CLOSED = range(4)

# Reasons the command pull is suspended (bit flags).
BUSY_AUTH = 1  # a login is being checked
BUSY_SENDING = 2  # a message is streaming out
BUSY_WRITE_PAUSED = 4  # the transport's write buffer is full
BUSY_CLOSING = 8  # the connection is ending
BUSY_TLS = 16  # the STLS handshake is running
BUSY_YIELD = 32  # a burst of pipelined commands gives other sessions a turn
