"""The SQLite connection: opening, pragmas, numbered migrations, transactions.

One :class:`Database` wraps one aiosqlite connection in autocommit mode. Writes that
belong together go through :meth:`Database.transaction`, which serialises the
coroutines of this process (``BEGIN IMMEDIATE`` serialises processes). Migrations are
the files ``storage/migrations/NNNN_name.sql``, applied in order at start-up; the
database records the last one applied in ``PRAGMA user_version``.

Opening also checks the encryption key against the one the database records (see
:mod:`storage.crypto`) before anything is written, and takes the database's run lock:
shared by every attune process, exclusive for ``attune keys rotate``, which must have
the database to itself. The kernel drops the lock when a process dies.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import IO, Any

import aiosqlite

from storage.crypto import KEY_ENV, NEW_KEY_ENV, PLAIN, Cipher, EncryptionError

log = logging.getLogger(__name__)

# Positional (?) or named (:name) parameters of one statement.
Params = Sequence[Any] | Mapping[str, Any]

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
    """An open SQLite database with the schema up to date.

    Two connections, each on its own thread: ``conn`` for writes (and reads inside a
    write transaction), ``reader`` for plain reads. In WAL mode a reader never waits for
    the writer, so reads and a commit can proceed at the same time on two cores. A read
    sees every write committed before it started.
    """

    def __init__(
        self, conn: aiosqlite.Connection, reader: aiosqlite.Connection, path: Path, cipher: Cipher = PLAIN
    ) -> None:
        self.conn = conn
        self.reader = reader
        self.path = path
        self.cipher = cipher  # how people's words are stored: sealed under a key, or plain
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
    ) -> Database:
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
                await db._check_key()
            await db._migrate()
            if cipher.key is not None and not rotating:
                await db.execute("INSERT OR IGNORE INTO encryption (id, key_id) VALUES (1, ?)", (cipher.key.id,))
        except sqlite3.DatabaseError as exc:
            await _close_all(opened)
            run_lock.close()
            raise DatabaseError(f"{path}: cannot open the database: {exc}") from exc
        except BaseException:
            await _close_all(opened)
            run_lock.close()
            raise
        return db

    async def _tables(self) -> set[str]:
        return {r[0] for r in await self.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}

    async def key_state(self) -> tuple[bytes | None, bytes | None]:
        """(id of the key the text is under, id of the key a rotation is moving it to);
        None for plain text and for no rotation. (Read before migrating: the table may not exist yet.)"""
        if "encryption" not in await self._tables():
            return None, None
        row = await self.fetchone("SELECT key_id, rotating_to FROM encryption WHERE id = 1")
        return (row[0], row[1]) if row else (None, None)

    async def holds_text(self) -> bool:
        """Whether any message or note is stored."""
        if not {"messages", "memories"} <= await self._tables():
            return False
        row = await self.fetchone("SELECT EXISTS (SELECT 1 FROM messages) OR EXISTS (SELECT 1 FROM memories)")
        return bool(row and row[0])

    async def _check_key(self) -> None:
        """Refuse, before anything is written, a key that cannot read this database."""
        key_id, rotating_to = await self.key_state()
        key = self.cipher.key
        if rotating_to is not None:
            raise EncryptionError(
                f"{self.path}: a key rotation was interrupted. Finish it: run `attune keys rotate` again "
                f"with the same {KEY_ENV} and {NEW_KEY_ENV}."
            )
        if key_id is None:
            if key is not None and await self.holds_text():
                raise EncryptionError(
                    f"{self.path} holds text stored without encryption, and {KEY_ENV} is set. To encrypt it, "
                    f"stop attune and run `attune keys rotate` with {KEY_ENV} unset and the key in "
                    f"{NEW_KEY_ENV}; or unset {KEY_ENV}."
                )
            return
        if key is None:
            raise EncryptionError(f"{self.path} is encrypted: set {KEY_ENV} to its key.")
        if key.id != key_id:
            raise EncryptionError(f"{KEY_ENV} is not the key {self.path} is encrypted with.")

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
            except BaseException:
                await self.conn.execute("ROLLBACK")
                raise
            await self.conn.execute("COMMIT")

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
        """One statement in a transaction of its own."""
        async with self._write_lock:
            return await self.conn.execute(sql, params)

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
