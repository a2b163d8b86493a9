"""Storage: the database contract and its two engines (SQLite, PostgreSQL), the migrations,
and the queries (``storage.store.Store``)."""

import sqlite3

import psycopg

from storage.database import Database, DatabaseError, Unavailable
from storage.postgres import PostgresDatabase
from storage.rows import MemoryNote, Received, ReplyContext, ReplyRef, Unanswered
from storage.sqlite import SqliteDatabase
from storage.store import Store
from storage.training import AdapterRow

# What a database raises when it cannot take a write now (locked, disk full, server gone).
UNAVAILABLE: tuple[type[Exception], ...] = (Unavailable, sqlite3.OperationalError, psycopg.OperationalError)

__all__ = [
    "UNAVAILABLE",
    "AdapterRow",
    "Database",
    "DatabaseError",
    "MemoryNote",
    "PostgresDatabase",
    "Received",
    "ReplyContext",
    "ReplyRef",
    "SqliteDatabase",
    "Store",
    "Unanswered",
    "Unavailable",
]
