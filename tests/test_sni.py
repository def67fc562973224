"""Several certificates chosen by SNI ([tls] sni, [tls] cert_dir), against a
real fastpop over loopback, with openssl s_client and Python's ssl client:
which certificate each name gets, on the implicit-TLS port and after STLS;
renewals picked up without SIGHUP (a file rewritten in place, certbot's
symlink swap into archive/, a new domain in the directory); a broken
replacement (bad PEM, a key that does not match) logged and the old
certificate kept; SIGHUP; two workers; and a key the server's user cannot
read after the switch of user."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from support.server import ServerProcess, message
from support.tls import stop_clean, trustme, wait_for_log

from fastpop.config import Config, load_toml
from fastpop.serve.validation import validate_all
from fastpop.session.tls import names_in_file

OPENSSL = shutil.which("openssl")
INTERVAL = 0.3  # --tls-reload-interval of these servers: seconds


class Issuer:
    """One CA; leaf certificates for given names, told apart by their OU (a "generation")."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.ca_file = tempfile.NamedTemporaryFile(suffix=".pem")  # (removed when collected)
        self.ca.cert_pem.write_to_path(self.ca_file.name)

    def write(self, names: list[str], generation: str, chain: Path, key: Path | None = None) -> None:
        """The leaf's chain (and its key: into ``chain`` too when ``key`` is None)."""
        leaf = self.ca.issue_cert(*names, common_name=names[0], organization_unit_name=generation)
        chain.parent.mkdir(parents=True, exist_ok=True)
        pems = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        if key is None:
            _replace(chain, leaf.private_key_pem.bytes() + pems)
        else:
            _replace(chain, pems)
            _replace(key, leaf.private_key_pem.bytes())

    def client(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        ctx.check_hostname = False  # the name may be unknown to the server: which certificate came is the test
        return ctx


def _replace(path: Path, data: bytes) -> None:
    """Write as a renewal does: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def certbot_renew(archive: Path, live: Path, issuer: Issuer, names: list[str], generation: str, n: int) -> None:
    """As certbot does: archive/DOMAIN/fullchainN.pem and privkeyN.pem written,
    then live/DOMAIN/'s symlinks swapped to them (a new link renamed over the old)."""
    issuer.write(names, generation, archive / f"fullchain{n}.pem", archive / f"privkey{n}.pem")
    live.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(archive, live)
    for kind in ("fullchain", "privkey"):
        tmp = live / f".{kind}.new"
        os.symlink(f"{rel}/{kind}{n}.pem", tmp)
        os.replace(tmp, live / f"{kind}.pem")


def presented(port: int, name: str | None, issuer: Issuer, starttls: bool = False) -> tuple[str, str]:
    """(CN, OU) of the certificate a Python ssl client gets, asking for ``name`` by SNI."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if starttls:
            f = sock.makefile("rb")
            assert f.readline().startswith(b"+OK")
            sock.sendall(b"STLS\r\n")
            assert f.readline().startswith(b"+OK Begin TLS")
            f.close()
        tls = issuer.client().wrap_socket(sock, server_hostname=name)
        try:
            if not starttls:
                greeting = tls.recv(1024)
                assert greeting.startswith(b"+OK"), greeting
            subject = dict(pair[0] for pair in tls.getpeercert()["subject"])
            return subject["commonName"], subject["organizationalUnitName"]
        finally:
            tls.close()
    finally:
        sock.close()


def s_client(port: int, name: str | None, issuer: Issuer, starttls: bool = False) -> tuple[str, str]:
    """(CN, OU) of the certificate ``openssl s_client`` gets (-servername NAME, or -noservername)."""
    args = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", issuer.ca_file.name, "-ign_eof"]
    args += ["-servername", name] if name else ["-noservername"]
    if starttls:
        args += ["-starttls", "pop3"]
    res = subprocess.run(args, input=b"quit\r\n", capture_output=True, timeout=20)
    out = res.stdout.decode(errors="replace")
    m = re.search(r"^subject=(.*)$", out, re.MULTILINE)
    assert m, f"no certificate from s_client {args}:\n{out}\n{res.stderr.decode(errors='replace')}"
    fields = dict(part.strip().split(" = ", 1) for part in m.group(1).split(", "))
    assert "Verify return code: 0 (ok)" in out, out
    # QUIT answered over TLS (lower case: s_client takes a line "Q..." for its own quit)
    assert re.search(r"^\+OK Logging out", out, re.MULTILINE), out
    return fields["CN"], fields["OU"]


class SNIServer(ServerProcess):
    def __init__(self, root: Path, args: list[str], workers: int = 1):
        super().__init__(root, "cython", extra_args=[*args, "--listen-tls", "127.0.0.1:0",
                                                     "--workers", str(workers)])
        self.tls_port = 0

    def start(self, port: int = 0) -> None:
        super().start(port)
        m = re.search(r"TLS listening on 127\.0\.0\.1:(\d+)", self.log()[self._log_offset:])  # (each worker's)
        assert m, self.log()
        self.tls_port = int(m.group(1))


def wait_until(what, want, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@pytest.fixture
def hosting(tmp_path):
    """A default certificate, a [tls] sni map (one name with its own key file,
    a wildcard in one PEM), and a certbot-style cert_dir with one domain."""
    issuer = Issuer()
    certs = tmp_path / "certs"
    issuer.write(["default.test"], "default-1", certs / "default.pem")
    issuer.write(["mail.alpha.test", "pop.alpha.test"], "alpha-1", certs / "alpha.crt", certs / "alpha.key")
    issuer.write(["*.wild.test"], "wild-1", certs / "wild.pem")
    letsencrypt = tmp_path / "letsencrypt"
    certbot_renew(letsencrypt / "archive" / "beta.test", letsencrypt / "live" / "beta.test", issuer,
                  ["beta.test", "mail.beta.test"], "beta-1", 1)
    (letsencrypt / "live" / "README").write_text("certbot leaves this here\n")
    args = ["--tls-cert", str(certs / "default.pem"),
            "--tls-sni", f"mail.alpha.test={certs / 'alpha.crt'},{certs / 'alpha.key'}",
            "--tls-sni", f"pop.alpha.test={certs / 'alpha.crt'},{certs / 'alpha.key'}",
            "--tls-sni", f"*.wild.test={certs / 'wild.pem'}",
            "--tls-cert-dir", str(letsencrypt / "live"),
            "--tls-reload-interval", str(INTERVAL)]
    return issuer, certs, letsencrypt, args


# ----------------------------------------------------------------- which certificate


@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")
def test_each_name_gets_its_certificate(tmp_path, hosting):
    issuer, _, _, args = hosting
    srv = SNIServer(tmp_path, args)
    srv.start()
    try:
        wait_for_log(srv, r"TLS: 3 certificates chosen by SNI \(4 names, 1 wildcards\)")
        want = {
            "mail.alpha.test": ("mail.alpha.test", "alpha-1"),
            "POP.Alpha.Test": ("mail.alpha.test", "alpha-1"),  # names are not case-sensitive
            "beta.test": ("beta.test", "beta-1"),  # from the directory: the certificate's own names
            "mail.beta.test": ("beta.test", "beta-1"),
            "x.wild.test": ("*.wild.test", "wild-1"),
            "a.b.wild.test": ("default.test", "default-1"),  # a wildcard is one label
            "wild.test": ("default.test", "default-1"),
            "unknown.test": ("default.test", "default-1"),
            None: ("default.test", "default-1"),  # no SNI
        }
        for name, expected in want.items():
            for starttls, port in ((False, srv.tls_port), (True, srv.port)):
                assert s_client(port, name, issuer, starttls) == expected, (name, starttls)
                assert presented(port, name, issuer, starttls) == expected, (name, starttls)
        # A whole session over an SNI certificate, verified as a client would (name checked).
        user = srv.add_user(messages=[message("over sni")])
        ctx = issuer.client()
        ctx.check_hostname = True
        with socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10) as sock, \
                ctx.wrap_socket(sock, server_hostname="mail.beta.test") as tls:
            f = tls.makefile("rwb")
            assert f.readline().startswith(b"+OK")
            for line in (f"USER {user.name}", f"PASS {user.password}", "STAT"):
                f.write(line.encode() + b"\r\n")
                f.flush()
                reply = f.readline()
                assert reply.startswith(b"+OK"), (line, reply)
            assert reply.startswith(b"+OK 1 ")
    finally:
        stop_clean(srv)


# ----------------------------------------------------------------- renewals without SIGHUP


def test_renewals_are_served_without_sighup(tmp_path, hosting):
    issuer, certs, letsencrypt, args = hosting
    srv = SNIServer(tmp_path, args)
    srv.start()
    try:
        port = srv.tls_port
        assert presented(port, "beta.test", issuer) == ("beta.test", "beta-1")
        # certbot: new files in archive/, live/'s symlinks swapped; the paths fastpop was given never change
        certbot_renew(letsencrypt / "archive" / "beta.test", letsencrypt / "live" / "beta.test", issuer,
                      ["beta.test", "mail.beta.test"], "beta-2", 2)
        assert wait_until(lambda: presented(port, "mail.beta.test", issuer), ("beta.test", "beta-2"),
                          timeout=INTERVAL * 10) == ("beta.test", "beta-2")
        wait_for_log(srv, r"TLS certificate for beta\.test, mail\.beta\.test reloaded from .*live/beta\.test/"
                          r"fullchain\.pem .* \(generation 2\) on a change of its files")
        # A file of the map rewritten in place (same inode, new contents)
        (certs / "wild.pem").write_bytes(b"")  # truncated first, as cp does...
        issuer.write(["*.wild.test"], "wild-2", certs / "wild-new.pem")
        with open(certs / "wild.pem", "wb") as f:  # ...then written
            f.write((certs / "wild-new.pem").read_bytes())
        assert wait_until(lambda: presented(port, "x.wild.test", issuer)[1], "wild-2",
                          timeout=INTERVAL * 10) == "wild-2"
        # The default certificate, STLS included
        issuer.write(["default.test"], "default-2", certs / "default.pem")
        assert wait_until(lambda: presented(srv.port, None, issuer, starttls=True)[1], "default-2",
                          timeout=INTERVAL * 10) == "default-2"
        wait_for_log(srv, r"TLS certificate reloaded from .*default\.pem \(generation 2\) on a change of its files")
        # A new domain in the directory
        assert presented(port, "gamma.test", issuer)[0] == "default.test"
        certbot_renew(letsencrypt / "archive" / "gamma.test", letsencrypt / "live" / "gamma.test", issuer,
                      ["gamma.test"], "gamma-1", 1)
        assert wait_until(lambda: presented(port, "gamma.test", issuer), ("gamma.test", "gamma-1"),
                          timeout=INTERVAL * 10) == ("gamma.test", "gamma-1")
        wait_for_log(srv, r"TLS certificate for gamma\.test loaded from .*gamma\.test")
        # ...and one removed: its name falls back to the default
        shutil.rmtree(letsencrypt / "live" / "gamma.test")
        assert wait_until(lambda: presented(port, "gamma.test", issuer)[0], "default.test",
                          timeout=INTERVAL * 10) == "default.test"
        assert presented(port, "mail.alpha.test", issuer) == ("mail.alpha.test", "alpha-1")  # untouched
        reloaded = re.findall(r"reloaded from (\S+)", srv.log())
        assert reloaded and not any("alpha" in path for path in reloaded)  # unchanged: not read again
    finally:
        stop_clean(srv)


def test_broken_replacements_keep_the_old_certificate(tmp_path, hosting):
    issuer, certs, letsencrypt, args = hosting
    srv = SNIServer(tmp_path, args)
    srv.start()
    try:
        port = srv.tls_port
        # Not a certificate at all
        (certs / "wild.pem").write_text("-----BEGIN CERTIFICATE-----\nhalf writ")
        wait_for_log(srv, r"ERROR .*TLS reload failed, still serving the previous certificate of .*wild\.pem")
        assert presented(port, "x.wild.test", issuer) == ("*.wild.test", "wild-1")
        # A renewal whose key does not match its certificate (certbot's links swapped halfway)
        archive, live = letsencrypt / "archive" / "beta.test", letsencrypt / "live" / "beta.test"
        issuer.write(["beta.test"], "beta-2", archive / "fullchain2.pem", archive / "privkey2.pem")
        os.symlink("../../archive/beta.test/fullchain2.pem", live / "new")
        os.replace(live / "new", live / "fullchain.pem")
        wait_for_log(srv, r"ERROR .*TLS reload failed, still serving the previous certificate of "
                          r".*beta\.test/fullchain\.pem .*(KEY_VALUES_MISMATCH|key values mismatch)")
        assert presented(port, "beta.test", issuer) == ("beta.test", "beta-1")
        # The default certificate: a key that does not match
        issuer.write(["default.test"], "default-2", certs / "other.pem")
        pems = (certs / "other.pem").read_text()
        key = pems[:pems.index("-----BEGIN CERTIFICATE")]
        old = (certs / "default.pem").read_text()
        _replace(certs / "default.pem", (key + old[old.index("-----BEGIN CERTIFICATE"):]).encode())
        wait_for_log(srv, r"ERROR .*TLS reload failed, still serving the previous certificate of .*default\.pem")
        assert presented(port, None, issuer) == ("default.test", "default-1")
        assert presented(srv.port, "unknown.test", issuer, starttls=True) == ("default.test", "default-1")
        # Once the files are whole again, they are loaded
        os.symlink("../../archive/beta.test/privkey2.pem", live / "new")
        os.replace(live / "new", live / "privkey.pem")
        assert wait_until(lambda: presented(port, "beta.test", issuer), ("beta.test", "beta-2"),
                          timeout=INTERVAL * 10) == ("beta.test", "beta-2")
        issuer.write(["*.wild.test"], "wild-2", certs / "wild.pem")
        assert wait_until(lambda: presented(port, "x.wild.test", issuer)[1], "wild-2",
                          timeout=INTERVAL * 10) == "wild-2"
        # The directory itself gone for a while (moved, unmounted): its certificates stay
        os.rename(letsencrypt / "live", letsencrypt / "live.moved")
        wait_for_log(srv, r"ERROR .*TLS cert_dir .*live not read, keeping its certificates as they are")
        assert presented(port, "beta.test", issuer) == ("beta.test", "beta-2")
        # A failure is logged once, not at every check (nor while the files were still changing)
        time.sleep(INTERVAL * 4)
        assert len(re.findall(r"previous certificate of \S*default\.pem", srv.log())) == 1, srv.log()
        assert len(re.findall(r"TLS cert_dir .* not read", srv.log())) == 1, srv.log()
        os.rename(letsencrypt / "live.moved", letsencrypt / "live")
        assert presented(port, "mail.beta.test", issuer)[0] == "default.test"  # (beta-2 holds beta.test alone)
    finally:
        stop_clean(srv)


def test_a_renewal_caught_halfway_is_no_error(tmp_path, hosting):
    """certbot swaps the chain's link, then the key's: a check in between sees a
    key that does not match, which is tried again, not reported."""
    issuer, _, letsencrypt, args = hosting
    srv = SNIServer(tmp_path, args)
    srv.start()
    try:
        archive, live = letsencrypt / "archive" / "beta.test", letsencrypt / "live" / "beta.test"
        issuer.write(["beta.test"], "beta-2", archive / "fullchain2.pem", archive / "privkey2.pem")
        os.symlink("../../archive/beta.test/fullchain2.pem", live / "new")
        os.replace(live / "new", live / "fullchain.pem")
        wait_for_log(srv, r"DEBUG .*TLS certificate .*beta\.test/fullchain\.pem .* does not load yet \(its files are "
                          r"changing\): .*(KEY_VALUES_MISMATCH|key values mismatch)")
        assert presented(srv.tls_port, "beta.test", issuer) == ("beta.test", "beta-1")
        os.symlink("../../archive/beta.test/privkey2.pem", live / "new")
        os.replace(live / "new", live / "privkey.pem")
        wait_for_log(srv, r"TLS certificate for beta\.test reloaded .*\(generation 2\) on a change of its files")
        assert presented(srv.tls_port, "beta.test", issuer) == ("beta.test", "beta-2")
        assert " ERROR " not in srv.log(), srv.log()
    finally:
        stop_clean(srv)


# ----------------------------------------------------------------- SIGHUP, workers


def test_sighup_reloads_every_certificate(tmp_path, hosting):
    issuer, certs, letsencrypt, args = hosting
    args[args.index("--tls-reload-interval") + 1] = "0"  # no polling: SIGHUP only
    srv = SNIServer(tmp_path, args)
    srv.start()
    try:
        issuer.write(["mail.alpha.test", "pop.alpha.test"], "alpha-2", certs / "alpha.crt", certs / "alpha.key")
        certbot_renew(letsencrypt / "archive" / "beta.test", letsencrypt / "live" / "beta.test", issuer,
                      ["beta.test"], "beta-2", 2)
        time.sleep(1.0)
        assert presented(srv.tls_port, "pop.alpha.test", issuer)[1] == "alpha-1"  # not polled
        assert presented(srv.tls_port, "beta.test", issuer)[1] == "beta-1"
        srv.proc.send_signal(signal.SIGHUP)
        wait_for_log(srv, r"TLS certificate for mail\.alpha\.test, pop\.alpha\.test reloaded from .*alpha\.crt "
                          r"\(key .*alpha\.key\) \(generation 2\) on SIGHUP")
        wait_for_log(srv, r"TLS certificate for beta\.test reloaded .* on SIGHUP")
        assert presented(srv.tls_port, "pop.alpha.test", issuer) == ("mail.alpha.test", "alpha-2")
        assert presented(srv.port, "beta.test", issuer, starttls=True) == ("beta.test", "beta-2")
        assert presented(srv.tls_port, "mail.beta.test", issuer)[0] == "default.test"  # no longer in it
    finally:
        stop_clean(srv)


def test_sighup_applies_the_tls_section_to_both_listeners(tmp_path, hosting):
    """A re-read [tls] section: a new [tls.sni] entry is served; and every handshake
    starts on one context, whose version range the chosen one does not replace:
    a re-read min_version must reach it."""
    issuer, certs, _, args = hosting
    issuer.write(["extra.test"], "extra-1", certs / "extra.pem")
    config = tmp_path / "fastpop.toml"
    config.write_text('[tls]\nmin_version = "TLSv1.2"\n')
    srv = SNIServer(tmp_path, [*args, "--config", str(config)])
    srv.start()

    def tls12(port: int, starttls: bool) -> str:
        ctx = issuer.client()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            if starttls:
                f = sock.makefile("rb")
                f.readline()
                sock.sendall(b"STLS\r\n")
                assert f.readline().startswith(b"+OK")
            try:
                with ctx.wrap_socket(sock, server_hostname="beta.test") as tls:
                    return tls.version() or ""
            except ssl.SSLError as exc:
                return exc.reason or str(exc)

    try:
        assert tls12(srv.tls_port, False) == "TLSv1.2" and tls12(srv.port, True) == "TLSv1.2"
        assert presented(srv.tls_port, "extra.test", issuer)[0] == "default.test"
        config.write_text(f'[tls]\nmin_version = "TLSv1.3"\n[tls.sni]\n"extra.test" = "{certs / "extra.pem"}"\n')
        srv.proc.send_signal(signal.SIGHUP)
        wait_for_log(srv, r"SIGHUP: configuration, passwd-file and certificate reloaded")
        wait_for_log(srv, r"TLS certificate for extra\.test loaded from .*extra\.pem \(SIGHUP\)")
        assert presented(srv.tls_port, "extra.test", issuer) == ("extra.test", "extra-1")
        assert presented(srv.port, "x.wild.test", issuer, starttls=True)[0] == "*.wild.test"  # the flags' still
        for port, starttls in ((srv.tls_port, False), (srv.port, True)):
            assert tls12(port, starttls) != "TLSv1.2", starttls  # refused (an alert, or the connection closed)
            assert presented(port, "beta.test", issuer, starttls) == ("beta.test", "beta-1")  # TLS 1.3
    finally:
        stop_clean(srv)


def test_two_workers_each_pick_up_a_renewal(tmp_path, hosting):
    issuer, _, letsencrypt, args = hosting
    srv = SNIServer(tmp_path, args, workers=2)
    srv.start()
    try:
        ports = (srv.tls_port, srv.port)
        certbot_renew(letsencrypt / "archive" / "beta.test", letsencrypt / "live" / "beta.test", issuer,
                      ["beta.test", "mail.beta.test"], "beta-2", 2)
        deadline = time.monotonic() + 10
        while srv.log().count("TLS certificate for beta.test, mail.beta.test reloaded") < 2:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
        pids = set(re.findall(r"worker \d+ started \(pid (\d+)\)", srv.log()))
        assert len(pids) == 2
        # The kernel spreads connections over both workers: every one gets the renewal.
        got = {presented(ports[i % 2], "mail.beta.test", issuer, starttls=bool(i % 2)) for i in range(24)}
        assert got == {("beta.test", "beta-2")}
        srv.proc.send_signal(signal.SIGHUP)  # the supervisor passes it on
        deadline = time.monotonic() + 10
        while len(re.findall(r"reloaded from .* on SIGHUP", srv.log())) < 2 * 4:
            assert time.monotonic() < deadline, srv.log()  # each worker: the default and three SNI certificates
            time.sleep(0.05)
    finally:
        stop_clean(srv)


# ----------------------------------------------------------------- after the switch of user


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_root_only_key_is_served_but_not_reloaded_after_the_switch(hosting):
    """Read as root at start; a renewal the server's user cannot read is refused
    with a log line that says why, and the running certificate stays."""
    issuer, _, _, _ = hosting
    nobody = pwd.getpwnam("nobody")
    root = Path(tempfile.mkdtemp(prefix="fastpop-sni-"))
    try:
        root.chmod(0o755)
        certs = root / "certs"
        issuer.write(["default.test"], "default-1", certs / "default.pem")
        issuer.write(["private.test"], "private-1", certs / "private.crt", certs / "private.key")
        certs.chmod(0o755)
        (certs / "private.key").chmod(0o600)  # root's only, as certbot writes it
        srv = SNIServer(root, ["--tls-cert", str(certs / "default.pem"),
                               "--tls-sni", f"private.test={certs / 'private.crt'},{certs / 'private.key'}",
                               "--tls-reload-interval", str(INTERVAL), "--user", "nobody"])
        srv.add_user()
        for path in [srv.mail, *srv.mail.rglob("*"), srv.passwd]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        srv.start()
        try:
            wait_for_log(srv, rf"WARNING .*TLS: .*private\.key not readable by uid {nobody.pw_uid}")
            assert presented(srv.tls_port, "private.test", issuer) == ("private.test", "private-1")
            issuer.write(["private.test"], "private-2", certs / "private.crt", certs / "private.key")
            (certs / "private.key").chmod(0o600)
            wait_for_log(srv, r"ERROR .*TLS reload failed, still serving the previous certificate of .*private\.crt"
                              rf".*Permission denied.*runs as uid {nobody.pw_uid} now")
            assert presented(srv.tls_port, "private.test", issuer) == ("private.test", "private-1")
            # Readable by the server's user: the renewal is served
            os.chown(certs / "private.key", 0, nobody.pw_gid)
            (certs / "private.key").chmod(0o640)
            assert wait_until(lambda: presented(srv.tls_port, "private.test", issuer)[1], "private-2",
                              timeout=INTERVAL * 10) == "private-2"
        finally:
            stop_clean(srv)
    finally:
        shutil.rmtree(root)


# ----------------------------------------------------------------- configuration


def test_names_read_from_certificates(tmp_path):
    issuer = Issuer()
    issuer.write(["mail.example.com", "*.example.org", "127.0.0.1"], "x", tmp_path / "san.pem")
    assert names_in_file(str(tmp_path / "san.pem")) == ["mail.example.com", "*.example.org"]
    (tmp_path / "none.pem").write_text("nothing here\n")
    with pytest.raises(ValueError, match="no certificate"):
        names_in_file(str(tmp_path / "none.pem"))


def test_malformed_certificates_are_a_clear_error(tmp_path):
    """Whatever a PEM file holds, reading its names fails with ValueError (logged,
    the old certificate kept), never another exception in the server's loop."""
    import base64

    issuer = Issuer()
    issuer.write(["mail.example.com"], "x", tmp_path / "good.crt", tmp_path / "good.key")
    leaf = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", (tmp_path / "good.crt").read_text(),
                     re.DOTALL)
    assert leaf
    der = ssl.PEM_cert_to_DER_cert(leaf.group(0))
    variants = [der[:cut] for cut in range(0, len(der), 5)]
    variants += [der[:i] + bytes([der[i] ^ 0xFF]) + der[i + 1:] for i in range(0, len(der), 3)]
    outcomes = set()
    for data in variants:
        path = tmp_path / "bad.pem"
        path.write_text("-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(data).decode() +
                        "-----END CERTIFICATE-----\n")
        try:
            names = names_in_file(str(path))
        except ValueError as exc:
            assert "malformed certificate" in str(exc) or "no certificate" in str(exc), exc
            outcomes.add("refused")
        else:
            assert isinstance(names, list)
            outcomes.add("read")
    assert outcomes == {"refused", "read"}  # (a flipped byte in a signature changes no name)


