"""POP3 command codes shared by both parser implementations and the protocol.

The parser turns a command line into one of these codes plus its arguments;
the protocol dispatches on the code.  The first three codes are not commands
but what the parser reports for lines it cannot turn into one.
"""

from __future__ import annotations

import enum


class Command(enum.IntEnum):
    UNKNOWN = 0  # a well-formed line whose keyword is not a POP3 command
    TOO_LONG = 1  # the line exceeded the length limit (reported once)
    INVALID = 2  # NUL, control characters, non-ASCII or invalid UTF-8
    USER = 3
    PASS = 4
    APOP = 5
    QUIT = 6
    STAT = 7
    LIST = 8
    RETR = 9
    DELE = 10
    NOOP = 11
    RSET = 12
    TOP = 13
    UIDL = 14
    CAPA = 15
    AUTH = 16
    STLS = 17
    UTF8 = 18
    LAST = 19  # RFC 1460's, obsolete: answered only with [pop3] last on (fastpop.session.protocol)


# Keyword (upper case) -> code.  Every RFC 1939/2449/2595/5034/6856 keyword, and RFC 1460's LAST.
KEYWORDS: dict[bytes, int] = {
    c.name.encode("ascii"): int(c) for c in Command if c > Command.INVALID
}

# Commands whose argument is the rest of the line, spaces included (a
# password may contain spaces; RFC 1939 leaves PASS's argument unstructured).
REST_OF_LINE: frozenset[int] = frozenset({Command.PASS})

NUM_CODES = len(Command)

# RFC 2449: a command line is at most 255 octets including CRLF.
MAX_COMMAND_LINE = 255
# SASL continuation lines (RFC 5034) carry base64 tokens; OAuth tokens are long.
MAX_CONTINUATION_LINE = 16384
