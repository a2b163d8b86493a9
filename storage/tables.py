"""What the query classes share: the database, its cipher, and the caches of platform ids."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from storage.database import Database

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
