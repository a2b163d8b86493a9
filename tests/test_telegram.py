"""Telegram end to end: python-telegram-bot polls a fake Bot API on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent_core.agent import Agent
from agent_core.config import Config
from agent_core.events import Reply
from agent_core.testing import RecordingBackend
from attune.wiring import open_agent
from bots.telegram import ALLOWED_UPDATES, TelegramConnector
from tests.conftest import recorded_reply_id
from tests.fakes.telegram import BOT, FakeTelegram, parsed
from tests.fuzzing import NO_LIMITS, examples_of, mutated, settled_whole

ANN, BOB = 111, 222
GROUP = -1001


def _config(make_config: Callable[..., Config], fake: FakeTelegram, extra: str = "", **env: str) -> Config:
    text = (
        f'[telegram]\nbase_url = "{fake.base_url}"\nbase_file_url = "{fake.base_url}"\n'
        "poll_timeout_s = 1\nrequest_timeout_s = 5.0\n" + extra
    )
    return make_config(text, environ={"TELEGRAM_BOT_TOKEN": fake.token, **env})


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


@pytest.fixture
async def bot(fake: FakeTelegram, make_config: Callable[..., Config]) -> AsyncIterator[TelegramConnector]:
    config = _config(make_config, fake)
    agent = await open_agent(config, llm=RecordingBackend())
    connector = TelegramConnector(agent, config)
    await connector.start()
    yield connector
    await connector.stop()
    await agent.close()


async def _rewards(agent: Agent, user_id: int) -> list[float]:
    user = await agent.store.resolve_user("telegram", str(user_id))
    return (await agent.store.stats(user))["rewards"]


async def test_start_registers_commands_and_asks_for_reactions(bot: TelegramConnector, fake: FakeTelegram) -> None:
    commands = parsed(fake.sent("setMyCommands")[0]["commands"])
    names = {"help", "prefs", "remember", "forget", "export", "stats", "link", "admin"}
    assert {c["command"] for c in commands} == names
    await asyncio.sleep(0.2)
    polls = fake.sent("getUpdates")
    assert polls and parsed(polls[-1]["allowed_updates"]) == ALLOWED_UPDATES
    assert "message_reaction" in ALLOWED_UPDATES


async def test_a_private_message_gets_a_reply_and_a_typing_indicator(
    bot: TelegramConnector, fake: FakeTelegram
) -> None:
    await fake.push_text(ANN, ANN, "hello bot")
    sent = await fake.wait_sent(1)
    assert sent[0]["chat_id"] == str(ANN) and sent[0]["text"] == "echo: hello bot"
    assert "reply_parameters" not in sent[0]  # no quoting in a private chat
    assert any(a["action"] == "typing" for a in fake.sent("sendChatAction"))
    assert await recorded_reply_id(bot.agent)  # the platform id came back to the core


async def test_in_a_group_only_mentions_and_replies_to_the_bot_are_answered(
    bot: TelegramConnector, fake: FakeTelegram
) -> None:
    await fake.push_text(GROUP, ANN, "just chatting among humans")
    mention = "@attune_bot what time is it?"
    await fake.push_text(GROUP, BOB, mention, entities=[{"type": "mention", "offset": 0, "length": 11}])
    sent = await fake.wait_sent(1)
    assert sent[0]["text"] == "echo: what time is it?"
    assert json.loads(sent[0]["reply_parameters"])["message_id"] > 0  # quotes the question
    bot_message = {"message_id": 5, "date": 0, "chat": {"id": GROUP, "type": "supergroup"}, "from": BOT, "text": "hi"}
    await fake.push_text(GROUP, ANN, "thanks!", reply_to_message=bot_message)
    sent = await fake.wait_sent(2)
    assert sent[1]["text"] == "echo: thanks!"
    await asyncio.sleep(0.3)
    assert len(fake.sent()) == 2  # "just chatting" got nothing


async def test_reactions_are_stored_undone_and_changed(bot: TelegramConnector, fake: FakeTelegram) -> None:
    await fake.push_text(ANN, ANN, "rate me")
    await fake.wait_sent(1)
    reply_id = int(await recorded_reply_id(bot.agent))
    await fake.push_reaction(ANN, ANN, reply_id, old=[], new=["👍"])
    await _wait_for(lambda: _rewards(bot.agent, ANN), [1.0])
    await fake.push_reaction(ANN, ANN, reply_id, old=["👍"], new=["👎"])
    await _wait_for(lambda: _rewards(bot.agent, ANN), [-1.0])
    await fake.push_reaction(ANN, ANN, reply_id, old=["👎"], new=[])
    await _wait_for(lambda: _rewards(bot.agent, ANN), [])
    rows = await bot.agent.store.db.fetchall("SELECT emoji, removed_at IS NOT NULL FROM reactions ORDER BY id")
    assert [tuple(r) for r in rows] == [("👍", 1), ("👎", 1)]


async def test_commands_work_and_personal_answers_in_groups_go_private(
    bot: TelegramConnector, fake: FakeTelegram
) -> None:
    await fake.push_text(ANN, ANN, "/prefs tone formal")
    assert (await fake.wait_sent(1))[0]["text"] == "Set tone to formal."
    await fake.push_text(ANN, ANN, "/remember I like tea")
    assert (await fake.wait_sent(2))[1]["text"].startswith("Noted: you like tea.")
    await fake.push_text(ANN, ANN, "/start")
    assert "/prefs" in (await fake.wait_sent(3))[2]["text"]
    await fake.push_text(ANN, ANN, "/forget")
    assert "You like tea." in (await fake.wait_sent(4))[3]["text"]
    await fake.push_text(ANN, ANN, "/link")
    assert "Your link code" in (await fake.wait_sent(5))[4]["text"]
    await fake.push_text(ANN, ANN, "/export")
    documents = await fake.wait_sent(1, "sendDocument")
    assert json.loads(documents[0]["document"])["memories"][0]["text"] == "They like tea."
    await fake.push_text(GROUP, ANN, "/stats@attune_bot")
    sent = await fake.wait_sent(8)  # the export's text went before its document
    private, note = sent[-2], sent[-1]
    assert private["chat_id"] == str(ANN) and "Messages:" in private["text"]
    assert note["chat_id"] == str(GROUP) and "private chat" in note["text"]
    fake.forbidden_chats.add(BOB)
    await fake.push_text(GROUP, BOB, "/prefs@attune_bot")
    await fake.wait_sent(9)
    # the note in the group follows the refused private message (which the fake may record first)
    note = await _wait_for_message(fake, lambda m: m["chat_id"] == str(GROUP) and "privately" in m["text"], start=8)
    assert "can't write to you privately" in note["text"]
    assert "tone" not in note["text"]  # Bob's preferences did not leak into the group
    assert not [m for m in fake.sent()[8:] if m["chat_id"] == str(GROUP) and "tone" in m["text"]]


async def test_a_sent_message_can_be_edited(bot: TelegramConnector, fake: FakeTelegram) -> None:
    assert bot.can_edit
    await bot.edit(str(ANN), "10123", "better text")
    edits = fake.sent("editMessageText")
    assert edits == [{"chat_id": str(ANN), "message_id": "10123", "text": "better text"}]


async def test_a_duplicate_delivery_gets_one_reply(bot: TelegramConnector, fake: FakeTelegram) -> None:
    message = fake.message(ANN, ANN, "only once")
    await fake.push({"message": message})
    await fake.wait_sent(1)
    await fake.push({"message": message})  # the same message again, in a new update
    await fake.push_text(ANN, ANN, "next")
    sent = await fake.wait_sent(2)
    await asyncio.sleep(0.3)
    assert [m["text"] for m in fake.sent()] == ["echo: only once", "echo: next"]
    assert len(sent) == 2


async def test_a_malformed_update_is_skipped_and_the_next_message_answered(
    bot: TelegramConnector, fake: FakeTelegram
) -> None:
    await fake.push({"message": {"message_id": 1, "text": "no chat, no date"}})
    await fake.push({"message": "not even an object"})
    await fake.push_text(ANN, ANN, "still there?")
    sent = await fake.wait_sent(1)
    assert sent[0]["text"] == "echo: still there?"


async def test_long_replies_are_split_at_4096(fake: FakeTelegram, make_config: Callable[..., Config]) -> None:
    config = _config(make_config, fake)
    agent = await open_agent(config, llm=RecordingBackend(reply=lambda r: "word " * 1500))
    connector = TelegramConnector(agent, config)
    await connector.start()
    try:
        await fake.push_text(ANN, ANN, "talk a lot")
        sent = await fake.wait_sent(2)
        assert all(len(m["text"]) <= 4096 for m in sent)
        assert " ".join(m["text"] for m in sent).split() == ["word"] * 1500
        assert await recorded_reply_id(agent) is not None
    finally:
        await connector.stop()
        await agent.close()


async def _wait_for_message(
    fake: FakeTelegram, match: Callable[[dict[str, Any]], bool], start: int = 0, timeout_s: float = 10.0
) -> dict[str, Any]:
    """The first message sent (from the ``start``-th on) that ``match`` accepts, once it is sent."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not (found := [m for m in fake.sent()[start:] if match(m)]):
        assert asyncio.get_running_loop().time() < deadline, [m["text"] for m in fake.sent()[start:]]
        await asyncio.sleep(0.02)
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_webhook_mode_checks_the_secret_token(fake: FakeTelegram, make_config: Callable[..., Config]) -> None:
    port = _free_port()
    extra = f'mode = "webhook"\nwebhook_url = "https://bot.example.invalid/telegram"\nwebhook_port = {port}\n'
    config = _config(make_config, fake, extra, TELEGRAM_WEBHOOK_SECRET="s3cret-token")
    agent = await open_agent(config, llm=RecordingBackend())
    connector = TelegramConnector(agent, config)
    await connector.start()
    try:
        webhook = fake.sent("setWebhook")[0]
        assert webhook["url"] == "https://bot.example.invalid/telegram" and webhook["secret_token"] == "s3cret-token"
        update = {"update_id": 1, "message": fake.message(ANN, ANN, "via webhook")}
        url = f"http://127.0.0.1:{port}/telegram"
        async with aiohttp.ClientSession() as http:
            wrong = await http.post(url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "guess"})
            assert wrong.status == 403
            right = await http.post(url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "s3cret-token"})
            assert right.status == 200
        sent = await fake.wait_sent(1)
        assert [m["text"] for m in sent] == ["echo: via webhook"]
    finally:
        await connector.stop()
        await agent.close()


