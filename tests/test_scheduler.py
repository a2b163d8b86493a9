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
from attune import wiring
from scheduler import JOB_ID, NightlyScheduler


class CountingJob(TrainingJob):
    """The real job with the training itself counted instead of run (this test is about when)."""

    def __init__(self, agent: Agent, config: Config | None = None) -> None:
        settings = config.settings if config else agent.settings
        super().__init__(agent.store.training, settings, model_dir=lambda: Path("unused"))
        self.agent = agent
        self.calls = 0

    async def run(self, users: list[int] | None = None, **kwargs: Any) -> Plan:
        self.calls += 1
        return Plan([], [])


async def open_agent(config: Config) -> Agent:
    return await wiring.open_agent(config, llm=RecordingBackend())


def scheduler_for(job: CountingJob, config: Config) -> NightlyScheduler:
    return NightlyScheduler(job, config.settings.training, config.settings.storage.sqlalchemy_url,
                            prune=job.agent.store.delete_messages_before)  # fmt: skip


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


async def test_retention_deletes_old_messages_daily_and_keeps_what_was_learned(
    make_config: Callable[..., Config],
) -> None:
    from scheduler import RETENTION_ID
    from storage.training import TrainingRecords
    from tests.test_agent import msg, react, send

    config = make_config('[training]\ntimezone = "UTC"\n', environ={"ATTUNE_STORAGE__RETENTION_DAYS": "30"})
    agent = await open_agent(config)
    try:
        await send(agent, msg("an old message"), platform_id="old")
        await agent.handle_reaction(react("old", "👍"))
        await agent.store.db.execute("UPDATE messages SET created_at = created_at - 40 * 86400")
        await send(agent, msg("a recent one"), platform_id="new")
        ann = await agent.store.resolve_user("test", "ann")
        await TrainingRecords(agent.store.db).add_adapter(ann, 1, "/x/1", promote=True, parent="base", metrics={})
        learned = await agent.policy.beliefs(ann)

        nightly = scheduler_for(CountingJob(agent), config)
        nightly.start()
        stored = nightly.scheduler.get_job(RETENTION_ID)
        assert stored is not None and "hour='4'" in str(stored.trigger) and "minute='30'" in str(stored.trigger)
        assert await nightly.prune_now() == 2  # the old message and its reply
        await nightly.stop()

        texts = [r[0] for r in await agent.store.db.fetchall("SELECT text FROM messages WHERE role = 'user'")]
        assert texts == ["a recent one"]
        assert (await agent.store.db.fetchone("SELECT COUNT(*) FROM reactions"))[0] == 0  # went with its reply
        assert await TrainingRecords(agent.store.db).active(ann) is not None  # the adapter stays
        assert await agent.policy.beliefs(ann) == learned  # and what was learned
        audit = await agent.store.db.fetchone("SELECT action, subject FROM audit_log")
        assert tuple(audit) == ("retention", None)  # type: ignore[arg-type]

        off = make_config('[training]\ntimezone = "UTC"\n')
        again = scheduler_for(CountingJob(agent, off), off)
        again.start()
        assert again.scheduler.get_job(RETENTION_ID) is None  # turned off: the stored job is gone
        assert await again.prune_now() == 0
        await again.stop()
    finally:
        await agent.close()
