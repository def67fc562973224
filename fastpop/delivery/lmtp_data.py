"""An LMTP DATA as it arrives: the end of the message found and what came
before kept (``DotReader``), within the octets all connections of a process
may hold at once (``Budget``).  fastpop.delivery.lmtp feeds them."""

from __future__ import annotations

TERMINATOR = b"\r\n.\r\n"
FLUSH = 64 << 10  # DATA octets gathered before they are set aside as one piece


class DotReader:
    """The message of one DATA: fed what arrives, finds the CRLF "." CRLF
    that ends it (RFC 5321 4.1.1.4) and keeps what came before.

    The search is ``bytes.find`` over what arrived since the last call plus
    the four octets before it, so every octet is looked at a bounded number
    of times however the data is cut.  A CRLF is put in front of the data, so
    the end of an empty message (".") and a first line starting with "." are
    nothing special.  Lines end in CRLF (RFC 5321 2.3.8): a bare LF or CR is
    data.
    """

    __slots__ = ("budget", "held", "limit", "over_budget", "parts", "size", "_buf", "_scan")

    def __init__(self, limit: int, budget: Budget | None = None) -> None:
        self.limit = limit
        self.budget = budget  # shared by the connections: octets kept are counted in it
        self.held = 0  # octets counted in budget, given back by release()
        self.over_budget = False  # dropped because the budget was spent, not for its own size
        self.parts: list[bytes] | None = []  # None: over the limit, the rest is dropped
        self.size = -2  # octets of the message so far (the CRLF put in front not counted)
        self._buf = bytearray(b"\r\n")
        self._scan = 0

    @property
    def too_big(self) -> bool:
        return self.parts is None

    def feed(self, data: bytes) -> bytes | None:
        """Take ``data``; once the terminator is in, what followed it (the
        next commands, if any), else None."""
        buf = self._buf
        buf += data
        end = buf.find(TERMINATOR, self._scan)
        if end < 0:
            # The last 4 octets may begin the terminator; anything before them
            # is message for sure.
            settled = len(buf) - 4
            if settled >= FLUSH:
                self._keep(bytes(buf[:settled]))
                del buf[:settled]
            self._scan = max(0, len(buf) - 4)
            return None
        self._keep(bytes(buf[: end + 2]))  # the last line's CRLF is the message's
        rest = bytes(buf[end + 5 :])
        buf.clear()
        return rest

    def _keep(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.parts is None:
            return
        if self.size > self.limit:
            self.release()
        elif self.budget is not None and not self.budget.take(len(piece)):
            self.over_budget = True
            self.release()
        else:
            self.held += len(piece)
            self.parts.append(piece)

    def release(self) -> None:
        """Drop what is kept and give its octets back to the budget."""
        self.parts = None
        if self.budget is not None and self.held:
            self.budget.give(self.held)
        self.held = 0

    @staticmethod
    def assemble(parts: list[bytes]) -> bytes:
        """The message from ``parts``, dot-transparency removed (one pass)."""
        data = b"".join(parts)  # begins with the CRLF put in front
        if b"\r\n." in data:
            data = data.replace(b"\r\n.", b"\r\n")
        return data[2:]


class Budget:
    """Octets of DATA held by all the connections of a process (event loop only)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, octets: int) -> bool:
        if self.used + octets > self.limit:
            return False
        self.used += octets
        return True

    def give(self, octets: int) -> None:
        self.used = max(0, self.used - octets)
