"""Running connectors side by side: a platform that cannot connect is retried, the others run on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from agent_core.agent import Agent
from agent_core.config import Config, RunSettings
from agent_core.events import Reply
from attune.wiring import load_config
from bots import DEFAULT_FRONT_END, configured_connectors
from bots.base import Connector, split_text
from bots.supervisor import run_connectors
from bots.telegram import TelegramConnector
from tests.conftest import write_config


class Flaky(Connector):
    """Fails to start ``failures`` times, then runs until stopped."""

    platform = "flaky"

    def __init__(self, agent: Agent, config: Config, failures: int) -> None:
        super().__init__(agent, config)
        self.failures = failures
        self.attempts = 0
        self.running = False

    @classmethod
    def configured(cls, config: Config) -> bool:
        return True

    async def start(self) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise ConnectionError(f"attempt {self.attempts} refused")
        self.running = True

    async def stop(self) -> None:
        self.running = False

    async def send(self, reply: Reply) -> str | None:
        return None


async def test_a_failing_platform_is_retried_while_the_others_run(
    agent: Agent, make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config()
    healthy, flaky = Flaky(agent, config, failures=0), Flaky(agent, config, failures=3)
    stop = asyncio.Event()
    runner = asyncio.create_task(run_connectors([healthy, flaky], RunSettings(retry_initial_s=0.01), stop))
    async with asyncio.timeout(10):
        while not flaky.running:
            await asyncio.sleep(0.01)
    assert healthy.running and flaky.attempts == 4
    assert sum("could not start" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR) == 3
    stop.set()
    await runner
    assert not healthy.running and not flaky.running  # both stopped at the end


async def test_running_ends_when_every_adapter_has_finished(agent: Agent, make_config: Callable[..., Config]) -> None:
    config = make_config()
    one, two = Flaky(agent, config, 0), Flaky(agent, config, 0)
    runner = asyncio.create_task(run_connectors([one, two], RunSettings(), asyncio.Event()))
    await asyncio.sleep(0.05)
    one.finished.set()
    await asyncio.sleep(0.05)
    assert not runner.done()  # the other one still runs
    two.finished.set()
    await asyncio.wait_for(runner, 5)


def test_run_starts_every_platform_with_a_token_and_the_front_end(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    assert configured_connectors(load_config(path, environ={})) == [DEFAULT_FRONT_END]
    with_token = load_config(path, environ={"TELEGRAM_BOT_TOKEN": "1:x"})
    assert configured_connectors(with_token) == [TelegramConnector, DEFAULT_FRONT_END]
    no_front = load_config(path, environ={"TELEGRAM_BOT_TOKEN": "1:x", "ATTUNE_RUN__DEFAULT_FRONT_END": "false"})
    assert configured_connectors(no_front) == [TelegramConnector]


@pytest.mark.parametrize("limit", [10, 50, 2000])
def test_split_text_keeps_every_word_and_the_limit(limit: int) -> None:
    text = " ".join(f"word{i}" for i in range(800)) + "\n\n" + "x" * 3000
    pieces = split_text(text, limit)
    assert all(len(p) <= limit for p in pieces)
    assert "".join(pieces).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")
    assert split_text("short", limit) == ["short"]
