"""SQL user databases: PostgreSQL (asyncpg), MySQL/MariaDB (aiomysql), SQLite
(the standard library's sqlite3, in threads).

As Dovecot's ``password_query`` and ``user_query``: the password query
returns a row with a ``password`` column (a ``{SCHEME}`` string, so a table
written for Dovecot works unchanged) and any user data (``home``, ``uid``,
``gid``, ``mail``, ``login_delay``, ... or with Dovecot's ``userdb_`` prefix);
the optional user query adds or overrides user data.  ``%u``, ``%n``, ``%d``,
``%r`` become bound parameters, never text pasted into the query.

Every lookup has one deadline (``query_timeout``).  A failure (connection
refused, timeout, a query error) raises AuthUnavailable, logs one line, and
for ``retry_interval`` further lookups fail at once instead of queueing on a
dead server; pooled connections are dropped so the next lookup connects
afresh, which is how logins recover when the server is back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import urllib.parse
from typing import TYPE_CHECKING, Any

from fastpop.auth.passwd_file import UserRecord
from fastpop.auth.userdb import UserDB, expand_vars, record_from_row, uses_remote_ip
from fastpop.errors import AuthUnavailable

if TYPE_CHECKING:
    from fastpop.config import Config

log = logging.getLogger("fastpop.auth")


class SQLUserDB(UserDB):
    is_async = True

    def __init__(self, config: Config) -> None:
        assert config.userdb_connect and config.userdb_password_query
        self.connect = config.userdb_connect
        self.password_query = config.userdb_password_query
        self.user_query = config.userdb_user_query or None
        self.uses_remote_ip = uses_remote_ip(self.password_query, self.user_query)
        self.pool_min = config.userdb_pool_min
        self.pool_max = config.userdb_pool_max
        self.connect_timeout = config.userdb_connect_timeout
        self.timeout = config.userdb_query_timeout
        self.retry_interval = config.userdb_retry_interval
        self._sql: dict[str, str] = {}  # template with markers -> the driver's SQL
        self._down_until = 0.0
        self._down = False

    # drivers implement these
    def _placeholders(self, marked: str) -> str:
        raise NotImplementedError  # pragma: no cover

    async def _row(self, sql: str, params: list[str]) -> dict[str, Any] | None:
        raise NotImplementedError  # pragma: no cover

    async def _reset(self) -> None:
        """After a failure: pooled connections may be dead, connect afresh."""

    async def fetch(self, name: str, remote_ip: str | None = None) -> UserRecord | None:
        loop = asyncio.get_running_loop()
        if self._down and loop.time() < self._down_until:
            raise AuthUnavailable(f"{self.name} user database unavailable (retrying shortly)")
        try:
            record = await asyncio.wait_for(self._lookup_twice(name, remote_ip), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, asyncio.TimeoutError):
                reason = f"no answer within {self.timeout:g} s"
            log.error("%s user database unavailable: %s", self.name, reason)
            self._down = True
            self._down_until = loop.time() + self.retry_interval
            raise AuthUnavailable(reason) from None
        if self._down:
            self._down = False
            log.info("%s user database available again", self.name)
        return record

    async def _lookup_twice(self, name: str, remote_ip: str | None) -> UserRecord | None:
        """A pooled connection may have died with a server restart: on any
        error, drop the pool's connections and try once more on a new one."""
        try:
            return await self._lookup(name, remote_ip)
        except asyncio.CancelledError:
            raise
        except Exception:
            await self._reset()
            return await self._lookup(name, remote_ip)

    async def _lookup(self, name: str, remote_ip: str | None) -> UserRecord | None:
        row = await self._query(self.password_query, name, remote_ip)
        if row is None:
            return None
        if self.user_query:
            user_row = await self._query(self.user_query, name, remote_ip)
            if user_row:
                password = row.get("password")
                row = {**row, **user_row, "password": password}
        return record_from_row(name, row)

    async def _query(self, template: str, name: str, remote_ip: str | None) -> dict[str, Any] | None:
        marked, params = expand_vars(template, name, remote_ip)
        sql = self._sql.get(marked)
        if sql is None:
            sql = self._sql[marked] = self._placeholders(marked)
        return await self._row(sql, params)


def _one_line(record: logging.LogRecord) -> bool:
    if record.exc_info:
        exc = record.exc_info[1]
        record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
    return True


