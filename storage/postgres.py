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
import functools
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import RowMaker

from storage.crypto import PLAIN, Cipher
from storage.database import Database, DatabaseError, Params, migrations, too_new

log = logging.getLogger(__name__)

# Advisory lock keys (any fixed 64-bit numbers, unlikely to clash with another application's).
_WRITE_LOCK = 0x61747475_6E650001
_RUN_LOCK = 0x61747475_6E650002
_MIGRATE_LOCK = 0x61747475_6E650003

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


class PostgresDatabase(Database):
    """An open PostgreSQL database with the schema up to date."""

    dialect = "postgresql"

    def __init__(self, writer: _Connection, reader: _Connection, url: str, cipher: Cipher) -> None:
        super().__init__(cipher.as_text())
        self.conn = writer
        self.reader = reader
        self.where = redacted(url)
        self._url = url
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, url: str, *, cipher: Cipher = PLAIN, rotating: bool = False) -> PostgresDatabase:
        """Connect (migrating the schema) and take the run lock: shared, or exclusive when
        ``rotating`` (``attune keys rotate``, which checks the keys itself)."""
        opened: list[psycopg.AsyncConnection[Row]] = []
        try:
            for _ in range(2):
                opened.append(await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=_rows))
            db = cls(_Connection(opened[0]), _Connection(opened[1]), url, cipher)
            await db._take_run_lock(exclusive=rotating)
            if not rotating:
                await db.check_key()
            await db._migrate()
            if not rotating:
                await db.record_key()
        except psycopg.Error as exc:
            for conn in opened:
                await conn.close()
            raise DatabaseError(f"{redacted(url)}: cannot open the database: {exc}") from exc
        except BaseException:
            for conn in opened:
                await conn.close()
            raise
        return db

    async def _take_run_lock(self, *, exclusive: bool) -> None:
        function = "pg_try_advisory_lock" if exclusive else "pg_try_advisory_lock_shared"
        row = await (await self.conn.raw.execute(f"SELECT {function}(%s)", (_RUN_LOCK,))).fetchone()
        if row is not None and row[0]:
            return
        if exclusive:
            raise DatabaseError(f"{self.where} is in use by a running attune: stop it first.")
        raise DatabaseError(f"`attune keys rotate` is working on {self.where}: wait for it to finish.")

    async def tables(self) -> set[str]:
        rows = await self.fetchall("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        return {str(r[0]) for r in rows}

    async def _migrate(self) -> None:
        known = migrations(self.dialect)
        async with self._write_lock, self.conn.raw.transaction():
            await self.conn.raw.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            await self.conn.raw.execute("CREATE TABLE IF NOT EXISTS attune_schema (version INTEGER NOT NULL)")
            row = await (await self.conn.raw.execute("SELECT MAX(version) FROM attune_schema")).fetchone()
            current = int(row[0] or 0) if row else 0
            if current > len(known):
                raise too_new(self.where, current, len(known))
            for version, name, sql in known[current:]:
                log.info("applying migration %s to %s", name, self.where)
                await self.conn.raw.execute(sql.encode())  # type: ignore[arg-type]
                await self.conn.raw.execute("INSERT INTO attune_schema (version) VALUES (%s)", (version,))

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
        for conn in (self.reader, self.conn):
            await conn.raw.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Connection]:
        async with self._write_lock, self.conn.raw.transaction():
            await self.conn.raw.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            yield self.conn

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
        async with self._write_lock:
            return await self.conn.execute(sql, params)

    async def insert(self, sql: str, params: Params = ()) -> int | None:
        async with self._write_lock:
            row = await self.conn.execute_insert(sql, params)
        return int(row[0]) if row else None

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        return await (await self.reader.execute(sql, params)).fetchone()

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        return await self.reader.execute_fetchall(sql, params)
