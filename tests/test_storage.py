"""Storage: pragmas, migrations, identities, messages, memories, reactions, deletion."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from storage import Database, DatabaseError, Received, Store
from storage.database import migrations


async def _open(path: Path) -> Store:
    return Store(await Database.open(path, busy_timeout_ms=1234))


async def test_open_sets_wal_busy_timeout_and_applies_every_migration(tmp_path: Path) -> None:
    store = await _open(tmp_path / "a.db")
    db = store.db
    assert (await db.fetchone("PRAGMA journal_mode"))[0] == "wal"
    assert (await db.fetchone("PRAGMA busy_timeout"))[0] == 1234
    assert (await db.fetchone("PRAGMA foreign_keys"))[0] == 1
    assert await db.schema_version() == len(migrations())
    tables = {r[0] for r in await db.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}
    for table in (
        "users",
        "identities",
        "chats",
        "messages",
        "reactions",
        "preferences",
        "memories",
        "memories_fts",
        "adapters",
        "training_runs",
        "processed_events",
    ):
        assert table in tables
    await db.close()
    # Opening again applies nothing new and keeps the data.
    again = await _open(tmp_path / "a.db")
    assert await again.db.schema_version() == len(migrations())
    await again.db.close()


async def test_a_newer_schema_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {len(migrations()) + 5}")
    with pytest.raises(DatabaseError, match=r"newer attune: upgrade attune"):
        await _open(path)


async def test_not_a_database_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DatabaseError, match="cannot open the database"):
        await _open(path)


async def _receive(
    store: Store, user: str, chat: str, text: str, event_id: str | None = None, kind: str = "private"
) -> Received:
    got = await store.receive_message(
        platform="test",
        platform_chat_id=chat,
        chat_kind=kind,
        platform_user_id=user,
        sender_name=user,
        text=text,
        platform_message_id=None,
        event_id=event_id,
    )
    assert got is not None
    return got


async def test_identities_users_and_event_dedupe(tmp_path: Path) -> None:
    store = await _open(tmp_path / "s.db")
    alice = await store.resolve_user("telegram", "111", "Alice")
    assert await store.resolve_user("telegram", "111") == alice
    assert await store.resolve_user("discord", "111") != alice  # another platform, another identity
    first = await store.receive_message(
        platform="telegram",
        platform_chat_id="c",
        chat_kind="private",
        platform_user_id="111",
        sender_name="Alice",
        text="hi",
        platform_message_id="m1",
        event_id="e1",
    )
    assert first is not None and first.user_id == alice
    again = await store.receive_message(
        platform="telegram",
        platform_chat_id="c",
        chat_kind="private",
        platform_user_id="111",
        sender_name="Alice",
        text="hi",
        platform_message_id="m1",
        event_id="e1",
    )
    assert again is None
    assert (await store.db.fetchone("SELECT COUNT(*) FROM messages"))[0] == 1
    await store.db.close()


async def test_recent_turns_are_per_user_even_in_a_group(tmp_path: Path) -> None:
    store = await _open(tmp_path / "g.db")
    await _receive(store, "ann", "group", "ann one", kind="group")
    await _receive(store, "bob", "group", "bob one", kind="group")
    last = (await _receive(store, "ann", "group", "ann two", kind="group")).message_id
    ann = await store.resolve_user("test", "ann")
    chat = await store.resolve_chat("test", "group")
    turns = await store.recent_turns(ann, chat, 10, before=last + 1)
    assert turns == [("user", "ann one"), ("user", "ann two")]
    await store.db.close()


async def test_memory_full_text_search_is_per_user(tmp_path: Path) -> None:
    store = await _open(tmp_path / "m.db")
    ann, bob = await store.resolve_user("t", "ann"), await store.resolve_user("t", "bob")
    await store.add_memory(ann, "my cat is called Tom")
    await store.add_memory(ann, "I live in Lyon")
    await store.add_memory(bob, "my cat is called Felix")
    found = await store.search_memories(ann, "What is my cat's name?", 5)
    assert [n.text for n in found] == ["my cat is called Tom"]
    assert await store.search_memories(ann, "!!! ??? ***", 5) == []  # no words, no query
    assert await store.search_memories(ann, 'cat" OR text:*', 5) != []  # quotes cannot break the query
    note = found[0].id
    assert not await store.delete_memory(bob, note)  # not Bob's to delete
    assert await store.delete_memory(ann, note)
    assert await store.search_memories(ann, "cat", 5) == []  # the index follows deletions
    await store.db.close()


async def test_reactions_add_remove_and_re_add(tmp_path: Path) -> None:
    store = await _open(tmp_path / "r.db")
    received = await _receive(store, "ann", "c", "question")
    ann = received.user_id
    reply = await store.add_reply(received, text="answer", style={"length": "brief"}, adapter_version=None, prompt=[])
    await store.set_platform_message_id(reply, "p-9")
    ref = await store.find_reply("test", "c", "p-9")
    assert ref is not None and ref.message_id == reply and ref.user_id == ann
    assert await store.add_reaction(reply, ann, "👍", 1.0)
    assert not await store.add_reaction(reply, ann, "👍", 1.0)  # already standing
    assert await store.remove_reaction(reply, ann, "👍") == 1.0
    assert await store.remove_reaction(reply, ann, "👍") is None
    assert await store.add_reaction(reply, ann, "👍", 1.0)
    assert await store.standing_reactions(reply, ann) == ["👍"]
    assert (await store.stats(ann))["rewards"] == [1.0]
    await store.db.close()


async def test_delete_user_removes_every_row_about_them(tmp_path: Path) -> None:
    store = await _open(tmp_path / "d.db")
    received = await _receive(store, "ann", "c", "a secret sentence")
    await _receive(store, "bob", "c2", "bob stays")
    ann = received.user_id
    reply = await store.add_reply(received, text="reply to ann", style={}, adapter_version=None, prompt=[])
    await store.add_reaction(reply, ann, "👍", 1.0)
    await store.add_memory(ann, "ann's private note")
    await store.set_preference(ann, "tone", "formal")
    await store.delete_user(ann)
    for table in ("messages", "memories", "preferences", "reactions", "identities"):
        assert (await store.db.fetchone(f"SELECT COUNT(*) FROM {table} WHERE user_id = ?", (ann,)))[0] == 0
    assert (await store.db.fetchone("SELECT COUNT(*) FROM users WHERE id = ?", (ann,)))[0] == 0
    texts = [r[0] for r in await store.db.fetchall("SELECT text FROM messages")]
    assert texts == ["bob stays"]
    assert await store.search_memories(ann, "private note", 5) == []
    assert await store.resolve_user("test", "ann") != ann  # comes back as a new user
    await store.db.close()
