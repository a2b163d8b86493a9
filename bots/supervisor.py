"""Running connectors side by side: each started (and retried) on its own, stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from agent_core.config import RunSettings
from bots.base import Connector

log = logging.getLogger(__name__)


async def _start_with_retries(
    connector: Connector, settings: RunSettings, started: list[Connector], keepers: list[asyncio.Task[None]]
) -> None:
    """Start ``connector``; if it cannot connect, log it and try again with a growing delay.
    Once started, it answers deferred messages for as long as it runs (``keepers``)."""
    delay = settings.retry_initial_s
    while True:
        try:
            await connector.start()
        except Exception as exc:
            log.error("%s could not start (%s: %s); retrying in %.0f s", connector.platform, type(exc).__name__,
                      exc, delay)  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.retry_max_s)
            continue
        started.append(connector)
        log.info("%s connector started", connector.platform)
        keepers.append(asyncio.create_task(connector.answer_deferred()))
        try:  # what a stopped process left: answered before this task ends
            await connector.answer_unanswered()
        except Exception:
            log.exception("%s: could not look for messages left unanswered", connector.platform)
        return


async def _all_finished(connectors: list[Connector]) -> None:
    for connector in connectors:
        await connector.finished.wait()


async def run_connectors(connectors: list[Connector], settings: RunSettings, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set or every connector has finished by itself; then stop them all.

    One platform failing to connect never holds up or takes down the others."""
    started: list[Connector] = []
    keepers: list[asyncio.Task[None]] = []
    starters = [asyncio.create_task(_start_with_retries(a, settings, started, keepers)) for a in connectors]
    all_finished = asyncio.create_task(_all_finished(connectors))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([all_finished, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not stopped.done():  # they ended by themselves: let the answers to messages left unanswered finish
            await asyncio.wait([asyncio.gather(*starters), stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in [*starters, *keepers, all_finished, stopped]:
            task.cancel()
        for connector in reversed(started):
            try:
                await connector.stop()
            except Exception:
                log.exception("%s did not stop cleanly", connector.platform)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*starters, *keepers, all_finished, stopped, return_exceptions=True)
