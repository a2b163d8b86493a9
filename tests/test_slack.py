"""Slack end to end: slack-bolt against a fake Slack on 127.0.0.1, in Socket Mode and HTTP mode."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from slack_sdk.signature import SignatureVerifier

from agent_core.agent import APOLOGY, NOT_SAVED, Agent
from agent_core.config import Config
from agent_core.testing import RecordingBackend
from attune.wiring import open_agent, setup_logging
from bots.slack import SlackConnector
from storage import Unavailable
from tests.conftest import recorded_reply_id
from tests.fakes.slack import FakeSlack
from tests.fuzzing import NO_LIMITS, examples_of, mutated, settled_whole

DM, CHANNEL = "D100", "C200"
ANN, BOB = "UANN", "UBOB"
SECRET = "signing-secret-for-tests"


def _config(make_config: Callable[..., Config], fake: FakeSlack, extra: str = "") -> Config:
    return make_config(
        f'[slack]\napi_url = "{fake.api_url}"\n' + extra,
        environ={"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_APP_TOKEN": "xapp-test", "SLACK_SIGNING_SECRET": SECRET},
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as server:
        yield server


@pytest.fixture
async def bot(fake: FakeSlack, make_config: Callable[..., Config]) -> AsyncIterator[SlackConnector]:
    config = _config(make_config, fake)
    agent = await open_agent(config, llm=RecordingBackend())
    connector = SlackConnector(agent, config)
    await connector.start()
    await fake.connected()
    yield connector
    await connector.stop()
    await agent.close()


async def _rewards(agent: Agent, user: str) -> list[float]:
    return (await agent.store.stats(await agent.store.resolve_user("slack", user)))["rewards"]


async def _eventually(read: Callable[[], object], expected: object, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while (await read()) != expected:  # type: ignore[misc]
            await asyncio.sleep(0.02)


async def test_a_direct_message_gets_a_reply(bot: SlackConnector, fake: FakeSlack) -> None:
    await fake.push("events_api", fake.event_body(fake.message(DM, ANN, "hello slack")))
    posted = await fake.wait_for("chat.postMessage", 1)
    assert posted[0]["channel"] == DM and posted[0]["text"] == "echo: hello slack"
    assert "thread_ts" not in posted[0]

    assert (await recorded_reply_id(bot.agent)).startswith("17")
    assert fake.posted("auth.test") and fake.posted("apps.connections.open")


async def test_in_a_channel_only_mentions_are_answered_in_their_thread(bot: SlackConnector, fake: FakeSlack) -> None:
    await fake.push("events_api", fake.event_body(fake.message(CHANNEL, ANN, "humans talking")))
    await fake.push("events_api", fake.event_body(fake.mention(CHANNEL, BOB, "what is tea?", ts="1700.0001")))
    posted = await fake.wait_for("chat.postMessage", 1)
    assert posted[0]["channel"] == CHANNEL and posted[0]["text"] == "echo: what is tea?"
    assert posted[0]["thread_ts"] == "1700.0001"
    in_thread = fake.mention(CHANNEL, BOB, "and coffee?", ts="1700.0005")
    in_thread["thread_ts"] = "1700.0001"
    await fake.push("events_api", fake.event_body(in_thread))
    posted = await fake.wait_for("chat.postMessage", 2)
    assert posted[1]["thread_ts"] == "1700.0001"  # stays in the thread it came from
    await asyncio.sleep(0.3)
    assert len(fake.posted()) == 2


async def test_a_dm_the_model_could_not_answer_gets_the_late_answer_in_its_thread_and_an_outage_a_refusal(
    bot: SlackConnector, fake: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend: RecordingBackend = bot.agent.llm  # type: ignore[assignment]
    backend.fail = True  # the model cannot answer
    await fake.push("events_api", fake.event_body(fake.message(DM, ANN, "what is tea?", ts="1700.0002")))
    posted = await fake.wait_for("chat.postMessage", 1)
    assert posted[0]["text"] == APOLOGY and "thread_ts" not in posted[0]
    backend.fail = False
    late = asyncio.create_task(bot.answer_deferred())  # as the supervisor runs it
    try:
        posted = await fake.wait_for("chat.postMessage", 2)
    finally:
        late.cancel()
    assert posted[1]["text"] == "echo: what is tea?" and posted[1]["thread_ts"] == "1700.0002"  # a reply to it

    async def away(*args: object, **kwargs: object) -> None:
        raise Unavailable("the database went away")

    monkeypatch.setattr(bot.agent.store, "receive_message", away)
    await fake.push("events_api", fake.event_body(fake.message(DM, ANN, "still there?")))
    posted = await fake.wait_for("chat.postMessage", 3)
    assert posted[2]["text"] == NOT_SAVED  # told in the chat within Slack's 3 s, not dropped


async def test_reactions_by_slack_name_are_stored_and_undone(bot: SlackConnector, fake: FakeSlack) -> None:
    await fake.push("events_api", fake.event_body(fake.message(DM, ANN, "rate this")))
    await fake.wait_for("chat.postMessage", 1)
    ts = await recorded_reply_id(bot.agent)
    await fake.push("events_api", fake.event_body(fake.reaction("reaction_added", ANN, DM, ts, "+1::skin-tone-3")))
    await _eventually(lambda: _rewards(bot.agent, ANN), [1.0])
    await fake.push("events_api", fake.event_body(fake.reaction("reaction_removed", ANN, DM, ts, "+1::skin-tone-3")))
    await _eventually(lambda: _rewards(bot.agent, ANN), [])
    await fake.push("events_api", fake.event_body(fake.reaction("reaction_added", ANN, DM, ts, "joy")))
    await _eventually(lambda: _rewards(bot.agent, ANN), [0.5])
    await fake.push("events_api", fake.event_body(fake.reaction("reaction_added", ANN, DM, ts, "thumbsdown")))
    await _eventually(lambda: _rewards(bot.agent, ANN), [0.5, -1.0])


async def test_the_slash_command_is_acknowledged_and_answered_ephemerally(bot: SlackConnector, fake: FakeSlack) -> None:
    envelope = await fake.push("slash_commands", fake.command(CHANNEL, ANN, "prefs tone formal"))
    responses = await fake.wait_for("responses", 1)
    assert responses[0] == {"text": "Set tone to formal.", "response_type": "ephemeral"}
    assert any(ack["envelope_id"] == envelope for ack in fake.acks)
    for n, text in enumerate(["", "remember I live in Oslo", "forget", "stats", "link", "export", "dance"], start=2):
        await fake.push("slash_commands", fake.command(CHANNEL, ANN, text))
        responses = await fake.wait_for("responses", n)  # one at a time: each may depend on the last
    texts = [r["text"] for r in responses]
    assert any("/prefs" in t and "/export" in t for t in texts)  # empty text: help
    assert any('"text": "They live in Oslo."' in t for t in texts)  # the export's JSON
    assert any("#1: You live in Oslo." in t for t in texts) and any("Reactions: 0" in t for t in texts)
    assert any("Your link code" in t for t in texts)
    assert any("Unknown command /dance" in t for t in texts)
    assert all(r["response_type"] == "ephemeral" for r in responses)


async def test_a_sent_message_can_be_edited(bot: SlackConnector, fake: FakeSlack) -> None:
    assert bot.can_edit
    await bot.edit(DM, "1700000001.000100", "better text")
    update = fake.posted("chat.update")[0]
    assert (update["channel"], update["ts"], update["text"]) == (DM, "1700000001.000100", "better text")


async def test_a_retried_event_gets_one_reply(bot: SlackConnector, fake: FakeSlack) -> None:
    body = fake.event_body(fake.message(DM, ANN, "are you there?", ts="1700.0100"))
    await fake.push("events_api", body)
    await fake.push("events_api", body, retry_attempt=1)
    await fake.push("events_api", fake.event_body(fake.message(DM, ANN, "next", ts="1700.0200")))
    await fake.wait_for("chat.postMessage", 2)
    await asyncio.sleep(0.3)
    assert [p["text"] for p in fake.posted()] == ["echo: are you there?", "echo: next"]


async def test_a_malformed_payload_is_skipped_and_the_next_message_answered(
    bot: SlackConnector, fake: FakeSlack
) -> None:
    await fake.push_raw("{this is not json")
    await fake.push("events_api", fake.event_body({"type": "message", "channel_type": "im", "user": ANN}))  # no ts
    await fake.push("events_api", fake.event_body({"type": "reaction_added", "user": ANN, "item": "nonsense"}))
    await fake.push("events_api", fake.event_body(fake.message(DM, ANN, "still here?")))
    posted = await fake.wait_for("chat.postMessage", 1)
    assert posted[0]["text"] == "echo: still here?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _signed(body: str, timestamp: int | None = None) -> dict[str, str]:
    stamp = str(timestamp or int(time.time()))
    return {"X-Slack-Request-Timestamp": stamp,
            "X-Slack-Signature": SignatureVerifier(SECRET).generate_signature(timestamp=stamp, body=body)}  # fmt: skip


async def test_http_mode_verifies_signatures_and_ignores_retries(
    fake: FakeSlack, make_config: Callable[..., Config]
) -> None:
    port = _free_port()
    config = _config(make_config, fake, f'mode = "http"\nhttp_port = {port}\n')
    agent = await open_agent(config, llm=RecordingBackend())
    connector = SlackConnector(agent, config)
    await connector.start()
    url = f"http://127.0.0.1:{port}/slack/events"
    try:
        async with aiohttp.ClientSession() as http:
            body = json.dumps(fake.event_body(fake.message(DM, ANN, "over http", ts="1700.0300")))
            json_type = {"Content-Type": "application/json"}
            unsigned = await http.post(url, data=body, headers=json_type)
            assert unsigned.status == 401
            forged = await http.post(url, data=body, headers=json_type | _signed(body + " "))
            assert forged.status == 401
            first = await http.post(url, data=body, headers=json_type | _signed(body))
            assert first.status == 200
            retry = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
            again = await http.post(url, data=body, headers=json_type | _signed(body) | retry)
            assert again.status == 200
            await fake.wait_for("chat.postMessage", 1)
            form = urllib.parse.urlencode(fake.command(DM, ANN, "stats"))
            command = await http.post(
                url, data=form, headers={"Content-Type": "application/x-www-form-urlencoded"} | _signed(form)
            )
            assert command.status == 200
        responses = await fake.wait_for("responses", 1)
        assert "Messages: 1 from you" in responses[0]["text"]
        await asyncio.sleep(0.3)
        assert [p["text"] for p in fake.posted()] == ["echo: over http"]
    finally:
        await connector.stop()
        await agent.close()


def test_socket_mode_needs_the_app_token(fake: FakeSlack, make_config: Callable[..., Config]) -> None:
    config = make_config(f'[slack]\napi_url = "{fake.api_url}"\n', environ={"SLACK_BOT_TOKEN": "xoxb-test"})
    with pytest.raises(ValueError, match="SLACK_APP_TOKEN"):
        SlackConnector(None, config)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def _writing_slowly(
    fake: FakeSlack, make_config: Callable[..., Config], words: str, extra: str = ""
) -> AsyncIterator[SlackConnector]:
    """A started Slack connector whose backend writes ``words`` one by one, like a model."""
    config = _config(make_config, fake, extra)
    agent = await open_agent(config, llm=RecordingBackend(lambda r: words, piece_delay_s=0.04))
    connector = SlackConnector(agent, config)
    await connector.start()
    try:
        await fake.connected()
        yield connector
    finally:
        await connector.stop()
        await agent.close()


async def test_slack_sends_the_final_text_once_by_default(fake: FakeSlack, make_config: Callable[..., Config]) -> None:
    words = "slow words arrive one by one here"
    async with _writing_slowly(fake, make_config, words) as connector:
        assert connector.config.settings.slack.stream_edit_interval_s == 0
        await fake.push("events_api", fake.event_body(fake.message(DM, ANN, "hello")))
        posted = await fake.wait_for("chat.postMessage", 1)
        assert posted[0]["text"] == words
        await asyncio.sleep(0.2)
        assert fake.posted("chat.update") == [] and len(fake.posted()) == 1


async def test_slack_can_stream_by_editing_when_configured(fake: FakeSlack, make_config: Callable[..., Config]) -> None:
    words = "slow words arrive one by one here at last"
    async with _writing_slowly(fake, make_config, words, "stream_edit_interval_s = 0.1\n"):
        await fake.push("events_api", fake.event_body(fake.message(DM, ANN, "hello")))
        draft = (await fake.wait_for("chat.postMessage", 1))[0]
        assert draft["text"].endswith(" …")
        async with asyncio.timeout(10):
            while not fake.posted("chat.update") or fake.posted("chat.update")[-1]["text"] != words:
                await asyncio.sleep(0.02)
        assert len(fake.posted()) == 1


async def test_fuzzed_events_and_commands_are_skipped_or_answered_and_never_stop_the_bot(
    fake: FakeSlack, make_config: Callable[..., Config]
) -> None:
    """Message, mention, reaction and slash-command payloads with fields missing, of the
    wrong type, huge or full of odd characters (hypothesis): the bot answers the next
    good message and leaves no turn half-written."""
    config = _config(make_config, fake, NO_LIMITS)
    agent = await open_agent(config, llm=RecordingBackend())
    connector = SlackConnector(agent, config)
    await connector.start()
    try:
        await fake.connected()
        events = [fake.message(DM, ANN, "hello", ts="1700.0001"), fake.mention(CHANNEL, ANN, "hi", ts="1700.0002"),
                  fake.reaction("reaction_added", ANN, DM, "1700.0003", "thumbsup")]  # fmt: skip
        for event in events:
            for fuzzed in examples_of(mutated(event), 30):
                await fake.push("events_api", fake.event_body(fuzzed))
        for fuzzed in examples_of(mutated(fake.command(DM, ANN, "prefs tone formal")), 30):
            await fake.push("slash_commands", fuzzed)
        await fake.push("events_api", fake.event_body(fake.message(DM, ANN, "still here?", ts="1800.0001")))
        async with asyncio.timeout(60):
            while "echo: still here?" not in [p.get("text") for p in fake.posted()]:
                await asyncio.sleep(0.05)
        await settled_whole(agent)
    finally:
        await connector.stop()
        await agent.close()


async def test_under_debug_logging_bolts_own_loggers_write_no_debug(
    agent: Agent, make_config: Callable[..., Config], capsys: pytest.CaptureFixture[str]
) -> None:
    """Bolt copies the root's level onto each logger it makes, after our set-up: under DEBUG
    its framework logger would write what people sent. The handler drops it."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    config = make_config(environ={"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_APP_TOKEN": "xapp-test"})
    try:
        setup_logging("DEBUG", config)
        connector = SlackConnector(agent, config)
        assert connector.app.logger.level == logging.DEBUG  # what Bolt did
        connector.app.logger.debug("payload: ann wrote a secret recipe")
        connector.app.logger.warning("bolt warns")
        logging.getLogger("bots.slack").debug("attune's own debug line")
        err = capsys.readouterr().err
        assert "secret recipe" not in err
        assert "bolt warns" in err and "attune's own debug line" in err
    finally:
        root.handlers[:], root.level = saved
        for name in ("slack_bolt", "slack_sdk"):
            logging.getLogger(name).setLevel(logging.NOTSET)
