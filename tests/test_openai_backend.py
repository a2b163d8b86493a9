"""The OpenAI-compatible backend against a fake server on 127.0.0.1."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from agent_core.config import Config
from agent_core.events import Message
from agent_core.llm import AdapterRef, GenerationRequest, LLMError, create_backend
from agent_core.llm.openai_compat import OpenAIBackend
from attune.wiring import open_agent
from tests.fakes.openai import FakeOpenAI

REQUEST = GenerationRequest(messages=[{"role": "user", "content": "hi"}], max_new_tokens=20, temperature=0.0)


def _backend(make_config: Callable[..., Config], server: FakeOpenAI, key: str | None = None) -> OpenAIBackend:
    env = {
        "ATTUNE_LLM__BACKEND": "openai",
        "ATTUNE_LLM__OPENAI__BASE_URL": server.base_url,
        "ATTUNE_LLM__OPENAI__MODEL": "base-model",
        "ATTUNE_LLM__OPENAI__MAX_RETRIES": "0",
    }
    if key:
        env["OPENAI_API_KEY"] = key
    backend = create_backend(make_config(environ=env))
    assert isinstance(backend, OpenAIBackend)
    return backend


async def test_streams_a_reply_and_sends_key_model_and_messages(make_config: Callable[..., Config]) -> None:
    async with FakeOpenAI("Paris is the capital.") as server:
        backend = _backend(make_config, server, key="sk-test-key")
        pieces = [p async for p in backend.stream(REQUEST)]
        await backend.close()
    assert "".join(pieces).strip() == "Paris is the capital."
    assert len(pieces) == 4
    sent = server.requests[0]
    assert sent["model"] == "base-model" and sent["messages"] == [{"role": "user", "content": "hi"}]
    assert sent["max_tokens"] == 20 and sent["stream"] is True
    assert server.headers[0]["Authorization"] == "Bearer sk-test-key"


async def test_a_user_adapter_is_requested_by_its_served_name(make_config: Callable[..., Config]) -> None:
    async with FakeOpenAI() as server:
        backend = _backend(make_config, server)
        adapter = AdapterRef(name="user-7-v2", path="/adapters/7/v2")
        await backend.generate(GenerationRequest(messages=REQUEST.messages, adapter=adapter))
        backend.model_name = lambda a: f"custom/{a.name}" if a else "custom-base"  # the hook
        await backend.generate(GenerationRequest(messages=REQUEST.messages, adapter=adapter))
        await backend.generate(REQUEST)
        await backend.close()
    assert [r["model"] for r in server.requests] == ["user-7-v2", "custom/user-7-v2", "custom-base"]


async def test_server_errors_become_llm_errors_and_an_apology(make_config: Callable[..., Config]) -> None:
    async with FakeOpenAI(status=400) as server:
        backend = _backend(make_config, server)
        with pytest.raises(LLMError, match=re.escape(server.base_url)):
            await backend.generate(REQUEST)
        agent = await open_agent(make_config(), llm=backend)
        try:
            reply = await agent.handle_message(Message(platform="t", chat_id="c", sender_id="u", text="hello?"))
            assert reply is not None and reply.kind == "error"
            assert (await agent.store.db.fetchone("SELECT COUNT(*) FROM messages"))[0] == 1
        finally:
            await agent.close()


async def test_an_unreachable_server_is_an_llm_error(make_config: Callable[..., Config]) -> None:
    async with FakeOpenAI() as server:
        backend = _backend(make_config, server)
    # The server is gone now: connection refused on 127.0.0.1.
    with pytest.raises(LLMError, match="APIConnectionError"):
        await backend.generate(REQUEST)
    await backend.close()
