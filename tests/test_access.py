"""[access]: per-platform allowlists of users and chats, and /admin for admins only."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from agent_core.agent import NOT_ALLOWED, Agent
from agent_core.config import Config, ConfigError
from agent_core.events import Command, Reaction
from agent_core.testing import RecordingBackend
from attune.wiring import open_agent
from storage.training import TrainingRecords
from tests.test_agent import msg, send


@pytest.fixture
async def guarded(make_config: Callable[..., Config]) -> AsyncIterator[Agent]:
    config = make_config(
        '[access]\nallowed_users = ["test:ann", "test:root", "test:bob"]\nallowed_chats = ["test:c1", "test:g1"]\n'
        'admins = ["test:root"]\n'
    )
    agent = await open_agent(config, llm=RecordingBackend())
    yield agent
    await agent.close()


async def command(agent: Agent, text: str, user: str = "ann", chat: str = "c1") -> str:
    name, _, args = text.lstrip("/").partition(" ")
    reply = await agent.handle_command(Command(platform="test", chat_id=chat, sender_id=user, name=name, args=args))
    assert reply is not None
    return reply.text


async def test_only_listed_users_and_chats_of_a_platform_are_answered(guarded: Agent) -> None:
    assert (await send(guarded, msg("hello"))).kind == "answer"
    stranger = await guarded.handle_message(msg("let me in", user="eve"))
    assert stranger is not None and stranger.text == NOT_ALLOWED and stranger.reply_id is None
    in_a_group = await guarded.handle_message(msg("psst", user="eve", chat="g1", chat_kind="group"))
    assert in_a_group is None  # silence in groups
    assert await guarded.handle_message(msg("hi", chat="c9", chat_kind="group")) is None  # ann, but not this chat
    assert await command(guarded, "/stats", user="eve") == NOT_ALLOWED
    other_platform = msg("hello from the web", user="eve")
    other_platform = type(other_platform)(**{**other_platform.__dict__, "platform": "web"})
    assert (await send(guarded, other_platform)).kind == "answer"  # no web entries: open
    outcome = await guarded.handle_reaction(
        Reaction(platform="test", chat_id="c1", sender_id="eve", message_id="r1", emoji="👍")
    )
    assert not outcome.stored
    rows = await guarded.store.db.fetchall("SELECT text FROM messages WHERE role = 'user'")
    assert sorted(r[0] for r in rows) == ["hello", "hello from the web"]  # nothing of eve's on "test" stored


async def test_admin_commands_refuse_everyone_but_admins(guarded: Agent) -> None:
    await send(guarded, msg("hello"))
    assert "Only an admin" in await command(guarded, "/admin stats")
    assert "Only an admin" in await command(guarded, "/admin rollback 1")
    stats = await command(guarded, "/admin stats", user="root")
    assert "Users: 2. Messages: 1, replies: 1" in stats and "Training: idle" in stats  # ann and root
    assert "Usage: /admin" in await command(guarded, "/admin delete everything", user="root")
    assert "No user nobody:1" in await command(guarded, "/admin train nobody:1", user="root")
    assert "too little rated feedback" in await command(guarded, "/admin train test:ann", user="root")


async def test_admin_rollback_takes_a_users_adapter_out(guarded: Agent) -> None:
    await send(guarded, msg("hello"))
    ann = await guarded.store.resolve_user("test", "ann")
    records = TrainingRecords(guarded.store.db)
    await records.add_adapter(ann, 1, "/nowhere/1", promote=True, parent="base", metrics={})
    await records.add_adapter(ann, 2, "/nowhere/2", promote=True, parent="base", metrics={})
    assert "version 2 taken out; now version 1" in await command(guarded, f"/admin rollback {ann}", user="root")
    assert "version 1 taken out; now the base model" in await command(guarded, "/admin rollback test:ann", user="root")
    assert "has no adapter in service" in await command(guarded, f"/admin rollback {ann}", user="root")
    assert (await records.active(ann)) is None


async def test_a_rollback_says_the_population_adapter_serves_where_it_does(guarded: Agent) -> None:
    await send(guarded, msg("hello"))
    ann = await guarded.store.resolve_user("test", "ann")
    records = TrainingRecords(guarded.store.db)
    await records.add_adapter(None, 3, "/nowhere/p3", promote=True, parent="base", metrics={})
    await records.add_adapter(ann, 1, "/nowhere/1", promote=True, parent="population-v3", metrics={})
    said = await command(guarded, f"/admin rollback {ann}", user="root")
    assert "version 1 taken out; now the shared population adapter v3" in said and "base model" not in said
    served = await guarded.store.training.serving(ann)
    assert served is not None and served.user_id is None and served.version == 3  # what serves: as said
    population = await guarded.operations.rollback(None)
    assert population.message == ("The population: adapter version 3 taken out; "
                                  "now the base model for users without their own adapter.")  # fmt: skip
    assert await guarded.store.training.serving(ann) is None


async def test_no_command_reads_or_changes_another_users_data(guarded: Agent) -> None:
    await command(guarded, "/remember ann's favourite city is zanzibar")
    await command(guarded, "/prefs tone formal")
    for text in ("/stats", "/export", "/forget", "/prefs", "/remember bob was here", "/forget 1", "/forget all"):
        answer = await command(guarded, text, user="bob")
        assert "zanzibar" not in answer and "tone: formal" not in answer, text
    ann = await guarded.store.resolve_user("test", "ann")
    assert [n.text for n in await guarded.store.list_memories(ann)] == ["Ann's favourite city is zanzibar."]
    assert (await guarded.store.preferences(ann)) == {"tone": "formal"}


def test_access_entries_must_name_the_platform(make_config: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError, match=r"access\.admins.*platform:id"):
        make_config('[access]\nadmins = ["12345"]\n')


async def test_in_a_group_each_persons_notes_prefs_style_and_adapter_stay_theirs(
    make_config: Callable[..., Config],
) -> None:
    backend = RecordingBackend()
    agent = await open_agent(make_config(), llm=backend)
    group = {"chat": "g1", "chat_kind": "group"}
    try:
        await command(agent, "/remember my hint is blue whale", chat="g1")
        await command(agent, "/prefs tone formal", chat="g1")
        await command(agent, "/prefs persona a pirate", chat="g1")
        ann = await agent.store.resolve_user("test", "ann")
        await TrainingRecords(agent.store.db).add_adapter(
            ann, 3, "/adapters/ann/3", promote=True, parent="base", metrics={}
        )
        await send(agent, msg("hello from ann", **group))
        ann_request = backend.requests[-1]
        await send(agent, msg("hello from bob", user="bob", **group))
        bob_request = backend.requests[-1]
        assert ann_request.adapter is not None and ann_request.adapter.path == "/adapters/ann/3"
        assert bob_request.adapter is None  # ann's adapter never answers bob
        bob_prompt = " ".join(m["content"] for m in bob_request.messages)
        assert "blue whale" not in bob_prompt, bob_prompt
        assert "pirate" not in bob_prompt, bob_prompt
        assert "hello from ann" not in bob_prompt  # not even ann's turn in the shared chat
        for text in ("/stats", "/export", "/prefs", "/forget"):
            answer = await command(agent, text, user="bob", chat="g1")
            assert "version 3" not in answer and "blue whale" not in answer and "pirate" not in answer, text
        bob = await agent.store.resolve_user("test", "bob")
        exported = await agent.store.export_user(bob)
        assert exported["adapters"] == [] and exported["memories"] == [] and exported["preferences"] == {}
    finally:
        await agent.close()
