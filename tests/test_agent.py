"""The Agent's pipeline with a recording backend: storage, memory, prompts, reactions, failures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from agent_core.agent import APOLOGY, Agent
from agent_core.config import Config
from agent_core.events import Message, Reaction, Reply
from agent_core.llm import GenerationRequest
from agent_core.style import Style
from agent_core.testing import RecordingBackend
from attune.wiring import open_agent
from bots.slack import reaction_name as slack_reaction_name
from tests.conftest import other_connection


def msg(text: str, user: str = "ann", chat: str = "c1", **kw: object) -> Message:
    return Message(platform="test", chat_id=chat, sender_id=user, sender_name=user.title(), text=text, **kw)


def react(reply_platform_id: str, emoji: str, user: str = "ann", chat: str = "c1", added: bool = True) -> Reaction:
    return Reaction(
        platform="test", chat_id=chat, sender_id=user, message_id=reply_platform_id, emoji=emoji, added=added
    )


def backend(agent: Agent) -> RecordingBackend:
    assert isinstance(agent.llm, RecordingBackend)
    return agent.llm


async def send(agent: Agent, message: Message, platform_id: str | None = None) -> Reply:
    reply = await agent.handle_message(message)
    assert reply is not None
    if platform_id is not None:
        await agent.delivered(reply, platform_id)
    return reply


async def test_a_message_is_stored_answered_and_the_reply_recorded(agent: Agent) -> None:
    reply = await send(agent, msg("hello there"), platform_id="p1")
    assert reply.kind == "answer" and reply.text == "echo: hello there"
    assert set(reply.style) == {"length", "tone", "emoji", "format"}
    rows = await agent.store.db.fetchall("SELECT role, text, platform_message_id, style, prompt, policy FROM messages")
    assert [(r[0], r[1]) for r in rows] == [("user", "hello there"), ("assistant", "echo: hello there")]
    assert rows[1][2] == "p1"
    assert json.loads(rows[1][3]) == reply.style  # the style chosen is stored with the reply
    decision = json.loads(rows[1][5])
    assert decision["context"] == "chat" and 0 < decision["propensity"] <= 1
    assert set(decision["marginals"]) == {"length", "tone", "emoji", "format"}
    assert Style.from_dict(reply.style).instructions() in json.loads(rows[1][4])[0]["content"]
    prompt = json.loads(rows[1][4])
    assert prompt == list(backend(agent).requests[0].messages)  # exactly what the model got


async def test_the_message_is_committed_before_the_reply_is_generated(agent: Agent) -> None:
    seen: list[int] = []

    def reply(request: object) -> str:
        # Another connection sees the committed message while the model is still working.
        with other_connection(agent.store.db) as other:
            seen.append(other.execute("SELECT COUNT(*) FROM messages WHERE text = 'keep me'").fetchone()[0])
        return "ok"

    backend(agent).reply = reply
    await send(agent, msg("keep me"))
    assert seen == [1]


async def test_a_redelivered_event_is_answered_once(agent: Agent) -> None:
    first = await agent.handle_message(msg("once", event_id="ev-1"))
    second = await agent.handle_message(msg("once", event_id="ev-1"))
    assert first is not None and second is None
    assert len(backend(agent).requests) == 1


async def test_the_prompt_holds_style_preferences_memory_and_recent_turns(agent: Agent) -> None:
    await send(agent, msg("/prefs tone formal"))
    await send(agent, msg("/prefs language French"))
    await send(agent, msg("/prefs persona a patient teacher"))
    await send(agent, msg("remember that my cat is called Tom"))
    await send(agent, msg("what about dogs?"))
    await send(agent, msg("and my cat?"))
    messages = backend(agent).requests[-1].messages
    system = messages[0]["content"]
    assert "polite, formal" in system  # the explicit setting
    assert "Answer in one to three short sentences." in system or "Answer thoroughly" in system  # learned
    assert "Always reply in French." in system and "Persona: a patient teacher" in system
    assert "- Their cat is called Tom." in system  # kept by "remember that ...", recalled by "cat"
    assert "You are talking with Ann." in system
    assert [m["content"] for m in messages[1:]] == [
        "remember that my cat is called Tom",
        "Noted: your cat is called Tom.",
        "what about dogs?",
        "echo: what about dogs?",
        "and my cat?",
    ]
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "user", "assistant", "user"]


async def test_in_a_group_chat_one_users_memory_never_reaches_another(
    agent: Agent, make_config: Callable[..., Config]
) -> None:
    group = {"chat": "g1", "chat_kind": "group"}
    await send(agent, msg("/remember my favourite animal is the blue whale", user="ann", chat="g1"))
    await send(agent, msg("I am Ann and I love whales", **group))  # kept as Ann's note ("They love whales.")
    assert "They love whales." in [n.text for n in await agent.store.list_memories(1)]
    await send(agent, msg("tell me about whales", user="bob", **group))
    bob_prompt = json.dumps(backend(agent).requests[-1].messages)
    assert "blue whale" not in bob_prompt and "I am Ann" not in bob_prompt and "love whales" not in bob_prompt
    await send(agent, msg("whales again", **group))
    ann_prompt = json.dumps(backend(agent).requests[-1].messages)
    assert "I am Ann" in ann_prompt  # her own turn in this chat
    assert "blue whale" not in ann_prompt and "They love whales" not in ann_prompt  # notes stay out of groups
    assert "tell me about whales" not in ann_prompt
    await send(agent, msg("whales in private?", chat="dm"))
    assert "blue whale" in json.dumps(backend(agent).requests[-1].messages)  # her notes, in her private chat
    await agent.close()

    shared = await open_agent(make_config("[memory]\nrecall_in_groups = true\n"), llm=RecordingBackend())
    await shared.llm.start()
    try:
        await send(shared, msg("whales once more", **group))
        assert "blue whale" in json.dumps(backend(shared).requests[-1].messages)  # when the operator allows it
        await send(shared, msg("whales for bob", user="bob", **group))
        assert "blue whale" not in json.dumps(backend(shared).requests[-1].messages)  # never to another person
    finally:
        await shared.close()


async def test_a_failing_backend_gives_an_apology_and_keeps_the_message(agent: Agent) -> None:
    backend(agent).fail = True
    reply = await send(agent, msg("are you there?"))
    assert reply.kind == "error" and reply.text == APOLOGY and reply.reply_id is None
    rows = await agent.store.db.fetchall("SELECT role, text FROM messages")
    assert [tuple(r) for r in rows] == [("user", "are you there?")]


class LoadingBackend(RecordingBackend):
    """A backend whose start() takes until the test lets it finish (or fail)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.loaded = asyncio.Event()
        self.fail_load = fail

    async def start(self) -> None:
        await self.loaded.wait()
        if self.fail_load:
            raise RuntimeError("the weights are not there")
        await super().start()


