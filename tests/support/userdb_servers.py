"""Real database servers for the user database tests and benchmark:
PostgreSQL, MariaDB and OpenLDAP's slapd, each in a fresh directory under
/tmp on a free 127.0.0.1 port, set up with a ``users`` table (or a
``ou=people`` subtree) that fastpop reads.

Run as root (as CI does), the servers that refuse root run as their Debian
system users (``postgres``, ``mysql``) through ``runuser``.  ``stop()`` and
``start()`` again keep the data and the port: the tests stop a server in the
middle of a run and bring it back.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DB_USER = "fastpop"
DB_PASSWORD = "fastpop-db-secret"

# The table a Dovecot SQL setup would have; extra columns are user data.
USERS_TABLE = """
CREATE TABLE users (
    userid VARCHAR(255) PRIMARY KEY,
    password VARCHAR(255) NOT NULL,
    home VARCHAR(255),
    mail VARCHAR(255),
    login_delay INTEGER,
    allow_apop VARCHAR(8)
)"""
PASSWORD_QUERY = "SELECT userid AS user, password, home, mail, login_delay, allow_apop FROM users WHERE userid = '%u'"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sql_str(value: str | int | None) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


def _owned_dir(prefix: str, owner: str | None) -> Path:
    """A fresh directory the server's system user can use (pytest's are root-only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    if owner is not None:
        entry = pwd.getpwnam(owner)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def _as(owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--"] if owner is not None else []


def _wait(check, what: str, log: Path | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    text = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} did not start:\n{text}")


class SQLServer:
    driver = ""

    def users_sql(self, rows: list[dict]) -> str:
        out = []
        for r in rows:
            cols = ["userid", "password", "home", "mail", "login_delay", "allow_apop"]
            values = ", ".join(_sql_str(r.get(c)) for c in cols)
            out.append(f"INSERT INTO users ({', '.join(cols)}) VALUES ({values});")
        return "\n".join(out)

    def add_users(self, rows: list[dict]) -> None:
        self.sql(self.users_sql(rows))

    def set_password(self, userid: str, stored: str) -> None:
        self.sql(f"UPDATE users SET password = {_sql_str(stored)} WHERE userid = {_sql_str(userid)};")


class PostgresServer(SQLServer):
    driver = "postgresql"

    @staticmethod
    def available() -> str | None:
        """None, or why the tests cannot run."""
        if not glob.glob("/usr/lib/postgresql/*/bin/postgres"):
            return "PostgreSQL is not installed (Debian package postgresql)"
        return None

    def __init__(self) -> None:
        self.bin = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))[-1])
        self.owner = "postgres" if os.getuid() == 0 else None
        self.dir = _owned_dir("fastpop-pg-", self.owner)
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.running = False
        pwfile = self.dir / "pw"
        pwfile.write_text("postgres-admin\n")
        if self.owner:
            shutil.chown(pwfile, self.owner)
        subprocess.run([*_as(self.owner), str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                        "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True)
        self.start()
        self.psql(f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{DB_PASSWORD}';", db="postgres")
        self.psql(f"CREATE DATABASE mail OWNER {DB_USER};", db="postgres")
        self.sql(USERS_TABLE + ";")

    @property
    def dsn(self) -> str:
        return f"postgresql://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{self.port}/mail"

    def start(self) -> None:
        subprocess.run([*_as(self.owner), str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                        "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                              "-c max_connections=200", "start"],
                       check=True, capture_output=True)
        self.running = True

    def stop(self) -> None:
        subprocess.run([*_as(self.owner), str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                        "stop"], check=True, capture_output=True)
        self.running = False

    def psql(self, sql: str, db: str = "mail") -> str:
        out = subprocess.run([*_as(self.owner), str(self.bin / "psql"), "-h", str(self.dir), "-p", str(self.port),
                              "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql],
                             check=True, capture_output=True, text=True)
        return out.stdout

    def sql(self, sql: str) -> None:
        # as the table's owner, so fastpop's role can read it
        self.psql(f"SET ROLE {DB_USER};\n{sql}")

    def close(self) -> None:
        if self.running:
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class MariaDBServer(SQLServer):
    driver = "mysql"

    @staticmethod
    def available() -> str | None:
        for cmd in ("mariadbd", "mariadb-install-db", "mariadb"):
            if shutil.which(cmd) is None and not os.path.exists(f"/usr/sbin/{cmd}"):
                return f"MariaDB is not installed (Debian package mariadb-server: no {cmd})"
        return None

    def __init__(self) -> None:
        self.owner = "mysql" if os.getuid() == 0 else None
        self.dir = _owned_dir("fastpop-mariadb-", self.owner)
        self.data = self.dir / "data"
        self.sock = self.dir / "mysqld.sock"
        self.log = self.dir / "error.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        user = ["--user=" + self.owner] if self.owner else []
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={self.data}", *user,
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True)
        self.start()
        self.mysql(f"CREATE DATABASE mail; CREATE USER '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASSWORD}';"
                   f"GRANT SELECT ON mail.* TO '{DB_USER}'@'127.0.0.1';", db=None)
        self.sql(USERS_TABLE + ";")

    @property
    def dsn(self) -> str:
        return f"mysql://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{self.port}/mail"

    def start(self) -> None:
        mariadbd = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
        user = ["--user=" + self.owner] if self.owner else []
        self.proc = subprocess.Popen(
            [mariadbd, "--no-defaults", f"--datadir={self.data}", f"--port={self.port}", "--bind-address=127.0.0.1",
             f"--socket={self.sock}", f"--pid-file={self.dir / 'mysqld.pid'}", f"--log-error={self.log}", *user,
             "--skip-log-bin", "--innodb-buffer-pool-size=16M", "--skip-name-resolve", "--max-connections=300",
             "--innodb-flush-log-at-trx-commit=2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError("mariadbd exited:\n" + self.log.read_text(errors="replace")[-3000:])
            return subprocess.run(["mariadb-admin", f"--socket={self.sock}", "-u", "root", "ping"],
                                  capture_output=True).returncode == 0

        _wait(up, "mariadbd", self.log)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)  # as a crash: nothing said to clients
            self.proc.wait()
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None

    def mysql(self, sql: str, db: str | None = "mail") -> str:
        args = ["mariadb", f"--socket={self.sock}", "-u", "root", "-N", "-B", "-e", sql]
        if db:
            args.insert(1, f"--database={db}")
        return subprocess.run(args, check=True, capture_output=True, text=True).stdout

    def sql(self, sql: str) -> None:
        self.mysql(sql)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def ssha(password: str, salt: bytes | None = None) -> str:
    """OpenLDAP's {SSHA}: slapd can check it on bind and fastpop can verify it."""
    salt = salt if salt is not None else os.urandom(8)
    return "{SSHA}" + base64.b64encode(hashlib.sha1(password.encode() + salt).digest() + salt).decode()


class SlapdServer:
    """slapd with ldap:// and ldaps:// on free ports; the suffix dc=example,dc=com,
    users under ou=people, a search account cn=fastpop that may read passwords."""

    SUFFIX = "dc=example,dc=com"
    ADMIN_DN = "cn=admin,dc=example,dc=com"
    ADMIN_PW = "ldap-admin-secret"
    SEARCH_DN = "cn=fastpop,dc=example,dc=com"
    SEARCH_PW = "ldap-search-secret"
    PEOPLE = "ou=people,dc=example,dc=com"

    @staticmethod
    def available() -> str | None:
        if not (shutil.which("slapd") or os.path.exists("/usr/sbin/slapd")):
            return "OpenLDAP is not installed (Debian package slapd)"
        if not shutil.which("ldapadd"):
            return "ldap-utils is not installed (Debian package ldap-utils)"
        return None

    def __init__(self) -> None:
        import trustme

        self.dir = _owned_dir("fastpop-slapd-", None)
        (self.dir / "db").mkdir()
        self.port = free_port()
        self.tls_port = free_port()
        self.log = self.dir / "slapd.log"
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = self.dir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert, key = self.dir / "cert.pem", self.dir / "key.pem"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        schema = "\n".join(f"include /etc/ldap/schema/{s}.schema" for s in ("core", "cosine", "nis", "inetorgperson"))
        modules = "modulepath /usr/lib/ldap\nmoduleload back_mdb" if os.path.exists("/usr/lib/ldap/back_mdb.so") else ""
        (self.dir / "slapd.conf").write_text(f"""{schema}
{modules}
pidfile {self.dir}/slapd.pid
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
database mdb
maxsize 10485760
suffix "{self.SUFFIX}"
rootdn "{self.ADMIN_DN}"
rootpw {self.ADMIN_PW}
directory {self.dir}/db
access to attrs=userPassword
    by dn.exact="{self.SEARCH_DN}" read
    by anonymous auth
    by * none
access to * by * read
""")
        self.proc: subprocess.Popen | None = None
        self.start()
        self.ldapadd(f"""dn: {self.SUFFIX}
objectClass: dcObject
objectClass: organization
o: example
dc: example

dn: {self.SEARCH_DN}
objectClass: person
cn: fastpop
sn: fastpop
userPassword: {ssha(self.SEARCH_PW)}

dn: {self.PEOPLE}
objectClass: organizationalUnit
ou: people
""")

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_uri(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    def start(self) -> None:
        slapd = shutil.which("slapd") or "/usr/sbin/slapd"
        self.log_file = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [slapd, "-f", str(self.dir / "slapd.conf"), "-h",
             f"ldap://127.0.0.1:{self.port}/ ldaps://127.0.0.1:{self.tls_port}/", "-d", "0"],
            stdout=self.log_file, stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError("slapd exited:\n" + self.log.read_text(errors="replace")[-3000:])
            return subprocess.run(["ldapsearch", "-x", "-H", self.uri, "-b", "", "-s", "base"],
                                  capture_output=True).returncode == 0

        _wait(up, "slapd", self.log)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None
            self.log_file.close()

    @property
    def running(self) -> bool:
        return self.proc is not None

    def ldapadd(self, ldif: str, modify: bool = False) -> None:
        subprocess.run(["ldapmodify" if modify else "ldapadd", "-x", "-H", self.uri, "-D", self.ADMIN_DN,
                        "-w", self.ADMIN_PW], input=ldif.encode(), check=True, capture_output=True)

    def add_user(self, uid: str, password: str, home: str | None = None, mail: str | None = None,
                 stored: str | None = None, attributes: dict[str, str] | None = None) -> None:
        lines = [f"dn: uid={uid},{self.PEOPLE}", "objectClass: inetOrgPerson", "objectClass: posixAccount",
                 f"uid: {uid}", f"cn: {uid}", f"sn: {uid}", "uidNumber: 1000", "gidNumber: 1000",
                 f"homeDirectory: {home or '/nonexistent'}", f"userPassword: {stored or ssha(password)}"]
        if mail:
            lines.append(f"description: {mail}")  # a mail location attribute the standard schema has
        lines += [f"{k}: {v}" for k, v in (attributes or {}).items()]
        self.ldapadd("\n".join(lines) + "\n")

    def set_password(self, uid: str, password: str) -> None:
        self.ldapadd(f"dn: uid={uid},{self.PEOPLE}\nchangetype: modify\nreplace: userPassword\n"
                     f"userPassword: {ssha(password)}\n", modify=True)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
