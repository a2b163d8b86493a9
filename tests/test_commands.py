"""Slash commands as a user types them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from agent_core.agent import Agent
from agent_core.commands import parse_command, reward_trend
from agent_core.events import Command, Reply
from tests.test_agent import msg, react, send


async def run(agent: Agent, text: str, user: str = "ann") -> Reply:
    name, _, args = text.lstrip("/").partition(" ")
    reply = await agent.handle_command(Command(platform="test", chat_id="c1", sender_id=user, name=name, args=args))
    assert reply is not None
    return reply


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("/help", ("help", "")),
        ("/prefs tone formal", ("prefs", "tone formal")),
        ("/Stats@attune_bot", ("stats", "")),
        ("  /remember  x y ", ("remember", "x y")),
        ("hello", None),
        ("/", None),
        ("/ 1", None),
        ("/1abc", None),
    ],
)
def test_parse_command(text: str, parsed: tuple[str, str] | None) -> None:
    assert parse_command(text) == parsed


async def test_help_lists_every_command_and_explains_one(agent: Agent) -> None:
    listing = (await run(agent, "/help")).text
    for name in ("help", "prefs", "remember", "forget", "export", "stats"):
        assert f"/{name}" in listing
    assert "/remember <text>" in (await run(agent, "/help remember")).text
    assert "Usage: /help" in (await run(agent, "/help nosuch")).text


async def test_prefs_show_set_unset_and_reset(agent: Agent) -> None:
    shown = await run(agent, "/prefs")
    assert shown.private and "tone: auto" in shown.text
    assert "Set length to detailed" in (await run(agent, "/prefs length detailed")).text
    assert "Set emoji to some" in (await run(agent, "/prefs emoji=some")).text
    assert "Set persona to A Pirate who says arr" in (await run(agent, "/prefs persona A Pirate who says arr")).text
    text = (await run(agent, "/prefs")).text
    assert "length: detailed" in text and "emoji: some" in text and "persona: A Pirate who says arr" in text
    assert "back to auto" in (await run(agent, "/prefs length auto")).text
    assert "length: auto" in (await run(agent, "/prefs")).text
    await run(agent, "/prefs reset")
    ann = await agent.store.resolve_user("test", "ann")
    assert await agent.store.preferences(ann) == {}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("/prefs length huge", "length must be one of: brief, detailed"),
        ("/prefs colour red", "Unknown preference 'colour'"),
        ("/prefs language", "Give a value for language"),
        ("/prefs reset nonsense", "Unknown preference 'nonsense'"),
        ("/prefs persona " + "x" * 400, "at most 300 characters"),
        ("/remember", "Tell me what to remember"),
        ("/forget 999", "You have no note 999"),
        ("/forget everything now", "Say which note to forget"),
    ],
)
async def test_bad_use_gets_the_usage_not_an_error(agent: Agent, text: str, error: str) -> None:
    reply = await run(agent, text)
    assert error in reply.text and "Usage: /" in reply.text


async def test_unknown_command_points_to_help(agent: Agent) -> None:
    assert "Unknown command /dance" in (await run(agent, "/dance now")).text


async def test_remember_and_forget_one_note(agent: Agent) -> None:
    saved = (await run(agent, "/remember I am allergic to peanuts")).text
    assert saved.startswith("Noted: you are allergic to peanuts.")  # kept as a fact about them, said back to them
    note = saved.split("#")[1].split(";")[0]
    assert f"#{note}: You are allergic to peanuts." in (await run(agent, "/forget")).text
    assert "Forgot note" in (await run(agent, f"/forget {note}")).text
    assert "You have no notes" in (await run(agent, "/forget")).text


async def test_one_user_cannot_forget_anothers_note(agent: Agent) -> None:
    saved = (await run(agent, "/remember ann's note")).text
    note = saved.split("#")[1].split(";")[0]
    assert "You have no note" in (await run(agent, f"/forget {note}", user="bob")).text
    assert "Ann's note." in (await run(agent, "/forget")).text


async def test_forget_all_needs_a_confirmation_and_deletes_everything(agent: Agent) -> None:
    await send(agent, msg("my secret plan"), platform_id="f1")
    await agent.handle_reaction(react("f1", "👍"))
    await run(agent, "/remember secret note")
    assert "Nothing to confirm" in (await run(agent, "/forget all confirm")).text
    asked = await run(agent, "/forget all")
    assert "/forget all confirm" in asked.text
    ann = await agent.store.resolve_user("test", "ann")
    assert (await agent.store.stats(ann))["messages"] == 1  # nothing deleted yet
    assert "deleted" in (await run(agent, "/forget all confirm")).text
    for table in ("messages", "memories", "reactions"):
        assert (await agent.store.db.fetchone(f"SELECT COUNT(*) FROM {table}"))[0] == 0
    exported = json.loads((await run(agent, "/export")).attachment.content)  # type: ignore[union-attr]
    assert exported["messages"] == [] and exported["memories"] == []


async def test_forget_all_removes_the_ids_of_events_handled_in_their_private_chats(agent: Agent) -> None:
    """Whatever a platform's event ids look like: they are found by the chat they came from."""
    await send(agent, msg("hello"), platform_id="p1")
    reaction = dataclasses.replace(react("p1", "👍"), event_id="reaction:9001:👍:1")  # no chat id in it
    await agent.handle_reaction(reaction)
    await send(agent, msg("bob's", user="bob", chat="c2"), platform_id="p2")
    await agent.handle_reaction(dataclasses.replace(react("p2", "👍", user="bob", chat="c2"), event_id="reaction:9002"))
    await run(agent, "/forget all")
    await run(agent, "/forget all confirm")
    left = await agent.store.db.fetchall("SELECT event_id, chat_id FROM processed_events")
    assert [tuple(r) for r in left] == [("reaction:9002", "c2")]  # bob's stays


