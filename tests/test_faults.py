"""Faults of the world: the database server restarts or goes away for a while, the disk
fills, the model server goes away. The bot keeps running, refuses clearly meanwhile,
loses nothing, and comes back by itself; what was saved gets answered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from agent_core.agent import APOLOGY, NOT_SAVED, Agent
from agent_core.config import Config, Settings
from agent_core.events import Message, Reply
from agent_core.testing import RecordingBackend
from agent_core.training.job import TrainingJob
from attune.disk_space import low_on_space, warn_if_low
from attune.wiring import load_config, open_agent
from bots.supervisor import run_connectors
from bots.telegram import TelegramConnector
from bots.web import WebConnector
from storage.database import Unavailable
from storage.local_postgres import LocalPostgres
from storage.postgres import _RUN_LOCK
from tests.conftest import write_config
from tests.fakes.openai import FakeOpenAI
from tests.fakes.telegram import FakeTelegram, parsed
from tests.fuzzing import NO_LIMITS

ROOT = Path(__file__).resolve().parent.parent


def _message(user: str, n: int) -> Message:
    return Message(platform="web", chat_id=f"c-{user}", sender_id=user, text=f"{user} says {n}", event_id=f"{user}:{n}",
                   message_id=f"{user}:{n}")  # fmt: skip


async def _talk(agent: Agent, users: list[str], until: asyncio.Event, log: list[tuple[float, str, Reply]]) -> None:
    """Each user sends a message every 50 ms until ``until`` is set; every reply is kept."""

    async def one(user: str) -> None:
        n = 0
        while not until.is_set():
            n += 1
            msg = _message(user, n)
            reply = await agent.handle_message(msg)
            assert reply is not None
            log.append((time.monotonic(), msg.text, reply))
            await asyncio.sleep(0.05)

    await asyncio.gather(*(one(u) for u in users))


def _on(directory: Path, url: str) -> Config:
    path = directory / "attune.toml"
    path.write_text(f'[storage]\ndata_dir = "{directory / "data"}"\nurl = "{url}"\n' + NO_LIMITS, encoding="utf-8")
    return load_config(path, environ={})


@contextlib.asynccontextmanager
async def _on_own_server(directory: Path) -> AsyncIterator[tuple[LocalPostgres, str, Agent]]:
    """An agent on a PostgreSQL server of the test's own, which the test restarts."""
    with LocalPostgres() as server:
        url = server.create_database("faults")
        agent = await open_agent(_on(directory, url), llm=RecordingBackend())
        await agent.llm.start()
        try:
            yield server, url, agent
        finally:
            await agent.close()


