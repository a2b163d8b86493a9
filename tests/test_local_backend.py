"""The local transformers backend on a tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_core.llm import AdapterRef, GenerationRequest, LLMError, create_backend
from agent_core.llm.local import LocalBackend
from agent_core.llm.model_files import ModelNotFound, find_model
from attune.wiring import load_config, open_agent
from tests.conftest import MODEL_CACHE, plain_generate, random_lora, tiny_config_text, write_config

pytestmark = pytest.mark.no_database  # no database in these tests: not run again on PostgreSQL

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture
async def tiny(tiny_model_dir: Path) -> AsyncIterator[LocalBackend]:
    backend = LocalBackend(str(tiny_model_dir), MODEL_CACHE, threads=1)
    await backend.start()
    yield backend
    await backend.close()


def greedy(adapter: AdapterRef | None = None, tokens: int = 10) -> GenerationRequest:
    return GenerationRequest(messages=PROMPT, max_new_tokens=tokens, temperature=0.0, adapter=adapter)  # type: ignore[arg-type]


async def test_generates_and_streams_the_same_text(tiny: LocalBackend) -> None:
    whole = await tiny.generate(greedy())
    pieces = [p async for p in tiny.stream(greedy())]
    assert whole and len(pieces) > 1
    assert "".join(pieces) == whole
    assert tiny.context_window == 1024  # the model's own maximum
    assert tiny.count_tokens("Hello there") == 2


async def test_greedy_output_matches_plain_transformers_generate(tiny: LocalBackend, tiny_model_dir: Path) -> None:
    assert await tiny.generate(greedy(tokens=8)) == plain_generate(tiny_model_dir, PROMPT, 8)


async def test_a_reply_written_on_from_its_first_words_matches_plain_generate(
    tiny: LocalBackend, tiny_model_dir: Path
) -> None:
    start = "Since you are vegetarian,"
    request = dataclasses.replace(greedy(tokens=8), reply_start=start)
    written = await tiny.generate(request)
    assert tiny.continues and written == plain_generate(tiny_model_dir, PROMPT, 8, start=start)
    assert written != await tiny.generate(greedy(tokens=8))  # the start changed what follows


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_lora(tiny_model_dir, tmp_path_factory.mktemp("adapter"), seed=1)


async def test_a_user_adapter_changes_the_output_and_the_base_stays_available(
    tiny: LocalBackend, lora_dir: Path
) -> None:
    base = await tiny.generate(greedy())
    adapted = await tiny.generate(greedy(AdapterRef("user-1-v1", str(lora_dir))))
    assert adapted != base
    assert await tiny.generate(greedy()) == base  # adapter switched off for a user without one
    assert await tiny.generate(greedy(AdapterRef("user-1-v1", str(lora_dir)))) == adapted


async def test_a_missing_adapter_is_an_error_not_a_crash(tiny: LocalBackend, tmp_path: Path) -> None:
    with pytest.raises(LLMError, match=r"no adapter_config\.json"):
        await tiny.generate(greedy(AdapterRef("user-2-v1", str(tmp_path))))
    assert await tiny.generate(greedy())  # still works afterwards


async def test_generation_runs_off_the_event_loop(tiny: LocalBackend) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.create_task(ticker())
    await tiny.generate(greedy(tokens=60))
    task.cancel()
    assert ticks > 5  # the loop kept running while the model worked


async def test_cancelling_a_stream_stops_the_worker(tiny: LocalBackend) -> None:
    before = tiny.generated_tokens
    stream = tiny.stream(GenerationRequest(messages=PROMPT, max_new_tokens=500, temperature=1.0))  # type: ignore[arg-type]
    assert await anext(stream)
    await stream.aclose()  # what a timeout does to the consumer
    await tiny.generate(greedy(tokens=2))  # queued behind the cancelled one on the worker
    assert tiny.generated_tokens - before < 100  # the cancelled request stopped early


def test_model_setting_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="not a transformers model directory"):
        find_model(str(tmp_path))
    assert find_model("smollm2").gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"


async def test_agent_end_to_end_with_the_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = load_config(write_config(tmp_path, tiny_config_text(tiny_model_dir)), environ={})
    backend = create_backend(config)
    assert isinstance(backend, LocalBackend)
    agent = await open_agent(config, llm=backend)
    try:
        await agent.llm.start()
        from agent_core.events import Message

        pieces: list[str] = []

        async def collect(piece: str) -> None:
            pieces.append(piece)

        reply = await agent.handle_message(
            Message(platform="test", chat_id="c", sender_id="u", text="hi"), on_text=collect
        )
        assert reply is not None and reply.kind == "answer" and reply.reply_id is not None
        assert "".join(pieces).strip() == reply.text
    finally:
        await agent.close()
