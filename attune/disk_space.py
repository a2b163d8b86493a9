"""Free disk space under the data: ``attune run`` warns at start and every hour when a
disk it writes to has less than ``[storage] min_free_mb`` free, before a full disk
refuses messages (they get the clear "couldn't save" reply then, and nothing stored is
damaged, but an operator would rather hear of it first)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

from agent_core.config import Settings
from agent_core.llm import model_cache_dir

log = logging.getLogger(__name__)

CHECK_EVERY_S = 3600.0


def watched_paths(settings: Settings) -> list[Path]:
    """Where attune writes: the data directory (the SQLite database, the adapters, the
    training's files) and the model cache, one path per disk."""
    storage = settings.storage
    candidates = [storage.data_path, storage.adapters_path, model_cache_dir(settings)]
    seen: set[int] = set()
    paths = []
    for path in candidates:
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is None:
            continue
        device = os.stat(existing).st_dev
        if device not in seen:
            seen.add(device)
            paths.append(existing)
    return paths


def low_on_space(settings: Settings) -> list[tuple[Path, float]]:
    """(path, MB free) of each watched disk with less than ``min_free_mb`` free."""
    limit = settings.storage.min_free_mb
    low = []
    for path in watched_paths(settings):
        free_mb = shutil.disk_usage(path).free / 2**20
        if free_mb < limit:
            low.append((path, free_mb))
    return low


def warn_if_low(settings: Settings) -> list[tuple[Path, float]]:
    low = low_on_space(settings)
    for path, free_mb in low:
        log.warning("only %.0f MB free on the disk of %s (below [storage] min_free_mb = %d): free some space, "
                    "or messages are refused once it is full", free_mb, path, settings.storage.min_free_mb)  # fmt: skip
    return low


async def watch_free_space(settings: Settings, every_s: float = CHECK_EVERY_S) -> None:
    """Warn now and every ``every_s`` seconds while it runs (cancel it to stop)."""
    while True:
        try:
            warn_if_low(settings)
        except OSError as exc:
            log.warning("could not read the free disk space (%s)", exc)
        await asyncio.sleep(every_s)