async def test_while_the_model_loads_a_message_waits_for_it_and_a_command_does_not(
    make_config: Callable[..., Config],
) -> None:
    loading = LoadingBackend()
    agent = await open_agent(make_config(), llm=loading)
    try:
        agent.load_model()
        waiting = asyncio.create_task(agent.handle_message(msg("hello while you load")))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # stored, its reply waits for the model
        rows = await agent.store.db.fetchall("SELECT role, text FROM messages")
        assert [tuple(r) for r in rows] == [("user", "hello while you load")]
        stats = await send(agent, msg("/stats"))
        assert stats.text and stats.kind != "error"  # a command is answered meanwhile
        loading.loaded.set()
        reply = await asyncio.wait_for(waiting, 10)
        assert reply is not None and reply.kind == "answer" and reply.text == "echo: hello while you load"
    finally:
        await agent.close()


async def test_a_model_that_fails_to_load_gives_an_apology_and_keeps_the_message(
    make_config: Callable[..., Config],
) -> None:
    loading = LoadingBackend(fail=True)
    agent = await open_agent(make_config(), llm=loading)
    try:
        failed = agent.load_model()
        waiting = asyncio.create_task(agent.handle_message(msg("anyone?")))
        loading.loaded.set()
        reply = await asyncio.wait_for(waiting, 10)
        assert reply is not None and reply.kind == "error" and reply.text == APOLOGY
        assert isinstance(failed.exception(), RuntimeError)
        rows = await agent.store.db.fetchall("SELECT role, awaiting_reply FROM messages")
        assert [tuple(r) for r in rows] == [("user", "deferred")]  # kept, to be answered once the model works
    finally:
        await agent.close()


