"""Storage: the database contract and its two engines (SQLite, PostgreSQL), the migrations, and the queries."""

import sqlite3

import psycopg

from storage.database import Database, DatabaseError
from storage.postgres import PostgresDatabase
from storage.queries import ActiveAdapter, MemoryNote, Received, ReplyContext, ReplyRef, Store, Unanswered
from storage.sqlite import SqliteDatabase

# What a database raises when it cannot take a write now (locked, disk full, server gone).
UNAVAILABLE: tuple[type[Exception], ...] = (sqlite3.OperationalError, psycopg.OperationalError)

__all__ = [
    "UNAVAILABLE",
    "ActiveAdapter",
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
]
