"""vLLM multi-LoRA serving through the openai backend, against a fake vLLM on 127.0.0.1.

The fake checks what vLLM checks: an adapter must be registered (with a path holding
a peft adapter) before it is asked for by name, and a registered name twice is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from agent_core.agent import Agent
from agent_core.config import Config
from agent_core.events import Message
from agent_core.llm import create_backend
from attune.wiring import open_agent
from storage.training import TrainingRecords
from tests.fakes.openai import FakeOpenAI


def _config(make_config: Callable[..., Config], server: FakeOpenAI, **extra: str) -> Config:
    env = {
        "ATTUNE_LLM__BACKEND": "openai",
        "ATTUNE_LLM__OPENAI__BASE_URL": server.base_url,
        "ATTUNE_LLM__OPENAI__MODEL": "base-model",
        "ATTUNE_LLM__OPENAI__MAX_RETRIES": "0",
        "ATTUNE_LLM__OPENAI__LOAD_ADAPTERS": "true",
        **extra,
    }
    return make_config(environ=env)


def _adapter_dir(config: Config, user_id: int, version: int) -> Path:
    """A directory laid out as a trained adapter (the fake reads only its config)."""
    path = config.settings.storage.adapters_path / f"user-{user_id}" / f"v{version}"
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return path


async def _agent_and_ann(config: Config) -> tuple[Agent, int]:
    """An agent on the configured server, and the id of ann, who has said hello."""
    agent = await open_agent(config, llm=create_backend(config))
    await _ask(agent, "ann", "hello")
    ann = await agent.store.find_user("web", "ann")
    assert ann is not None
    return agent, ann


async def _promote(agent: Agent, user_id: int, version: int, path: Path) -> None:
    records = TrainingRecords(agent.store.db)
    await records.add_adapter(user_id, version, str(path), promote=True, parent="base", metrics={})


async def _ask(agent: Agent, user: str, text: str) -> str:
    reply = await agent.handle_message(Message(platform="web", chat_id=user, sender_id=user, text=text))
    assert reply is not None and reply.kind == "answer", reply
    return reply.text


async def test_a_promoted_adapter_is_registered_once_then_asked_for_by_name(
    make_config: Callable[..., Config],
) -> None:
    async with FakeOpenAI("fine thanks", vllm=True) as server:
        config = _config(make_config, server)
        agent, ann = await _agent_and_ann(config)
        try:
            await _ask(agent, "bob", "hello")
            v1 = _adapter_dir(config, ann, 1)
            await _promote(agent, ann, 1, v1)
            await _ask(agent, "ann", "and now?")
            await _ask(agent, "ann", "again")
            await _ask(agent, "bob", "me too")
            assert server.lora_requests == [("load", {"lora_name": f"user-{ann}-v1", "lora_path": str(v1)})]
            models = [r["model"] for r in server.requests]
            assert models == ["base-model", "base-model", f"user-{ann}-v1", f"user-{ann}-v1", "base-model"]

            # A new version replaces the old one on the server too.
            v2 = _adapter_dir(config, ann, 2)
            await _promote(agent, ann, 2, v2)
            await _ask(agent, "ann", "newer?")
            assert server.lora_requests[1:] == [
                ("load", {"lora_name": f"user-{ann}-v2", "lora_path": str(v2)}),
                ("unload", {"lora_name": f"user-{ann}-v1"}),
            ]
            assert server.adapters == {f"user-{ann}-v2": str(v2)}

            # The server restarted and forgot its adapters: registered again, answered by the adapter.
            server.forget_adapters()
            await _ask(agent, "ann", "still there?")
            assert server.lora_requests[-1] == ("load", {"lora_name": f"user-{ann}-v2", "lora_path": str(v2)})
            assert [r["model"] for r in server.requests[-2:]] == [f"user-{ann}-v2", f"user-{ann}-v2"]
        finally:
            await agent.close()


async def test_the_server_sees_adapters_under_its_own_path(make_config: Callable[..., Config], tmp_path: Path) -> None:
    async with FakeOpenAI(vllm=True) as server:
        mount = tmp_path / "mnt-adapters"  # what the server calls the adapters directory
        config = _config(make_config, server, ATTUNE_LLM__OPENAI__ADAPTER_DIR=str(mount))
        mount.symlink_to(config.settings.storage.adapters_path, target_is_directory=True)
        agent, ann = await _agent_and_ann(config)
        try:
            await _promote(agent, ann, 1, _adapter_dir(config, ann, 1))
            await _ask(agent, "ann", "hi")
            assert server.lora_requests == [
                ("load", {"lora_name": f"user-{ann}-v1", "lora_path": str(mount / f"user-{ann}" / "v1")})
            ]
            assert server.requests[-1]["model"] == f"user-{ann}-v1"
        finally:
            await agent.close()


async def test_an_adapter_the_server_refuses_falls_back_to_the_base_model(
    make_config: Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeOpenAI("base answer", vllm=True) as server:
        config = _config(make_config, server)
        agent, ann = await _agent_and_ann(config)
        try:
            await _promote(agent, ann, 1, config.settings.storage.adapters_path / "gone")
            with caplog.at_level(logging.WARNING):
                assert (await _ask(agent, "ann", "hi")).strip() == "base answer"
            assert server.requests[-1]["model"] == "base-model"
            assert f"did not load adapter user-{ann}-v1" in caplog.text
        finally:
            await agent.close()