async def test_a_slow_backend_times_out_with_an_apology(make_config: Callable[..., Config]) -> None:
    slow = RecordingBackend(delay_s=5)
    agent = await open_agent(make_config("[llm]\ntimeout_s = 0.2\n"), llm=slow)
    try:
        reply = await send(agent, msg("slow?"))
        assert reply.kind == "error"
        assert (await agent.store.db.fetchone("SELECT COUNT(*) FROM messages"))[0] == 1
    finally:
        await agent.close()


async def test_per_person_and_global_rate_limits_answer_politely(make_config: Callable[..., Config]) -> None:
    config = make_config("[limits]\nmessages_per_minute = 2\nglobal_messages_per_minute = 4\n")
    agent = await open_agent(config, llm=RecordingBackend())
    try:
        assert (await send(agent, msg("one"))).kind == "answer"
        assert (await send(agent, msg("two"))).kind == "answer"
        third = await send(agent, msg("three"))
        assert third.kind == "notice" and "please wait" in third.text
        assert (await send(agent, msg("fine", user="bob"))).kind == "answer"  # per person
        assert (await send(agent, msg("fine too", user="cat"))).kind == "answer"
        crowded = await send(agent, msg("me as well", user="dan"))  # 5th for the bot within the minute
        assert crowded.kind == "notice" and "more messages than I can answer" in crowded.text
        assert (await send(agent, msg("   ", user="eve"))).kind == "notice"
        rows = await agent.store.db.fetchall("SELECT text FROM messages WHERE role = 'user'")
        assert sorted(r[0] for r in rows) == ["fine", "fine too", "one", "two"]
    finally:
        await agent.close()


async def test_a_long_message_is_cut_for_the_model_and_the_reply_says_so(make_config: Callable[..., Config]) -> None:
    backend = RecordingBackend()
    agent = await open_agent(make_config("[limits]\nmax_message_chars = 50\n"), llm=backend)
    try:
        reply = await send(agent, msg("y" * 30 + " " + "z" * 100_000))
        assert reply.kind == "answer" and "first 50 characters" in reply.text
        asked = backend.requests[-1].messages[-1]["content"]
        assert "z" * 19 in asked and "z" * 20 not in asked  # exactly the first 50 characters, never the whole
        stored = await agent.store.db.fetchone("SELECT text FROM messages WHERE role = 'assistant'")
        assert "first 50 characters" not in stored[0]  # the note is for the person, not the training data
    finally:
        await agent.close()


async def test_one_reply_at_a_time_per_person_and_chat(make_config: Callable[..., Config]) -> None:
    events: list[str] = []

    class Logged(RecordingBackend):
        async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
            asked = request.messages[-1]["content"]
            events.append(f"start {asked}")
            async for piece in super().stream(request):
                yield piece
            events.append(f"end {asked}")

    backend = Logged(delay_s=0.1)
    agent = await open_agent(make_config(), llm=backend)
    try:
        replies = await asyncio.gather(
            send(agent, msg("first")), send(agent, msg("second")), send(agent, msg("hi", user="bob"))
        )
        assert [r.kind for r in replies] == ["answer"] * 3
        assert events.index("end first") < events.index("start second")  # ann's replies one after the other
        assert events.index("start hi") < events.index("end first")  # bob's beside them
        ann_second = next(r for r in backend.requests if r.messages[-1]["content"] == "second")
        assert any(m["content"] == "echo: first" for m in ann_second.messages)  # it saw the first reply
        assert not agent.one_at_a_time.busy(("test", "ann", "c1"))  # nothing left held
    finally:
        await agent.close()


