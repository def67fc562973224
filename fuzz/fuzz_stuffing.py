"""atheris harness: the compiled RFC 1939 transform against its pure-Python twin.

    python fuzz/fuzz_stuffing.py [libFuzzer flags] [CORPUS_DIR ...]
    python fuzz/run.py --seconds 600 stuffing        # bounded, with a summary

Each input is a stored message and the points where it is cut into chunks.
``fastpop.wire._stuffing`` and ``fastpop.wire._stuffing_py`` must give identical
results from ``DotStuffer`` (chunk by chunk and from ``finish``),
``stuff_message``, ``pop3_size_of`` and ``line_dots`` (differential), and
the output must keep the invariants:

- un-stuffing it (dropping the first "." of every line that starts with
  "..") gives the input with LF made CRLF and a final CRLF added when
  missing, as an independent reference computes it;
- every LF is preceded by CR, the output ends in CRLF (unless empty), no
  line is a lone "." (which would end the reply early), and no output
  line is more than 2 octets longer than its input line (the stuffing dot
  and the CR);
- ``pop3_size_of`` is the un-stuffed length (what LIST and STAT report);
- ``TopLimiter`` (pure Python, both paths use it) cuts the streamed output
  exactly where a whole-message reference cuts it.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from fastpop.wire import _stuffing_py
    from fastpop.wire.stuffing import TopLimiter

from fastpop.wire import _stuffing as _stuffing_c  # compiled: must exist

TWINS = (_stuffing_c, _stuffing_py)


class Mismatch(AssertionError):
    pass


def reference(data: bytes) -> bytes:
    """The un-stuffed wire form, computed independently of both twins."""
    if not data:
        return b""
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return out if out.endswith(b"\n") else out + b"\r\n"


def unstuff(wire: bytes) -> bytes:
    return b"\n".join(line[1:] if line.startswith(b"..") else line for line in wire.split(b"\n"))


def top_reference(wire: bytes, n: int) -> bytes:
    """TOP n of the un-stuffed wire form: header, blank line, n body lines."""
    if not wire:
        return b""
    lines = wire[:-2].split(b"\r\n")
    if b"" not in lines:
        return wire
    blank = lines.index(b"")
    return b"".join(line + b"\r\n" for line in lines[: blank + 1 + n])


def check(data: bytes, cuts: list[int], top_lines: int) -> None:
    chunks, prev = [], 0
    for c in sorted(cuts):
        chunks.append(data[prev:c])
        prev = c
    chunks.append(data[prev:])

    results = []
    for mod in TWINS:
        s = mod.DotStuffer()
        pieces = [s.feed(c) for c in chunks] + [s.finish()]
        dots: list[int] = []
        after, base = True, 0
        for c in chunks:
            after = mod.line_dots(c, base, after, dots)
            base += len(c)
        results.append((pieces, mod.stuff_message(data), mod.pop3_size_of(data), dots, after))
    if results[0] != results[1]:
        raise Mismatch(f"compiled {results[0]!r}\n  python {results[1]!r}\n  input {data!r} cuts {cuts!r}")

    pieces, whole, size, dots, after = results[0]
    out = b"".join(pieces)
    if out != whole:
        raise Mismatch(f"streamed {out!r} != whole {whole!r} for {data!r} cut at {cuts!r}")
    ref = reference(data)
    assert unstuff(out) == ref, (data, out, ref)
    assert size == len(ref), (data, size, len(ref))
    assert out.count(b"\n") == out.count(b"\r\n"), out
    assert not out or out.endswith(b"\r\n"), out
    assert b"\r\n.\r\n" not in b"\r\n" + out, out
    in_lines = data.split(b"\n")
    out_lines = out.split(b"\n")
    assert len(out_lines) == len(in_lines) + (0 if not data or data.endswith(b"\n") else 1), (data, out)
    for i, o in zip(in_lines, out_lines, strict=False):
        assert len(o) <= len(i) + 2, (i, o)
    # line_dots: the offsets of the "." that start lines
    want = [i for i in range(len(data)) if data[i] == 46 and (i == 0 or data[i - 1] == 10)]
    assert dots == want, (data, dots, want)
    assert after == (not data or data.endswith(b"\n")), (data, after)
    # TOP over the streamed pieces
    limiter = TopLimiter(top_lines)
    cut = b"".join(limiter.feed(p) for p in pieces)
    want_top = top_reference(ref, top_lines)
    assert unstuff(cut) == want_top, (data, cuts, top_lines, cut, want_top)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    top_lines = fdp.ConsumeIntInRange(0, 8)
    ncuts = fdp.ConsumeIntInRange(0, 8)
    message = fdp.ConsumeBytes(fdp.remaining_bytes() - 2 * ncuts if fdp.remaining_bytes() > 2 * ncuts else 0)
    cuts = [fdp.ConsumeIntInRange(0, len(message)) for _ in range(ncuts)]
    check(message, cuts, top_lines)


def main(argv: list[str]) -> None:
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
