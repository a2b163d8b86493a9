"""The nightly schedule: APScheduler with its job stored in the bot's SQLite database."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent_core.agent import Agent
from agent_core.config import Config
from agent_core.testing import RecordingBackend
from agent_core.training.job import Plan, TrainingJob
from scheduler import JOB_ID, NightlyScheduler


class CountingJob(TrainingJob):
    """The real job with the training itself counted instead of run (this test is about when)."""

    def __init__(self, agent: Agent) -> None:
        super().__init__(agent.store, agent.settings, model_dir=lambda: Path("unused"))
        self.calls = 0

    async def run(self, users: list[int] | None = None, **kwargs: Any) -> Plan:
        self.calls += 1
        return Plan([], [])


async def open_agent(config: Config) -> Agent:
    return await Agent.open(config, llm=RecordingBackend())


def scheduler_for(job: TrainingJob, config: Config) -> NightlyScheduler:
    return NightlyScheduler(job, config.settings.training, config.settings.storage.database_path)


async def test_a_missed_night_runs_once_at_the_next_start(make_config: Callable[..., Config]) -> None:
    config = make_config('[training]\ncron = "0 3 * * *"\ntimezone = "UTC"\n')
    agent = await open_agent(config)
    try:
        job = CountingJob(agent)
        first = scheduler_for(job, config)
        first.start()
        upcoming = first.next_run_time()
        assert upcoming is not None and (upcoming.hour, upcoming.minute) == (3, 0) and str(upcoming.tzinfo) == "UTC"
        # The bot goes down; three nights pass (the stored run time is now in the past).
        three_nights_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
        first.scheduler.pause()  # down: nothing fires while the clock is moved back
        first.scheduler.modify_job(JOB_ID, next_run_time=three_nights_ago)
        await first.stop()
        await asyncio.sleep(0.2)
        assert job.calls == 0

        second = scheduler_for(job, config)
        second.start()  # the next start: the stored job is due
        for _ in range(100):
            if job.calls:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert job.calls == 1  # once, however many nights were missed
        assert second.next_run_time() > dt.datetime.now(dt.UTC)
        await second.stop()

        third = scheduler_for(job, config)
        third.start()  # nothing due now: nothing runs
        await asyncio.sleep(0.5)
        assert job.calls == 1
        await third.stop()
    finally:
        await agent.close()


async def test_a_changed_schedule_replaces_the_stored_one(make_config: Callable[..., Config]) -> None:
    config = make_config('[training]\ncron = "0 3 * * *"\ntimezone = "UTC"\n')
    agent = await open_agent(config)
    try:
        job = CountingJob(agent)
        first = scheduler_for(job, config)
        first.start()
        await first.stop()
        later = make_config('[training]\ncron = "30 4 * * mon"\ntimezone = "UTC"\n')
        second = scheduler_for(job, later)
        second.start()
        job_now = second.scheduler.get_job(JOB_ID)
        trigger = str(job_now.trigger) if job_now else ""
        assert "hour='4'" in trigger and "day_of_week='mon'" in trigger
        await second.stop()
        assert job.calls == 0
    finally:
        await agent.close()


@pytest.mark.parametrize(
    ("line", "key"),
    [('cron = "61 3 * * *"', "training.cron"), ('timezone = "Mars/Base"', "training.timezone"),
     ('redact_patterns = ["(unclosed"]', "training.redact_patterns")],
)  # fmt: skip
def test_bad_schedule_settings_name_the_key(make_config: Callable[..., Config], line: str, key: str) -> None:
    from agent_core.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_config(f"[training]\n{line}\n")
