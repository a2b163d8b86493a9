"""The SQLite engine (the default): one file through aiosqlite, WAL mode.

Two aiosqlite connections in autocommit mode. Writes that belong together go through
:meth:`SqliteDatabase.transaction`, which serialises the coroutines of this process
(``BEGIN IMMEDIATE`` serialises processes). The database records the last migration
applied in ``PRAGMA user_version``. The run lock is a ``flock`` on ``<file>.lock``;
the kernel drops it when a process dies.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO

import aiosqlite

from storage.crypto import PLAIN, Cipher
from storage.database import Database, DatabaseError, Params, migrations, too_new

log = logging.getLogger(__name__)


class SqliteDatabase(Database):
    """An open SQLite database with the schema up to date.

    Two connections, each on its own thread: ``conn`` for writes (and reads inside a
    write transaction), ``reader`` for plain reads. In WAL mode a reader never waits for
    the writer, so reads and a commit can proceed at the same time on two cores. A read
    sees every write committed before it started.
    """

    dialect = "sqlite"

    def __init__(
        self, conn: aiosqlite.Connection, reader: aiosqlite.Connection, path: Path, cipher: Cipher = PLAIN
    ) -> None:
        super().__init__(cipher)
        self.conn = conn
        self.reader = reader
        self.path = path
        self.where = str(path)
        self._write_lock = asyncio.Lock()
        self._run_lock: IO[bytes] | None = None

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        busy_timeout_ms: int = 5000,
        synchronous: str = "normal",
        cipher: Cipher = PLAIN,
        rotating: bool = False,
    ) -> SqliteDatabase:
        """Open (creating and migrating) the database. ``cipher`` must hold the key the
        database is encrypted with, if any. ``rotating``: for ``attune keys rotate`` only,
        which takes the run lock exclusively and checks the keys itself."""
        path.parent.mkdir(parents=True, exist_ok=True)
        run_lock = _take_run_lock(path, exclusive=rotating)
        opened: list[aiosqlite.Connection] = []
        try:
            conn = await _connect(path, busy_timeout_ms, opened)
            mode = next(iter(await conn.execute_fetchall("PRAGMA journal_mode = WAL")))[0]
            if mode != "wal":
                log.warning("SQLite refused WAL mode for %s (journal_mode=%s)", path, mode)
            await conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            await conn.execute("PRAGMA secure_delete = ON")
            db = cls(conn, await _connect(path, busy_timeout_ms, opened), path, cipher)
            db._run_lock = run_lock
            if not rotating:
                await db.check_key()
            await db._migrate()
            if not rotating:
                await db.record_key()
        except sqlite3.DatabaseError as exc:
            await _close_all(opened)
            run_lock.close()
            raise DatabaseError(f"{path}: cannot open the database: {exc}") from exc
        except BaseException:
            await _close_all(opened)
            run_lock.close()
            raise
        return db

    async def tables(self) -> set[str]:
        return {r[0] for r in await self.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}

    async def _migrate(self) -> None:
        known = migrations()
        current = await self.schema_version()
        if current > len(known):
            raise too_new(self.where, current, len(known))
        for version, name, sql in known[current:]:
            log.info("applying migration %s to %s", name, self.path)
            # executescript commits any open transaction first; the script is its own one.
            await self.conn.executescript(f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {version};\nCOMMIT;")

    async def schema_version(self) -> int:
        return int((await self.fetchone("PRAGMA user_version"))[0])

    async def check(self) -> str:
        rows = await self.fetchall("PRAGMA integrity_check")
        return "; ".join(str(r[0]) for r in rows)

    async def close(self) -> None:
        await _close_all([self.reader, self.conn])
        if self._run_lock is not None:
            self._run_lock.close()
            self._run_lock = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        async with self._write_lock:
            await self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                await self.conn.execute("COMMIT")
            except BaseException:
                # After a failed COMMIT (a full disk) SQLite may or may not have rolled back
                # by itself; either way the transaction must not stay open.
                if self.conn.in_transaction:
                    await self.conn.execute("ROLLBACK")
                raise

    async def scrub(self) -> bool:
        """Make deleted content unrecoverable from the files: merge the full-text index
        (deleted terms otherwise linger in its old segments), copy every page back into
        the database file (``secure_delete`` has zeroed what was freed) and empty the WAL,
        which still holds earlier page images. False if a reader kept the WAL in use."""
        async with self._write_lock:
            await self.conn.execute("INSERT INTO memories_fts(memories_fts) VALUES ('optimize')")
            busy, _, _ = next(iter(await self.conn.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)")))
        return not busy

    async def execute(self, sql: str, params: Params = ()) -> aiosqlite.Cursor:
        async with self._write_lock:
            return await self.conn.execute(sql, params)

    async def insert(self, sql: str, params: Params = ()) -> int | None:
        async with self._write_lock:
            cursor = await self.conn.execute(sql, params)
        return int(cursor.lastrowid) if cursor.rowcount == 1 and cursor.lastrowid else None

    # Each call below is one hop to a connection's thread (about 0.07 ms here), so a
    # query is one call: execute_fetchall rather than execute, fetchone, close.

    async def fetchone(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        rows = await self.reader.execute_fetchall(sql, params)
        return next(iter(rows), None)

    async def fetchall(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        return list(await self.reader.execute_fetchall(sql, params))


def _take_run_lock(path: Path, *, exclusive: bool) -> IO[bytes]:
    lock_file = path.with_name(path.name + ".lock").open("a+b")
    try:
        fcntl.flock(lock_file, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        if exclusive:
            raise DatabaseError(f"{path} is in use by a running attune: stop it first.") from None
        raise DatabaseError(f"`attune keys rotate` is working on {path}: wait for it to finish.") from None
    return lock_file


async def _connect(path: Path, busy_timeout_ms: int, opened: list[aiosqlite.Connection]) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    opened.append(conn)
    conn.row_factory = sqlite3.Row
    await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    await conn.execute("PRAGMA foreign_keys = ON")
    return conn


async def _close_all(connections: list[aiosqlite.Connection]) -> None:
    for conn in connections:
        await conn.close()
