"""Running adapters side by side: each started (and retried) on its own, stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from agent_core.config import RunSettings
from bots.base import Adapter

log = logging.getLogger(__name__)


async def _start_with_retries(adapter: Adapter, settings: RunSettings, started: list[Adapter]) -> None:
    """Start ``adapter``; if it cannot connect, log it and try again with a growing delay."""
    delay = settings.retry_initial_s
    while True:
        try:
            await adapter.start()
        except Exception as exc:
            log.error("%s could not start (%s: %s); retrying in %.0f s", adapter.platform, type(exc).__name__,
                      exc, delay)  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, settings.retry_max_s)
            continue
        started.append(adapter)
        log.info("%s adapter started", adapter.platform)
        try:  # what a stopped process left: answered before this task ends
            await adapter.answer_unanswered()
        except Exception:
            log.exception("%s: could not look for messages left unanswered", adapter.platform)
        return


async def _all_finished(adapters: list[Adapter]) -> None:
    for adapter in adapters:
        await adapter.finished.wait()


async def run_adapters(adapters: list[Adapter], settings: RunSettings, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set or every adapter has finished by itself; then stop them all.

    One platform failing to connect never holds up or takes down the others."""
    started: list[Adapter] = []
    starters = [asyncio.create_task(_start_with_retries(a, settings, started)) for a in adapters]
    all_finished = asyncio.create_task(_all_finished(adapters))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([all_finished, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not stopped.done():  # they ended by themselves: let the answers to messages left unanswered finish
            await asyncio.wait([asyncio.gather(*starters), stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in [*starters, all_finished, stopped]:
            task.cancel()
        for adapter in reversed(started):
            try:
                await adapter.stop()
            except Exception:
                log.exception("%s did not stop cleanly", adapter.platform)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*starters, all_finished, stopped, return_exceptions=True)
