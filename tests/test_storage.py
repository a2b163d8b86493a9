"""Storage: pragmas, migrations, identities, messages, memories, reactions, deletion."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage import AdapterRow, DatabaseError, Received, ReplyContext, Store
from storage.database import migrations
from tests.conftest import STORAGE, open_database


async def _open(path: Path) -> Store:
    if STORAGE == "postgresql":
        return Store(await open_database(path))
    return Store(await open_database(path, busy_timeout_ms=1234))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await _open(tmp_path / "test.db")
    yield opened
    await opened.db.close()  # also when the test failed: an open connection's thread keeps pytest alive


@pytest.mark.sqlite_only
async def test_open_sets_wal_busy_timeout_and_applies_every_migration(store: Store) -> None:
    db = store.db
    assert (await db.fetchone("PRAGMA journal_mode"))[0] == "wal"
    assert (await db.fetchone("PRAGMA busy_timeout"))[0] == 1234
    assert (await db.fetchone("PRAGMA foreign_keys"))[0] == 1
    assert await db.schema_version() == len(migrations())
    tables = {r[0] for r in await db.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}
    expected = "users identities chats messages reactions preferences memories memories_fts adapters training_runs"
    assert set(expected.split()) | {"processed_events"} <= tables


@pytest.mark.sqlite_only
async def test_reopening_applies_nothing_new_and_keeps_the_data(tmp_path: Path) -> None:
    first = await _open(tmp_path / "a.db")
    user = await first.resolve_user("t", "ann")
    await first.db.close()
    again = await _open(tmp_path / "a.db")
    try:
        assert await again.db.schema_version() == len(migrations())
        assert await again.resolve_user("t", "ann") == user
    finally:
        await again.db.close()


@pytest.mark.sqlite_only
async def test_a_newer_schema_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {len(migrations()) + 5}")
    with pytest.raises(DatabaseError, match=r"newer attune: upgrade attune"):
        await _open(path)


@pytest.mark.sqlite_only
async def test_not_a_database_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DatabaseError, match="cannot open the database"):
        await _open(path)


async def _receive(
    store: Store, user: str, chat: str, text: str, event_id: str | None = None, kind: str = "private"
) -> Received:
    user_id = await store.resolve_user("test", user, user)
    chat_id = await store.resolve_chat("test", chat, kind)
    got = await store.receive_message(
        user_id, chat_id, text, platform_message_id=None, event_id=event_id, at=time.time()
    )
    assert got is not None
    return got


async def test_identities_users_and_event_dedupe(store: Store) -> None:
    alice = await store.resolve_user("telegram", "111", "Alice")
    assert await store.resolve_user("telegram", "111") == alice
    assert await store.resolve_user("discord", "111") != alice  # another platform, another identity
    chat = await store.resolve_chat("telegram", "c", "private")
    assert await store.resolve_chat("telegram", "c") == chat
    first = await store.receive_message(alice, chat, "hi", platform_message_id="m1", event_id="e1", at=1.0)
    assert first is not None and first.user_id == alice and first.chat_id == chat
    again = await store.receive_message(alice, chat, "hi", platform_message_id="m1", event_id="e1", at=2.0)
    assert again is None
    other_chat = await store.resolve_chat("telegram", "d", "group")
    assert await store.receive_message(alice, other_chat, "hi", platform_message_id="m1", event_id="e1", at=3.0)
    assert (await store.db.fetchone("SELECT COUNT(*) FROM messages"))[0] == 2  # one per chat


async def _context(store: Store, user: str, chat: str, before: float | None = None, turns: int = 10) -> ReplyContext:
    user_id = await store.resolve_user("test", user)
    chat_id = await store.resolve_chat("test", chat)
    return await store.reply_context(user_id, chat_id, before=time.time() if before is None else before, turns=turns)


async def _matching(store: Store, user: str, text: str) -> list[str]:
    """The texts of ``user``'s notes that share a word with ``text`` (the keyword half of recall)."""
    candidates = await store.note_candidates(await store.resolve_user("test", user), text)
    return [n.text for n in candidates if n.keyword]


