"""What the query classes share: the database, its cipher, and the caches of platform ids."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from storage.database import Database
from storage.rows import MemoryNote

_CACHE_SIZE = 50_000


class _LRU(OrderedDict[tuple[str, str], int]):
    def get_fresh(self, key: tuple[str, str]) -> int | None:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key: tuple[str, str], value: int) -> None:
        self[key] = value
        if len(self) > _CACHE_SIZE:
            self.popitem(last=False)


async def insert(conn: Any, sql: str, params: tuple[Any, ...]) -> int:
    """Run an INSERT in one hop; the new row's id."""
    return int((await conn.execute_insert(sql, params))[0])


class Tables:
    """The state every query class works on: one per database, shared by the parts of
    :class:`~storage.store.Store`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.cipher = db.cipher
        self._users = _LRU()  # (platform, platform user id) -> user id
        self._chats = _LRU()  # (platform, platform chat id) -> chat id

    def note(self, row: Any, *, keyword: bool = False) -> MemoryNote:
        """A ``memories`` row (id, text, created_at, source, slot, embedding), opened."""
        cipher = self.cipher
        return MemoryNote(
            int(row[0]), cipher.open(row[1], "memories.text"), float(row[2]), source=str(row[3]),
            slot=cipher.open(row[4], "memories.slot") if row[4] is not None else None,
            embedding=cipher.open(row[5], "memories.embedding") if row[5] is not None else None, keyword=keyword,
        )  # fmt: skip
