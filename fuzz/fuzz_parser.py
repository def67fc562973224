"""atheris harness: the compiled command parser against its pure-Python twin.

    python fuzz/fuzz_parser.py [libFuzzer flags] [CORPUS_DIR ...]
    python fuzz/run.py --seconds 600 parser          # bounded, with a summary

Each input is a little program: limits, then a stream cut into chunks, each
chunk followed by a drain that reads commands or SASL continuation lines
(as the protocol does while an AUTH exchange waits), sometimes switching
UTF8 on or discarding the buffer (STLS).  ``fastpop.wire._parser.CommandParser``
and ``fastpop.wire._parser_py.CommandParser`` run the same program; every result
and ``buffered`` must be identical (differential fuzzing), and both must
keep the invariants:

- nothing raises, whatever the bytes;
- a command is a known code with str arguments, none empty or containing a
  space; a continuation line is at most ``max_continuation`` octets and has
  no LF;
- after a drain nothing complete is left and fewer octets than the limit
  stay buffered: memory never follows what a client sends.

Coverage guidance comes from the instrumented twin (the compiled module is
a black box to atheris unless built with -fsanitize=fuzzer-no-link).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from fastpop.wire import _parser_py
    from fastpop.wire.commands import NUM_CODES, REST_OF_LINE

from fastpop.wire import _parser as _parser_c  # compiled: must exist

TWINS = (_parser_c.CommandParser, _parser_py.CommandParser)


class Mismatch(AssertionError):
    pass


def drain(parser, lines: bool, limit: int) -> list:
    out = []
    while True:
        r = parser.next_line() if lines else parser.next_command()
        if r is None:
            break
        if lines:
            ok, data = r
            assert type(data) is bytes and len(data) <= limit and b"\n" not in data, r
            assert ok or data == b"", r
        else:
            code, args = r
            assert 0 <= code < NUM_CODES and type(args) is tuple, r
            assert all(type(a) is str and a for a in args), r
            if code not in REST_OF_LINE:
                assert all(" " not in a for a in args), r
        out.append(r)
    assert parser.buffered < limit or limit == 0, (parser.buffered, limit)
    return out


def run_program(data: bytes):
    fdp = atheris.FuzzedDataProvider(data)
    max_line = fdp.ConsumeIntInRange(1, 300)
    max_cont = fdp.ConsumeIntInRange(1, 600)
    parsers = [cls(max_line=max_line, max_continuation=max_cont) for cls in TWINS]
    results = [[] for _ in parsers]
    while fdp.remaining_bytes():
        op = fdp.ConsumeIntInRange(0, 15)
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 400))
        for p, res in zip(parsers, results, strict=True):
            if op == 0:
                p.discard()
            elif op == 1:
                p.utf8 = not p.utf8
            p.feed(chunk if op != 2 else bytearray(chunk))
            lines = op >= 13  # a SASL exchange reads the next lines raw
            res.append(drain(p, lines, max_cont if lines else max_line))
            res.append(p.buffered)
        if results[0] != results[1]:
            raise Mismatch(f"compiled {results[0]!r}\n  python {results[1]!r}\n  input {data!r}")
    return results


def TestOneInput(data: bytes) -> None:
    run_program(data)


def main(argv: list[str]) -> None:
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