async def test_recent_turns_are_per_user_even_in_a_group(store: Store) -> None:
    await _receive(store, "ann", "group", "ann one", kind="group")
    await _receive(store, "bob", "group", "bob one", kind="group")
    await _receive(store, "ann", "group", "ann two", kind="group")
    cut = time.time()
    await _receive(store, "ann", "group", "ann three", kind="group")
    assert (await _context(store, "ann", "group", before=cut)).turns == [("user", "ann one"), ("user", "ann two")]
    assert (await _context(store, "ann", "group", turns=1)).turns == [("user", "ann three")]
    assert (await _context(store, "bob", "group")).turns == [("user", "bob one")]


async def test_note_candidates_are_per_user_and_mark_shared_words(store: Store) -> None:
    ann, bob = await store.resolve_user("test", "ann"), await store.resolve_user("test", "bob")
    tom = await store.add_memory(ann, "my cat is called Tom")
    await store.add_memory(ann, "I live in Lyon", source="auto", slot="home")
    await store.add_memory(ann, "I work as a nurse")
    await store.add_memory(bob, "my cat is called Felix")
    assert await _matching(store, "ann", "What are my cats' names?") == ["my cat is called Tom"]  # "cats": "cat"
    assert await _matching(store, "ann", "!!! ???") == []
    assert await _matching(store, "ann", 'cat" OR terms:* NEAR(') == ["my cat is called Tom"]  # no query injection
    assert await _matching(store, "bob", "cat") == ["my cat is called Felix"]
    every = await store.note_candidates(ann, "anything")
    assert [n.text for n in every] == ["I work as a nurse", "I live in Lyon", "my cat is called Tom"]  # newest first
    assert [(n.source, n.slot) for n in every][1] == ("auto", "home")
    assert not await store.delete_memory(bob, tom)  # not Bob's to delete
    assert await store.delete_memory(ann, tom)
    assert "my cat is called Tom" not in await _matching(store, "ann", "cat")
    hits = await store.db.fetchall("SELECT rowid FROM memories_fts WHERE rowid = ?", (tom,))
    assert hits == []  # the index follows deletions


async def test_reply_context_reads_preferences_and_the_serving_adapter(store: Store) -> None:
    ann = await store.resolve_user("test", "ann")
    await store.resolve_chat("test", "c")
    await store.set_preference(ann, "tone", "formal")
    context = await _context(store, "ann", "c")
    assert context.preferences == {"tone": "formal"} and context.adapter is None
    await store.db.execute(
        "INSERT INTO adapters (user_id, version, path, status, created_at) VALUES (NULL, 1, '/a/pop', 'active', 0)"
    )
    assert (await _context(store, "ann", "c")).adapter == AdapterRow(None, 1, "/a/pop")
    await store.db.execute(
        "INSERT INTO adapters (user_id, version, path, status, created_at) VALUES (?, 3, '/a/ann', 'active', 0)",
        (ann,),
    )
    assert (await _context(store, "ann", "c")).adapter == AdapterRow(ann, 3, "/a/ann")
    assert await store.training.serving(ann) == AdapterRow(ann, 3, "/a/ann")


async def test_reactions_add_remove_and_re_add(store: Store) -> None:
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
    rows = await store.db.fetchall("SELECT emoji, removed_at FROM reactions WHERE message_id = ?", (reply,))
    assert [tuple(r) for r in rows] == [("👍", None)]
    assert (await store.stats(ann))["rewards"] == [1.0]


async def test_delete_user_removes_every_row_about_them(store: Store) -> None:
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
    assert await store.note_candidates(ann, "private note") == []
    assert (await store.db.fetchone("SELECT COUNT(*) FROM memories_fts"))[0] == 0
    assert await store.resolve_user("test", "ann") != ann  # comes back as a new user
