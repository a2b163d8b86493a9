"""One of two bot processes sharing one database (tests/test_postgres.py): handle the
same stream of platform events as the other process, at the same moment, and print the
event ids this process answered as one JSON line.

    python -m tests.scenario_two_bots CONFIG START_AT EVENTS
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from agent_core.events import Message
from agent_core.testing import RecordingBackend
from attune.wiring import load_config, open_agent


def events(count: int) -> list[Message]:
    """Messages and /remember commands from five people, each with its platform event id."""
    found = []
    for i in range(count):
        who = f"u{i % 5}"
        text = f"/remember note {i}" if i % 4 == 3 else f"message {i}"
        found.append(Message(platform="web", chat_id=who, sender_id=who, sender_name=who, text=text,
                             message_id=f"m{i}", event_id=f"ev-{i}"))  # fmt: skip
    return found


async def main(config_path: str, start_at: float, count: int) -> list[str]:
    backend = RecordingBackend(record=False)
    agent = await open_agent(load_config(Path(config_path), environ={}), llm=backend)
    await backend.start()
    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))  # both processes begin together
        answered = await asyncio.gather(*(agent.handle_message(m) for m in events(count)))
        handled = zip(events(count), answered, strict=True)
        return [str(m.event_id) for m, reply in handled if reply is not None]
    finally:
        await agent.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))))
