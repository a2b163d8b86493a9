"""Discord end to end: discord.py against a fake REST API and gateway on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from agent_core.agent import APOLOGY, NOT_SAVED, Agent
from agent_core.config import Config
from agent_core.testing import RecordingBackend
from attune.wiring import open_agent
from bots.discord import DiscordConnector
from storage import Unavailable
from tests.conftest import recorded_reply_id
from tests.fakes.discord import BOT_USER, DM_CHANNEL, GUILD_CHANNEL, FakeDiscord
from tests.fuzzing import NO_LIMITS, examples_of, mutated, settled_whole

ANN, BOB = "111", "222"


def _config(make_config: Callable[..., Config], fake: FakeDiscord, extra: str = "") -> Config:
    return make_config(
        f'[discord]\napi_base = "{fake.api_base}"\ngateway_url = "{fake.gateway_url}"\nguild_ready_timeout_s = 0.05\n'
        + extra,
        environ={"DISCORD_BOT_TOKEN": fake.token},
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


async def _started(
    fake: FakeDiscord, make_config: Callable[..., Config], backend: RecordingBackend, extra: str = ""
) -> DiscordConnector:
    config = _config(make_config, fake, extra)
    agent = await open_agent(config, llm=backend)
    connector = DiscordConnector(agent, config)
    await connector.start()
    return connector


@pytest.fixture
async def bot(fake: FakeDiscord, make_config: Callable[..., Config]) -> AsyncIterator[DiscordConnector]:
    connector = await _started(fake, make_config, RecordingBackend())
    yield connector
    await connector.stop()
    await connector.agent.close()


async def _rewards(agent: Agent, user: str) -> list[float]:
    return (await agent.store.stats(await agent.store.resolve_user("discord", user)))["rewards"]


async def _eventually(read: Callable[[], object], expected: object, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while (await read()) != expected:  # type: ignore[misc]
            await asyncio.sleep(0.02)


async def test_start_syncs_typed_application_commands(bot: DiscordConnector, fake: FakeDiscord) -> None:
    synced = fake.requests("PUT", "/commands")[0]
    assert {c["name"] for c in synced} == {"help", "prefs", "remember", "forget", "export", "stats", "link", "admin"}
    admin = next(c for c in synced if c["name"] == "admin")
    assert {c["value"] for c in admin["options"][0]["choices"]} == {"stats", "train", "rollback"}
    prefs = next(c for c in synced if c["name"] == "prefs")
    setting = next(o for o in prefs["options"] if o["name"] == "setting")
    assert {c["value"] for c in setting["choices"]} >= {"length", "tone", "emoji", "format", "reset"}
    remember = next(c for c in synced if c["name"] == "remember")
    assert remember["options"][0]["required"] is True and remember["options"][0]["type"] == 3  # a string


async def test_a_direct_message_gets_a_reply_with_typing(bot: DiscordConnector, fake: FakeDiscord) -> None:
    await fake.dispatch("MESSAGE_CREATE", fake.message(DM_CHANNEL, ANN, "hello discord"))
    sent = await fake.wait(fake.sent_messages, 1)
    assert sent[0][0] == DM_CHANNEL and sent[0][1]["content"] == "echo: hello discord"
    assert "message_reference" not in sent[0][1]
    assert fake.requests("POST", f"channels/{DM_CHANNEL}/typing")
    assert await recorded_reply_id(bot.agent)


async def test_in_a_server_only_mentions_are_answered(bot: DiscordConnector, fake: FakeDiscord) -> None:
    await fake.dispatch("MESSAGE_CREATE", fake.message(GUILD_CHANNEL, ANN, "people talking", guild=True))
    question = fake.message(GUILD_CHANNEL, BOB, f"<@{BOT_USER['id']}> what is tea?", mentions=[BOT_USER], guild=True)
    await fake.dispatch("MESSAGE_CREATE", question)
    sent = await fake.wait(fake.sent_messages, 1)
    assert sent[0][0] == GUILD_CHANNEL and sent[0][1]["content"] == "echo: what is tea?"
    assert str(sent[0][1]["message_reference"]["message_id"]) == question["id"]
    await asyncio.sleep(0.3)
    assert len(fake.sent_messages()) == 1


async def test_a_dm_the_model_could_not_answer_gets_the_late_answer_as_a_reply_and_a_database_outage_a_refusal(
    bot: DiscordConnector, fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend: RecordingBackend = bot.agent.llm  # type: ignore[assignment]
    backend.fail = True  # the model cannot answer
    question = fake.message(DM_CHANNEL, ANN, "what is tea?")
    await fake.dispatch("MESSAGE_CREATE", question)
    sent = await fake.wait(fake.sent_messages, 1)
    assert sent[0][1]["content"] == APOLOGY and "message_reference" not in sent[0][1]
    backend.fail = False
    late = asyncio.create_task(bot.answer_deferred())  # as the supervisor runs it
    try:
        sent = await fake.wait(fake.sent_messages, 2)
    finally:
        late.cancel()
    assert sent[1][1]["content"] == "echo: what is tea?"
    assert str(sent[1][1]["message_reference"]["message_id"]) == question["id"]  # late: a reply, also in a DM

    async def away(*args: object, **kwargs: object) -> None:
        raise Unavailable("the database went away")

    monkeypatch.setattr(bot.agent.store, "receive_message", away)
    await fake.dispatch("MESSAGE_CREATE", fake.message(DM_CHANNEL, ANN, "still there?"))
    sent = await fake.wait(fake.sent_messages, 3)
    assert sent[2][1]["content"] == NOT_SAVED  # told in the chat, not dropped


async def test_raw_reactions_are_stored_and_undone(bot: DiscordConnector, fake: FakeDiscord) -> None:
    await fake.dispatch("MESSAGE_CREATE", fake.message(DM_CHANNEL, ANN, "rate me"))
    await fake.wait(fake.sent_messages, 1)
    reply = await recorded_reply_id(bot.agent)
    await fake.dispatch("MESSAGE_REACTION_ADD", fake.reaction(DM_CHANNEL, reply, ANN, "❤️"))
    await _eventually(lambda: _rewards(bot.agent, ANN), [1.0])
    await fake.dispatch("MESSAGE_REACTION_ADD", fake.reaction(DM_CHANNEL, reply, ANN, "❤️"))  # delivered twice
    await fake.dispatch("MESSAGE_REACTION_REMOVE", fake.reaction(DM_CHANNEL, reply, ANN, "❤️"))
    await _eventually(lambda: _rewards(bot.agent, ANN), [])
    await fake.dispatch("MESSAGE_REACTION_ADD", fake.reaction(DM_CHANNEL, reply, BOB, "👎"))  # not Bob's reply
    await asyncio.sleep(0.2)
    rows = await bot.agent.store.db.fetchall("SELECT emoji FROM reactions")
    assert [r[0] for r in rows] == ["❤", "👎"]


async def test_every_application_command_answers(bot: DiscordConnector, fake: FakeDiscord) -> None:
    tone = [{"name": "setting", "type": 3, "value": "tone"}, {"name": "value", "type": 3, "value": "formal"}]
    await fake.dispatch("INTERACTION_CREATE", fake.interaction("prefs", ANN, tone))
    callbacks = await fake.wait(fake.callbacks, 1)
    assert callbacks[0]["type"] == 4
    assert callbacks[0]["data"]["content"] == "Set tone to formal." and callbacks[0]["data"]["flags"] == 64
    commands = [
        ("remember", [{"name": "text", "type": 3, "value": "I live in Oslo"}], "Noted: you live in Oslo."),
        ("help", [], "/prefs"),
        ("stats", [], "Messages: 0 from you"),
        ("forget", [], "You live in Oslo."),
        ("prefs", [], "tone: formal"),
        ("link", [], "Your link code"),
        ("admin", [{"name": "action", "type": 3, "value": "stats"}], "Only an admin"),  # ann is not one
    ]
    for n, (name, options, expected) in enumerate(commands, start=2):
        await fake.dispatch("INTERACTION_CREATE", fake.interaction(name, ANN, options, guild=name == "stats"))
        callbacks = await fake.wait(fake.callbacks, n)
        assert expected in callbacks[-1]["data"]["content"], name
    assert "flags" not in callbacks[2]["data"] or callbacks[2]["data"]["flags"] == 0  # /help is not personal
    await fake.dispatch("INTERACTION_CREATE", fake.interaction("export", ANN))
    callbacks = await fake.wait(fake.callbacks, len(commands) + 2)
    export = callbacks[-1]
    assert export["payload_json"]["data"]["flags"] == 64
    document = json.loads(export["files[0]"])
    assert document["memories"][0]["text"] == "They live in Oslo."


async def test_a_sent_message_can_be_edited(bot: DiscordConnector, fake: FakeDiscord) -> None:
    assert bot.can_edit
    await bot.edit(DM_CHANNEL, "4242", "better text")
    assert [e["content"] for e in fake.requests("PATCH", f"channels/{DM_CHANNEL}/messages/4242")] == ["better text"]


async def test_a_duplicate_delivery_gets_one_reply(bot: DiscordConnector, fake: FakeDiscord) -> None:
    message = fake.message(DM_CHANNEL, ANN, "once")
    await fake.dispatch("MESSAGE_CREATE", message)
    await fake.dispatch("MESSAGE_CREATE", message)
    await fake.dispatch("MESSAGE_CREATE", fake.message(DM_CHANNEL, ANN, "twice"))
    await fake.wait(fake.sent_messages, 2)
    await asyncio.sleep(0.3)
    assert [body["content"] for _, body in fake.sent_messages()] == ["echo: once", "echo: twice"]


async def test_a_malformed_event_is_skipped_and_the_next_message_answered(
    bot: DiscordConnector, fake: FakeDiscord
) -> None:
    await fake.dispatch("MESSAGE_CREATE", {"id": "1", "channel_id": DM_CHANNEL})  # no author, no content
    await fake.dispatch("MESSAGE_REACTION_ADD", {"user_id": ANN})
    await fake.dispatch("SOMETHING_NEW", {"x": 1})
    await fake.dispatch("MESSAGE_CREATE", fake.message(DM_CHANNEL, ANN, "still there?"))
    sent = await fake.wait(fake.sent_messages, 1)
    assert sent[0][1]["content"] == "echo: still there?"


async def test_long_replies_are_split_at_2000(fake: FakeDiscord, make_config: Callable[..., Config]) -> None:
    connector = await _started(fake, make_config, RecordingBackend(reply=lambda r: "word " * 900))
    try:
        await fake.dispatch("MESSAGE_CREATE", fake.message(DM_CHANNEL, ANN, "talk"))
        sent = await fake.wait(fake.sent_messages, 3)
        assert all(len(body["content"]) <= 2000 for _, body in sent)
        assert " ".join(body["content"] for _, body in sent).split() == ["word"] * 900
    finally:
        await connector.stop()
        await connector.agent.close()


async def test_a_wrong_token_fails_start(fake: FakeDiscord, make_config: Callable[..., Config]) -> None:
    config = make_config(
        f'[discord]\napi_base = "{fake.api_base}"\ngateway_url = "{fake.gateway_url}"\n',
        environ={"DISCORD_BOT_TOKEN": "wrong"},
    )
    agent = await open_agent(config, llm=RecordingBackend())
    try:
        with pytest.raises(Exception, match=r"(?i)token"):
            await DiscordConnector(agent, config).start()
    finally:
        await agent.close()


async def test_a_reply_is_shown_as_it_is_written_by_editing(
    fake: FakeDiscord, make_config: Callable[..., Config]
) -> None:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    backend = RecordingBackend(lambda r: words, piece_delay_s=0.05)
    connector = await _started(fake, make_config, backend, "stream_edit_interval_s = 0.1\n")
    try:
        await fake.dispatch("MESSAGE_CREATE", fake.message(DM_CHANNEL, ANN, "letters please"))
        draft = (await fake.wait(fake.sent_messages, 1))[0][1]
        assert draft["content"].startswith("alpha") and draft["content"].endswith(" …")
        async with asyncio.timeout(10):
            while (row := await connector.agent.store.db.fetchone(
                "SELECT platform_message_id FROM messages WHERE role = 'assistant' AND platform_message_id IS NOT NULL"
            )) is None:  # fmt: skip
                await asyncio.sleep(0.02)
        reply_id = str(row[0])
        edits = [e["content"] for e in fake.requests("PATCH", f"channels/{DM_CHANNEL}/messages/{reply_id}")]
        assert edits[-1] == words and len(edits) >= 2
        assert len(fake.sent_messages()) == 1
    finally:
        await connector.stop()
        await connector.agent.close()


async def test_fuzzed_gateway_events_are_skipped_or_answered_and_never_stop_the_bot(
    fake: FakeDiscord, make_config: Callable[..., Config]
) -> None:
    """Message, reaction and slash-command gateway events with fields missing, of the
    wrong type, huge or full of odd characters (hypothesis): the bot answers the next
    good message and leaves no turn half-written."""
    connector = await _started(fake, make_config, RecordingBackend(), NO_LIMITS)
    try:
        events = [("MESSAGE_CREATE", fake.message(DM_CHANNEL, ANN, "hello")),
                  ("MESSAGE_REACTION_ADD", fake.reaction(DM_CHANNEL, "1", ANN, "👍")),
                  ("INTERACTION_CREATE", fake.interaction("remember", ANN, [{"name": "text", "type": 3,
                                                                               "value": "a note"}]))]  # fmt: skip
        for name, event in events:
            for fuzzed in examples_of(mutated(event), 30):
                await fake.dispatch(name, fuzzed)
        await fake.dispatch("MESSAGE_CREATE", fake.message(DM_CHANNEL, ANN, "still there?"))
        async with asyncio.timeout(60):
            while "echo: still there?" not in [body.get("content") for _, body in fake.sent_messages()]:
                await asyncio.sleep(0.05)
        await settled_whole(connector.agent)
    finally:
        await connector.stop()
        await connector.agent.close()
