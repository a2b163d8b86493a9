"""The PostgreSQL engine: one server shared by several bot processes (psycopg 3).

Selected by ``[storage] url = "postgresql://user@host/db"`` (the password, if any,
is best left to ``PGPASSWORD`` or ``~/.pgpass``). Like the SQLite engine it holds two
connections, one for writes and one for reads, both in autocommit mode.

attune's SQL is written in SQLite's dialect; :func:`translate` rewrites the few
constructs PostgreSQL spells differently (parameters, ``INSERT OR IGNORE``, ``x IS ?``,
``GROUP_CONCAT``, ``date(x, 'unixepoch')``, ``json_extract``), once per statement.

What SQLite gives by being one file is made explicit here:

- write transactions are serialised across processes by a transaction-level advisory
  lock, as ``BEGIN IMMEDIATE`` serialises them on SQLite, so that read-then-write
  sequences (a new user, a reaction, the training lock) behave the same;
- the run lock is a session-level advisory lock (shared by bots, exclusive for
  ``attune keys rotate``), dropped by the server when a process dies;
- migrations run under their own advisory lock, so two processes starting together
  apply each one once; the version is kept in ``attune_schema``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import RowMaker

from storage.crypto import PLAIN, Cipher
from storage.database import Database, DatabaseError, Params, Unavailable, migrations, too_new

log = logging.getLogger(__name__)

# Advisory lock keys (any fixed 64-bit numbers, unlikely to clash with another application's).
_WRITE_LOCK = 0x61747475_6E650001
_RUN_LOCK = 0x61747475_6E650002
_MIGRATE_LOCK = 0x61747475_6E650003
_CONNECT_TIMEOUT_S = 5
_LOCK_WAIT_AT_START_S = 3.0

_REWRITES = [
    (re.compile(r"^\s*INSERT OR IGNORE INTO (.*)$", re.S), r"INSERT INTO \1 ON CONFLICT DO NOTHING"),
    (re.compile(r"GROUP_CONCAT\((DISTINCT )?([\w.]+)\)"), r"string_agg(\1\2, ',')"),
    (re.compile(r"\bdate\(([\w.]+), 'unixepoch'\)"), r"to_char(to_timestamp(\1) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"),
    (re.compile(r"\bIS \?"), "IS NOT DISTINCT FROM ?"),
    (re.compile(r"json_extract\(([\w.]+), '\$\.(\w+)'\)"), r"(\1::jsonb ->> '\2')"),
]
_NAMED = re.compile(r"(?<![:\w]):(\w+)")


@functools.lru_cache(maxsize=1024)
def translate(sql: str, named: bool) -> str:
    """A statement in attune's (SQLite) dialect, as PostgreSQL and psycopg take it."""
    for pattern, replacement in _REWRITES:
        sql = pattern.sub(replacement, sql)
    sql = sql.replace("%", "%%")
    return _NAMED.sub(r"%(\1)s", sql) if named else sql.replace("?", "%s")


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Row(tuple[Any, ...]):
    """A result row: by position, by column name, and ``dict(row)``, like sqlite3.Row."""

    _index: dict[str, int]

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


def _rows(cursor: Any) -> RowMaker[Row]:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}

    def make(values: Sequence[Any]) -> Row:
        row = Row(values)
        row._index = index
        return row

    return make


def _params(params: Params) -> Params:
    # PostgreSQL text cannot hold U+0000; what a user typed is kept, with that one character replaced.
    def clean(value: Any) -> Any:
        return value.replace("\x00", "\ufffd") if isinstance(value, str) else value

    if isinstance(params, Mapping):
        return {k: clean(v) for k, v in params.items()}
    return [clean(v) for v in params]


class _Connection:
    """One psycopg connection with aiosqlite's method names (see storage.database.Connection)."""

    def __init__(self, conn: psycopg.AsyncConnection[Row]) -> None:
        self.raw = conn

    async def execute(self, sql: str, params: Params = (), *, suffix: str = "") -> psycopg.AsyncCursor[Row]:
        statement = translate(sql, isinstance(params, Mapping)) + suffix
        return await self.raw.execute(statement, _params(params))  # type: ignore[arg-type]

    async def execute_fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        return await (await self.execute(sql, params)).fetchall()

    async def execute_insert(self, sql: str, params: Params = ()) -> tuple[Any, ...] | None:
        row = await (await self.execute(sql, params, suffix=" RETURNING id")).fetchone()
        return tuple(row) if row is not None else None