@pytest.mark.sqlite_only
async def test_forget_all_leaves_nothing_of_the_user_in_the_files(agent: Agent) -> None:
    """After /forget all, neither the user's words nor their ids are anywhere in the data
    directory: not in the database file, its WAL, the full-text index or adapter files."""
    who = {"user": "annq7731", "chat": "annq7731"}  # a Telegram-style private chat: its id is the user's
    for i in range(3):
        await send(agent, msg(f"my quokkaword number {i}", **who, message_id=f"m{i}"), platform_id=f"q{i}")
        await agent.handle_reaction(react(f"q{i}", "👍", **who))
    await run(agent, "/remember quokkanote about my garden", user=who["user"])
    await run(agent, "/prefs persona quokkapersona", user=who["user"])
    await send(agent, msg("bob stays here", user="bob", chat="g1", chat_kind="group"))
    ann = await agent.store.find_user("test", who["user"])
    assert ann is not None
    adapter = agent.settings.storage.data_path / "adapters" / str(ann) / "1"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"note": "quokka adapter"}')
    await run(agent, "/forget all", user=who["user"])
    assert "deleted" in (await run(agent, "/forget all confirm", user=who["user"])).text

    for path in agent.settings.storage.data_path.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            assert b"quokka" not in raw and who["user"].encode() not in raw, path
    rows = await agent.store.db.fetchall("SELECT action, subject, detail FROM audit_log")
    assert [(r[0], r[1]) for r in rows] == [("forget_all", ann)]
    assert json.loads(rows[0][2]) == {"messages": 6, "memories": 1, "reactions": 3}  # counts, no content
    assert (await agent.store.db.fetchone("SELECT text FROM messages WHERE role = 'user'"))[0] == "bob stays here"
    assert await agent.store.db.check() == "ok"


async def test_export_holds_everything_about_me_and_nothing_about_others(agent: Agent) -> None:
    await send(agent, msg("ann writes"), platform_id="e1")
    await send(agent, msg("bob writes", user="bob", chat="c2"), platform_id="e2")
    await agent.handle_reaction(react("e1", "❤️"))
    await run(agent, "/remember ann note")
    await run(agent, "/prefs tone formal")
    reply = await run(agent, "/export")
    assert reply.private and reply.attachment is not None and reply.attachment.filename.endswith(".json")
    data = json.loads(reply.attachment.content)
    assert data["user"]["name"] == "Ann"
    assert data["identities"][0]["platform"] == "test"
    assert [m["text"] for m in data["messages"]] == ["ann writes", "echo: ann writes"]
    assert data["messages"][1]["style"]["tone"] in ("casual", "formal")
    shown = {"length": "brief", "tone": "formal", "emoji": "none", "format": "prose"}  # what "echo: ..." reads as
    assert data["messages"][1]["observed_style"] == shown
    assert data["messages"][1]["policy"]["propensity"] > 0  # how the style was chosen
    assert data["learned_style"]["reactions_learned_from"] == 1
    assert [r["emoji"] for r in data["reactions"]] == ["❤"]
    assert [m["text"] for m in data["memories"]] == ["Ann note."]
    assert data["preferences"] == {"tone": "formal"}
    assert "bob writes" not in reply.attachment.content.decode()


async def test_stats_counts_and_reward_trend(agent: Agent) -> None:
    for i in range(3):
        await send(agent, msg(f"q{i}"), platform_id=f"s{i}")
    await agent.handle_reaction(react("s0", "👎"))
    await agent.handle_reaction(react("s1", "👍"))
    text = (await run(agent, "/stats")).text
    assert "Messages: 3 from you, 3 replies from me." in text
    assert "Reactions: 2; reward +0.00 over the last 2." in text
    assert "Adapter: none yet" in text and "recording test backend" in text


def test_reward_trend_compares_recent_with_earlier() -> None:
    assert reward_trend([]) == "no reactions yet"
    assert reward_trend([-1.0] * 10 + [1.0] * 10) == "+1.00 over the last 10 (was -1.00 before, ↑)"
    assert reward_trend([1.0] * 12).endswith("(was +1.00 before, →)")
