"""The bot's schedule: nightly training and daily message retention, through APScheduler's
cron triggers and a persistent job store.

The job lives in the bot's own database (table ``scheduler_jobs``, through APScheduler's
SQLAlchemy job store), with its next run time. When the bot was down at the scheduled
time, the stored run time has passed by the next start, and APScheduler runs the job
then, once however many nights were missed (``coalesce``, no grace limit). Two bot
processes may both fire it: the training lock in the database lets one train.

With ``[storage] retention_days`` above 0 a second stored job deletes, every day at
04:30 (the training time zone), the messages older than that; it is removed again
when retention is turned off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from agent_core.config import TrainingSettings
from agent_core.training.job import TrainingBusy, TrainingJob

log = logging.getLogger(__name__)

JOB_ID = "nightly-training"
RETENTION_ID = "retention"
_running: NightlyScheduler | None = None  # the stored job refers to this module's function, which finds it here


async def nightly_training() -> None:
    """The stored job: train everyone who qualifies (see :class:`TrainingJob`)."""
    if _running is None:
        log.warning("nightly training fired with no scheduler running; skipped")
        return
    await _running.run_now()


async def message_retention() -> None:
    """The stored job: delete messages older than ``[storage] retention_days``."""
    if _running is None:
        log.warning("message retention fired with no scheduler running; skipped")
        return
    await _running.prune_now()


def trigger_for(settings: TrainingSettings) -> CronTrigger:
    return CronTrigger.from_crontab(settings.cron, timezone=settings.timezone or None)


class NightlyScheduler:
    def __init__(
        self,
        job: TrainingJob,
        settings: TrainingSettings,
        database_url: str,
        prune: Callable[[float], Awaitable[int]] | None = None,
    ) -> None:
        """``prune`` deletes the messages from before a time (``Store.delete_messages_before``);
        without it, ``[storage] retention_days`` is not applied here."""
        self.job = job
        self.prune = prune
        self.settings = settings
        self.runs = 0  # nightly runs started by this scheduler
        self._task: asyncio.Task[Any] | None = None  # the run under way, if any
        # PostgreSQL: a connection the server dropped (a restart) is noticed and replaced before use.
        options = {"connect_args": {"timeout": 30}} if database_url.startswith("sqlite") else {"pool_pre_ping": True}
        store = SQLAlchemyJobStore(url=database_url, tablename="scheduler_jobs", engine_options=options)
        self.scheduler = AsyncIOScheduler(
            jobstores={"default": store},
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
            timezone=settings.timezone or None,
        )

    def start(self) -> None:
        global _running
        _running = self
        trigger = trigger_for(self.settings)
        self.scheduler.start(paused=True)  # load the stored job before anything fires
        job = self.scheduler.get_job(JOB_ID)
        if job is None:
            self.scheduler.add_job(nightly_training, trigger, id=JOB_ID, name="nightly training")
        elif str(job.trigger) != str(trigger):
            job.modify(trigger=trigger)  # a new schedule; a run already due still runs now
        self._schedule_retention()
        self.scheduler.resume()
        log.info("nightly training scheduled (%s); next run %s", self.settings.cron, self.next_run_time())

    def _schedule_retention(self) -> None:
        days = self.job.settings.storage.retention_days
        stored = self.scheduler.get_job(RETENTION_ID)
        if days and stored is None:
            trigger = CronTrigger(hour=4, minute=30, timezone=self.settings.timezone or None)
            self.scheduler.add_job(message_retention, trigger, id=RETENTION_ID, name="message retention")
            log.info("messages older than %d days are deleted daily at 04:30", days)
        elif not days and stored is not None:
            stored.remove()

    async def prune_now(self) -> int:
        """Delete the messages older than ``retention_days`` now; how many."""
        days = self.job.settings.storage.retention_days
        if not days or self.prune is None:
            return 0
        try:
            deleted = await self.prune(time.time() - days * 86400)
        except Exception:
            log.exception("message retention failed; it runs again tomorrow")
            return 0
        log.info("message retention: deleted %d messages older than %d days", deleted, days)
        return deleted

    def next_run_time(self) -> Any:
        job = self.scheduler.get_job(JOB_ID)
        return job.next_run_time if job else None

    async def run_now(self) -> None:
        self.runs += 1
        self._task = asyncio.current_task()
        try:
            plan = await self.job.run()
        except TrainingBusy as exc:
            log.info("nightly training skipped: %s", exc)
            return
        except Exception:
            log.exception("nightly training failed")
            return
        done = ", ".join(f"{t.name} {t.status}" for t in plan.tasks) or "nothing to train"
        log.info("nightly training finished: %s", done)

    async def stop(self) -> None:
        """Stop scheduling; a training under way is cancelled and its records finished first."""
        global _running
        self.job.cancel()
        if self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._task), timeout=30)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if _running is self:
            _running = None
