"""The database contract: what the queries in storage/ may ask of a connection.

attune's SQL is written once, in SQLite's dialect, and runs on two engines:

- :class:`storage.sqlite.SqliteDatabase` (the default): one file through aiosqlite;
- :class:`storage.postgres.PostgresDatabase` (``[storage] url = "postgresql://..."``):
  a PostgreSQL server shared by several bot processes; it translates the few
  constructs that differ (storage/postgres.py says which).

Both apply the same numbered migrations (``storage/migrations/NNNN_name.sql`` and
their PostgreSQL twins in ``storage/migrations/postgresql/``), both check the
encryption key before anything is written, and both take a run lock: shared by every
attune process, exclusive for ``attune keys rotate``.

Parameters are positional (``?``) or named (``:name``). Rows answer ``row[0]``,
``row["name"]`` and ``dict(row)``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from importlib.resources import files
from typing import Any, Protocol

from storage.crypto import KEY_ENV, NEW_KEY_ENV, PLAIN, Cipher, EncryptionError

# Positional (?) or named (:name) parameters of one statement.
Params = Sequence[Any] | Mapping[str, Any]

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class DatabaseError(Exception):
    """The database cannot be used as it is (with a message saying why and what to do)."""


class Unavailable(Exception):
    """The database cannot take this request now, for a while: its server went away (the
    engine is reconnecting) or another process holds it exclusively. The engine has
    logged the outage once; callers tell the person and log no more than a short line.

    ``maybe_committed``: the connection was lost at the write's COMMIT, so it may have
    been stored; otherwise nothing of it was written, and it may be tried again later."""

    def __init__(self, message: str, *, maybe_committed: bool = False) -> None:
        super().__init__(message)
        self.maybe_committed = maybe_committed


class Cursor(Protocol):
    rowcount: int


class Connection(Protocol):
    """The connection inside :meth:`Database.transaction` (aiosqlite's names)."""

    async def execute(self, sql: str, params: Params = ()) -> Cursor: ...

    async def execute_fetchall(self, sql: str, params: Params = ()) -> Sequence[Any]: ...

    async def execute_insert(self, sql: str, params: Params = ()) -> tuple[Any, ...] | None: ...


def migrations(dialect: str = "sqlite") -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every shipped migration of one dialect, in order."""
    package = "storage.migrations" if dialect == "sqlite" else f"storage.migrations.{dialect}"
    found = []
    for entry in files(package).iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise DatabaseError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


def too_new(where: str, current: int, known: int) -> DatabaseError:
    return DatabaseError(
        f"{where}: the database has schema version {current}, but this attune only knows versions up to "
        f"{known}. It was written by a newer attune: upgrade attune, or point [storage] at another database."
    )


class Database(ABC):
    """An open database with the schema up to date: the contract both engines keep.

    ``execute`` runs one statement in a transaction of its own; ``transaction()`` groups
    statements, committed when the block ends and rolled back if it raises, and
    serialised with every other write transaction (of every process on the database),
    as SQLite's ``BEGIN IMMEDIATE`` does. Reads see every write committed before them.
    """

    dialect: str
    where: str  # the database, for messages: a file path, or a URL without its password

    def __init__(self, cipher: Cipher = PLAIN) -> None:
        self.cipher = cipher  # how people's words are stored: sealed under a key, or plain

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Connection]: ...

    @abstractmethod
    async def execute(self, sql: str, params: Params = ()) -> Cursor: ...

    @abstractmethod
    async def insert(self, sql: str, params: Params = ()) -> int | None:
        """One INSERT into a table with an ``id``: the new row's id, None if it was ignored."""

    @abstractmethod
    async def fetchone(self, sql: str, params: Params = ()) -> Any | None: ...

    @abstractmethod
    async def fetchall(self, sql: str, params: Params = ()) -> list[Any]: ...

    @abstractmethod
    async def schema_version(self) -> int: ...

    @abstractmethod
    async def tables(self) -> set[str]: ...

    @abstractmethod
    async def scrub(self) -> bool:
        """Make deleted content unrecoverable from the files, as far as the engine allows;
        False if it could not finish now (it finishes later)."""

    @abstractmethod
    async def check(self) -> str:
        """ "ok", or what is damaged."""

    @abstractmethod
    async def close(self) -> None: ...

    async def ping(self) -> None:
        """A trivial read: raises if the database cannot be reached now."""
        await self.fetchone("SELECT 1")

    # --- the encryption key, shared by both engines --------------------------------

    async def key_state(self) -> tuple[bytes | None, bytes | None]:
        """(id of the key the text is under, id of the key a rotation is moving it to);
        None for plain text and for no rotation. (Read before migrating: the table may not exist yet.)"""
        if "encryption" not in await self.tables():
            return None, None
        row = await self.fetchone("SELECT key_id, rotating_to FROM encryption WHERE id = 1")
        if not row:
            return None, None
        return (bytes(row[0]) if row[0] is not None else None, bytes(row[1]) if row[1] is not None else None)

    async def holds_text(self) -> bool:
        """Whether any message or note is stored."""
        if not {"messages", "memories"} <= await self.tables():
            return False
        row = await self.fetchone("SELECT EXISTS (SELECT 1 FROM messages) OR EXISTS (SELECT 1 FROM memories)")
        return bool(row and row[0])

    async def check_key(self) -> None:
        """Refuse, before anything is written, a key that cannot read this database."""
        key_id, rotating_to = await self.key_state()
        key = self.cipher.key
        if rotating_to is not None:
            raise EncryptionError(
                f"{self.where}: a key rotation was interrupted. Finish it: run `attune keys rotate` again "
                f"with the same {KEY_ENV} and {NEW_KEY_ENV}."
            )
        if key_id is None:
            if key is not None and await self.holds_text():
                raise EncryptionError(
                    f"{self.where} holds text stored without encryption, and {KEY_ENV} is set. To encrypt it, "
                    f"stop attune and run `attune keys rotate` with {KEY_ENV} unset and the key in "
                    f"{NEW_KEY_ENV}; or unset {KEY_ENV}."
                )
            return
        if key is None:
            raise EncryptionError(f"{self.where} is encrypted: set {KEY_ENV} to its key.")
        if key.id != key_id:
            raise EncryptionError(f"{KEY_ENV} is not the key {self.where} is encrypted with.")

    async def record_key(self) -> None:
        if self.cipher.key is not None:
            await self.execute("INSERT OR IGNORE INTO encryption (id, key_id) VALUES (1, ?)", (self.cipher.key.id,))
