"""Encryption at rest: with ATTUNE_ENCRYPTION_KEY set no plaintext reaches the files, a
missing or wrong key stops start-up and changes nothing, and `attune keys rotate` moves
everything to a new key, also when it is killed half way and run again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from agent_core.agent import Agent
from agent_core.config import Config
from agent_core.testing import RecordingBackend
from agent_core.training.dataset import Example, read_examples, write_examples
from attune.wiring import open_agent, open_database
from storage import SqliteDatabase, Store
from storage.crypto import Cipher, EncryptionError, Key
from storage.keys import rotate, rotation_cipher
from tests.conftest import ATTUNE, query, write_config
from tests.test_agent import msg, react, send
from tests.test_commands import run

SECRET_WORDS = (b"quokka", b"marzipan", b"zanzibar")


def _stored(config: Config, data_dir: Path, words: tuple[bytes, ...] = SECRET_WORDS) -> list[str]:
    """Where the database keeps any of ``words``: on SQLite in which files (raw bytes),
    on PostgreSQL in which tables (every value of every row)."""
    if not config.settings.storage.url:
        return _files_hold(data_dir, words)
    found = []
    directory = data_dir.parent  # where the test's config was written
    for (table,) in query(directory, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"):
        for row in query(directory, f"SELECT * FROM {table}"):
            raw = " ".join(str(v) for v in row).lower().encode()
            found += [f"{table}: {w.decode()}" for w in words if w in raw]
    return found


def _files_hold(data_dir: Path, words: tuple[bytes, ...] = SECRET_WORDS) -> list[str]:
    """Which files under ``data_dir`` contain any of ``words``, in any letter case."""
    found = []
    for path in data_dir.rglob("*"):
        if path.is_file():
            raw = path.read_bytes().lower()
            found += [f"{path.name}: {w.decode()}" for w in words if w in raw]
    return found


async def _open(make_config: Callable[..., Config], key: str | None) -> Agent:
    agent = await open_agent(make_config(environ={"ATTUNE_ENCRYPTION_KEY": key} if key else {}), llm=RecordingBackend())
    await agent.llm.start()
    return agent


async def _fill(agent: Agent) -> None:
    """Messages, a reply with a reaction, a note and a search that finds it."""
    await send(agent, msg("I bake quokka shaped marzipan", message_id="m1"), platform_id="r1")
    await agent.handle_reaction(react("r1", "👍"))
    await run(agent, "/remember my cat is called Zanzibar")


async def test_with_a_key_no_plaintext_reaches_the_files(make_config: Callable[..., Config], tmp_path: Path) -> None:
    key = Key.generate()
    agent = await _open(make_config, key)
    try:
        await _fill(agent)
        backend = agent.llm
        assert isinstance(backend, RecordingBackend)
        await send(agent, msg("tell me a story about my cat", message_id="m2"), platform_id="r2")
        prompt = json.dumps(backend.requests[-1].messages)
        assert "Zanzibar" in prompt  # the note was found by its word through the hashed index
        assert "quokka shaped marzipan" in prompt  # and the earlier turn was read back
        exported = json.loads((await run(agent, "/export")).attachment.content)  # type: ignore[union-attr]
        said, answered = [m["text"] for m in exported["messages"]][:2]
        assert said == "I bake quokka shaped marzipan" and answered.startswith("echo: I bake quokka shaped marzipan")
        assert "They bake quokka shaped marzipan." in [m["text"] for m in exported["memories"]]  # kept unasked
        assert exported["memories"][-1]["text"] == "Their cat is called Zanzibar."
        raw = await agent.store.db.fetchone("SELECT text, prompt FROM messages WHERE role = 'assistant'")
        assert raw is not None and all(agent.store.cipher.current(v) and "echo" not in str(v) for v in raw)
    finally:
        await agent.close()
    assert _stored(make_config(), tmp_path / "data") == []


async def test_without_a_key_the_words_are_in_the_file(make_config: Callable[..., Config], tmp_path: Path) -> None:
    """The check above can fail: the same steps without a key leave the words in the files."""
    agent = await _open(make_config, None)
    try:
        await _fill(agent)
    finally:
        await agent.close()
    found = _stored(make_config(), tmp_path / "data")
    assert {f.split(": ")[1] for f in found} == {w.decode() for w in SECRET_WORDS}


@pytest.mark.sqlite_only
async def test_a_missing_or_wrong_key_stops_start_up_and_changes_nothing(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    key = Key.generate()
    agent = await _open(make_config, key)
    await _fill(agent)
    await agent.close()
    db_file = tmp_path / "data" / "attune.db"
    before = db_file.read_bytes()
    cases = [(None, "is encrypted: set ATTUNE_ENCRYPTION_KEY"), (Key.generate(), "is not the key"),
             ("not-a-key", "is not a key")]  # fmt: skip
    for wrong, message in cases:
        with pytest.raises(EncryptionError, match=message):
            await _open(make_config, wrong)
    assert db_file.read_bytes() == before
    agent = await _open(make_config, key)  # the right key still opens it
    try:
        assert "Their cat is called Zanzibar." in [n.text for n in await agent.store.list_memories(1)]
    finally:
        await agent.close()


async def test_a_key_on_a_plain_database_with_text_is_refused(make_config: Callable[..., Config]) -> None:
    agent = await _open(make_config, None)
    await _fill(agent)
    await agent.close()
    with pytest.raises(EncryptionError, match=r"stored without encryption.*attune keys rotate"):
        await _open(make_config, Key.generate())


async def _rotate(config: Config, old: str | None, new: str) -> None:
    cipher = rotation_cipher(Key.from_text(old) if old else None, Key.from_text(new))
    db = await open_database(config, cipher=cipher, rotating=True)
    try:
        await rotate(db, Key.from_text(old) if old else None, Key.from_text(new), lambda *_: None, batch=2)
    finally:
        await db.close()


async def test_rotation_moves_everything_to_the_new_key(make_config: Callable[..., Config], tmp_path: Path) -> None:
    """A plain database is encrypted by a rotation, then moved to a second key."""
    agent = await _open(make_config, None)
    await _fill(agent)
    await agent.close()
    first, second = Key.generate(), Key.generate()
    await _rotate(make_config(), None, first)
    assert _stored(make_config(), tmp_path / "data") == []
    await _rotate(make_config(), first, second)
    with pytest.raises(EncryptionError, match="is not the key"):
        await _open(make_config, first)
    agent = await _open(make_config, second)
    try:
        await send(agent, msg("is my cat still called that?", message_id="m2"), platform_id="r2")
        assert isinstance(agent.llm, RecordingBackend)
        assert "Zanzibar" in json.dumps(agent.llm.requests[-1].messages)
        ann = await agent.store.find_user("test", "ann")
        history = await agent.store.history(ann, 1)  # type: ignore[arg-type]
        assert history[0]["text"] == "I bake quokka shaped marzipan" and history[1]["reactions"] == ["👍"]
    finally:
        await agent.close()
    assert _stored(make_config(), tmp_path / "data") == []


async def test_rotation_refuses_a_running_bot_and_the_wrong_current_key(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    key = Key.generate()
    agent = await _open(make_config, key)
    try:
        await _fill(agent)
        with pytest.raises(Exception, match="in use by a running attune"):
            await _rotate(make_config(), key, Key.generate())
    finally:
        await agent.close()
    with pytest.raises(EncryptionError, match="is not the key"):
        await _rotate(make_config(), Key.generate(), Key.generate())
    with pytest.raises(EncryptionError, match="is encrypted: set ATTUNE_ENCRYPTION_KEY"):
        await _rotate(make_config(), None, Key.generate())


def _key_ids(db_file: Path) -> dict[bytes | None, int]:
    """How many sealed values are under each key id (None: plain text)."""
    counts: dict[bytes | None, int] = {}
    with sqlite3.connect(db_file) as db:
        for (value,) in db.execute("SELECT text FROM messages UNION ALL SELECT text FROM memories UNION ALL"
                                   " SELECT slot FROM memories WHERE slot IS NOT NULL UNION ALL SELECT embedding"
                                   " FROM memories WHERE embedding IS NOT NULL"):  # fmt: skip
            key_id = value[1:9] if isinstance(value, bytes) else None
            counts[key_id] = counts.get(key_id, 0) + 1
    return counts


@pytest.mark.sqlite_only
async def test_sigkill_during_rotation_then_running_it_again_finishes_it(tmp_path: Path) -> None:
    old, new = Key.generate(), Key.generate()
    config = write_config(tmp_path)
    db_file = tmp_path / "data" / "attune.db"
    db = await SqliteDatabase.open(db_file, cipher=Cipher(Key.from_text(old)))
    store = Store(db)
    user, chat = await store.resolve_user("test", "ann"), await store.resolve_chat("test", "c1")
    texts = [f"quokka message {i}" for i in range(4000)]
    for i, text in enumerate(texts):
        await store.receive_message(user, chat, text, platform_message_id=None, event_id=f"e{i}", at=i)
    for i in range(50):  # a tenth with the slot and vector an automatic note has (sealed too)
        slot, vector = (f"taste:marzipan {i}", "AAAA") if i % 10 == 0 else (None, None)
        await store.add_memory(user, f"marzipan note {i}", source="auto", slot=slot, embedding=vector)
    await db.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTUNE_")}
    env |= {"ATTUNE_ENCRYPTION_KEY": old, "ATTUNE_NEW_ENCRYPTION_KEY": new}
    command = [ATTUNE, "--config", str(config), "keys", "rotate", "--batch", "10"]

    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, env=env)
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), timeout=120)
    proc.send_signal(signal.SIGKILL)
    assert await proc.wait() == -signal.SIGKILL
    assert first.startswith(b"messages: 10/4000")
    split = _key_ids(db_file)
    assert split[Key.from_text(old).id] > 0 and split[Key.from_text(new).id] > 0  # killed half way

    started = subprocess.run([ATTUNE, "--config", str(config), "chat"], input="hi\n", env=env | {
        "ATTUNE_ENCRYPTION_KEY": new}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert started.returncode == 1 and "rotation was interrupted" in started.stderr

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "values re-encrypted" in again.stdout
    assert _key_ids(db_file) == {Key.from_text(new).id: 4050 + 2 * 5}
    with sqlite3.connect(db_file) as check:
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert _files_hold(tmp_path / "data") == []
    db = await SqliteDatabase.open(db_file, cipher=Cipher(Key.from_text(new)))
    try:
        store = Store(db)
        assert [t for _, t in (await store.reply_context(user, chat, before=1e12, turns=4000)).turns] == texts
        notes = await store.note_candidates(user, "note 49 marzipan")
        assert len(notes) == 50 and all(n.text.startswith("marzipan note") and n.keyword for n in notes)
        corrected = await store.keep_note(user, "marzipan note 0 again", source="auto", slot="taste:marzipan 0")
        assert [n.text for n in corrected.replaced] == ["marzipan note 0"]  # the slot's key was re-hashed too
    finally:
        await db.close()


def test_training_data_on_disk_is_sealed(tmp_path: Path) -> None:
    key = Key.generate()
    rows = [Example([{"role": "user", "content": "quokka?"}], "marzipan!", True, 1.0, 1.0, 1, 7)]
    path = tmp_path / "train.jsonl"
    write_examples(path, rows, Key.from_text(key))
    assert b"quokka" not in path.read_bytes() and b"marzipan" not in path.read_bytes()
    assert read_examples(path, Key.from_text(key)) == rows
    with pytest.raises(InvalidTag):
        read_examples(path, Key.from_text(Key.generate()))


def test_the_textual_cipher_for_postgresql_round_trips_anything_a_user_types() -> None:
    """PostgreSQL text takes no bytes: sealed values are stored as marked base64, and a
    plain text that starts with one of the marks is escaped, so it reads back as typed."""
    key = Key.from_text(Key.generate())
    plain, sealed = Cipher().as_text(), Cipher(key).as_text()
    for text in ("hello", "\x01looks sealed", "\x02escaped", "", "\x01", "emoji 🎉 and \x02 inside"):
        stored = plain.seal(text, "messages.text")
        assert isinstance(stored, str) and plain.open(stored, "messages.text") == text
        assert plain.current(stored) and not sealed.current(stored)
        locked = sealed.seal(text, "messages.text")
        assert isinstance(locked, str) and locked.startswith("\x01")
        assert not text.strip("\x01\x02") or text.strip("\x01\x02") not in locked
        assert sealed.open(locked, "messages.text") == text and sealed.current(locked)
        with pytest.raises(EncryptionError):
            sealed.open(locked, "memories.text")  # the field is still the associated data
