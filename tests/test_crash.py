"""Kill the bot with SIGKILL while it generates a reply: nothing received is lost, and the
message is answered once when the bot comes back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

from tests.conftest import ATTUNE, integrity, query, tiny_config_text, write_config
from tests.fakes.openai import FakeOpenAI

MESSAGE = "please keep this message safe"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ATTUNE_")}


async def _start_chat(config: Path, cwd: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        ATTUNE, "--config", str(config), "chat", "--user", "alice",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env=_env(), cwd=cwd,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(f"{MESSAGE}\n".encode())
    await proc.stdin.drain()
    return proc


def _chat(config: Path, cwd: Path, text: str) -> str:
    again = subprocess.run(
        [ATTUNE, "--config", str(config), "chat", "--user", "alice"], input=text,
        capture_output=True, text=True, timeout=300, env=_env(), cwd=cwd,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    return again.stdout


def _check_after_crash(tmp_path: Path, config: Path) -> None:
    assert integrity(tmp_path) == "ok"
    # Received and kept; no half-written reply.
    assert query(tmp_path, "SELECT role, text FROM messages") == [("user", MESSAGE)]
    # Start again: the bot opens the same database and knows the message; the model
    # server is gone, so the person is told it will be answered later (it is kept for that).
    out = _chat(config, tmp_path, "/stats\n")
    assert "Messages: 1 from you, 0 replies from me." in out
    assert "couldn't come up with an answer just now. Your message is saved: I'll answer as soon as I can." in out
    assert query(tmp_path, "SELECT awaiting_reply FROM messages") == [("deferred",)]
    assert integrity(tmp_path) == "ok"


async def test_sigkill_while_waiting_for_the_model_server(tmp_path: Path) -> None:
    async with FakeOpenAI(hang=True) as server:
        config = write_config(
            tmp_path, f'[llm]\nbackend = "openai"\n[llm.openai]\nbase_url = "{server.base_url}"\nmax_retries = 0\n'
        )
        proc = await _start_chat(config, tmp_path)
        await asyncio.wait_for(server.received.wait(), timeout=120)  # the reply is being generated
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
    assert server.requests[0]["messages"][-1]["content"] == MESSAGE
    _check_after_crash(tmp_path, config)


async def test_sigkill_while_the_local_model_streams_a_reply(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_config_text(tiny_model_dir, max_new_tokens=500))
    proc = await _start_chat(config, tmp_path)
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.read(len("attune> ") + 1), timeout=120)
    assert first.startswith(b"attune> ")  # tokens are coming out: generation is under way
    proc.send_signal(signal.SIGKILL)
    assert await proc.wait() == -signal.SIGKILL
    assert integrity(tmp_path) == "ok"
    assert query(tmp_path, "SELECT role, text FROM messages") == [("user", MESSAGE)]
    # Start again: the message the killed process had taken is answered, once.
    out = _chat(config, tmp_path, "")
    rows = query(tmp_path, "SELECT id, role, reply_to, awaiting_reply FROM messages ORDER BY id")
    assert [(r[1], r[2], r[3]) for r in rows] == [("user", None, None), ("assistant", rows[0][0], None)]
    (reply,) = query(tmp_path, "SELECT text FROM messages WHERE role = 'assistant'")
    assert f"attune> {reply[0]}" in out
    out = _chat(config, tmp_path, "/stats\n")  # and not again at the next start
    assert "Messages: 1 from you, 1 replies from me." in out
    assert integrity(tmp_path) == "ok"
