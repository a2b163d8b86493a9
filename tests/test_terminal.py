"""The terminal chat: in-process with a recording backend, and as a scripted `attune chat`."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from agent_core.agent import Agent
from attune.wiring import load_config
from bots import DEFAULT_FRONT_END, configured_connectors
from bots.terminal import TerminalConnector, as_reaction
from tests.conftest import ATTUNE, query, tiny_config_text, write_config


@pytest.mark.parametrize(
    ("line", "emoji"),
    [
        ("+1", "👍"),
        ("-1", "👎"),
        ("❤️", "❤️"),
        ("👍🏽", "👍🏽"),
        (":tada:", ":tada:"),
        ("🤷‍♀️", "🤷‍♀️"),
        ("hello", None),
        ("+1 for that", None),
        ("1", None),
        (":-)", None),
        ("", None),
    ],
)
def test_which_lines_are_reactions(line: str, emoji: str | None) -> None:
    assert as_reaction(line) == emoji


async def _session(agent: Agent, lines: str, user: str = "alice") -> str:
    out = io.StringIO()
    connector = TerminalConnector(agent, None, user=user, stdin=io.StringIO(lines), stdout=out)  # type: ignore[arg-type]
    await connector.start()
    await connector.finished.wait()
    return out.getvalue()


async def test_a_scripted_session_chats_reacts_and_runs_commands(agent: Agent) -> None:
    output = await _session(agent, "hello\n+1\n-1\n/stats\n/bogus\n\n")
    lines = output.splitlines()
    assert lines[0] == "attune> echo: hello"
    assert lines[1] == "(reacted 👍 to the last reply: reward +1.00)"
    assert lines[2] == "(reacted 👎 to the last reply: reward -1.00)"
    assert "Reactions: 1; reward -1.00" in output  # -1 replaced +1
    assert "Unknown command /bogus" in output
    alice = await agent.store.resolve_user("terminal", "alice")
    assert (await agent.store.stats(alice))["rewards"] == [-1.0]


async def test_reacting_before_any_reply_says_so(agent: Agent) -> None:
    assert "(nothing to react to yet)" in await _session(agent, "👍\n")


async def test_export_prints_the_json(agent: Agent) -> None:
    output = await _session(agent, "hi\n/export\n")
    document = json.loads(output[output.index("{") :])
    assert [m["text"] for m in document["messages"]] == ["hi", "echo: hi"]


def test_run_starts_the_default_front_end_when_no_platform_is_configured(tmp_path: Path) -> None:
    assert configured_connectors(load_config(write_config(tmp_path), environ={})) == [DEFAULT_FRONT_END]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ATTUNE_")}


def test_attune_chat_reads_a_script_from_stdin(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, tiny_config_text(tiny_model_dir))
    result = subprocess.run(
        [ATTUNE, "--config", str(config), "chat", "--user", "alice"],
        input="hello\n+1\n/remember I like tea\n/stats\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith("attune> ") and len(out[0]) > len("attune> ")
    assert out[1] == "(reacted 👍 to the last reply: reward +1.00)"
    assert "Noted: you like tea." in result.stdout
    assert "Messages: 1 from you, 1 replies from me." in result.stdout
    assert "Reactions: 1; reward +1.00" in result.stdout
    assert query(tmp_path, "SELECT platform_user_id FROM identities") == [("alice",)]
    assert query(tmp_path, "SELECT text FROM memories") == [("They like tea.",)]