async def test_a_wrong_token_fails_start_cleanly(fake: FakeTelegram, make_config: Callable[..., Config]) -> None:
    config = make_config(
        f'[telegram]\nbase_url = "{fake.base_url}"\nrequest_timeout_s = 5.0\n', environ={"TELEGRAM_BOT_TOKEN": "0:bad"}
    )
    agent = await open_agent(config, llm=RecordingBackend())
    try:
        with pytest.raises(Exception, match="rejected"):
            await TelegramConnector(agent, config).start()
    finally:
        await agent.close()


async def _wait_for(read: Callable[[], object], expected: object, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while (await read()) != expected:  # type: ignore[misc]
            await asyncio.sleep(0.02)


def test_the_token_comes_from_the_environment(tmp_path: Path) -> None:
    from attune.wiring import load_config
    from tests.conftest import write_config

    assert not TelegramConnector.configured(load_config(write_config(tmp_path), environ={}))
    assert TelegramConnector.configured(load_config(write_config(tmp_path), environ={"TELEGRAM_BOT_TOKEN": "1:x"}))


async def test_a_reply_is_shown_as_it_is_written_by_editing_at_the_set_rate(
    fake: FakeTelegram, make_config: Callable[..., Config]
) -> None:
    config = _config(make_config, fake, "stream_edit_interval_s = 0.1\n")
    words = "one two three four five six seven eight nine ten eleven twelve"
    agent = await open_agent(config, llm=RecordingBackend(lambda r: words, piece_delay_s=0.04))
    connector = TelegramConnector(agent, config)
    shown: list[float] = []  # when each draft or edit went out
    send, edit = connector.send, connector.edit

    async def timed_send(reply: Reply) -> str | None:
        shown.append(time.monotonic())
        return await send(reply)

    async def timed_edit(chat_id: str, message_id: str, text: str) -> None:
        shown.append(time.monotonic())
        await edit(chat_id, message_id, text)

    connector.send, connector.edit = timed_send, timed_edit  # type: ignore[method-assign]
    await connector.start()
    try:
        await fake.push_text(ANN, ANN, "count for me")
        draft = (await fake.wait_sent(1))[0]
        assert draft["text"].startswith("one") and draft["text"].endswith(" …")
        async with asyncio.timeout(10):
            while not fake.sent("editMessageText") or fake.sent("editMessageText")[-1]["text"] != words:
                await asyncio.sleep(0.02)
        edits = [e["text"] for e in fake.sent("editMessageText")]
        assert len(edits) >= 2 and all(e.endswith(" …") for e in edits[:-1])  # growing drafts, then the final text
        drafts = shown[:-1]  # the final text goes out at once; the drafts before it keep the interval
        assert all(later - earlier >= 0.09 for earlier, later in itertools.pairwise(drafts))
        assert len(fake.sent()) == 1  # one message, edited; not a second one
        query = "SELECT platform_message_id, text FROM messages WHERE role = 'assistant'"
        # reactions on it find the reply: its id is recorded once Telegram answered the send
        assert await recorded_reply_id(agent) == fake.sent("editMessageText")[-1]["message_id"]
        stored = await agent.store.db.fetchone(query)
        assert stored is not None and stored[1] == words
    finally:
        await connector.stop()
        await agent.close()


async def test_fuzzed_updates_are_skipped_or_answered_and_never_stop_the_bot(
    fake: FakeTelegram, make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    """Text, command and reaction updates with fields missing, of the wrong type, huge
    or full of odd characters (hypothesis): each is answered or skipped, and the bot
    still answers the next good message; no turn is left half-written. What people
    wrote stays out of the log, also from the skipped ones."""
    caplog.set_level(logging.DEBUG, logger="bots")
    caplog.set_level(logging.DEBUG, logger="agent_core")
    config = _config(make_config, fake, NO_LIMITS)
    agent = await open_agent(config, llm=RecordingBackend())
    connector = TelegramConnector(agent, config)
    await connector.start()
    try:
        command = fake.message(ANN, ANN, "/prefs tone formal", entities=[{"type": "bot_command", "offset": 0,
                                                                          "length": 6}])  # fmt: skip
        reaction = {"chat": {"id": ANN, "type": "private"}, "message_id": 1, "user": {"id": ANN, "is_bot": False,
                    "first_name": "Ann"}, "date": 1, "old_reaction": [],
                    "new_reaction": [{"type": "emoji", "emoji": "👍"}]}  # fmt: skip
        templates = [{"message": fake.message(ANN, ANN, "hello quokkaword")}, {"message": command},
                     {"message_reaction": reaction}]  # fmt: skip
        for template in templates:
            for update in examples_of(mutated(template), 40):
                await fake.push(update)
        await fake.push_text(ANN, ANN, "still there?")
        async with asyncio.timeout(60):
            while "echo: still there?" not in [m.get("text") for m in fake.sent()]:
                await asyncio.sleep(0.05)
        await settled_whole(agent)
        assert "skipped a malformed Telegram update" in caplog.text
        assert "quokkaword" not in caplog.text
    finally:
        await connector.stop()
        await agent.close()