class _Outage:
    """Whether the database can be used, shared by the engine's two connections: an
    outage is logged once when it starts and once when it ends, not once per request."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.since: float | None = None  # when it went away; None while usable
        self.reason = ""
        self.armed = False  # set once the database is open (a failure to open is the caller's to report)

    def lost(self, exc: BaseException | str, *, what: str = "went away") -> None:
        if self.since is None:
            self.since = time.monotonic()
            text = str(exc).strip()
            self.reason = text.splitlines()[0] if text else type(exc).__name__
            if self.armed:
                log.error("the database %s %s (%s); messages get the clear 'couldn't save' reply until it is back, "
                          "and attune reconnects by itself", self.where, what, self.reason)  # fmt: skip

    def back(self) -> None:
        if self.since is not None and self.armed:
            log.warning("the database %s is back after %.1f s: messages are answered again", self.where,
                        time.monotonic() - self.since)  # fmt: skip
        self.since = None

    def refusal(self, *, maybe_committed: bool = False) -> Unavailable:
        return Unavailable(f"the database {self.where} cannot be used now ({self.reason or 'reconnecting'})",
                           maybe_committed=maybe_committed)  # fmt: skip


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection is gone (PostgreSQL's guidance: SQLSTATE class
    08, and 57P01-57P03 for a server shutting down or starting), as against an error of
    the statement itself."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


class _Link:
    """One of the engine's two connections, opened again when the server drops it, with
    a back-off between tries (0.25 s, doubling to 2 s) so that while the server is down a
    request is refused at once, not after a connection timeout.

    ``on_open`` runs on every new connection before it is used (the writer takes the run
    lock there, so nothing is written by a process that does not hold it); the writer,
    the link with an ``on_open``, is the one that says the outage is over."""

    MAX_DELAY_S = 2.0

    def __init__(
        self, url: str, outage: _Outage, on_open: Callable[[_Connection], Awaitable[None]] | None = None
    ) -> None:
        self.url = url
        self.outage = outage
        self.on_open = on_open
        self.conn: _Connection | None = None
        self._opening = asyncio.Lock()
        self._delay = 0.0
        self._next_try = 0.0

    async def open(self) -> _Connection:
        """The connection, opened first if it is closed; raises :class:`Unavailable`
        while the server cannot be reached (the outage is logged once)."""
        if self.conn is not None and not self.conn.raw.closed:
            return self.conn
        async with self._opening:
            if self.conn is not None and not self.conn.raw.closed:
                return self.conn
            if time.monotonic() < self._next_try:
                raise self.outage.refusal()
            try:
                raw = await psycopg.AsyncConnection.connect(self.url, autocommit=True, row_factory=_rows,
                                                            connect_timeout=_CONNECT_TIMEOUT_S)  # fmt: skip
                conn = _Connection(raw)
                try:
                    if self.on_open is not None:
                        await self.on_open(conn)
                except BaseException:
                    await raw.close()
                    raise
            except BaseException as exc:
                self._delay = min(max(self._delay * 2, 0.25), self.MAX_DELAY_S)
                self._next_try = time.monotonic() + self._delay
                if connection_lost(exc):
                    self.outage.lost(exc)
                    raise self.outage.refusal() from exc
                raise
            self.conn = conn
            self._delay = self._next_try = 0.0
            if self.on_open is not None:
                self.outage.back()
            return conn

    async def drop(self, exc: BaseException) -> None:
        """The connection was lost (``exc``): log the outage once; the next use reconnects."""
        self.outage.lost(exc)
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.raw.close()
        self.conn = None

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.raw.close()
            self.conn = None


class PostgresDatabase(Database):
    """An open PostgreSQL database with the schema up to date, that survives the server's
    restarts and fail-overs.

    It holds two connections (:class:`_Link`), a writer and a reader, rather than a pool
    (psycopg_pool): the run lock is a session-level advisory lock, so it must live on one
    known connection, and writes are serialised on one connection anyway; a pool would
    add a dependency and hand out connections that hold no lock. Each link notices a
    dead connection on use and opens a new one, backing off while the server is down;
    the writer takes the run lock again on every new connection before it writes.

    A request that hits a lost connection is tried once more on a fresh one where that
    is safe: a read always; a write when it surely did not commit (the connection was
    lost before ``COMMIT`` was sent: every write runs in an explicit transaction for
    that reason). A write lost at its ``COMMIT`` may or may not have committed, so it is
    not repeated (nothing is stored twice); it raises :class:`Unavailable`, as does any
    request while the server cannot be reached.
    """

    dialect = "postgresql"

    def __init__(self, url: str, cipher: Cipher, *, rotating: bool = False) -> None:
        super().__init__(cipher.as_text())
        self.where = redacted(url)
        self._url = url
        self._rotating = rotating
        self.outage = _Outage(self.where)
        self.writer = _Link(url, self.outage, self._take_run_lock)
        self.reader = _Link(url, self.outage)
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, url: str, *, cipher: Cipher = PLAIN, rotating: bool = False) -> PostgresDatabase:
        """Connect (migrating the schema) and take the run lock: shared, or exclusive when
        ``rotating`` (``attune keys rotate``, which checks the keys itself)."""
        db = cls(url, cipher, rotating=rotating)
        try:
            for link in (db.writer, db.reader):
                try:
                    await link.open()
                except Unavailable as exc:
                    raise DatabaseError(f"{db.where}: cannot open the database: {exc.__cause__ or exc}") from exc
            if not rotating:
                await db.check_key()
            await db._migrate()
            if not rotating:
                await db.record_key()
            db.outage.armed = True  # from here on, the server going away is an outage to ride out
        except psycopg.Error as exc:
            await db.close()
            raise DatabaseError(f"{db.where}: cannot open the database: {exc}") from exc
        except BaseException:
            await db.close()
            raise
        return db

    async def _take_run_lock(self, conn: _Connection) -> None:
        """On each new writer connection: the run lock, shared (or exclusive when rotating),
        before anything is written. Not to be had: nothing is written on this connection."""
        exclusive = self._rotating
        function = "pg_try_advisory_lock" if exclusive else "pg_try_advisory_lock_shared"
        # At start, a process that has just closed its connections may still hold the lock
        # for a moment (its server session ends after the client has gone): wait that out.
        deadline = time.monotonic() + (0.0 if self.outage.armed else _LOCK_WAIT_AT_START_S)
        while True:
            row = await (await conn.raw.execute(f"SELECT {function}(%s)", (_RUN_LOCK,))).fetchone()
            if row is not None and row[0]:
                return
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        if exclusive:
            raise DatabaseError(f"{self.where} is in use by a running attune: stop it first.")
        message = f"`attune keys rotate` is working on {self.where}: wait for it to finish."
        if not self.outage.armed:  # opening: attune cannot start now
            raise DatabaseError(message)
        # reconnecting: the bot keeps running, and refuses writes until the lock is its own again
        self.outage.lost(message, what="cannot be written")
        raise Unavailable(message)

    async def tables(self) -> set[str]:
        rows = await self.fetchall("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        return {str(r[0]) for r in rows}

    async def _migrate(self) -> None:
        known = migrations(self.dialect)
        async with self._write_lock:
            raw = (await self.writer.open()).raw
            async with raw.transaction():
                await raw.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
                await raw.execute("CREATE TABLE IF NOT EXISTS attune_schema (version INTEGER NOT NULL)")
                row = await (await raw.execute("SELECT MAX(version) FROM attune_schema")).fetchone()
                current = int(row[0] or 0) if row else 0
                if current > len(known):
                    raise too_new(self.where, current, len(known))
                for version, name, sql in known[current:]:
                    log.info("applying migration %s to %s", name, self.where)
                    await raw.execute(sql.encode())  # type: ignore[arg-type]
                    await raw.execute("INSERT INTO attune_schema (version) VALUES (%s)", (version,))

    async def schema_version(self) -> int:
        row = await self.fetchone("SELECT COALESCE(MAX(version), 0) FROM attune_schema")
        return int(row[0]) if row else 0

    async def check(self) -> str:
        """Read every row of every table (a damaged page fails the read); the server keeps
        the constraints itself."""
        try:
            for table in sorted(await self.tables()):
                await self.fetchone(f"SELECT COUNT(*) FROM {table}")
        except psycopg.Error as exc:
            return f"{type(exc).__name__}: {exc}"
        return "ok"

    async def close(self) -> None:
        for link in (self.reader, self.writer):
            await link.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Connection]:
        """A write transaction. Its start is tried again on a fresh connection if the old
        one turns out to be dead (nothing was written yet); a connection lost inside the
        block or at its COMMIT raises :class:`Unavailable` (the block is not run twice)."""
        async with self._write_lock:
            conn = await self._begin()
            committing = False
            try:
                yield conn
                committing = True
                await conn.raw.execute("COMMIT")
            except BaseException as exc:
                if await self._failed(conn, exc):
                    raise self.outage.refusal(maybe_committed=committing) from exc
                raise

    async def _begin(self, *, serialised: bool = True) -> _Connection:
        """BEGIN (and, for a ``transaction()`` block, the cross-process write lock) on a
        live connection: this checks that the connection still works, and as nothing is
        written by it, it is safe to repeat on a fresh connection."""
        for attempt in (1, 2):
            conn = await self.writer.open()
            try:
                await conn.raw.execute("BEGIN")
                if serialised:
                    await conn.raw.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
                return conn
            except BaseException as exc:
                if not await self._failed(conn, exc):
                    raise
                if attempt == 2:
                    raise self.outage.refusal() from exc
        raise AssertionError("unreachable")

    async def _failed(self, conn: _Connection, exc: BaseException) -> bool:
        """After an error inside a write transaction: True if the connection was lost (it
        is dropped, and reopened on the next use); else the transaction is rolled back."""
        if connection_lost(exc):
            await self.writer.drop(exc)
            return True
        if not conn.raw.closed:
            with contextlib.suppress(psycopg.Error):
                await conn.raw.execute("ROLLBACK")
        return False

    async def _write(self, sql: str, params: Params, *, returning: bool) -> Any:
        """One statement in a transaction of its own, tried once more on a fresh connection
        if the first was lost before its COMMIT was sent (so it surely did not commit)."""
        async with self._write_lock:
            for attempt in (1, 2):
                conn = await self._begin(serialised=False)  # one statement: atomic by itself, as before
                try:
                    result = await (conn.execute_insert(sql, params) if returning else conn.execute(sql, params))
                except BaseException as exc:
                    if not await self._failed(conn, exc):
                        raise
                    if attempt == 2:
                        raise self.outage.refusal() from exc
                    continue
                try:
                    await conn.raw.execute("COMMIT")
                except BaseException as exc:
                    if await self._failed(conn, exc):  # it may have committed: not repeated
                        raise self.outage.refusal(maybe_committed=True) from exc
                    raise
                return result
        raise AssertionError("unreachable")

    async def _read(self, sql: str, params: Params, *, one: bool) -> Any:
        """A read, tried once more on a fresh connection if the connection was lost."""
        for attempt in (1, 2):
            conn = await self.reader.open()
            try:
                cursor = await conn.execute(sql, params)
                return await cursor.fetchone() if one else await cursor.fetchall()
            except psycopg.Error as exc:
                if not connection_lost(exc):
                    raise
                await self.reader.drop(exc)
                if attempt == 2:
                    raise self.outage.refusal() from exc
        raise AssertionError("unreachable")

    async def scrub(self) -> bool:
        """VACUUM the tables that hold people's words (on a connection of its own: writes
        go on meanwhile), so the space of deleted rows is reused. PostgreSQL does not zero
        freed space: the bytes of a deleted row can stay in the data files until
        overwritten (encryption at rest is the remedy)."""
        async with await psycopg.AsyncConnection.connect(self._url, autocommit=True) as conn:
            for table in ("messages", "memories", "memories_fts"):
                await conn.execute(f"VACUUM {table}")  # type: ignore[arg-type]
        return True

    async def execute(self, sql: str, params: Params = ()) -> psycopg.AsyncCursor[Row]:
        result: psycopg.AsyncCursor[Row] = await self._write(sql, params, returning=False)
        return result

    async def insert(self, sql: str, params: Params = ()) -> int | None:
        row = await self._write(sql, params, returning=True)
        return int(row[0]) if row else None

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        row: Row | None = await self._read(sql, params, one=True)
        return row

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        rows: list[Row] = await self._read(sql, params, one=False)
        return rows