def test_sni_settings_from_toml_and_their_errors(tmp_path):
    issuer = Issuer()
    issuer.write(["default.test"], "d", tmp_path / "default.pem")
    issuer.write(["a.test"], "a", tmp_path / "a.crt", tmp_path / "a.key")
    issuer.write(["*.b.test"], "b", tmp_path / "b.pem")
    (tmp_path / "passwd").touch()
    (tmp_path / "dir").mkdir()
    toml = tmp_path / "fastpop.toml"
    toml.write_text(f"""
[auth]
passwd_file = "{tmp_path / 'passwd'}"

[tls]
cert = "{tmp_path / 'default.pem'}"
cert_dir = "{tmp_path / 'dir'}"
reload_interval = 2

[tls.sni]
"a.test" = ["{tmp_path / 'a.crt'}", "{tmp_path / 'a.key'}"]
"*.b.test" = "{tmp_path / 'b.pem'}"
""")
    config = load_toml(str(toml))
    validate_all(config)
    assert config.tls_sni == {"a.test": [str(tmp_path / "a.crt"), str(tmp_path / "a.key")],
                              "*.b.test": [str(tmp_path / "b.pem")]}
    assert (config.tls_cert_dir, config.tls_reload_interval) == (str(tmp_path / "dir"), 2.0)

    def refused(text: str, **changes) -> None:
        c = Config(passwd_file=str(tmp_path / "passwd"), **changes)
        with pytest.raises(ValueError, match=text):
            validate_all(c)

    default = str(tmp_path / "default.pem")
    refused("need a default one", tls_sni={"a.test": [str(tmp_path / "b.pem")]})
    refused("need a default one", tls_cert_dir=str(tmp_path / "dir"))
    refused("not a directory", tls_cert=default, tls_cert_dir=str(tmp_path / "passwd"))
    refused("not a host name", tls_cert=default, tls_sni={"a..test": [str(tmp_path / "b.pem")]})
    refused("not a host name", tls_cert=default, tls_sni={"a test": [str(tmp_path / "b.pem")]})
    refused("give the certificate chain", tls_cert=default, tls_sni={"a.test": []})
    refused("tls sni a.test: cannot use", tls_cert=default, tls_sni={"a.test": [str(tmp_path / "a.crt")]})
    refused("reload_interval", tls_cert=default, tls_reload_interval=-1.0)
    bad = tmp_path / "bad.toml"
    bad.write_text('[tls.sni]\n"a.test" = 3\n')
    with pytest.raises(ValueError, match=r"\[tls\] sni.a.test must be a string or a list"):
        load_toml(str(bad))
    bad.write_text('[tls.sni]\nmail.a.test = "x.pem"\n')
    with pytest.raises(ValueError, match="quote each host name"):
        load_toml(str(bad))
    bad.write_text('[tls]\nsni = "a.test"\n')
    with pytest.raises(ValueError, match=r"\[tls\] sni must be a table"):
        load_toml(str(bad))
