"""SQLite storage through aiosqlite: the connection and migrations, and the queries."""

from storage.database import Database, DatabaseError
from storage.queries import ActiveAdapter, MemoryNote, Received, ReplyContext, ReplyRef, Store

__all__ = [
    "ActiveAdapter",
    "Database",
    "DatabaseError",
    "MemoryNote",
    "Received",
    "ReplyContext",
    "ReplyRef",
    "Store",
]