def _outage_lines(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    went = sum("went away" in r.getMessage() for r in caplog.records if r.name == "storage.postgres")
    back = sum("is back after" in r.getMessage() for r in caplog.records if r.name == "storage.postgres")
    return went, back


@pytest.mark.postgres_only
async def test_postgres_restarts_and_outages_under_four_users_need_no_restart_of_the_bot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with _on_own_server(tmp_path) as (server, _url, agent):
        users = ["ann", "bob", "cem", "dee"]
        replies: list[tuple[float, str, Reply]] = []
        stop = asyncio.Event()
        talking = asyncio.create_task(_talk(agent, users, stop, replies))
        await asyncio.sleep(1.0)
        server.restart()  # pg_ctl restart -m fast: every connection is cut
        restarted = time.monotonic()
        await asyncio.sleep(2.0)
        server.halt()  # down for 3 s
        halted = time.monotonic()
        await asyncio.sleep(3.0)
        health_down = await agent.health()
        server.resume()
        resumed = time.monotonic()
        await asyncio.sleep(4.0)
        stop.set()
        await talking
        health_up = await agent.health()

        answered = [(t, text, r) for t, text, r in replies if r.kind == "answer"]
        refused = [(t, text, r) for t, text, r in replies if r.kind != "answer"]
        assert {r.text for _, _, r in refused} <= {NOT_SAVED}  # the clear reply, nothing else
        late = [round(t - resumed, 2) for t, _, _ in refused if t > resumed]
        early = [round(t - restarted, 2) for t, _, _ in refused if t < halted]
        assert not early and all(t < 2.5 for t in late), (early, late)  # refused only while it was down
        first_back = min(t for t, _, _ in answered if t > resumed)
        assert first_back - resumed < 5.0  # answered again within seconds, with no restart of the bot
        assert any(restarted < t < halted for t, _, _ in answered)  # the restart alone: answered right after
        # Every answered message is stored with that answer; none is stored twice.
        rows = await agent.store.db.fetchall(
            "SELECT m.text, r.text FROM messages m JOIN messages r ON r.reply_to = m.id WHERE m.role = 'user'"
        )
        stored = {str(a): str(b) for a, b in rows}
        assert all(stored.get(text) == r.text for _, text, r in answered)
        counts = await agent.store.db.fetchall("SELECT text, COUNT(*) FROM messages WHERE role = 'user' GROUP BY text")
        assert all(int(c) == 1 for _, c in counts)
        assert not {text for _, text, _ in refused} & set(stored)  # what was refused was not kept half-answered
        assert health_down["ok"] is False and health_down["database"]["ok"] is False
        assert health_up["ok"] is True
        went, back = _outage_lines(caplog)
        assert 1 <= went <= 2 and back == went  # once when it went, once when back: not once per message


@pytest.mark.postgres_only
async def test_after_a_restart_the_bot_takes_the_run_lock_again_before_writing(tmp_path: Path) -> None:
    async with _on_own_server(tmp_path) as (server, url, agent):
        assert (await agent.handle_message(_message("ann", 1))).kind == "answer"
        server.restart()
        with psycopg.connect(url, autocommit=True) as rotate:  # `attune keys rotate` gets in first
            assert rotate.execute("SELECT pg_try_advisory_lock(%s)", (_RUN_LOCK,)).fetchone() == (True,)
            for n in (2, 3):
                refused = await agent.handle_message(_message("ann", n))
                assert refused is not None and refused.text == NOT_SAVED
                await asyncio.sleep(2.1)  # past the reconnection back-off
            assert [r[0] for r in rotate.execute("SELECT text FROM messages ORDER BY id")] == [
                "ann says 1",
                "echo: ann says 1",
            ]
        await asyncio.sleep(2.1)
        again = await agent.handle_message(_message("ann", 4))
        assert again is not None and again.kind == "answer"


@pytest.mark.postgres_only
async def test_the_training_lock_survives_an_outage_shorter_than_its_time_to_live(tmp_path: Path) -> None:
    async with _on_own_server(tmp_path) as (server, _url, agent):
        records = agent.store.training
        assert await records.acquire_lock("first:1", ttl_s=30)
        server.halt()
        await asyncio.sleep(1.0)
        server.resume()
        await asyncio.sleep(2.1)
        assert not await records.acquire_lock("second:2", ttl_s=30)
        assert await records.renew_lock("first:1", ttl_s=30)  # the holder renews as soon as it is back
        # just expired: not yet to be taken (its holder may be renewing after an outage)
        await agent.store.db.execute("UPDATE training_lock SET expires_at = ?", (time.time() - 1,))
        assert not await records.acquire_lock("second:2", ttl_s=30)
        await agent.store.db.execute("UPDATE training_lock SET expires_at = ?", (time.time() - 13,))
        assert await records.acquire_lock("second:2", ttl_s=30)  # its holder is gone
        assert not await records.renew_lock("first:1", ttl_s=30)  # and would know it lost it


def _late_config(make_config: Callable[..., Config], telegram: FakeTelegram, llm: FakeOpenAI) -> Config:
    return make_config(
        f'[llm]\nbackend = "openai"\n[llm.openai]\nbase_url = "{llm.base_url}"\nmax_retries = 0\n'
        f'[telegram]\nbase_url = "{telegram.base_url}"\npoll_timeout_s = 1\n'
        "[web]\nport = 0\n[training]\nenabled = false\n",
        environ={"TELEGRAM_BOT_TOKEN": telegram.token},
    )


async def test_a_message_saved_while_the_model_server_was_down_is_answered_when_it_is_back(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FakeTelegram() as telegram, FakeOpenAI(reply="Back and answering.") as llm:
        port = llm.port
        config = _late_config(make_config, telegram, llm)
        agent = await open_agent(config)
        await agent.llm.start()
        web_chat = WebConnector(agent, config)
        stop = asyncio.Event()
        running = asyncio.create_task(run_connectors([web_chat, TelegramConnector(agent, config)], config.settings.run,
                                                     stop))  # fmt: skip
        try:
            async with asyncio.timeout(30):
                while web_chat.port == 0 or not telegram.calls:
                    await asyncio.sleep(0.05)
            base = f"http://127.0.0.1:{web_chat.port}"
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                csrf = (await (await http.get(f"{base}/api/session")).json())["csrf"]
                assert (await http.get(f"{base}/healthz")).status == 200
                await llm.__aexit__(None, None, None)  # the model server goes away
                health = await http.get(f"{base}/healthz")
                body = await health.json()
                assert health.status == 503 and body["model"]["ok"] is False and body["database"]["ok"] is True

                asked = await telegram.push_text(111, 111, "what is a good first book on birds?")
                told = (await telegram.wait_sent(1))[0]
                assert told["text"] == APOLOGY
                answer = await http.post(f"{base}/api/messages", json={"text": "and on trees?"},
                                         headers={"X-CSRF-Token": csrf})  # fmt: skip
                reply = (await answer.json())["reply"]
                assert answer.status == 200 and reply["text"] == APOLOGY and reply["deferred"] is True

                async with FakeOpenAI(reply="Back and answering.", port=port) as back:  # the same server returns
                    late = (await telegram.wait_sent(2, timeout=60))[1]
                    assert late["text"] == "Back and answering."
                    quoted = parsed(late.get("reply_parameters"))
                    assert quoted and int(quoted["message_id"]) == asked["message_id"]  # a reply to that message
                    async with asyncio.timeout(60):  # the web chat's history has it: the page polls it
                        while True:
                            history = (await (await http.get(f"{base}/api/history")).json())["messages"]
                            if [m["text"] for m in history if m["role"] == "assistant" and m["id"]]:
                                break
                            await asyncio.sleep(0.2)
                    assert [(m["role"], m["text"]) for m in history] == [
                        ("user", "and on trees?"),
                        ("assistant", "Back and answering."),
                    ]
                    assert len(back.requests) == 2  # one each, answered once
                    assert (await http.get(f"{base}/healthz")).status == 200
            rows = await agent.store.db.fetchall("SELECT role, awaiting_reply FROM messages ORDER BY id")
            assert all(r[1] is None for r in rows) and sorted(r[0] for r in rows) == ["assistant"] * 2 + ["user"] * 2

            async def away(*args: object, **kwargs: object) -> None:
                raise Unavailable("the database went away")

            monkeypatch.setattr(agent.store, "receive_message", away)  # Telegram cannot wait for the database
            await telegram.push_text(111, 111, "still there?")
            assert (await telegram.wait_sent(3))[2]["text"] == NOT_SAVED  # told in the chat, not dropped
        finally:
            stop.set()
            await running
            await agent.close()


@pytest.mark.sqlite_only
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="mounting a tmpfs needs root (CI runs as root)")  # fmt: skip
def test_a_full_disk_under_sqlite_gets_the_clear_reply_never_a_500_and_recovers(tmp_path: Path) -> None:
    """The data directory is a 16 MB tmpfs, in a mount namespace of the scenario's own
    (tests/scenario_disk_full_web.py): the web chat answers, the disk fills, five
    messages are refused, the space comes back, the chat answers again."""
    data = tmp_path / "data"
    data.mkdir()
    config = write_config(tmp_path, "")
    script = (
        f'mount -t tmpfs -o size=16m tmpfs "{data}" && '
        f'exec "{sys.executable}" -m tests.scenario_disk_full_web "{config}" "{data}"'
    )
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before"] == [200, "answer"]
    assert result["while_full"] == [[200, NOT_SAVED]] * 5  # the clear reply, never a 500
    assert result["refusal_lines"] == 5 and result["tracebacks"] == 0  # one line per refusal
    assert result["after"] == [200, "answer"]
    assert result["integrity"] == "ok"
    assert result["stored"] == [
        ["user", "before the disk filled"],
        ["assistant", "echo: before the disk filled"],
        ["user", "after space came back"],
        ["assistant", "echo: after space came back"],
    ]


async def test_a_disk_that_fills_between_storing_a_reply_and_its_platform_id_gives_the_reply_not_a_500(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under load the disk fills at any write: here at the last one of a message, after
    the reply was stored. The person still gets the reply (and the log a short line)."""
    config = make_config("[web]\nport = 0\n")
    agent = await open_agent(config, llm=RecordingBackend())
    await agent.llm.start()
    web = WebConnector(agent, config)
    await web.start()

    async def full(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(agent.store, "set_platform_message_id", full)
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            base = f"http://127.0.0.1:{web.port}"
            csrf = (await (await http.get(f"{base}/api/session")).json())["csrf"]
            for stream in (False, True):
                answer = await http.post(f"{base}/api/messages", json={"text": "hello", "stream": stream},
                                         headers={"X-CSRF-Token": csrf})  # fmt: skip
                assert answer.status == 200
                last = (await answer.text()).strip().splitlines()[-1]
                reply = json.loads(last)["reply"]
                assert reply["kind"] == "answer" and reply["text"] == "echo: hello"
    finally:
        await web.stop()
        await agent.close()
    assert not [r for r in caplog.records if r.exc_info]
    assert sum("could not record the platform id" in r.getMessage() for r in caplog.records) == 2


def test_attune_run_warns_when_the_data_disk_runs_low(make_config: Callable[..., Config],
                                                     caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    config = make_config("")
    assert config.settings.storage.min_free_mb == 200  # the default

    def with_limit(mb: int) -> Settings:
        storage = config.settings.storage.model_copy(update={"min_free_mb": mb})
        return config.settings.model_copy(update={"storage": storage})

    assert low_on_space(with_limit(0)) == []
    with caplog.at_level(logging.WARNING):
        low = warn_if_low(with_limit(100_000_000))  # 100 TB: no disk here has that
    assert low and all(free < 100_000_000 for _, free in low)
    assert any("below [storage] min_free_mb = 100000000" in r.getMessage() for r in caplog.records)


async def test_the_training_records_wait_out_an_outage_unless_a_write_may_have_committed(
    make_config: Callable[..., Config],
) -> None:
    calls: list[str] = []

    class Flaky:
        async def finish_run(self, run_id: int, status: str) -> None:
            calls.append(status)
            if len(calls) < 3:
                raise Unavailable("the database went away")

        async def add_adapter(self, *args: object) -> None:
            calls.append("add")
            raise Unavailable("lost at its commit", maybe_committed=True)

    job = TrainingJob(Flaky(), make_config("").settings, model_dir=lambda: Path("."))  # type: ignore[arg-type]
    await job.records.finish_run(1, "ok")
    assert calls == ["ok", "ok", "ok"]  # tried again each second until the database was back
    with pytest.raises(Unavailable):
        await job.records.add_adapter(1)
    assert calls[3:] == ["add"]  # it may be stored already: not repeated
