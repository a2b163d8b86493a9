"""Run by tests/test_crash.py inside a mount namespace whose ``data/adapters`` is a
tmpfs of a few KB: train ann's adapter on the full disk, answer her, free the space,
train again. Prints what happened as one JSON line.

    python -m tests.scenario_full_disk CONFIG ADAPTERS_DIR
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from agent_core.events import Message
from attune.wiring import load_config
from tests.test_training import adapter_of, history_agent, rate_history


async def main(config_path: str, adapters_dir: str) -> dict[str, object]:
    config = load_config(Path(config_path), environ={})
    agent = await history_agent(config)
    try:
        await rate_history(agent, "ann", 18)
        full = await agent.training.run()
        reply = await agent.handle_message(Message(platform="web", chat_id="ann", sender_id="ann", text="still there?"))
        assert reply is not None
        served_on_full_disk = (reply.text, await adapter_of(agent, reply.reply_id))
        subprocess.run(["umount", adapters_dir], check=True)  # the operator frees space
        freed = await agent.training.run()
        after = await agent.handle_message(Message(platform="web", chat_id="ann", sender_id="ann", text="and now?"))
        assert after is not None
        served_after = await adapter_of(agent, after.reply_id)
    finally:
        await agent.close()
    return {
        "full": [(t.name, t.status, t.reason) for t in full.tasks],
        "served_on_full_disk": served_on_full_disk,
        "freed": [(t.name, t.status, t.reason) for t in freed.tasks],
        "served_after": served_after,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:3]))))