class PostgresUserDB(SQLUserDB):
    """asyncpg; ``connect`` is a libpq URL: postgresql://user:password@host:port/dbname."""

    name = "postgresql"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._pool = None
        self._lock: asyncio.Lock | None = None
        # while the server is down, the pool's own reconnects log a warning
        # with a traceback each time: one line is enough (ours says why)
        logging.getLogger("asyncpg.pool").addFilter(_one_line)

    def _placeholders(self, marked: str) -> str:
        parts = marked.split("\0")
        return parts[0] + "".join(f"${i}{p}" for i, p in enumerate(parts[1:], 1))

    async def _get_pool(self):
        if self._pool is None:
            import asyncpg

            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:  # one pool, however many logins arrive at once
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self.connect, min_size=self.pool_min, max_size=self.pool_max,
                        timeout=self.connect_timeout, command_timeout=self.timeout,
                    )
        return self._pool

    async def _row(self, sql: str, params: list[str]) -> dict[str, Any] | None:
        pool = await self._get_pool()
        row = await pool.fetchrow(sql, *params, timeout=self.timeout)
        return dict(row.items()) if row is not None else None

    async def _reset(self) -> None:
        if self._pool is not None:
            await self._pool.expire_connections()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:
                pool.terminate()


class MySQLUserDB(SQLUserDB):
    """aiomysql; ``connect`` is mysql://user:password@host:port/dbname
    (``?unix_socket=/path`` for a socket)."""

    name = "mysql"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        url = urllib.parse.urlsplit(self.connect)
        query = dict(urllib.parse.parse_qsl(url.query))
        self._args: dict[str, Any] = {
            "host": url.hostname or "localhost",
            "port": url.port or 3306,
            "user": urllib.parse.unquote(url.username or ""),
            "password": urllib.parse.unquote(url.password or ""),
            "db": url.path.lstrip("/") or None,
            "unix_socket": query.get("unix_socket"),
            "charset": "utf8mb4",
        }
        self._pool = None
        self._lock: asyncio.Lock | None = None

    def _placeholders(self, marked: str) -> str:
        return marked.replace("%", "%%").replace("\0", "%s")  # pyformat: a literal % is %%

    async def _get_pool(self):
        if self._pool is None:
            import aiomysql

            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._pool is None:
                    # autocommit: a pooled connection must not keep reading an
                    # old snapshot (InnoDB's REPEATABLE READ) of a changed password
                    self._pool = await aiomysql.create_pool(
                        minsize=self.pool_min, maxsize=self.pool_max, connect_timeout=self.connect_timeout,
                        autocommit=True, pool_recycle=3600, **self._args,
                    )
        return self._pool

    async def _row(self, sql: str, params: list[str]) -> dict[str, Any] | None:
        import aiomysql

        pool = await self._get_pool()
        conn = await pool.acquire()
        try:
            async with conn.cursor(aiomysql.DictCursor) as cur:
                await cur.execute(sql, params)
                return await cur.fetchone()
        except BaseException:
            conn.close()  # a query cut short leaves the connection in no known state
            raise
        finally:
            pool.release(conn)

    async def _reset(self) -> None:
        if self._pool is not None:
            await self._pool.clear()  # closes the idle connections

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            try:
                await asyncio.wait_for(pool.wait_closed(), 5)
            except Exception:
                pool.terminate()


class SQLiteUserDB(SQLUserDB):
    """The standard library's sqlite3, read-only, one connection per thread of
    a pool of ``pool_max`` threads; ``connect`` is the file (or sqlite:///file)."""

    name = "sqlite"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        path = self.connect
        for prefix in ("sqlite:///", "sqlite://", "sqlite:"):
            if path.startswith(prefix):
                path = "/" + path[len(prefix):].lstrip("/") if prefix == "sqlite:///" else path[len(prefix):]
                break
        self.path = path
        self._local = threading.local()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def _placeholders(self, marked: str) -> str:
        return marked.replace("\0", "?")

    def _run(self, sql: str, params: list[str]) -> dict[str, Any] | None:
        import sqlite3

        conn = getattr(self._local, "conn", None)
        if conn is None:
            uri = "file:" + urllib.parse.quote(self.path) + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=self.timeout)
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        try:
            row = conn.execute(sql, params).fetchone()
        except sqlite3.Error:
            conn.close()
            self._local.conn = None
            raise
        return {k: row[k] for k in row.keys()} if row is not None else None

    async def _row(self, sql: str, params: list[str]) -> dict[str, Any] | None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(self.pool_max, thread_name_prefix="fastpop-sqlite")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, sql, params)

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


def open_sql(config: Config) -> SQLUserDB:
    return {"postgresql": PostgresUserDB, "mysql": MySQLUserDB, "sqlite": SQLiteUserDB}[config.userdb_driver](config)
