"""Nothing left unanswered: a message stored but not answered when the process died is
answered when the bot comes back, once, also when the platform sends the event again;
one too old gets a note that it was not answered."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from agent_core.agent import APOLOGY, MISSED
from agent_core.config import Config
from agent_core.events import Message
from agent_core.testing import RecordingBackend
from attune.wiring import open_agent
from tests.conftest import ATTUNE, integrity, query, write_config
from tests.fakes.openai import FakeOpenAI
from tests.fakes.telegram import FakeTelegram

ANN = 111


def _run_config(tmp_path: Path, telegram: FakeTelegram, server: FakeOpenAI) -> Path:
    return write_config(
        tmp_path,
        f'[llm]\nbackend = "openai"\n[llm.openai]\nbase_url = "{server.base_url}"\nmax_retries = 0\n'
        f'[telegram]\nbase_url = "{telegram.base_url}"\npoll_timeout_s = 1\n'
        "[run]\ndefault_front_end = false\n[training]\nenabled = false\n",
    )


async def _attune_run(config: Path, cwd: Path, token: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTUNE_", "SLACK_", "TELEGRAM_", "DISCORD_"))}
    return await asyncio.create_subprocess_exec(
        ATTUNE, "--config", str(config), "run", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, env={**env, "TELEGRAM_BOT_TOKEN": token}, cwd=cwd,
    )  # fmt: skip


async def test_a_message_taken_by_a_killed_bot_is_answered_once_after_restart_though_telegram_sends_it_again(
    tmp_path: Path,
) -> None:
    async with FakeTelegram() as telegram:
        async with FakeOpenAI(hang=True) as hanging:
            proc = await _attune_run(_run_config(tmp_path, telegram, hanging), tmp_path, telegram.token)
            message = await telegram.push_text(ANN, ANN, "what is a good first book on birds?")
            await asyncio.wait_for(hanging.received.wait(), timeout=120)  # stored, the reply under way
            proc.send_signal(signal.SIGKILL)
            assert await proc.wait() == -signal.SIGKILL
        assert telegram.sent() == []
        assert query(tmp_path, "SELECT role FROM messages") == [("user",)]
        async with FakeOpenAI(reply="Try a field guide to your region.") as server:
            proc = await _attune_run(_run_config(tmp_path, telegram, server), tmp_path, telegram.token)
            try:
                await telegram.push({"message": message})  # Telegram delivers the same update again
                sent = await telegram.wait_sent(1, timeout=120)
                async with asyncio.timeout(60):  # the repeated update is polled and handled too
                    while telegram.updates:
                        await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)
            finally:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), timeout=60)
    assert [(s["chat_id"], s["text"]) for s in telegram.sent()] == [(str(ANN), "Try a field guide to your region.")]
    assert sent == telegram.sent()
    assert len(server.requests) == 1  # answered once, not once per delivery
    rows = query(tmp_path, "SELECT id, role, reply_to, awaiting_reply FROM messages ORDER BY id")
    assert [(r[1], r[2], r[3]) for r in rows] == [("user", None, None), ("assistant", rows[0][0], None)]
    assert integrity(tmp_path) == "ok"


def _message(text: str, n: int) -> Message:
    return Message(platform="web", chat_id="c1", sender_id="ann", sender_name="Ann", text=text, event_id=f"e{n}",
                   message_id=f"m{n}")  # fmt: skip


async def test_each_message_a_stopped_process_left_is_answered_or_told_and_never_twice(
    make_config: Callable[..., Config],
) -> None:
    config = make_config("[run]\nanswer_missed_within_s = 600\n")
    before = await open_agent(config, llm=RecordingBackend(fail=True))
    told = await before.handle_message(_message("the model fails on this one", 1))
    assert told is not None and told.text == APOLOGY and told.deferred  # told at once: answered later
    user = await before.store.resolve_user("web", "ann", "Ann")
    chat = await before.store.resolve_chat("web", "c1")
    now = time.time()
    for n, (text, age) in enumerate([("from two hours ago", 7200.0), ("remember that I like tea", 60.0)], start=2):
        stored = await before.store.receive_message(user, chat, text, platform_message_id=f"m{n}", event_id=f"e{n}",
                                                    at=now - age, owner=before.boot)  # fmt: skip
        assert stored is not None  # taken by `before`, which then stops without answering
    await before.close()

    backend = RecordingBackend()
    after = await open_agent(config, llm=backend)
    await backend.start()
    try:
        assert await after.handle_message(_message("remember that I like tea", 3)) is None  # the platform sent it again
        missed = await after.unanswered("web")
        assert [m.text for m in missed] == ["the model fails on this one", "from two hours ago",
                                            "remember that I like tea"]  # fmt: skip
        assert [m.told for m in missed] == [True, False, False]
        assert await after.unanswered("web") == []  # claimed: a second look finds nothing
        deferred, old, recent = [await after.answer_unanswered(m) for m in missed]
        assert deferred is not None and deferred.reply_id is not None and deferred.late and deferred.in_reply_to == "m1"
        assert deferred.text == "echo: the model fails on this one"
        assert old is not None and old.text == MISSED and old.kind == "notice" and old.in_reply_to == "m2"
        assert recent is not None and recent.reply_id is not None and recent.in_reply_to == "m3"
        assert recent.text == "Noted: you like tea."  # memory answers it: no model needed
        assert len(backend.requests) == 1
        assert [n.text for n in await after.store.list_memories(user)] == ["They like tea."]
    finally:
        await after.close()
    again = await open_agent(config, llm=RecordingBackend())
    try:
        assert await again.unanswered("web") == []
        stats = await again.store.stats(user)
        assert (stats["messages"], stats["replies"]) == (3, 2)
    finally:
        await again.close()
