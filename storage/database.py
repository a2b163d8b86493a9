"""The SQLite connection: opening, pragmas, numbered migrations, transactions.

One :class:`Database` wraps one aiosqlite connection in autocommit mode. Writes that
belong together go through :meth:`Database.transaction`, which serialises the
coroutines of this process (``BEGIN IMMEDIATE`` serialises processes). Migrations are
the files ``storage/migrations/NNNN_name.sql``, applied in order at start-up; the
database records the last one applied in ``PRAGMA user_version``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiosqlite

log = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class DatabaseError(Exception):
    """The database cannot be used as it is (with a message saying why and what to do)."""


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every shipped migration, in order."""
    found = []
    for entry in files("storage.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise DatabaseError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


class Database:
    """An open SQLite database with the schema up to date."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path, *, busy_timeout_ms: int = 5000, synchronous: str = "normal") -> Database:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            mode = next(iter(await conn.execute_fetchall("PRAGMA journal_mode = WAL")))[0]
            if mode != "wal":
                log.warning("SQLite refused WAL mode for %s (journal_mode=%s)", path, mode)
            await conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            await conn.execute("PRAGMA foreign_keys = ON")
            await conn.execute("PRAGMA secure_delete = ON")
            db = cls(conn, path)
            await db._migrate()
        except sqlite3.DatabaseError as exc:
            await conn.close()
            raise DatabaseError(f"{path}: cannot open the database: {exc}") from exc
        except BaseException:
            await conn.close()
            raise
        return db

    async def _migrate(self) -> None:
        known = migrations()
        current = await self.schema_version()
        if current > len(known):
            raise DatabaseError(
                f"{self.path}: the database has schema version {current}, but this attune only "
                f"knows versions up to {len(known)}. It was written by a newer attune: upgrade "
                f"attune, or point [storage] data_dir at another directory."
            )
        for version, name, sql in known[current:]:
            log.info("applying migration %s to %s", name, self.path)
            # executescript commits any open transaction first; the script is its own one.
            await self.conn.executescript(f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {version};\nCOMMIT;")

    async def schema_version(self) -> int:
        return int((await self.fetchone("PRAGMA user_version"))[0])

    async def close(self) -> None:
        await self.conn.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        async with self._write_lock:
            await self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                await self.conn.execute("ROLLBACK")
                raise
            await self.conn.execute("COMMIT")

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> aiosqlite.Cursor:
        """One statement in a transaction of its own."""
        async with self._write_lock:
            return await self.conn.execute(sql, tuple(params))

    # Each call below is one hop to the connection's thread (about 0.1 ms here), so a
    # query is one call: execute_fetchall rather than execute, fetchone, close.

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = await self.conn.execute_fetchall(sql, tuple(params))
        return next(iter(rows), None)

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return list(await self.conn.execute_fetchall(sql, tuple(params)))
