"""Maildir file names, as the Maildir and Maildir++ specifications and
Dovecot write them: ``<time>.<unique>,S=<size>,W=<rfc822 size>:2,<flags>``.

Every name comes from a directory the user can write: nothing here trusts
one.  Sizes are ASCII digits or absent (str.isdigit() also takes digits
such as "²", which int() refuses), a UIDL is made RFC 1939-valid whatever
the name holds (fastpop.store.courier.safe_uidl), and info that is not of
the ``:2,`` kind is left alone.
"""

from __future__ import annotations

from fastpop.store import courier


def parse_name(name: str) -> tuple[str, int, int]:
    """'123.M4P5.host,S=100,W=102:2,S' -> (base, S, W); sizes -1 when absent."""
    base = name.split(":", 1)[0]
    s = w = -1
    fields = base.split(",")
    for f in fields[1:]:
        if f.startswith("S="):
            s = _int_or(f[2:], -1)
        elif f.startswith("W="):
            w = _int_or(f[2:], -1)
    return fields[0], s, w


def _int_or(text: str, default: int) -> int:
    return int(text) if text.isascii() and text.isdigit() else default


def uidl_of(name: str) -> str:
    """A stable UIDL from the Maildir unique name (RFC 1939: 1-70 chars, 0x21-0x7E)."""
    return courier.safe_uidl(name.split(":", 1)[0].split(",", 1)[0])


def with_flag(name: str, flag: str) -> str | None:
    """The Maildir name of this message with ``flag`` added to its ``:2,``
    info (flags kept in ASCII order, as the specification asks), or None if
    it has it already or its info is not of the ``:2,`` kind."""
    base, sep, info = name.partition(":")
    if not sep:
        return f"{base}:2,{flag}"
    if not info.startswith("2,"):
        return None  # experimental ":1," info: left alone
    flags = info[2:]
    if flag in flags:
        return None
    return f"{base}:2,{''.join(sorted(flags + flag))}"


def base_name(name: str) -> str:
    """The unique part of a Maildir name: what is left of its ``:`` info."""
    return name.split(":", 1)[0]


def delivery_order(name: str) -> tuple[int, str]:
    """A sort key putting Maildir names in delivery order (the leading time first)."""
    head = name.split(".", 1)[0]
    # ASCII only: str.isdigit() also takes digits such as "²", which int() refuses
    return (int(head) if head.isascii() and head.isdigit() else 0, name)



def has_flag(name: str, flag: str) -> bool:
    """Whether the ``:2,`` info of this Maildir name holds ``flag``."""
    _, sep, info = name.partition(":")
    return bool(sep) and info.startswith("2,") and flag in info[2:]
