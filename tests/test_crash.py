"""Kill the bot with SIGKILL while it generates a reply: nothing received is lost."""

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


def _check_after_crash(tmp_path: Path, config: Path) -> None:
    assert integrity(tmp_path) == "ok"
    # Received and kept; no half-written reply.
    assert query(tmp_path, "SELECT role, text FROM messages") == [("user", MESSAGE)]
    # Start again: the bot opens the same database and knows the message.
    again = subprocess.run(
        [ATTUNE, "--config", str(config), "chat", "--user", "alice"], input="/stats\n",
        capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "Messages: 1 from you, 0 replies from me." in again.stdout
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
    _check_after_crash(tmp_path, config)
