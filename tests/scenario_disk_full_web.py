"""Run by tests/test_faults.py inside a mount namespace whose data directory is a tmpfs
of 16 MB: the web chat answers a message, the disk fills, five messages are sent, the
space comes back, one more is sent. Prints what happened as one JSON line.

    python -m tests.scenario_disk_full_web CONFIG DATA_DIR
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import aiohttp

from agent_core.testing import RecordingBackend
from attune.wiring import load_config, open_agent
from bench.faults import fill_disk
from bots.web import WebConnector


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def main(config_path: str, data_dir: str) -> dict[str, Any]:
    lines = Lines()
    logging.getLogger().addHandler(lines)
    logging.getLogger().setLevel(logging.INFO)
    config = load_config(Path(config_path), environ={})
    agent = await open_agent(config, llm=RecordingBackend())
    await agent.llm.start()
    web = WebConnector(agent, config)
    await web.start()
    base = f"http://127.0.0.1:{web.port}"
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            csrf = (await (await http.get(f"{base}/api/session")).json())["csrf"]

            async def send(text: str) -> tuple[int, dict[str, Any] | None]:
                answer = await http.post(f"{base}/api/messages", json={"text": text}, headers={"X-CSRF-Token": csrf})
                body = await answer.json() if answer.content_type == "application/json" else {}
                return answer.status, body.get("reply")

            status, reply = await send("before the disk filled")
            before = [status, reply["kind"] if reply else None]
            filler = Path(data_dir) / "filler"
            fill_disk(filler)
            while_full = []
            for n in range(5):
                status, reply = await send(f"while the disk is full {n}")
                while_full.append([status, reply["text"] if reply else None])
            filler.unlink()  # the operator frees space
            status, reply = await send("after space came back")
            after = [status, reply["kind"] if reply else None]
        integrity = await agent.store.db.check()
        rows = await agent.store.db.fetchall("SELECT role, text FROM messages ORDER BY id")
    finally:
        await web.stop()
        await agent.close()
    messages = [r.getMessage() for r in lines.records]
    return {
        "before": before,
        "while_full": while_full,
        "after": after,
        "integrity": integrity,
        "stored": [[str(r[0]), str(r[1])] for r in rows],
        "refusal_lines": sum("the database refused a message" in m for m in messages),
        "tracebacks": sum(r.exc_info is not None or "Traceback" in r.getMessage() for r in lines.records),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:3]))))
