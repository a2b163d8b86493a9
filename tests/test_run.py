"""`attune run` as a user starts it: every platform with a token, one failing without harm."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
from pathlib import Path

import aiohttp

from attune.wiring import setup_logging
from tests.conftest import ATTUNE, tiny_config_text, write_config
from tests.fakes.telegram import FakeTelegram


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: connections are refused


async def test_run_serves_telegram_while_slack_keeps_failing(tmp_path: Path, tiny_model_dir: Path) -> None:
    async with FakeTelegram() as telegram:
        config = write_config(
            tmp_path,
            tiny_config_text(tiny_model_dir)
            + f'[telegram]\nbase_url = "{telegram.base_url}"\npoll_timeout_s = 1\n'
            + f'[slack]\napi_url = "http://127.0.0.1:{_dead_port()}/api/"\n'
            + "[run]\ndefault_front_end = false\nretry_initial_s = 0.2\nretry_max_s = 0.5\n",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTUNE_", "SLACK_", "TELEGRAM_", "DISCORD_"))}
        env |= {"TELEGRAM_BOT_TOKEN": telegram.token, "SLACK_BOT_TOKEN": "xoxb-t", "SLACK_APP_TOKEN": "xapp-t"}
        proc = await asyncio.create_subprocess_exec(
            ATTUNE, "--config", str(config), "run", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
        )  # fmt: skip
        assert proc.stderr is not None
        lines: list[str] = []

        async def read_log() -> None:
            async for line in proc.stderr:  # type: ignore[union-attr]
                lines.append(line.decode())

        reader = asyncio.create_task(read_log())
        try:
            await telegram.push_text(111, 111, "hello from telegram")
            sent = await telegram.wait_sent(1, timeout=120)
            assert sent[0]["chat_id"] == "111" and sent[0]["text"]
            async with asyncio.timeout(60):  # Slack keeps being retried meanwhile
                while sum("slack could not start" in line for line in lines) < 2:
                    await asyncio.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), timeout=60)
            await reader
    log = "".join(lines)
    assert proc.returncode == 0, log
    assert "telegram connector started" in log
    assert "nightly training scheduled (0 3 * * *); next run" in log
    assert "123:TEST" not in log and "xoxb-t" not in log  # tokens never reach the log


async def test_run_with_no_platform_serves_the_web_chat(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_config_text(tiny_model_dir) + "[web]\nport = 0\n")
    text = config.read_text()  # and a free-space limit no disk here meets: it warns at start
    config.write_text(text.replace("[storage]\n", "[storage]\nmin_free_mb = 100000000\n", 1))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTUNE_", "SLACK_", "TELEGRAM_", "DISCORD_"))}
    proc = await asyncio.create_subprocess_exec(
        ATTUNE, "--config", str(config), "run", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.stderr is not None
    log = []
    try:
        url = None
        async with asyncio.timeout(120):
            while url is None:
                line = (await proc.stderr.readline()).decode()
                assert line, "attune run ended before serving"
                log.append(line)
                if found := re.search(r"web chat on (http://127\.0\.0\.1:\d+)", line):
                    url = found.group(1)
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            session = await (await http.get(f"{url}/api/session")).json()
            answer = await http.post(f"{url}/api/messages", json={"text": "hello"},
                                     headers={"X-CSRF-Token": session["csrf"]})  # fmt: skip
            reply = (await answer.json())["reply"]
            assert reply["kind"] == "answer" and reply["id"]
            health = await http.get(f"{url}/healthz")
            assert health.status == 200 and (await health.json())["ok"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        log.append((await asyncio.wait_for(proc.stderr.read(), timeout=60)).decode())
        await asyncio.wait_for(proc.wait(), timeout=60)
    assert proc.returncode == 0
    assert "below [storage] min_free_mb = 100000000" in "".join(log)


async def test_no_secret_reaches_the_log_or_config_show(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Every secret set, every platform failing against a closed port with DEBUG logging
    (the failures print URLs, requests and tracebacks): none of the secrets is printed."""
    secrets = {
        "TELEGRAM_BOT_TOKEN": "777:telegram-secret-token",
        "TELEGRAM_WEBHOOK_SECRET": "tg-webhook-secret-value",
        "DISCORD_BOT_TOKEN": "discord-secret-token-value",
        "SLACK_BOT_TOKEN": "xoxb-slack-secret-value",
        "SLACK_APP_TOKEN": "xapp-slack-secret-value",
        "SLACK_SIGNING_SECRET": "slack-signing-secret-value",
        "OPENAI_API_KEY": "sk-openai-secret-value",
        "ATTUNE_ADMIN_TOKEN": "admin-secret-token-value",
        "ATTUNE_ENCRYPTION_KEY": "c2VjcmV0LWVuY3J5cHRpb24ta2V5LTMyLWJ5dGVzISE=",  # a real key: start-up checks it
    }
    dead = f"http://127.0.0.1:{_dead_port()}"
    config = write_config(
        tmp_path,
        tiny_config_text(tiny_model_dir)
        + f'[telegram]\nbase_url = "{dead}/bot"\n[discord]\napi_base = "{dead}/api/v10"\n'
        + f'[slack]\napi_url = "{dead}/api/"\n[logging]\nlevel = "DEBUG"\n'
        + "[run]\ndefault_front_end = false\nretry_initial_s = 0.2\nretry_max_s = 0.5\n",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTUNE_", "SLACK_", "TELEGRAM_", "DISCORD_"))}
    env |= secrets
    show = await asyncio.create_subprocess_exec(
        ATTUNE, "--config", str(config), "config", "show", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=env, cwd=tmp_path,
    )  # fmt: skip
    shown = (await show.communicate())[0].decode()
    assert show.returncode == 0 and "telegram" in shown
    proc = await asyncio.create_subprocess_exec(
        ATTUNE, "--config", str(config), "run", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=tmp_path,
    )  # fmt: skip
    lines: list[str] = []

    async def read_log() -> None:
        async for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line.decode(errors="replace"))

    reader = asyncio.create_task(read_log())
    try:
        async with asyncio.timeout(120):  # each platform fails at least twice
            while not all(sum(f"{p} could not start" in line for line in lines) >= 2 for p in PLATFORMS):
                await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), timeout=60)
        await reader
    output = shown + "".join(lines)
    for name, value in secrets.items():
        assert value not in output, name
    assert "DEBUG" in output  # the log really was verbose


PLATFORMS = ("telegram", "discord", "slack")


def test_debug_logging_leaves_the_platform_libraries_at_info() -> None:
    """Their debug output holds whole updates, with what people wrote."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging("DEBUG")
        assert logging.getLogger("bots.telegram").isEnabledFor(logging.DEBUG)
        for name in ("telegram.ext.Application", "discord.gateway", "slack_bolt.AsyncApp"):
            assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
            assert logging.getLogger(name).isEnabledFor(logging.INFO), name
    finally:
        root.handlers[:], root.level = saved
        for name in ("telegram", "discord", "slack_bolt", "slack_sdk", "aiohttp"):
            logging.getLogger(name).setLevel(logging.NOTSET)