async def test_reactions_are_stored_once_undone_and_changed(agent: Agent) -> None:
    await send(agent, msg("q"), platform_id="r1")
    first = await agent.handle_reaction(react("r1", "👍🏽"))  # skin tone folded
    assert first.stored and first.reward == 1.0 and first.trains
    assert not (await agent.handle_reaction(react("r1", "👍"))).stored  # the same reaction again
    taken_back = await agent.handle_reaction(react("r1", "👍", added=False))
    assert taken_back.stored and taken_back.reward == -1.0
    await agent.handle_reaction(react("r1", "👎"))
    ann = await agent.store.resolve_user("test", "ann")
    assert (await agent.store.stats(ann))["rewards"] == [-1.0]  # changed 👍 to 👎: one 👎


async def test_only_the_addressee_trains_on_a_reply(agent: Agent) -> None:
    await send(agent, msg("q", chat="g", chat_kind="group"), platform_id="g1")
    other = await agent.handle_reaction(react("g1", "❤️", user="bob", chat="g"))
    assert other.stored and not other.trains
    mine = await agent.handle_reaction(react("g1", "❤", chat="g"))
    assert mine.stored and mine.trains


async def test_reactions_on_unknown_messages_and_unknown_emoji(agent: Agent) -> None:
    assert not (await agent.handle_reaction(react("nope", "👍"))).stored
    await send(agent, msg("q"), platform_id="x1")
    odd = await agent.handle_reaction(react("x1", "🦄"))
    assert odd.stored and odd.reward == 0.0
    slack = await agent.handle_reaction(
        react("x1", slack_reaction_name(":+1::skin-tone-3:"))
    )  # as its connector reads it
    assert slack.reward == 1.0


async def test_a_redelivered_reaction_event_counts_once(agent: Agent) -> None:
    await send(agent, msg("q"), platform_id="d1")
    event = Reaction(platform="test", chat_id="c1", sender_id="ann", message_id="d1", emoji="🎉", event_id="re-1")
    assert (await agent.handle_reaction(event)).stored
    assert not (await agent.handle_reaction(event)).stored


async def test_text_commands_go_through_the_command_table(agent: Agent) -> None:
    reply = await send(agent, msg("/help"))
    assert reply.kind == "command" and "/prefs" in reply.text and "/export" in reply.text
    assert backend(agent).requests == []  # no model call for a command
    assert (await agent.store.db.fetchone("SELECT COUNT(*) FROM messages"))[0] == 0


@pytest.mark.sqlite_only
async def test_a_database_locked_by_another_writer_waits_or_fails_clearly(make_config: Callable[..., Config]) -> None:
    import sqlite3
    import threading

    from agent_core.agent import NOT_SAVED

    config = make_config(environ={"ATTUNE_STORAGE__BUSY_TIMEOUT_MS": "2000"})
    agent = await open_agent(config, llm=RecordingBackend())
    other = sqlite3.connect(config.settings.storage.database_path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process writing
        threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
        waited = await send(agent, msg("patience"))  # within busy_timeout_ms: waits, then goes through
        assert waited.kind == "answer" and waited.text == "echo: patience"

        await agent.store.db.execute("PRAGMA busy_timeout = 100")  # the writer connection gives up sooner now
        other.execute("BEGIN IMMEDIATE")  # held past the timeout
        refused = await agent.handle_message(msg("too late"))
        other.execute("ROLLBACK")
        assert refused is not None and refused.kind == "error" and refused.text == NOT_SAVED
        rows = await agent.store.db.fetchall("SELECT text FROM messages ORDER BY id")
        assert [r[0] for r in rows] == ["patience", "echo: patience"]  # nothing half-written
        assert (await send(agent, msg("again"))).kind == "answer"  # and it works once the lock is gone
    finally:
        other.close()
        await agent.close()
