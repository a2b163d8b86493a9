"""Several bot processes on one PostgreSQL database (the run's own server, 127.0.0.1).

Every other test runs on PostgreSQL too in `make test`'s PostgreSQL pass; these are
about what only a shared server allows: two processes at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent_core.config import Config
from attune.wiring import load_config
from tests.conftest import ATTUNE, ROOT, query, write_config
from tests.scenario_two_bots import events
from tests.test_training import history_agent, rate_history, training_text

pytestmark = pytest.mark.postgres_only

EVENTS = 120


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ATTUNE_")}


async def _two(*commands: list[str]) -> list[tuple[int, bytes, bytes]]:
    procs = [await asyncio.create_subprocess_exec(*c, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                  env=_env(), cwd=ROOT) for c in commands]  # fmt: skip
    outputs = [await asyncio.wait_for(p.communicate(), timeout=300) for p in procs]
    return [(p.returncode or 0, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]


async def test_two_bot_processes_never_answer_the_same_event_twice(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[limits]\nmessages_per_minute = 1000\nglobal_messages_per_minute = 0\n")
    start_at = time.time() + 8  # both have opened the database by then
    command = [sys.executable, "-m", "tests.scenario_two_bots", str(config), str(start_at), str(EVENTS)]
    results = await _two(command, command)
    for code, _, err in results:
        assert code == 0, err.decode()[-2000:]
    first, second = (set(json.loads(out.splitlines()[-1])) for _, out, _ in results)
    assert first and second  # both processes really answered a share
    assert not first & second  # nobody got two answers to one event
    assert first | second == {m.event_id for m in events(EVENTS)}  # and nobody got none
    replies = query(tmp_path, "SELECT COUNT(*) FROM messages WHERE role = 'assistant'")[0][0]
    notes = query(tmp_path, "SELECT COUNT(*) FROM memories")[0][0]
    assert (replies, notes) == (EVENTS - EVENTS // 4, EVENTS // 4)


async def test_two_processes_never_train_the_same_user_twice(
    make_config: Callable[..., Config], tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = make_config(training_text(tiny_model_dir))
    agent = await history_agent(config)
    try:
        for who in ("ann", "bob"):
            await rate_history(agent, who, 12)
    finally:
        await agent.close()
    path = write_config(tmp_path, training_text(tiny_model_dir))  # the same database
    assert load_config(path, environ={}).settings.storage.url == config.settings.storage.url
    command = [ATTUNE, "--config", str(path), "train"]
    results = await _two(command, command)
    outputs = [out.decode() + err.decode() for _, out, err in results]
    busy = [o for o in outputs if "another process is training now" in o]
    assert len(busy) == 1, outputs  # one trained, the other was told to wait
    runs = query(tmp_path, "SELECT user_id, status FROM training_runs ORDER BY user_id")
    assert len(runs) == 2 and len({r[0] for r in runs}) == 2 and {r[1] for r in runs} == {"succeeded"}, runs
