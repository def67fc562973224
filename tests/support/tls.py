"""Shared by test_tls, test_sasl and test_security: certificates made by
trustme, a fastpop with TLS (its implicit-TLS port read from its log), and a
raw client that can switch to TLS in the middle of a connection."""

from __future__ import annotations

import base64
import re
import socket
import ssl
import time
from pathlib import Path

import pytest

from support.server import PARSERS, Raw, ServerProcess

trustme = pytest.importorskip("trustme")



class Certs:
    """A CA, and a server certificate for 127.0.0.1 and localhost signed by it."""

    def __init__(self, directory: Path, name: str = "ca"):
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        leaf = self.ca.issue_cert("127.0.0.1", "localhost", common_name="localhost")
        self.server_pem = directory / f"{name}-server.pem"  # key and chain in one file
        self.cert = directory / f"{name}-cert.pem"
        self.key = directory / f"{name}-key.pem"
        self.ca_pem = directory / f"{name}-ca.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(self.server_pem))
        self.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(self.key))
        self.ca.cert_pem.write_to_path(str(self.ca_pem))

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_pem))
        return ctx


class TLSServer(ServerProcess):
    """fastpop with --tls-cert/--tls-key and an implicit-TLS listener."""

    def __init__(self, root: Path, parser: str, certs: Certs, extra_args: list[str] | None = None,
                 implicit: bool = True):
        args = ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key)]
        if implicit:
            args += ["--listen-tls", "127.0.0.1:0"]
        super().__init__(root, parser, extra_args=args + list(extra_args or []))
        self.certs = certs
        self.implicit = implicit
        self.tls_port = 0

    def start(self, port: int = 0) -> None:
        super().start(port)
        if self.implicit:
            m = re.search(r"TLS listening on 127\.0\.0\.1:(\d+) \(implicit TLS\)", self.log()[self._log_offset:])
            assert m, self.log()
            self.tls_port = int(m.group(1))


def tls_server_fixture(request, tmp_path_factory, extra_args=None, implicit=True):
    root = tmp_path_factory.mktemp("fastpop-tls")
    certs = Certs(root / "certs")
    srv = TLSServer(root, PARSERS[request.param], certs, extra_args, implicit)
    srv.start()
    return srv


def stop_clean(srv: ServerProcess) -> None:
    rc = srv.stop()
    log = srv.log()
    assert "Traceback" not in log, log
    assert rc == 0, f"server exit code {rc}\n{log}"


class Conn(Raw):
    """A POP3 connection over a socket that may become TLS: exact bytes in and out."""

    def __init__(self, port: int, timeout: float = 10, tls: ssl.SSLContext | None = None,
                 source: str | None = None, greeting: bool = True):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.buf = bytearray()
        self.greeting = self.line() if greeting else b""

    def multi(self, text: str) -> list[bytes]:
        status = self.cmd(text)
        assert status.startswith(b"+OK"), (text, status)
        lines = []
        while True:
            line = self.line()
            if line == b".\r\n":
                return lines
            lines.append(line[:-2])

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert not self.buf, f"unread data before the handshake: {bytes(self.buf)!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def read_to_eof(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(line: bytes) -> bytes:
    assert line.startswith(b"+ "), line
    return base64.b64decode(line[2:].strip())


def wait_for_log(srv: ServerProcess, pattern: str, timeout: float = 10.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, srv.log())
        if m:
            return m
        time.sleep(0.02)
    raise AssertionError(f"{pattern!r} not in the server log:\n{srv.log()[-3000:]}")
